"""OpenAI chat and completions answers from a Generation's deltas: the server-sent events of a
stream (chunks, the usage chunk, error events, `data: [DONE]`) and the one JSON body otherwise.

Every chunk is a schemas.py Struct; the per-token path does not encode a whole Struct per
token, though. The common chunk (one choice, text only) is the Struct encoded once per request
with a placeholder for the text and split there, so each token costs one JSON string encode
and one join, and the bytes are by construction what encoding the Struct would give."""

from __future__ import annotations

from typing import Literal

import msgspec

from frontend.outputs import ChoiceDelta, ChoiceResult
from frontend.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChoiceLogprobs,
    ChunkDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    FunctionDelta,
    ResponseMessage,
    TokenLogprob,
    ToolCallChunk,
    Usage,
)

DONE = b"data: [DONE]\n\n"

_encode = msgspec.json.encode
_PLACEHOLDER = "\x00text\x00"
_PLACEHOLDER_JSON = _encode(_PLACEHOLDER)

StreamKind = Literal["chat", "completion"]


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def error_event(info: ErrorInfo) -> bytes:
    """An OpenAI-style error object as a data event (what OpenAI clients raise on mid-stream)."""
    return event(_encode(ErrorResponse(info)))


class _Template:
    """Bytes of one chunk with the text left out: prefix + json(text) + suffix."""

    __slots__ = ("prefix", "suffix")

    def __init__(self, chunk: ChatCompletionChunk | CompletionChunk) -> None:
        whole = event(_encode(chunk))
        self.prefix, placeholder, self.suffix = whole.partition(_PLACEHOLDER_JSON)
        assert placeholder, "the chunk does not carry the text placeholder"

    def render(self, text: str) -> bytes:
        return b"".join((self.prefix, _encode(text), self.suffix))


class ChunkWriter:
    """Encodes one OpenAI stream. Chat streams send the role with each choice's first chunk,
    the text (or reasoning, tool-call fragments, logprobs) in chunks of their own, then an
    empty delta with the finish_reason; completions alike without the role."""

    __slots__ = ("kind", "_id", "_created", "_model", "_started", "_text", "_first", "_offsets", "_legacy", "_usage")

    def __init__(
        self,
        kind: StreamKind,
        response_id: str,
        created: int,
        model: str,
        include_usage: bool = False,
        legacy_logprobs: bool = False,
    ) -> None:
        self.kind = kind
        # OpenAI: with include_usage every chunk carries "usage": null, the last one the usage.
        self._usage: None | msgspec.UnsetType = None if include_usage else msgspec.UNSET
        self._id = response_id
        self._created = created
        self._model = model
        self._started: set[int] = set()
        self._text: dict[int, _Template] = {}
        self._first: dict[int, _Template] = {}
        self._offsets: dict[int, int] = {}  # completions' text_offset, per choice
        self._legacy = legacy_logprobs

    # ------------------------------------------------------------------------ chunk shapes

    def _chat(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(self._id, "chat.completion.chunk", self._created, self._model, [choice], self._usage)

    def _completion(self, choice: CompletionChoice) -> CompletionChunk:
        return CompletionChunk(self._id, "text_completion", self._created, self._model, [choice], self._usage)

    def _template(self, index: int, first: bool) -> _Template:
        cache = self._first if first else self._text
        template = cache.get(index)
        if template is None:
            if self.kind == "chat":
                delta = ChunkDelta(role="assistant" if first else None, content=_PLACEHOLDER)
                template = _Template(self._chat(ChatChunkChoice(index, delta)))
            else:
                template = _Template(self._completion(CompletionChoice(index, _PLACEHOLDER, None)))
            cache[index] = template
        return template

    # ---------------------------------------------------------------------------- writing

    def first(self, text: str, index: int = 0) -> bytes:
        """The first chunk of a choice (for chat it also carries the assistant role)."""
        self._started.add(index)
        return self._template(index, True).render(text)

    def text(self, text: str, index: int = 0) -> bytes:
        return self._template(index, False).render(text)

    def finish(self, finish_reason: str, index: int = 0) -> bytes:
        if self.kind == "chat":
            return event(_encode(self._chat(ChatChunkChoice(index, ChunkDelta(), finish_reason=finish_reason))))
        return event(_encode(self._completion(CompletionChoice(index, "", finish_reason))))

    def usage(self, usage: Usage) -> bytes:
        if self.kind == "chat":
            chunk: ChatCompletionChunk | CompletionChunk = ChatCompletionChunk(
                self._id, "chat.completion.chunk", self._created, self._model, [], usage
            )
        else:
            chunk = CompletionChunk(self._id, "text_completion", self._created, self._model, [], usage)
        return event(_encode(chunk))

    def deltas(self, deltas: list[ChoiceDelta]) -> bytes:
        """The events of one burst, as one bytes object."""
        if len(deltas) == 1:
            return self.delta(deltas[0])
        return b"".join([self.delta(d) for d in deltas])

    def delta(self, d: ChoiceDelta) -> bytes:
        first = d.index not in self._started
        plain = not (d.reasoning or d.tool_calls or d.logprobs or d.prompt_logprobs)
        if plain:
            if first:
                out = self.first(d.content, d.index)
            elif d.content:
                # The per-token case: the template straight from its cache, not through
                # text() and _template() (two calls less per token).
                template = self._text.get(d.index) or self._template(d.index, False)
                out = template.render(d.content)
            else:
                out = b""
        else:
            self._started.add(d.index)
            out = self._rich(d, first)
        if d.finish_reason is not None:
            out += self.finish(d.finish_reason, d.index)
        return out

    def _rich(self, d: ChoiceDelta, first: bool) -> bytes:
        if self.kind == "chat":
            calls = [
                ToolCallChunk(
                    c.index,
                    c.id,
                    "function" if c.id is not None else None,
                    FunctionDelta(c.name, c.arguments if c.arguments or c.id is not None else None),
                )
                for c in d.tool_calls
            ] or None
            delta = ChunkDelta(
                role="assistant" if first else None,
                content=d.content if d.content or first else None,
                reasoning_content=d.reasoning or None,
                tool_calls=calls,
            )
            logprobs = ChoiceLogprobs(d.logprobs) if d.logprobs else None
            return event(_encode(self._chat(ChatChunkChoice(d.index, delta, logprobs))))
        return event(_encode(self._completion(CompletionChoice(d.index, d.content, None, self._legacy_logprobs(d)))))

    def _legacy_logprobs(self, d: ChoiceDelta) -> CompletionLogprobs | None:
        entries: list[TokenLogprob | None] = []
        if d.prompt_logprobs:
            entries += d.prompt_logprobs
        if d.logprobs:
            entries += d.logprobs
        if not entries:
            return None
        offset = self._offsets.get(d.index, 0)
        out, offset = legacy_logprobs(entries, offset)
        self._offsets[d.index] = offset
        return out


def legacy_logprobs(entries: list[TokenLogprob | None], offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """Chat-shaped logprobs as completions' parallel lists; `offset` is where the first token's
    text starts in the choice's text. A None entry (the first prompt token) has no logprob."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for entry in entries:
        if entry is None:
            tokens.append("")
            token_logprobs.append(None)
            tops.append(None)
            offsets.append(offset)
            continue
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        tops.append({t.token: t.logprob for t in entry.top_logprobs})
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(tokens, token_logprobs, tops, offsets), offset


def response_body(
    kind: StreamKind, response_id: str, created: int, model: str, results: list[ChoiceResult], usage: Usage,
    logprobs: bool,
) -> bytes:
    """The JSON body of a non-streaming answer."""
    if kind == "chat":
        choices = []
        for r in results:
            message = ResponseMessage(
                "assistant",
                None if r.tool_calls and not r.content else r.content,
                r.reasoning or None,
                r.tool_calls or None,
            )
            choices.append(ChatChoice(r.index, message, r.finish_reason, ChoiceLogprobs(r.logprobs or []) if logprobs else None))
        return _encode(ChatCompletionResponse(response_id, created, model, choices, usage))
    completion_choices = []
    for r in results:
        entries: list[TokenLogprob | None] = [*(r.prompt_logprobs or []), *(r.logprobs or [])]
        legacy = legacy_logprobs(entries)[0] if logprobs else None
        completion_choices.append(CompletionChoice(r.index, r.content, r.finish_reason, legacy))
    return _encode(CompletionResponse(response_id, created, model, completion_choices, usage))
