"""KV layouts and the memory an agent moves: what both sides must agree on before a single
byte moves (block size, dtype, layers, KV heads, head dim, TP rank), with a clear error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from dynamo import errors
from dynamo.wire import KvLayoutSpec
from kvbm.layout import block_bytes

T = TypeVar("T")

class KvLayoutMismatch(errors.DynamoError):
    """The two workers' KV caches differ in shape or type: their blocks are not exchangeable."""

    code = "kv_layout_mismatch"


def layout_mismatches(local: KvLayoutSpec, peer: KvLayoutSpec) -> list[str]:
    """Fields that differ, as 'name: local X, peer Y'. TP rank must match too: with tensor
    parallelism each rank holds its own heads, so rank r only talks to rank r."""
    out = []
    for name in ("num_layers", "block_size_tokens", "num_kv_heads", "head_dim", "dtype", "block_order", "tp_size",
                 "tp_rank"):
        a, b = getattr(local, name), getattr(peer, name)
        if a != b:
            out.append(f"{name}: local {a}, peer {b}")
    return out


def check_compatible(local: KvLayoutSpec, peer: KvLayoutSpec) -> None:
    mismatches = layout_mismatches(local, peer)
    if mismatches:
        raise KvLayoutMismatch(
            "KV layouts of prefill and decode workers differ (" + "; ".join(mismatches) + "): run "
            "both roles with the same engine, model, dtype, --block-size and tensor parallelism "
            "(vLLM on CPUs keeps blocks in HND order, the built-in engine in NHD)"
        )


@dataclass(slots=True)
class KvMemory:
    """An engine's KV tensors as an agent sees them. `run` executes a function on the thread
    that owns the engine's torch calls, so copies never race a forward pass and never block
    the event loop."""

    k: list[Any]  # torch.Tensor per layer: [num_blocks, block_size, kv_heads, head_dim]
    v: list[Any]
    layout: KvLayoutSpec
    run: Callable[[Callable[[], T]], Awaitable[T]]

    @property
    def device(self) -> str:
        return str(self.k[0].device)
