"""SSE framing: every chunk the templates build is one `data:` event that decodes into the
OpenAI chunk types; errors are error objects; the stream ends with `data: [DONE]`."""

from __future__ import annotations

import msgspec

from frontend.schemas import ChatCompletionChunk, CompletionChunk, ErrorInfo, Usage
from frontend.sse import DONE, ChunkWriter, error_event


def _payload(event: bytes) -> bytes:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert event.count(b"\n\n") == 1
    return event[len(b"data: ") : -2]


def test_chat_chunks() -> None:
    w = ChunkWriter("chat", "chatcmpl-1", 123, 'm"odel', include_usage=True)
    first = msgspec.json.decode(_payload(w.first("Hi")), type=ChatCompletionChunk)
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == "Hi"
    assert first.model == 'm"odel' and first.created == 123 and first.id == "chatcmpl-1"
    text = msgspec.json.decode(_payload(w.text('a "quoted"\nline 😀')), type=ChatCompletionChunk)
    assert text.choices[0].delta.content == 'a "quoted"\nline 😀' and text.choices[0].finish_reason is None
    assert b'"usage":null' in w.text("x")
    fin = msgspec.json.decode(_payload(w.finish("stop")), type=ChatCompletionChunk)
    assert fin.choices[0].finish_reason == "stop" and fin.choices[0].delta.content is None
    usage = msgspec.json.decode(_payload(w.usage(Usage(1, 2, 3))), type=ChatCompletionChunk)
    assert usage.choices == [] and usage.usage == Usage(1, 2, 3)


def test_completion_chunks_without_usage() -> None:
    w = ChunkWriter("completion", "cmpl-1", 1, "m", include_usage=False)
    chunk = msgspec.json.decode(_payload(w.text("x")), type=CompletionChunk)
    assert chunk.choices[0].text == "x" and chunk.object == "text_completion"
    assert b"usage" not in w.text("x")
    fin = msgspec.json.decode(_payload(w.finish("length")), type=CompletionChunk)
    assert fin.choices[0].finish_reason == "length"


def test_error_event_and_done() -> None:
    body = msgspec.json.decode(_payload(error_event(ErrorInfo("boom", "server_error", None, "stream_broken"))))
    assert body == {"error": {"message": "boom", "type": "server_error", "param": None, "code": "stream_broken"}}
    assert DONE == b"data: [DONE]\n\n"
