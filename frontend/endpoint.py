"""The raw ASGI endpoint every POST API route uses (chat and text completions, Responses,
Anthropic Messages, tokenize): the body limit, the frontend's in-flight limit, the caller's
tenant rate limits (frontend/rate_limit.py), cancellation when the client disconnects, a JSON
or SSE reply, and errors in the route's own API shape.

The routes skip FastAPI's per-request machinery (dependency injection, pydantic) and, for the
completion routes, its middleware stack (app.py says why): this is the per-token path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from dynamo import tracing
from frontend.admission import PRIORITY_HEADER, AdmissionGate, Ticket
from frontend.errors import HttpError, RequestTooLarge
from frontend.rate_limit import CURRENT_ADMISSION, TENANT_SCOPE_KEY, Admission, RateLimited, TenantQuota

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies must not buffer the stream
]
_JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass(frozen=True, slots=True)
class JsonReply:
    body: bytes
    status: int = 200


@dataclass(frozen=True, slots=True)
class StreamReply:
    """SSE bytes; the endpoint closes the iterator when done or when the client leaves (which
    must cancel the work behind it). Errors after the first byte are the iterator's to encode.
    `is_last(chunk)`, when given, recognises the stream's final chunk, which then also ends the
    HTTP body: one write instead of a separate empty terminating one."""

    events: AsyncIterator[bytes]
    is_last: Callable[[bytes], bool] | None = None
    # Releases the work behind the stream, also when `events` never started (the client left
    # before the first write): closing a generator that never ran skips its own cleanup.
    close: Callable[[], Awaitable[None]] | None = None


Reply = JsonReply | StreamReply
# (body, arrival time from time.perf_counter()) -> the reply. Raising before the reply is an error
# status, encoded by the endpoint's ErrorEncoder.
Handler = Callable[[bytes, float], Awaitable[Reply]]
ErrorEncoder = Callable[[BaseException], HttpError]


# Requests this frontend serves at once, across every API route that runs work on workers:
# past the limit a request waits in a bounded priority queue, or gets 429 (frontend/admission.py).
InflightLimit = AdmissionGate


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _server_span(scope: Scope, arrived_s: float) -> Any:
    header = _header(scope, b"traceparent")
    parent = header.decode("latin-1") if header is not None else tracing.CURRENT
    return tracing.start_span(f"POST {scope.get('path', '')}", parent, kind="server", start_s=arrived_s)


def _traced_send(send: Send, span: Any) -> Send:
    """`send` that puts the span's id in the response (W3C Trace Context's `traceresponse`
    header, traceparent's format) and its status code on the span."""
    header = (b"traceresponse", (tracing.traceparent(span) or "").encode())

    # Not a coroutine function: it hands back send's own awaitable, so each streamed chunk
    # costs one plain call, not an extra coroutine.
    def traced(message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            status = message["status"]
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                tracing.fail(span, f"HTTP {status}")
            message = {**message, "headers": [*message.get("headers", ()), header]}
        return send(message)

    return traced


class _DisconnectWatch:
    """Cancels the serving task when the client disconnects: whatever it awaits (a worker's next
    output) unwinds and closes the worker stream, which cancels the request on the worker."""

    __slots__ = ("disconnected", "finishing", "started", "_task", "_watcher")

    def __init__(self, receive: Receive) -> None:
        self.disconnected = False
        self.finishing = False  # the last send is under way: its disconnect is no news
        self.started = False  # the status line went out: an error can no longer change it
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not self.finishing:
                        self.disconnected = True
                        self._task.cancel()
                    return
        except asyncio.CancelledError:
            # stop(): the request is over. Re-raised, the error would stay on the task, its
            # traceback holding this frame, `self` and so the task again: a reference cycle
            # that keeps the request's uvicorn objects (~30) for the cyclic GC, every request.
            return

    def stop(self) -> None:
        self._watcher.cancel()


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError  # nobody to answer
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_bytes(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: HttpError) -> None:
    await send_bytes(send, error.status, list(error.headers), error.body)


class ApiEndpoint:
    """POST handler as a raw ASGI app; mount it with starlette's `Route(path, endpoint)`."""

    def __init__(
        self, handler: Handler, on_error: ErrorEncoder, max_body_bytes: int, limit: InflightLimit | None
    ) -> None:
        self.handler = handler
        self.on_error = on_error
        self.max_body_bytes = max_body_bytes
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived_s = time.perf_counter()
        admission: Admission | None = None
        try:
            body = await read_body(receive, self.max_body_bytes)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - too large: the API's error body
            await send_error(send, self._error(exc))
            return
        # Watching from here on: a client that leaves while its request waits for a slot
        # leaves the queue.
        watch = _DisconnectWatch(receive)
        task = asyncio.current_task()
        failed = True
        held: Ticket | None = None  # the admission slot this request holds
        reset = None
        # Traced: the request's server span (a child of the client's traceparent when it sent
        # one) is current for all the work below, and the response names it.
        span = _server_span(scope, arrived_s) if tracing.active else None
        trace_token = None
        if span is not None:
            trace_token = tracing.attach(span)
            send = _traced_send(send, span)
        try:
            if self.limit is not None:
                # The tenant's rate limits and the admission queue apply to the routes that do
                # work on workers (not tokenize or count_tokens). Rate limits first: a request
                # over them is refused at once rather than after its wait.
                quota: TenantQuota | None = scope.get(TENANT_SCOPE_KEY)
                ticket = self.limit.ticket(
                    quota.tenant if quota is not None else None, _header(scope, PRIORITY_HEADER), body
                )
                if quota is not None:
                    admission = await quota.admit_async(len(body))  # leases when limits are shared
                if span is None or not span.is_recording():
                    await self.limit.acquire(ticket)
                else:
                    with tracing.span("queue"):
                        await self.limit.acquire(ticket)
                held = ticket
            reset = CURRENT_ADMISSION.set(admission) if admission is not None else None
            await self._serve(body, arrived_s, send, watch)
            failed = False
        except asyncio.CancelledError:
            if not watch.disconnected:
                raise
            assert task is not None
            task.uncancel()  # the client left: the cancellation was ours, and it is done
        except Exception as exc:
            if watch.started:
                raise  # only the server can end a started response: it closes the connection
            await send_error(send, self._error(exc))
        finally:
            watch.stop()
            if span is not None:
                tracing.detach(trace_token)
                if watch.disconnected:
                    tracing.fail(span, "client disconnected")
                tracing.end(span)
            if reset is not None:
                CURRENT_ADMISSION.reset(reset)
            if admission is not None:
                # Output tokens: what the stream actually produced. A request refused by the
                # admission queue gets its input estimate back, like any that failed early.
                admission.finish(failed)
            if held is not None:
                assert self.limit is not None
                self.limit.release(held)

    def _error(self, exc: BaseException) -> HttpError:
        error = self.on_error(exc)
        if isinstance(exc, RateLimited):
            # The tenant's Retry-After and x-ratelimit-* replace the generic Retry-After.
            kept = tuple(h for h in error.headers if h[0] != b"retry-after")
            error = HttpError(error.status, error.body, kept + exc.headers)
        return error

    async def _serve(self, body: bytes, arrived_s: float, send: Send, watch: _DisconnectWatch) -> None:
        reply = await self.handler(body, arrived_s)
        if isinstance(reply, JsonReply):
            watch.finishing = watch.started = True
            await send_bytes(send, reply.status, _JSON_HEADERS, reply.body)
            return
        events, is_last = reply.events, reply.is_last
        try:
            watch.started = True
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            async for chunk in events:
                if is_last is not None and is_last(chunk):
                    # The iterator still runs to its end afterwards, which settles its work.
                    watch.finishing = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                else:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not watch.finishing:
                watch.finishing = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            try:
                await events.aclose()  # type: ignore[attr-defined]
            finally:
                if reply.close is not None:
                    await reply.close()
