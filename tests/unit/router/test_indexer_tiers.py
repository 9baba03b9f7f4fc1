"""KvIndex with KVBM tiers: device hits count 1, host and disk hits their configured fraction;
without lower-tier events (or weights) matching is the device-only count it always was."""

from __future__ import annotations

from dynamo.wire import AllBlocksCleared, BlockRemoved, BlockStored, KvCacheEvent
from router.cost import score_workers
from router.indexer import KvIndex
from router.load import LoadTracker

HASHES = list(range(100, 108))


def feed(index: KvIndex, worker: int, *events: object) -> None:
    for event in events:
        last = index.last_event_id(worker)
        index.apply_event(KvCacheEvent(worker_id=worker, event_id=0 if last is None else last + 1, data=event))  # type: ignore[arg-type]


def test_lower_tiers_count_a_fraction() -> None:
    index = KvIndex(tier_weights={"host": 0.5, "disk": 0.25})
    feed(index, 1, BlockStored(block_hashes=HASHES[:2]), BlockStored(block_hashes=HASHES[2:6], tier="host"))
    feed(index, 2, BlockStored(block_hashes=HASHES[:3]))
    feed(index, 3, BlockStored(block_hashes=HASHES, tier="disk"), BlockStored(block_hashes=HASHES[:1], tier="host"))
    assert index.find_matches(HASHES) == {1: 2 + 4 * 0.5, 2: 3, 3: 0.5 + 7 * 0.25}
    costs = {c.worker_id: c for c in score_workers([1, 2, 3], index.find_matches(HASHES), 8, 16, LoadTracker(), 1.0)}
    assert costs[1].logit < costs[2].logit  # 4 host blocks beat 1 more device block
    feed(index, 1, BlockRemoved(block_hashes=HASHES[2:6], tier="host"))
    feed(index, 3, AllBlocksCleared())
    assert index.find_matches(HASHES) == {1: 2, 2: 3}


def test_without_weights_lower_tiers_are_ignored() -> None:
    index = KvIndex()
    feed(index, 1, BlockStored(block_hashes=HASHES[:2]), BlockStored(block_hashes=HASHES[2:], tier="host"))
    assert index.find_matches(HASHES) == {1: 2}
    index.remove_worker(1)
    assert index.find_matches(HASHES) == {}
