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
        # The disk thread finishes its oldest writes; False: they failed.
        st.tuples(st.just("written"), st.tuples(st.integers(0, 4), st.booleans())),
    ),
    max_size=60,
)


class FakeWriter:
    """The disk thread, driven by the test: writes finish only when told (kvbm.tiered.DiskWrites)."""

    def __init__(self) -> None:
        self.queued: list[int] = []
        self.finished: list[tuple[int, bool]] = []

    def completed(self) -> list[tuple[int, bool]]:
        out, self.finished = self.finished, []
        return out


@settings(max_examples=150, deadline=None)
@given(steps=STEPS, host=st.integers(0, 5), disk=st.integers(0, 8), queue=st.integers(1, 4), asynchronous=st.booleans())
def test_capacity_and_events_hold_under_churn(steps: list[tuple[str, object]], host: int, disk: int, queue: int,
                                              asynchronous: bool) -> None:
    """Whatever the order of evictions, admissions and write completions: capacities hold,
    writes in flight never pass the queue's bound, a pin outlives its plan only while a write
    reads its entry (a host slot being written ahead; a file being written), the events replay
    to exactly the tiers' contents less the files still being written, and a lookup never finds
    such a file. (A block written straight from the device may meanwhile be offloaded to the
    host again: that host entry is no write's source, so it is not pinned.)"""
    events: list[KvEventData] = []
    writer = FakeWriter() if asynchronous else None
    cache = TieredCache(KvbmConfig(host_blocks=host, disk_blocks=disk, disk_queue_blocks=queue), BLOCK_BYTES,
                        events.append, disk_writes=writer)
    device_id = 0
    for kind, arg in steps:
        if kind == "evict":
            hashes = list(arg)  # type: ignore[call-overload]
            cache.evicted([EvictedBlock(device_id + i, h, None) for i, h in enumerate(hashes)])
            device_id += len(hashes)
        elif kind == "admit":
            hashes = list(arg)  # type: ignore[call-overload]
            hits = cache.lookup(hashes, 0)
            assert [h.block_hash for h in hits] == hashes[: len(hits)]
            assert all(h.entry.ref_count > 0 for h in hits)
            assert not any(h.tier == "disk" and h.block_hash in writer.queued for h in hits) if writer else True
            cache.onboard(hashes, 0, hits, list(range(len(hits))))
        elif writer is not None:
            n, ok = arg  # type: ignore[misc]
            done, writer.queued = writer.queued[:n], writer.queued[n:]
            writer.finished += [(h, ok) for h in done]
        plan = cache.take_plan()
        if writer is not None:
            writer.queued += [op.block_hash for op in plan.writes]
            writer.queued += [op.block_hash for op in plan.offloads if op.tier == "disk"]
        cache.finish(plan)
        writing = cache.writing
        assert len(writing) <= queue
        assert set(writer.queued) <= writing if writer is not None else True
        for tier in cache.tiers:
            assert len(tier) <= tier.capacity_blocks
        if cache.host is not None:
            # Writes planned or in flight whose source is a host slot (not a device block).
            from_host = {h for h, (entry, _) in cache._writing.items() if entry is not None}
            assert from_host <= writing
            assert all(e.ref_count == (e.block_hash in from_host) for e in cache.host)
        if cache.disk is not None:
            assert all(e.ref_count == (e.block_hash in writing) for e in cache.disk)
        held = replay(events)
        assert held["host"] == ({e.block_hash for e in cache.host} if cache.host else set())
        assert held["disk"] == ({e.block_hash for e in cache.disk} - writing if cache.disk else set())


def test_host_blocks_are_written_ahead_so_evicting_them_costs_nothing() -> None:
    events: list[KvEventData] = []
    cache = TieredCache(KvbmConfig(host_blocks=2, disk_blocks=8), BLOCK_BYTES, events.append)
    cache.evicted([EvictedBlock(0, 10, None), EvictedBlock(1, 11, 10)])
    plan = cache.take_plan()
    assert not plan.writes  # their slots are filled when this plan runs
    cache.finish(plan)
    plan = cache.take_plan()  # the next step's: the host is within the queue's length of full
    assert [(w.block_hash, w.host_slot) for w in plan.writes] == [(10, 0), (11, 1)]
    assert BlockStored(block_hashes=[10, 11], parent_hash=None, tier="disk") in events  # synchronous: written
    cache.finish(plan)
    cache.evicted([EvictedBlock(2, 12, 11)])  # host full: 10 is on disk already, its slot is free
    plan = cache.take_plan()
    assert not plan.writes and [(op.block_hash, op.slot) for op in plan.offloads] == [(12, 0)]
    cache.finish(plan)
    hits = cache.lookup([10, 11, 12, 13], 0)
    assert [(h.block_hash, h.tier) for h in hits] == [(10, "disk"), (11, "host"), (12, "host")]
    cache.release(hits)
    assert cache.stats.skipped == 0


def test_a_block_being_written_holds_its_slot_and_is_announced_once_written() -> None:
    """The disk thread is behind: the host's only block is being written and the writer's
    queue is full, so a new block finds no slot and is not kept (counted), not waited for; the
    file is no hit and not announced until its write is reported done."""
    events: list[KvEventData] = []
    writer = FakeWriter()
    cache = TieredCache(KvbmConfig(host_blocks=1, disk_blocks=8, disk_queue_blocks=1), BLOCK_BYTES, events.append,
                        disk_writes=writer)
    cache.evicted([EvictedBlock(0, 10, None)])
    cache.finish(cache.take_plan())
    plan = cache.take_plan()
    assert [w.block_hash for w in plan.writes] == [10]
    cache.finish(plan)
    assert not any(isinstance(e, BlockStored) and e.tier == "disk" for e in events)
    cache.evicted([EvictedBlock(1, 11, None)])
    assert not cache.has_pending() and cache.stats.skipped_by == {("host", "slots_busy"): 1}
    assert cache.host is not None and cache.host.get(10) is not None
    writer.finished = [(10, True)]
    cache.evicted([EvictedBlock(2, 12, None)])  # the write is done: 10's slot is free again
    assert events[-1] == BlockStored(block_hashes=[12], parent_hash=None, tier="host")
    assert BlockStored(block_hashes=[10], parent_hash=None, tier="disk") in events
    assert BlockRemoved(block_hashes=[10], tier="host") in events
    cache.finish(cache.take_plan())
    assert [(h.block_hash, h.tier) for h in cache.lookup([10], 0)] == [(10, "disk")]


def test_a_burst_larger_than_the_host_goes_on_to_disk() -> None:
    """Six blocks evicted at once into two host slots: the host's blocks are not on disk yet
    (they are written ahead a plan later), so the other four go straight to disk, announced
    once written."""
    events: list[KvEventData] = []
    writer = FakeWriter()
    cache = TieredCache(KvbmConfig(host_blocks=2, disk_blocks=8), BLOCK_BYTES, events.append, disk_writes=writer)
    cache.evicted([EvictedBlock(i, 20 - i, None) for i in range(6)])  # a sequence's tail first
    plan = cache.take_plan()
    assert [(op.block_hash, op.tier) for op in plan.offloads] == [(20, "host"), (19, "host"), (18, "disk"),
                                                                   (17, "disk"), (16, "disk"), (15, "disk")]
    cache.finish(plan)
    assert not any(isinstance(e, BlockStored) and e.tier == "disk" for e in events)
    writer.finished = [(h, True) for h in (18, 17, 16, 15)]
    hits = cache.lookup([15, 16, 17, 18, 19, 20], 0)
    assert [h.tier for h in hits] == ["disk"] * 4 + ["host"] * 2
    assert cache.stats.skipped == 0


def test_a_failed_write_is_forgotten_without_an_announcement() -> None:
    events: list[KvEventData] = []
    writer = FakeWriter()
    cache = TieredCache(KvbmConfig(host_blocks=1, disk_blocks=8), BLOCK_BYTES, events.append, disk_writes=writer)
    cache.evicted([EvictedBlock(0, 10, None)])
    cache.finish(cache.take_plan())
    cache.finish(cache.take_plan())  # the write of 10
    writer.finished = [(10, False)]
    cache.evicted([EvictedBlock(1, 11, None)])
    assert cache.disk is not None and 10 not in cache.disk
    assert not any(e.tier == "disk" for e in events)  # type: ignore[union-attr]
    assert cache.stats.skipped_by == {("disk", "write_failed"): 1}  # once: not again when 10 left the host


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
    assert cache.stats.skipped_by == {("host", "slots_busy"): 1}


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
    assert not cache.has_pending() and cache.stats.skipped_by == {("host", "policy"): 1}


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
        def start(self, hashes: list[int]) -> _Reads:
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


def test_usage_gauges_follow_the_tiers_after_each_plan() -> None:
    """The gauges are set only where usage changed (this runs after every step), so each
    change must still reach them, and a new registry gets everything."""
    from prometheus_client import CollectorRegistry

    from kvbm.metrics import KvbmMetrics

    cache = TieredCache(KvbmConfig(host_blocks=4, offload_cost=False), BLOCK_BYTES)
    registry = CollectorRegistry()
    cache.bind_metrics(KvbmMetrics(registry, "m"))

    def used() -> float | None:
        return registry.get_sample_value("dynamo_kvbm_blocks_used", {"model": "m", "tier": "host"})

    assert used() == 0 and registry.get_sample_value("dynamo_kvbm_blocks_total", {"model": "m", "tier": "host"}) == 4
    for first, want in ((0, 3), (3, 4), (7, 4)):
        cache.evicted([EvictedBlock(100 + h, h, h - 1 if h else None) for h in range(first, first + 3)])
        cache.finish(cache.take_plan())
        assert used() == want
    again = CollectorRegistry()
    cache.bind_metrics(KvbmMetrics(again, "m"))
    assert again.get_sample_value("dynamo_kvbm_blocks_used", {"model": "m", "tier": "host"}) == 4
