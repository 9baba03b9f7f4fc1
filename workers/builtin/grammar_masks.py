"""The sampler's grammar masks, optionally filled one step ahead: right after a step's tokens are
accepted, a helper thread fills the next masks of that step's constrained rows (llguidance drops
the GIL) while the engine finishes the step, schedules the next and runs its forward pass; the
next step takes those rows ready and fills only rows that are new to it. A row's mask depends
only on its matcher's state, which nothing but the sampler's accept changes, so a mask filled
ahead stays right; each is checked against its matcher's accepted count anyway, and a row that
fails the check, or is new, is filled in the step (the plain path, which the tests run too).

What it buys, measured on an H100 machine's 16 CPUs (benchmarks/RESULTS.md, "Constrained
decoding", 32 rows of an array-of-objects schema, constrained over unconstrained tokens/s):
on the CPU (torch on 2 threads, dynamo-tiny) 0.84 ahead against 0.79 filled in the step, where
the forward pass runs on the model thread and nothing else overlaps the fill; on the GPU the
fill in the step already overlaps the queued forward pass, and filling ahead measured worse at
the 1.1B shape (0.73 against 0.77: the helper's fill contends with the event loop's and the
model thread's host work). So the sampler fills ahead on CPU devices only.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from workers.structured import GrammarMatcher, MaskFiller, allocate_bitmask
from workers.structured.logits import LogitsMasker

# Fewer rows fill in the step: a few single-row fills (~20 us each) cost less than the hand-off.
FILL_AHEAD_MIN_ROWS = MaskFiller.PARALLEL_MIN_ROWS


class GrammarMasks:
    """Per sampler. `masks(rows)` for this step's constrained rows, `apply` to the logits, then
    `fill_ahead(matchers)` once their tokens are accepted. Model thread, but for the helper."""

    def __init__(
        self, vocab_size: int, *, max_batch: int = 64, num_threads: int | None = None, ahead: bool = True
    ) -> None:
        self.vocab_size = vocab_size
        self.ahead = ahead  # False: fill_ahead does nothing, every mask is filled in its step
        self._filler = MaskFiller(num_threads)
        # Only its apply is used (bitmask to banned tokens, on the logits' device): one thread.
        self._masker = LogitsMasker(vocab_size, max_batch=1, num_threads=1)
        self._step = allocate_bitmask(max_batch, vocab_size)
        self._ahead = allocate_bitmask(max_batch, vocab_size)
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-fill")
        self._pending: Future[None] | None = None
        # Filled ahead: matcher identity -> (row of _ahead, its accepted count then). The list
        # keeps those matchers alive, so their ids stay theirs.
        self._ahead_rows: dict[int, tuple[int, int]] = {}
        self._ahead_matchers: list[GrammarMatcher] = []
        self.rows_filled_ahead = 0  # counters, for benchmarks and tests
        self.rows_filled_in_step = 0

    def masks(self, constrained: list[tuple[int, GrammarMatcher]]) -> np.ndarray:
        """The bitmask of the constrained rows, compacted: row j is constrained[j]'s."""
        n = len(constrained)
        if n > self._step.shape[0]:
            self._step = allocate_bitmask(max(n, 2 * self._step.shape[0]), self.vocab_size)
        out = self._step[:n]
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        ahead, missing = self._ahead_rows, []
        taken: list[tuple[int, int]] = []
        for j, (_, matcher) in enumerate(constrained):
            hit = ahead.get(id(matcher))
            if hit is not None and hit[1] == len(matcher.accepted_ids):
                taken.append((j, hit[0]))
            else:
                missing.append((j, matcher))
        if taken:
            dst, src = zip(*taken)
            out[list(dst)] = self._ahead[list(src)]
        if missing:
            self._filler.fill(out, missing)
        self.rows_filled_ahead += len(taken)
        self.rows_filled_in_step += len(missing)
        self._ahead_rows, self._ahead_matchers = {}, []
        return out

    def apply(self, logits: torch.Tensor, bitmask: np.ndarray, rows: list[int]) -> None:
        """Ban, in `logits` row rows[j], what bitmask row j does not allow."""
        self._masker.apply_bitmask(logits, bitmask, rows)

    def fill_ahead(self, matchers: list[GrammarMatcher]) -> None:
        """Start filling these matchers' next masks (after their tokens were accepted)."""
        if not self.ahead or len(matchers) < FILL_AHEAD_MIN_ROWS:
            return
        if self._pending is not None:  # not taken by a step: done with it
            self._pending.result()
        if len(matchers) > self._ahead.shape[0]:
            self._ahead = allocate_bitmask(max(len(matchers), 2 * self._ahead.shape[0]), self.vocab_size)
        self._ahead_rows = {id(m): (k, len(m.accepted_ids)) for k, m in enumerate(matchers)}
        self._ahead_matchers = matchers
        self._pending = self._helper.submit(self._filler.fill, self._ahead, list(enumerate(matchers)))

    def close(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        self._helper.shutdown(wait=True)
