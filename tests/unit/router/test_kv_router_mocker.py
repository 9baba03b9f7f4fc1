"""KvRouter against real mocker workers on the embedded runtime: the router's index follows
the workers' own events, prefixes route to their holder, and a router that starts late
catches up through the workers' snapshot answers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dynamo.config import RuntimeConfig
from dynamo.kv_hash import block_hashes
from dynamo.runtime import Runtime
from dynamo.runtime.runtime import Client
from dynamo.wire import PreprocessedRequest, StopConditions, encode
from router.args import RouterConfig
from router.kv_router import KvRouter
from tests.turns import until
from workers.mocker.args import MockerConfig
from workers.mocker.engine import MockerEngine
from workers.worker import Worker, WorkerConfig

BLOCK = 16
SHARED = list(range(100, 100 + 8 * BLOCK))  # an 8-block system prompt



def request(rid: str, tokens: list[int]) -> PreprocessedRequest:
    return PreprocessedRequest(rid, "m", tokens, stop=StopConditions(max_tokens=2))


async def run(client: Client, router: KvRouter, req: PreprocessedRequest, candidates: list[int]) -> int:
    decision = await router.select(req, candidates)
    stream = await client.generate(encode(req), decision.instance_id, req.request_id)
    async with stream:
        first = True
        async for _ in stream:
            if first:
                router.first_token(req.request_id, decision.instance_id)
                first = False
    router.request_finished(req.request_id, decision.instance_id)
    return decision.instance_id


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[Runtime, list[Worker], Client]]:
    async with await Runtime.create(RuntimeConfig()) as runtime:
        workers = []
        for _ in range(3):
            engine = MockerEngine(
                MockerConfig(
                    block_size_tokens=BLOCK, num_gpu_blocks=256, max_model_len=1024,
                    speedup_ratio=1e9, vocab_size=1000,
                )
            )
            worker = Worker(
                runtime.sibling(), engine,
                WorkerConfig(served_model_name="m", model_path="/nowhere", engine_name="mocker"),
            )
            await worker.start()
            workers.append(worker)
        client = await runtime.endpoint("backend", "generate").client()
        await client.wait_for_instances(5.0, at_least=3)
        try:
            yield runtime, workers, client
        finally:
            await client.close()
            for worker in workers:
                await worker.stop()


async def test_shared_prefix_follows_its_holder(fleet: tuple[Runtime, list[Worker], Client]) -> None:
    runtime, workers, client = fleet
    ids = [w.instance_id for w in workers]
    config = RouterConfig(kv_block_size=BLOCK, seed=0)
    async with KvRouter(config, runtime.events, runtime.namespace, "backend") as router:
        assert router.index is not None
        holder = await run(client, router, request("r0", SHARED + [1] * BLOCK), ids)
        hashes = block_hashes(SHARED, BLOCK)
        await until(lambda: router.index.find_matches(hashes).get(holder) == 8)
        for i in range(1, 5):
            assert await run(client, router, request(f"r{i}", SHARED + [i + 1] * BLOCK), ids) == holder

        # A router started now has missed every event: it asks each worker for a snapshot
        # when first offered them, and the workers' answers rebuild the same index.
        async with KvRouter(config, runtime.events, runtime.namespace, "backend") as late:
            assert late.index is not None
            await late.select(request("probe", [7] * BLOCK), ids)
            await until(lambda: late.index.find_matches(hashes).get(holder) == 8)
            assert late.index.blocks_of(holder) == router.index.blocks_of(holder)


async def test_router_replicas_agree(fleet: tuple[Runtime, list[Worker], Client]) -> None:
    """Two router replicas (two frontends) route alternately: both consume the same events,
    so they hold the same index, and with nothing in flight they make the same decision."""
    runtime, workers, client = fleet
    ids = [w.instance_id for w in workers]
    config = RouterConfig(kv_block_size=BLOCK, seed=0)
    ns = runtime.namespace
    async with KvRouter(config, runtime.events, ns, "backend") as one, KvRouter(
        config, runtime.events, ns, "backend"
    ) as two:
        assert one.index is not None and two.index is not None
        groups = [list(range(g * 1000, g * 1000 + 6 * BLOCK)) for g in range(1, 5)]
        holders: dict[int, set[int]] = {}
        for i in range(16):
            router = (one, two)[i % 2]
            group = i % len(groups)
            worker = await run(client, router, request(f"rep{i}", groups[group] + [i + 1] * BLOCK), ids)
            holders.setdefault(group, set()).add(worker)
            # Routing follows what a router has heard: let both hear this request's events.
            hashes = block_hashes(groups[group], BLOCK)
            await until(lambda: all(r.index.find_matches(hashes).get(worker) == 6 for r in (one, two)))  # type: ignore[union-attr]

        def same_index() -> bool:
            return all(one.index.blocks_of(w) == two.index.blocks_of(w) for w in ids)  # type: ignore[union-attr]

        await until(same_index)
        assert sum(len(one.index.blocks_of(w)) for w in ids) > 0
        # Each group stayed on the worker that first cached it, whichever replica routed it.
        assert all(len(h) == 1 for h in holders.values()), holders
        for group, tokens in enumerate(groups):
            probe = request(f"probe{group}", tokens + [999] * BLOCK)
            first, second = await one.select(probe, ids), await two.select(probe, ids)
            one.request_finished(probe.request_id, first.instance_id)
            two.request_finished(probe.request_id, second.instance_id)
            assert first.instance_id == second.instance_id == next(iter(holders[group]))
            assert first.overlap_blocks == second.overlap_blocks == 6


async def test_shared_prefix_leaves_its_holder_once_load_makes_another_cheaper(
    fleet: tuple[Runtime, list[Worker], Client],
) -> None:
    """A burst of requests sharing a prefix: the first ones go to the worker holding it, and
    once the holder's in-flight load outweighs the cached blocks, the rest go elsewhere."""
    runtime, workers, client = fleet
    ids = [w.instance_id for w in workers]
    config = RouterConfig(kv_block_size=BLOCK, seed=0)
    async with KvRouter(config, runtime.events, runtime.namespace, "backend") as router:
        assert router.index is not None
        holder = await run(client, router, request("warm", SHARED + [1] * BLOCK), ids)
        await until(lambda: router.index.find_matches(block_hashes(SHARED, BLOCK)).get(holder) == 8)
        # Arrivals faster than they finish: each decision counts the ones before it.
        chosen = [(await router.select(request(f"b{i}", SHARED + [i + 2] * BLOCK), ids)).instance_id for i in range(12)]
        assert chosen[0] == holder
        first_elsewhere = next(i for i, w in enumerate(chosen) if w != holder)
        assert first_elsewhere >= 2, chosen  # the cache was worth more than one request's load
        assert len(set(chosen)) >= 2
        for i, worker in enumerate(chosen):
            router.request_finished(f"b{i}", worker)
        # With the burst gone, the prefix goes where it is cached (or was just sent): no cold start.
        after = await router.select(request("after", SHARED + [99] * BLOCK), ids)
        assert after.instance_id in set(chosen) and after.overlap_blocks == 8
