"""One request end to end: parse, preprocess, route, call the worker, then turn its token
stream into OpenAI chunks (streaming) or one response (aggregated).

`Pipeline.open` does everything up to and including the first output, so every error a
request can meet before its first token becomes a proper HTTP status; later errors end the
stream with an error event, unless the request can migrate to another worker (see `_migrate`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import msgspec

from dynamo import errors
from dynamo.runtime import ResponseStream
from dynamo.wire import OUTPUT_CODEC, EngineOutput, PreprocessedRequest, encode
from frontend.detokenize import IncrementalDetokenizer
from frontend.errors import error_info
from frontend.metrics import FrontendMetrics, ModelMetrics
from frontend.models import ModelManager, ServedModel
from frontend.preprocess import Prepared, preprocess_chat, preprocess_completion
from frontend.schemas import (
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    PromptTokensDetails,
    ResponseMessage,
    Usage,
    decode_chat_request,
    decode_completion_request,
)
from frontend.sse import DONE, ChunkWriter, error_event

log = logging.getLogger(__name__)

EndpointKind = Literal["chat", "completion"]

_ENDPOINT_LABEL = {"chat": "chat_completions", "completion": "completions"}
_decode_output = OUTPUT_CODEC.decode
_json_encode = msgspec.json.encode


def _nothing_ready() -> bytes | None:
    """`next_ready` of a response stream that cannot tell what has arrived: never batch."""
    return None


_DRAIN_TIMEOUT_S = 1.0
# How long a migrating request waits for some worker to take it (a bus restarting, the only
# other worker still registering) before its stream ends with an error.
_MIGRATION_WAIT_S = 15.0
_MIGRATION_BACKOFF_MAX_S = 1.0
# Errors that mean "this worker's stream is gone, the request itself is fine": migratable.
_MIGRATABLE = (errors.StreamBroken, errors.InstanceUnavailable)
# Bodies above this are preprocessed in a thread: tokenizers releases the GIL, and tokenizing a
# long prompt on the event loop would stall every other stream (~3 us/token on a busy core).
_THREAD_PREPROCESS_BYTES = 16 * 1024

P = TypeVar("P")


async def _run(body_bytes: int, fn: Callable[..., P], *args: object) -> P:
    if body_bytes > _THREAD_PREPROCESS_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    # Instances tried for one request when the chosen one turns out dead before answering.
    max_dispatch_attempts: int = 3
    # None: each model's card decides; otherwise overrides every card (frontend/config.py).
    migration_limit: int | None = None
    request_timeout_s: float = 0.0


class _Decoder:
    """Per-request output state: token accounting, stop handling, detokenization."""

    __slots__ = (
        "detok", "stop_ids", "max_tokens", "completion_tokens", "finish_reason", "worker_finished", "generated",
    )

    def __init__(self, prepared: Prepared, detok: IncrementalDetokenizer) -> None:
        self.detok = detok
        # Every token the workers produced so far: a migrated request resends them as prompt.
        self.generated: list[int] = []
        self.stop_ids = prepared.stop_token_ids
        self.max_tokens = prepared.max_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.worker_finished = False  # the worker sent a finish_reason (vs. we cut it short)

    def feed(self, out: EngineOutput) -> str:
        """Text to emit for one engine output; sets finish_reason when the request is done."""
        ids = out.token_ids
        self.generated += ids
        reason = out.finish_reason
        if reason is not None:
            self.worker_finished = True
        remaining = self.max_tokens - self.completion_tokens
        if len(ids) >= remaining:
            if len(ids) > remaining:  # the engine overran max_tokens: never pass that on
                ids = ids[:remaining]
                reason = "length"
            elif reason is None:
                reason = "length"
        self.completion_tokens += len(ids)
        if reason is not None:
            if reason == "stop":
                if ids and ids[-1] in self.stop_ids:
                    ids = ids[:-1]  # EOS / stop token ids are not part of the text
            elif reason != "length":
                raise errors.EngineError(f"the worker ended the request with finish_reason={reason!r}")
        detok = self.detok
        text = detok.step(ids) if ids else ""
        if detok.has_stop_strings and detok.stopped:
            reason = "stop"
        if reason is not None:
            self.finish_reason = reason
            text += detok.flush()
        return text


class Call:
    """One request in flight on one worker. `close(status)` is idempotent and releases
    everything: the worker stream (cancelling the worker if still running), the router's
    bookkeeping and the metrics."""

    __slots__ = (
        "kind", "model", "prepared", "stream", "instance_id", "first", "arrived_s", "response_id",
        "created", "metrics", "_frontend_metrics", "_closed", "_stream_done", "cached_tokens",
        "request_type", "migrations", "deadline", "timed_out", "_timer",
    )

    def __init__(
        self,
        kind: EndpointKind,
        model: ServedModel,
        prepared: Prepared,
        arrived_s: float,
        metrics: FrontendMetrics,
    ) -> None:
        self.kind = kind
        self.model = model
        self.prepared = prepared
        self.arrived_s = arrived_s
        self.stream: ResponseStream | None = None
        self.instance_id = 0
        self.first: EngineOutput | None = None
        self.response_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + prepared.request.request_id
        self.created = int(time.time())
        self._frontend_metrics = metrics
        self.metrics: ModelMetrics = metrics.for_model(model.name)
        self._closed = False
        self._stream_done = False
        self.cached_tokens = 0
        self.request_type = "stream" if prepared.stream else "unary"
        self.migrations = 0
        self.deadline: float | None = None  # event-loop time when the request times out
        self.timed_out = False
        self._timer: asyncio.TimerHandle | None = None
        self.metrics.inflight.inc()
        self.metrics.input_tokens.observe(len(prepared.request.token_ids))

    def usage(self, completion_tokens: int) -> Usage:
        prompt = len(self.prepared.request.token_ids)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion_tokens,
            total_tokens=prompt + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
        )

    def arm_deadline(self) -> None:
        """From now on, reaching the deadline fails the worker stream with RequestTimeout; a
        timer instead of a per-token timeout keeps the token path free of timer work."""
        if self.deadline is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(self.deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        self.timed_out = True
        if self.stream is not None:
            self.stream.abort(errors.RequestTimeout(f"request {self.prepared.request.request_id} timed out"))

    async def close(self, status: str, completion_tokens: int, worker_finished: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        stream, self.stream = self.stream, None
        try:
            if stream is not None and not self._stream_done:
                if worker_finished:
                    await _drain(stream, self.prepared.request.request_id)
                await stream.aclose()  # cancels the request on the worker if it still runs
        finally:
            if stream is not None and self.model.router is not None:
                self.model.router.request_finished(self.prepared.request.request_id, self.instance_id)
            m = self.metrics
            m.inflight.dec()
            m.duration.observe(time.perf_counter() - self.arrived_s)
            if status == "success":
                m.output_tokens.observe(completion_tokens)
            self._frontend_metrics.count(self.model.name, _ENDPOINT_LABEL[self.kind], self.request_type, status)


async def _drain(stream: ResponseStream, request_id: str) -> None:
    """The worker said it finished: read its end frame so that closing sends no cancel. Bounded,
    because the client already has its answer and must not wait on a misbehaving worker."""
    frames_ready = getattr(stream, "frames_ready", None)
    if frames_ready is not None and frames_ready():
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


class Pipeline:
    def __init__(self, manager: ModelManager, metrics: FrontendMetrics, config: PipelineConfig | None = None) -> None:
        self.manager = manager
        self.metrics = metrics
        self.config = config or PipelineConfig()

    # ------------------------------------------------------------------------ opening

    async def open(self, kind: EndpointKind, body: bytes, arrived_s: float) -> Call:
        """Parse, preprocess, route and wait for the first output. Raises DynamoError for
        anything that should become an HTTP error status."""
        model_label = "unknown"
        try:
            if kind == "chat":
                chat = decode_chat_request(body)
                model = self.manager.get(chat.model)
                model_label = model.name
                await model.wait_open()
                assert model.tokenizer is not None
                prepared = await _run(len(body), preprocess_chat, chat, model.card, model.tokenizer, uuid.uuid4().hex)
            else:
                completion = decode_completion_request(body)
                model = self.manager.get(completion.model)
                model_label = model.name
                await model.wait_open()
                assert model.tokenizer is not None
                prepared = await _run(
                    len(body), preprocess_completion, completion, model.card, model.tokenizer, uuid.uuid4().hex
                )
        except errors.DynamoError:
            # Unknown names are not used as labels: clients control them (unbounded cardinality).
            self.metrics.count(model_label, _ENDPOINT_LABEL[kind], "unary", "error")
            raise
        call = Call(kind, model, prepared, arrived_s, self.metrics)
        timeout_s = self.config.request_timeout_s
        try:
            if timeout_s > 0:
                loop = asyncio.get_running_loop()
                call.deadline = loop.time() + timeout_s - (time.perf_counter() - arrived_s)
                try:
                    async with asyncio.timeout_at(call.deadline):
                        await self._dispatch(call, prepared.request)
                except TimeoutError:
                    raise errors.RequestTimeout(
                        f"no output within the request timeout of {timeout_s}s"
                    ) from None
                call.arm_deadline()
            else:
                await self._dispatch(call, prepared.request)
        except asyncio.CancelledError:
            await call.close("cancelled", 0)
            raise
        except BaseException:
            await call.close("error", 0)
            raise
        return call

    async def _dispatch(
        self,
        call: Call,
        request: PreprocessedRequest,
        avoid: int | None = None,
        model: ServedModel | None = None,
    ) -> None:
        """Route and send, retrying other instances while nothing has reached the client: the
        chosen instance may be gone (InstanceUnavailable), die before its first output, or be
        full (Overloaded). `avoid` is skipped unless it is the only instance left."""
        model = model or call.model
        router, client = model.router, model.client
        if router is None or client is None:
            raise errors.NoInstances(f"model {model.name!r} has no live workers")
        migrating = request is not call.prepared.request
        payload = encode(request)
        tried: list[int] = []
        last_error: errors.DynamoError | None = None
        for _ in range(self.config.max_dispatch_attempts):
            live = model.instance_ids()
            candidates = [i for i in live if i not in tried and i != avoid] or [i for i in live if i not in tried]
            if not candidates:
                break
            decision = await router.select(request, candidates)
            instance_id = decision.instance_id
            tried.append(instance_id)
            try:
                stream = await client.generate(payload, instance_id, request.request_id)
            except errors.InstanceUnavailable as exc:
                router.request_finished(request.request_id, instance_id)
                last_error = exc
                log.warning("request %s: instance %x unavailable, retrying: %s", request.request_id, instance_id, exc)
                continue
            call.stream, call.instance_id = stream, instance_id
            try:
                raw = await stream.__anext__()
            except StopAsyncIteration:
                call._stream_done = True
                raise errors.StreamBroken(f"worker {instance_id:x} ended the stream without output") from None
            except (errors.StreamBroken, errors.InstanceUnavailable, errors.Overloaded) as exc:
                call._stream_done = True
                call.stream = None
                await stream.aclose()  # a worker that lost our frames may still be running it
                router.request_finished(request.request_id, instance_id)
                last_error = exc
                log.warning("request %s: instance %x failed before output, retrying: %s", request.request_id, instance_id, exc)
                continue
            first = _decode_output(raw)
            call.first = first
            call.model = model
            if not migrating:
                call.cached_tokens = first.cached_tokens or 0
                call.metrics.ttft.observe(time.perf_counter() - call.arrived_s)
            router.first_token(request.request_id, instance_id)
            return
        if isinstance(last_error, errors.Overloaded):
            raise errors.Overloaded(f"every worker of model {model.name!r} is full: {last_error.message}")
        if last_error is not None:
            raise errors.NoInstances(f"no worker of model {model.name!r} could take the request: {last_error.message}")
        raise errors.NoInstances(f"no live worker serves model {model.name!r}")

    # ----------------------------------------------------------------------- migration

    def _migration_limit(self, call: Call) -> int:
        limit = self.config.migration_limit
        return call.model.card.migration_limit if limit is None else limit

    async def _migrate(self, call: Call, decoder: _Decoder, exc: errors.DynamoError) -> EngineOutput:
        """The worker's stream broke mid-generation: send prompt + every token generated so far
        to another worker (or the same one, if it is the only one) and return the first new
        output, so the client's stream goes on with no gap and no duplicate. Re-raises `exc`
        when the request may not migrate (limit reached, deadline passed)."""
        if call.timed_out or call.migrations >= self._migration_limit(call):
            raise exc
        call.migrations += 1
        self.metrics.migrations.labels(call.model.name).inc()
        original = call.prepared.request
        old_stream, old_instance = call.stream, call.instance_id
        call.stream = None
        call._stream_done = False
        if old_stream is not None:
            await old_stream.aclose()  # if the worker still runs it (we lost its frames), stop it
        if call.model.router is not None:
            call.model.router.request_finished(original.request_id, old_instance)
        generated = decoder.generated
        request = msgspec.structs.replace(
            original,
            token_ids=[*original.token_ids, *generated],
            # Engines subtract this from max_tokens and count it toward min_tokens.
            generated_before=original.generated_before + len(generated),
        )
        log.warning(
            "request %s: worker %x failed after %d tokens (%s); migrating (%d of %d)",
            original.request_id, old_instance, len(generated), exc.message,
            call.migrations, self._migration_limit(call),
        )
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _MIGRATION_WAIT_S
        if call.deadline is not None:
            give_up = min(give_up, call.deadline)
        delay_s = 0.05
        while True:
            # The model may have been closed and reopened (its last worker went and came back).
            model = self.manager.models.get(call.model.name, call.model)
            try:
                async with asyncio.timeout_at(give_up):
                    await model.wait_open()
                    await self._dispatch(call, request, avoid=old_instance, model=model)
                break
            except TimeoutError:
                if call.deadline is not None and loop.time() >= call.deadline:
                    raise errors.RequestTimeout(f"request {original.request_id} timed out while migrating") from exc
                raise errors.StreamBroken(
                    f"request {original.request_id} could not migrate: no worker took it in time"
                ) from exc
            except (errors.NoInstances, errors.Overloaded, errors.InstanceUnavailable) as retry:
                if loop.time() + delay_s >= give_up:
                    raise errors.StreamBroken(
                        f"request {original.request_id} could not migrate: {retry.message}"
                    ) from exc
                await asyncio.sleep(delay_s)  # backoff while workers or the bus come back
                delay_s = min(delay_s * 2, _MIGRATION_BACKOFF_MAX_S)
        if call.timed_out and call.stream is not None:  # the deadline passed while we were moving
            call.stream.abort(errors.RequestTimeout(f"request {original.request_id} timed out"))
        first = call.first
        assert first is not None
        log.info("request %s: migrated to worker %x", original.request_id, call.instance_id)
        return first

    def _decoder(self, call: Call) -> _Decoder:
        tokenizer = call.model.tokenizer
        assert tokenizer is not None
        return _Decoder(call.prepared, IncrementalDetokenizer(tokenizer.tokenizer, call.prepared.stop_strings))

    # ----------------------------------------------------------------------- streaming

    async def stream(self, call: Call) -> AsyncIterator[bytes]:
        """SSE bytes for an opened call. Closing the generator early cancels the worker.

        Each engine output becomes one SSE event, but the events of every output that has
        already arrived are yielded as one bytes object: one ASGI send and one socket write per
        burst instead of per token. Nothing waits to batch: a lone output goes out at once."""
        decoder = self._decoder(call)
        prepared = call.prepared
        writer = ChunkWriter(call.kind, call.response_id, call.created, prepared.request.model, prepared.include_usage)
        status = "cancelled"
        itl = call.metrics.itl
        perf_counter = time.perf_counter
        events: list[bytes] = []  # SSE events not yet yielded
        try:
            first = call.first
            assert first is not None and call.stream is not None
            text = decoder.feed(first)
            events.append(writer.first(prepared.echo_text + text if prepared.echo_text else text))
            text = ""  # queued; from here `text` holds only what is not
            last = perf_counter()
            feed, text_chunk = decoder.feed, writer.text
            # Outputs that arrived while the first one was being routed join its write.
            next_ready: Callable[[], bytes | None] = getattr(call.stream, "next_ready", _nothing_ready)
            n = 0
            while decoder.finish_reason is None:
                more = next_ready()
                if more is None:
                    break
                if text:
                    events.append(text_chunk(text))
                out = _decode_output(more)
                n += len(out.token_ids)
                text = feed(out)
            if n:
                itl.observe((perf_counter() - last) / n)
            if decoder.finish_reason is None:
                if text:
                    events.append(text_chunk(text))
                    text = ""
                yield events[0] if len(events) == 1 else b"".join(events)
                events.clear()
            while decoder.finish_reason is None:
                stream = call.stream
                assert stream is not None
                next_ready = getattr(stream, "next_ready", _nothing_ready)
                try:
                    async for raw in stream:
                        now = perf_counter()
                        out = _decode_output(raw)
                        n = len(out.token_ids)
                        text = feed(out)
                        # Outputs that arrived together with this one join its write.
                        while decoder.finish_reason is None:
                            more = next_ready()
                            if more is None:
                                break
                            if text:
                                events.append(text_chunk(text))
                            out = _decode_output(more)
                            n += len(out.token_ids)
                            text = feed(out)
                        if n:  # one observation per burst: the mean gap of its tokens
                            itl.observe((now - last) / n)
                        last = now
                        if decoder.finish_reason is not None:
                            break
                        if text:
                            events.append(text_chunk(text))
                        if events:
                            yield events[0] if len(events) == 1 else b"".join(events)
                            events.clear()
                    else:
                        call._stream_done = True
                        raise errors.StreamBroken("the worker ended the stream before finishing the request")
                except _MIGRATABLE as exc:  # raised only by the stream, so `events` is empty
                    text = feed(await self._migrate(call, decoder, exc))
                    last = perf_counter()
                    if text and decoder.finish_reason is None:
                        yield text_chunk(text)
                        text = ""
            tail = events
            if text:
                tail.append(writer.text(text))
            tail.append(writer.finish(decoder.finish_reason))
            if prepared.include_usage:
                tail.append(writer.usage(call.usage(decoder.completion_tokens)))
            tail.append(DONE)
            yield b"".join(tail)
            status = "success"
        except errors.DynamoError as exc:
            status = "error"
            log.warning("request %s failed mid-stream: %s", prepared.request.request_id, exc.message)
            _, info = error_info(exc)
            # Events of outputs that came before the failing one are still the client's.
            yield b"".join((*events, error_event(info), DONE))
        finally:
            await call.close(status, decoder.completion_tokens, decoder.worker_finished)

    # ---------------------------------------------------------------------- aggregated

    async def complete(self, call: Call) -> bytes:
        """The whole response body for a non-streaming request."""
        decoder = self._decoder(call)
        status = "cancelled"
        try:
            first = call.first
            assert first is not None and call.stream is not None
            parts = [call.prepared.echo_text, decoder.feed(first)]
            while decoder.finish_reason is None:
                try:
                    async for raw in call.stream:
                        parts.append(decoder.feed(_decode_output(raw)))
                        if decoder.finish_reason is not None:
                            break
                    else:
                        call._stream_done = True
                        raise errors.StreamBroken("the worker ended the stream before finishing the request")
                except _MIGRATABLE as exc:
                    parts.append(decoder.feed(await self._migrate(call, decoder, exc)))
            status = "error"
            body = self._response_body(call, "".join(parts), decoder)
            status = "success"
            return body
        except errors.DynamoError:
            status = "error"
            raise
        finally:
            await call.close(status, decoder.completion_tokens, decoder.worker_finished)

    def _response_body(self, call: Call, text: str, decoder: _Decoder) -> bytes:
        usage = call.usage(decoder.completion_tokens)
        model = call.prepared.request.model
        if call.kind == "chat":
            return _json_encode(
                ChatCompletionResponse(
                    id=call.response_id,
                    created=call.created,
                    model=model,
                    choices=[ChatChoice(0, ResponseMessage("assistant", text), decoder.finish_reason)],
                    usage=usage,
                )
            )
        return _json_encode(
            CompletionResponse(
                id=call.response_id,
                created=call.created,
                model=model,
                choices=[CompletionChoice(0, text, decoder.finish_reason)],
                usage=usage,
            )
        )
