"""frontend/admission.py: priority bands, weighted fair queuing between tenants (dequeue order),
the bounded queue, queue timeouts, leaving the queue, and TTFT-target shedding or holding; then
through a real frontend: 503 + Retry-After on a queue timeout in each API's error shape, and
the priority header refused for an untrusted tenant."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dynamo import errors
from frontend.admission import AdmissionConfig, AdmissionGate, Ticket
from frontend.errors import PriorityNotAllowed, QueueTimeout, TooManyRequests, TtftTargetMissed
from frontend.metrics import FrontendMetrics
from frontend.tenants import PriorityClass, Tenant, TenantsFileError, TenantTable, parse_tenants
from router.load import LoadTracker
from router.ttft_estimate import TtftPrediction, predict_ttft
from tests.unit.frontend.conftest import MODEL, Stack
from tests.unit.frontend.test_reliability import _body, _frontend, _start

CLASSES = (
    PriorityClass("interactive"),
    PriorityClass("default"),
    PriorityClass("batch", queue_timeout_s=0.05),
)


def _gate(
    max_inflight: int = 1,
    max_waiting: int = 100,
    queue_timeout_s: float = 30.0,
    classes: tuple[PriorityClass, ...] = CLASSES,
    predictor: Callable[[str, int, int], TtftPrediction | None] | None = None,
) -> tuple[AdmissionGate, CollectorRegistry]:
    registry = CollectorRegistry()
    table = TenantTable({}, classes)
    gate = AdmissionGate(
        AdmissionConfig(max_inflight, max_waiting, queue_timeout_s), FrontendMetrics(registry), lambda: table, predictor
    )
    return gate, registry


def _ticket(tenant: str, cls: str = "default", weight: float = 1.0, max_tokens: int = 100) -> Ticket:
    body = json.dumps({"model": "m", "prompt": "x" * 396, "max_tokens": max_tokens}).encode()  # 106 tokens + max
    return Ticket(tenant, weight, next(c for c in CLASSES if c.name == cls), body)


class Queue:
    """Waiters started in order; `admitted` lists their labels in the order they got a slot."""

    def __init__(self, gate: AdmissionGate, registry: CollectorRegistry, *holding: Ticket) -> None:
        self.gate = gate
        self.registry = registry
        self.holding = list(holding)  # tickets holding slots, oldest first
        self.admitted: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    def _depth(self, ticket: Ticket) -> float:
        labels = {"priority": ticket.priority.name, "tenant": ticket.tenant}
        return self.registry.get_sample_value("dynamo_frontend_queue_depth", labels) or 0.0

    async def add(self, label: str, ticket: Ticket) -> None:
        """Returns once the request waits in the queue (or was refused)."""

        async def wait() -> None:
            await self.gate.acquire(ticket)
            self.admitted.append(label)
            self.holding.append(ticket)

        depth = self._depth(ticket)
        self.tasks.append(asyncio.create_task(wait()))
        while self._depth(ticket) == depth and not self.tasks[-1].done():
            await asyncio.sleep(0)

    async def serve_one(self) -> None:
        """The oldest slot holder ends; the next waiter gets the slot."""
        before = len(self.admitted)
        self.gate.release(self.holding.pop(0))
        while len(self.admitted) == before:
            await asyncio.sleep(0)

    async def serve_all(self) -> list[str]:
        while self.gate.waiting:
            await self.serve_one()
        return self.admitted


async def test_a_higher_class_overtakes_queued_lower_ones() -> None:
    gate, registry = _gate()
    await gate.acquire(holder := _ticket("holder"))  # the one slot is taken
    queue = Queue(gate, registry, holder)
    await queue.add("batch-1", _ticket("b", "batch"))
    await queue.add("default-1", _ticket("d"))
    await queue.add("interactive-1", _ticket("i", "interactive"))
    assert await queue.serve_all() == ["interactive-1", "default-1", "batch-1"]


async def test_a_flooding_tenant_does_not_starve_another() -> None:
    gate, registry = _gate()
    await gate.acquire(holder := _ticket("holder"))
    queue = Queue(gate, registry, holder)
    for i in range(10):
        await queue.add(f"flood-{i}", _ticket("flood"))
    await queue.add("quiet-0", _ticket("quiet"))
    await queue.add("quiet-1", _ticket("quiet"))
    order = await queue.serve_all()
    # FIFO would serve the quiet tenant 11th and 12th; fair queuing alternates from its arrival.
    assert order.index("quiet-0") <= 1 and order.index("quiet-1") <= 3, order
    assert [o for o in order if o.startswith("flood")] == [f"flood-{i}" for i in range(10)]  # FIFO per tenant


async def test_weights_share_a_class_in_proportion() -> None:
    gate, registry = _gate()
    await gate.acquire(holder := _ticket("holder"))
    queue = Queue(gate, registry, holder)
    for i in range(12):
        await queue.add(f"heavy-{i}", _ticket("heavy", weight=3.0))
        await queue.add(f"light-{i}", _ticket("light", weight=1.0))
    order = await queue.serve_all()
    first = order[:12]
    assert sum(o.startswith("heavy") for o in first) == 9, first  # 3 : 1


async def test_fair_queuing_counts_tokens_not_requests() -> None:
    gate, registry = _gate()
    await gate.acquire(holder := _ticket("holder"))
    queue = Queue(gate, registry, holder)
    for i in range(4):
        await queue.add(f"big-{i}", _ticket("big", max_tokens=1894))  # 2000 tokens each
    for i in range(8):
        await queue.add(f"small-{i}", _ticket("small", max_tokens=394))  # 500 tokens each
    order = await queue.serve_all()
    # Each big request is worth four small ones: the small tenant's eight come before the big one's third.
    assert order.index("small-7") < order.index("big-2"), order


async def test_queue_timeout_is_a_503_error_and_leaves_the_queue() -> None:
    gate, registry = _gate()
    await gate.acquire(holder := _ticket("holder"))
    with pytest.raises(QueueTimeout) as info:
        await gate.acquire(_ticket("b", "batch"))  # batch: 50 ms timeout
    assert info.value.retry_after_s >= 1
    assert gate.waiting == 0
    assert registry.get_sample_value("dynamo_frontend_queue_depth", {"priority": "batch", "tenant": "b"}) == 0
    assert registry.get_sample_value("dynamo_frontend_rejected_requests_total", {"reason": "queue_timeout"}) == 1
    gate.release(holder)
    assert gate.count == 0


async def test_a_full_queue_refuses_or_displaces_the_request_due_last() -> None:
    gate, registry = _gate(max_waiting=2)
    await gate.acquire(holder := _ticket("holder"))
    queue = Queue(gate, registry, holder)
    await queue.add("flood-1", _ticket("flood"))
    await queue.add("flood-2", _ticket("flood"))
    with pytest.raises(TooManyRequests):
        await gate.acquire(_ticket("flood"))  # it would be served after every waiter: refused
    await queue.add("quiet-1", _ticket("quiet", max_tokens=10))  # due before flood-2: flood-2 makes room
    with pytest.raises(TooManyRequests):
        await queue.tasks[1]
    await queue.add("interactive-1", _ticket("i", "interactive"))  # a higher class: the lower band's last goes
    with pytest.raises(TooManyRequests):
        await queue.tasks[0]
    assert gate.waiting == 2
    assert await queue.serve_all() == ["interactive-1", "quiet-1"]
    assert registry.get_sample_value("dynamo_frontend_rejected_requests_total", {"reason": "overloaded"}) == 3


async def test_without_a_queue_past_the_limit_is_429_at_once() -> None:
    gate, _ = _gate(max_waiting=0)
    await gate.acquire(holder := _ticket("holder"))
    with pytest.raises(TooManyRequests):
        await gate.acquire(_ticket("other"))
    gate.release(holder)
    await gate.acquire(_ticket("other"))


async def test_headroom_lets_a_tenant_below_the_largest_holder_in_past_the_limit() -> None:
    registry = CollectorRegistry()
    table = TenantTable({}, CLASSES)
    config = AdmissionConfig(max_inflight=4, max_waiting=10, fair_share_headroom=0.5)  # 2 slots beyond 4
    gate = AdmissionGate(config, FrontendMetrics(registry), lambda: table)
    flood = [_ticket("flood") for _ in range(4)]
    for ticket in flood:
        await gate.acquire(ticket)
    queue = Queue(gate, registry, *flood)
    await queue.add("flood-5", _ticket("flood"))  # over its share: waits
    await gate.acquire(_ticket("quiet"))  # holds fewer than the flooding tenant: in at once, past the limit
    await gate.acquire(_ticket("quiet"))
    assert gate.count == 6
    await queue.add("quiet-3", _ticket("quiet"))  # the headroom (6 of 6) is used: it waits
    assert gate.waiting == 2
    for ticket in flood[:2]:
        gate.release(ticket)
    while not queue.admitted:
        await asyncio.sleep(0)
    # The first release went to the quiet tenant, within its share (3 of 6) while the flooding
    # tenant is over its own; the flooding tenant's slot was not replaced past the limit.
    assert queue.admitted == ["quiet-3"] and gate.count == 5
    queue.holding = flood[2:]
    assert await queue.serve_all() == ["quiet-3", "flood-5"]


async def test_a_waiting_tenant_below_the_largest_holder_goes_first_past_the_limit() -> None:
    registry = CollectorRegistry()
    table = TenantTable({}, CLASSES)
    config = AdmissionConfig(max_inflight=4, max_waiting=10, fair_share_headroom=0.5)
    gate = AdmissionGate(config, FrontendMetrics(registry), lambda: table)
    flood = [_ticket("flood") for _ in range(4)]
    for ticket in flood:
        await gate.acquire(ticket)
    queue = Queue(gate, registry, *flood)
    await queue.add("flood-5", _ticket("flood"))
    await gate.acquire(_ticket("quiet"))
    await gate.acquire(_ticket("quiet"))  # 6 of 6: the headroom is used up
    await queue.add("light-1", _ticket("light"))  # holds none, but no room: waits
    gate.release(flood[0])  # 5 held, still past the limit: only a tenant below the largest holder goes
    while not queue.admitted:
        await asyncio.sleep(0)
    assert queue.admitted == ["light-1"] and gate.count == 6
    assert gate.waiting == 1  # flood-5 waits for the count to fall below the limit


async def test_headroom_is_a_reserve_for_a_tenant_within_its_share() -> None:
    registry = CollectorRegistry()
    table = TenantTable({}, CLASSES)
    config = AdmissionConfig(max_inflight=6, max_waiting=10, fair_share_headroom=0.5)  # 9 in all: 3 a tenant
    gate = AdmissionGate(config, FrontendMetrics(registry), lambda: table)
    held = [_ticket(t) for t in ("flood", "flood", "light-a", "light-a", "light-b", "light-b")]
    for ticket in held:
        await gate.acquire(ticket)
    queue = Queue(gate, registry, *held)
    for n in range(3, 7):  # the flooding tenant's demand, 2 held and 4 waiting, is over its share
        await queue.add(f"flood-{n}", _ticket("flood"))
    # light-a holds as many slots as the flooding tenant (not below the top), but its demand is
    # within its share of the capacity while the flooding tenant's is over: in at once.
    await gate.acquire(_ticket("light-a"))
    assert gate.count == 7
    await queue.add("light-a-4", _ticket("light-a"))  # 4 would be over its share: it waits
    assert gate.waiting == 5
    gate.release(held[0])  # 6 held, at the limit: the flooding tenant's slot is not replaced
    for _ in range(3):
        await asyncio.sleep(0)
    assert gate.count == 6 and queue.admitted == []


async def test_tenants_within_their_shares_keep_to_the_limit() -> None:
    registry = CollectorRegistry()
    table = TenantTable({}, CLASSES)
    config = AdmissionConfig(max_inflight=4, max_waiting=10, fair_share_headroom=0.5)  # 6 in all: 3 a tenant
    gate = AdmissionGate(config, FrontendMetrics(registry), lambda: table)
    held = [_ticket("a"), _ticket("a"), _ticket("b"), _ticket("b")]
    for ticket in held:
        await gate.acquire(ticket)
    queue = Queue(gate, registry, *held)
    # Within its share, but no tenant is over its own to pay the slot back, and it would not hold
    # fewer than the largest holder: it waits.
    await queue.add("a-3", _ticket("a"))
    assert gate.count == 4 and gate.waiting == 1
    assert await queue.serve_all() == ["a-3"]
    # One tenant alone keeps to the limit too.
    alone, alone_registry = _gate(max_inflight=2)
    for _ in range(2):
        await alone.acquire(_ticket("solo"))
    alone_queue = Queue(alone, alone_registry)
    await alone_queue.add("solo-3", _ticket("solo"))
    assert alone.count == 2 and alone.waiting == 1


async def test_a_cancelled_waiter_leaves_and_its_slot_goes_on() -> None:
    gate, registry = _gate()
    await gate.acquire(holder := _ticket("holder"))
    queue = Queue(gate, registry, holder)
    await queue.add("gone", _ticket("a"))
    await queue.add("next", _ticket("b"))
    queue.tasks[0].cancel()
    await asyncio.gather(queue.tasks[0], return_exceptions=True)
    assert gate.waiting == 1
    assert await queue.serve_all() == ["next"]
    assert registry.get_sample_value("dynamo_frontend_queue_depth", {"priority": "default", "tenant": "a"}) == 0
    # A waiter granted a slot and cancelled before it ran gives the slot back.
    late = asyncio.create_task(gate.acquire(_ticket("c")))
    while gate.waiting == 0:
        await asyncio.sleep(0)
    gate.release(queue.holding.pop(0))  # "next" ends: its slot is granted to `late`...
    late.cancel()  # ...whose task is cancelled before it resumes: it gives the slot back
    await asyncio.gather(late, return_exceptions=True)
    assert gate.count == 0


def test_priority_header_needs_a_trusted_tenant() -> None:
    gate, registry = _gate()
    trusted = Tenant("ops", "batch", trusted=True)
    assert gate.ticket(trusted, b"interactive", b"{}").priority.name == "interactive"
    assert gate.ticket(trusted, None, b"{}").priority.name == "batch"
    with pytest.raises(PriorityNotAllowed) as refused:
        gate.ticket(Tenant("app", "batch"), b"interactive", b"{}")
    assert refused.value.param == "x-dynamo-priority"
    with pytest.raises(PriorityNotAllowed):
        gate.ticket(None, b"interactive", b"{}")  # no authentication: nobody is trusted
    with pytest.raises(errors.InvalidRequest, match="unknown priority class"):
        gate.ticket(trusted, b"urgent", b"{}")
    assert registry.get_sample_value("dynamo_frontend_rejected_requests_total", {"reason": "priority_not_allowed"}) == 2


# ------------------------------------------------------------------------- TTFT targets


def test_ttft_prediction_from_the_load_view() -> None:
    load = LoadTracker(clock=lambda: 100.0)
    load.add("r1", worker_id=1, prefill_tokens=3000, decode_blocks=10)
    load.add("r2", worker_id=2, prefill_tokens=1000, decode_blocks=10)
    prediction = predict_ttft(load, [1, 2], prompt_tokens=500, prefill_tokens_per_s=1000, ahead_tokens=400)
    assert prediction is not None
    assert prediction.queued_s == pytest.approx(1.2)  # the least-loaded worker's 1000 + 400 / 2
    assert prediction.predicted_s == pytest.approx(1.7)
    assert prediction.misses(1.5) and not prediction.misses(2.0)
    load.first_token("r2")  # worker 2's queue is empty: nothing ahead, never shed
    idle = predict_ttft(load, [1, 2], prompt_tokens=5000, prefill_tokens_per_s=1000)
    assert idle is not None and idle.queued_s == 0 and not idle.misses(1.0)
    assert predict_ttft(load, [], 10, 1000) is None


async def test_a_request_predicted_to_miss_its_target_is_shed() -> None:
    classes = (PriorityClass("interactive", ttft_target_s=0.5), PriorityClass("default"))
    prediction = TtftPrediction(queued_s=1.0, predicted_s=2.2)
    gate, registry = _gate(max_inflight=0, classes=classes, predictor=lambda model, prompt, ahead: prediction)
    ticket = Ticket("i", 1.0, classes[0], b'{"model": "m"}')
    with pytest.raises(TtftTargetMissed) as shed:
        await gate.acquire(ticket)
    assert shed.value.retry_after_s == 2  # ceil(2.2 - 0.5)
    assert registry.get_sample_value("dynamo_frontend_rejected_requests_total", {"reason": "ttft_target"}) == 1
    await gate.acquire(Ticket("d", 1.0, classes[1], b"{}"))  # no target: admitted


async def test_over_target_queue_holds_until_the_prediction_meets_it() -> None:
    classes = (PriorityClass("interactive", ttft_target_s=0.5, over_target="queue"), PriorityClass("default"))
    predictions = [TtftPrediction(1.0, 1.5), TtftPrediction(0.8, 1.2), TtftPrediction(0.1, 0.3)]
    asked: list[str] = []

    def predictor(model: str, prompt: int, ahead: int) -> TtftPrediction:
        asked.append(model)
        return predictions[min(len(asked), len(predictions)) - 1]

    gate, registry = _gate(max_inflight=0, classes=classes, predictor=predictor)
    await gate.acquire(Ticket("i", 1.0, classes[0], b'{"model": "m"}'))
    assert asked == ["m", "m", "m"]
    assert gate.count == 1
    assert registry.get_sample_value("dynamo_frontend_queue_depth", {"priority": "interactive", "tenant": "i"}) == 0


# ------------------------------------------------------------------------- tenants file


def test_tenants_file_priority_classes_weights_and_trust() -> None:
    table = parse_tenants(
        {
            "priority_classes": [
                {"name": "interactive", "ttft_target_ms": 500, "over_target": "queue"},
                {"name": "batch", "queue_timeout_s": 600},
            ],
            "tenants": {"chat": {"priority": "interactive", "weight": 2, "trusted": True, "keys": ["k"]}},
        }
    )
    assert [c.name for c in table.classes] == ["interactive", "batch", "default"]  # default appended
    assert table.classes[0] == PriorityClass("interactive", 0.5, "queue")
    assert table.classes[1].queue_timeout_s == 600
    assert table.lookup(b"k") == Tenant("chat", "interactive", weight=2.0, trusted=True)
    bad: dict[str, object]
    for bad in (
        {"tenants": {"a": {"priority": "urgent"}}},  # not a declared class
        {"tenants": {"a": {"weight": 0}}},
        {"tenants": {"a": {"trusted": "yes"}}},
        {"priority_classes": [{"name": "x", "over_target": "drop"}]},
        {"priority_classes": [{"name": "x"}, {"name": "x"}]},
        {"priority_classes": [{"name": "x", "ttft_ms": 1}]},
        {"priority_class": []},
    ):
        with pytest.raises(TenantsFileError):
            parse_tenants(bad)


# ------------------------------------------------------------------------- through the app


async def test_queue_timeout_is_503_with_retry_after_in_each_apis_shape(stack: Stack) -> None:
    gate = asyncio.Event()
    worker = await _start(stack, gate=gate)
    config = {"max_inflight_requests": 1, "max_waiting_requests": 4, "queue_timeout_s": 0.1}
    async with _frontend(stack, worker, **config) as (client, registry, _f):
        async with client.stream("POST", "/v1/completions", json=_body()) as held:
            lines = held.aiter_lines()
            await anext(lines)  # the one slot is taken
            openai = await client.post("/v1/completions", json=_body(stream=False))
            assert openai.status_code == 503
            assert openai.headers["retry-after"] == "1"
            assert openai.json()["error"]["code"] == "queue_timeout"
            messages = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
            anthropic = await client.post("/v1/messages", json=messages)
            assert anthropic.status_code == 503
            assert anthropic.headers["retry-after"] == "1"
            assert anthropic.json()["type"] == "error"
            assert anthropic.json()["error"]["type"] == "overloaded_error"
            # Without authentication nobody is trusted to pick a class: refused, never ignored.
            chosen = await client.post(
                "/v1/completions", json=_body(stream=False), headers={"x-dynamo-priority": "interactive"}
            )
            assert chosen.status_code == 403
            assert chosen.json()["error"]["param"] == "x-dynamo-priority"
            gate.set()
            assert "data: [DONE]" in [line async for line in lines]
        assert (await client.post("/v1/completions", json=_body(stream=False))).status_code == 200
        assert registry.get_sample_value("dynamo_frontend_rejected_requests_total", {"reason": "queue_timeout"}) == 2
        assert registry.get_sample_value("dynamo_frontend_queue_depth", {"priority": "default", "tenant": "default"}) == 0
