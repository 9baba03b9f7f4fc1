"""One request's position in its grammar: which tokens may come next, and the tokens taken so
far. Wraps llguidance's LLMatcher so that a rejected token leaves the state as it was."""

from __future__ import annotations

import numpy as np
from llguidance import LLMatcher

from workers.structured.vocab import GrammarVocab


class GrammarMatcher:
    """Per-request grammar state. Made by `CompiledGrammar.matcher()`.

    A stop token (EOS) is allowed exactly when the grammar can end; accepting one terminates
    the matcher (`is_terminated`), after which nothing else is accepted until `rollback`.
    Where the grammar forces bytes (`{"` opening an object), the mask offers only their
    canonical tokenization, a subset of what `is_allowed` / `accept` take (any tokenization
    of valid bytes: replayed output from another worker is never refused for its spelling)."""

    __slots__ = ("_m", "_vocab", "_stops", "_tokens", "_terminated")

    def __init__(self, ll_matcher: LLMatcher, vocab: GrammarVocab) -> None:
        self._m = ll_matcher
        self._vocab = vocab
        self._stops = frozenset(vocab.stop_token_ids)
        self._tokens: list[int] = []  # accepted, stop token included
        self._terminated = False

    @property
    def vocab(self) -> GrammarVocab:
        return self._vocab

    @property
    def accepted_ids(self) -> list[int]:
        """The tokens accepted so far (read-only by contract)."""
        return self._tokens

    @property
    def error(self) -> str | None:
        """Why the matcher cannot go on (grammar too complex at this point); None normally."""
        return (self._m.get_error() or "unknown grammar error") if self._m.is_error() else None

    def is_allowed(self, token_id: int) -> bool:
        if self._terminated or not 0 <= token_id < self._vocab.vocab_size:
            return False
        if token_id in self._stops:
            return self._m.is_accepting()
        return self._m.validate_tokens([token_id]) == 1

    def accept(self, token_id: int) -> bool:
        """Take `token_id` if the grammar allows it; False (state unchanged) if not."""
        if not self.is_allowed(token_id):
            return False
        if token_id in self._stops:
            # Kept out of llguidance: its rollback does not count a stop token it consumed.
            self._terminated = True
        elif not self._m.consume_token(token_id):  # pragma: no cover - is_allowed said yes
            raise RuntimeError(f"llguidance rejected token {token_id} it had validated: {self._m.get_error()}")
        self._tokens.append(token_id)
        return True

    def accept_many(self, token_ids: list[int]) -> bool:
        """Replay tokens (a migrated request's generated output). All or nothing: False and the
        state unchanged if any token is not allowed where it stands."""
        if not token_ids:
            return True
        if self._terminated:
            return False
        # A stop token can only be last (nothing follows it); validate_tokens does not take it.
        ends = token_ids[-1] in self._stops
        body = token_ids[:-1] if ends else token_ids
        if any(t in self._stops or not 0 <= t < self._vocab.vocab_size for t in body):
            return False
        if self._m.validate_tokens(body) != len(body):
            return False
        if body and not self._m.consume_tokens(body):  # pragma: no cover - validated above
            raise RuntimeError(f"llguidance rejected tokens it had validated: {self._m.get_error()}")
        if ends and not self._m.is_accepting():
            if body:
                self._m.rollback(len(body))
            return False
        self._tokens.extend(token_ids)
        self._terminated = ends
        return True

    def is_accepting(self) -> bool:
        """The output so far is a complete sentence of the grammar (a stop token may come)."""
        return not self._terminated and self._m.is_accepting()

    def is_terminated(self) -> bool:
        """A stop token was accepted: the output is complete and valid."""
        return self._terminated

    def must_stop(self) -> bool:
        """Nothing but a stop token can come next (the grammar allows no longer output)."""
        return self._terminated or self._m.is_stopped()

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative decoding, a cut stop string)."""
        if not 0 <= num_tokens <= len(self._tokens):
            raise ValueError(f"cannot roll back {num_tokens} of {len(self._tokens)} tokens")
        if num_tokens == 0:
            return
        grammar_tokens = num_tokens - 1 if self._terminated else num_tokens
        if grammar_tokens and not self._m.rollback(grammar_tokens):  # pragma: no cover
            raise RuntimeError(f"llguidance could not roll back {grammar_tokens} tokens")
        del self._tokens[len(self._tokens) - num_tokens :]
        self._terminated = False

    def reset(self) -> None:
        self.rollback(len(self._tokens))

    def forced_token_ids(self) -> list[int]:
        """Tokens the grammar forces from here, whatever is sampled (may be empty)."""
        return [] if self._terminated else list(self._m.compute_ff_tokens())

    def fill_mask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (int32 words, bit i of word j is
        token 32*j + i; shape (batch, vocab.mask_words)). Padded vocab ids are always 0.

        A terminated matcher, or one in an error state, allows only the stop tokens: the row
        stays samplable and the request ends (check `error` to report it)."""
        target = bitmask[row]
        if target.dtype != np.int32 or target.shape != (self._vocab.mask_words,) or not target.flags.c_contiguous:
            raise ValueError(f"bitmask rows must be contiguous int32[{self._vocab.mask_words}]")
        if self._terminated or self._m.is_error():
            target[:] = self._vocab.stop_row
            return
        self._m.unsafe_compute_mask_ptr(target.ctypes.data, target.nbytes)

    @property
    def ll_matcher(self) -> LLMatcher:
        """The llguidance matcher, for the batched fill (workers/structured/masks.py) only."""
        return self._m
