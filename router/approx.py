"""Approximate mode (no KV events): predict each worker's cache from this router's own
decisions — the blocks of every request sent there, kept for a TTL, at most a capacity per
worker, least recently used first out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from router.indexer import KvIndex


class ApproxIndex:
    """Same `find_matches` contract as KvIndex, fed by `record` instead of events."""

    __slots__ = ("_index", "_touched", "_ttl_s", "_capacity_blocks")

    def __init__(self, ttl_s: float, capacity_blocks: int) -> None:
        if ttl_s <= 0 or capacity_blocks <= 0:
            raise ValueError("approximate mode needs a positive TTL and capacity")
        self._index = KvIndex()
        # Per worker: block hash -> last time it was sent there, oldest first. The TTL is the
        # same for every block, so the oldest entry always expires first.
        self._touched: dict[int, OrderedDict[int, float]] = {}
        self._ttl_s = ttl_s
        self._capacity_blocks = capacity_blocks

    def record(self, worker_id: int, block_hashes: Sequence[int], now_s: float) -> None:
        """The request with these blocks was sent to `worker_id`: it will cache them."""
        touched = self._touched.get(worker_id)
        if touched is None:
            touched = self._touched[worker_id] = OrderedDict()
        fresh: list[int] = []
        for h in block_hashes:
            if h in touched:
                touched.move_to_end(h)
            else:
                fresh.append(h)
            touched[h] = now_s
        self._index.store(worker_id, fresh)
        overflow = len(touched) - self._capacity_blocks
        if overflow > 0:
            self._index.remove(worker_id, [touched.popitem(last=False)[0] for _ in range(overflow)])

    def find_matches(self, block_hashes: Sequence[int], now_s: float) -> dict[int, int]:
        self.expire(now_s)
        return self._index.find_matches(block_hashes)

    def expire(self, now_s: float) -> None:
        deadline = now_s - self._ttl_s
        for worker_id, touched in self._touched.items():
            expired: list[int] = []
            while touched:
                h, at = next(iter(touched.items()))
                if at > deadline:
                    break
                touched.popitem(last=False)
                expired.append(h)
            if expired:
                self._index.remove(worker_id, expired)

    def forget(self, worker_id: int, block_hashes: Sequence[int]) -> None:
        """The worker says it no longer holds these blocks: stop predicting them there."""
        touched = self._touched.get(worker_id)
        if touched is None:
            return
        gone = [h for h in block_hashes if touched.pop(h, None) is not None]
        if gone:
            self._index.remove(worker_id, gone)

    def remove_worker(self, worker_id: int) -> None:
        self._touched.pop(worker_id, None)
        self._index.remove_worker(worker_id)

    def workers(self) -> set[int]:
        return set(self._touched)

    def num_blocks(self) -> int:
        return self._index.num_blocks()

    def blocks_of(self, worker_id: int) -> frozenset[int]:
        return self._index.blocks_of(worker_id)
