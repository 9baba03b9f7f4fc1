"""Reasoning parsing (`--dyn-reasoning-parser`): splits `<think>...</think>` out of the generated
text into `reasoning_content`, streaming, so the content carries only the answer.

- `deepseek_r1`: the chat template opens `<think>` in the prompt, so generation starts inside
  the reasoning; a leading `<think>` in the output (older templates) is dropped. Everything up
  to `</think>` is reasoning; without `</think>`, all of it is.
- `qwen3`: reasoning only if the output starts with `<think>` (after whitespace); otherwise all
  of it is content (e.g. `enable_thinking=False`, where the template closes the block itself).

Only one block: after `</think>`, the tags are plain text. Whitespace right after `<think>` and
after `</think>` is layout and dropped."""

from __future__ import annotations

from typing import Protocol

from frontend.parsers.tools.base import partial_marker_start

THINK_START = "<think>"
THINK_END = "</think>"

# States
_OPENING = 0  # before the first non-space: a <think> may come
_REASONING = 1
_CONTENT = 2


class ReasoningParser(Protocol):
    def feed(self, text: str) -> tuple[str, str]:
        """Streamed text delta in; (reasoning delta, content delta) safe to emit now out."""
        ...

    def finish(self) -> tuple[str, str]:
        """End of generation: flush what was held back."""
        ...


class ThinkParser:
    """One parser per choice. Text that could be the start of a tag is held back until the
    next delta decides it, so the deltas concatenate to the same split for any chunking."""

    __slots__ = ("_state", "_buf", "_strip", "_implicit")

    def __init__(self, starts_in_reasoning: bool, thinking: bool = True) -> None:
        # starts_in_reasoning: the prompt opened the block (deepseek_r1).
        self._implicit = starts_in_reasoning
        self._state = _OPENING if thinking else _CONTENT
        self._buf = ""
        self._strip = False

    def feed(self, text: str) -> tuple[str, str]:
        state = self._state
        if state == _CONTENT and not self._strip:
            return "", text
        if state == _REASONING and "<" not in text and not self._buf and not self._strip:
            return text, ""
        self._buf += text
        return self._run(False)

    def finish(self) -> tuple[str, str]:
        return self._run(True)

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        while True:
            buf, state = self._buf, self._state
            if state == _OPENING:
                head = buf.lstrip()
                if head.startswith(THINK_START):
                    self._buf = head[len(THINK_START) :]
                    self._enter(_REASONING)
                elif (not head or THINK_START.startswith(head)) and not final:
                    return reasoning, content
                elif self._implicit:
                    self._buf = head
                    self._enter(_REASONING)
                else:
                    self._state = _CONTENT
                continue
            if state == _CONTENT:
                content += self._take(buf)
                self._buf = ""
                return reasoning, content
            i = buf.find(THINK_END)
            if i == -1:
                hold = len(buf) if final else partial_marker_start(buf, THINK_END)
                if hold == -1:
                    hold = len(buf)
                reasoning += self._take(buf[:hold])
                self._buf = buf[hold:]
                return reasoning, content
            reasoning += self._take(buf[:i])
            self._buf = buf[i + len(THINK_END) :]
            self._enter(_CONTENT)

    def _enter(self, state: int) -> None:
        self._state = state
        self._strip = True

    def _take(self, text: str) -> str:
        """Text of the current part, without the whitespace that opens it."""
        if self._strip:
            text = text.lstrip()
            if text:
                self._strip = False
        return text


_PARSERS = {"deepseek_r1": True, "qwen3": False}  # name -> the prompt opens the block

REASONING_PARSERS: tuple[str, ...] = tuple(_PARSERS)


def reasoning_parser(name: str, *, thinking: bool = True) -> ReasoningParser:
    """A fresh parser for one choice. `thinking=False` (the request turned thinking off in its
    chat template arguments) makes it pass everything through as content."""
    try:
        starts_in_reasoning = _PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of: {', '.join(REASONING_PARSERS)}") from None
    return ThinkParser(starts_in_reasoning, thinking)
