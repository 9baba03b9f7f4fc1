"""Serves one engine as a worker: the request handler, model registration, KV-event and
load-metric publishing, and answers to routers' snapshot requests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any

import msgspec

from dynamo import errors, tracing
from dynamo.logs import request_id_var
from dynamo.events import (
    KvEventPublisher,
    LoadPublisher,
    kv_events_subject,
    kv_snapshot_subject,
    load_metrics_subject,
)
from dynamo.model_registry import model_key
from dynamo.runtime import RequestContext, Runtime, ServedEndpoint, Subscription
from prometheus_client import CollectorRegistry

from dynamo.runtime.streaming import Suspended, next_if_ready
from dynamo.tasks import TaskSet
from dynamo.wire import (
    EMBEDDING_REQUEST_CODEC,
    REQUEST_CODEC,
    SNAPSHOT_REQUEST_CODEC,
    AllBlocksCleared,
    EngineOutput,
    KvEventData,
    ModelCard,
    WorkerRole,
    encode,
)
from workers.embedding import EmbeddingConfig, EmbeddingEngine, check_request, finish
from workers.engine import Engine, EngineInfo, KvbmEngine
from workers.disagg import DisaggConfig, DisaggRole, start_disagg
from kvbm.metrics import KvbmMetrics
from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    served_model_name: str
    model_path: str
    engine_name: str
    component: str = "backend"
    endpoint: str = "generate"
    role: WorkerRole = "aggregated"
    migration_limit: int = 0
    tool_call_parser: str = ""  # frontend/parsers names, carried to the frontend in the card
    reasoning_parser: str = ""
    load_publish_interval_s: float = 0.05
    # Requests allowed to wait for the engine (admitted but not yet scheduled); past it a new
    # request is refused with Overloaded so the frontend tries elsewhere. 0: unbounded.
    max_queued_requests: int = 1024  # waiting in the engine; 0: unbounded
    # After the first token, a message waits until it holds this many tokens (or the last):
    # per-message costs (the response plane, the frontend's SSE chunk and socket write) are
    # paid once per group. SGLang's --stream-interval, at the worker so every engine has it.
    stream_interval: int = 1
    disagg: DisaggConfig | None = None  # prefill/decode roles (workers/disagg); None: defaults
    # Set: the model is an embedding model, served by handle_embed on `endpoint` instead of
    # generate (workers/embedding.py).
    embedding: EmbeddingConfig | None = None

    def __post_init__(self) -> None:
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, got {self.stream_interval}")


def _merge_outputs(first: EngineOutput, second: EngineOutput) -> EngineOutput | None:
    """`first` followed by `second` as one output (None when logprobs would not line up)."""
    if (first.logprobs is None) != (second.logprobs is None) or (first.top_logprobs is None) != (
        second.top_logprobs is None
    ):
        return None
    if second.prompt_logprobs is not None:  # only ever on a request's first output
        return None
    return EngineOutput(
        token_ids=first.token_ids + second.token_ids,
        finish_reason=second.finish_reason,
        cached_tokens=first.cached_tokens if first.cached_tokens is not None else second.cached_tokens,
        logprobs=None if first.logprobs is None else first.logprobs + (second.logprobs or []),
        top_logprobs=None if first.top_logprobs is None else first.top_logprobs + (second.top_logprobs or []),
        prompt_logprobs=first.prompt_logprobs,
    )


class Worker:
    """Owns an engine's serving lifecycle. `async with Worker(...)` registers the worker and
    starts its publishers; leaving deregisters it and stops the engine."""

    def __init__(
        self,
        runtime: Runtime,
        engine: Engine,
        config: WorkerConfig,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.runtime = runtime
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry, config.served_model_name)
        self.engine = engine
        self.config = config
        self.info: EngineInfo | None = None
        self.instance_id = 0
        self.served: ServedEndpoint | None = None
        self._pending_events: deque[KvEventData] = deque()
        self._events_ready = asyncio.Event()
        self._tasks = TaskSet("worker task", log=log)
        self._snapshot_sub: Subscription | None = None
        self._kv_publisher: KvEventPublisher | None = None
        self._card_key: str | None = None
        self._active = 0  # requests inside handle()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self.disagg: DisaggRole | None = None  # set for --role prefill|decode

    # --------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.instance_id = await self.runtime.instance_id()
        ns, comp = self.runtime.namespace, self.config.component
        self._kv_publisher = KvEventPublisher(
            self.runtime.events, kv_events_subject(ns, comp), self.instance_id
        )
        embedding = self.config.embedding
        if embedding is not None:
            if not isinstance(self.engine, EmbeddingEngine):
                raise errors.EngineError(
                    f"the {self.config.engine_name} engine cannot serve embedding models (--runner pooling)"
                )
            self.engine.enable_embeddings(embedding)
        self.info = await self.engine.start(self._on_kv_event)
        kvbm = self.engine.kvbm if isinstance(self.engine, KvbmEngine) else None
        if kvbm is not None:
            kvbm.cache.bind_metrics(KvbmMetrics(self.registry, self.config.served_model_name))
        self._spawn(self._publish_kv_events())
        self._spawn(self._publish_load(LoadPublisher(self.runtime.events, load_metrics_subject(ns, comp))))
        self._snapshot_sub = await self.runtime.events.subscribe(kv_snapshot_subject(ns, comp))
        self._spawn(self._answer_snapshots(self._snapshot_sub))

        if self.config.role != "aggregated":
            self.disagg = await start_disagg(
                self.runtime, self.engine, self.config.role, comp, self.config.disagg or DisaggConfig(),
                on_prefill=self.metrics.prefilled,
            )
        endpoint = self.runtime.endpoint(comp, self.config.endpoint)
        self.served = await endpoint.serve(self.handle if embedding is None else self.handle_embed)
        card = ModelCard(
            served_model_name=self.config.served_model_name,
            model_path=self.config.model_path,
            context_length=self.info.context_length,
            kv_block_size=self.info.kv_block_size,
            role=self.config.role,
            engine=self.config.engine_name,
            namespace=ns,
            component=comp,
            endpoint=self.config.endpoint,
            instance_id=self.instance_id,
            kv_total_blocks=self.info.kv_total_blocks,
            migration_limit=self.config.migration_limit,
            tool_call_parser=self.config.tool_call_parser,
            reasoning_parser=self.config.reasoning_parser,
            model_type="generate" if embedding is None else "embedding",
            embedding_dim=self.engine.embedding_dim if isinstance(self.engine, EmbeddingEngine) and embedding else 0,
        )
        self._card_key = model_key(card)
        await self.runtime.register(self._card_key, encode(card))
        log.info(
            "worker %x serves %s (%s engine, %d KV blocks of %d tokens)",
            self.instance_id,
            self.config.served_model_name,
            self.config.engine_name,
            self.info.kv_total_blocks,
            self.info.kv_block_size,
        )

    async def drain(self, timeout_s: float) -> None:
        """Graceful shutdown: stop being routed to (the model card goes first, so frontends
        stop choosing this worker while its endpoint still answers), let in-flight requests
        finish for up to `timeout_s`, then stop serving; requests still running get a
        StreamBroken frame, which a frontend with migration enabled answers by moving them."""
        self.draining = True
        if self._card_key is not None:
            try:
                await self.runtime.deregister(self._card_key)
            except errors.DynamoError as exc:
                log.warning("could not deregister model card %s: %s", self._card_key, exc)
        log.info("worker %x draining: %d requests in flight, up to %.1fs", self.instance_id, self._active, timeout_s)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            log.info("worker %x drained", self.instance_id)
        except TimeoutError:
            log.warning(
                "worker %x: %d requests still running after %.1fs; cancelling them",
                self.instance_id, self._active, timeout_s,
            )
        if self.served is not None:
            await self.served.stop()
            self.served = None

    async def stop(self) -> None:
        if self.served is not None:
            await self.served.stop()
            self.served = None
        if self.disagg is not None:
            await self.disagg.close()
            self.disagg = None
        if self._snapshot_sub is not None:
            await self._snapshot_sub.close()
        await self._tasks.cancel_all()
        await self.engine.stop()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)

    # ----------------------------------------------------------------------------- serving

    async def handle(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        request = REQUEST_CODEC.decode(payload)
        request_id_var.set(request.request_id)  # this request's task logs under its id
        assert self.info is not None
        if len(request.token_ids) >= self.info.context_length:
            raise errors.InvalidRequest(
                f"prompt has {len(request.token_ids)} tokens; this model's context is "
                f"{self.info.context_length} tokens"
            )
        if self.draining:
            raise errors.Overloaded(f"worker {self.instance_id:x} is shutting down")
        limit = self.config.max_queued_requests
        if limit and self.engine.load_metrics().waiting_requests >= limit:
            self.metrics.finished("overloaded")
            raise errors.Overloaded(f"worker {self.instance_id:x} has {limit} requests queued already")
        span = None
        if request.trace is not None and tracing.active:
            attributes = {"dynamo.request_id": request.request_id, "dynamo.instance_id": f"{self.instance_id:x}",
                          "dynamo.prompt_tokens": len(request.token_ids)}
            span = tracing.start_span("worker.generate", request.trace, kind="server", attributes=attributes)
            # The engine's spans (queue, prefill, decode) and a remote prefill's become its children.
            request = msgspec.structs.replace(request, trace=tracing.traceparent(span))
        outputs = (self.disagg or self.engine).generate(request)
        status = "cancelled"
        self.metrics.inflight.inc()
        self._active += 1
        self._idle.clear()
        tokens = 0
        interval = self.config.stream_interval
        pending: Suspended[EngineOutput] | None = None
        try:
            ended = False
            while not ended:
                step: Awaitable[EngineOutput]
                step, pending = (pending, None) if pending is not None else (anext(outputs), None)
                try:
                    output = await step
                except StopAsyncIteration:
                    break
                # Outputs the engine already holds go out with this one, in one response-plane
                # message (one frame for the caller to receive and decode); an output that is
                # not ready yet is waited for only to fill a group of --stream-interval tokens
                # after the first token, which always goes at once.
                while output.finish_reason is None:
                    ready: EngineOutput | Suspended[EngineOutput]
                    try:
                        if tokens and len(output.token_ids) < interval:
                            ready = await anext(outputs)
                        else:
                            ready = next_if_ready(outputs)
                    except StopAsyncIteration:
                        ended = True
                        break
                    if isinstance(ready, Suspended):
                        pending = ready
                        break
                    merged = _merge_outputs(output, ready)
                    if merged is None:  # cannot be one output: send the first on its own
                        tokens += len(output.token_ids)
                        yield encode(output)
                        merged = ready
                    output = merged
                tokens += len(output.token_ids)
                yield encode(output)
                if output.finish_reason is not None:
                    break
            status = "ok"
        except errors.DynamoError as exc:
            status = exc.code
            raise
        except Exception:
            status = "error"
            raise
        finally:
            if pending is not None:
                pending.close()  # the engine step we started and no longer want
            self.metrics.output_tokens.inc(tokens)  # once per request, not per token
            self.metrics.inflight.dec()
            self.metrics.finished(status)
            self._active -= 1
            if not self._active:
                self._idle.set()
            if span is not None:
                if status != "ok":
                    tracing.fail(span, status)
                tracing.end(span, attributes={"dynamo.output_tokens": tokens, "dynamo.status": status})
            # Closing the engine's stream is what aborts the request and frees its blocks when
            # the caller cancels.
            await outputs.aclose()  # type: ignore[attr-defined]

    async def handle_embed(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        """An embedding model's endpoint: one EmbeddingRequest in, one EmbeddingOutput out."""
        request = EMBEDDING_REQUEST_CODEC.decode(payload)
        config, engine, info = self.config.embedding, self.engine, self.info
        assert config is not None and info is not None and isinstance(engine, EmbeddingEngine)
        pooling = check_request(request, config, info.context_length, engine.embedding_dim)
        if self.draining:
            raise errors.Overloaded(f"worker {self.instance_id:x} is shutting down")
        limit = self.config.max_queued_requests  # counted in inputs for an embedding model
        if limit and self.engine.load_metrics().waiting_requests >= limit:
            self.metrics.finished("overloaded")
            raise errors.Overloaded(f"worker {self.instance_id:x} has {limit} inputs queued already")
        status = "cancelled"
        self.metrics.inflight.inc()
        self._active += 1
        self._idle.clear()
        try:
            output = finish(await engine.embed(request, pooling), request, config)
            status = "ok"
        except errors.DynamoError as exc:
            status = exc.code
            raise
        except Exception:
            status = "error"
            raise
        finally:
            self.metrics.inflight.dec()
            self.metrics.finished(status)
            self._active -= 1
            if not self._active:
                self._idle.set()
        yield encode(output)

    def ready(self) -> bool:
        return self.served is not None

    # -------------------------------------------------------------------------- publishing

    def _on_kv_event(self, data: KvEventData) -> None:
        self._pending_events.append(data)
        self._events_ready.set()

    async def _publish_kv_events(self) -> None:
        assert self._kv_publisher is not None
        while True:
            await self._events_ready.wait()
            self._events_ready.clear()
            while self._pending_events:
                await self._kv_publisher.publish(self._pending_events.popleft())

    async def _publish_load(self, publisher: LoadPublisher) -> None:
        last = None
        while True:
            metrics = self.engine.load_metrics()
            self.metrics.observe_load(metrics)
            key = (
                metrics.active_requests,
                metrics.waiting_requests,
                metrics.kv_active_blocks,
                metrics.waiting_prefill_tokens,
            )
            if key != last:
                last = key
                await publisher.publish(
                    type(metrics)(
                        worker_id=self.instance_id,
                        active_requests=metrics.active_requests,
                        waiting_requests=metrics.waiting_requests,
                        kv_active_blocks=metrics.kv_active_blocks,
                        kv_total_blocks=metrics.kv_total_blocks,
                        waiting_prefill_tokens=metrics.waiting_prefill_tokens,
                        timestamp_s=time.time(),
                    )
                )
            await asyncio.sleep(self.config.load_publish_interval_s)

    async def _answer_snapshots(self, sub: Subscription) -> None:
        """A router that lost events asks for a snapshot: publish a clear followed by the whole
        cache, as ordinary numbered events, so every router converges on the same state."""
        async for payload in sub:
            request = SNAPSHOT_REQUEST_CODEC.decode(payload)
            if request.worker_id != self.instance_id:
                continue
            self._on_kv_event(AllBlocksCleared())
            for data in self.engine.kv_snapshot():
                self._on_kv_event(data)
