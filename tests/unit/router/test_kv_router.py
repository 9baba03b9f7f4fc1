"""KvRouter and the other modes end to end on the embedded runtime's event plane: events in,
decisions out, snapshot requests on gaps and for unknown workers, removal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from dynamo import errors
from dynamo.config import RuntimeConfig
from dynamo.events import (
    KvEventPublisher,
    LoadPublisher,
    kv_events_subject,
    kv_snapshot_subject,
    load_metrics_subject,
)
from dynamo.kv_hash import block_hashes
from dynamo.runtime import Runtime
from dynamo.runtime.planes import Subscription
from dynamo.wire import (
    SNAPSHOT_REQUEST_CODEC,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvCacheEvent,
    LoadMetrics,
    PreprocessedRequest,
    encode,
)
from router.args import RouterConfig
from router.base import RandomRouter, RoundRobinRouter
from router.kv_router import KvRouter
from router.load_aware import LeastLoadedRouter
from router.modes import make_router
from router.metrics import RouterMetrics
from tests.turns import until

NS, COMP = "test", "backend"
A, B, C = 0xA, 0xB, 0xC
BLOCK = 16
PROMPT = list(range(1000, 1000 + 20 * BLOCK))  # 20 full blocks
HASHES = block_hashes(PROMPT, BLOCK)



def request(request_id: str, tokens: list[int] = PROMPT) -> PreprocessedRequest:
    return PreprocessedRequest(request_id=request_id, model="m", token_ids=tokens)


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    async with await Runtime.create(RuntimeConfig()) as rt:
        yield rt


@pytest.fixture
async def snapshots(runtime: Runtime) -> AsyncIterator[Subscription]:
    sub = await runtime.events.subscribe(kv_snapshot_subject(NS, COMP))
    yield sub
    await sub.close()


async def next_snapshot_request(sub: Subscription) -> int:
    payload = await asyncio.wait_for(sub.__anext__(), timeout=5.0)
    return SNAPSHOT_REQUEST_CODEC.decode(payload).worker_id


def kv_router(runtime: Runtime, **overrides: object) -> KvRouter:
    config = RouterConfig(kv_block_size=BLOCK, seed=0, **overrides)  # type: ignore[arg-type]
    return KvRouter(config, runtime.events, NS, COMP)


async def test_request_goes_to_the_worker_holding_its_prefix(runtime: Runtime) -> None:
    subject = kv_events_subject(NS, COMP)
    async with kv_router(runtime) as router:
        a = KvEventPublisher(runtime.events, subject, A)
        b = KvEventPublisher(runtime.events, subject, B)
        await a.publish(BlockStored(HASHES[:3]))
        await b.publish(BlockStored(HASHES[:12]))
        assert router.index is not None
        await until(lambda: router.index.find_matches(HASHES) == {A: 3, B: 12})

        decision = await router.select(request("r1"), [A, B, C])
        assert (decision.instance_id, decision.overlap_blocks) == (B, 12)

        # B evicts the prefix: the next request with it goes elsewhere.
        await b.publish(BlockRemoved(HASHES[:12]))
        await until(lambda: B not in router.index.find_matches(HASHES))
        router.request_finished("r1", B)
        decision = await router.select(request("r2"), [A, B, C])
        assert (decision.instance_id, decision.overlap_blocks) == (A, 3)


async def test_load_beats_overlap_when_the_holder_is_busy(runtime: Runtime) -> None:
    async with kv_router(runtime) as router:
        await KvEventPublisher(runtime.events, kv_events_subject(NS, COMP), B).publish(
            BlockStored(HASHES)
        )
        await LoadPublisher(runtime.events, load_metrics_subject(NS, COMP)).publish(
            LoadMetrics(worker_id=B, kv_active_blocks=400, kv_total_blocks=1000)
        )
        await until(lambda: router.load.load(B).decode_blocks == 400)
        await until(lambda: router.index is not None and router.index.find_matches(HASHES) == {B: 20})
        decision = await router.select(request("r1"), [A, B])
        assert decision.instance_id == A


async def test_in_flight_requests_spread_a_burst(runtime: Runtime) -> None:
    """Before any worker reports, the router's own predictions keep a burst off one worker."""
    async with kv_router(runtime, overlap_score_weight=0.0) as router:
        picks = [
            (await router.select(request(f"r{i}", [i] * BLOCK * 4), [A, B, C])).instance_id
            for i in range(6)
        ]
        assert sorted(picks) == [A, A, B, B, C, C]
        for i, worker in enumerate(picks):
            router.first_token(f"r{i}", worker)
            router.request_finished(f"r{i}", worker)
        assert router.load.inflight_requests() == 0


async def test_a_gap_asks_the_worker_for_a_snapshot(runtime: Runtime, snapshots: Subscription) -> None:
    subject = kv_events_subject(NS, COMP)
    async with kv_router(runtime) as router:
        assert router.index is not None
        await runtime.events.publish(subject, encode(KvCacheEvent(A, 0, BlockStored(HASHES[:2]))))
        await runtime.events.publish(subject, encode(KvCacheEvent(A, 2, BlockStored(HASHES[2:4]))))
        assert await next_snapshot_request(snapshots) == A
        assert router.index.needs_resync(A)
        # The worker answers with a clear and its whole cache, numbered on.
        await runtime.events.publish(subject, encode(KvCacheEvent(A, 3, AllBlocksCleared())))
        await runtime.events.publish(subject, encode(KvCacheEvent(A, 4, BlockStored(HASHES[:5]))))
        await until(lambda: router.index.find_matches(HASHES) == {A: 5})
        assert not router.index.needs_resync(A)


async def test_an_unknown_candidate_is_asked_for_a_snapshot_once(
    runtime: Runtime, snapshots: Subscription
) -> None:
    registry = CollectorRegistry()
    config = RouterConfig(kv_block_size=BLOCK)
    async with KvRouter(config, runtime.events, NS, COMP, RouterMetrics(registry)) as router:
        await router.select(request("r1"), [C])
        assert await next_snapshot_request(snapshots) == C
        await router.select(request("r2"), [C])
        await KvEventPublisher(runtime.events, kv_events_subject(NS, COMP), A).publish(
            BlockStored(HASHES[:1])
        )
        await until(lambda: router.index is not None and bool(router.index.find_matches(HASHES)))
        await router.select(request("r3"), [A, C])  # A was heard from: no request for it
        sent = registry.get_sample_value(
            "dynamo_router_snapshot_requests_total", {"component": f"{NS}/{COMP}"}
        )
        assert sent == 1


async def test_removed_instance_leaves_the_index_and_stays_out(runtime: Runtime) -> None:
    subject = kv_events_subject(NS, COMP)
    async with kv_router(runtime) as router:
        assert router.index is not None
        b = KvEventPublisher(runtime.events, subject, B)
        await b.publish(BlockStored(HASHES))
        await until(lambda: router.index.find_matches(HASHES) == {B: 20})
        await router.select(request("r1"), [A, B])
        router.instance_removed(B)
        assert router.index.find_matches(HASHES) == {}
        assert router.load.inflight_requests() == 0
        # A late event of the dead worker must not bring it back.
        await b.publish(BlockStored(HASHES[:3]))
        a = KvEventPublisher(runtime.events, subject, A)
        await a.publish(BlockStored(HASHES[:1]))
        await until(lambda: router.index.find_matches(HASHES) == {A: 1})
        assert B not in router.index.workers()


async def test_malformed_events_are_dropped(runtime: Runtime) -> None:
    registry = CollectorRegistry()
    config = RouterConfig(kv_block_size=BLOCK)
    async with KvRouter(config, runtime.events, NS, COMP, RouterMetrics(registry)) as router:
        await runtime.events.publish(kv_events_subject(NS, COMP), b"\x01garbage")
        await KvEventPublisher(runtime.events, kv_events_subject(NS, COMP), A).publish(
            BlockStored(HASHES[:2])
        )
        await until(lambda: router.index is not None and router.index.find_matches(HASHES) == {A: 2})
        labels = {"component": f"{NS}/{COMP}", "outcome": "invalid"}
        assert registry.get_sample_value("dynamo_router_kv_events_total", labels) == 1
        # The applied event's age was measured from its publication timestamp.
        lag = {"component": f"{NS}/{COMP}"}
        assert registry.get_sample_value("dynamo_router_kv_event_lag_seconds_count", lag) == 1
        assert 0 <= registry.get_sample_value("dynamo_router_kv_event_lag_seconds_sum", lag) < 60
        await router.select(request("r1"), [A])
        assert registry.get_sample_value("dynamo_router_index_blocks", {"component": f"{NS}/{COMP}"}) == 2
        assert (
            registry.get_sample_value("dynamo_router_decisions_total", {"mode": "kv", "worker": "a"})
            == 1
        )


async def test_approximate_mode_follows_its_own_decisions(runtime: Runtime) -> None:
    async with kv_router(runtime, use_kv_events=False) as router:
        first = await router.select(request("r1"), [A, B, C])
        assert first.overlap_blocks == 0
        router.first_token("r1", first.instance_id)
        router.request_finished("r1", first.instance_id)
        again = await router.select(request("r2", PROMPT + [1] * BLOCK), [A, B, C])
        assert (again.instance_id, again.overlap_blocks) == (first.instance_id, 20)


async def test_least_loaded_picks_the_lightest_worker(runtime: Runtime) -> None:
    config = RouterConfig(kv_block_size=BLOCK, seed=0)
    async with LeastLoadedRouter(config, runtime.events, NS, COMP) as router:
        publisher = LoadPublisher(runtime.events, load_metrics_subject(NS, COMP))
        await publisher.publish(LoadMetrics(worker_id=A, kv_active_blocks=60))
        await publisher.publish(LoadMetrics(worker_id=B, kv_active_blocks=10))
        await until(lambda: router.load.load(A).decode_blocks == 60)
        await until(lambda: router.load.load(B).decode_blocks == 10)
        # Each request adds 20 prefill and 20 decode blocks: costs A 100 vs B 50, 90, 130.
        assert (await router.select(request("r1"), [A, B])).instance_id == B
        assert (await router.select(request("r2"), [A, B])).instance_id == B
        assert (await router.select(request("r3"), [A, B])).instance_id == A


async def test_no_candidates_is_an_error(runtime: Runtime) -> None:
    async with kv_router(runtime) as router:
        with pytest.raises(errors.NoInstances):
            await router.select(request("r1"), [])


async def test_close_cancels_every_task(runtime: Runtime) -> None:
    router = kv_router(runtime)
    await router.start()
    await router.select(request("r1"), [A])  # spawns a snapshot request
    await router.close()
    assert not router._tasks


async def test_factory_builds_every_mode(runtime: Runtime) -> None:
    config = RouterConfig()
    assert isinstance(make_router("round-robin", config, runtime.events, NS, COMP), RoundRobinRouter)
    assert isinstance(make_router("random", config, runtime.events, NS, COMP), RandomRouter)
    assert isinstance(make_router("kv", config, runtime.events, NS, COMP), KvRouter)
    assert isinstance(make_router("least_loaded", config, runtime.events, NS, COMP), LeastLoadedRouter)
    with pytest.raises(ValueError):
        make_router("fastest", config, runtime.events, NS, COMP)


async def test_a_burst_sharing_a_prefix_follows_the_first_before_its_events(runtime: Runtime) -> None:
    """With events on, the router also predicts from its own decisions (for a few seconds):
    requests sharing a prefix, sent before the first one's KV events arrive, stay together
    instead of cold-starting the prefix on every worker; an eviction event overrules it."""
    async with kv_router(runtime) as router:
        first = await router.select(request("p0", PROMPT + [1] * BLOCK), [A, B, C])
        router.first_token("p0", first.instance_id)  # prefilled; its events are still on the way
        second = await router.select(request("p1", PROMPT + [2] * BLOCK), [A, B, C])
        assert second.instance_id == first.instance_id and second.overlap_blocks == 20
        for rid, decision in (("p0", first), ("p1", second)):
            router.request_finished(rid, decision.instance_id)
        await KvEventPublisher(runtime.events, kv_events_subject(NS, COMP), first.instance_id).publish(
            BlockRemoved(HASHES)
        )
        await until(lambda: router.predicted is not None and not router.predicted.find_matches(HASHES, 0.0))
    async with kv_router(runtime, prediction_ttl_s=0.0) as plain:
        assert plain.predicted is None
        first = await plain.select(request("q0", PROMPT + [1] * BLOCK), [A, B, C])
        plain.first_token("q0", first.instance_id)
        second = await plain.select(request("q1", PROMPT + [2] * BLOCK), [A, B, C])
        assert second.overlap_blocks == 0  # nothing heard yet: no overlap anywhere
