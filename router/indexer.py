"""The global KV index: which workers hold which blocks (by the project's chained block hash),
fed by the workers' numbered KV events, answering "how many leading blocks of this prompt does
each worker hold"."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence

from dynamo.wire import AllBlocksCleared, BlockRemoved, BlockStored, KvCacheEvent, KvTier


class EventOutcome(enum.Enum):
    APPLIED = "applied"
    STALE = "stale"  # a duplicate or older event: ignored
    GAP = "gap"  # events were lost before this one: applied, but the worker needs a resync


class KvIndex:
    """Block hash -> a bitmask of the workers holding it, plus each worker's own block set so
    removing or clearing a worker costs O(its blocks), not O(index).

    Each worker gets a bit (a slot, reused after the worker is removed), so intersecting the
    holders of consecutive blocks is one integer AND. Because hashes are chained, a block's
    hash names its whole prefix, so a flat dict is a radix tree in disguise: matching walks the
    prompt's hashes once, keeping the workers that still hold every block so far.
    """

    __slots__ = (
        "_holders",
        "_blocks",
        "_slot_of",
        "_worker_at",
        "_free_slots",
        "_last_event_id",
        "_needs_resync",
        "_tiers",
        "_lower",
        "_lower_blocks",
    )

    def __init__(
        self, tiers: Iterable[KvTier] = ("device",), tier_weights: Mapping[KvTier, float] | None = None
    ) -> None:
        self._holders: dict[int, int] = {}
        self._blocks: dict[int, set[int]] = {}
        self._slot_of: dict[int, int] = {}
        self._worker_at: list[int] = []
        self._free_slots: list[int] = []
        self._last_event_id: dict[int, int] = {}
        self._needs_resync: set[int] = set()
        # Only blocks a worker can serve without a transfer count as cached; events for other
        # tiers still advance the worker's event sequence.
        self._tiers = frozenset(tiers)
        # KVBM's lower tiers (host, disk), each with its weight: a block held only there counts
        # that fraction of a device block in find_matches, since it is onboarded, not
        # recomputed, but costs a copy. Heaviest first: a block counts its best tier.
        weights = sorted(((w, t) for t, w in (tier_weights or {}).items() if t not in self._tiers and w > 0), reverse=True)
        self._lower: list[tuple[KvTier, float, dict[int, int]]] = [(t, w, {}) for w, t in weights]
        self._lower_blocks: dict[KvTier, dict[int, set[int]]] = {t: {} for _, t in weights}

    # ------------------------------------------------------------------------------ queries

    def find_matches(self, block_hashes: Sequence[int]) -> dict[int, int]:
        """Per worker, how many leading blocks of `block_hashes` it holds (workers with none
        are absent). O(prompt blocks): one dict lookup and one AND per block."""
        if not block_hashes:
            return {}
        if any(holders for _, _, holders in self._lower):
            return self._find_weighted(block_hashes)  # type: ignore[return-value]
        get = self._holders.get
        active = get(block_hashes[0], 0)
        if not active:
            return {}
        dropped: list[tuple[int, int]] = []  # (workers that stopped matching, their depth)
        depth = 1
        for h in block_hashes[1:]:
            still = active & get(h, 0)
            if still != active:
                if not still:
                    break
                dropped.append((active ^ still, depth))
                active = still
            depth += 1
        scores: dict[int, int] = {}
        worker_at = self._worker_at
        dropped.append((active, depth))
        for mask, matched in dropped:
            while mask:
                low = mask & -mask
                scores[worker_at[low.bit_length() - 1]] = matched
                mask ^= low
        return scores

    def workers(self) -> set[int]:
        """Workers the index has heard from (with or without blocks)."""
        return set(self._last_event_id) | set(self._blocks)

    def blocks_of(self, worker_id: int) -> frozenset[int]:
        return frozenset(self._blocks.get(worker_id, ()))

    def num_blocks(self) -> int:
        """Distinct block hashes held by any worker."""
        return len(self._holders)

    def num_entries(self) -> int:
        """(worker, block) pairs: the index's real size."""
        return sum(len(blocks) for blocks in self._blocks.values())

    def last_event_id(self, worker_id: int) -> int | None:
        return self._last_event_id.get(worker_id)

    def needs_resync(self, worker_id: int) -> bool:
        return worker_id in self._needs_resync

    # ------------------------------------------------------------------------------ updates

    def apply_event(self, event: KvCacheEvent) -> EventOutcome:
        """Apply one worker event in that worker's sequence order.

        An event older than the last applied one is ignored. Event id 0 after a later id means
        the worker's publisher restarted: its state starts over. A jump past the next id means
        events were lost: the event is applied anyway (it is still true) and the worker is
        marked for resync until its AllBlocksCleared arrives, which a snapshot starts with and
        which makes the following state exact again.
        """
        worker = event.worker_id
        last = self._last_event_id.get(worker)
        outcome = EventOutcome.APPLIED
        if last is not None and event.event_id <= last:
            if event.event_id != 0:
                return EventOutcome.STALE
            # A restarted publisher: its engine starts over too.
            self.clear_worker(worker)
            self._needs_resync.discard(worker)
        elif (last is None and event.event_id != 0) or (last is not None and event.event_id != last + 1):
            outcome = EventOutcome.GAP
        self._last_event_id[worker] = event.event_id

        data = event.data
        if isinstance(data, BlockStored):
            if data.tier in self._tiers:
                self.store(worker, data.block_hashes)
            elif data.tier in self._lower_blocks:
                self._store_lower(data.tier, worker, data.block_hashes)
        elif isinstance(data, BlockRemoved):
            if data.tier in self._tiers:
                self.remove(worker, data.block_hashes)
            elif data.tier in self._lower_blocks:
                self._remove_lower(data.tier, worker, data.block_hashes)
        elif isinstance(data, AllBlocksCleared):
            self.clear_worker(worker)
            self._needs_resync.discard(worker)
            return EventOutcome.APPLIED  # a clear is a full resync point, gap or not
        if outcome is EventOutcome.GAP:
            self._needs_resync.add(worker)
        return outcome

    def store(self, worker_id: int, block_hashes: Sequence[int]) -> None:
        bit = 1 << self._slot(worker_id)
        blocks = self._blocks.get(worker_id)
        if blocks is None:
            blocks = self._blocks[worker_id] = set()
        blocks.update(block_hashes)
        holders = self._holders
        get = holders.get
        for h in block_hashes:
            holders[h] = get(h, 0) | bit

    def remove(self, worker_id: int, block_hashes: Iterable[int]) -> None:
        blocks = self._blocks.get(worker_id)
        if not blocks:
            return
        # Set algebra runs in C; only blocks the worker really held reach the Python loop.
        present = blocks.intersection(block_hashes)
        if not present:
            return
        blocks -= present
        keep = ~(1 << self._slot_of[worker_id])
        holders = self._holders
        for h in present:
            rest = holders[h] & keep
            if rest:
                holders[h] = rest
            else:
                del holders[h]

    def clear_worker(self, worker_id: int) -> None:
        """Forget the worker's blocks; keep its event sequence."""
        for tier, per_worker in self._lower_blocks.items():
            if worker_id in per_worker:
                self._remove_lower(tier, worker_id, list(per_worker.pop(worker_id)))
        blocks = self._blocks.pop(worker_id, None)
        if not blocks:
            return
        keep = ~(1 << self._slot_of[worker_id])
        holders = self._holders
        for h in blocks:
            rest = holders[h] & keep
            if rest:
                holders[h] = rest
            else:
                del holders[h]

    def remove_worker(self, worker_id: int) -> None:
        """Forget the worker entirely (its lease ended); its slot is free for another."""
        self.clear_worker(worker_id)
        self._last_event_id.pop(worker_id, None)
        self._needs_resync.discard(worker_id)
        slot = self._slot_of.pop(worker_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    def _store_lower(self, tier: KvTier, worker_id: int, block_hashes: Sequence[int]) -> None:
        bit = 1 << self._slot(worker_id)
        self._lower_blocks[tier].setdefault(worker_id, set()).update(block_hashes)
        holders = next(h for t, _, h in self._lower if t == tier)
        for h in block_hashes:
            holders[h] = holders.get(h, 0) | bit

    def _remove_lower(self, tier: KvTier, worker_id: int, block_hashes: Iterable[int]) -> None:
        blocks = self._lower_blocks[tier].get(worker_id, set())
        keep = ~(1 << self._slot_of[worker_id]) if worker_id in self._slot_of else -1
        holders = next(h for t, _, h in self._lower if t == tier)
        for h in block_hashes:
            blocks.discard(h)
            rest = holders.get(h, 0) & keep
            if rest:
                holders[h] = rest
            else:
                holders.pop(h, None)

    def _find_weighted(self, block_hashes: Sequence[int]) -> dict[int, float]:
        """find_matches with lower tiers: per worker, over the leading blocks it holds in any
        tier, the sum of each block's best tier weight (device 1)."""
        device = self._holders.get
        lower = [(holders.get, weight) for _, weight, holders in self._lower]
        worker_at = self._worker_at
        scores: dict[int, float] = {}
        active = -1
        for h in block_hashes:
            tiers = [(device(h, 0), 1.0)] + [(get(h, 0), w) for get, w in lower]
            union = 0
            for mask, _ in tiers:
                union |= mask
            active &= union
            if not active:
                break
            left = active
            for mask, weight in tiers:
                credited = left & mask
                left ^= credited
                while credited:
                    low = credited & -credited
                    worker = worker_at[low.bit_length() - 1]
                    scores[worker] = scores.get(worker, 0.0) + weight
                    credited ^= low
                if not left:
                    break
        return scores

    def _slot(self, worker_id: int) -> int:
        slot = self._slot_of.get(worker_id)
        if slot is None:
            if self._free_slots:
                slot = self._free_slots.pop()
                self._worker_at[slot] = worker_id
            else:
                slot = len(self._worker_at)
                self._worker_at.append(worker_id)
            self._slot_of[worker_id] = slot
        return slot
