"""One choice's engine outputs -> its ChoiceDeltas: token accounting against max_tokens, stop
ids and stop strings, incremental detokenization, logprobs with token text, then reasoning and
tool-call parsing. Streaming and non-streaming answers both come from here, so they agree."""

from __future__ import annotations

import json
import uuid

from dynamo import errors
from dynamo.wire import EngineOutput, PromptTokenLogprob
from frontend.detokenize import IncrementalDetokenizer
from frontend.outputs import ChoiceDelta
from frontend.parsers import ReasoningParser, ToolCallDelta, ToolCallParser, ToolSpec, reasoning_parser, tool_call_parser
from frontend.preprocess import OutputSpec, ToolSpecs
from frontend.schemas import TokenLogprob, TopLogprob
from frontend.tokenizer import ModelTokenizer


# A masked token's logprob is -inf, which JSON cannot carry: clamped as vLLM's server does.
_MIN_LOGPROB = -9999.0


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class TokenTexts:
    """Text and UTF-8 bytes of single tokens, for logprobs; cached per id (bounded by the
    vocabulary) because the same tokens come back as alternatives again and again."""

    __slots__ = ("_tokenizer", "_cache")

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            hit = (text, list(text.encode("utf-8", "surrogatepass")))
            self._cache[token_id] = hit
        return hit

    def logprob(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        text, raw = self.get(token_id)
        alternatives = []
        for alt_id, alt_logprob in top:
            alt_text, alt_raw = self.get(alt_id)
            alternatives.append(TopLogprob(alt_text, max(alt_logprob, _MIN_LOGPROB), alt_raw))
        return TokenLogprob(text, max(logprob, _MIN_LOGPROB), raw, alternatives)

    def prompt_logprobs(self, token_ids: list[int], entries: list[PromptTokenLogprob | None]) -> list[TokenLogprob | None]:
        out: list[TokenLogprob | None] = []
        for token_id, entry in zip(token_ids, entries):
            out.append(None if entry is None else self.logprob(token_id, entry.logprob, entry.top))
        return out


class _ForcedCalls:
    """tool_choice required or a named function: the grammar made the whole output the call(s).
    Named: the text is the arguments, streamed as they come. Required: the text is a JSON list
    of {"name", "parameters"}, turned into calls at the end (it is only valid JSON then)."""

    __slots__ = ("tools", "_held", "_started")

    def __init__(self, tools: ToolSpecs) -> None:
        self.tools = tools
        self._held: list[str] = []
        self._started = False

    def feed(self, text: str) -> list[ToolCallDelta]:
        if not text:
            return []
        if self.tools.mode == "required":
            self._held.append(text)
            return []
        if not self._started:
            self._started = True
            return [ToolCallDelta(0, new_call_id(), self.tools.name, text)]
        return [ToolCallDelta(0, arguments=text)]

    def finish(self) -> list[ToolCallDelta]:
        if self.tools.mode == "named":
            if not self._started:  # nothing generated (max_tokens hit at once): an empty call
                self._started = True
                return [ToolCallDelta(0, new_call_id(), self.tools.name, "")]
            return []
        text = "".join(self._held)
        try:
            calls = json.loads(text)
        except ValueError:
            # Cut short (length): no complete list; the client sees the raw text as arguments.
            return [ToolCallDelta(0, new_call_id(), "", text)] if text else []
        return [
            ToolCallDelta(i, new_call_id(), str(c.get("name", "")), json.dumps(c.get("parameters", {}), ensure_ascii=False))
            for i, c in enumerate(calls if isinstance(calls, list) else [calls])
            if isinstance(c, dict)
        ]


class ChoiceOutput:
    """Per-choice output state. `feed` takes one engine output and returns the choice's delta
    (None when nothing is to be sent yet); once `finish_reason` is set the choice is done."""

    __slots__ = (
        "index", "detok", "stop_ids", "max_tokens", "completion_tokens", "finish_reason", "worker_finished",
        "generated", "_spec", "_texts", "_reasoning", "_tools", "_forced", "_has_calls", "_plain", "_echo",
        "_first", "_prompt_ids",
    )

    def __init__(
        self,
        index: int,
        spec: OutputSpec,
        tokenizer: ModelTokenizer,
        texts: TokenTexts | None = None,
        echo_text: str = "",
        prompt_ids: list[int] | None = None,
    ) -> None:
        self.index = index
        self._spec = spec
        # Mistral's [TOOL_CALLS] is a special token: its parser must see it in the text.
        keep_special = spec.tools.mode == "parse" and spec.tools.parser == "mistral"
        self.detok = IncrementalDetokenizer(tokenizer.tokenizer, spec.stop_strings, skip_special_tokens=not keep_special)
        self._texts = texts if texts is not None else TokenTexts(tokenizer)
        # Every token the workers produced so far: a migrated request resends them as prompt.
        self.generated: list[int] = []
        self.stop_ids = spec.stop_token_ids
        self.max_tokens = spec.max_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.worker_finished = False  # the worker sent a finish_reason (vs. we cut it short)
        self._reasoning: ReasoningParser | None = None
        self._tools: ToolCallParser | None = None
        self._forced: _ForcedCalls | None = None
        self._has_calls = False
        self._echo = echo_text  # completions' echo: the prompt text leads the first delta
        self._first = True
        self._prompt_ids = prompt_ids or []
        if spec.reasoning_parser is not None:
            self._reasoning = reasoning_parser(spec.reasoning_parser)
        tools = spec.tools
        if tools.mode == "parse":
            assert tools.parser is not None
            self._tools = tool_call_parser(tools.parser, [ToolSpec(n, s) for n, s in tools.schemas.items()])
        elif tools.mode in ("named", "required"):
            self._forced = _ForcedCalls(tools)
        # The common case: text in, text out, no per-token parsing or logprobs.
        self._plain = self._reasoning is None and self._tools is None and self._forced is None and not spec.logprobs

    def feed(self, out: EngineOutput) -> ChoiceDelta | None:
        ids = out.token_ids
        self.generated += ids
        reason = out.finish_reason
        if reason is not None:
            self.worker_finished = True
        remaining = self.max_tokens - self.completion_tokens
        if len(ids) >= remaining:
            if len(ids) > remaining:  # the engine overran max_tokens: never pass that on
                ids = ids[:remaining]
                reason = "length"
            elif reason is None:
                reason = "length"
        self.completion_tokens += len(ids)
        kept = len(ids)
        if reason is not None:
            if reason == "stop":
                if ids and ids[-1] in self.stop_ids:
                    kept -= 1  # EOS / stop token ids are not part of the text
            elif reason != "length":
                raise errors.EngineError(f"the worker ended the request with finish_reason={reason!r}")
        detok = self.detok
        text = detok.step(ids[:kept] if kept != len(ids) else ids) if kept else ""
        stop_sequence = None
        if detok.has_stop_strings and detok.stopped:
            reason = "stop"
            stop_sequence = detok.matched
        if reason is not None:
            self.finish_reason = reason
            text += detok.flush()
        if self._first:
            self._first = False
            return self._first_delta(text, out, kept, reason, stop_sequence)
        if self._plain:
            if not text and reason is None:
                return None
            # Positional: the per-token path (index, content, reasoning, tool_calls, logprobs, ...).
            return ChoiceDelta(self.index, text, "", (), None, reason, stop_sequence)
        return self._delta(text, out, kept, reason, stop_sequence)

    def _first_delta(self, text: str, out: EngineOutput, kept: int, reason: str | None, stop_sequence: str | None) -> ChoiceDelta:
        """The first delta always goes out (it opens the stream, with the role for chat) and
        carries what belongs to the prompt: the echoed text and its logprobs."""
        if self._plain:
            delta: ChoiceDelta | None = ChoiceDelta(self.index, content=text, finish_reason=reason, stop_sequence=stop_sequence)
        else:
            delta = self._delta(text, out, kept, reason, stop_sequence)
        if delta is None:
            delta = ChoiceDelta(self.index)
        if self._echo:
            delta.content = self._echo + delta.content
        if out.prompt_logprobs is not None:
            assert self._texts is not None
            delta.prompt_logprobs = self._texts.prompt_logprobs(self._prompt_ids, out.prompt_logprobs)
        return delta

    def _delta(self, text: str, out: EngineOutput, kept: int, reason: str | None, stop_sequence: str | None) -> ChoiceDelta | None:
        delta = ChoiceDelta(self.index)
        if self._spec.logprobs and kept:
            delta.logprobs = self._logprobs(out, kept)
        content = text
        if self._reasoning is not None:
            thought, content = self._reasoning.feed(content) if content else ("", "")
            if reason is not None:
                more_thought, more_content = self._reasoning.finish()
                thought += more_thought
                content += more_content
            delta.reasoning = thought
        if self._tools is not None:
            parsed = self._tools.feed(content) if content else None
            content = parsed.content if parsed is not None else ""
            calls = list(parsed.tool_calls) if parsed is not None else []
            if reason is not None:
                tail = self._tools.finish()
                content += tail.content
                calls += tail.tool_calls
            delta.tool_calls = calls
            if not self._spec.tools.parallel:
                delta.tool_calls = [c for c in delta.tool_calls if c.index == 0]
        elif self._forced is not None:
            delta.tool_calls = self._forced.feed(content)
            content = ""
            if reason is not None:
                delta.tool_calls = [*delta.tool_calls, *self._forced.finish()]
        delta.content = content
        if delta.tool_calls:
            self._has_calls = True
        if reason is not None:
            delta.finish_reason = "tool_calls" if self._has_calls and reason == "stop" else reason
            delta.stop_sequence = stop_sequence
        elif not (delta.content or delta.reasoning or delta.tool_calls or delta.logprobs):
            return None
        return delta

    def _logprobs(self, out: EngineOutput, kept: int) -> list[TokenLogprob]:
        if out.logprobs is None:
            raise errors.EngineError("logprobs were asked for but the worker sent none")
        texts, tops = self._texts, out.top_logprobs
        return [
            texts.logprob(out.token_ids[i], out.logprobs[i], tops[i] if tops is not None else [])
            for i in range(kept)
        ]
