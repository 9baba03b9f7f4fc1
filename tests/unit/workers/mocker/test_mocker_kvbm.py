"""The mocker over simulated KVBM tiers: a prefix evicted from the device pool is onboarded from
host or disk (counted, with tier-tagged KV events), costs onboard time from bytes and bandwidth,
and yields the same tokens as without tiers; the --kvbm-* flags reach MockerConfig."""

from __future__ import annotations

import argparse

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
    expected = block_bytes * (stats.onboard_blocks["host"] / 55e9 + stats.onboard_blocks["disk"] / 5e9)
    assert abs(engine.kvbm.onboard_time_s - expected) < 1e-12
    assert {e.tier for e in events if isinstance(e, BlockStored)} == {"device", "host", "disk"}
    async with MockerEngine(config(KvbmConfig())) as plain:
        cold = await run(plain)  # type: ignore[arg-type]
    assert cold[0].cached_tokens == 0
    assert [t for o in cold for t in o.token_ids] == [t for o in outs for t in o.token_ids]


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
