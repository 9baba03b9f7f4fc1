"""The model runner: turns a scheduled step into tensors, runs the forward pass over the paged
KV cache and samples. `StepInput` is plain data built on the event loop's thread, so the runner
(on its own thread) never reads scheduler state that an abort may be changing. On CUDA, decode
steps replay CUDA graphs (unless enforce_eager) and step inputs travel through pinned memory, so
the only host sync of a step is sampling's one read of the chosen ids."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from workers.builtin.attention import SeqSlice, to_device
from workers.builtin.cuda_graphs import DecodeGraphs, capture_sizes
from workers.builtin.kv_cache import KVCache
from workers.builtin.model import LlamaForCausalLM
from workers.builtin.sampling import SampleResult, SampleRow, sample

if TYPE_CHECKING:  # the scheduler pulls in the wire types (msgspec); the runner needs only torch
    from workers.paged.scheduler import ScheduledBatch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInput:
    input_ids: list[int]
    positions: list[int]
    slices: list[SeqSlice]
    sample_indices: list[int]  # flat index of each sampling sequence's last token
    sample_rows: list[SampleRow]


def build_step_input(batch: ScheduledBatch) -> StepInput:
    """Each sampling request's row is its SampleRow (its Sequence's `exec_state`), with its
    stop ids banned while it is short of min_tokens."""
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
            row: SampleRow = seq.exec_state
            banned = seq.banned_token_ids()
            rows.append(SampleRow(row.params, row.generator, banned) if banned else row)
    return StepInput(input_ids, positions, slices, sample_indices, rows)


class ModelRunner:
    """Runs steps on one device. CUDA graphs are captured at construction when the model runs
    the Triton backend on CUDA and `enforce_eager` is off; `max_model_len` sizes their block
    tables."""

    def __init__(
        self, model: LlamaForCausalLM, kv: KVCache, device: torch.device, *,
        enforce_eager: bool = True, max_num_seqs: int = 256, max_model_len: int | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.backend = model.model.layers[0].self_attn.backend
        self.graphs: DecodeGraphs | None = None
        if not enforce_eager and device.type == "cuda" and model.fused:
            max_len = max_model_len or model.max_positions
            max_blocks = -(-max_len // kv.block_size_tokens)
            started = time.monotonic()
            self.graphs = DecodeGraphs(model, kv, device, capture_sizes(max_num_seqs), max_blocks)
            self.graphs.capture()
            log.info("captured %d decode CUDA graphs in %.1f s", len(self.graphs.sizes), time.monotonic() - started)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> SampleResult:
        graphs = self.graphs
        if graphs is not None and all(s.num_new == 1 for s in step.slices):
            batch = graphs.bucket(len(step.slices))
            if batch is not None:
                logits = graphs.run(step.input_ids, step.slices, batch)
                if not step.sample_rows:
                    return SampleResult([], None)
                if len(step.sample_indices) != len(step.slices):
                    # A one-token prefill chunk that is not its prompt's last samples nothing.
                    logits = logits.index_select(0, to_device(step.sample_indices, torch.long, self.device))
                return sample(logits, step.sample_rows)
        device = self.device
        meta = self.backend.build_metadata(step.slices, self.kv.block_size_tokens, device)
        input_ids = to_device(step.input_ids, torch.long, device)
        positions = to_device(step.positions, torch.long, device)
        hidden = self.model(input_ids, positions, self.kv, meta)
        if not step.sample_rows:
            return SampleResult([], None)
        # Only the rows that yield a token need the (vocab-wide) LM head.
        index = to_device(step.sample_indices, torch.long, device)
        logits = self.model.compute_logits(hidden.index_select(0, index))
        return sample(logits, step.sample_rows)
