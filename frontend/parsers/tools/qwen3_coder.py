"""Qwen3-Coder XML tool calls:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

One leading and one trailing newline of a value are layout. Values are converted with the
tool's JSON-schema type when the request's tools give one, else kept as JSON if they parse as
JSON and as strings otherwise. A bare `<function=...>` without `<tool_call>` is accepted too."""

from __future__ import annotations

import json
import re
from json.encoder import encode_basestring
from typing import Any

from frontend.parsers.tools.base import (
    ParsedDelta,
    StreamingToolParser,
    ToolCallDelta,
    ToolSpec,
    find_markers,
    hold_point,
)
from frontend.parsers.tools.schema_values import convert_value, schema_types

START = "<tool_call>"
END = "</tool_call>"
FUNC = "<function="
FUNC_END = "</function>"
PARAM = "<parameter="
PARAM_END = "</parameter>"
_STARTS = (START, FUNC)
_VALUE_ENDS = (PARAM_END, PARAM, FUNC_END)  # a value without </parameter> ends at the next tag
_MAX_NAME = 256
_NON_WS = re.compile(r"\S")

# States
_CONTENT = 0
_WRAP = 1  # after <tool_call>: <function= comes next
_FUNC_NAME = 2  # after <function=
_IN_FUNC = 3  # between parameters
_PARAM_NAME = 4  # after <parameter=
_VALUE = 5  # inside a parameter value
_AFTER_FUNC = 6  # after </function>: </tool_call>, or another <function= in the same wrapper


class Qwen3CoderParser(StreamingToolParser):
    """Arguments stream per parameter: the call's id and name with `{` as soon as
    `<function=name>` is complete, each `"param": value` once its value ends, `}` at
    `</function>`. A parameter whose schema type is "string" streams as its text arrives. The
    pieces always concatenate to `json.dumps(arguments, ensure_ascii=False)`."""

    __slots__ = (
        "_state",
        "_pos",
        "_wrapped",
        "_name_at",
        "_schemas",
        "_props",
        "_index",
        "_n_params",
        "_seen",
        "_param",
        "_param_schema",
        "_streaming",
        "_value_started",
        "_scan_from",
    )

    def __init__(self, tools: list[ToolSpec] | None) -> None:
        super().__init__(tools)
        self._schemas: dict[str, dict[str, Any]] = {}
        for tool in tools or ():
            props = tool.parameters.get("properties") if isinstance(tool.parameters, dict) else None
            self._schemas[tool.name] = props if isinstance(props, dict) else {}
        self._state = _CONTENT
        self._pos = 0
        self._wrapped = False
        self._name_at = 0
        self._props: dict[str, Any] = {}
        self._index = -1
        self._n_params = 0
        self._seen: set[str] = set()
        self._param = ""
        self._param_schema: Any = None
        self._streaming = False
        self._value_started = False
        self._scan_from = 0

    def feed(self, text: str) -> ParsedDelta:
        state = self._state
        if state == _CONTENT and "<" not in text and not self._buf and not self._strip_ws:
            return ParsedDelta(text)  # fast path: nothing here can start a call
        if state == _VALUE and self._streaming and self._value_started and "<" not in text and "<" not in self._buf:
            # Fast path inside a streamed string value (a file's content, say): no tag can end
            # here, so all of it goes out but a last newline, which may be the layout one.
            # benchmarks/parser_cost.py: 1.7 µs/token with it, 4.5 without (the general path
            # below, which the tests compare it against by feeding whole texts).
            held = self._buf + text
            safe = len(held) - 1 if held[-1] == "\n" else len(held)
            self._buf = held[safe:]
            if not safe:
                return ParsedDelta()
            return ParsedDelta("", [ToolCallDelta(self._index, arguments=_escape(held[:safe]))])
        return StreamingToolParser.feed(self, text)

    def _run(self, final: bool) -> None:
        steps = _STEPS
        while steps[self._state](self, final):
            pass

    # Each step consumes what it can decide and returns True to go on, False when it needs
    # more text (or, at the end, has nothing left).

    def _step_content(self, final: bool) -> bool:
        marker = self._text_until_marker(_STARTS, final)
        if not marker:
            return False
        self._wrapped = marker == START
        self._pos = len(marker)
        self._state = _WRAP if self._wrapped else _FUNC_NAME
        self._name_at = self._pos
        return True

    def _step_wrap(self, final: bool) -> bool:
        buf = self._buf
        m = _NON_WS.search(buf, self._pos)
        if m is None:
            if final:
                self._not_a_call(len(buf))
            return final
        k = m.start()
        if buf.startswith(FUNC, k):
            self._pos = self._name_at = k + len(FUNC)
            self._state = _FUNC_NAME
        elif FUNC.startswith(buf[k:]) and not final:
            return False
        else:
            self._not_a_call(len(START))
        return True

    def _step_func_name(self, final: bool) -> bool:
        buf = self._buf
        name = self._tag_name(buf, final)
        if name is None:
            return False
        if not name:
            self._not_a_call(self._name_at)
            return True
        self._buf = buf[buf.index(">", self._name_at) + 1 :]
        self._index = self._start_call(name, "{")
        self._props = self._schemas.get(name, {})
        self._n_params = 0
        self._seen = set()
        self._pos = 0
        self._state = _IN_FUNC
        return True

    def _tag_name(self, buf: str, final: bool) -> str | None:
        """The name in `<function=name>` / `<parameter=name>` starting at self._name_at: None
        while incomplete, "" if it is not a name."""
        j = buf.find(">", self._name_at)
        raw = buf[self._name_at : j if j != -1 else len(buf)]
        if "\n" in raw or "<" in raw or len(raw) > _MAX_NAME:
            return ""
        if j == -1:
            return "" if final else None
        return raw.strip()

    def _step_in_func(self, final: bool) -> bool:
        buf = self._buf
        m = _NON_WS.search(buf, self._pos)
        if m is None:
            if final:
                self._close_function()
            return final
        k = m.start()
        if buf.startswith(PARAM, k):
            self._buf = buf[k:]
            self._pos = self._name_at = len(PARAM)
            self._state = _PARAM_NAME
        elif buf.startswith(FUNC_END, k):
            self._buf = buf[k + len(FUNC_END) :]
            self._close_function()
        elif buf.startswith(END, k):  # </function> missing
            self._buf = buf[k:]
            self._close_function()
        elif not final and any(tag.startswith(buf[k:]) for tag in (PARAM, FUNC_END, END)):
            return False
        else:  # stray text between parameters is layout noise: skip to the next tag
            j = buf.find("<", k + 1)
            self._buf = "" if j == -1 else buf[j:]
            self._pos = 0
            return j != -1 or final
        return True

    def _step_param_name(self, final: bool) -> bool:
        buf = self._buf
        name = self._tag_name(buf, final)
        if name is None:
            return False
        if not name:  # not a parameter tag: drop the tag and go on between parameters
            self._buf = buf[self._name_at :]
            self._pos = 0
            self._state = _IN_FUNC
            return True
        self._buf = buf[buf.index(">", self._name_at) + 1 :]
        self._param = name
        self._param_schema = self._props.get(name)
        duplicate = name in self._seen
        self._streaming = not duplicate and schema_types(self._param_schema) == {"string"}
        self._value_started = False
        self._scan_from = 0
        self._state = _VALUE
        return True

    def _step_value(self, final: bool) -> bool:
        buf = self._buf
        t, marker = find_markers(buf, _VALUE_ENDS, self._scan_from)
        if self._streaming:
            return self._stream_string(buf, t, marker, final)
        if t == -1:
            if not final:
                self._scan_from = max(0, len(buf) - len(PARAM_END) + 1)
                return False
            t = len(buf)
        value = buf[:t]
        if value.startswith("\n"):
            value = value[1:]
        if value.endswith("\n"):
            value = value[:-1]
        if self._param not in self._seen:
            self._key(_dump_value(value, self._param_schema))
        self._end_value(buf, t, marker)
        return True

    def _stream_string(self, buf: str, t: int, marker: str, final: bool) -> bool:
        if not self._value_started:
            if not buf and not final:
                return False
            self._key('"')
            self._value_started = True
            if buf.startswith("\n"):  # the leading newline is layout
                buf = self._buf = buf[1:]
                t -= 1 if t > 0 else 0
        if t == -1 and not final:
            safe = hold_point(buf, _VALUE_ENDS)
            if safe and buf[safe - 1] == "\n":  # may be the trailing newline
                safe -= 1
            self._arguments(self._index, _escape(buf[:safe]))
            self._buf = buf[safe:]
            return False
        if t == -1:
            t = len(buf)
        piece = buf[:t]
        if piece.endswith("\n"):
            piece = piece[:-1]
        self._arguments(self._index, _escape(piece) + '"')
        self._end_value(buf, t, marker)
        return True

    def _key(self, value_text: str) -> None:
        sep = ", " if self._n_params else ""
        self._n_params += 1
        self._seen.add(self._param)
        self._arguments(self._index, sep + json.dumps(self._param, ensure_ascii=False) + ": " + value_text)

    def _end_value(self, buf: str, t: int, marker: str) -> None:
        # </parameter> is consumed; a value cut short by the next tag leaves that tag.
        self._buf = buf[t + len(PARAM_END) :] if marker == PARAM_END else buf[t:]
        self._pos = 0
        self._state = _IN_FUNC

    def _close_function(self) -> None:
        self._arguments(self._index, "}")
        self._pos = 0
        self._state = _AFTER_FUNC

    def _step_after_func(self, final: bool) -> bool:
        buf = self._buf
        if self._wrapped:
            m = _NON_WS.search(buf)
            if m is None and not final:
                return False
            if m is not None:
                k = m.start()
                if buf.startswith(END, k):
                    self._buf = buf[k + len(END) :]
                elif buf.startswith(FUNC, k):  # another function in the same <tool_call>
                    self._buf = buf[k:]
                    self._pos = self._name_at = len(FUNC)
                    self._state = _FUNC_NAME
                    return True
                elif not final and (END.startswith(buf[k:]) or FUNC.startswith(buf[k:])):
                    return False
        self._end_call()
        self._state = _CONTENT
        return True

    def _not_a_call(self, upto: int) -> None:
        """The held text up to `upto` is plain text after all; parsing resumes after it."""
        self._content(self._buf[:upto])
        self._buf = self._buf[upto:]
        self._state = _CONTENT


_STEPS = (
    Qwen3CoderParser._step_content,
    Qwen3CoderParser._step_wrap,
    Qwen3CoderParser._step_func_name,
    Qwen3CoderParser._step_in_func,
    Qwen3CoderParser._step_param_name,
    Qwen3CoderParser._step_value,
    Qwen3CoderParser._step_after_func,
)


def _escape(text: str) -> str:
    """`text` as it appears inside a JSON string (what json.dumps(..., ensure_ascii=False)
    writes between the quotes; it calls this same encoder). JSON escapes each character on its
    own, so the pieces of a string escape to the whole's escaping."""
    return encode_basestring(text)[1:-1] if text else ""


def _dump_value(text: str, schema: Any) -> str:
    value = convert_value(text, schema)
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError):  # a literal JSON cannot hold (a set, inf): keep the text
        return json.dumps(text, ensure_ascii=False)
