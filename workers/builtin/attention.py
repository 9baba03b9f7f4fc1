"""Attention over the paged KV cache for a mixed batch of prefill chunks and decodes.

The portable path gathers each sequence's blocks into a padded [batch, kv_len] view and runs
torch SDPA with a causal-with-offset mask. On CUDA with Triton, Triton kernels read K/V in place
through the block tables: one for pure-decode steps (CUDA-graph safe), one for steps with
prefill chunks (varlen queries, causal with each sequence's cached prefix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from workers.builtin import gpu_kernels
from workers.builtin.device_copy import to_device


@dataclass(slots=True)
class SeqSlice:
    """One sequence's part of a step: `num_new` tokens after `num_computed` cached ones."""

    num_computed: int
    num_new: int
    block_ids: list[int]


@dataclass(slots=True)
class AttentionMetadata:
    """Built once per step, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] padded with block 0 (masked out)
    query_index: torch.Tensor  # [T] row of each new token in the padded [B * max_q] queries
    mask: torch.Tensor  # [B, 1, max_q, max_kv] True where a query may attend
    num_seqs: int
    max_q: int
    max_kv: int
    # The Triton backend: [B] int32 tokens in each sequence's cache, the new ones included (0
    # for a padded CUDA-graph row); block_tables are int32 then.
    seq_lens: torch.Tensor | None = None
    # The Triton backend's steps with a prefill chunk: [B + 1] int32 offsets of each sequence's
    # new tokens in the flat batch. None: a pure-decode step (one token a sequence).
    query_starts: torch.Tensor | None = None


class AttentionBackend(Protocol):
    def build_metadata(self, seqs: list[SeqSlice], block_size_tokens: int, device: torch.device) -> AttentionMetadata: ...

    def forward(
        self,
        q: torch.Tensor,  # [T, heads, head_dim]
        k: torch.Tensor,  # [T, kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...  # [T, heads, head_dim]


class SdpaPagedAttention:
    """Gather-then-SDPA: simple and exact; costs a copy of each sequence's KV per layer, which
    is what a paged GPU kernel avoids."""

    def build_metadata(self, seqs: list[SeqSlice], block_size_tokens: int, device: torch.device) -> AttentionMetadata:
        bs = block_size_tokens
        num_seqs = len(seqs)
        max_q = max(s.num_new for s in seqs)
        max_blocks = max(-(-(s.num_computed + s.num_new) // bs) for s in seqs)
        query_index: list[np.ndarray] = []
        tables: list[list[int]] = []
        starts: list[int] = []
        kv_lens: list[int] = []
        for b, s in enumerate(seqs):
            ids = s.block_ids
            query_index.append(np.arange(b * max_q, b * max_q + s.num_new))
            used = ids[: max_blocks]
            tables.append(used + [0] * (max_blocks - len(used)))
            starts.append(s.num_computed)
            kv_lens.append(s.num_computed + s.num_new)
        max_kv = max_blocks * bs
        # The mask is built on the device from two small vectors: built on the host it is
        # megabytes a prefill step, copied from pageable memory (see device_copy).
        bounds = to_device([starts, kv_lens], torch.long, device)
        q_pos = torch.arange(max_q, device=device).view(1, max_q, 1) + bounds[0].view(num_seqs, 1, 1)
        kv_pos = torch.arange(max_kv, device=device).view(1, 1, max_kv)
        # Causal with each sequence's offset; padded query rows still see key 0, so no row is
        # fully masked (that would make SDPA return NaN).
        mask = (kv_pos <= q_pos) & (kv_pos < bounds[1].view(num_seqs, 1, 1))
        return AttentionMetadata(
            slot_mapping=to_device(new_token_slots(seqs, bs), torch.long, device),
            block_tables=to_device(tables, torch.long, device),
            query_index=to_device(np.concatenate(query_index), torch.long, device),
            mask=mask.unsqueeze(1),
            num_seqs=num_seqs,
            max_q=max_q,
            max_kv=max_kv,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        num_blocks, bs, kv_heads, head_dim = k_cache.shape
        heads = q.shape[1]
        k_cache.view(num_blocks * bs, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(num_blocks * bs, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        B, max_q, max_kv = meta.num_seqs, meta.max_q, meta.max_kv
        keys = k_cache[meta.block_tables].view(B, max_kv, kv_heads, head_dim).transpose(1, 2)
        values = v_cache[meta.block_tables].view(B, max_kv, kv_heads, head_dim).transpose(1, 2)
        if max_q == 1 and B == q.shape[0]:
            queries = q.view(B, 1, heads, head_dim).transpose(1, 2)  # pure decode: no padding
        else:
            queries = q.new_zeros(B * max_q, heads, head_dim)
            queries[meta.query_index] = q
            queries = queries.view(B, max_q, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=meta.mask, scale=scale, enable_gqa=heads != kv_heads
        )
        out = out.transpose(1, 2).reshape(B * max_q, heads, head_dim)
        return out if max_q == 1 and B == q.shape[0] else out[meta.query_index]


def new_token_slots(seqs: list[SeqSlice], block_size_tokens: int) -> np.ndarray:
    """The cache slot of each new token of the step, sequence after sequence (int64). Vectorised
    per sequence: a 16 x 512-token step is 8,192 slots, ~1 ms of host time a step as a Python
    loop, ~0.1 ms so."""
    bs = block_size_tokens
    parts = []
    for s in seqs:
        pos = np.arange(s.num_computed, s.num_computed + s.num_new)
        parts.append(np.asarray(s.block_ids, dtype=np.int64)[pos // bs] * bs + pos % bs)
    return np.concatenate(parts)


def decode_slots_and_tables(
    seqs: list[SeqSlice], block_size_tokens: int
) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """For a pure-decode step: each token's position, cache slot, its sequence's length (new
    token included) and block table cut to the blocks that length uses."""
    bs = block_size_tokens
    positions = [s.num_computed for s in seqs]
    slots = [s.block_ids[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
    seq_lens = [p + 1 for p in positions]
    tables = [s.block_ids[: -(-n // bs)] for s, n in zip(seqs, seq_lens)]
    return positions, slots, seq_lens, tables


class TritonPagedAttention:
    """CUDA: attention reads K/V in place through the block tables (no gather copy) with Triton
    kernels, a decode one and a varlen prefill one. `fused_ops` tells the model to use the fused
    Triton norm/RoPE/MLP kernels too (and to write K/V to the cache with RoPE)."""

    fused_ops = True

    def build_metadata(self, seqs: list[SeqSlice], block_size_tokens: int, device: torch.device) -> AttentionMetadata:
        bs = block_size_tokens
        slots: list[int] | np.ndarray
        if all(s.num_new == 1 for s in seqs):
            _, slots, seq_lens, tables = decode_slots_and_tables(seqs, bs)
            query_starts = None
        else:
            slots = new_token_slots(seqs, bs)
            seq_lens = [s.num_computed + s.num_new for s in seqs]
            tables = [s.block_ids[: -(-n // bs)] for s, n in zip(seqs, seq_lens)]
            starts = [0]
            for s in seqs:
                starts.append(starts[-1] + s.num_new)
            query_starts = to_device(starts, torch.int32, device)
        width = max(len(t) for t in tables)
        empty = torch.empty(0, device=device)
        return AttentionMetadata(
            slot_mapping=to_device(slots, torch.long, device),
            block_tables=to_device([t + [0] * (width - len(t)) for t in tables], torch.int32, device),
            query_index=empty.long(),
            mask=empty.bool(),
            num_seqs=len(seqs),
            max_q=max(s.num_new for s in seqs),
            max_kv=width * bs,
            seq_lens=to_device(seq_lens, torch.int32, device),
            query_starts=query_starts,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        gpu_kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention(q, k_cache, v_cache, meta, scale)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The Triton backend's attention once the step's K/V are in the cache: the decode kernel
    for a pure-decode step, the varlen prefill kernel otherwise."""
    assert meta.seq_lens is not None, "metadata of the Triton backend"
    if meta.query_starts is None:
        return gpu_kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
    return gpu_kernels.paged_prefill_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_starts, scale
    )


def attention_backend(device: torch.device) -> AttentionBackend:
    """The backend for a device: the Triton paged kernels on CUDA when Triton is there, else
    the portable SDPA path."""
    if device.type == "cuda" and gpu_kernels.triton_available():
        return TritonPagedAttention()
    return SdpaPagedAttention()
