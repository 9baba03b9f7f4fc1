"""The mocker over simulated KVBM tiers: a prefix evicted from the device pool is onboarded from
host or disk (counted, with tier-tagged KV events), costs onboard time from bytes and bandwidth,
and yields the same tokens as without tiers; a request whose prefix continues on disk is held
back for the simulated read without holding up the others, as in the built-in engine; the
--kvbm-* flags reach MockerConfig."""

from __future__ import annotations

import argparse
import asyncio

from dynamo.kv_hash import block_hashes
from dynamo.wire import BlockStored, EngineOutput, KvEventData, PreprocessedRequest, SamplingOptions, StopConditions
from kvbm.config import KvbmConfig
from workers.mocker.args import MockerConfig, add_mocker_args
from workers.mocker.engine import MockerEngine

PROMPTS = [[(31 * i + 7 * p) % 900 + 1 for i in range(65)] for p in range(3)]  # 4 full blocks each


def config(kvbm: KvbmConfig) -> MockerConfig:
    return MockerConfig(block_size_tokens=16, num_gpu_blocks=6, max_model_len=1024, speedup_ratio=1e9,
                        vocab_size=1000, kvbm=kvbm)


def request(rid: str, prompt: list[int]) -> PreprocessedRequest:
    return PreprocessedRequest(rid, "m", prompt, sampling=SamplingOptions(seed=1), stop=StopConditions(max_tokens=2))


async def run(engine: MockerEngine) -> list[EngineOutput]:
    for i in (0, 1, 2):
        [o async for o in engine.generate(request(f"r{i}", PROMPTS[i]))]
    return [o async for o in engine.generate(request("again", PROMPTS[0]))]


async def test_mocker_onboards_from_simulated_tiers() -> None:
    events: list[KvEventData] = []
    engine = MockerEngine(config(KvbmConfig(host_blocks=2, disk_blocks=16)))
    await engine.start(events.append)
    try:
        outs = await run(engine)
    finally:
        await engine.stop()
    assert engine.kvbm is not None
    stats = engine.kvbm.cache.stats
    assert outs[0].cached_tokens == 64
    assert stats.onboard_blocks["host"] + stats.onboard_blocks["disk"] == 4 and stats.onboard_blocks["disk"] > 0
    block_bytes = 128 * 1024 * 16
    # Disk blocks are read (at 5 GB/s) while their request is held back, then come up from host
    # memory like host blocks (55 GB/s) in the step.
    onboard = block_bytes * (stats.onboard_blocks["host"] + stats.onboard_blocks["disk"]) / 55e9
    assert abs(engine.kvbm.onboard_time_s - onboard) < 1e-12
    assert abs(engine.kvbm.disk_read_time_s - block_bytes * stats.onboard_blocks["disk"] / 5e9) < 1e-12
    assert {e.tier for e in events if isinstance(e, BlockStored)} == {"device", "host", "disk"}
    async with MockerEngine(config(KvbmConfig())) as plain:
        cold = await run(plain)  # type: ignore[arg-type]
    assert cold[0].cached_tokens == 0
    assert [t for o in cold for t in o.token_ids] == [t for o in outs for t in o.token_ids]


async def test_request_waiting_for_disk_reads_is_held_back_without_holding_up_others() -> None:
    """As in the built-in engine: a prompt whose prefix is on the (simulated) disk waits in
    `loading` for the read, off the steps, while the request behind it runs; it is then
    admitted with the disk blocks onboarded, and the read's time is on the engine's clock."""
    disk_gbps = 0.01  # 2 MiB blocks: 0.2 s of simulated reading each, far longer than a step
    # No host tier: evictions go to disk. A read this slow loses to recomputing: the cost
    # model would decline it, so it is off here, where the hold-back itself is under test.
    kvbm = KvbmConfig(disk_blocks=16, disk_gbps=disk_gbps, onboard_cost=False)
    fresh = [(13 * i + 5) % 900 + 1 for i in range(65)]
    order: list[str] = []
    engine = MockerEngine(config(kvbm))
    async with engine:
        for i in (0, 1, 2):  # prompt 0's blocks end up on disk
            [o async for o in engine.generate(request(f"r{i}", PROMPTS[i]))]
        hashes = block_hashes(PROMPTS[0], 16)
        assert engine.kvbm is not None and engine.kvbm.reader is not None and engine.kvbm.cache.disk is not None
        assert all(engine.pool.get_cached(h) is None and h in engine.kvbm.cache.disk for h in hashes)

        loading: list[int] = []

        async def run(rid: str, prompt: list[int]) -> list[EngineOutput]:
            outs = []
            async for out in engine.generate(request(rid, prompt)):
                order.append(rid)
                loading.append(engine.scheduler.num_loading)
                outs.append(out)
            return outs

        start_s = engine.executor.sim_time_s
        # Queued together, the held one first in line (alone, it would be admitted as soon as
        # its read is done, the engine's clock jumping there).
        held = asyncio.create_task(run("held", PROMPTS[0]))
        other, outs = await asyncio.gather(asyncio.create_task(run("other", fresh)), held)
        elapsed_s = engine.executor.sim_time_s - start_s
    assert order == ["other"] * 2 + ["held"] * 2
    assert loading == [1, 1, 0, 0]  # the other request ran while the held one was loading
    assert outs[0].cached_tokens == 64
    stats = engine.kvbm.cache.stats
    assert (stats.onboard_blocks["disk"], stats.onboard_blocks["host"]) == (4, 0)
    read_s = 4 * 128 * 1024 * 16 / (disk_gbps * 1e9)
    assert abs(engine.kvbm.disk_read_time_s - read_s) < 1e-12
    assert read_s < elapsed_s < read_s + 0.1  # the wait for the read, then a prefill and a decode step
    async with MockerEngine(config(KvbmConfig())) as plain:
        cold = [o async for o in plain.generate(request("cold", PROMPTS[0]))]
        cold_other = [o async for o in plain.generate(request("cold-other", fresh))]
    assert [o.token_ids for o in outs] == [o.token_ids for o in cold]
    assert [o.token_ids for o in other] == [o.token_ids for o in cold_other]


def test_kvbm_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    add_mocker_args(parser)
    args = parser.parse_args(["--kvbm-host-gb", "2", "--kvbm-disk-blocks", "100", "--kvbm-offload-policy", "reused"])
    kvbm = MockerConfig.from_args(args).kvbm
    assert kvbm == KvbmConfig(host_gb=2.0, disk_blocks=100, offload_policy="reused")
    assert kvbm.host_capacity_blocks(2 * 1024 * 1024) == 953


async def test_worker_registers_kvbm_metrics() -> None:
    from prometheus_client import CollectorRegistry

    from kvbm.metrics import KvbmMetrics

    registry = CollectorRegistry()
    engine = MockerEngine(config(KvbmConfig(host_blocks=2, disk_blocks=16)))
    assert engine.kvbm is not None
    engine.kvbm.cache.bind_metrics(KvbmMetrics(registry, "m"))
    async with engine:
        await run(engine)
    assert registry.get_sample_value("dynamo_kvbm_blocks_total", {"model": "m", "tier": "host"}) == 2
    assert registry.get_sample_value("dynamo_kvbm_onboard_blocks_total", {"model": "m", "tier": "disk"}) > 0
