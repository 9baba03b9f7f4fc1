"""One lower KV tier's index: up to `capacity_blocks` blocks by the project's block hash, each in
a numbered slot, with reference counts (pinned blocks are never evicted) and an eviction order
that is plain LRU or segmented LRU (frequency-aware: blocks hit again are protected)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from kvbm.config import EvictionName


@dataclass(slots=True, eq=False)
class TierEntry:
    block_hash: int
    slot: int
    parent_hash: int | None
    ref_count: int = 0
    hits: int = 0


class TierIndex:
    """Segmented LRU ("slru"): a new block enters the probation segment; a hit moves it to the
    protected segment, which holds at most `protected_fraction` of the capacity (its LRU block
    is demoted back to probation's MRU end). Eviction takes probation's LRU block first, so a
    burst of blocks seen once cannot flush blocks that were re-used. "lru" uses probation only.
    Invariant: every entry is in exactly one segment and holds a distinct slot < capacity.

    Pinned blocks pile up at a segment's LRU end (those being written ahead to disk are the
    next victims by design), and every eviction would step over them again: the victim search
    sets them aside ("held", oldest first), logically still the oldest of their segment, until
    they are unpinned or hit; an unpinned one goes back with every held block younger than it,
    so the order is exactly what it would have been.
    """

    __slots__ = ("name", "capacity_blocks", "eviction", "_protected_cap", "_probation",
                 "_protected", "_held_probation", "_held_protected", "_free_slots")

    def __init__(
        self, name: str, capacity_blocks: int, eviction: EvictionName = "slru", protected_fraction: float = 0.8
    ) -> None:
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
        self.name = name
        self.capacity_blocks = capacity_blocks
        self.eviction = eviction
        self._protected_cap = int(capacity_blocks * protected_fraction) if eviction == "slru" else 0
        self._probation: OrderedDict[int, TierEntry] = OrderedDict()
        self._protected: OrderedDict[int, TierEntry] = OrderedDict()
        self._held_probation: OrderedDict[int, TierEntry] = OrderedDict()
        self._held_protected: OrderedDict[int, TierEntry] = OrderedDict()
        # Lowest slots first, so a fresh tier fills contiguously (fewer, larger copies).
        self._free_slots = list(range(capacity_blocks - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected) + len(self._held_probation) + len(self._held_protected)

    def __contains__(self, block_hash: int) -> bool:
        return (block_hash in self._probation or block_hash in self._protected
                or block_hash in self._held_probation or block_hash in self._held_protected)

    def __iter__(self) -> Iterator[TierEntry]:
        """Entries in eviction order (next victim first), pinned ones included."""
        yield from self._held_probation.values()
        yield from self._probation.values()
        yield from self._held_protected.values()
        yield from self._protected.values()

    def get(self, block_hash: int) -> TierEntry | None:
        return (self._probation.get(block_hash) or self._protected.get(block_hash)
                or self._held_probation.get(block_hash) or self._held_protected.get(block_hash))

    def touch(self, block_hash: int) -> TierEntry | None:
        """Record a hit: the block becomes most recently used (and protected under slru)."""
        entry = self._probation.pop(block_hash, None) or self._held_probation.pop(block_hash, None)
        if entry is None:
            entry = self._held_protected.pop(block_hash, None)
            if entry is not None:
                self._protected[block_hash] = entry
            else:
                entry = self._protected.get(block_hash)
                if entry is None:
                    return None
                self._protected.move_to_end(block_hash)
            entry.hits += 1
            return entry
        entry.hits += 1
        if self._protected_cap > 0:
            self._protected[block_hash] = entry
            while len(self._protected) + len(self._held_protected) > self._protected_cap:
                oldest = self._held_protected if self._held_protected else self._protected
                h, demoted = oldest.popitem(last=False)
                self._probation[h] = demoted
        else:
            self._probation[block_hash] = entry
        return entry

    def insert(self, block_hash: int, parent_hash: int | None) -> tuple[TierEntry | None, list[TierEntry]]:
        """Add a block, evicting unpinned blocks as needed: (its entry, the evicted entries).
        The entry is None when the block is already here or every block is pinned; the
        evicted ones are gone from the index and their slots are the new entry's to reuse."""
        if block_hash in self or self.capacity_blocks == 0:
            return None, []
        evicted: list[TierEntry] = []
        if not self._free_slots:
            victim = self._victim()
            if victim is None:
                return None, []
            self.remove(victim.block_hash)
            evicted.append(victim)
        entry = TierEntry(block_hash, self._free_slots.pop(), parent_hash)
        self._probation[block_hash] = entry
        return entry, evicted

    def remove(self, block_hash: int) -> TierEntry | None:
        for segment in (self._probation, self._protected, self._held_probation, self._held_protected):
            entry = segment.get(block_hash)
            if entry is not None:
                if entry.ref_count:
                    raise ValueError(f"block {block_hash:#x} is pinned in {self.name}")
                del segment[block_hash]
                self._free_slots.append(entry.slot)
                return entry
        return None

    def pin(self, entry: TierEntry) -> None:
        entry.ref_count += 1

    def unpin(self, entry: TierEntry) -> None:
        if entry.ref_count <= 0:
            raise ValueError(f"block {entry.block_hash:#x} unpinned more often than pinned")
        entry.ref_count -= 1
        if entry.ref_count == 0:
            self._return_held(entry.block_hash)

    def next_victim(self) -> TierEntry | None:
        """The entry insert() would evict next when the tier is full (None: all pinned)."""
        return self._victim()

    def _victim(self) -> TierEntry | None:
        for segment, held in ((self._probation, self._held_probation), (self._protected, self._held_protected)):
            while segment:
                block_hash = next(iter(segment))
                entry = segment[block_hash]
                if entry.ref_count == 0:
                    return entry
                held[block_hash] = segment.pop(block_hash)
        return None

    def _return_held(self, block_hash: int) -> None:
        """An unpinned held block back to its segment's LRU end, with the held blocks younger
        than it in front of the segment's own (all of them are older than those)."""
        for held, segment in ((self._held_probation, self._probation), (self._held_protected, self._protected)):
            if block_hash in held:
                keys = list(held)
                for h in reversed(keys[keys.index(block_hash):]):
                    segment[h] = held.pop(h)
                    segment.move_to_end(h, last=False)
                return
