"""Per-tenant token buckets: requests/min and input tokens/min checked at admission, output
tokens/min charged with actual usage when a request ends. State is in this process's memory,
unless the limiter `share`s a store: then each bucket is a lease on one bucket that every
frontend replica shares (frontend/rate_limit_store.py, docs/tenants.md)."""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable

from frontend.errors import TooManyRequests
from frontend.metrics import FrontendMetrics
from frontend.rate_limit_store import BucketStore, LeasedBucket
from frontend.tenants import Tenant

Clock = Callable[[], float]

# The ASGI scope key under which ApiKeyMiddleware leaves the caller's TenantQuota.
TENANT_SCOPE_KEY = "dynamo.tenant"

# A body's bytes per prompt token, for the admission estimate (JSON and chat markup make it
# an overestimate; the pipeline corrects it with the real count).
_BYTES_PER_TOKEN_ESTIMATE = 4
# Refill arithmetic in floats: a bucket a rounding error short of the amount counts as full.
_FLOAT_SLACK_S = 1e-6


class TokenBucket:
    """Holds up to `capacity` tokens, refilled at `capacity / 60` per second. `charge` may
    take it below zero (usage known only afterwards): a bucket in debt admits nothing until
    the refill pays it back."""

    __slots__ = ("capacity", "level", "_per_s", "_at_s")

    def __init__(self, capacity_per_min: int, now_s: float) -> None:
        self.capacity = float(capacity_per_min)
        self.level = self.capacity
        self._per_s = self.capacity / 60.0
        self._at_s = now_s

    def refill(self, now_s: float) -> None:
        if now_s > self._at_s:
            self.level = min(self.capacity, self.level + (now_s - self._at_s) * self._per_s)
        self._at_s = max(self._at_s, now_s)

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` (at most the capacity) is available; 0 if it is now."""
        missing = min(amount, self.capacity) - self.level
        return max(0.0, missing / self._per_s)

    def full_in_s(self) -> float:
        return (self.capacity - self.level) / self._per_s

    def charge(self, amount: float) -> None:
        self.level -= amount

    def resize(self, capacity_per_min: int, now_s: float) -> None:
        self.refill(now_s)
        self.capacity = float(capacity_per_min)
        self._per_s = self.capacity / 60.0
        self.level = min(self.level, self.capacity)


Bucket = TokenBucket | LeasedBucket
# Leases tried for one request before it is refused: others on this replica may spend a
# lease between its arrival and the check.
_LEASE_ATTEMPTS = 3


class RateLimited(TooManyRequests):
    """A tenant is over one of its limits: 429 with Retry-After and OpenAI's x-ratelimit-*
    headers (`headers`), added by the endpoint to its API's error body."""

    def __init__(self, message: str, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        super().__init__(message)
        self.headers = headers


class TenantQuota:
    """One tenant's buckets (only for the limits it has; 0 is unlimited)."""

    def __init__(
        self, tenant: Tenant, clock: Clock, metrics: FrontendMetrics, store: BucketStore | None = None
    ) -> None:
        self.tenant = tenant
        self._clock = clock
        self._store = store
        now_s = clock()
        limits = tenant.limits
        self.requests = self._bucket("requests", limits.requests_per_min, now_s)
        self.input_tokens = self._bucket("input_tokens", limits.input_tokens_per_min, now_s)
        self.output_tokens = self._bucket("output_tokens", limits.output_tokens_per_min, now_s)
        self._metrics = metrics.for_tenant(tenant.name)
        self._rejected = metrics.rejected.labels("rate_limited")

    def update(self, tenant: Tenant) -> None:
        """The tenants file changed this tenant: keep what is used, apply the new limits."""
        old, new = self.tenant.limits, tenant.limits
        self.tenant = tenant
        if old == new:
            return
        now_s = self._clock()
        self.requests = self._resized("requests", self.requests, new.requests_per_min, now_s)
        self.input_tokens = self._resized("input_tokens", self.input_tokens, new.input_tokens_per_min, now_s)
        self.output_tokens = self._resized("output_tokens", self.output_tokens, new.output_tokens_per_min, now_s)

    def _bucket(self, limit: str, per_min: int, now_s: float) -> Bucket | None:
        if not per_min:
            return None
        if self._store is None:
            return TokenBucket(per_min, now_s)
        return LeasedBucket(self._store, self._store.key(self.tenant.name, limit), per_min, self._clock)

    def _resized(self, limit: str, bucket: Bucket | None, per_min: int, now_s: float) -> Bucket | None:
        if bucket is None or not per_min:
            return self._bucket(limit, per_min, now_s)
        bucket.resize(per_min, now_s)
        return bucket

    def _needs(self, estimate: int) -> tuple[tuple[Bucket | None, float], ...]:
        return ((self.requests, 1.0), (self.input_tokens, float(estimate)), (self.output_tokens, 1.0))

    async def admit_async(self, body_bytes: int) -> Admission:
        """`admit`, after leasing what the request needs from the shared buckets (when the
        limits are shared; otherwise `admit` as it is)."""
        if self._store is not None:
            needs = self._needs(math.ceil(body_bytes / _BYTES_PER_TOKEN_ESTIMATE))
            leased = [(b, a) for b, a in needs if isinstance(b, LeasedBucket)]
            for _ in range(_LEASE_ATTEMPTS):
                for bucket, amount in leased:
                    await bucket.ensure(amount)
                if not any(bucket.raced(amount) for bucket, amount in leased):
                    break
        return self.admit(body_bytes)

    def admit(self, body_bytes: int) -> Admission:
        """Take one request and the body's estimated prompt tokens, or raise RateLimited
        without taking anything."""
        now_s = self._clock()
        estimate = math.ceil(body_bytes / _BYTES_PER_TOKEN_ESTIMATE)
        needs = self._needs(estimate)
        wait_s = 0.0
        for bucket, amount in needs:
            if bucket is not None:
                bucket.refill(now_s)
                wait_s = max(wait_s, bucket.wait_s(amount))
        if wait_s > _FLOAT_SLACK_S:
            self._metrics.limited.inc()
            self._rejected.inc()
            retry_after_s = max(1, math.ceil(wait_s - _FLOAT_SLACK_S))
            raise RateLimited(
                f"tenant {self.tenant.name!r} is over its rate limit; retry in {retry_after_s} s",
                ((b"retry-after", str(retry_after_s).encode()), *self.headers()),
            )
        if self.requests is not None:
            self.requests.charge(1)
        if self.input_tokens is not None:
            self.input_tokens.charge(estimate)
        self._metrics.admitted.inc()
        return Admission(self, estimate)

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """OpenAI's x-ratelimit-* headers. The `-tokens` ones describe the tighter token
        bucket (input or output: whichever has the smaller share left)."""
        out: list[tuple[bytes, bytes]] = []
        if self.requests is not None:
            out += _bucket_headers(b"requests", self.requests)
        token_buckets = [b for b in (self.input_tokens, self.output_tokens) if b is not None]
        if token_buckets:
            tightest = min(token_buckets, key=lambda b: b.level / b.capacity)
            out += _bucket_headers(b"tokens", tightest)
        return tuple(out)

    def record(self, input_tokens: int, output_tokens: int) -> None:
        self._metrics.input_tokens.inc(input_tokens)
        self._metrics.output_tokens.inc(output_tokens)

    def charge_input(self, tokens: int) -> None:
        if self.input_tokens is not None:
            self.input_tokens.charge(tokens)

    def charge_output(self, tokens: int) -> None:
        if self.output_tokens is not None:
            self.output_tokens.charge(tokens)


def _bucket_headers(name: bytes, bucket: Bucket) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-ratelimit-limit-" + name, str(int(bucket.capacity)).encode()),
        (b"x-ratelimit-remaining-" + name, str(max(0, math.floor(bucket.level))).encode()),
        (b"x-ratelimit-reset-" + name, format_duration(bucket.full_in_s()).encode()),
    ]


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `250ms`, `6s`, `1m30s`, `2m0.5s`."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    secs = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class Admission:
    """One admitted request's charges. The pipeline reports each generation it opens
    (`opened`: the real prompt size, and where the output count will be read); `finish`
    charges the output once the request is over."""

    __slots__ = ("quota", "input_tokens", "_opened", "_output_sources", "_finished")

    def __init__(self, quota: TenantQuota, input_estimate: int) -> None:
        self.quota = quota
        self.input_tokens = input_estimate  # charged so far: the estimate until corrected
        self._opened = False
        self._output_sources: list[Callable[[], int]] = []
        self._finished = False

    def opened(self, prompt_tokens: int, output_tokens: Callable[[], int]) -> None:
        """A generation opened: the first replaces the body-size estimate with its prompt's
        token count; later ones (if a handler opens several) add theirs."""
        charged = prompt_tokens if self._opened else prompt_tokens - self.input_tokens
        self.input_tokens = prompt_tokens if not self._opened else self.input_tokens + prompt_tokens
        self._opened = True
        self.quota.charge_input(charged)
        self._output_sources.append(output_tokens)

    def finish(self, failed: bool) -> int:
        """Charge the output tokens generated (also by a cancelled or failed stream) and return
        them. A request that `failed` before any generation opened (bad request, unknown model)
        gets its input estimate back; one that succeeded without a generation (embeddings)
        keeps the estimate. The request itself stays counted."""
        if self._finished:
            return 0
        self._finished = True
        if failed and not self._opened:
            self.quota.charge_input(-self.input_tokens)
            self.input_tokens = 0
        output = sum(source() for source in self._output_sources)
        self.quota.charge_output(output)
        self.quota.record(self.input_tokens, output)
        return output


# The admission of the request the current task serves, so the pipeline can report usage
# without a change to every handler's signature (set by ApiEndpoint around the handler).
CURRENT_ADMISSION: contextvars.ContextVar[Admission | None] = contextvars.ContextVar(
    "dynamo_current_admission", default=None
)


class RateLimiter:
    """Every tenant's TenantQuota, created when the tenant first sends a request."""

    def __init__(self, metrics: FrontendMetrics, clock: Clock = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._quotas: dict[str, TenantQuota] = {}
        self._store: BucketStore | None = None

    def share(self, store: BucketStore) -> None:
        """Hold limits in `store`, shared with the other replicas, from now on (called before
        the first request)."""
        self._store = store
        self._quotas.clear()

    def quota(self, tenant: Tenant) -> TenantQuota:
        quota = self._quotas.get(tenant.name)
        if quota is None:
            quota = self._quotas[tenant.name] = TenantQuota(tenant, self._clock, self._metrics, self._store)
        elif quota.tenant is not tenant:
            quota.update(tenant)
        return quota

