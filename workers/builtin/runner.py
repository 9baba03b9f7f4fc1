"""The model runner: turns a scheduled step into tensors, runs the forward pass over the paged
KV cache and samples. `StepInput` is plain data built on the event loop's thread, so the runner
(on its own thread) never reads scheduler state that an abort may be changing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.builtin.attention import SeqSlice
from workers.builtin.kv_cache import KVCache
from workers.builtin.model import LlamaForCausalLM
from workers.builtin.sampling import SampleResult, SampleRow, sample
from workers.builtin.scheduler import ScheduledBatch


@dataclass(slots=True)
class StepInput:
    input_ids: list[int]
    positions: list[int]
    slices: list[SeqSlice]
    sample_indices: list[int]  # flat index of each sampling sequence's last token
    sample_rows: list[SampleRow]


def build_step_input(batch: ScheduledBatch) -> StepInput:
    input_ids: list[int] = []
    positions: list[int] = []
    slices: list[SeqSlice] = []
    sample_indices: list[int] = []
    rows: list[SampleRow] = []
    for seq, num_new, samples in zip(batch.seqs, batch.num_new_tokens, batch.samples):
        start = seq.num_computed_tokens
        input_ids.extend(seq.token_ids[start : start + num_new])
        positions.extend(range(start, start + num_new))
        slices.append(SeqSlice(start, num_new, [b.block_id for b in seq.block_table]))
        if samples:
            sample_indices.append(len(input_ids) - 1)
            rows.append(seq.sample_row())
    return StepInput(input_ids, positions, slices, sample_indices, rows)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.backend = model.model.layers[0].self_attn.backend

    @torch.inference_mode()
    def execute(self, step: StepInput) -> SampleResult:
        device = self.device
        meta = self.backend.build_metadata(step.slices, self.kv.block_size_tokens, device)
        input_ids = torch.tensor(step.input_ids, dtype=torch.long, device=device)
        positions = torch.tensor(step.positions, dtype=torch.long, device=device)
        hidden = self.model(input_ids, positions, self.kv, meta)
        if not step.sample_rows:
            return SampleResult([], None)
        # Only the rows that yield a token need the (vocab-wide) LM head.
        index = torch.tensor(step.sample_indices, dtype=torch.long, device=device)
        logits = self.model.compute_logits(hidden.index_select(0, index))
        return sample(logits, step.sample_rows)
