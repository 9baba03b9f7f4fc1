"""What one generation request produces, as typed values between the pipeline and the API
encoders (OpenAI chat and completions, Anthropic Messages, Responses): per-choice deltas while
streaming, and the same deltas folded into one result per choice otherwise.

Non-streaming answers are built by folding the very deltas a stream would carry
(`ChoiceAccumulator`), so a streamed answer concatenates to exactly the non-streamed one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from frontend.parsers import ToolCallDelta
from frontend.schemas import FunctionCall, TokenLogprob, ToolCall, Usage

# ---------------------------------------------------------------------------------- tool calls


__all__ = ["ChoiceAccumulator", "ChoiceDelta", "ChoiceResult", "FunctionCall", "Generation", "TokenLogprob", "ToolCall", "ToolCallDelta"]


# ------------------------------------------------------------------------------------- choices


class ChoiceDelta(msgspec.Struct):
    """What one choice adds in one burst. `finish_reason` is set on its last delta, with
    `stop_sequence` when a stop string ended it (Anthropic reports which one).

    A Struct, not a dataclass: one is built per token. It is built in C (half a dataclass's
    time) and, holding only strings, ints and None on the plain path, is not tracked by the
    cyclic GC, so tokens add no collections (frontend overhead, benchmarks/RESULTS.md)."""

    index: int
    content: str = ""
    reasoning: str = ""
    tool_calls: Sequence[ToolCallDelta] = ()  # a tuple by default: no list per token
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_sequence: str | None = None
    # Completions with echo and logprobs, first delta only: per prompt token (the first has none).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(slots=True)
class ChoiceResult:
    index: int
    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    logprobs: list[TokenLogprob] | None
    finish_reason: str
    stop_sequence: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


class ChoiceAccumulator:
    """Folds one choice's deltas into its result."""

    __slots__ = ("index", "_content", "_reasoning", "_calls", "_logprobs", "_finish", "_stop", "_prompt_logprobs")

    def __init__(self, index: int) -> None:
        self.index = index
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: list[list[str]] = []  # per call: [id, name, argument pieces...]
        self._logprobs: list[TokenLogprob] | None = None
        self._finish: str | None = None
        self._stop: str | None = None
        self._prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, delta: ChoiceDelta) -> None:
        if delta.content:
            self._content.append(delta.content)
        if delta.reasoning:
            self._reasoning.append(delta.reasoning)
        for call in delta.tool_calls:
            while len(self._calls) <= call.index:
                self._calls.append(["", ""])
            parts = self._calls[call.index]
            if call.id is not None:
                parts[0] = call.id
            if call.name is not None:
                parts[1] = call.name
            if call.arguments:
                parts.append(call.arguments)
        if delta.logprobs is not None:
            if self._logprobs is None:
                self._logprobs = []
            self._logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self._prompt_logprobs = delta.prompt_logprobs
        if delta.finish_reason is not None:
            self._finish = delta.finish_reason
            self._stop = delta.stop_sequence

    def result(self) -> ChoiceResult:
        assert self._finish is not None, "result() before the choice finished"
        calls = [ToolCall(p[0], FunctionCall(p[1], "".join(p[2:]))) for p in self._calls]
        return ChoiceResult(
            index=self.index,
            content="".join(self._content),
            reasoning="".join(self._reasoning),
            tool_calls=calls,
            logprobs=self._logprobs,
            finish_reason=self._finish,
            stop_sequence=self._stop,
            prompt_logprobs=self._prompt_logprobs,
        )


# ---------------------------------------------------------------------------------- generation


class Generation(Protocol):
    """An opened request (every error before its first token already raised): its choices'
    deltas in bursts (everything that had arrived when the consumer asked), then `usage`.

    Closing the `bursts()` iterator early cancels the work on the workers. Errors after the
    first token are raised from `bursts()` as dynamo.errors.DynamoError."""

    response_id: str
    created: int
    model: str
    num_choices: int

    def bursts(self) -> AsyncIterator[list[ChoiceDelta]]: ...

    def usage(self) -> Usage: ...

    async def results(self) -> list[ChoiceResult]:
        """Run to the end and fold every choice (non-streaming answers)."""
        ...

    async def aclose(self) -> None:
        """Release the workers' streams; idempotent, and done by `bursts()` when it ends."""
        ...
