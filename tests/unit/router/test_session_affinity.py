"""Session affinity: the table (sliding TTL, capacity) and the KV router's use of it (hit, miss,
re-pin when the worker is gone, normal scoring when it is overloaded)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from dynamo.config import RuntimeConfig
from dynamo.events import KvEventPublisher, kv_events_subject
from dynamo.runtime import Runtime
from dynamo.wire import BlockStored, LoadMetrics, PreprocessedRequest
from router.args import RouterConfig
from router.kv_router import KvRouter
from router.metrics import RouterMetrics
from router.session import SessionTable
from tests.unit.router.test_kv_router import BLOCK, COMP, HASHES, NS, PROMPT, A, B, C, until


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_pin_lasts_its_ttl_after_the_last_use() -> None:
    clock = FakeClock()
    table = SessionTable(10.0, clock)
    table.pin("s", A)
    clock.now += 9
    assert table.get("s") == A
    table.pin("s", A)  # used again: the TTL slides
    clock.now += 9
    assert table.get("s") == A
    clock.now += 1
    assert table.get("s") is None
    assert len(table) == 0


def test_expired_and_excess_pins_are_swept() -> None:
    clock = FakeClock()
    table = SessionTable(10.0, clock, capacity=3)
    for i in range(3):
        table.pin(f"old{i}", A)
    clock.now += 11
    table.pin("new", B)  # the expired ones go on the next pin, not only when looked up
    assert len(table) == 1
    for i in range(4):
        table.pin(f"s{i}", C)
    assert len(table) == 3
    assert table.get("new") is None  # least recently used
    assert table.get("s3") == C


def test_repinning_moves_a_session() -> None:
    table = SessionTable(10.0, FakeClock())
    table.pin("s", A)
    table.pin("s", B)
    assert table.get("s") == B
    with pytest.raises(ValueError):
        SessionTable(0, FakeClock())


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    async with await Runtime.create(RuntimeConfig()) as rt:
        yield rt


def session_request(request_id: str, session: str, tokens: list[int]) -> PreprocessedRequest:
    return PreprocessedRequest(request_id=request_id, model="m", token_ids=tokens, session_id=session)


def affinity(metrics: RouterMetrics, outcome: str) -> float:
    value = metrics.session_affinity.labels(f"{NS}/{COMP}", outcome)._value.get()
    return float(value)


async def test_a_session_stays_on_its_worker_and_repins_when_it_is_gone(runtime: Runtime) -> None:
    metrics = RouterMetrics(CollectorRegistry())
    config = RouterConfig(kv_block_size=BLOCK, seed=0, overlap_score_weight=0.0)
    async with KvRouter(config, runtime.events, NS, COMP, metrics) as router:

        async def turn(request_id: str, session: str, workers: list[int]) -> int:
            tokens = [hash(request_id) % 1000] * BLOCK * 4  # a different prompt each turn
            worker = (await router.select(session_request(request_id, session, tokens), workers)).instance_id
            router.first_token(request_id, worker)
            router.request_finished(request_id, worker)
            return worker

        # Pure load balancing (weight 0) would pick at random among idle workers; the pin holds.
        first = await turn("r0", "chat", [A, B, C])
        assert [await turn(f"r{i}", "chat", [A, B, C]) for i in range(1, 6)] == [first] * 5
        await turn("x", "other", [A, B, C])
        assert (affinity(metrics, "miss"), affinity(metrics, "hit")) == (2, 5)
        assert len(router.sessions or ()) == 2

        # The worker dies: the next request goes elsewhere and sticks there.
        rest = [w for w in (A, B, C) if w != first]
        router.instance_removed(first)
        moved = await turn("r6", "chat", rest)
        assert moved in rest
        assert [await turn(f"r{i}", "chat", rest) for i in range(7, 10)] == [moved] * 3
        assert affinity(metrics, "repin") == 1


async def test_an_overloaded_worker_yields_to_normal_scoring(runtime: Runtime) -> None:
    metrics = RouterMetrics(CollectorRegistry())
    config = RouterConfig(kv_block_size=BLOCK, seed=0)
    async with KvRouter(config, runtime.events, NS, COMP, metrics) as router:
        await KvEventPublisher(runtime.events, kv_events_subject(NS, COMP), A).publish(BlockStored(HASHES))
        await until(lambda: router.index is not None and router.index.find_matches(HASHES) == {A: 20})
        assert (await router.select(session_request("r0", "s", PROMPT), [A, B])).instance_id == A
        router.first_token("r0", A)
        router.request_finished("r0", A)
        # A reports heavy load (other routers' work): its cost passes twice B's, the session moves.
        router.load.update(LoadMetrics(worker_id=A, kv_active_blocks=5000, kv_total_blocks=8000))
        assert (await router.select(session_request("r1", "s", PROMPT), [A, B])).instance_id == B
        assert affinity(metrics, "overloaded") == 1
        router.first_token("r1", B)
        router.request_finished("r1", B)
        # ...and is pinned where it went: A, idle again and holding the prefix too, ties with B.
        router.load.update(LoadMetrics(worker_id=A, kv_active_blocks=0, kv_total_blocks=8000))
        assert (await router.select(session_request("r2", "s", PROMPT), [A, B])).instance_id == B
        assert affinity(metrics, "hit") == 1


async def test_overload_needs_the_ratio_and_a_margin(runtime: Runtime) -> None:
    # The e2e fleet's case: near idle, a 2-block prompt costs an idle worker 8 x 2 + 2 = 18, and
    # the pinned worker 30 with a load report still showing the previous turn's ~20 prompt
    # tokens: past 1.5x, yet a few blocks of work, not overload.
    from router.cost import WorkerCost

    async with KvRouter(RouterConfig(kv_block_size=BLOCK, seed=0), runtime.events, NS, COMP) as router:
        idle = WorkerCost(B, 0, 2, 2, 18.0)
        lagging = WorkerCost(A, 0, 3.25, 4, 30.0)
        busy = WorkerCost(A, 0, 40, 60, 380.0)
        assert not router._overloaded(lagging, [lagging, idle])
        assert router._overloaded(busy, [busy, idle])
    no_margin = RouterConfig(kv_block_size=BLOCK, seed=0, session_overload_min_blocks=0)
    async with KvRouter(no_margin, runtime.events, NS, COMP) as router:
        assert router._overloaded(lagging, [lagging, idle])  # the ratio alone moved it


async def test_affinity_off_or_without_a_session_scores_normally(runtime: Runtime) -> None:
    config = RouterConfig(kv_block_size=BLOCK, seed=0, overlap_score_weight=0.0, session_ttl_s=0)
    async with KvRouter(config, runtime.events, NS, COMP) as router:
        assert router.sessions is None
        picks = {
            (await router.select(session_request(f"r{i}", "s", [i] * BLOCK * 4), [A, B, C])).instance_id
            for i in range(3)
        }
        assert picks == {A, B, C}


def test_a_session_goes_to_one_router_replica_and_few_move_when_one_leaves() -> None:
    from router.remote import session_replica

    replicas = [101, 202, 303, 404]
    sessions = [f"s{i}" for i in range(400)]
    chosen = {s: session_replica(s, replicas) for s in sessions}
    assert all(session_replica(s, list(reversed(replicas))) == chosen[s] for s in sessions)
    assert len(set(chosen.values())) == 4  # spread over every replica
    remaining = [r for r in replicas if r != 202]
    moved = [s for s in sessions if session_replica(s, remaining) != chosen[s]]
    assert moved and all(chosen[s] == 202 for s in moved)  # only the leaver's sessions move
