"""Hermes / Qwen2.5 / Qwen3 tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
any number in a row, with plain text before, between and after them."""

from __future__ import annotations

import re

from frontend.parsers.tools.base import ParsedDelta, StreamingToolParser, ToolSpec, loads_call
from frontend.parsers.tools.json_scan import JsonValueEnd

START = "<tool_call>"
END = "</tool_call>"
_STARTS = (START,)
_NON_WS = re.compile(r"\S")


class HermesParser(StreamingToolParser):
    """A call is held from `<tool_call>` to `</tool_call>`, then handed out whole (id, name and
    the canonical arguments text in one fragment). The JSON object is followed bracket by
    bracket, so a `</tool_call>` inside a string argument does not end the call. Invalid JSON,
    or JSON that is not a call object, goes out as content, tags included. An unclosed
    `<tool_call>` at the end of generation is a call if what follows it is one (generation can
    stop on the closing tag)."""

    __slots__ = ("_in_call", "_scan_from", "_scanner", "_obj_at", "_obj_end")

    def __init__(self, tools: list[ToolSpec] | None) -> None:
        super().__init__(tools)
        self._in_call = False
        self._scan_from = 0  # raw mode: where to look for </tool_call> next
        self._scanner: JsonValueEnd | None = None  # following the call's JSON object
        self._obj_at = -1  # where that object starts; -1: not known yet, -2: raw mode
        self._obj_end = -1  # just past its closing brace, once seen

    def feed(self, text: str) -> ParsedDelta:
        if "<" not in text and not self._buf and not self._in_call and not self._strip_ws:
            return ParsedDelta(text)  # fast path: nothing here can start a call
        return StreamingToolParser.feed(self, text)

    def _run(self, final: bool) -> None:
        while True:
            if not self._in_call:
                if not self._text_until_marker(_STARTS, final):
                    return
                self._buf = self._buf[len(START) :]
                self._in_call = True
                self._obj_at = self._obj_end = -1
                self._scan_from = 0
                continue
            buf = self._buf
            if self._obj_at == -1:  # the object's opening brace, after whitespace
                m = _NON_WS.search(buf)
                if m is None and not final:
                    return
                if m is not None and buf[m.start()] == "{":
                    self._obj_at = m.start()
                    self._scanner = JsonValueEnd(self._obj_at)
                else:
                    self._obj_at = -2
            if self._obj_at >= 0:
                assert self._scanner is not None
                if self._obj_end == -1:
                    self._obj_end = self._scanner.scan(buf)
                end = self._obj_end
                if end != -1:
                    m = _NON_WS.search(buf, end)
                    k = len(buf) if m is None else m.start()
                    if buf.startswith(END, k):
                        self._close(buf[self._obj_at : end], k + len(END))
                        continue
                    if END.startswith(buf[k:]):  # nothing, or part of </tool_call>, so far
                        if not final:
                            return
                        self._close(buf[self._obj_at : end], len(buf))  # generation ended here
                        continue
                    self._scan_from = end  # text after the object: back to raw mode
                elif not final:
                    return
                self._obj_at = -2
            j = buf.find(END, self._scan_from)
            if j == -1 and not final:
                self._scan_from = max(self._scan_from, len(buf) - len(END) + 1)
                return
            self._close(buf[: len(buf) if j == -1 else j], len(buf) if j == -1 else j + len(END))

    def _close(self, body: str, rest_at: int) -> None:
        """Ends the call held in self._buf[:rest_at], `body` being its JSON text."""
        self._in_call = False
        call = loads_call(body.strip())
        if call is None:
            self._content(START + self._buf[:rest_at])
        else:
            self._start_call(*call)
            self._end_call()
        self._buf = self._buf[rest_at:]
