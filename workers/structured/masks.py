"""Token bitmasks for a batch, without torch: allocate, fill the constrained rows (in parallel
with llguidance's thread pool), unpack to a banned-token array for whoever applies it.

Layout (the one xgrammar and llguidance share): int32[batch, ceil(vocab / 32)], bit i of word j
is token 32 * j + i, 1 = allowed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from llguidance import LLExecutor, LLMatcher

from workers.structured.matcher import GrammarMatcher


def allocate_bitmask(batch: int, vocab_size: int) -> np.ndarray:
    """All tokens allowed in every row."""
    return np.full((batch, (vocab_size + 31) // 32), -1, dtype=np.int32)


class MaskFiller:
    """Fills the rows of a batch's bitmask. Rows not named are left as they are."""

    # Below this many matchers the pool's hand-off costs more than it saves.
    PARALLEL_MIN_ROWS = 4

    def __init__(self, num_threads: int | None = None) -> None:
        """num_threads: llguidance's pool (default 80% of the CPUs, at most 32)."""
        self._executor = LLExecutor(num_threads=num_threads)

    def fill(self, bitmask: np.ndarray, rows: Sequence[tuple[int, GrammarMatcher]]) -> None:
        if bitmask.dtype != np.int32 or bitmask.ndim != 2 or not bitmask.flags.c_contiguous:
            raise ValueError("bitmask must be a contiguous 2-D int32 array")
        if len(rows) < self.PARALLEL_MIN_ROWS:
            for row, matcher in rows:
                matcher.fill_mask(bitmask, row)
            return
        live: list[tuple[LLMatcher, int]] = []
        for row, matcher in rows:
            if not 0 <= row < bitmask.shape[0]:
                raise IndexError(f"row {row} outside a bitmask of {bitmask.shape[0]} rows")
            if bitmask.shape[1] != matcher.vocab.mask_words:
                raise ValueError(f"bitmask rows have {bitmask.shape[1]} words, the vocab needs {matcher.vocab.mask_words}")
            if matcher.is_terminated() or matcher.error is not None:
                matcher.fill_mask(bitmask, row)  # the stop-only row
            else:
                live.append((matcher.ll_matcher, row))
        if live:
            words = bitmask.shape[1]
            self._executor.unsafe_compute_mask_ptr(live, bitmask.ctypes.data, words * 4, bitmask.shape[0])


def banned_tokens(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool[batch, vocab_size], True where the bitmask bans the token. One pass of numpy's
    unpackbits over the complement: a 0/1 uint8 array is a bool array."""
    return np.unpackbits(np.invert(bitmask).view(np.uint8), axis=-1, count=vocab_size, bitorder="little").view(np.bool_)


def allowed_token_ids(bitmask: np.ndarray, row: int, vocab_size: int) -> np.ndarray:
    """The ids a bitmask row allows, ascending (tests, the mocker)."""
    bits = np.unpackbits(bitmask[row].view(np.uint8), count=vocab_size, bitorder="little")
    return np.flatnonzero(bits)
