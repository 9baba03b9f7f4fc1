"""Response-stream framing shared by every request plane.

The server side turns a handler's payloads into sequenced frames ending in an end or error
frame; the caller side checks the sequence (a gap is an error, never a skip) and turns error
frames back into typed exceptions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from dynamo import errors
from dynamo.runtime.planes import Handler, RequestContext, ResponseStream
from dynamo.wire import FRAME_DATA, FRAME_END, FRAME_ERROR, StreamFrame

log = logging.getLogger(__name__)

SendFrame = Callable[[StreamFrame], Awaitable[None]]


async def run_handler(
    handler: Handler, payload: bytes, ctx: RequestContext, send: SendFrame
) -> None:
    """Run one request through `handler`, sending every frame with `send`.

    Cancellation (the caller went away) propagates without sending anything more.
    """
    seq = 0
    try:
        async for item in handler(payload, ctx):
            await send(StreamFrame(seq, FRAME_DATA, item))
            seq += 1
    except asyncio.CancelledError:
        ctx.cancelled.set()
        if ctx.stop_reason is not None:
            # The server stopped us, not the caller: tell the caller, who may migrate.
            try:
                await asyncio.shield(
                    send(StreamFrame(seq, FRAME_ERROR, error=ctx.stop_reason, code=errors.StreamBroken.code))
                )
            except Exception as exc:  # noqa: BLE001 - best effort; the caller also sees the instance vanish
                log.debug("could not tell the caller of %s that it stopped: %r", ctx.request_id, exc)
        raise
    except errors.DynamoError as exc:
        await send(StreamFrame(seq, FRAME_ERROR, error=exc.message, code=exc.code))
        return
    except Exception as exc:  # a handler bug must reach the caller as an error, not a hang
        log.exception("handler failed for request %s", ctx.request_id)
        await send(
            StreamFrame(seq, FRAME_ERROR, error=f"{type(exc).__name__}: {exc}", code="internal_error")
        )
        return
    await send(StreamFrame(seq, FRAME_END))


_ABORT = object()


class FrameStream(ResponseStream):
    """Caller side of a stream fed with frames by a transport (`feed`)."""

    def __init__(self, request_id: str, on_cancel: Callable[[], Awaitable[None]] | None) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[StreamFrame | object] = asyncio.Queue()
        self._on_cancel = on_cancel
        self._next_seq = 0
        self._done = False
        self._abort_error: Exception | None = None
        self.on_finish: Callable[[], None] | None = None

    def feed(self, frame: StreamFrame) -> None:
        self._queue.put_nowait(frame)

    def abort(self, error: Exception) -> None:
        if not self._done:
            self._abort_error = error
            self._queue.put_nowait(_ABORT)

    def _finish(self) -> None:
        self._done = True
        if self.on_finish is not None:
            self.on_finish()
            self.on_finish = None

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _ABORT:
            self._finish()
            assert self._abort_error is not None
            raise self._abort_error
        assert isinstance(item, StreamFrame)
        if item.seq != self._next_seq:
            self._finish()
            await self._cancel_remote()
            raise errors.StreamBroken(
                f"response stream {self.request_id} lost frames: expected {self._next_seq}, got {item.seq}"
            )
        self._next_seq += 1
        if item.kind == FRAME_DATA:
            return item.data
        self._finish()
        self._on_cancel = None  # the server finished the request: nothing to cancel
        if item.kind == FRAME_END:
            raise StopAsyncIteration
        raise errors.from_code(item.code, item.error)

    async def _cancel_remote(self) -> None:
        cb, self._on_cancel = self._on_cancel, None
        if cb is not None:
            await cb()

    async def aclose(self) -> None:
        # Also after an abort: the server may still be running (we lost its frames, or we
        # gave up on it at a deadline), and the cancel frees its KV blocks.
        if not self._done:
            self._finish()
        await self._cancel_remote()
