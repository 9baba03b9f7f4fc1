"""The built-in engine over KVBM tiers on CPU: a prefix evicted from the device pool and served
from host memory or disk gives the same greedy tokens as a cold run (and as transformers), its
cached_tokens count the onboarded blocks, and a restarted engine finds its disk tier."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from dynamo.kv_hash import block_hashes
from dynamo.wire import BlockRemoved, BlockStored, EngineOutput, KvEventData, PreprocessedRequest, SamplingOptions, StopConditions
from kvbm.config import KvbmConfig
from workers.builtin.args import BuiltinConfig
from workers.builtin.engine import BuiltinEngine

HfGreedy = Callable[[str, list[int], int], list[int]]
SHAPE = "llama-gqa"
BLOCK = 4
# 6 full blocks each; a 10-block device pool holds one of them at a time.
PROMPTS = [[(7 * i + 13 * p + 1) % 500 + 2 for i in range(25)] for p in range(3)]


def request(rid: str, prompt: list[int], max_tokens: int = 4) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=rid, model="m", token_ids=prompt, sampling=SamplingOptions(),
        stop=StopConditions(max_tokens=max_tokens, ignore_eos=True),
    )


def engine(model_dir: Path, kvbm: KvbmConfig) -> BuiltinEngine:
    return BuiltinEngine(BuiltinConfig(
        model=str(model_dir), dtype="float32", device="cpu", block_size_tokens=BLOCK, num_gpu_blocks=10,
        max_num_batched_tokens=64, kvbm=kvbm,
    ))


async def collect(stream: AsyncIterator[EngineOutput]) -> list[EngineOutput]:
    return [out async for out in stream]


def tokens(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


async def churn(eng: BuiltinEngine) -> list[EngineOutput]:
    """Run prompt 0, then prompts 1 and 2 (evicting prompt 0 from the device), then prompt 0."""
    await collect(eng.generate(request("a", PROMPTS[0])))
    for i in (1, 2):
        await collect(eng.generate(request(f"b{i}", PROMPTS[i])))
    assert eng.pool is not None and eng.pool.get_cached(block_hashes(PROMPTS[0], BLOCK)[0]) is None
    return await collect(eng.generate(request("again", PROMPTS[0])))


@pytest.mark.parametrize("tiers", ["host", "disk", "host+disk"])
async def test_evicted_prefix_is_onboarded_with_same_greedy_output(
    tiers: str, tmp_path: Path, model_dirs: Callable[[str], Path], hf_greedy: HfGreedy
) -> None:
    kvbm = {
        "host": KvbmConfig(host_blocks=64),
        "disk": KvbmConfig(disk_dir=str(tmp_path), disk_blocks=64),
        # Two host blocks: prompt 0's blocks spill through host memory onto disk.
        "host+disk": KvbmConfig(host_blocks=2, disk_dir=str(tmp_path), disk_blocks=64),
    }[tiers]
    async with engine(model_dirs(SHAPE), kvbm) as eng:
        assert isinstance(eng, BuiltinEngine)
        outs = await churn(eng)
        assert eng.kvbm is not None
        stats = eng.kvbm.cache.stats
    assert tokens(outs) == hf_greedy(SHAPE, PROMPTS[0], 4)
    assert outs[0].cached_tokens == 24  # all 6 full blocks, none left on the device
    onboarded = sum(stats.onboard_blocks.values())
    assert onboarded == 6
    if tiers == "host+disk":
        assert stats.onboard_blocks["disk"] > 0 and stats.onboard_blocks["host"] > 0


async def test_without_kvbm_the_evicted_prefix_is_recomputed(model_dirs: Callable[[str], Path]) -> None:
    async with engine(model_dirs(SHAPE), KvbmConfig()) as eng:
        outs = await churn(eng)  # type: ignore[arg-type]
    assert outs[0].cached_tokens == 0


async def test_restarted_engine_finds_its_disk_tier(
    tmp_path: Path, model_dirs: Callable[[str], Path], hf_greedy: HfGreedy
) -> None:
    kvbm = KvbmConfig(disk_dir=str(tmp_path), disk_blocks=64)
    async with engine(model_dirs(SHAPE), kvbm) as first:
        for i, prompt in enumerate(PROMPTS):
            await collect(first.generate(request(f"r{i}", prompt)))  # type: ignore[attr-defined]
    assert list(tmp_path.rglob("*.kvb"))  # stop() waited for the queued writes
    events: list[KvEventData] = []
    second = engine(model_dirs(SHAPE), kvbm)
    await second.start(events.append)
    try:
        assert any(isinstance(e, BlockStored) and e.tier == "disk" for e in events)
        outs = await collect(second.generate(request("again", PROMPTS[0])))
        assert second.kvbm is not None
        assert second.kvbm.cache.stats.onboard_blocks["disk"] == 6
    finally:
        await second.stop()
    assert outs[0].cached_tokens == 24
    assert tokens(outs) == hf_greedy(SHAPE, PROMPTS[0], 4)


async def test_events_carry_the_tier(tmp_path: Path, model_dirs: Callable[[str], Path]) -> None:
    events: list[KvEventData] = []
    eng = engine(model_dirs(SHAPE), KvbmConfig(host_blocks=6, disk_dir=str(tmp_path), disk_blocks=64))
    await eng.start(events.append)
    try:
        await churn(eng)
    finally:
        await eng.stop()
    stored = {e.tier for e in events if isinstance(e, BlockStored)}
    removed = {e.tier for e in events if isinstance(e, BlockRemoved)}
    assert stored == {"device", "host", "disk"}
    assert "host" in removed and "device" in removed


async def test_unreadable_disk_block_is_recomputed(
    tmp_path: Path, model_dirs: Callable[[str], Path], hf_greedy: HfGreedy
) -> None:
    kvbm = KvbmConfig(disk_dir=str(tmp_path), disk_blocks=64)
    async with engine(model_dirs(SHAPE), kvbm) as first:
        for i, prompt in enumerate(PROMPTS):
            await collect(first.generate(request(f"r{i}", prompt)))  # type: ignore[attr-defined]
    async with engine(model_dirs(SHAPE), kvbm) as second:
        for path in tmp_path.rglob("*.kvb"):
            path.write_bytes(b"garbage")  # a neighbour clobbered them after our scan
        outs = await collect(second.generate(request("again", PROMPTS[0])))  # type: ignore[attr-defined]
    assert tokens(outs) == hf_greedy(SHAPE, PROMPTS[0], 4)
    assert outs[0].cached_tokens == 0
