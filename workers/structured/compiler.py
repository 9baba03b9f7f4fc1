"""Constraints compiled against one model's vocabulary, cached by (kind, spec) in a bounded LRU."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from llguidance import LLMatcher

from dynamo.wire import OutputConstraint
from workers.structured.grammar import constraint_error, grammar_text
from workers.structured.matcher import GrammarMatcher
from workers.structured.vocab import GrammarVocab, load_vocab


@dataclass(frozen=True, slots=True, eq=False)
class CompiledGrammar:
    """A constraint ready to run: llguidance builds the lexer and parser when a matcher is made
    (~1 ms for a ten-property schema), so one fresh matcher is kept and copied (~3 us)."""

    constraint: OutputConstraint
    grammar: str  # llguidance grammar text
    vocab: GrammarVocab
    _template: LLMatcher

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy(), self.vocab)


class GrammarCompiler:
    """Compiles output constraints for one model. Thread-safe; compile() may be called from a
    worker thread so that a large schema does not stall the event loop."""

    def __init__(self, vocab: GrammarVocab, *, cache_size: int = 256) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.vocab = vocab
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_model_dir(
        cls,
        model_path: str | Path,
        vocab_size: int | None = None,
        stop_token_ids: list[int] | None = None,
        *,
        cache_size: int = 256,
    ) -> GrammarCompiler:
        """vocab_size: the engine's logits width (may exceed the tokenizer's); stop_token_ids:
        default the model's EOS ids (generation_config.json, tokenizer_config.json)."""
        return cls(load_vocab(model_path, vocab_size, stop_token_ids), cache_size=cache_size)

    def compile(self, constraint: OutputConstraint, *, field: str | None = None) -> CompiledGrammar:
        """Raises dynamo.errors.InvalidRequest naming the problem for a constraint that is not
        a valid grammar."""
        key = (constraint.kind, constraint.spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        # LLMatcher validates as it builds (a separate validate_grammar would build it twice).
        grammar = grammar_text(constraint, field=field)
        template = LLMatcher(self.vocab.ll_tokenizer, grammar, log_level=0)
        if template.is_error():
            raise constraint_error(constraint, template.get_error(), field)
        compiled = CompiledGrammar(constraint=constraint, grammar=grammar, vocab=self.vocab, _template=template)
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def cached(self) -> int:
        with self._lock:
            return len(self._cache)
