"""The shape of one KV block as the lower tiers store it, and the header that names it on disk:
a block's bytes are only reusable by an engine with the same layers, heads, block size and dtype."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from hashlib import blake2b

_DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}
MAGIC = b"DYNKVB1\0"
# magic, layout fingerprint, block hash, parent hash (-1: none), payload bytes
_HEADER = struct.Struct("<8s16sqqQ")
HEADER_BYTES = _HEADER.size


@dataclass(frozen=True, slots=True)
class KvLayout:
    """One block = K and V of every layer: [2 * num_layers, block_size_tokens * num_kv_heads *
    head_dim] elements of `dtype` (K of layer 0, V of layer 0, K of layer 1, ...)."""

    num_layers: int
    block_size_tokens: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without "torch."

    @property
    def elements_per_layer(self) -> int:
        return self.block_size_tokens * self.num_kv_heads * self.head_dim

    @property
    def block_bytes(self) -> int:
        return 2 * self.num_layers * self.elements_per_layer * _DTYPE_BYTES[self.dtype]

    @property
    def fingerprint(self) -> str:
        """16 hex digits naming the layout: the disk tier's subdirectory and header check."""
        text = f"{self.num_layers}/{self.block_size_tokens}/{self.num_kv_heads}/{self.head_dim}/{self.dtype}"
        return blake2b(text.encode(), digest_size=8).hexdigest()

    def header(self, block_hash: int, parent_hash: int | None) -> bytes:
        parent = -1 if parent_hash is None else parent_hash
        return _HEADER.pack(MAGIC, self.fingerprint.encode(), block_hash, parent, self.block_bytes)

    def parse_header(self, data: bytes) -> tuple[int, int | None] | None:
        """(block hash, parent hash) if `data` starts with a header of this layout, else None."""
        if len(data) < HEADER_BYTES:
            return None
        magic, fingerprint, h, parent, size = _HEADER.unpack_from(data)
        if magic != MAGIC or fingerprint != self.fingerprint.encode() or size != self.block_bytes:
            return None
        return h, None if parent < 0 else parent
