"""Llama 3.x JSON tool calls: an optional `<|python_tag|>`, then `{"name": ..., "parameters":
{...}}` objects (`"arguments"` is accepted too), separated by `;` or whitespace.

Calls are recognised where Llama's templates put them: at the very start of the output (after
whitespace), or after `<|python_tag|>` anywhere. A leading JSON object that is not a call (the
model answering in JSON) goes out as content."""

from __future__ import annotations

import re

from frontend.parsers.tools.base import ParsedDelta, StreamingToolParser, ToolSpec, loads_call
from frontend.parsers.tools.json_scan import JsonValueEnd

PYTHON_TAG = "<|python_tag|>"
_STARTS = (PYTHON_TAG,)
_NON_WS = re.compile(r"\S")

# States
_START = 0  # nothing but whitespace seen yet
_CONTENT = 1  # plain text; only <|python_tag|> starts calls
_EXPECT = 2  # after <|python_tag|> or `;`: whitespace, then a call object
_CALL = 3  # inside a call object (held until it closes)
_SEP = 4  # after a call: `;`, another object, or the end of the calls


class Llama3JsonParser(StreamingToolParser):
    """Each call is held until its object closes, then handed out whole with canonical
    arguments text. The text held since the last decision stays in the buffer (leading
    whitespace and tags included) so that a non-call can go out unchanged as content."""

    __slots__ = ("_state", "_pos", "_scanner")

    def __init__(self, tools: list[ToolSpec] | None) -> None:
        super().__init__(tools)
        self._state = _START
        self._pos = 0  # where the current state's parsing stands in self._buf
        self._scanner: JsonValueEnd | None = None

    def feed(self, text: str) -> ParsedDelta:
        if self._state == _CONTENT and "<" not in text and not self._buf and not self._strip_ws:
            return ParsedDelta(text)  # fast path: nothing here can start a call
        return StreamingToolParser.feed(self, text)

    def _run(self, final: bool) -> None:
        while True:
            state = self._state
            if state == _CONTENT:
                if not self._text_until_marker(_STARTS, final):
                    return
                self._pos = len(PYTHON_TAG)
                self._state = _EXPECT
                continue
            buf = self._buf
            m = _NON_WS.search(buf, self._pos)
            if m is None:  # only whitespace since the last decision
                if final:  # nothing is lost: a lone tag or `;` goes out as text
                    self._content(buf)
                    self._buf = ""
                return
            k = m.start()
            c = buf[k]
            if state == _CALL:
                if not self._call(buf, k, final):
                    return
            elif c == "{" and state != _CONTENT:
                self._state = _CALL
                self._pos = k + 1
                self._scanner = JsonValueEnd(k)
            elif state == _START and buf.startswith(PYTHON_TAG, k):
                self._pos = k + len(PYTHON_TAG)
                self._state = _EXPECT
            elif state == _START and PYTHON_TAG.startswith(buf[k:]) and not final:
                return
            elif state == _SEP and c == ";":
                self._pos = k + 1
                self._state = _EXPECT
            else:
                self._to_content(k)

    def _to_content(self, k: int) -> None:
        """Not a call after all: what was held goes out as text and the rest is plain text."""
        if k:
            self._content(self._buf[:k])
            self._buf = self._buf[k:]
        self._state = _CONTENT

    def _call(self, buf: str, k: int, final: bool) -> bool:
        """Advances inside a call object (k: its first non-space after `{`); False when it
        needs more text."""
        assert self._scanner is not None
        start = self._pos - 1
        # A call object's first key is a string: `{` followed by anything else is not a call,
        # so a reply that merely starts with `{` is not held back to the end.
        if buf[k] != '"':
            self._to_content(start)
            return True
        end = self._scanner.scan(buf)
        if end == -1:
            if final:  # an unfinished object is text
                self._content(buf)
                self._buf = ""
            return False
        call = loads_call(buf[start:end])
        if call is None:
            self._content(buf[:end])
            self._buf = buf[end:]
            self._state = _CONTENT
            return True
        self._start_call(*call)
        self._end_call()
        self._buf = buf[end:]
        self._pos = 0
        self._state = _SEP
        return True
