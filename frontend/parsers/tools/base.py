"""The tool-call parsers' shared types and plumbing: what a parser hands out (OpenAI
`delta.tool_calls` fragments plus content), and the buffer/marker/bookkeeping every family uses."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function from the request's `tools`: its name and its parameters JSON schema."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ToolCallDelta:
    """One streamed fragment, OpenAI's `delta.tool_calls[i]` shape."""

    index: int  # position of the call in this choice (0, 1, ...)
    id: str | None = None  # set on the call's first fragment only
    name: str | None = None  # set on the first fragment only
    arguments: str = ""  # a piece of the arguments JSON text; the pieces concatenate to it


@dataclass(slots=True)
class ParsedDelta:
    content: str = ""  # plain text to emit as content now
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class ToolCallParser(Protocol):
    def feed(self, text: str) -> ParsedDelta:
        """Streamed text delta in; what is safe to emit now out."""
        ...

    def finish(self) -> ParsedDelta:
        """End of generation: flush what was held back."""
        ...

    @property
    def has_tool_calls(self) -> bool:
        """Any call found (finish_reason becomes "tool_calls")."""
        ...


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# json.loads accepts NaN and Infinity, which json.dumps would write back as invalid JSON.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def strict_loads(text: str) -> Any:
    """json.loads without NaN/Infinity; raises ValueError (or RecursionError) on bad input."""
    return _DECODER.decode(text)


def dump_arguments(arguments: dict[str, Any]) -> str:
    """The canonical arguments text every family hands out for a parsed object. Raises
    ValueError (or TypeError) for values JSON cannot represent."""
    return json.dumps(arguments, ensure_ascii=False, allow_nan=False)


def partial_marker_start(buf: str, marker: str, start: int = 0) -> int:
    """Index where the longest suffix of buf[start:] that is a proper prefix of marker begins,
    or -1. Such a suffix may become the marker with the next delta, so it is held back."""
    first = marker[0]
    i = buf.find(first, max(start, len(buf) - len(marker) + 1))
    while i != -1:
        if marker.startswith(buf[i:]):
            return i
        i = buf.find(first, i + 1)
    return -1


def find_markers(buf: str, markers: tuple[str, ...], start: int = 0) -> tuple[int, str]:
    """The earliest full occurrence of any marker in buf[start:] as (index, marker); else
    (-1, "") when none occurs."""
    best, found = -1, ""
    for marker in markers:
        i = buf.find(marker, start)
        if i != -1 and (best == -1 or i < best):
            best, found = i, marker
    return best, found


def hold_point(buf: str, markers: tuple[str, ...], start: int = 0) -> int:
    """Where the text that could still grow into one of the markers begins (len(buf) if none)."""
    hold = len(buf)
    for marker in markers:
        i = partial_marker_start(buf, marker, start)
        if i != -1 and i < hold:
            hold = i
    return hold


class StreamingToolParser:
    """Plumbing shared by the families. A family implements `_run(final)`, which consumes
    `self._buf` as far as it can decide, calling `_content`, `_start_call`, `_arguments`.

    Every decision depends only on the text, never on where the deltas were split, so feeding
    a text in any pieces gives the same calls and content as feeding it at once."""

    __slots__ = ("_buf", "_out_content", "_out_calls", "_n_calls", "_tool_names", "_strip_ws", "unknown_tool_names")

    def __init__(self, tools: list[ToolSpec] | None) -> None:
        self._buf = ""
        self._out_content: list[str] = []
        self._out_calls: list[ToolCallDelta] = []
        self._n_calls = 0
        self._tool_names = frozenset(t.name for t in tools) if tools else None
        # After a call, whitespace up to the next text or call is dropped (the "\n" between
        # `</tool_call>` and `<tool_call>` is layout, not content).
        self._strip_ws = False
        # Names the model called that are not among the request's tools. They are still handed
        # out (the client decides what to do with them); the pipeline may log or count them.
        self.unknown_tool_names: list[str] = []

    @property
    def has_tool_calls(self) -> bool:
        return self._n_calls > 0

    def feed(self, text: str) -> ParsedDelta:
        if not text:
            return ParsedDelta()
        self._buf += text
        self._run(False)
        return self._drain()

    def finish(self) -> ParsedDelta:
        self._run(True)
        return self._drain()

    def _run(self, final: bool) -> None:
        raise NotImplementedError

    def _drain(self) -> ParsedDelta:
        out = ParsedDelta()
        if self._out_content:
            out.content = "".join(self._out_content)
            self._out_content.clear()
        if self._out_calls:
            out.tool_calls = self._out_calls
            self._out_calls = []
        return out

    def _text_until_marker(self, markers: tuple[str, ...], final: bool) -> str:
        """Plain text: hands out the buffer up to the earliest of `markers`, which then starts
        the buffer, and returns that marker. "" when none is there: the buffer then keeps only
        what may still grow into one (nothing when `final`)."""
        buf = self._buf
        i, marker = find_markers(buf, markers)
        if i == -1:
            hold = len(buf) if final else hold_point(buf, markers)
            if hold:
                self._content(buf[:hold])
            self._buf = buf[hold:]
            return ""
        if i:
            self._content(buf[:i])
            self._buf = buf[i:]
        return marker

    def _content(self, text: str) -> None:
        if self._strip_ws:
            text = text.lstrip()
            if not text:
                return
            self._strip_ws = False
        self._out_content.append(text)

    def _start_call(self, name: str, arguments: str = "") -> int:
        """Hands out a call's first fragment (id and name); returns its index."""
        index = self._n_calls
        self._n_calls += 1
        if self._tool_names is not None and name not in self._tool_names:
            self.unknown_tool_names.append(name)
            logger.warning("model called %r, which is not among the request's tools", name)
        self._out_calls.append(ToolCallDelta(index, new_call_id(), name, arguments))
        return index

    def _arguments(self, index: int, text: str) -> None:
        """Appends a piece of a started call's arguments text (merged into the pending
        fragment of the same call, so one feed yields at most one fragment per call)."""
        if not text:
            return
        calls = self._out_calls
        if calls and calls[-1].index == index:
            calls[-1].arguments += text
        else:
            calls.append(ToolCallDelta(index, arguments=text))

    def _end_call(self) -> None:
        self._strip_ws = True


def call_from_object(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> tuple[str, str] | None:
    """(name, canonical arguments text) from a decoded `{"name": ..., "arguments": {...}}`
    object, or None if it is not one. Arguments given as a JSON string holding an object (some
    fine-tunes double-encode them) are accepted too."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    try:
        if isinstance(args, str):
            args = strict_loads(args)
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return None
        return name, dump_arguments(args)
    except (ValueError, TypeError, RecursionError):
        return None


def loads_call(text: str, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> tuple[str, str] | None:
    """(name, canonical arguments text) from the JSON text of one call object, or None."""
    try:
        obj = strict_loads(text)
    except (ValueError, RecursionError):
        return None
    return call_from_object(obj, args_keys)
