"""The onboard-or-recompute decision (kvbm/onboard_cost.py) and its use at admission: fits
recover latency and bandwidth from measured transfers; with deterministic fake rates the real
model never picks a path slower than the best of onboarding any prefix of the hits (so never
slower than no tier); TieredCache.lookup declines what is cheaper to recompute, unpins it, and
the decisions reach the metrics; the mocker's simulated tiers follow the same decision."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry

from kvbm.block_pool import EvictedBlock
from kvbm.config import KvbmConfig
from kvbm.metrics import KvbmMetrics
from kvbm.onboard_cost import LinearRate, OnboardCostModel
from kvbm.simulated import SimulatedKvbm
from kvbm.tiered import DISK, HOST, TieredCache

MB = 1 << 20


def test_linear_fit_recovers_latency_and_bandwidth() -> None:
    rate = LinearRate()
    assert rate.fit() is None and rate.cost_s(10) is None
    for nbytes in [1, 4, 2, 8, 3, 16, 5, 1, 12] * 3:
        rate.observe(nbytes * MB, 0.002 + nbytes * MB / 2e9)  # 2 ms + 2 GB/s
    latency, per_byte = rate.fit()  # type: ignore[misc]
    assert latency == pytest.approx(0.002, rel=1e-6) and 1 / per_byte == pytest.approx(2e9, rel=1e-6)
    same = LinearRate()
    for _ in range(5):
        same.observe(4 * MB, 0.004)  # one size: latency and bandwidth inseparable, all per byte
    assert same.fit() == (0.0, pytest.approx(0.004 / (4 * MB)))
    assert LinearRate(prior_per_unit_s=1e-9).cost_s(1000) == pytest.approx(1e-6)


def test_a_block_shares_its_reads_latency_with_the_blocks_read_alongside() -> None:
    rate = LinearRate()
    assert rate.shared_cost_s(MB) is None
    for nbytes in [1, 4, 2, 8, 3, 16, 5, 1, 12] * 3:  # 2 ms + 2 GB/s, reads of several MB
        rate.observe(nbytes * MB, 0.002 + nbytes * MB / 2e9)
    # A 1 MB part of reads averaging more than 3 MB: under a third of the latency is its share.
    assert MB / 2e9 < rate.shared_cost_s(MB) < 0.002 / 3 + MB / 2e9  # type: ignore[operator]
    assert rate.shared_cost_s(64 * MB) == pytest.approx(rate.cost_s(64 * MB))  # larger: all of it
    # A disk that takes 2 ms to start and then streams: a block of a typical read costs its
    # 0.5 ms of streaming, its copy up and a share of the start, not the 2.5 ms of a lone read.
    m = model(host_gbps=50, disk_gbps=2, disk_latency_s=0.002, tokens_per_s=1e5)
    per_block = m.block_onboard_s(DISK, MB)
    assert MB / 2e9 + MB / 50e9 < per_block < 0.0016 < m.reads[DISK].cost_s(MB)  # type: ignore[operator]
    assert m.block_onboard_s(HOST, MB) == pytest.approx(MB / 50e9, rel=1e-3)


def model(host_gbps: float, disk_gbps: float, disk_latency_s: float, tokens_per_s: float) -> OnboardCostModel:
    """A cost model fed exact measurements of the given rates (several sizes each)."""
    m = OnboardCostModel(host_gbps=55, disk_gbps=5)
    for blocks in (1, 3, 8, 2, 16, 5):
        nbytes = blocks * MB
        m.observe_read(HOST, nbytes, nbytes / (host_gbps * 1e9))
        m.observe_read(DISK, nbytes, disk_latency_s + nbytes / (disk_gbps * 1e9))
    for tokens in (64, 512, 128, 1024, 256):
        m.observe_step(tokens, tokens / tokens_per_s)
        m.observe_step(3, 0.005)  # decode-sized steps: all fixed cost, not a prefill rate
    return m


def true_cost(tiers: list[str], k: int, host_gbps: float, disk_gbps: float, disk_latency_s: float,
              tokens_per_s: float, block_bytes: int, tokens_per_block: int) -> float:
    disk = sum(t == DISK for t in tiers[:k])
    cost = (disk_latency_s + disk * block_bytes / (disk_gbps * 1e9)) if disk else 0.0
    cost += k * block_bytes / (host_gbps * 1e9)
    return cost + (len(tiers) - k) * tokens_per_block / tokens_per_s


def test_never_picks_a_slower_path_with_fake_rates() -> None:
    rng = random.Random(3)
    for _ in range(300):
        host_gbps, disk_gbps = rng.uniform(5, 60), rng.uniform(0.2, 10)
        latency, tokens_per_s = rng.uniform(0, 0.02), rng.uniform(2e3, 5e5)
        m = model(host_gbps, disk_gbps, latency, tokens_per_s)
        tiers = [rng.choice([HOST, DISK]) for _ in range(rng.randint(1, 40))]
        k = m.choose(tiers, MB, 16)
        costs = [true_cost(tiers, j, host_gbps, disk_gbps, latency, tokens_per_s, MB, 16) for j in range(len(tiers) + 1)]
        assert costs[k] <= min(costs) * (1 + 1e-9)  # the best prefix, so never worse than none (k=0)


def test_slow_disk_is_recomputed_fast_disk_onboarded_and_unknown_prefill_onboards_all() -> None:
    tiers = [HOST] * 4 + [DISK] * 12
    # A small GQA model on a fast GPU: 16 tokens recompute in 80 us, a 512 KiB file reads in 600 us.
    slow = model(host_gbps=50, disk_gbps=0.85, disk_latency_s=0.005, tokens_per_s=200e3)
    assert slow.choose(tiers, 512 << 10, 16) == 4  # the host hits, then recompute
    assert slow.choose([DISK] + [HOST] * 8, 512 << 10, 16) == 0  # a disk block first: nothing pays
    fast = model(host_gbps=50, disk_gbps=6, disk_latency_s=0.0005, tokens_per_s=20e3)
    assert fast.choose(tiers, 2 * MB, 16) == 16
    assert OnboardCostModel(55, 5).choose(tiers, MB, 16) == 16  # no prefill measured yet
    assert OnboardCostModel(55, 5, enabled=False).choose(tiers, MB, 16) == 16


def test_can_pay_is_false_exactly_where_no_run_of_disk_hits_is_onboarded() -> None:
    """Admission skips the disk's neighbour probe where can_pay says no, so that must never
    drop a hit choose() would take; where it says yes, a run long enough to spread the read's
    start over its blocks is taken whole."""
    rng = random.Random(11)
    answers = set()
    for _ in range(300):
        host_gbps, disk_gbps = rng.uniform(5, 60), rng.uniform(0.05, 10)
        latency, tokens_per_s = rng.uniform(0, 0.02), rng.uniform(2e3, 5e5)
        m = model(host_gbps, disk_gbps, latency, tokens_per_s)
        pays = m.can_pay(DISK, MB, 16)
        answers.add(pays)
        margin = 16 / tokens_per_s - MB / (disk_gbps * 1e9) - MB / (host_gbps * 1e9)  # a block's, streaming
        if not pays:
            assert margin < 1e-9
            assert all(m.choose([DISK] * n, MB, 16) == 0 for n in (1, 8, 64, 512))
            assert m.choose([HOST] * 3 + [DISK] * 64, MB, 16) <= 3
        elif (n := int(latency / margin) + 2) <= 4096:
            assert m.choose([DISK] * n, MB, 16) == n
    assert answers == {True, False}
    assert OnboardCostModel(55, 5).can_pay(DISK, MB, 16)  # prefill unmeasured: choose takes every hit
    assert OnboardCostModel(55, 0.001, enabled=False).can_pay(DISK, MB, 16)


def test_no_neighbour_probe_where_no_disk_hit_could_pay() -> None:
    """The probe (a stat, on the event loop) looks for a block another worker wrote to the
    shared disk directory; where a disk hit would be recomputed anyway, it is not made."""
    probed: list[int] = []

    def probe(block_hash: int) -> bool:
        probed.append(block_hash)
        return False

    def cache(disk_read_s: float) -> TieredCache:
        c = TieredCache(KvbmConfig(host_blocks=4, disk_blocks=32), MB, block_size_tokens=16)
        c.disk_probe = probe
        c.cost.observe_step(1024, 0.01)  # 10 us a token: 160 us to recompute a block
        for blocks in (8, 2, 16):
            c.observe_read(DISK, blocks * MB, blocks * disk_read_s)
        return c

    prompt = [7, 8, 9]
    assert len(cache(disk_read_s=0.025).lookup(prompt, 0)) == 0 and probed == []  # 25 ms a block
    assert len(cache(disk_read_s=0.0001).lookup(prompt, 0)) == 0 and probed == [7]  # 0.1 ms a block
    unmeasured = TieredCache(KvbmConfig(host_blocks=4, disk_blocks=32), MB, block_size_tokens=16)
    unmeasured.disk_probe = probe
    assert len(unmeasured.lookup(prompt, 1)) == 0 and probed == [7, 8]


def test_prefill_rate_is_a_low_quantile_of_prefill_sized_steps() -> None:
    m = OnboardCostModel(55, 5)
    for i in range(40):
        m.observe_step(4, 0.004)  # decode steps: ignored
        m.observe_step(1024, 1024 * 5e-6 * (3 if i % 3 == 0 else 1))  # a third slowed by other work
    assert m.recompute_s(1000) == pytest.approx(1000 * 5e-6)


def test_a_recomputed_token_weighs_for_every_prefill_of_the_step() -> None:
    # 16 tokens recompute in 0.6 ms; a block reads in 1 ms (after a 1 ms latency): slower for
    # the requester, but recomputing lengthens the steps of 3 other prefills batched with it.
    m = model(host_gbps=50, disk_gbps=1 * MB / 1e6, disk_latency_s=0.001, tokens_per_s=16 / 0.6e-3)
    tiers = [DISK] * 8
    assert m.choose(tiers, MB, 16) == 0
    assert m.choose(tiers, MB, 16, sharing=4) == 8


def test_flags_reach_the_config() -> None:
    import argparse

    from kvbm.config import add_kvbm_args

    parser = argparse.ArgumentParser()
    add_kvbm_args(parser)
    on = KvbmConfig.from_args(parser.parse_args([]))
    assert (on.onboard_cost, on.onboard_cost_sharing, on.offload_flush_blocks) == (True, True, 16)
    alone = KvbmConfig.from_args(parser.parse_args(["--kvbm-onboard-cost", "requester",
                                                    "--kvbm-offload-flush-blocks", "4"]))
    assert (alone.onboard_cost, alone.onboard_cost_sharing, alone.offload_flush_blocks) == (True, False, 4)
    assert not KvbmConfig.from_args(parser.parse_args(["--kvbm-onboard-cost", "off"])).onboard_cost
    assert on.disk_load == "auto"
    assert KvbmConfig.from_args(parser.parse_args(["--kvbm-disk-load", "sync"])).disk_load == "sync"
    assert on.disk_probe and not KvbmConfig.from_args(parser.parse_args(["--kvbm-disk-probe", "off"])).disk_probe


def filled_cache(config: KvbmConfig) -> TieredCache:
    """Blocks 0..3 on host, 4..11 on disk (evicted from the device four a step, written to
    disk ahead of their eviction from the host, which holds four)."""
    cache = TieredCache(config, MB, block_size_tokens=16)
    for first in (4, 8, 0):
        cache.evicted([EvictedBlock(100 + h, h, h - 1 if h else None) for h in range(first, first + 4)])
        cache.finish(cache.take_plan())
        cache.finish(cache.take_plan())  # the next step's plan: the writes ahead
    return cache


def test_lookup_declines_what_is_cheaper_to_recompute_and_counts_the_decisions() -> None:
    cache = filled_cache(KvbmConfig(host_blocks=4, disk_blocks=32))
    assert cache.cost.enabled
    registry = CollectorRegistry()
    cache.bind_metrics(KvbmMetrics(registry, "m"))
    prefix = list(range(12))
    # 10 us a token: 160 us a block, against 19 us from host and 25 ms from this disk.
    cache.cost.observe_step(1024, 0.01)
    for _ in range(3):
        cache.observe_read(DISK, 8 * MB, 0.2)  # 40 MB/s
    hits = cache.lookup(prefix, 0)
    assert [h.tier for h in hits] == [HOST] * 4
    assert hits.declined == {DISK: 8}  # type: ignore[attr-defined]
    assert all(e.ref_count == 0 for e in cache.disk)  # type: ignore[union-attr]
    cache.onboard(prefix, 0, hits, list(range(4)))
    cache.finish(cache.take_plan())
    assert cache.stats.decisions == {(HOST, "onboard"): 4, (DISK, "recompute"): 8}

    def sample(tier: str, decision: str) -> float | None:
        return registry.get_sample_value("dynamo_kvbm_onboard_decision_blocks_total",
                                         {"model": "m", "tier": tier, "decision": decision})

    assert sample(HOST, "onboard") == 4 and sample(DISK, "recompute") == 8
    # The hit and onboard tallies (counted per tier of a prompt, not per block) agree.
    assert cache.stats.hits == {HOST: 4} and cache.stats.onboard_blocks == {HOST: 4}
    assert cache.stats.onboard_bytes == {HOST: 4 * MB}
    for name, value in (("hit_blocks", 4), ("onboard_blocks", 4), ("onboard_bytes", 4 * MB)):
        assert registry.get_sample_value(f"dynamo_kvbm_{name}_total", {"model": "m", "tier": HOST}) == value
    assert registry.get_sample_value("dynamo_kvbm_read_gbps", {"model": "m", "tier": DISK}) == pytest.approx(8 * MB / 0.2 / 1e9)
    # Off: every hit is onboarded, as before the model.
    off = filled_cache(KvbmConfig(host_blocks=4, disk_blocks=32, onboard_cost=False))
    off.cost.observe_step(1024, 0.01)
    assert len(off.lookup(prefix, 0)) == 12


def test_mocker_tiers_follow_the_same_decision() -> None:
    clock = [0.0]
    for disk_gbps, want in ((0.05, [HOST] * 4), (50.0, [HOST] * 4 + [DISK] * 8)):
        sim = SimulatedKvbm(KvbmConfig(host_blocks=4, disk_blocks=32, disk_gbps=disk_gbps), MB,
                            clock=lambda: clock[0], block_size_tokens=16)
        cache = sim.cache
        for first in (4, 8, 0):
            cache.evicted([EvictedBlock(100 + h, h, h - 1 if h else None) for h in range(first, first + 4)])
            sim.step_cost_s()
            sim.step_cost_s()  # the writes ahead
        cache.observe_step(2048, 0.05)  # as the scheduler times the mocker's steps
        # Nothing read yet: the config's bandwidths stand for the tiers.
        assert [h.tier for h in cache.lookup(list(range(12)), 0)] == want


def test_a_disk_hit_costs_from_the_start_of_its_reads_to_its_admission() -> None:
    clock = [10.0]
    sim = SimulatedKvbm(KvbmConfig(disk_blocks=32, disk_gbps=50.0), MB, clock=lambda: clock[0], block_size_tokens=16)
    cache = sim.cache
    cache.evicted([EvictedBlock(h, h, h - 1 if h else None) for h in range(4)])
    sim.step_cost_s()
    hits = cache.lookup(list(range(4)), 0)
    reads = cache.start_reads(hits)
    assert reads is not None and sim.reader is not None
    clock[0] = sim.reader.next_end_s() + 0.5  # type: ignore[operator]  # read, then a long wait for a step
    staged = cache.lookup_staged(list(range(4)), 0, reads)
    assert [h.tier for h in staged] == [DISK] * 4
    cache.close_reads(reads)
    latency, per_byte = cache.cost.reads[DISK].fit()  # type: ignore[misc]
    assert latency + per_byte * 4 * MB == pytest.approx(0.5 + 4 * MB / 50e9)


async def test_mocker_engine_feeds_step_times_and_declines_a_slow_disk() -> None:
    """Through the paged scheduler: step times (simulated clock) reach the model, and a disk
    slower than recomputing is not read; the tokens are those of a run without tiers."""
    from dynamo.wire import PreprocessedRequest, SamplingOptions, StopConditions
    from workers.mocker.args import MockerConfig
    from workers.mocker.engine import MockerEngine

    prompts = [[(31 * i + 7 * p) % 900 + 1 for i in range(65)] for p in range(3)]

    def config(kvbm: KvbmConfig) -> MockerConfig:
        return MockerConfig(block_size_tokens=16, num_gpu_blocks=6, max_model_len=1024, speedup_ratio=1e9,
                            vocab_size=1000, kvbm=kvbm)

    async def run(engine: MockerEngine) -> list[int]:
        tokens: list[int] = []
        for rid, p in (("a", 0), ("b", 1), ("c", 2), ("again", 0)):
            req = PreprocessedRequest(rid, "m", prompts[p], sampling=SamplingOptions(seed=1),
                                      stop=StopConditions(max_tokens=2))
            tokens += [t async for o in engine.generate(req) for t in o.token_ids]
        return tokens

    async with MockerEngine(config(KvbmConfig(disk_blocks=16, disk_gbps=0.01))) as engine:
        tiered = await run(engine)  # type: ignore[arg-type]
    assert engine.kvbm is not None
    cache = engine.kvbm.cache
    assert cache.cost.prefill.samples >= 4 and cache.cost.recompute_s(16) is not None
    stats = cache.stats
    assert stats.onboard_blocks["disk"] == 0 and stats.decisions[(DISK, "recompute")] == 4
    async with MockerEngine(config(KvbmConfig())) as plain:
        assert await run(plain) == tiered  # type: ignore[arg-type]
