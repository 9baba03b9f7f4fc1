"""The built-in engine's embedding pass, on its model thread: the paged forward pass over a
PoolingBatch (workers/paged/embedding.py) and the pooling of its final hidden states (after the
model's last norm, before the LM head): last token, mean over tokens, or first (CLS) token."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from workers.builtin.attention import SeqSlice
from workers.builtin.device_copy import to_device
from workers.builtin.runner import ModelRunner
from workers.paged.embedding import PoolingBatch


@torch.inference_mode()
def pool_batch(runner: ModelRunner, batch: PoolingBatch) -> np.ndarray:
    """[inputs, hidden] float32 pooled vectors, not normalised. Runs on the model thread: the
    inputs' K/V go into the batch's blocks, which the batcher lent for this pass only."""
    device = runner.device
    lengths = [len(ids) for ids in batch.token_ids]
    slices = [SeqSlice(0, n, block_ids) for n, block_ids in zip(lengths, batch.block_ids)]
    meta = runner.backend.build_metadata(slices, batch.block_size_tokens, device)
    flat = [t for ids in batch.token_ids for t in ids]
    positions = [p for n in lengths for p in range(n)]
    hidden = runner.model(to_device(flat, torch.long, device), to_device(positions, torch.long, device), runner.kv, meta)
    return pool_hidden(hidden, lengths, batch.pooling).cpu().numpy()


def pool_hidden(hidden: torch.Tensor, lengths: list[int], pooling: Sequence[str]) -> torch.Tensor:
    """Pool a flat [tokens, hidden] batch of sequences of `lengths` into [sequences, hidden]
    float32, row i with `pooling[i]`."""
    device = hidden.device
    lens = torch.tensor(lengths, device=device)
    ends = torch.cumsum(lens, 0)
    starts = ends - lens
    index = torch.where(torch.tensor([p == "cls" for p in pooling], device=device), starts, ends - 1)
    out = hidden.index_select(0, index).float()
    if "mean" in pooling:
        rows = torch.arange(len(lengths), device=device).repeat_interleave(lens)
        sums = torch.zeros(len(lengths), hidden.shape[1], dtype=torch.float32, device=device)
        sums.index_add_(0, rows, hidden.float())
        means = sums / lens.unsqueeze(1).float()
        is_mean = torch.tensor([p == "mean" for p in pooling], device=device).unsqueeze(1)
        out = torch.where(is_mean, means, out)
    return out
