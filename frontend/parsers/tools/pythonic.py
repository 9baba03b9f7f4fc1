"""Pythonic tool calls (Llama 3.2/4, ToolACE and others): the output starts with a Python list
of calls, `[get_weather(city="Paris"), f(x=1)]`, keyword arguments only, values Python
literals; Llama 4 may wrap it in `<|python_start|>` ... `<|python_end|>`.

Each call is parsed with `ast` as soon as its closing parenthesis arrives and handed out whole,
its arguments converted to JSON. Output that does not start with a list of calls is content."""

from __future__ import annotations

import ast
import re
from typing import Any

from frontend.parsers.tools.base import ParsedDelta, StreamingToolParser, ToolSpec, dump_arguments

PY_START = "<|python_start|>"
PY_END = "<|python_end|>"
_NON_WS = re.compile(r"\S")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_OUTSIDE = re.compile(r"""[()\[\]{}'"]""")
_IN_QUOTE = {q: re.compile("[" + re.escape(q[0]) + r"\\]") for q in ("'", '"', "'''", '"""')}

# States
_START = 0  # whitespace (and maybe <|python_start|>) so far
_NAME_NEXT = 1  # inside the list, a call's name comes next
_ARGS = 2  # inside a call's parentheses
_AFTER = 3  # after a call: `,` or `]`
_END_TAG = 4  # after the list: whitespace, maybe <|python_end|>
_CONTENT = 5  # everything else is plain text


class PythonicParser(StreamingToolParser):
    __slots__ = ("_state", "_pos", "_tagged", "_call_at", "_depth", "_quote")

    def __init__(self, tools: list[ToolSpec] | None) -> None:
        super().__init__(tools)
        self._state = _START
        self._pos = 0  # where parsing stands in self._buf
        self._tagged = False  # the list came after <|python_start|>
        self._call_at = 0  # where the current call's name starts
        self._depth = 0
        self._quote = ""

    def feed(self, text: str) -> ParsedDelta:
        if self._state == _CONTENT and not self._strip_ws:
            return ParsedDelta(text)  # calls only come first: the rest is plain text
        return StreamingToolParser.feed(self, text)

    def _run(self, final: bool) -> None:
        while True:
            state, buf = self._state, self._buf
            if state == _CONTENT:
                if buf:
                    self._content(buf)
                    self._buf = ""
                return
            if state == _ARGS:
                end = self._scan(buf, final)
                if end == -1:
                    if final:
                        self._not_calls()
                    return
                if end == -2 or not self._emit(buf[self._call_at : end]):
                    self._not_calls()
                    continue
                self._buf = buf[end:]
                self._pos = 0
                self._state = _AFTER
                continue
            m = _NON_WS.search(buf, self._pos)
            if m is None:
                if final:
                    self._not_calls()
                return
            k = m.start()
            c = buf[k]
            if state == _START:
                if c == "[":
                    self._pos = k + 1
                    self._state = _NAME_NEXT
                elif not self._tagged and buf.startswith(PY_START, k):
                    self._pos = k + len(PY_START)
                    self._tagged = True
                elif not self._tagged and PY_START.startswith(buf[k:]) and not final:
                    return
                else:
                    self._not_calls()
            elif state == _NAME_NEXT:
                name = _NAME.match(buf, k)
                if name is None:
                    self._not_calls()
                    continue
                m = _NON_WS.search(buf, name.end())
                if m is None:
                    if final:
                        self._not_calls()
                    return
                if buf[m.start()] != "(":
                    self._not_calls()
                    continue
                self._call_at = k
                self._pos = m.start()
                self._depth = 0
                self._quote = ""
                self._state = _ARGS
            elif state == _AFTER:
                if c == ",":
                    self._pos = k + 1
                    self._state = _NAME_NEXT
                elif c == "]":
                    self._buf = buf[k + 1 :]
                    self._pos = 0
                    self._state = _END_TAG if self._tagged else _CONTENT
                    self._end_call()
                else:
                    self._not_calls()
            else:  # _END_TAG
                if buf.startswith(PY_END, k):
                    self._buf = buf[k + len(PY_END) :]
                    self._state = _CONTENT
                elif PY_END.startswith(buf[k:]) and not final:
                    return
                else:
                    self._state = _CONTENT

    def _not_calls(self) -> None:
        """What is held is not (or no longer) a list of calls: it and the rest are text."""
        self._state = _CONTENT
        if self._buf:
            self._content(self._buf)
            self._buf = ""

    def _scan(self, buf: str, final: bool) -> int:
        """Index just past the `)` that closes the call, -1 while it is open, -2 if a `]` or
        `}` closes it (not Python). Follows bracket nesting and Python string quoting, triple
        quotes included."""
        pos, depth, quote = self._pos, self._depth, self._quote
        n = len(buf)
        end = -1
        while True:
            if quote:
                m = _IN_QUOTE[quote].search(buf, pos)
                if m is None:
                    pos = n
                    break
                i = m.start()
                if buf[i] == "\\":
                    if i + 1 >= n:
                        pos = i
                        break
                    pos = i + 2
                elif len(quote) == 1 or buf.startswith(quote, i):
                    pos = i + len(quote)
                    quote = ""
                elif n - i < 3 and quote.startswith(buf[i:]) and not final:
                    pos = i  # may be the closing triple quote
                    break
                else:
                    pos = i + 1
                continue
            m = _OUTSIDE.search(buf, pos)
            if m is None:
                pos = n
                break
            i = m.start()
            c = buf[i]
            if c == "'" or c == '"':
                three = buf[i : i + 3]
                if three == c * 3:
                    quote = three
                    pos = i + 3
                elif len(three) < 3 and three == c * len(three) and not final:
                    pos = i  # one or two quotes: an empty string or a triple quote's start
                    break
                else:
                    quote = c
                    pos = i + 1
            elif c in "([{":
                depth += 1
                pos = i + 1
            else:
                depth -= 1
                pos = i + 1
                if depth <= 0:  # the call's own parenthesis
                    end = pos if c == ")" else -2
                    break
        self._pos, self._depth, self._quote = pos, depth, quote
        return end

    def _emit(self, call_text: str) -> bool:
        arguments = _call_arguments(call_text)
        if arguments is None:
            return False
        name, args_text = arguments
        self._start_call(name, args_text)
        return True


def _call_arguments(call_text: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of `name(k=literal, ...)`, or None if it is not one."""
    try:
        node = ast.parse(call_text.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            return None
        args: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg is None:  # **kwargs
                return None
            args[keyword.arg] = ast.literal_eval(keyword.value)
        return ast.unparse(node.func), dump_arguments(args)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None
