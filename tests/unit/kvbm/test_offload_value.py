"""Offload or not (kvbm/offload_value.py) and its use by TieredCache.evicted: a tier whose
offloads are never read back takes only one eviction batch in eight once it is judged, one whose
reads cost more than recompute none until recompute gets dearer (counted as skipped for the cost
model, and from the first eviction, its offload cost still unmeasured); a tier whose blocks are
hit keeps taking every batch; nothing else is judged before recompute and the cost are measured,
the tier has taken as many offloads as it holds, or with the flag off."""

from __future__ import annotations

import itertools

import pytest

from kvbm.block_pool import EvictedBlock
from kvbm.config import KvbmConfig
from kvbm.offload_value import OffloadValue
from kvbm.tiered import DISK, HOST, TieredCache

BLOCK_BYTES = 1 << 20
TOKENS = 16


def test_value_against_cost() -> None:
    v = OffloadValue(min_offloads=100, explore_every=4)
    assert v.worth(HOST, 1e-3)  # nothing measured
    v.offloaded(HOST, 200)
    assert v.worth(HOST, 1e-3)  # no cost measured yet
    v.observe_cost("schedule", 2e-3, 100)  # 20 us a block
    v.observe_cost("execute", 1e-3, 100)  # + 10 us
    assert v.cost_s() == pytest.approx(30e-6)
    assert not v.worth(HOST, 1e-3)  # no hits: worth nothing
    assert v.worth(HOST, 1e-3, judge_after=300)  # not judged before 300 offloads
    # Until judged, one hit per offload: a hit saving 20 us cannot repay a 30 us offload.
    assert not v.worth(HOST, 20e-6, judge_after=300)
    v.hit(HOST, 10)  # 10 hits in 200 offloads: 5% x 1 ms = 50 us > 30 us
    assert v.worth(HOST, 1e-3)
    assert not v.worth(HOST, 0.5e-3)  # 25 us < 30 us
    # Reads lose: worth only what it costs, nothing while that is unmeasured (a disk probed
    # dearer than recompute takes not even the first batch), all when it is measured free.
    free = OffloadValue()
    assert not v.worth(DISK, -1e-3) and not free.worth(DISK, -1e-3)
    free.observe_cost("schedule", 0.0, 8)
    assert free.worth(DISK, -1e-3)
    assert not any(v.keep_batch(DISK, -1e-3) for _ in range(16))  # nor explored: hits would be declined
    kept = [v.keep_batch(HOST, 0.5e-3) for _ in range(8)]
    assert kept == [False, False, False, True] * 2  # one batch in four explores
    assert OffloadValue(enabled=False).worth(HOST, -1.0)


def test_an_offload_costs_what_the_batches_cost_over_the_blocks_they_took() -> None:
    v = OffloadValue()
    # Batches of one block at 200 us and of 31 blocks at 420 us: 20 us a block in all, not the
    # ~100 us an average of the two batches' ratios would make it.
    for _ in range(200):
        v.observe_cost("execute", 200e-6, 1)
        v.observe_cost("execute", 420e-6, 31)
    assert v.cost_s() == pytest.approx(20e-6, rel=0.1)
    v.observe_cost("schedule", 5e-6, 1)  # the parts add
    assert v.cost_s() == pytest.approx(25e-6, rel=0.1)


class Clock:
    """The cache's clock: each reading advances it, so every evicted() call costs time."""

    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


def cache_with(config: KvbmConfig, clock_step_s: float = 1e-3) -> TieredCache:
    cache = TieredCache(config, BLOCK_BYTES, block_size_tokens=TOKENS)
    cache.clock = Clock(clock_step_s)
    for tokens in (128, 256, 512, 1024):  # recompute measured: 10 us a token, 160 us a block
        cache.observe_step(tokens, tokens * 10e-6)
    return cache


def evict_batches(cache: TieredCache, batches: int, size: int = 8, first_hash: int = 1) -> tuple[list[int], list[int]]:
    """Evict `batches` batches of fresh blocks (hashes from `first_hash` on): per batch how
    many were offloaded, and how many writes ahead to disk its plan carried."""
    hashes = itertools.count(first_hash)
    offloaded: list[int] = []
    writes: list[int] = []
    for _ in range(batches):
        cache.evicted([EvictedBlock(i, next(hashes), None) for i in range(size)])
        plan = cache.take_plan()
        offloaded.append(len(plan.offloads))
        writes.append(len(plan.writes))
        cache.finish(plan)
    return offloaded, writes


def test_a_host_tier_never_read_back_takes_one_batch_in_eight() -> None:
    cache = cache_with(KvbmConfig(host_blocks=64))  # 1 ms a batch of 8: 125 us an offload
    counts, _ = evict_batches(cache, 64)
    # Judged once it has taken its capacity (64 blocks) and 256 offloads: 32 batches of 8.
    assert counts[:32] == [8] * 32
    assert counts[32:] == ([0] * 7 + [8]) * 4
    assert cache.stats.skipped_by[(HOST, "cost_model")] == 28 * 8
    assert cache.offload_value.snapshot()["host_hits_per_offload"] == 0.0


def test_a_host_tier_whose_blocks_are_hit_keeps_every_batch() -> None:
    cache = cache_with(KvbmConfig(host_blocks=64), clock_step_s=1e-4)  # 12.5 us an offload
    ids = itertools.count(1)
    for _ in range(64):
        hashes = [next(ids) for _ in range(8)]
        cache.evicted([EvictedBlock(i, h, None) for i, h in enumerate(hashes)])
        plan = cache.take_plan()
        assert len(plan.offloads) == 8
        cache.finish(plan)
        # A quarter of them come back: 25% x ~140 us saved a hit > 12.5 us an offload.
        hits = cache.lookup(hashes[:2], 0)
        cache.onboard(hashes[:2], 0, hits, [40, 41])
        cache.finish(cache.take_plan())
    assert cache.stats.skipped_by[(HOST, "cost_model")] == 0


def test_offloads_are_kept_while_cost_or_recompute_is_unmeasured_or_the_flag_is_off() -> None:
    free = TieredCache(KvbmConfig(host_blocks=64), BLOCK_BYTES, block_size_tokens=TOKENS)
    free.clock = lambda: 0.0  # a simulated clock (the mocker's): upkeep takes no time
    for tokens in (128, 256):
        free.observe_step(tokens, tokens * 10e-6)
    assert evict_batches(free, 64)[0] == [8] * 64
    unmeasured = TieredCache(KvbmConfig(host_blocks=64), BLOCK_BYTES, block_size_tokens=TOKENS)
    unmeasured.clock = Clock(1e-3)
    assert evict_batches(unmeasured, 64)[0] == [8] * 64  # no prefill step yet: recompute unknown
    off = cache_with(KvbmConfig(host_blocks=64, offload_cost=False))
    assert evict_batches(off, 64)[0] == [8] * 64


def test_a_disk_slow_to_start_but_fast_to_stream_keeps_its_writes() -> None:
    """What a disk hit saves is weighed with its read's start shared by the blocks read along
    with it: 2 ms to start reads of 64 blocks, then 10 us a block, against 160 us of recompute."""
    cache = cache_with(KvbmConfig(host_blocks=8, disk_blocks=256, disk_queue_blocks=4), clock_step_s=1e-4)
    for blocks in (32, 96, 64, 48, 80):
        cache.observe_read(DISK, blocks * BLOCK_BYTES, 2e-3 + blocks * 10e-6)
    _, writes = evict_batches(cache, 80, size=4)
    assert sum(n > 0 for n in writes) >= 30
    assert cache.stats.skipped_by[(DISK, "cost_model")] == 0


def test_a_disk_slower_than_recompute_gets_no_writes_until_recompute_gets_dearer() -> None:
    def run(offload_cost: bool) -> tuple[TieredCache, list[int]]:
        config = KvbmConfig(host_blocks=8, disk_blocks=256, disk_queue_blocks=4, offload_cost=offload_cost)
        cache = cache_with(config, clock_step_s=1e-4)
        # Disk reads measured at 0.1 GB/s: 10 ms a block against 160 us of recompute.
        cache.observe_read(DISK, BLOCK_BYTES, BLOCK_BYTES / 0.1e9)
        _, writes = evict_batches(cache, 80, size=4)
        return cache, writes

    _, every = run(False)
    cache, gated = run(True)
    assert sum(n > 0 for n in every) >= 30
    # Its hits would be recomputed whatever its hit rate: no batch from the first eviction
    # (the offload cost not measured yet), no exploring writes either.
    assert sum(gated) == 0
    # Host victims not written ahead are lost to the disk for that reason, not a full queue.
    assert cache.stats.skipped_by[(DISK, "cost_model")] > 0
    assert cache.stats.skipped_by[(DISK, "queue_full")] == 0
    # Recompute gets dearer than the reads (10 ms a token now: 160 ms a block): the disk takes
    # blocks again (written ahead, or offloaded to it straight while the unread host is bypassed).
    assert cache.disk is not None
    before = len(cache.disk)
    for tokens in (128, 256, 512, 1024) * 20:
        cache.observe_step(tokens, tokens * 10e-3)
    evict_batches(cache, 16, size=4, first_hash=1000)
    assert len(cache.disk) - before >= 32
