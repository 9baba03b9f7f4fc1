"""Approximate mode: caches predicted from the router's own decisions, with TTL and LRU capacity."""

from __future__ import annotations

from dynamo.kv_hash import block_hashes
from router.approx import ApproxIndex

PROMPT = block_hashes(list(range(64)), 4)  # 16 blocks


def test_recorded_blocks_match_until_their_ttl() -> None:
    index = ApproxIndex(ttl_s=10.0, capacity_blocks=100)
    index.record(1, PROMPT[:8], now_s=0.0)
    assert index.find_matches(PROMPT, now_s=5.0) == {1: 8}
    index.record(1, PROMPT[:4], now_s=6.0)  # re-sent prefix: refreshed
    assert index.find_matches(PROMPT, now_s=10.0) == {1: 4}
    assert index.find_matches(PROMPT, now_s=16.0) == {}
    assert index.num_blocks() == 0


def test_capacity_evicts_least_recently_used() -> None:
    index = ApproxIndex(ttl_s=100.0, capacity_blocks=10)
    index.record(1, PROMPT[:8], now_s=0.0)
    index.record(1, PROMPT[:2], now_s=1.0)  # blocks 0-1 become the most recent
    other = block_hashes([7] * 16, 4)
    index.record(1, other, now_s=2.0)  # 4 new blocks: 2 oldest (blocks 2, 3) go
    assert len(index.blocks_of(1)) == 10
    assert index.find_matches(PROMPT, now_s=3.0) == {1: 2}
    assert index.find_matches(other, now_s=3.0) == {1: 4}


def test_workers_are_independent_and_removable() -> None:
    index = ApproxIndex(ttl_s=100.0, capacity_blocks=100)
    index.record(1, PROMPT, now_s=0.0)
    index.record(2, PROMPT[:3], now_s=0.0)
    assert index.find_matches(PROMPT, now_s=1.0) == {1: 16, 2: 3}
    index.remove_worker(1)
    assert index.find_matches(PROMPT, now_s=1.0) == {2: 3}
    assert index.workers() == {2}
