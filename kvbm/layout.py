"""What the lower tiers and the transfer layer need to know about one engine's KV layout
(dynamo.wire.KvLayoutSpec, the one type for it): a block's size, the fingerprint that names the
layout, and the header that names a block on disk. A block's bytes are only reusable by an
engine with the same layers, heads, block size and dtype.

One block = K and V of every layer: [2 * num_layers, block_size_tokens * num_kv_heads *
head_dim] elements of `dtype` (K of layer 0, V of layer 0, K of layer 1, ...)."""

from __future__ import annotations

import struct
from hashlib import blake2b

from dynamo.wire import KvLayoutSpec

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "uint8": 1}
MAGIC = b"DYNKVB1\0"
# magic, layout fingerprint, block hash, parent hash (-1: none), payload bytes
_HEADER = struct.Struct("<8s16sqqQ")
HEADER_BYTES = _HEADER.size


def elements_per_layer(layout: KvLayoutSpec) -> int:
    """Elements of K (or V) of one layer in one block."""
    return layout.block_size_tokens * layout.num_kv_heads * layout.head_dim


def block_bytes(layout: KvLayoutSpec) -> int:
    """Bytes of one block: K and V of every layer."""
    element = DTYPE_BYTES.get(layout.dtype)
    if element is None:
        raise ValueError(f"unknown KV dtype {layout.dtype!r}")
    return 2 * layout.num_layers * elements_per_layer(layout) * element


def fingerprint(layout: KvLayoutSpec) -> str:
    """16 hex digits naming the layout: the disk tier's subdirectory and header check."""
    text = f"{layout.num_layers}/{layout.block_size_tokens}/{layout.num_kv_heads}/{layout.head_dim}/{layout.dtype}"
    if layout.block_order != "NHD":  # appended only here: existing NHD directories keep their names
        text += f"/{layout.block_order}"
    return blake2b(text.encode(), digest_size=8).hexdigest()


def block_header(layout: KvLayoutSpec, block_hash: int, parent_hash: int | None) -> bytes:
    parent = -1 if parent_hash is None else parent_hash
    return _HEADER.pack(MAGIC, fingerprint(layout).encode(), block_hash, parent, block_bytes(layout))


def parse_block_header(layout: KvLayoutSpec, data: bytes) -> tuple[int, int | None] | None:
    """(block hash, parent hash) if `data` starts with a header of this layout, else None."""
    if len(data) < HEADER_BYTES:
        return None
    magic, fp, h, parent, size = _HEADER.unpack_from(data)
    if magic != MAGIC or fp != fingerprint(layout).encode() or size != block_bytes(layout):
        return None
    return h, None if parent < 0 else parent
