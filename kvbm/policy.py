"""Which blocks evicted from the device are worth copying down: all of them, only re-used ones,
or only those whose prefix was requested often enough (a bounded per-hash frequency table)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvbm.config import OffloadPolicyName


class OffloadPolicy:
    """Per block hash: how many admitted requests' prompts contained it (`seen`) and how many
    of those were served it from a cache (`hits`). The table keeps the most recently seen
    `max_entries` hashes; a forgotten hash counts as never seen."""

    __slots__ = ("name", "min_hits", "max_entries", "_counts")

    def __init__(self, name: OffloadPolicyName, min_hits: int = 2, max_entries: int = 1 << 20) -> None:
        self.name = name
        self.min_hits = min_hits
        self.max_entries = max_entries
        self._counts: OrderedDict[int, list[int]] = OrderedDict()  # hash -> [seen, hits]

    def record(self, block_hashes: Sequence[int], cached_blocks: int) -> None:
        """A request with these prompt block hashes was admitted; its first `cached_blocks`
        came from a cache (device or lower tiers)."""
        if self.name == "all":
            return  # nothing to decide: skip the bookkeeping on the hot path
        counts = self._counts
        for i, h in enumerate(block_hashes):
            entry = counts.get(h)
            if entry is None:
                entry = counts[h] = [0, 0]
            else:
                counts.move_to_end(h)
            entry[0] += 1
            if i < cached_blocks:
                entry[1] += 1
        while len(counts) > self.max_entries:
            counts.popitem(last=False)

    def should_offload(self, block_hash: int) -> bool:
        if self.name == "all":
            return True
        entry = self._counts.get(block_hash)
        if entry is None:
            return False
        if self.name == "reused":
            return entry[1] >= 1
        return entry[0] >= self.min_hits
