"""One choice of a request on the workers: its state machine from dispatch to close.

A `ChoiceStream` owns everything about its worker stream: which instance serves it, the first
output, reading outputs in bursts, moving to another worker when the stream breaks mid-way
(migration: prompt + every token so far go to the new worker, so the client sees no gap and no
duplicate), and releasing the stream and the router's bookkeeping exactly once. The pipeline
calls its methods; nothing outside flips its fields.

    NEW --dispatch--> STREAMING --(stream broke)--> MIGRATING --dispatch--> STREAMING ...
    STREAMING --(finish_reason)--> FINISHED;  any --close--> CLOSED
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass

import msgspec

from dynamo import errors, tracing
from dynamo.runtime import ResponseStream
from dynamo.wire import OUTPUT_CODEC, EngineOutput, PreprocessedRequest, encode
from frontend.metrics import FrontendMetrics
from frontend.models import ModelManager, ServedModel
from router.base import Router, RoutingDecision

log = logging.getLogger(__name__)

_decode_output = OUTPUT_CODEC.decode

_DRAIN_TIMEOUT_S = 1.0
# How long a migrating request waits for some worker to take it (a bus restarting, the only
# other worker still registering) before its stream ends with an error.
_MIGRATION_WAIT_S = 15.0
_MIGRATION_BACKOFF_MAX_S = 1.0
# Errors that mean "this worker's stream is gone, the request itself is fine": migratable.
MIGRATABLE = (errors.StreamBroken, errors.InstanceUnavailable)


@dataclass(frozen=True, slots=True)
class DispatchPolicy:
    # Instances tried for one request when the chosen one turns out dead before answering.
    max_dispatch_attempts: int = 3
    # None: each model's card decides; otherwise overrides every card (frontend/config.py).
    migration_limit: int | None = None


class ChoiceState(enum.Enum):
    NEW = "new"
    STREAMING = "streaming"
    MIGRATING = "migrating"
    FINISHED = "finished"
    CLOSED = "closed"


class ChoiceStream:
    __slots__ = (
        "request", "model", "state", "instance_id", "cached_tokens", "migrations", "timed_out",
        "_original", "_manager", "_policy", "_metrics", "_stream", "_pending", "_stream_done",
        "deadline", "span",
    )

    def __init__(
        self,
        request: PreprocessedRequest,
        model: ServedModel,
        manager: ModelManager,
        policy: DispatchPolicy,
        metrics: FrontendMetrics,
    ) -> None:
        self.request = request  # what the current worker was sent (changes on migration)
        self._original = request
        self.model = model
        self.state = ChoiceState.NEW
        self.instance_id = 0
        self.cached_tokens = 0
        self.migrations = 0
        self.timed_out = False
        self._manager = manager
        self._policy = policy
        self._metrics = metrics
        self._stream: ResponseStream | None = None
        self._pending: list[bytes] = []  # outputs read during dispatch, not yet handed out
        self._stream_done = False  # the worker stream ended (no cancel needed on close)
        self.deadline: float | None = None  # event-loop time when the whole request times out
        self.span: tracing.Span | None = None  # traced: this choice from dispatch to close

    # --------------------------------------------------------------------------- dispatch

    async def open(self) -> EngineOutput:
        """Route, send and wait for the first output (kept for the first `next_burst`)."""
        assert self.state is ChoiceState.NEW
        if tracing.active and tracing.recording():
            # The workers' spans become children of this one: its traceparent goes with the request.
            self.span = tracing.start_span("generate", attributes={"dynamo.request_id": self.request.request_id})
            self.request = self._original = msgspec.structs.replace(self.request, trace=tracing.traceparent(self.span))
        first = await self._dispatch(self.request, avoid=None, model=self.model)
        self.cached_tokens = first.cached_tokens or 0
        self.state = ChoiceState.STREAMING
        return first

    async def _dispatch(self, request: PreprocessedRequest, avoid: int | None, model: ServedModel) -> EngineOutput:
        """Route and send, retrying other instances while nothing has reached the client: the
        chosen instance may be gone (InstanceUnavailable), die before its first output, or be
        full (Overloaded). `avoid` is skipped unless it is the only instance left."""
        router, client = model.router, model.client
        if router is None or client is None:
            raise errors.NoInstances(f"model {model.name!r} has no live workers")
        payload = encode(request)
        tried: list[int] = []
        last_error: errors.DynamoError | None = None
        for _ in range(self._policy.max_dispatch_attempts):
            live = model.instance_ids()
            candidates = [i for i in live if i not in tried and i != avoid] or [i for i in live if i not in tried]
            if not candidates:
                break
            if request.trace is None:
                decision = await router.select(request, candidates)
            else:
                decision = await _traced_select(router, request, candidates)
            instance_id = decision.instance_id
            tried.append(instance_id)
            sent_s = time.perf_counter() if request.trace is not None else 0.0
            try:
                stream = await client.generate(payload, instance_id, request.request_id)
            except errors.InstanceUnavailable as exc:
                router.request_finished(request.request_id, instance_id)
                last_error = exc
                log.warning("request %s: instance %x unavailable, retrying: %s", request.request_id, instance_id, exc)
                continue
            self._stream, self.instance_id, self._stream_done = stream, instance_id, False
            try:
                burst = await stream.next_burst()
            except StopAsyncIteration:
                self._stream_done = True
                raise errors.StreamBroken(f"worker {instance_id:x} ended the stream without output") from None
            except (errors.StreamBroken, errors.InstanceUnavailable, errors.Overloaded) as exc:
                self._stream_done = True
                self._stream = None
                await stream.aclose()  # a worker that lost our frames may still be running it
                router.request_finished(request.request_id, instance_id)
                last_error = exc
                log.warning("request %s: instance %x failed before output, retrying: %s", request.request_id, instance_id, exc)
                continue
            self.model = model
            self.request = request
            router.first_token(request.request_id, instance_id)
            if request.trace is not None:
                tracing.emit(
                    "first_token", request.trace, sent_s, time.perf_counter(), {"dynamo.instance_id": f"{instance_id:x}"}
                )
            self._pending = burst[1:]
            return _decode_output(burst[0])
        if isinstance(last_error, errors.Overloaded):
            raise errors.Overloaded(f"every worker of model {model.name!r} is full: {last_error.message}")
        if last_error is not None:
            raise errors.NoInstances(f"no worker of model {model.name!r} could take the request: {last_error.message}")
        raise errors.NoInstances(f"no live worker serves model {model.name!r}")

    # ---------------------------------------------------------------------------- reading

    def take_pending(self) -> list[EngineOutput]:
        """Outputs that arrived with the first one (read during dispatch)."""
        pending, self._pending = self._pending, []
        return [_decode_output(raw) for raw in pending]

    async def next_burst(self, generated: list[int]) -> list[EngineOutput]:
        """The next outputs: one awaited, plus every one already behind it. On a broken
        stream, migrates (prompt + `generated` go to another worker) and returns the new
        worker's first outputs; raises when the request may not migrate."""
        if self._pending:
            return self.take_pending()
        stream = self._stream
        assert stream is not None and self.state is ChoiceState.STREAMING
        try:
            # ResponseStream.next_burst, inlined: one coroutine less per burst on the token path.
            burst = [await stream.__anext__()]
            more = stream.next_ready()
            while more is not None:
                burst.append(more)
                more = stream.next_ready()
        except StopAsyncIteration:
            self._stream_done = True
            exc: errors.DynamoError = errors.StreamBroken("the worker ended the stream before finishing the request")
            return [await self._migrate(generated, exc)] + self.take_pending()
        except MIGRATABLE as broken:
            return [await self._migrate(generated, broken)] + self.take_pending()
        return [_decode_output(raw) for raw in burst]

    def finished(self) -> None:
        """The choice got its finish_reason: nothing more is read."""
        self.state = ChoiceState.FINISHED

    # -------------------------------------------------------------------------- migration

    def migration_limit(self) -> int:
        limit = self._policy.migration_limit
        return self.model.card.migration_limit if limit is None else limit

    async def _migrate(self, generated: list[int], exc: errors.DynamoError) -> EngineOutput:
        trace = self._original.trace
        if trace is None or self.timed_out or self.migrations >= self.migration_limit():
            return await self._move(generated, exc, trace)
        # Traced: one span from the break to the new worker's first output, parent of its spans.
        attributes = {"dynamo.from_instance": f"{self.instance_id:x}", "dynamo.generated_tokens": len(generated)}
        with tracing.span("migration", trace, attributes=attributes) as span:
            return await self._move(generated, exc, tracing.traceparent(span))

    async def _move(self, generated: list[int], exc: errors.DynamoError, trace: str | None) -> EngineOutput:
        if self.timed_out or self.migrations >= self.migration_limit():
            raise exc
        self.state = ChoiceState.MIGRATING
        self.migrations += 1
        self._metrics.migrations.labels(self.model.name).inc()
        original = self._original
        old_stream, old_instance = self._stream, self.instance_id
        self._stream = None
        if old_stream is not None:
            await old_stream.aclose()  # if the worker still runs it (we lost its frames), stop it
        if self.model.router is not None:
            self.model.router.request_finished(original.request_id, old_instance)
        request = msgspec.structs.replace(
            original,
            token_ids=[*original.token_ids, *generated],
            # Engines subtract this from max_tokens, count it toward min_tokens and replay it
            # through the output constraint's grammar.
            generated_before=original.generated_before + len(generated),
            prompt_logprobs=None,  # the client has them from the first worker
            trace=trace,
        )
        log.warning(
            "request %s: worker %x failed after %d tokens (%s); migrating (%d of %d)",
            original.request_id, old_instance, len(generated), exc.message, self.migrations, self.migration_limit(),
        )
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _MIGRATION_WAIT_S
        if self.deadline is not None:
            give_up = min(give_up, self.deadline)
        delay_s = 0.05
        while True:
            # The model may have been closed and reopened (its last worker went and came back).
            model = self._manager.models.get(self.model.name, self.model)
            try:
                async with asyncio.timeout_at(give_up):
                    await model.wait_open()
                    first = await self._dispatch(request, avoid=old_instance, model=model)
                break
            except TimeoutError:
                if self.deadline is not None and loop.time() >= self.deadline:
                    raise errors.RequestTimeout(f"request {original.request_id} timed out while migrating") from exc
                raise errors.StreamBroken(
                    f"request {original.request_id} could not migrate: no worker took it in time"
                ) from exc
            except (errors.NoInstances, errors.Overloaded, errors.InstanceUnavailable) as retry:
                if loop.time() + delay_s >= give_up:
                    raise errors.StreamBroken(f"request {original.request_id} could not migrate: {retry.message}") from exc
                await asyncio.sleep(delay_s)  # backoff while workers or the bus come back
                delay_s = min(delay_s * 2, _MIGRATION_BACKOFF_MAX_S)
        self.state = ChoiceState.STREAMING
        if self.timed_out and self._stream is not None:  # the deadline passed while we were moving
            self._stream.abort(errors.RequestTimeout(f"request {original.request_id} timed out"))
        log.info("request %s: migrated to worker %x", original.request_id, self.instance_id)
        return first

    # ---------------------------------------------------------------------------- closing

    def abort(self, error: errors.DynamoError) -> None:
        """Fail the current worker stream (the request's deadline passed)."""
        if isinstance(error, errors.RequestTimeout):
            self.timed_out = True
        if self._stream is not None:
            self._stream.abort(error)

    async def close(self, worker_finished: bool) -> None:
        """Release the worker stream (cancelling the worker if it still runs) and the router's
        bookkeeping. Idempotent."""
        if self.state is ChoiceState.CLOSED:
            return
        self.state = ChoiceState.CLOSED
        stream, self._stream = self._stream, None
        try:
            if stream is not None and not self._stream_done:
                if worker_finished:
                    await _drain(stream, self.request.request_id)
                await stream.aclose()  # cancels the request on the worker if it still runs
        finally:
            if stream is not None and self.model.router is not None:
                self.model.router.request_finished(self.request.request_id, self.instance_id)
            if self.span is not None:
                attributes = {"dynamo.instance_id": f"{self.instance_id:x}", "dynamo.migrations": self.migrations}
                tracing.end(self.span, attributes=attributes)
                self.span = None


async def _traced_select(router: Router, request: PreprocessedRequest, candidates: list[int]) -> RoutingDecision:
    """`router.select` in a `route` span made current, so that a remote router carries it on."""
    with tracing.span("route", request.trace) as route:
        decision = await router.select(request, candidates)
        if route is not None:
            route.set_attributes(
                {"dynamo.instance_id": f"{decision.instance_id:x}", "dynamo.overlap_blocks": decision.overlap_blocks}
            )
    return decision


async def _drain(stream: ResponseStream, request_id: str) -> None:
    """The worker said it finished: read its end frame so that closing sends no cancel. Bounded,
    because the client already has its answer and must not wait on a misbehaving worker."""
    if stream.frames_ready():
        # Usually the end frame is already here: read it without arming a timeout.
        try:
            await stream.__anext__()
        except StopAsyncIteration:
            return
        except errors.DynamoError as exc:
            log.debug("request %s: worker stream did not end cleanly after finishing: %r", request_id, exc)
            return
    try:
        async with asyncio.timeout(_DRAIN_TIMEOUT_S):
            async for _ in stream:
                pass
    except (TimeoutError, errors.DynamoError) as exc:
        log.debug("request %s: worker stream did not end cleanly after finishing: %r", request_id, exc)

