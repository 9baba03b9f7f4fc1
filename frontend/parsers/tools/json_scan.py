"""Finds where a JSON object or array ends while its text is still arriving, so a parser can
hold a call until it is complete without re-reading the whole buffer on every delta."""

from __future__ import annotations

import re

_OUTSIDE = re.compile(r'[\[\]{}"]')
_IN_STRING = re.compile(r'["\\]')


class JsonValueEnd:
    """Tracks nesting depth and string state of a JSON value that starts at buf[start] with
    `{` or `[`. Only brackets and string quoting are followed; whether the text is valid JSON is
    json.loads's business once the value is complete."""

    __slots__ = ("_pos", "_depth", "_in_string")

    def __init__(self, start: int = 0) -> None:
        self._pos = start
        self._depth = 0
        self._in_string = False

    def scan(self, buf: str) -> int:
        """Index just past the value's closing bracket, or -1 while it is still open. `buf`
        must be the previous buffer with text appended."""
        pos, depth, in_string = self._pos, self._depth, self._in_string
        n = len(buf)
        end = -1
        while True:
            if in_string:
                m = _IN_STRING.search(buf, pos)
                if m is None:
                    pos = n
                    break
                i = m.start()
                if buf[i] == "\\":
                    if i + 1 >= n:  # the escaped character has not arrived yet
                        pos = i
                        break
                    pos = i + 2
                    continue
                in_string = False
                pos = i + 1
            else:
                m = _OUTSIDE.search(buf, pos)
                if m is None:
                    pos = n
                    break
                i = m.start()
                c = buf[i]
                pos = i + 1
                if c == '"':
                    in_string = True
                elif c == "{" or c == "[":
                    depth += 1
                else:
                    depth -= 1
                    if depth <= 0:
                        end = pos
                        break
        self._pos, self._depth, self._in_string = pos, depth, in_string
        return end
