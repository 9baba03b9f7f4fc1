"""Grammar masks applied to a batch's logits: the one module of workers/structured that needs
torch (the executor's sampler calls it once per step, before sampling).

The bitmask is filled on the CPU by llguidance (workers/structured/masks.py). Applying it:
- CPU logits: numpy unpacks the bits and one masked_fill_ bans the tokens. Measured on the
  2-core box (benchmarks/RESULTS.md, "Structured outputs"), this beats xgrammar's C++ CPU
  kernel (3.8 vs 12.3 ms at 32 x 150k) and needs no compiler, unlike llguidance's own apply (a
  torch.compile kernel).
- CUDA logits: the packed bitmask (32x smaller than the logits) is copied over and unpacked on
  the device with shifts: 0.18 ms at 32 x 150k on an H100, against 0.10 ms for xgrammar's Triton
  kernel and 0.13 ms for llguidance's torch.compile one (a cost paid once per step, beside a
  fill of 1-2 ms that the executor can run while the forward pass is on the GPU).
Rows without a constraint are not touched."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from workers.structured.masks import MaskFiller, allocate_bitmask, banned_tokens
from workers.structured.matcher import GrammarMatcher


class LogitsMasker:
    """Owns the step's bitmask buffer and the fill thread pool; one per executor."""

    def __init__(self, vocab_size: int, *, max_batch: int = 64, num_threads: int | None = None) -> None:
        self.vocab_size = vocab_size
        self._filler = MaskFiller(num_threads)
        self._bitmask = allocate_bitmask(max_batch, vocab_size)
        self._shifts: dict[torch.device, torch.Tensor] = {}

    def _buffer(self, rows: int) -> np.ndarray:
        if rows > self._bitmask.shape[0]:
            self._bitmask = allocate_bitmask(max(rows, 2 * self._bitmask.shape[0]), self.vocab_size)
        return self._bitmask[:rows]

    def fill(self, constrained: Sequence[tuple[int, GrammarMatcher]]) -> np.ndarray:
        """The bitmask of the constrained rows, compacted: row i is constrained[i]'s."""
        bitmask = self._buffer(len(constrained))
        self._filler.fill(bitmask, [(i, m) for i, (_, m) in enumerate(constrained)])
        return bitmask

    def apply(self, logits: torch.Tensor, constrained: Sequence[tuple[int, GrammarMatcher]]) -> None:
        """Ban, in `logits` (batch, vocab) in place, every token that the grammar of each
        (row, matcher) in `constrained` does not allow next. Other rows are left untouched."""
        if constrained:
            self.apply_bitmask(logits, self.fill(constrained), [row for row, _ in constrained])

    def apply_bitmask(self, logits: torch.Tensor, bitmask: np.ndarray, rows: Sequence[int]) -> None:
        """The second half of `apply`, for an executor that fills (CPU work) while the forward
        pass runs on the GPU: bitmask row i bans tokens in logits row rows[i]."""
        if not rows:
            return
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be (batch, {self.vocab_size}), got {tuple(logits.shape)}")
        banned = self._banned(bitmask[: len(rows)], logits.device)
        if len(rows) == logits.shape[0] and all(row == i for i, row in enumerate(rows)):
            logits.masked_fill_(banned, float("-inf"))
            return
        index = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
        logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(banned, float("-inf")))

    def _banned(self, bitmask: np.ndarray, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return torch.from_numpy(banned_tokens(bitmask, self.vocab_size))
        # A plain copy: it waits behind the forward pass that is still queued, which sampling
        # waits for anyway. (A pinned buffer with an event to guard its reuse measured slower
        # on the H100: 0.25 against 0.18 ms at 32 x 150k.)
        words = torch.from_numpy(bitmask).to(device)
        shifts = self._shifts.get(device)
        if shifts is None:
            shifts = self._shifts[device] = torch.arange(32, dtype=torch.int32, device=device)
        allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1)[:, : self.vocab_size]
        return allowed == 0
