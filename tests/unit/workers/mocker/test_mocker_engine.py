"""MockerEngine end to end through its async interface: determinism, prefix reuse, stop rules,
rejection of bad prompts, cancellation freeing blocks, preemption, metrics and snapshots.
Runs at a speedup where the step loop never sleeps; tests wait on tokens, never on time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dynamo import errors
from dynamo.wire import (BlockRemoved, BlockStored, EngineOutput, KvEventData, PreprocessedRequest,
                         SamplingOptions, StopConditions)
from tests.turns import until
from workers.mocker.args import MockerConfig
from workers.mocker.engine import MockerEngine

FAST = 1e9


def config(**overrides: object) -> MockerConfig:
    base: dict[str, object] = dict(block_size_tokens=16, num_gpu_blocks=256, max_model_len=1024,
                                   speedup_ratio=FAST, vocab_size=1000)
    base.update(overrides)
    return MockerConfig(**base)  # type: ignore[arg-type]


def request(prompt: list[int], max_tokens: int | None = 8, rid: str = "r", seed: int | None = None,
            **stop: object) -> PreprocessedRequest:
    return PreprocessedRequest(rid, "m", prompt, sampling=SamplingOptions(seed=seed),
                               stop=StopConditions(max_tokens=max_tokens, **stop))  # type: ignore[arg-type]


async def collect(engine: MockerEngine, req: PreprocessedRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(req)]



def tokens(outputs: list[EngineOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


@pytest.fixture
async def engine() -> AsyncIterator[MockerEngine]:
    async with MockerEngine(config()) as e:
        yield e  # type: ignore[misc]


async def test_start_reports_engine_info() -> None:
    e = MockerEngine(config())
    info = await e.start()
    try:
        assert (info.context_length, info.kv_block_size, info.kv_total_blocks) == (1024, 16, 256)
    finally:
        await e.stop()


async def test_tokens_are_deterministic_for_a_seed(engine: MockerEngine) -> None:
    prompt = list(range(40))
    a = tokens(await collect(engine, request(prompt, 20)))
    async with MockerEngine(config()) as other:
        b = tokens(await collect(other, request(prompt, 20)))
    assert a == b and len(a) == 20 and all(0 <= t < 1000 for t in a)
    seeded = tokens(await collect(engine, request(prompt, 20, seed=7)))
    assert seeded != a
    assert tokens(await collect(engine, request(prompt, 20, seed=7))) == seeded
    assert tokens(await collect(engine, request(prompt[:-1], 20))) != a


async def test_excluded_ids_are_never_generated() -> None:
    async with MockerEngine(config(vocab_size=8, exclude_token_ids=frozenset({0, 1, 2, 3}))) as e:
        out = tokens(await collect(e, request([5] * 20, 200)))
    assert set(out) <= {4, 5, 6, 7} and len(out) == 200


async def test_max_tokens_ends_with_length_and_sends_one_token_per_chunk(engine: MockerEngine) -> None:
    out = await collect(engine, request(list(range(20)), 5))
    assert [len(o.token_ids) for o in out] == [1] * 5
    assert [o.finish_reason for o in out] == [None] * 4 + ["length"]
    assert out[0].cached_tokens == 0 and all(o.cached_tokens is None for o in out[1:])


async def test_stop_token_ends_with_stop_unless_below_min_tokens(engine: MockerEngine) -> None:
    prompt = list(range(30))
    free = tokens(await collect(engine, request(prompt, 30)))
    stop_id = free[2]
    k = free.index(stop_id)
    out = await collect(engine, request(prompt, 30, stop_token_ids=[stop_id]))
    assert tokens(out) == free[: k + 1] and out[-1].finish_reason == "stop"
    # min_tokens bans the stop before it, as a real engine does: the stream's next candidate
    # takes its place, and generation runs on past it.
    out = await collect(engine, request(prompt, 30, stop_token_ids=[stop_id], min_tokens=k + 2))
    got = tokens(out)
    assert len(out) > k + 1 and stop_id not in got[: k + 2]
    assert got[:k] == free[:k] and got[k + 1] == free[k + 1]


async def test_context_length_ends_with_length() -> None:
    async with MockerEngine(config(max_model_len=32)) as e:
        out = await collect(e, request(list(range(25)), None))
    assert len(out) == 7 and out[-1].finish_reason == "length"


async def test_migrated_request_counts_earlier_tokens_against_max_tokens(engine: MockerEngine) -> None:
    req = PreprocessedRequest("r", "m", list(range(20)), stop=StopConditions(max_tokens=10), generated_before=6)
    assert len(await collect(engine, req)) == 4
    done = PreprocessedRequest("r", "m", list(range(20)), stop=StopConditions(max_tokens=6), generated_before=6)
    with pytest.raises(errors.InvalidRequest):
        await collect(engine, done)


async def test_over_long_prompt_is_rejected_naming_the_lengths(engine: MockerEngine) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        await collect(engine, request(list(range(1024)), 4))
    assert "1024" in exc.value.message and "1023" in exc.value.message
    assert len(await collect(engine, request(list(range(1023)), 4))) == 1  # room for one token
    with pytest.raises(errors.InvalidRequest):
        await collect(engine, request([], 4))


async def test_prompt_that_can_never_fit_the_pool_is_rejected() -> None:
    async with MockerEngine(config(num_gpu_blocks=4)) as e:  # 64 tokens of KV
        with pytest.raises(errors.InvalidRequest) as exc:
            await collect(e, request(list(range(64)), 4))
        assert "64" in exc.value.message
        out = await collect(e, request(list(range(60)), 20))
    assert len(out) == 4 and out[-1].finish_reason == "length"  # capped at the pool's 64 tokens


async def test_identical_prompt_reuses_the_prefix_and_stores_nothing_new() -> None:
    events: list[KvEventData] = []
    e = MockerEngine(config())
    await e.start(events.append)
    try:
        prompt = list(range(100, 164))  # four full blocks
        first = await collect(e, request(prompt, 4))
        shared = [h for ev in events if isinstance(ev, BlockStored) for h in ev.block_hashes]
        assert len(shared) == 4 and first[0].cached_tokens == 0
        events.clear()
        second = await collect(e, request(prompt, 4))
        # Three blocks come from the cache; the last is recomputed to get the next token.
        assert second[0].cached_tokens == 48
        assert not any(isinstance(ev, BlockStored) and set(ev.block_hashes) & set(shared) for ev in events)
        assert tokens(second) == tokens(first)
        assert e.kv_snapshot() == [BlockStored(shared, None)]
    finally:
        await e.stop()


async def test_eviction_emits_removed_for_evicted_blocks() -> None:
    events: list[KvEventData] = []
    e = MockerEngine(config(num_gpu_blocks=6))
    await e.start(events.append)
    try:
        await collect(e, request(list(range(64)), 1))  # caches 4 of the 6 blocks
        await collect(e, request(list(range(1000, 1064)), 1))  # needs 4: evicts 2
        removed = [h for ev in events if isinstance(ev, BlockRemoved) for h in ev.block_hashes]
        stored = [h for ev in events if isinstance(ev, BlockStored) for h in ev.block_hashes]
        live = set(stored) - set(removed)
        assert len(removed) == 2 and live == {h for ev in e.kv_snapshot() for h in ev.block_hashes}  # type: ignore[union-attr]
    finally:
        await e.stop()


async def test_closing_the_stream_aborts_and_frees_blocks(engine: MockerEngine) -> None:
    stream = engine.generate(request(list(range(200)), 1000))
    first = await anext(stream)
    assert first.finish_reason is None
    assert engine.pool.num_active_blocks > 0 and engine.load_metrics().active_requests == 1
    await stream.aclose()  # type: ignore[attr-defined]
    assert engine.pool.num_active_blocks == 0
    assert engine.load_metrics().active_requests == 0


async def test_cancelling_the_consumer_aborts_and_frees_blocks(engine: MockerEngine) -> None:
    got_token = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(request(list(range(200)), 100_000)):
            got_token.set()

    task = asyncio.create_task(consume())
    await got_token.wait()
    assert engine.pool.num_active_blocks > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.pool.num_active_blocks == 0
    assert engine.scheduler.num_running == engine.scheduler.num_waiting == 0
    # The engine keeps serving.
    assert len(await collect(engine, request([1, 2, 3], 3))) == 3


async def test_tiny_pool_preempts_and_still_completes_every_request() -> None:
    cfg = config(block_size_tokens=4, num_gpu_blocks=12, max_num_seqs=8)
    async with MockerEngine(cfg) as e:
        reqs = [request([i] * 10, 20, rid=f"r{i}") for i in range(6)]
        results = await asyncio.gather(*(collect(e, r) for r in reqs))
        assert e.scheduler.num_preemptions > 0
        assert e.pool.num_active_blocks == 0
    for out in results:
        assert len(tokens(out)) == 20 and out[-1].finish_reason == "length"
    async with MockerEngine(config(block_size_tokens=4)) as roomy:
        alone = [tokens(await collect(roomy, r)) for r in reqs]
    assert [tokens(o) for o in results] == alone


async def test_load_metrics_and_engine_time() -> None:
    cfg = config(max_num_seqs=1)
    async with MockerEngine(cfg) as e:
        assert e.load_metrics().kv_total_blocks == 256
        first_token = asyncio.Event()

        async def consume(req: PreprocessedRequest) -> None:
            async for _ in e.generate(req):
                first_token.set()

        a = asyncio.create_task(consume(request(list(range(64)), 5000, rid="a")))
        await first_token.wait()
        b = asyncio.create_task(consume(request(list(range(500, 540)), 3, rid="b")))
        await until(lambda: e.scheduler.num_waiting == 1)  # b queued behind a (max_num_seqs=1)
        m = e.load_metrics()
        assert (m.active_requests, m.waiting_requests, m.waiting_prefill_tokens) == (1, 1, 40)
        assert m.kv_active_blocks == e.pool.num_active_blocks > 0 and m.timestamp_s > 0
        a.cancel()
        await asyncio.gather(a, return_exceptions=True)
        await b
        assert e.num_steps > 0 and 0 < e.engine_time_s < 1e-3  # sped up by 1e9


async def test_stop_fails_in_flight_requests_with_a_clear_error() -> None:
    e = MockerEngine(config())
    await e.start()
    stream = e.generate(request(list(range(50)), 100_000))
    await anext(stream)
    await e.stop()
    with pytest.raises(errors.EngineError):
        async for _ in stream:
            pass
    assert e.pool.num_active_blocks == 0
    with pytest.raises(errors.EngineError):
        await collect(e, request([1], 1))
