"""Mistral tool calls, both spellings after the `[TOOL_CALLS]` marker:

- tokenizers before v11 (Mistral 7B v0.3, Nemo): `[TOOL_CALLS] [{"name": ..., "arguments":
  {...}}, ...]`, one marker and a JSON list;
- v11 and later (Mistral Small 3.x, Magistral, Devstral): `[TOOL_CALLS]name[ARGS]{...}` per call,
  `[ARGS]` optional (`[TOOL_CALLS]name{...}`), an optional `[CALL_ID]id` before `[ARGS]`.

The markers are special tokens: the detokenizer must keep them (skip_special_tokens off)."""

from __future__ import annotations

import re

from frontend.parsers.tools.base import (
    ParsedDelta,
    StreamingToolParser,
    ToolSpec,
    call_from_object,
    strict_loads,
)
from frontend.parsers.tools.json_scan import JsonValueEnd

BOT = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_STARTS = (BOT,)
_NON_WS = re.compile(r"\S")
_NAME = re.compile(r"[A-Za-z0-9_.\-]*")
_ALNUM = re.compile(r"[A-Za-z0-9_\-]*")


class MistralParser(StreamingToolParser):
    """A call (v11+), or the whole list (before v11), is held until its JSON closes and then
    handed out with canonical arguments text. The held text starts at `[TOOL_CALLS]`, so a
    malformed call goes out unchanged as content."""

    __slots__ = ("_in_call", "_name", "_scanner", "_args_at")

    def __init__(self, tools: list[ToolSpec] | None) -> None:
        super().__init__(tools)
        self._in_call = False
        self._name = ""
        self._scanner: JsonValueEnd | None = None
        self._args_at = -1  # where the arguments object (or the list) starts in self._buf

    def feed(self, text: str) -> ParsedDelta:
        if "[" not in text and not self._buf and not self._in_call and not self._strip_ws:
            return ParsedDelta(text)  # fast path: nothing here can start a call
        return StreamingToolParser.feed(self, text)

    def _run(self, final: bool) -> None:
        while True:
            if not self._in_call:
                if not self._text_until_marker(_STARTS, final):
                    return
                self._in_call = True
                self._scanner = None
            buf = self._buf
            if self._scanner is None:
                header = self._header(buf)
                if header is None and not final:  # needs more text
                    return
                if header is None or header == -1:  # not a call: the marker is text
                    self._not_a_call(len(BOT))
                    continue
                self._args_at = header
                self._scanner = JsonValueEnd(header)
            end = self._scanner.scan(buf)
            if end == -1:
                if final:
                    self._not_a_call(len(buf))
                return
            if not self._emit(buf[self._args_at : end]):
                self._not_a_call(end)
                continue
            self._buf = buf[end:]
            self._in_call = False
            self._end_call()

    def _header(self, buf: str) -> int | None:
        """Index of the `[` or `{` that opens the list or the arguments; None while the text
        after the marker is still incomplete; -1 when it is not a call header."""
        m = _NON_WS.search(buf, len(BOT))
        if m is None:
            return None
        k = m.start()
        if buf[k] == "[" and not buf.startswith(ARGS, k) and not buf.startswith(CALL_ID, k):
            if ARGS.startswith(buf[k:]) or CALL_ID.startswith(buf[k:]):
                return None
            self._name = ""
            return k
        pos = _run_end(_NAME, buf, k)
        if pos == len(buf):
            return None
        if pos == k:
            return -1
        self._name = buf[k:pos]
        if buf.startswith(CALL_ID, pos):
            pos = _run_end(_ALNUM, buf, pos + len(CALL_ID))
            if pos == len(buf):
                return None
        elif CALL_ID.startswith(buf[pos:]):
            return None
        if buf.startswith(ARGS, pos):
            pos += len(ARGS)
        elif ARGS.startswith(buf[pos:]):
            return None
        m = _NON_WS.search(buf, pos)
        if m is None:
            return None
        return m.start() if buf[m.start()] == "{" else -1

    def _emit(self, value: str) -> bool:
        """Hands out the calls in a complete value; False if it is not valid calls JSON."""
        try:
            obj = strict_loads(value)
        except (ValueError, RecursionError):
            return False
        if not self._name:  # the list form
            if not isinstance(obj, list):
                return False
            calls = [call_from_object(item, ("arguments",)) for item in obj]
            if any(c is None for c in calls):
                return False
            for call in calls:
                assert call is not None
                self._start_call(*call)
            return True
        call = call_from_object({"name": self._name, "arguments": obj}, ("arguments",))
        if call is None:
            return False
        self._start_call(*call)
        return True

    def _not_a_call(self, upto: int) -> None:
        self._content(self._buf[:upto])
        self._buf = self._buf[upto:]
        self._in_call = False
        self._scanner = None


def _run_end(chars: re.Pattern[str], buf: str, pos: int) -> int:
    """End of the run of `chars` (a `[...]*` pattern) starting at pos."""
    m = chars.match(buf, pos)
    return m.end() if m else pos
