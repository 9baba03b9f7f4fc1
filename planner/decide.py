"""From the fleet's state and the predicted load to replicas per role. Two modes:

- sla: replicas from the performance model. A request's TTFT is its prefill time S plus its
  wait for a server; a pool is a queue with several servers (a prefill worker is one; a decode
  worker is as many slots as the largest batch whose ITL meets its target), and it gets the
  fewest servers whose p90 wait (Erlang C) fits the budget T - S (`sla_need`). Aggregated
  workers hold a slot for prefill and decode; so do decode workers for prompts short enough
  to prefill locally.
  Observed latency closes the loop: a p90 over target grows the pool that holds the queue,
  and a pool only shrinks while the latencies are comfortably (20%) inside their targets.
- load: keep waiting requests per worker and KV usage inside bands.

Both: at least one worker while requests are in flight or held for a scaled-to-zero model;
the pool's minimum (zero where allowed) when there is no traffic; min/max bounds, the GPU
budget and cooldowns last.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from planner.config import PlannerConfig, Role
from planner.observe import FleetState, PoolState
from planner.perf_model import PerfModel

_RHO_MAX = 0.9  # never plan a pool fuller than this: the queue grows without bound near 1
_SHRINK_MARGIN = 0.8  # latencies must be this far inside their targets before a pool shrinks


@dataclass(frozen=True, slots=True)
class Prediction:
    request_rate: float  # requests per second next interval
    isl: float  # mean prompt tokens
    osl: float  # mean output tokens


@dataclass(frozen=True, slots=True)
class Decision:
    role: Role
    current: int
    wanted: int  # what the mode asks for, before bounds, budget and cooldowns
    desired: int  # what the connector is told
    reason: str  # why `desired` (a metric label: a fixed vocabulary)


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/n queue (`servers` = n, `offered` = rate x
    service time, in Erlangs); 1.0 when the queue is unstable. Erlang B by its recursion, then
    C = n B / (n - a (1 - B))."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    return servers * b / (servers - offered * (1 - b))


def p90_wait_s(servers: int, rate: float, service_s: float) -> float:
    """The p90 wait of a pool of `servers` identical servers fed in arrival order (the router
    sends a request to the least busy worker): M/M/n's tail P(W > t) = C e^(-(n - a) t / s),
    halved for deterministic service (M/D/n waits about half as long as M/M/n)."""
    offered = rate * service_s
    if offered >= servers:
        return math.inf
    c = erlang_c(servers, offered)
    if c <= 0.1:
        return 0.0
    return 0.5 * service_s * math.log(10 * c) / (servers - offered)


def servers_within(rate: float, service_s: float, budget_s: float) -> int:
    """The fewest servers that keep the p90 wait within `budget_s` and utilisation at or below
    _RHO_MAX."""
    if rate <= 0 or service_s <= 0:
        return 0
    n = max(1, math.ceil(rate * service_s / _RHO_MAX))
    while p90_wait_s(n, rate, service_s) > max(budget_s, 0.0) and n < 100_000:
        n += 1
    return n


@dataclass(frozen=True, slots=True)
class SlaNeed:
    """Workers for the predicted load, by what they do (fractional: a share of a worker)."""

    prefill_workers: float  # a prefill pool's
    decode_workers: float  # a decode pool's (its prompts prefilled elsewhere)
    local_workers: float  # a pool that both prefills and decodes (aggregated, or decode
    # workers prefilling short prompts themselves)


def sla_need(model: PerfModel, p: Prediction, ttft_target_s: float, itl_target_s: float) -> SlaNeed:
    """A request's time to first token is its prefill S plus its wait for a server: the
    prefill compute, or a decode slot. Each pool gets the TTFT budget left after S for the
    p90 of that wait (`servers_within`); a worker is one prefill server, or `batch` decode
    slots, the largest batch whose ITL meets its target and whose KV fits."""
    if p.request_rate <= 0:
        return SlaNeed(0.0, 0.0, 0.0)
    isl = max(p.isl, 1.0)
    osl = max(p.osl, 1.0)
    prefill_s = model.prefill_s(isl)
    budget_s = ttft_target_s - prefill_s
    context = isl + osl / 2
    batch = max(1, model.max_batch_within(itl_target_s, context))
    hold_s = osl * model.itl_s(batch, context)  # a stream's time in a decode slot
    rate = p.request_rate
    return SlaNeed(
        prefill_workers=float(servers_within(rate, prefill_s, budget_s)),
        decode_workers=servers_within(rate, hold_s, budget_s) / batch,
        local_workers=servers_within(rate, prefill_s + hold_s, budget_s) / batch,
    )


def _load_band(config: PlannerConfig, pool: PoolState, current: int) -> tuple[int, str]:
    per_worker = pool.waiting_requests / max(current, 1)
    if current and (per_worker > config.queue_high or pool.kv_usage > config.kv_high):
        return current + 1, "queue_high" if per_worker > config.queue_high else "kv_high"
    if current > 1 and per_worker < config.queue_low and pool.kv_usage < config.kv_low:
        # The remaining workers take the KV of the one removed: only while it still fits.
        if pool.kv_usage * current / (current - 1) < config.kv_high:
            return current - 1, "load_low"
    return current, "steady"


class Decider:
    """Keeps the cooldown clocks; `decide` is otherwise a function of its arguments."""

    def __init__(self, config: PlannerConfig, model: PerfModel | None) -> None:
        if config.mode == "sla" and model is None:
            raise ValueError("sla mode needs a performance model (--perf-model)")
        self.config = config
        self.model = model
        self._last_change_s: dict[Role, float] = {}
        # (time, bounded wanted replicas) per role over the scale-down window.
        self._recent: dict[Role, deque[tuple[float, int]]] = {}

    def decide(
        self, fleet: FleetState, prediction: Prediction, current: Mapping[Role, int], now_s: float
    ) -> list[Decision]:
        wanted = self._wanted(fleet, prediction, current)
        decisions = [self._bounded(role, current.get(role, 0), *wanted[role], now_s) for role in self.config.roles]
        return self._within_budget(decisions)

    # ------------------------------------------------------------------------------ modes

    def _wanted(self, fleet: FleetState, p: Prediction, current: Mapping[Role, int]) -> dict[Role, tuple[int, str]]:
        cfg = self.config
        t = fleet.traffic
        busy = {role: fleet.pools.get(role, PoolState()) for role in cfg.roles}
        work_in_pools = sum(s.active_requests + s.waiting_requests for s in busy.values())
        idle = p.request_rate <= 0 and t.request_rate <= 0 and t.inflight == 0 and t.held == 0 and work_in_pools == 0
        out: dict[Role, tuple[int, str]] = {}
        if cfg.mode == "load":
            for role in cfg.roles:
                out[role] = _load_band(cfg, busy[role], current.get(role, 0))
        else:
            out = self._sla(fleet, p, current)
        for role in cfg.roles:
            n, reason = out[role]
            if idle:
                out[role] = (0, "idle")
            elif role != "prefill" and n < 1 and (t.held or t.inflight or work_in_pools or p.request_rate > 0):
                # Requests need a worker that clients reach (prefill workers alone serve none).
                out[role] = (1, "held_request" if t.held else "traffic")
        return out

    def _sla(self, fleet: FleetState, p: Prediction, current: Mapping[Role, int]) -> dict[Role, tuple[int, str]]:
        cfg = self.config
        assert self.model is not None
        need = sla_need(self.model, p, cfg.ttft_target_s, cfg.itl_target_s)
        t = fleet.traffic
        ttft_over = t.ttft_p90_s is not None and t.ttft_p90_s > cfg.ttft_target_s
        itl_over = t.itl_p90_s is not None and t.itl_p90_s > cfg.itl_target_s
        # Shrinking needs evidence: measured latencies inside the margin, or no traffic at all.
        quiet = t.request_rate <= 0 and t.inflight == 0
        comfortable = quiet or (
            t.ttft_p90_s is not None and t.ttft_p90_s <= _SHRINK_MARGIN * cfg.ttft_target_s
            and (t.itl_p90_s is None or t.itl_p90_s <= _SHRINK_MARGIN * cfg.itl_target_s)
        )
        model_n: dict[Role, float]
        if cfg.topology == "agg":
            model_n = {"aggregated": need.local_workers}
        elif p.isl < cfg.local_prefill_below_tokens:
            # Short prompts are prefilled where they decode: the prefill pool has none of them.
            model_n = {"prefill": 0.0, "decode": need.local_workers}
        else:
            model_n = {"prefill": need.prefill_workers, "decode": need.decode_workers}
        out: dict[Role, tuple[int, str]] = {}
        for role, fractional in model_n.items():
            cur = current.get(role, 0)
            n, reason = math.ceil(fractional - 1e-9), "sla_model"
            pool = fleet.pools.get(role, PoolState())
            queued = pool.waiting_requests > 0 or pool.waiting_prefill_tokens > 0
            # Feedback adds one worker at a time, and only once the last one serves: latency
            # stays high while a worker starts, and more workers would not start faster.
            settled = pool.workers >= cur
            if ttft_over and queued and n <= cur and settled and self._holds_ttft_queue(role, fleet):
                n, reason = cur + 1, "ttft_over_target"
            elif itl_over and role != "prefill" and n <= cur and settled:
                n, reason = cur + 1, "itl_over_target"
            elif n < cur and not comfortable:
                n, reason = cur, "latency_near_target"
            out[role] = (n, reason)
        return out

    def _holds_ttft_queue(self, role: Role, fleet: FleetState) -> bool:
        """Which pool a TTFT over target is blamed on: the aggregated pool; in disaggregated
        serving the prefill pool when prompts wait there, else the decode pool (it prefills
        short prompts itself and queues requests it has no room for)."""
        if role == "aggregated":
            return True
        prefill = fleet.pools.get("prefill", PoolState())
        prefill_queued = prefill.waiting_requests > 0 or prefill.waiting_prefill_tokens > 0
        return prefill_queued if role == "prefill" else not prefill_queued

    # ----------------------------------------------------------------- bounds and budget

    def _bounded(self, role: Role, current: int, wanted: int, reason: str, now_s: float) -> Decision:
        bounds = self.config.bounds_of(role)
        desired = bounds.clamp(wanted)
        if desired != wanted:
            reason = "min_replicas" if desired > wanted else "max_replicas"
        # Scale-down stabilisation (an HPA's window): a pool shrinks only to the most it wanted
        # over the last scale_down_cooldown_s, so one quiet interval removes nothing.
        recent = self._recent.setdefault(role, deque())
        while recent and recent[0][0] <= now_s - self.config.scale_down_cooldown_s:
            recent.popleft()
        recent.append((now_s, desired))
        last = self._last_change_s.get(role)
        if desired > current and last is not None and now_s - last < self.config.scale_up_cooldown_s:
            desired, reason = current, "cooldown"
        elif desired < current and current <= bounds.max_replicas:  # above the maximum it shrinks now
            floor = max(n for _, n in recent)
            if last is not None and now_s - last < self.config.scale_down_cooldown_s:
                desired, reason = current, "cooldown"
            elif floor > desired:
                desired, reason = min(current, floor), "cooldown"
        if desired == current and reason in ("sla_model", "traffic"):
            reason = "steady"
        return Decision(role, current, wanted, desired, reason)

    def _within_budget(self, decisions: list[Decision]) -> list[Decision]:
        budget = self.config.gpu_budget
        if budget <= 0:
            return decisions
        by_role = {d.role: d for d in decisions}

        def used() -> int:
            return sum(d.desired * self.config.gpus_of(d.role) for d in by_role.values())

        while used() > budget:
            # Take from the pool that grew the most beyond what it has, then the largest.
            shrinkable = [d for d in by_role.values() if d.desired > self.config.bounds_of(d.role).min_replicas]
            if not shrinkable:
                break
            d = max(shrinkable, key=lambda d: (d.desired - d.current, d.desired))
            by_role[d.role] = Decision(d.role, d.current, d.wanted, d.desired - 1, "gpu_budget")
        return [by_role[d.role] for d in decisions]

    def applied(self, decision: Decision, now_s: float) -> None:
        """The connector was told `decision.desired`: the pool's cooldown starts now."""
        if decision.desired != decision.current:
            self._last_change_s[decision.role] = now_s
