"""The built-in engine over KVBM tiers on CPU: a prefix evicted from the device pool and served
from host memory or disk gives the same greedy tokens as a cold run (and as transformers), its
cached_tokens count the onboarded blocks, and a restarted engine finds its disk tier."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dynamo.kv_hash import block_hashes
from dynamo.wire import BlockRemoved, BlockStored, EngineOutput, KvEventData, PreprocessedRequest, SamplingOptions, StopConditions
from kvbm.config import KvbmConfig
from kvbm.tiered import TransferPlan
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


def engine(model_dir: Path, kvbm: KvbmConfig, overlap: bool | None = None, device: str = "cpu") -> BuiltinEngine:
    return BuiltinEngine(BuiltinConfig(
        model=str(model_dir), dtype="float32", device=device, block_size_tokens=BLOCK, num_gpu_blocks=10,
        max_num_batched_tokens=64, kvbm=kvbm, overlap_schedule=overlap,
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


# ------------------------------------------------------------- disk I/O off the model thread

FRESH = [(11 * i + 5) % 500 + 2 for i in range(25)]  # never written to disk


async def fill_disk(model_dir: Path, kvbm: KvbmConfig) -> None:
    async with engine(model_dir, kvbm) as first:
        for i, prompt in enumerate(PROMPTS):
            await collect(first.generate(request(f"r{i}", prompt)))  # type: ignore[attr-defined]


async def test_disk_hit_is_read_off_the_model_thread_with_same_greedy_output(
    tmp_path: Path, model_dirs: Callable[[str], Path], hf_greedy: HfGreedy
) -> None:
    kvbm = KvbmConfig(disk_dir=str(tmp_path), disk_blocks=64)
    await fill_disk(model_dirs(SHAPE), kvbm)
    async with engine(model_dirs(SHAPE), kvbm) as eng:
        assert isinstance(eng, BuiltinEngine) and eng.kvbm is not None and eng.kvbm.disk is not None
        disk = eng.kvbm.disk
        threads: list[str] = []
        read = disk.read

        def traced(block_hash: int, out: torch.Tensor) -> bool:
            threads.append(threading.current_thread().name)
            return read(block_hash, out)

        disk.read = traced  # type: ignore[method-assign]
        plans: list[TransferPlan] = []
        execute = eng.kvbm.execute

        def spy(plan: TransferPlan) -> list[int]:
            plans.append(plan)
            return execute(plan)

        eng.kvbm.execute = spy  # type: ignore[method-assign]
        outs = await collect(eng.generate(request("again", PROMPTS[0])))
        stats = eng.kvbm.cache.stats
    assert tokens(outs) == hf_greedy(SHAPE, PROMPTS[0], 4)
    assert outs[0].cached_tokens == 24 and stats.onboard_blocks["disk"] == 6
    assert len(threads) == 6 and all(name.startswith("kvbm-disk-read") for name in threads)
    disk_ops = [op for plan in plans for op in plan.onboards if op.tier == "disk"]
    assert len(disk_ops) == 6 and all(op.staged is not None for op in disk_ops)  # no read in execute()


async def test_request_waiting_for_disk_reads_does_not_hold_up_others(
    tmp_path: Path, model_dirs: Callable[[str], Path], hf_greedy: HfGreedy
) -> None:
    kvbm = KvbmConfig(disk_dir=str(tmp_path), disk_blocks=64)
    await fill_disk(model_dirs(SHAPE), kvbm)
    gate = threading.Event()
    order: list[str] = []
    async with engine(model_dirs(SHAPE), kvbm) as eng:
        assert isinstance(eng, BuiltinEngine) and eng.kvbm is not None and eng.kvbm.disk is not None
        disk = eng.kvbm.disk
        read = disk.read

        def slow(block_hash: int, out: torch.Tensor) -> bool:
            gate.wait()  # the disk is "slow" until the test says so
            return read(block_hash, out)

        disk.read = slow  # type: ignore[method-assign]

        async def run(rid: str, prompt: list[int]) -> list[EngineOutput]:
            outs = []
            async for out in eng.generate(request(rid, prompt)):
                order.append(rid)
                outs.append(out)
            return outs

        try:
            held = asyncio.create_task(run("held", PROMPTS[0]))  # first in line, prefix on disk
            await asyncio.sleep(0)
            other = await asyncio.wait_for(run("other", FRESH), 60)  # runs to the end meanwhile
            assert eng.scheduler is not None and eng.scheduler.num_loading == 1
            assert not held.done() and "held" not in order
            steps = eng.num_steps
        finally:
            gate.set()  # never leave a reader thread stuck
        outs = await asyncio.wait_for(held, 60)
        assert eng.num_steps > steps
    assert order == ["other"] * 4 + ["held"] * 4
    assert tokens(other) == hf_greedy(SHAPE, FRESH, 4)
    assert tokens(outs) == hf_greedy(SHAPE, PROMPTS[0], 4)
    assert outs[0].cached_tokens == 24


async def test_vanished_disk_file_is_recomputed(
    tmp_path: Path, model_dirs: Callable[[str], Path], hf_greedy: HfGreedy
) -> None:
    kvbm = KvbmConfig(disk_dir=str(tmp_path), disk_blocks=64)
    await fill_disk(model_dirs(SHAPE), kvbm)
    hashes = block_hashes(PROMPTS[0], BLOCK)
    async with engine(model_dirs(SHAPE), kvbm) as eng:
        assert isinstance(eng, BuiltinEngine) and eng.kvbm is not None and eng.kvbm.disk is not None
        eng.kvbm.disk.path(hashes[3]).unlink()  # gone after our scan (a neighbour's eviction)
        outs = await asyncio.wait_for(collect(eng.generate(request("again", PROMPTS[0]))), 60)
        disk_index = eng.kvbm.cache.disk
        assert disk_index is not None and hashes[3] not in disk_index  # forgotten
        assert eng.kvbm.cache.stats.onboard_blocks["disk"] == 3
    assert tokens(outs) == hf_greedy(SHAPE, PROMPTS[0], 4)
    assert outs[0].cached_tokens == 12  # blocks 0-2 read, 3-5 recomputed


async def test_full_disk_write_queue_skips_offloads_without_blocking(
    tmp_path: Path, model_dirs: Callable[[str], Path], hf_greedy: HfGreedy
) -> None:
    kvbm = KvbmConfig(disk_dir=str(tmp_path), disk_blocks=64, disk_queue_blocks=2)
    gate = threading.Event()
    async with engine(model_dirs(SHAPE), kvbm) as eng:
        assert isinstance(eng, BuiltinEngine) and eng.kvbm is not None and eng.kvbm.disk is not None
        disk = eng.kvbm.disk
        write_file = disk._write_file

        def stuck(*args: object) -> None:
            gate.wait()  # the disk thread cannot write until the test says so
            write_file(*args)  # type: ignore[arg-type]

        disk._write_file = stuck  # type: ignore[method-assign]
        try:
            for i, prompt in enumerate([*PROMPTS, FRESH]):  # evicts far more than 2 blocks
                outs = await asyncio.wait_for(collect(eng.generate(request(f"r{i}", prompt))), 60)
                assert tokens(outs) == hf_greedy(SHAPE, prompt, 4)
            stats = eng.kvbm.cache.stats
            assert disk.backlog() <= 2 and stats.offload_blocks["disk"] <= 2
            assert stats.skipped > 0
        finally:
            gate.set()


async def test_workers_sharing_a_disk_directory_reuse_each_others_blocks(
    tmp_path: Path, model_dirs: Callable[[str], Path], hf_greedy: HfGreedy
) -> None:
    """Two running engines on one host share a disk tier: blocks one writes after the other
    started are found by the other on its next lookup, announced (tier disk) and onboarded."""
    kvbm = KvbmConfig(disk_dir=str(tmp_path), disk_blocks=64)
    events: list[KvEventData] = []
    async with engine(model_dirs(SHAPE), kvbm) as writer:
        reader = engine(model_dirs(SHAPE), kvbm)
        await reader.start(events.append)  # started before anything is on disk
        try:
            assert reader.kvbm is not None and len(reader.kvbm.cache.disk or ()) == 0
            await churn(writer)  # prompt 0 evicted from the writer's device pool onto disk
            ours = block_hashes(PROMPTS[0], BLOCK)
            await asyncio.to_thread(writer.kvbm.disk.stop)  # type: ignore[union-attr]  # writes landed
            assert all(writer.kvbm.disk.exists(h) for h in ours)  # type: ignore[union-attr]
            outs = await collect(reader.generate(request("shared", PROMPTS[0])))
            assert outs[0].cached_tokens == 6 * BLOCK
            assert reader.kvbm.cache.stats.adopted == 6
            assert reader.kvbm.cache.stats.onboard_blocks["disk"] == 6
            adopted = [h for e in events if isinstance(e, BlockStored) and e.tier == "disk" for h in e.block_hashes]
            assert adopted == ours
            assert tokens(outs) == hf_greedy(SHAPE, PROMPTS[0], 4)
        finally:
            await reader.stop()


@pytest.mark.parametrize("overlap", [False, True], ids=["plain_loop", "overlap_loop"])
async def test_a_plan_of_offloads_only_is_queued_ahead_of_its_step_not_waited_for(
    overlap: bool, model_dirs: Callable[[str], Path], hf_greedy: HfGreedy
) -> None:
    """Offloads fail no block a step reads, so the step is launched without waiting for their
    plan (a round trip to the model thread less for a request admitted to an idle engine); the
    model thread still runs the plan first, and its pins are released once it has run."""
    hang_s = 60.0  # the old behaviour: launch() waited for the held plan, which waits for launch()
    async with engine(model_dirs(SHAPE), KvbmConfig(host_blocks=64), overlap) as eng:
        assert isinstance(eng, BuiltinEngine) and eng.kvbm is not None and eng.runner is not None
        kvbm, executor, runner = eng.kvbm, eng.executor, eng.runner
        take_plan, execute, launch, runner_launch = kvbm.take_plan, kvbm.execute, executor.launch, runner.launch
        launched: dict[int, threading.Event] = {}  # id(plan) -> set once the launch() that took it returned
        taken: list[TransferPlan] = []
        order: list[str] = []  # on the model thread
        waited: list[bool] = []

        def taking() -> TransferPlan:
            plan = take_plan()
            launched[id(plan)] = threading.Event()
            taken.append(plan)
            return plan

        async def launching(batch: Any) -> Any:
            taken.clear()
            step = await launch(batch)
            for plan in taken:
                launched[id(plan)].set()
            return step

        def executing(plan: TransferPlan) -> list[int]:
            order.append("plan")
            if plan.offloads and not plan.onboards:
                waited.append(launched[id(plan)].wait(hang_s))
            return execute(plan)

        def launching_step(step: Any) -> Any:
            order.append("step")
            return runner_launch(step)

        kvbm.take_plan = taking  # type: ignore[method-assign]
        kvbm.execute = executing  # type: ignore[method-assign]
        executor.launch = launching  # type: ignore[method-assign]
        runner.launch = launching_step  # type: ignore[method-assign]
        outs = await churn(eng)
        host = kvbm.cache.host
        assert host is not None and all(entry.ref_count == 0 for entry in host)
    assert waited and all(waited)  # every offload-only plan ran after its step's launch was queued
    assert all(order[i + 1] == "step" for i, what in enumerate(order) if what == "plan")  # and before the step
    assert outs[0].cached_tokens == 24 and tokens(outs) == hf_greedy(SHAPE, PROMPTS[0], 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on the device machine (benchmarks/RESULTS.md)")
@pytest.mark.parametrize("tiers", ["host", "host+disk"])
async def test_on_cuda_an_onboarded_prefix_decodes_as_its_cold_run(
    tiers: str, tmp_path: Path, model_dirs: Callable[[str], Path]
) -> None:
    """On a GPU (overlap loop, copies on the side stream, offload plans queued ahead of their
    steps): a prefix evicted into the tiers and onboarded decodes the tokens its cold run did.
    The cost models are off: this is the transfer path, not whether a tiny model's tiers pay."""
    kvbm = {
        "host": KvbmConfig(host_blocks=64, onboard_cost=False, offload_cost=False),
        "host+disk": KvbmConfig(host_blocks=2, disk_dir=str(tmp_path), disk_blocks=64, onboard_cost=False,
                                offload_cost=False),
    }[tiers]
    async with engine(model_dirs(SHAPE), kvbm, device="cuda") as eng:
        assert isinstance(eng, BuiltinEngine) and eng.kvbm is not None
        cold = await collect(eng.generate(request("a", PROMPTS[0])))
        for i in (1, 2):
            await collect(eng.generate(request(f"b{i}", PROMPTS[i])))
        disk = eng.kvbm.disk
        # Blocks spilled straight to disk are found once written; a GPU runs the prompts fast
        # enough to ask before that.
        for _ in range(3000):
            if disk is None or not disk.backlog():
                break
            await asyncio.sleep(0.01)
        again = await collect(eng.generate(request("again", PROMPTS[0])))
        onboarded = dict(eng.kvbm.cache.stats.onboard_blocks)
    assert again[0].cached_tokens == 24 and sum(onboarded.values()) == 6
    assert tokens(again) == tokens(cold)
