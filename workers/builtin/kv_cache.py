"""Paged KV cache tensors: per layer, K and V of shape [num_blocks, block_size, kv_heads,
head_dim]. Block ids come from kvbm.block_pool; a token's slot is block_id * block_size + offset."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.builtin.config import ModelConfig


@dataclass(slots=True)
class KVCache:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    num_blocks: int
    block_size_tokens: int

    @classmethod
    def allocate(
        cls, config: ModelConfig, num_blocks: int, block_size_tokens: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        shape = (num_blocks, block_size_tokens, config.num_kv_heads, config.head_dim)
        # Zeros, not empty: attention reads padded slots of a block (masked out), and masked
        # garbage that happens to be NaN would still poison the softmax (NaN * 0 = NaN).
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        return cls(k, v, num_blocks, block_size_tokens)

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def kv_bytes_per_block(config: ModelConfig, block_size_tokens: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return config.kv_elements_per_token * block_size_tokens * element


def num_blocks_for_bytes(config: ModelConfig, block_size_tokens: int, dtype: torch.dtype, kv_bytes: int) -> int:
    return max(0, kv_bytes // kv_bytes_per_block(config, block_size_tokens, dtype))
