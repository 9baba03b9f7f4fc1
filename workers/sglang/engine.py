"""SglangEngine: `sglang.Engine` in this process (its scheduler and detokenizer run as child
processes it starts) behind our Engine interface. NOT VERIFIED against a running SGLang: written
against SGLang 0.5.23's sources; see docs/engines.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from dynamo import errors
from dynamo.wire import EngineOutput, KvEventData, LoadMetrics, PreprocessedRequest
from kvbm.block_pool import KvEventSink
from workers.engine import Engine, EngineInfo
from workers.inflight import InflightRequests
from workers.sglang.args import INSTALL_HINT, SglangConfig
from workers.sglang.kv_events import wire_kv_events
from workers.sglang.sampling import (
    OutputDeltas,
    abort_error,
    finish_reason,
    logprob_args,
    prompt_logprobs,
    sampling_params,
)
from workers.sglang.stats import load_from_snapshots
from workers.vllm.kv_events import KvEventSubscriber, KvEventTranslator

log = logging.getLogger(__name__)


class SglangEngine(Engine):
    name = "sglang"

    def __init__(self, config: SglangConfig) -> None:
        self.config = config
        self.info: EngineInfo | None = None
        self._engine: Any = None
        self._page_size = 1
        self._incremental = False
        self._subscriber: KvEventSubscriber | None = None
        self._translator: KvEventTranslator | None = None
        self._load = LoadMetrics(worker_id=0)
        self._load_task: asyncio.Task[None] | None = None
        self._inflight = InflightRequests()

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self, kv_events: KvEventSink | None = None) -> EngineInfo:
        if self._engine is not None:
            raise RuntimeError("sglang engine already started")
        kwargs = dict(self.config.server_kwargs)
        subscriber = None
        if kv_events is not None and self.config.publish_kv_events:
            # The page size is final only once SGLang resolved its args; start() corrects it.
            kwargs, self._translator, subscriber = wire_kv_events(kwargs, kv_events, kwargs.get("page_size") or 1)
        try:
            # Launching loads the model in SGLang's scheduler process and blocks until it is
            # ready (tens of seconds): off the event loop. The tokenizer manager's own loop work
            # starts lazily on the first request, on this loop.
            self._engine = await asyncio.to_thread(_build, kwargs)
        except BaseException:
            if subscriber is not None:
                await subscriber.stop()
            raise
        resolved = _resolved_server_args(self._engine)
        self._page_size = int(resolved.get("page_size") or 1)
        self._incremental = bool(resolved.get("incremental_streaming_output"))
        info = _scheduler_info(self._engine)
        tm = self._engine.tokenizer_manager
        context = int(getattr(tm, "context_len", 0) or resolved.get("context_length") or 0)
        hf_eos = getattr(getattr(tm.model_config, "hf_config", None), "eos_token_id", None)
        eos_ids = (hf_eos,) if isinstance(hf_eos, int) else tuple(hf_eos or ())
        self.info = EngineInfo(
            context_length=context,
            kv_block_size=self._page_size,
            kv_total_blocks=int(info.get("max_total_num_tokens", 0)) // self._page_size,
            eos_token_ids=eos_ids,
        )
        if subscriber is not None:
            assert self._translator is not None
            self._translator.block_size_tokens = self._page_size
            self._subscriber = subscriber
            subscriber.start()
        self._load_task = asyncio.create_task(self._poll_load(), name="sglang-load")
        log.info(
            "SGLang engine up: %d KV pages of %d tokens, context %d",
            self.info.kv_total_blocks, self._page_size, context,
        )
        return self.info

    async def stop(self) -> None:
        task, self._load_task = self._load_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            await subscriber.stop()
        engine, self._engine = self._engine, None
        if engine is not None:
            # SGLang's shutdown kills every child process of this process (not only its own)
            # and waits for them: blocking, so off the loop.
            await asyncio.to_thread(engine.shutdown)

    async def _poll_load(self) -> None:
        while True:
            engine = self._engine
            if engine is not None:
                try:
                    snapshots = await engine.tokenizer_manager.get_loads()
                    self._load = load_from_snapshots(snapshots, self._page_size)
                except Exception:  # a missed poll leaves the last figures; never kill the worker
                    log.debug("reading SGLang's load snapshot failed", exc_info=True)
            await asyncio.sleep(self.config.load_poll_s)

    # ------------------------------------------------------------------------------ serving

    async def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        engine, info = self._engine, self.info
        if engine is None or info is None:
            raise errors.EngineError("sglang engine is not running")
        params = sampling_params(
            request, info.context_length, info.eos_token_ids, grammar=self.config.grammar_available
        )
        # SGLang keys its request state by rid; ours may repeat after a migration, so make it unique.
        rid = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        logprobs = logprob_args(request)
        want_logprobs = request.sampling.logprobs or request.sampling.top_logprobs > 0
        top_k = request.sampling.top_logprobs
        prompt_k = request.prompt_logprobs if logprobs.get("logprob_start_len") == 0 else None
        try:
            stream = await engine.async_generate(
                input_ids=list(request.token_ids),
                sampling_params=params,
                stream=True,
                rid=rid,
                **logprobs,
            )
        except ValueError as exc:  # SGLang's request validation (prompt too long, ...)
            raise errors.InvalidRequest(str(exc)) from None
        deltas = OutputDeltas(self._incremental)
        self._inflight.started(rid, len(request.token_ids))
        first = True
        finished = False
        try:
            async for out in stream:
                meta = out.get("meta_info") or {}
                finish = finish_reason(meta)
                if finish == "error":
                    finished = True
                    raise abort_error(meta)
                token_ids = deltas.take(out)
                if not token_ids and finish is None:
                    continue
                chunk = EngineOutput(token_ids=token_ids, finish_reason=finish)
                if first:
                    first = False
                    self._inflight.first_output(rid)
                    chunk.cached_tokens = int(meta.get("cached_tokens", 0))
                    if prompt_k is not None:
                        chunk.prompt_logprobs = prompt_logprobs(meta, prompt_k)
                if want_logprobs:
                    chunk.logprobs = deltas.logprobs(out, len(token_ids))
                    chunk.top_logprobs = deltas.top_logprobs(out, len(token_ids), top_k)
                yield chunk
                if finish is not None:
                    finished = True
                    return
        except ValueError as exc:
            raise errors.InvalidRequest(str(exc)) from None
        finally:
            self._inflight.ended(rid)
            if not finished:
                # Closing SGLang's generator does not stop the request in the scheduler (an
                # Engine request has no HTTP connection to watch): abort it, freeing its KV.
                with contextlib.suppress(Exception):
                    engine.tokenizer_manager.abort_request(rid=rid)
            with contextlib.suppress(Exception):
                await stream.aclose()

    def load_metrics(self) -> LoadMetrics:
        load = self._load
        if self._inflight.lags(load):
            # The snapshot lags a poll behind: count what this worker knows is in flight.
            total = load.kv_total_blocks or (self.info.kv_total_blocks if self.info else 0)
            return self._inflight.load(load.kv_active_blocks, total, load.timestamp_s)
        return load

    def kv_snapshot(self) -> list[KvEventData]:
        return self._translator.snapshot() if self._translator is not None else []


def _build(kwargs: dict[str, Any]) -> Any:
    try:
        import sglang
    except ImportError as exc:
        raise SystemExit(f"{INSTALL_HINT} ({exc})") from None
    return sglang.Engine(**kwargs)


def _resolved_server_args(engine: Any) -> dict[str, Any]:
    """SGLang 0.5.23 resolves its args (page size, context length, ...) after construction;
    resolved_dict() has the final values, the raw fields may still say None/auto."""
    args = engine.tokenizer_manager.server_args
    try:
        return dict(args.resolved_dict())
    except Exception:
        names = ("page_size", "context_length", "incremental_streaming_output")
        return {name: getattr(args, name, None) for name in names}


def _scheduler_info(engine: Any) -> dict[str, Any]:
    result = getattr(engine, "_scheduler_init_result", None)
    infos = getattr(result, "scheduler_infos", None) or [{}]
    return dict(infos[0])
