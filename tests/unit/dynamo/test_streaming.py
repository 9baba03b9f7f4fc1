import pytest

from dynamo import errors
from dynamo.runtime.streaming import FrameStream
from dynamo.wire import FRAME_DATA, FRAME_END, FRAME_ERROR, StreamFrame


async def test_frames_in_order_then_end() -> None:
    stream = FrameStream("r", None)
    for i, data in enumerate([b"a", b"b"]):
        stream.feed(StreamFrame(i, FRAME_DATA, data))
    stream.feed(StreamFrame(2, FRAME_END))
    assert [x async for x in stream] == [b"a", b"b"]


async def test_a_gap_is_an_error_and_cancels_the_remote() -> None:
    cancelled = []

    async def cancel() -> None:
        cancelled.append(True)

    stream = FrameStream("r", cancel)
    stream.feed(StreamFrame(0, FRAME_DATA, b"a"))
    stream.feed(StreamFrame(2, FRAME_DATA, b"c"))
    assert await stream.__anext__() == b"a"
    with pytest.raises(errors.StreamBroken, match="lost frames"):
        await stream.__anext__()
    assert cancelled == [True]


async def test_error_frame_becomes_a_typed_error() -> None:
    stream = FrameStream("r", None)
    stream.feed(StreamFrame(0, FRAME_ERROR, error="prompt too long", code="invalid_request"))
    with pytest.raises(errors.InvalidRequest, match="prompt too long"):
        await stream.__anext__()


async def test_abort_wakes_a_waiting_reader() -> None:
    stream = FrameStream("r", None)
    stream.abort(errors.StreamBroken("worker died"))
    with pytest.raises(errors.StreamBroken, match="worker died"):
        await stream.__anext__()


async def test_aclose_cancels_only_once_and_only_if_unfinished() -> None:
    calls = []

    async def cancel() -> None:
        calls.append(1)

    stream = FrameStream("r", cancel)
    await stream.aclose()
    await stream.aclose()
    assert calls == [1]
    done = FrameStream("r2", cancel)
    done.feed(StreamFrame(0, FRAME_END))
    assert [x async for x in done] == []
    await done.aclose()
    assert calls == [1]
