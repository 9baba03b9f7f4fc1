"""Admission to this frontend's in-flight slots (`--max-inflight-requests`), by priority and
fairly between tenants.

Past the limit a request waits in a bounded queue (`--max-waiting-requests`; 0 keeps the old
behaviour, 429 at once) of priority bands: its tenant's class, or the class a trusted tenant
names in `x-dynamo-priority`. A freed slot goes to the highest band with a waiter; within a band,
tenants share the slots by weighted fair queuing on estimated tokens (start-time fair queuing):

    start  = max(band's virtual time, tenant's last finish tag)
    finish = start + estimated tokens / tenant's weight
    the waiter with the smallest finish goes first; the band's virtual time becomes its start

so a tenant with many requests queued gets its weight's share of the band and no more. With
`--fair-share-headroom`, a tenant holding fewer slots (per weight) than the largest holder takes
one past the limit at once instead of waiting for another tenant's request to end; the largest
holder's slots are then not replaced until the count is back under the limit; and the headroom is
a reserve for tenants under their share: while another tenant's demand (slots held and requests
waiting) is over its weighted share of limit plus headroom, a tenant whose demand is within its
share takes a slot past the limit at once, even if it already holds as many as the largest
holder (a light tenant's burst does not wait for the flood's requests to end). A waiter past
its class's queue timeout gets 503 with Retry-After. A full queue refuses with 429 the request
that would be served last (the newcomer, or a waiter due after it). A class with a TTFT target
has its requests' TTFT predicted from the router's load view (router/ttft_estimate.py): one
predicted to miss is shed (503 with Retry-After) or held back until the prediction meets the
target, by the class's `over_target` policy (docs/tenants.md)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from dynamo import errors
from frontend.errors import PriorityNotAllowed, QueueTimeout, TooManyRequests, TtftTargetMissed
from frontend.metrics import FrontendMetrics
from frontend.models import ModelManager
from frontend.tenants import DEFAULT_TENANT, PriorityClass, Tenant, TenantTable
from router.load_aware import LoadAwareRouter
from router.ttft_estimate import TtftPrediction, predict_ttft

PRIORITY_HEADER = b"x-dynamo-priority"
# A held-back request (over_target: queue) re-reads the load view this often: the load reports
# that would lower its prediction carry no wake-up of their own.
SLO_RECHECK_S = 0.05
# Output tokens assumed for a request that does not say (max_tokens and its aliases).
_DEFAULT_OUTPUT_TOKENS = 256
# As rate_limit.py's admission estimate: JSON and chat markup make it high; cheap and monotone.
_BYTES_PER_TOKEN_ESTIMATE = 4

# (model, prompt tokens, prompt tokens queued ahead in this frontend) -> the prediction, or None
# when the model's router keeps no load view.
TtftPredictor = Callable[[str, int, int], TtftPrediction | None]


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    max_inflight: int = 0  # 0: unbounded
    max_waiting: int = 0  # 0: no queue, a request past max_inflight gets 429 at once
    queue_timeout_s: float = 30.0
    # Fraction of max_inflight that tenants holding fewer slots (per weight) than the largest
    # holder may use beyond the limit (0: the limit is hard). Slots free only as requests end, so
    # without it a light tenant's request waits for some heavy tenant's request to finish.
    fair_share_headroom: float = 0.0


class _BodyHints(msgspec.Struct):
    """The fields of any POST API body that size a request (unknown fields are skipped)."""

    model: str = ""
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    max_output_tokens: int | None = None


_decode_hints = msgspec.json.Decoder(_BodyHints).decode


@dataclass(slots=True)
class Ticket:
    """One request's claim on a slot: who asks, in which class, and how big it is."""

    tenant: str
    weight: float
    priority: PriorityClass
    body: bytes
    _hints: _BodyHints | None = None

    def hints(self) -> _BodyHints:
        """Parsed only when needed (queueing or a TTFT target); a body that does not parse
        gets the defaults here and its 400 from the handler."""
        if self._hints is None:
            try:
                self._hints = _decode_hints(self.body)
            except msgspec.MsgspecError:
                self._hints = _BodyHints()
        return self._hints

    @property
    def prompt_tokens(self) -> int:
        return math.ceil(len(self.body) / _BYTES_PER_TOKEN_ESTIMATE)

    @property
    def tokens(self) -> int:
        hints = self.hints()
        output = hints.max_completion_tokens or hints.max_tokens or hints.max_output_tokens
        return self.prompt_tokens + (output if output and output > 0 else _DEFAULT_OUTPUT_TOKENS)


@dataclass(slots=True)
class _Waiter:
    ticket: Ticket
    start_tag: float
    future: asyncio.Future[None]
    enqueued_s: float
    live: bool = True  # in the queue: neither granted nor gone


@dataclass(slots=True)
class _Band:
    """One priority class's waiters, in finish-tag order (gone ones are skipped when popped)."""

    heap: list[tuple[float, int, _Waiter]] = field(default_factory=list)
    virtual_time: float = 0.0
    last_finish: dict[str, float] = field(default_factory=dict)
    waiting: int = 0
    prompt_tokens: int = 0  # of the live waiters: what a TTFT prediction counts as ahead
    tenants: dict[str, int] = field(default_factory=dict)  # live waiters by tenant


class AdmissionGate:
    """The frontend's in-flight slots. `acquire` returns once the request holds one (or raises
    the refusal); every acquire that returned is paired with one `release`."""

    def __init__(
        self,
        config: AdmissionConfig,
        metrics: FrontendMetrics,
        table: Callable[[], TenantTable],
        predictor: TtftPredictor | None = None,
    ) -> None:
        self.config = config
        self.limit = config.max_inflight
        self.count = 0  # requests holding a slot
        self.headroom = math.floor(config.max_inflight * config.fair_share_headroom)
        # Tenants with a request in flight or waiting: slots held, and weight (for fair shares).
        self._held: dict[str, int] = {}
        self._active_weight: dict[str, float] = {}
        self._metrics = metrics
        self._table = table
        self._predictor = predictor
        self._bands: dict[str, _Band] = {}
        self._waiting = 0  # live waiters of every band: what max_waiting bounds
        self._seq = itertools.count()
        self._rejected = {
            reason: metrics.rejected.labels(reason)
            for reason in ("overloaded", "queue_timeout", "ttft_target", "priority_not_allowed")
        }

    # ------------------------------------------------------------------------- requests

    def ticket(self, tenant: Tenant | None, priority: bytes | None, body: bytes) -> Ticket:
        """The request's class: its tenant's, or the `x-dynamo-priority` header's when the
        tenant is trusted. The header from anyone else is refused (403), an unknown class 400."""
        table = self._table()
        name = tenant.priority if tenant is not None else "default"
        if priority is not None:
            header = PRIORITY_HEADER.decode()
            if tenant is None or not tenant.trusted:
                self._rejected["priority_not_allowed"].inc()
                raise PriorityNotAllowed(
                    f"only trusted tenants may set {header} (tenants file: `trusted: true`)", param=header
                )
            name = priority.decode("utf-8", "replace").strip()
            if table.priority_class(name) is None:
                known = ", ".join(c.name for c in table.classes)
                raise errors.InvalidRequest(f"unknown priority class {name!r} in {header}; one of: {known}", param=header)
        # A class gone in a reload of the tenants file leaves its tenants in `default`.
        cls = table.priority_class(name) or table.priority_class("default") or PriorityClass("default")
        if tenant is None:
            return Ticket(DEFAULT_TENANT, 1.0, cls, body)
        return Ticket(tenant.name, tenant.weight, cls, body)

    async def acquire(self, ticket: Ticket) -> None:
        loop = asyncio.get_running_loop()
        timeout_s = ticket.priority.queue_timeout_s or self.config.queue_timeout_s
        deadline = loop.time() + timeout_s
        if ticket.priority.ttft_target_s > 0 and self._predictor is not None:
            await self._meet_target(ticket, deadline)
        if not self.limit or self.count < self.limit:
            # Waiters exist only while every slot is taken (a release hands its slot on at
            # once), so a free slot is nobody else's.
            self._hold(ticket)
            return
        if self._may_borrow(ticket):
            # Served past the queue, but charged in it: the tenant's later waiters come after
            # the service it had.
            band = self._bands.get(ticket.priority.name)
            if band is not None:
                band.last_finish[ticket.tenant] = self._tags(ticket, band)[1]
            self._hold(ticket)
            return
        if self._waiting >= self.config.max_waiting and not self._make_room(ticket):
            self._rejected["overloaded"].inc()
            raise TooManyRequests(
                f"this frontend is serving its limit of {self.limit} requests"
                + (f" with {self._waiting} waiting" if self.config.max_waiting else "")
                + "; retry later"
            )
        waiter = self._enqueue(ticket, loop)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter.future
        except TimeoutError:
            if _granted(waiter.future):
                return  # the slot came in the same turn as the deadline: keep it
            self._leave(waiter)
            self._rejected["queue_timeout"].inc()
            raise QueueTimeout(
                f"waited {timeout_s:g} s for admission in priority class {ticket.priority.name!r}; retry later"
            ) from None
        except asyncio.CancelledError:  # the client left while waiting
            if _granted(waiter.future):
                self.release(ticket)
            else:
                self._leave(waiter)
            raise

    def release(self, ticket: Ticket) -> None:
        """The request of `ticket`, holding a slot, ended: the slot goes to the next waiter."""
        self.count -= 1
        held = self._held[ticket.tenant] - 1
        if held:
            self._held[ticket.tenant] = held
        else:
            del self._held[ticket.tenant]
            self._forget_if_idle(ticket.tenant)
        while True:
            if not self.limit or self.count < self.limit:
                waiter = self._next()
            else:
                # Past the limit only a tenant below the largest holder goes on (within the headroom):
                # a light tenant's waiter must not wait for the count to fall below the limit.
                waiter = self._next_borrower() if self.headroom else None
            if waiter is None:
                return
            self._take_out(waiter)
            self._hold(waiter.ticket)
            self._metrics.queue_wait.labels(waiter.ticket.priority.name).observe(time.monotonic() - waiter.enqueued_s)
            waiter.future.set_result(None)

    @property
    def waiting(self) -> int:
        return self._waiting

    def _hold(self, ticket: Ticket) -> None:
        self.count += 1
        self._held[ticket.tenant] = self._held.get(ticket.tenant, 0) + 1
        self._active_weight[ticket.tenant] = ticket.weight

    def _forget_if_idle(self, tenant: str) -> None:
        if tenant not in self._held and not any(tenant in band.tenants for band in self._bands.values()):
            self._active_weight.pop(tenant, None)

    def _may_borrow(self, ticket: Ticket) -> bool:
        """Past the limit, within the headroom: may this request's tenant take a slot now?"""
        if not self.headroom or self.count >= self.limit + self.headroom:
            return False
        return self._may_pass_limit(ticket.tenant, ticket.weight, new=1)

    def _may_pass_limit(self, tenant: str, weight: float, new: int) -> bool:
        """May the tenant hold one more slot past the limit? Counted by demand (slots held,
        requests waiting, and `new` requests not queued yet) against its weighted share of the
        whole capacity, limit plus headroom:
        - over that share: no. Its part is held at the limit, and its slots are not replaced
          past it, so what others borrow comes out of its part;
        - within it: yes if, with one more slot, it still holds fewer per weight than the largest
          holder (max-min fairness on slots), or if another tenant is over its share. The
          headroom is then this tenant's reserve: a tenant sending less than its share gets
          what it asks for at once, up to that share, even while it holds as many slots as
          the flooding tenant, whose part shrinks as its requests end unreplaced; without
          this a light tenant's burst waits for some flood request to end. Tenants all within
          their shares (one alone, or several light ones) keep to the limit itself, as no one
          would pay the borrowed slots back."""
        weights = {**self._active_weight, tenant: weight}  # a newcomer's tenant is active from now
        share = (self.limit + self.headroom) / sum(weights.values())
        if (self._held.get(tenant, 0) + self._waiting_of(tenant) + new) / weight > share:
            return False
        top = max((n / weights[u] for u, n in self._held.items() if u != tenant), default=0.0)
        if (self._held.get(tenant, 0) + 1) / weight < top:
            return True
        return any((self._held.get(u, 0) + self._waiting_of(u)) / w > share for u, w in weights.items() if u != tenant)

    def _waiting_of(self, tenant: str) -> int:
        return sum(band.tenants.get(tenant, 0) for band in self._bands.values())

    # -------------------------------------------------------------------------- TTFT target

    async def _meet_target(self, ticket: Ticket, deadline: float) -> None:
        """Return once the request's predicted TTFT meets its class's target; shed it, or wait
        for that (up to the deadline), by the class's policy."""
        assert self._predictor is not None
        cls = ticket.priority
        loop = asyncio.get_running_loop()
        depth = self._metrics.queue_depth.labels(cls.name, ticket.tenant)
        held = False
        try:
            while True:
                prediction = self._predictor(ticket.hints().model, ticket.prompt_tokens, self._ahead_of(cls))
                if prediction is None or not prediction.misses(cls.ttft_target_s):
                    return
                if cls.over_target == "shed":
                    self._rejected["ttft_target"].inc()
                    raise TtftTargetMissed(
                        f"predicted time to first token {prediction.predicted_s:.2f} s exceeds the "
                        f"{cls.ttft_target_s:g} s target of priority class {cls.name!r}; retry later",
                        retry_after_s=max(1, math.ceil(prediction.predicted_s - cls.ttft_target_s)),
                    )
                remaining_s = deadline - loop.time()
                if remaining_s <= 0:
                    self._rejected["queue_timeout"].inc()
                    raise QueueTimeout(
                        f"predicted time to first token stayed over the {cls.ttft_target_s:g} s target of "
                        f"priority class {cls.name!r}; retry later"
                    )
                if not held:
                    held = True
                    depth.inc()
                await asyncio.sleep(min(SLO_RECHECK_S, remaining_s))
        finally:
            if held:
                depth.dec()

    def _ahead_of(self, cls: PriorityClass) -> int:
        """Estimated prompt tokens waiting in this class's band and those above it."""
        ahead = 0
        for band_class in self._table().classes:
            band = self._bands.get(band_class.name)
            if band is not None:
                ahead += band.prompt_tokens
            if band_class.name == cls.name:
                break
        return ahead

    # ------------------------------------------------------------------------------ queue

    @staticmethod
    def _tags(ticket: Ticket, band: _Band) -> tuple[float, float]:
        """The (start, finish) virtual times the request would get in `band` now."""
        start = max(band.virtual_time, band.last_finish.get(ticket.tenant, 0.0))
        return start, start + ticket.tokens / ticket.weight

    def _enqueue(self, ticket: Ticket, loop: asyncio.AbstractEventLoop) -> _Waiter:
        band = self._bands.get(ticket.priority.name)
        if band is None:
            band = self._bands[ticket.priority.name] = _Band()
        start, finish = self._tags(ticket, band)
        band.last_finish[ticket.tenant] = finish
        waiter = _Waiter(ticket, start, loop.create_future(), time.monotonic())
        heapq.heappush(band.heap, (finish, next(self._seq), waiter))
        band.waiting += 1
        band.prompt_tokens += ticket.prompt_tokens
        band.tenants[ticket.tenant] = band.tenants.get(ticket.tenant, 0) + 1
        self._active_weight[ticket.tenant] = ticket.weight
        self._waiting += 1
        self._metrics.queue_depth.labels(ticket.priority.name, ticket.tenant).inc()
        return waiter

    def _bands_in_order(self) -> list[tuple[str, _Band]]:
        """Highest class first; bands of classes a reload removed come last."""
        order = [c.name for c in self._table().classes]
        rank = {name: i for i, name in enumerate(order)}
        return sorted(self._bands.items(), key=lambda item: rank.get(item[0], len(order)))

    def _next(self) -> _Waiter | None:
        for _, band in self._bands_in_order():
            while band.heap:
                _, _, waiter = heapq.heappop(band.heap)
                if waiter.live:
                    band.virtual_time = max(band.virtual_time, waiter.start_tag)
                    return waiter
        return None

    def _next_borrower(self) -> _Waiter | None:
        """The waiter due first among those whose tenant may take a slot past the limit."""
        if self.count >= self.limit + self.headroom:
            return None
        for _, band in self._bands_in_order():
            eligible = {t for t in band.tenants if self._may_pass_limit(t, self._active_weight[t], new=0)}
            if not eligible:
                continue
            candidates = [entry for entry in band.heap if entry[2].live and entry[2].ticket.tenant in eligible]
            if candidates:
                waiter = min(candidates, key=lambda entry: (entry[0], entry[1]))[2]
                band.virtual_time = max(band.virtual_time, waiter.start_tag)
                return waiter
        return None

    def _take_out(self, waiter: _Waiter) -> None:
        """Off the queue's counts (granted, timed out, displaced or gone)."""
        waiter.live = False
        ticket = waiter.ticket
        band = self._bands[ticket.priority.name]
        band.waiting -= 1
        band.prompt_tokens -= ticket.prompt_tokens
        left = band.tenants[ticket.tenant] - 1
        if left:
            band.tenants[ticket.tenant] = left
        else:
            del band.tenants[ticket.tenant]
        self._waiting -= 1
        self._metrics.queue_depth.labels(ticket.priority.name, ticket.tenant).dec()
        if band.waiting == 0:
            # An idle band forgets its tags: the next busy period starts every tenant equal.
            del self._bands[ticket.priority.name]
        self._forget_if_idle(ticket.tenant)

    def _leave(self, waiter: _Waiter) -> None:
        if waiter.live:
            self._take_out(waiter)
        if not waiter.future.done():
            waiter.future.cancel()
        elif not waiter.future.cancelled():
            waiter.future.exception()  # displaced in the same turn: retrieved, not logged as lost

    def _make_room(self, ticket: Ticket) -> bool:
        """A full queue takes a request by refusing (429) the waiter that would be served last
        after it: the newest of the lowest band below its class, or, in its own band, the one
        with the largest finish tag when that is later than the newcomer's (the flooding
        tenant's newest, not a light tenant's only request). False when there is none."""
        names = [c.name for c in self._table().classes]

        def rank(name: str) -> int:
            return names.index(name) if name in names else len(names)

        own = rank(ticket.priority.name)
        for name, band in reversed(self._bands_in_order()):
            if rank(name) < own:
                return False
            live = [entry for entry in band.heap if entry[2].live]
            if not live:
                continue
            finish, seq, victim = max(live, key=lambda entry: (entry[0], entry[1]))
            if rank(name) == own and finish <= self._tags(ticket, band)[1]:
                return False
            self._take_out(victim)
            self._rejected["overloaded"].inc()
            victim.future.set_exception(
                TooManyRequests("this frontend's queue is full and a request due earlier took this place; retry later")
            )
            return True
        return False


def router_ttft_predictor(manager: ModelManager, prefill_tokens_per_s: float) -> TtftPredictor | None:
    """Predictions from the load view of each model's router (the load-aware modes: kv and
    least-loaded; other modes keep none, so their requests are never shed for a target)."""
    if prefill_tokens_per_s <= 0:
        return None

    def predict(model_name: str, prompt_tokens: int, ahead_tokens: int) -> TtftPrediction | None:
        model = manager.models.get(model_name)
        if model is None or not isinstance(model.router, LoadAwareRouter):
            return None
        return predict_ttft(model.router.load, model.instance_ids(), prompt_tokens, prefill_tokens_per_s, ahead_tokens)

    return predict


def _granted(future: asyncio.Future[None]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
