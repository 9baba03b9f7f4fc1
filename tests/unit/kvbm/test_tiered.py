"""TieredCache: capacities hold under churn (hypothesis, against a set-based model of what each
tier must hold), events replay to the tiers' contents, plans pin what they touch, policies."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo.wire import BlockRemoved, BlockStored, KvEventData
from kvbm.block_pool import EvictedBlock
from kvbm.config import KvbmConfig
from kvbm.policy import OffloadPolicy
from kvbm.tiered import TieredCache

BLOCK_BYTES = 1000


def replay(events: list[KvEventData]) -> dict[str, set[int]]:
    held: dict[str, set[int]] = {"host": set(), "disk": set()}
    for e in events:
        if isinstance(e, BlockStored):
            held[e.tier].update(e.block_hashes)
        elif isinstance(e, BlockRemoved):
            held[e.tier].difference_update(e.block_hashes)
    return held


STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("evict"), st.lists(st.integers(0, 40), min_size=1, max_size=6, unique=True)),
        st.tuples(st.just("admit"), st.lists(st.integers(0, 40), min_size=1, max_size=6, unique=True)),
    ),
    max_size=60,
)


@settings(max_examples=100, deadline=None)
@given(steps=STEPS, host=st.integers(0, 5), disk=st.integers(0, 8), queue=st.integers(1, 4))
def test_capacity_and_events_hold_under_churn(steps: list[tuple[str, list[int]]], host: int, disk: int, queue: int) -> None:
    events: list[KvEventData] = []
    cache = TieredCache(KvbmConfig(host_blocks=host, disk_blocks=disk, disk_queue_blocks=queue), BLOCK_BYTES, events.append)
    device_id = 0
    for kind, hashes in steps:
        if kind == "evict":
            cache.evicted([EvictedBlock(device_id + i, h, None) for i, h in enumerate(hashes)])
            device_id += len(hashes)
        else:
            hits = cache.lookup(hashes, 0)
            assert [h.block_hash for h in hits] == hashes[: len(hits)]
            assert all(h.entry.ref_count > 0 for h in hits)
            cache.onboard(hashes, 0, hits, list(range(len(hits))))
        plan = cache.take_plan()
        assert len(plan.spills) + sum(op.tier == "disk" for op in plan.offloads) <= queue
        cache.finish(plan)
        for tier in cache.tiers:
            assert len(tier) <= tier.capacity_blocks
            assert all(e.ref_count == 0 for e in tier)
        held = replay(events)
        assert held["host"] == ({e.block_hash for e in cache.host} if cache.host else set())
        assert held["disk"] == ({e.block_hash for e in cache.disk} if cache.disk else set())


def test_eviction_from_host_spills_to_disk_and_onboard_prefers_host() -> None:
    cache = TieredCache(KvbmConfig(host_blocks=2, disk_blocks=8), BLOCK_BYTES)
    cache.evicted([EvictedBlock(0, 10, None), EvictedBlock(1, 11, 10)])
    cache.finish(cache.take_plan())
    cache.evicted([EvictedBlock(2, 12, 11)])  # host full: 10 spills to disk
    plan = cache.take_plan()
    assert [(s.block_hash, s.host_slot) for s in plan.spills] == [(10, 1)] or [s.block_hash for s in plan.spills] == [10]
    assert plan.offloads[0].slot == plan.spills[0].host_slot  # the slot is reused after its spill
    cache.finish(plan)
    hits = cache.lookup([10, 11, 12, 13], 0)
    assert [(h.block_hash, h.tier) for h in hits] == [(10, "disk"), (11, "host"), (12, "host")]
    cache.release(hits)


def test_pinned_lookups_survive_evictions_in_the_same_plan() -> None:
    cache = TieredCache(KvbmConfig(host_blocks=1), BLOCK_BYTES)
    cache.evicted([EvictedBlock(0, 10, None)])
    cache.finish(cache.take_plan())
    hits = cache.lookup([10], 0)
    cache.evicted([EvictedBlock(1, 11, None)])  # host full and its only block pinned: skipped
    assert 10 in cache.host  # type: ignore[operator]
    cache.onboard([10], 0, hits, [5])
    plan = cache.take_plan()
    assert [op.device_block for op in plan.onboards] == [5] and not plan.offloads
    cache.finish(plan)
    assert cache.stats.skipped == 1


def test_offload_policies() -> None:
    reused = OffloadPolicy("reused")
    reused.record([1, 2, 3], cached_blocks=1)
    assert reused.should_offload(1) and not reused.should_offload(2)
    freq = OffloadPolicy("frequency", min_hits=2)
    freq.record([1, 2], 0)
    freq.record([1], 0)
    assert freq.should_offload(1) and not freq.should_offload(2) and not freq.should_offload(9)
    assert OffloadPolicy("all").should_offload(9)
    cache = TieredCache(KvbmConfig(host_blocks=4, offload_policy="reused"), BLOCK_BYTES)
    cache.evicted([EvictedBlock(0, 7, None)])
    assert not cache.has_pending() and cache.stats.skipped == 1


class _Reads:
    def __init__(self, hashes: list[int], readable: set[int]) -> None:
        self.hashes, self.readable, self.hits, self.done, self.closed = hashes, readable, [], False, False

    def staged(self, block_hash: int) -> object:
        return ("row", block_hash) if self.done and block_hash in self.readable else None

    def close(self) -> None:
        self.closed = True


def test_disk_hits_are_read_before_admission_and_stop_at_the_first_unread_block() -> None:
    events: list[KvEventData] = []
    cache = TieredCache(KvbmConfig(host_blocks=2, disk_blocks=8), BLOCK_BYTES, events.append)
    cache.adopt_disk([(1, None), (2, 1), (3, 2)])
    started: list[_Reads] = []

    class Reader:
        def start(self, hashes: list[int], defer: bool = False) -> _Reads:
            started.append(_Reads(list(hashes), readable={1, 2}))
            return started[-1]

    first = cache.lookup([1, 2, 3], 0)
    assert cache.start_reads(first) is None  # no reader: admit now
    cache.release(first)
    cache.reader = Reader()  # type: ignore[assignment]
    reads = cache.start_reads(cache.lookup([1, 2, 3], 0))
    assert reads is started[0] and reads.hashes == [1, 2, 3]
    assert cache.disk is not None and all(cache.disk.get(h).ref_count == 1 for h in (1, 2, 3))  # type: ignore[union-attr]
    reads.done = True  # type: ignore[attr-defined]
    hits = cache.lookup_staged([1, 2, 3], 0, reads)  # type: ignore[arg-type]
    assert [(h.block_hash, h.staged) for h in hits] == [(1, ("row", 1)), (2, ("row", 2))]
    cache.onboard([1, 2, 3], 0, hits, [7, 8])
    cache.close_reads(reads)  # type: ignore[arg-type]
    assert reads.closed and 3 not in cache.disk  # unreadable: forgotten
    assert BlockRemoved(block_hashes=[3], tier="disk") in events
    plan = cache.take_plan()
    assert [(op.device_block, op.staged) for op in plan.onboards] == [(7, ("row", 1)), (8, ("row", 2))]
    cache.finish(plan)
    assert all(cache.disk.get(h).ref_count == 0 for h in (1, 2))  # type: ignore[union-attr]
