"""The worker serving a real mocker engine on the embedded runtime: registration, streaming,
numbered KV events, snapshot answers and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from dynamo import errors
from dynamo.config import RuntimeConfig
from dynamo.events import kv_events_subject, kv_snapshot_subject
from dynamo.model_registry import ModelWatcher
from dynamo.runtime import Runtime
from dynamo.wire import (
    KV_EVENT_CODEC,
    OUTPUT_CODEC,
    AllBlocksCleared,
    BlockStored,
    KvSnapshotRequest,
    PreprocessedRequest,
    StopConditions,
    encode,
)
from workers.mocker.args import MockerConfig
from workers.mocker.engine import MockerEngine
from workers.worker import Worker, WorkerConfig


def make_worker(runtime: Runtime, speedup_ratio: float = 1e9, stream_interval: int = 1) -> Worker:
    config = MockerConfig(
        block_size_tokens=4, num_gpu_blocks=64, max_model_len=128, speedup_ratio=speedup_ratio, vocab_size=100
    )
    engine = MockerEngine(config)
    worker_config = WorkerConfig(served_model_name="m", model_path="/nowhere", engine_name="mocker",
                                 stream_interval=stream_interval)
    return Worker(runtime, engine, worker_config)


def request(rid: str, prompt: list[int], max_tokens: int = 5) -> bytes:
    return encode(PreprocessedRequest(rid, "m", prompt, stop=StopConditions(max_tokens=max_tokens)))


async def test_worker_registers_its_model_and_streams_tokens() -> None:
    async with await Runtime.create(RuntimeConfig()) as rt:
        watcher = ModelWatcher(rt.discovery)
        await watcher.start()
        async with make_worker(rt) as worker:
            entry = await watcher.wait_for_model("m", 5)
            card = entry.cards[worker.instance_id]
            assert (card.context_length, card.kv_block_size, card.kv_total_blocks) == (128, 4, 64)
            client = await rt.endpoint("backend", "generate").client()
            stream = await client.generate(request("r1", list(range(10))), worker.instance_id, "r1")
            outputs = [OUTPUT_CODEC.decode(b) async for b in stream]
            assert sum(len(o.token_ids) for o in outputs) == 5
            assert outputs[-1].finish_reason == "length"
            await client.close()
        await watcher.close()


@pytest.mark.parametrize("interval", [1, 4])
async def test_stream_interval_groups_tokens_after_the_first(interval: int) -> None:
    """With --stream-interval N every message after the first holds at least N tokens but the
    last; with 1 a paced engine's tokens go one a message. The mocker paces its steps (a few ms
    each), so without the grouping the tokens would not have piled up."""
    async with await Runtime.create(RuntimeConfig()) as rt:
        async with make_worker(rt, speedup_ratio=5.0, stream_interval=interval) as worker:
            client = await rt.endpoint("backend", "generate").client()
            stream = await client.generate(request("r", list(range(10)), max_tokens=14), worker.instance_id, "r")
            sizes = [len(OUTPUT_CODEC.decode(b).token_ids) async for b in stream]
            await client.close()
    assert sum(sizes) == 14
    assert all(n >= interval for n in sizes[1:-1]), sizes
    if interval > 1:
        assert len(sizes) <= 1 + -(-13 // interval), sizes


def test_stream_interval_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="stream_interval"):
        WorkerConfig(served_model_name="m", model_path="/nowhere", engine_name="mocker", stream_interval=0)


async def test_over_long_prompt_is_a_clear_error() -> None:
    async with await Runtime.create(RuntimeConfig()) as rt:
        async with make_worker(rt) as worker:
            client = await rt.endpoint("backend", "generate").client()
            stream = await client.generate(request("r", list(range(200))), worker.instance_id, "r")
            with pytest.raises(errors.InvalidRequest, match="context"):
                async for _ in stream:
                    pass
            await client.close()


async def test_kv_events_are_numbered_and_snapshot_is_answered() -> None:
    async with await Runtime.create(RuntimeConfig()) as rt:
        sub = await rt.events.subscribe(kv_events_subject(rt.namespace, "backend"))
        async with make_worker(rt) as worker:
            client = await rt.endpoint("backend", "generate").client()
            stream = await client.generate(request("r", list(range(16)), max_tokens=1), worker.instance_id, "r")
            async for _ in stream:
                pass
            first = KV_EVENT_CODEC.decode(await asyncio.wait_for(sub.__anext__(), 5))
            assert first.event_id == 0 and first.worker_id == worker.instance_id
            assert isinstance(first.data, BlockStored)
            stored = set(first.data.block_hashes)

            await rt.events.publish(
                kv_snapshot_subject(rt.namespace, "backend"), encode(KvSnapshotRequest(worker.instance_id))
            )
            seen = [first]
            while not isinstance(seen[-1].data, AllBlocksCleared):
                seen.append(KV_EVENT_CODEC.decode(await asyncio.wait_for(sub.__anext__(), 5)))
            cleared_at = len(seen) - 1
            snapshot: set[int] = set()
            while snapshot != stored:
                event = KV_EVENT_CODEC.decode(await asyncio.wait_for(sub.__anext__(), 5))
                seen.append(event)
                assert isinstance(event.data, BlockStored)
                snapshot.update(event.data.block_hashes)
            assert [e.event_id for e in seen] == list(range(len(seen)))
            assert cleared_at >= 1
            await client.close()
        await sub.close()


async def test_caller_cancellation_frees_the_engines_blocks() -> None:
    async with await Runtime.create(RuntimeConfig()) as rt:
        config = MockerConfig(block_size_tokens=4, num_gpu_blocks=64, max_model_len=512, speedup_ratio=1.0, vocab_size=100)
        engine = MockerEngine(config)
        async with Worker(rt, engine, WorkerConfig("m", "/nowhere", "mocker")) as worker:
            client = await rt.endpoint("backend", "generate").client()
            stream = await client.generate(request("r", list(range(30)), max_tokens=400), worker.instance_id, "r")
            await stream.__anext__()
            assert engine.pool.num_active_blocks > 0
            await stream.aclose()
            for _ in range(1000):
                if engine.pool.num_active_blocks == 0:
                    break
                await asyncio.sleep(0.001)
            assert engine.pool.num_active_blocks == 0
            await client.close()


def test_coalesced_outputs_keep_every_logprob() -> None:
    """A worker merges outputs that are ready together into one frame; logprobs, top logprobs
    and the first output's prompt logprobs must survive the merge, token for token."""
    from dynamo.wire import EngineOutput, PromptTokenLogprob
    from workers.worker import _merge_outputs

    first = EngineOutput([5], logprobs=[-0.1], top_logprobs=[[(5, -0.1), (6, -2.0)]],
                         prompt_logprobs=[None, PromptTokenLogprob(-1.0, [(3, -1.0)])])
    second = EngineOutput([7], "stop", logprobs=[-0.2], top_logprobs=[[(7, -0.2), (8, -3.0)]])
    merged = _merge_outputs(first, second)
    assert merged is not None
    assert merged.token_ids == [5, 7] and merged.finish_reason == "stop"
    assert merged.logprobs == [-0.1, -0.2]
    assert merged.top_logprobs == [[(5, -0.1), (6, -2.0)], [(7, -0.2), (8, -3.0)]]
    assert merged.prompt_logprobs == first.prompt_logprobs
    # Outputs whose logprobs would not line up are not merged.
    assert _merge_outputs(EngineOutput([1]), second) is None
