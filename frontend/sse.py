"""Server-sent events for OpenAI streams: chunk bytes built from per-request templates (only
the text is JSON-encoded per token), the usage chunk, error events and `data: [DONE]`."""

from __future__ import annotations

from typing import Literal

import msgspec

from frontend.schemas import ErrorInfo, ErrorResponse, Usage

DONE = b"data: [DONE]\n\n"

_encode = msgspec.json.encode

StreamKind = Literal["chat", "completion"]


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def error_event(info: ErrorInfo) -> bytes:
    """An OpenAI-style error object as a data event (what OpenAI clients raise on mid-stream)."""
    return event(_encode(ErrorResponse(info)))


class ChunkWriter:
    """Encodes one stream's chunks. Everything but the text is fixed per request, so it is
    encoded once here and each token costs one JSON string encode and one join."""

    __slots__ = ("_text_prefix", "_text_suffix", "_first_prefix", "_finish_prefix", "_finish_suffix", "_usage_prefix")

    def __init__(self, kind: StreamKind, response_id: str, created: int, model: str, include_usage: bool) -> None:
        obj = b"chat.completion.chunk" if kind == "chat" else b"text_completion"
        head = b"".join(
            (
                b'data: {"id":',
                _encode(response_id),
                b',"object":"',
                obj,
                b'","created":',
                str(created).encode(),
                b',"model":',
                _encode(model),
                b',"choices":',
            )
        )
        usage_null = b',"usage":null' if include_usage else b""
        choice = b'[{"index":0,'
        if kind == "chat":
            self._first_prefix = head + choice + b'"delta":{"role":"assistant","content":'
            self._text_prefix = head + choice + b'"delta":{"content":'
            self._text_suffix = b'},"logprobs":null,"finish_reason":null}]' + usage_null + b"}\n\n"
            self._finish_prefix = head + choice + b'"delta":{},"logprobs":null,"finish_reason":'
        else:
            self._first_prefix = self._text_prefix = head + choice + b'"text":'
            self._text_suffix = b',"logprobs":null,"finish_reason":null}]' + usage_null + b"}\n\n"
            self._finish_prefix = head + choice + b'"text":"","logprobs":null,"finish_reason":'
        self._finish_suffix = b"}]" + usage_null + b"}\n\n"
        self._usage_prefix = head + b'[],"usage":'

    def first(self, text: str) -> bytes:
        """The first chunk (for chat it also carries the assistant role)."""
        return b"".join((self._first_prefix, _encode(text), self._text_suffix))

    def text(self, text: str) -> bytes:
        return b"".join((self._text_prefix, _encode(text), self._text_suffix))

    def finish(self, finish_reason: str) -> bytes:
        return b"".join((self._finish_prefix, _encode(finish_reason), self._finish_suffix))

    def usage(self, usage: Usage) -> bytes:
        return b"".join((self._usage_prefix, _encode(usage), b"}\n\n"))
