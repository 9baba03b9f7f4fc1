"""Response-stream framing shared by every request plane.

The server side turns a handler's payloads into sequenced frames ending in an end or error
frame; the caller side checks the sequence (a gap is an error, never a skip) and turns error
frames back into typed exceptions.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

from dynamo import errors
from dynamo.runtime.planes import Handler, RequestContext, ResponseStream
from dynamo.wire import FRAME_DATA, FRAME_END, FRAME_ERROR, StreamFrame

log = logging.getLogger(__name__)

SendFrame = Callable[[StreamFrame], Awaitable[None]]
T = TypeVar("T")


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
    """Caller side of a stream fed with frames by a transport (`feed`).

    Frames wait in a deque with one waiter future rather than an asyncio.Queue: this is the
    per-token path, and it lets `next_ready` hand over frames that already arrived without
    awaiting, so a reader can batch what a burst of frames delivered."""

    def __init__(self, request_id: str, on_cancel: Callable[[], Awaitable[None]] | None) -> None:
        self.request_id = request_id
        self._frames: deque[StreamFrame | object] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._on_cancel = on_cancel
        self._next_seq = 0
        self._done = False
        self._abort_error: Exception | None = None
        self.on_finish: Callable[[], None] | None = None

    def _put(self, item: StreamFrame | object) -> None:
        self._frames.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # a reader cancelled while waiting leaves a cancelled future
                waiter.set_result(None)

    def feed(self, frame: StreamFrame) -> None:
        self._put(frame)

    def abort(self, error: Exception) -> None:
        if not self._done:
            self._abort_error = error
            self._put(_ABORT)

    def _finish(self) -> None:
        self._done = True
        if self.on_finish is not None:
            self.on_finish()
            self.on_finish = None

    def frames_ready(self) -> bool:
        """Whether `__anext__` would return (or raise) without waiting."""
        return bool(self._frames) or self._done

    def next_ready(self) -> bytes | None:
        """The next payload if its data frame has already arrived, without waiting; None when
        nothing is there yet or the next frame is not plain data (an end, an error, an abort or
        a sequence gap), which `__anext__` then reports as usual."""
        frames = self._frames
        if self._done or not frames:
            return None
        item = frames[0]
        if item is _ABORT:
            return None
        assert isinstance(item, StreamFrame)
        if item.kind != FRAME_DATA or item.seq != self._next_seq:
            return None
        frames.popleft()
        self._next_seq += 1
        return item.data

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        frames = self._frames
        while not frames:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            await waiter
        item = frames.popleft()
        if item is _ABORT:
            self._finish()
            assert self._abort_error is not None
            raise self._abort_error
        assert isinstance(item, StreamFrame)
        if item.seq != self._next_seq:
            self._finish()
            await self._cancel_remote()
            # An error frame after a gap may say why the frames were lost.
            why = f" ({item.error})" if item.kind == FRAME_ERROR and item.error else ""
            raise errors.StreamBroken(
                f"response stream {self.request_id} lost frames: expected {self._next_seq}, got {item.seq}{why}"
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


class Suspended(Generic[T]):
    """The `__anext__` step of an async iterator that was started by `next_if_ready` and had to
    wait. Awaiting it finishes that same step (its result or exception); `close()` abandons it
    by cancelling it where it waits (an async generator then runs its cleanup and ends)."""

    __slots__ = ("_step", "_yielded")

    def __init__(self, step: Coroutine[Any, Any, T], yielded: Any) -> None:
        self._step = step
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, T]:
        # Hands the step's pending future to the awaiting task, then drives the step on from
        # where it stopped: what `await` of the step itself would have done from the start.
        step, value = self._step, self._yielded
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                self.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - cancellation and the like go to the step
                try:
                    value = step.throw(exc)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
            else:
                try:
                    value = step.send(sent)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]

    def close(self) -> None:
        # Cancel the step where it waits, as cancelling a task awaiting it would. (Closing an
        # async generator's asend object leaves the generator marked running on Python 3.11.)
        step = self._step
        try:
            step.throw(asyncio.CancelledError())
        except (asyncio.CancelledError, StopIteration, StopAsyncIteration, GeneratorExit):
            return
        step.close()  # it swallowed the cancellation and waits again: best effort


def next_if_ready(iterator: AsyncIterator[T]) -> T | Suspended[T]:
    """The iterator's next item if producing it needs no waiting; otherwise the started step as
    a `Suspended`, to be awaited (or closed) by the caller. StopAsyncIteration propagates.

    This lets a sender batch the items an iterator already holds (an engine's queued outputs)
    without ever delaying one that is not there yet."""
    step = iterator.__anext__()
    try:
        yielded = step.send(None)  # type: ignore[attr-defined]
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    return Suspended(step, yielded)  # type: ignore[arg-type]
