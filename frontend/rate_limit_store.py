"""Tenant rate limits held across frontend replicas: each limit is one token bucket in NATS
JetStream KV, and each replica leases tokens from it (docs/tenants.md says why and the bound).

- The shared bucket (`BucketState`: level and the wall time it was taken at) refills at
  limit/60 per second like the local one (frontend/rate_limit.py). A lease is one read and one
  compare-and-set on the key's revision (`settle` is the arithmetic, a pure function): it pays
  the replica's debt (output tokens charged after the fact) or gives back its unused tokens,
  then grants what the request needs plus a small extra chunk, or nothing.
- A replica admits from its leased tokens without a round trip until they run out or expire
  (`LeasedBucket`), so a tenant well within its limit costs one lease per chunk of requests.
- Leased tokens expire `lease_ttl_s` after their lease and go back with the next one. A tenant
  can exceed what one bucket would admit only by tokens that sat leased in other replicas while
  the shared bucket refilled: at most min(replicas x max chunk, limit x lease_ttl_s / 60).

The embedded runtime (no servers) has no store: each quota keeps its plain TokenBucket.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import msgspec
from nats.aio.client import Client as NatsClient
from nats.js import api as js_api
from nats.js import errors as js_errors

from dynamo.tasks import TaskSet

log = logging.getLogger(__name__)

KV_BUCKET = "dynamo_rate_limits"
# An idle tenant's key goes after this long; by then its bucket would have refilled anyway
# (a minute) unless it was more than ten minutes in debt.
KEY_TTL_S = 600.0
LEASE_TTL_S = 2.0
# Beyond what a request needs, a lease takes up to this share of the limit (and at most an
# eighth of what is left, so replicas near the limit lease single tokens and strand none).
CHUNK_FRACTION = 0.02
_CAS_ATTEMPTS = 16
STORE_TIMEOUT_S = 2.0


class BucketState(msgspec.Struct, array_like=True):
    level: float  # tokens in the shared bucket (negative: in debt)
    at_s: float  # wall-clock time of `level`


_encode = msgspec.msgpack.encode
_decode = msgspec.msgpack.Decoder(BucketState).decode


class Grant(msgspec.Struct, frozen=True):
    granted: float  # tokens now leased to the replica (0: the bucket did not have `need`)
    level: float  # the shared bucket's level after the lease


def settle(
    state: BucketState | None, capacity: float, now_s: float, give_back: float, need: float
) -> tuple[BucketState, Grant]:
    """One lease on a shared bucket of `capacity` tokens per minute: refill to `now_s`, take
    `give_back` (unused tokens, or a negative debt), then grant `need` plus an extra chunk if the
    bucket holds `need`, else nothing (`need` 0: only settle)."""
    if state is None:
        level = capacity
    else:
        level = state.level + max(now_s - state.at_s, 0.0) * capacity / 60.0
    level = min(capacity, level + give_back)
    granted = 0.0
    if need > 0 and level >= need - 1e-9:
        extra = min(math.floor(capacity * CHUNK_FRACTION), math.floor(max(level - need, 0.0) / 8))
        granted = need + extra
        level -= granted
    return BucketState(level, max(now_s, state.at_s if state is not None else now_s)), Grant(granted, level)


class BucketStore(Protocol):
    def key(self, tenant: str, limit: str) -> str: ...

    async def lease(self, key: str, capacity: float, give_back: float, need: float) -> Grant: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    async def close(self) -> None: ...


class NatsKvStore:
    """The shared buckets in one JetStream KV bucket (memory storage, one revision per key),
    keyed `namespace.tenant-hex.limit`."""

    def __init__(self, nc: NatsClient, namespace: str, *, timeout_s: float = STORE_TIMEOUT_S,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._nc = nc
        self.namespace = namespace
        self._timeout_s = timeout_s
        self._clock = wall_clock
        self._kv: object | None = None
        self._tasks = TaskSet("rate-limit store task", log=log, level=logging.WARNING)

    async def start(self) -> None:
        js = self._nc.jetstream(timeout=self._timeout_s)
        async with asyncio.timeout(self._timeout_s * 2):
            try:
                self._kv = await js.key_value(KV_BUCKET)
            except js_errors.BucketNotFoundError:
                config = js_api.KeyValueConfig(
                    bucket=KV_BUCKET, history=1, ttl=KEY_TTL_S, storage=js_api.StorageType.MEMORY
                )
                self._kv = await js.create_key_value(config=config)

    async def close(self) -> None:
        await self._tasks.cancel_all()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)

    def key(self, tenant: str, limit: str) -> str:
        return f"{self.namespace}.{tenant.encode().hex() or '00'}.{limit}"

    async def lease(self, key: str, capacity: float, give_back: float, need: float) -> Grant:
        kv = self._kv
        assert kv is not None, "start() the store first"
        async with asyncio.timeout(self._timeout_s):
            for _ in range(_CAS_ATTEMPTS):
                try:
                    entry = await kv.get(key)  # type: ignore[attr-defined]
                    state, revision = _decode(entry.value), entry.revision
                except (js_errors.KeyNotFoundError, js_errors.KeyDeletedError):
                    state, revision = None, None
                new_state, grant = settle(state, capacity, self._clock(), give_back, need)
                if not grant.granted and not give_back:
                    return grant  # refused, nothing to settle: no write
                try:
                    if revision is None:
                        await kv.create(key, _encode(new_state))  # type: ignore[attr-defined]
                    else:
                        await kv.update(key, _encode(new_state), last=revision)  # type: ignore[attr-defined]
                except js_errors.KeyWrongLastSequenceError:
                    continue  # another replica leased in between: read again
                return grant
        raise TimeoutError(f"rate-limit bucket {key}: {_CAS_ATTEMPTS} conflicting updates in a row")


class MemoryStore:
    """The shared-bucket protocol in one process's memory: for tests of the leasing, which
    run several LeasedBuckets (replicas) over one store."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._clock = wall_clock
        self.states: dict[str, BucketState] = {}
        self._tasks = TaskSet("rate-limit store task", log=log)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)

    async def close(self) -> None:
        await self._tasks.cancel_all()

    def key(self, tenant: str, limit: str) -> str:
        return f"{tenant}.{limit}"

    async def lease(self, key: str, capacity: float, give_back: float, need: float) -> Grant:
        self.states[key], grant = settle(self.states.get(key), capacity, self._clock(), give_back, need)
        return grant


_last_warning_s = -math.inf


def _warn_unreachable(exc: Exception) -> None:
    global _last_warning_s
    now = time.monotonic()
    if now - _last_warning_s >= 10.0:  # once per 10 s, not once per request
        _last_warning_s = now
        log.warning("rate-limit store unreachable, admitting on this replica's word: %r", exc)


class LeasedBucket:
    """A replica's share of one shared bucket, with TokenBucket's interface for TenantQuota.
    This replica spends its unexpired leased tokens; `ensure` leases more; `level` (for the
    x-ratelimit headers) adds the shared bucket's level as last seen. Charges change the local
    balance; a debt goes to the store right away."""

    __slots__ = (
        "capacity", "_per_s", "_store", "_key", "_clock", "_local", "_leased_at", "_shared", "_lock", "_retry_at",
    )

    def __init__(self, store: BucketStore, key: str, capacity_per_min: int, clock: Callable[[], float]) -> None:
        self.capacity = float(capacity_per_min)
        self._per_s = self.capacity / 60.0
        self._store = store
        self._key = key
        self._clock = clock  # this process's monotonic clock: lease expiry
        self._local = 0.0
        self._leased_at = -math.inf
        self._shared = self.capacity  # the shared level as last seen
        self._lock = asyncio.Lock()
        # After a refused lease, no store round trip before the refill could cover the request
        # (at most a lease TTL: tokens other replicas give back show up by then): a tenant
        # flooding past its limit costs the store nothing.
        self._retry_at = -math.inf

    @property
    def level(self) -> float:
        """Tokens left as this replica knows them: its own plus the shared bucket's."""
        return self._usable() + self._shared_now()

    def _shared_now(self) -> float:
        """The shared level as last seen, refilled since (others' use unknown till the next lease)."""
        if self._leased_at == -math.inf:
            return self._shared
        return min(self.capacity, self._shared + (self._clock() - self._leased_at) * self._per_s)

    def _usable(self) -> float:
        if self._local > 0 and self._clock() - self._leased_at > LEASE_TTL_S:
            return 0.0
        return self._local

    async def ensure(self, amount: float) -> None:
        """Lease until `amount` (at most the capacity) can be spent here, if the shared bucket
        has it. One lease at a time per bucket: concurrent requests share its result."""
        need = min(amount, self.capacity)
        if self._usable() >= need or self._clock() < self._retry_at:
            return
        async with self._lock:
            if self._usable() >= need:
                return
            try:
                await self._lease(need)
            except Exception as exc:  # noqa: BLE001 - NATS down or slow: any failure alike
                # Fail open: refusing every limited request while the store is unreachable
                # would turn a NATS outage into a tenant outage. Admitted as if leased here.
                _warn_unreachable(exc)
                self._local = max(self._local, 0.0) + need
                self._leased_at = self._clock()

    async def _lease(self, need: float) -> None:
        give_back, self._local = self._local, 0.0  # expired or not, the balance is settled
        try:
            grant = await self._store.lease(self._key, self.capacity, give_back, need)
        except BaseException:
            self._local += give_back  # nothing changed in the store: keep it to settle later
            raise
        self._local += grant.granted
        self._shared = grant.level
        self._leased_at = now = self._clock()
        if need > 0 and not grant.granted:
            self._retry_at = now + min((need - grant.level) / self._per_s, LEASE_TTL_S)

    def raced(self, amount: float) -> bool:
        """Short here though the last lease found enough in the shared bucket: another
        request on this replica spent it first, and a new lease may well succeed."""
        need = min(amount, self.capacity)
        return self._usable() < need and self._clock() >= self._retry_at

    def refill(self, now_s: float) -> None:
        return None  # the shared bucket refills; leases bring it here

    def wait_s(self, amount: float) -> float:
        need = min(amount, self.capacity)
        if self._usable() >= need - 1e-9:
            return 0.0
        missing = need - max(self._usable(), 0.0) - self._shared_now()
        # Short of tokens here though the shared bucket had them (another request took this
        # replica's lease first): a short wait, not none, so the request is refused.
        return max(missing / self._per_s, 1e-3)

    def full_in_s(self) -> float:
        return max(self.capacity - self.level, 0.0) / self._per_s

    def charge(self, amount: float) -> None:
        self._local -= amount
        if self._local < 0:
            # Debt (output tokens counted after the fact): every replica must see it now.
            self._store.spawn(self._settle())

    async def _settle(self) -> None:
        async with self._lock:
            if self._local < 0:
                await self._lease(0.0)  # a failure is logged by the task set; the debt stays here

    def resize(self, capacity_per_min: int, now_s: float) -> None:
        self.capacity = float(capacity_per_min)
        self._per_s = self.capacity / 60.0


async def shared_store(events: object, namespace: str) -> BucketStore | None:
    """The store of a distributed runtime (its NATS connection, `events`), started; None for the
    embedded runtime, or when JetStream is unavailable (limits then stay per replica)."""
    from dynamo.runtime.nats_planes import NatsEventPlane

    if not isinstance(events, NatsEventPlane):
        return None
    store = NatsKvStore(events.client, namespace)
    try:
        await store.start()
    except Exception as exc:  # noqa: BLE001 - no JetStream, no permission, timeout: all alike
        log.error(
            "tenant rate limits stay per frontend replica: no JetStream KV bucket %r (start "
            "nats-server with -js): %s", KV_BUCKET, exc,
        )
        return None
    return store
