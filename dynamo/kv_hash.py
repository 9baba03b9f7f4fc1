"""The project's one block-hash function, shared by engines, router and KVBM.

A block's hash chains its parent's hash with its own token ids, so equal hashes mean equal
prefixes; a prefix match in the router is then a prefix hit in the engine. Only full blocks
are hashed: a partial last block is never shared.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from hashlib import blake2b

# Seed for the first block, so hashes never collide with an all-zero parent by accident.
_ROOT = (0x5EED_D7A3_0000_0001).to_bytes(8, "little")


def block_hash(parent_hash: int | None, block_token_ids: Sequence[int]) -> int:
    """Hash of one full block given the hash of the block before it (None for the first)."""
    return _digest(_parent_bytes(parent_hash), array("I", block_token_ids).tobytes())


def _parent_bytes(parent_hash: int | None) -> bytes:
    return _ROOT if parent_hash is None else parent_hash.to_bytes(8, "little")


def _digest(parent: bytes, tokens: bytes | memoryview) -> int:
    hasher = blake2b(parent, digest_size=8)
    hasher.update(tokens)
    # Signed 63-bit range keeps it a plain int in msgpack and in JSON-facing tools.
    return int.from_bytes(hasher.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def block_hashes(
    token_ids: Sequence[int], block_size_tokens: int, parent_hash: int | None = None
) -> list[int]:
    """Chained hashes of every full block of `token_ids`, in order: block_hash's chain, with the
    tokens packed once and each block hashed from a view of them (a quarter cheaper than a
    block_hash call per block; every prompt is hashed at admission and by the KV router)."""
    if block_size_tokens <= 0:
        raise ValueError(f"block_size_tokens must be positive, got {block_size_tokens}")
    full = len(token_ids) - len(token_ids) % block_size_tokens
    packed = memoryview(array("I", token_ids[:full]).tobytes())
    step = 4 * block_size_tokens  # bytes per block: array "I" is 4 bytes on every platform we build for
    out: list[int] = []
    parent = _parent_bytes(parent_hash)
    for start in range(0, 4 * full, step):
        h = _digest(parent, packed[start : start + step])
        out.append(h)
        parent = h.to_bytes(8, "little")
    return out
