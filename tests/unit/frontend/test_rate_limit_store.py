"""frontend/rate_limit_store.py: the shared bucket's lease arithmetic, and several replicas
(RateLimiters) leasing from one store: together they admit what one bucket would, debts reach
every replica, leases expire and go back, and an unreachable store fails open. The NATS KV
store itself runs against a real nats-server in tests/e2e/test_traffic_control.py."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from frontend.metrics import FrontendMetrics
from frontend.rate_limit import RateLimited, RateLimiter, TenantQuota
from frontend.rate_limit_store import LEASE_TTL_S, BucketState, Grant, MemoryStore, settle
from frontend.tenants import Tenant, TenantLimits


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_settle_refills_grants_with_a_chunk_and_refuses_without_taking() -> None:
    state, grant = settle(None, 6000, now_s=0.0, give_back=0, need=10)
    # A new bucket starts full; the extra chunk is 2 % of the limit at most.
    assert grant == Grant(10 + 120, 6000 - 130)
    state = BucketState(level=5, at_s=0.0)
    same, grant = settle(state, 60, now_s=2.0, give_back=0, need=10)  # refilled to 7: not enough
    assert grant.granted == 0 and same.level == pytest.approx(7)
    paid, grant = settle(same, 60, now_s=2.0, give_back=-20, need=0)  # a debt is only paid
    assert grant.granted == 0 and paid.level == pytest.approx(-13)
    capped, _ = settle(BucketState(59, 0.0), 60, now_s=0.0, give_back=30, need=0)
    assert capped.level == 60  # unused tokens given back never overfill it


def replicas(store: MemoryStore, clock: FakeClock, n: int, **limits: int) -> list[TenantQuota]:
    tenant = Tenant("t", limits=TenantLimits(**limits))
    quotas = []
    for _ in range(n):
        limiter = RateLimiter(FrontendMetrics(CollectorRegistry()), clock)
        limiter.share(store)
        quotas.append(limiter.quota(tenant))
    return quotas


async def test_two_replicas_admit_together_what_one_bucket_would() -> None:
    clock = FakeClock()
    store = MemoryStore(wall_clock=clock)
    a, b = replicas(store, clock, 2, requests_per_min=5)
    for i in range(5):
        (await (a if i % 2 == 0 else b).admit_async(0)).finish(failed=False)
    with pytest.raises(RateLimited) as refused:
        await b.admit_async(0)
    headers = dict(refused.value.headers)
    assert headers[b"x-ratelimit-limit-requests"] == b"5"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert int(headers[b"retry-after"]) >= 1
    clock.now_s += 12  # one request refilled (5/min), whichever replica asks
    (await a.admit_async(0)).finish(failed=False)
    with pytest.raises(RateLimited):
        await a.admit_async(0)
    await store.close()


async def test_a_large_limit_leases_in_chunks() -> None:
    clock = FakeClock()
    store = MemoryStore(wall_clock=clock)
    leases = 0
    lease = store.lease

    async def counting(*args: object) -> Grant:
        nonlocal leases
        leases += 1
        return await lease(*args)  # type: ignore[arg-type]

    store.lease = counting  # type: ignore[method-assign]
    (a,) = replicas(store, clock, 1, requests_per_min=6000)
    for _ in range(100):
        (await a.admit_async(0)).finish(failed=False)
    assert leases <= 100 // 100 + 1  # one lease of 1 + 120 covers them
    await store.close()


async def test_output_debt_reaches_the_other_replica() -> None:
    clock = FakeClock()
    store = MemoryStore(wall_clock=clock)
    a, b = replicas(store, clock, 2, output_tokens_per_min=100)
    admission = await a.admit_async(0)
    admission.opened(0, lambda: 150)  # the stream produced more than the whole minute's budget
    admission.finish(failed=False)
    for _ in range(100):  # the debt goes to the store in a task of its own
        if store.states["t.output_tokens"].level < 0:
            break
        await asyncio.sleep(0)
    assert store.states["t.output_tokens"].level == pytest.approx(100 - 150)
    with pytest.raises(RateLimited):
        await b.admit_async(0)
    await store.close()


async def test_leased_tokens_expire_and_go_back() -> None:
    clock = FakeClock()
    store = MemoryStore(wall_clock=clock)
    a, b = replicas(store, clock, 2, requests_per_min=1000)
    (await a.admit_async(0)).finish(failed=False)  # a leases 1 + 20 and keeps 20
    assert store.states["t.requests"].level == pytest.approx(1000 - 21)
    clock.now_s += LEASE_TTL_S + 0.01
    assert a.requests is not None and a.requests.wait_s(1) > 0  # expired: not spendable here
    (await a.admit_async(0)).finish(failed=False)  # the next lease gives the 20 back
    assert store.states["t.requests"].level == pytest.approx(1000 - 22, abs=1)
    (await b.admit_async(0)).finish(failed=False)
    await store.close()


async def test_an_unreachable_store_fails_open() -> None:
    clock = FakeClock()
    store = MemoryStore(wall_clock=clock)

    async def down(*args: object) -> Grant:
        raise TimeoutError("nats is down")

    store.lease = down  # type: ignore[method-assign]
    (a,) = replicas(store, clock, 1, requests_per_min=1)
    for _ in range(3):
        (await a.admit_async(0)).finish(failed=False)
    await store.close()


async def test_a_tenant_flooding_past_its_limit_costs_the_store_nothing() -> None:
    clock = FakeClock()
    store = MemoryStore(wall_clock=clock)
    (a,) = replicas(store, clock, 1, requests_per_min=1)
    (await a.admit_async(0)).finish(failed=False)
    leases = 0
    lease = store.lease

    async def counting(*args: object) -> Grant:
        nonlocal leases
        leases += 1
        return await lease(*args)  # type: ignore[arg-type]

    store.lease = counting  # type: ignore[method-assign]
    for _ in range(50):
        with pytest.raises(RateLimited):
            await a.admit_async(0)
    assert leases == 1  # the refusal is remembered until a lease could succeed (or a lease TTL)
    clock.now_s += LEASE_TTL_S
    with pytest.raises(RateLimited):
        await a.admit_async(0)
    assert leases == 2
    await store.close()
