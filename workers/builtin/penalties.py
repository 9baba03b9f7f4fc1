"""Per-request token counts for repetition, frequency and presence penalties, kept on the device
and updated incrementally: each penalised request owns one row of a [slots, vocab] buffer,
filled once from its tokens when first sampled, then bumped by one batched index_put_ a step.
A step reads its penalised rows with one gather whatever the sequences' lengths; rebuilding the
counts from token ids each step would cost host work growing with every sequence's length."""

from __future__ import annotations

import torch

from workers.builtin.device_copy import to_device


class PenaltyCounts:
    """`counts[slot, t]`: how often token t is in the request's output (tokens generated before a
    migration included); `in_prompt[slot, t]`: t is in its prompt. Rows (slots) are handed out
    by the executor (SlotPool); the buffers grow to the largest slot seen. Model thread only."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.counts = torch.zeros((0, vocab_size), dtype=torch.float32, device=device)
        self.in_prompt = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)

    def _ensure(self, slot: int) -> None:
        rows = self.counts.shape[0]
        if slot < rows:
            return
        new_rows = max(slot + 1, 2 * rows, 8)
        counts = torch.zeros((new_rows, self.vocab_size), dtype=torch.float32, device=self.device)
        in_prompt = torch.zeros((new_rows, self.vocab_size), dtype=torch.bool, device=self.device)
        counts[:rows] = self.counts
        in_prompt[:rows] = self.in_prompt
        self.counts, self.in_prompt = counts, in_prompt

    def init_slot(self, slot: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        self._ensure(slot)
        self.counts[slot].zero_()
        self.in_prompt[slot].zero_()
        if output_ids:
            ids = to_device(output_ids, torch.long, self.device)
            self.counts[slot].index_add_(0, ids, torch.ones(len(output_ids), device=self.device))
        if prompt_ids:
            self.in_prompt[slot, to_device(prompt_ids, torch.long, self.device)] = True

    def gather(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts, in_prompt) of these slots, [len(slots), vocab] each."""
        index = to_device(slots, torch.long, self.device)
        return self.counts.index_select(0, index), self.in_prompt.index_select(0, index)

    def add(self, slots: list[int], token_ids: torch.Tensor) -> None:
        """Count one more of token_ids[i] (on the device) in slots[i]."""
        index = to_device(slots, torch.long, self.device)
        self.counts.index_put_((index, token_ids), torch.ones((), device=self.device), accumulate=True)


class SlotPool:
    """Hands out penalty rows. Event loop thread only: a row freed while a step that uses it runs
    is handed out again at the earliest to a request that first samples in a later step, whose
    init_slot overwrites whatever that step left in it."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self._next = 0

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def give(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def in_use(self) -> int:
        return self._next - len(self._free)
