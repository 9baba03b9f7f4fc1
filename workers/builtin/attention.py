"""Attention over the paged KV cache for a mixed batch of prefill chunks and decodes.

The portable path gathers each sequence's blocks into a padded [batch, kv_len] view and runs
torch SDPA with a causal-with-offset mask. A GPU path (flex attention over block tables, or a
Triton paged kernel) implements the same two methods and is picked by `attention_backend()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


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
        slots: list[int] = []
        query_index: list[int] = []
        tables: list[list[int]] = []
        starts: list[int] = []
        kv_lens: list[int] = []
        for b, s in enumerate(seqs):
            ids = s.block_ids
            for pos in range(s.num_computed, s.num_computed + s.num_new):
                slots.append(ids[pos // bs] * bs + pos % bs)
            query_index.extend(range(b * max_q, b * max_q + s.num_new))
            used = ids[: max_blocks]
            tables.append(used + [0] * (max_blocks - len(used)))
            starts.append(s.num_computed)
            kv_lens.append(s.num_computed + s.num_new)
        max_kv = max_blocks * bs
        q_pos = torch.arange(max_q).view(1, max_q, 1) + torch.tensor(starts).view(num_seqs, 1, 1)
        kv_pos = torch.arange(max_kv).view(1, 1, max_kv)
        # Causal with each sequence's offset; padded query rows still see key 0, so no row is
        # fully masked (that would make SDPA return NaN).
        mask = (kv_pos <= q_pos) & (kv_pos < torch.tensor(kv_lens).view(num_seqs, 1, 1))
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            block_tables=torch.tensor(tables, dtype=torch.long, device=device),
            query_index=torch.tensor(query_index, dtype=torch.long, device=device),
            mask=mask.unsqueeze(1).to(device),
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


def attention_backend(device: torch.device) -> AttentionBackend:
    """The backend for a device. Only the portable one exists yet; a CUDA paged kernel goes here."""
    return SdpaPagedAttention()
