"""What the planner sees each adjustment interval: the frontends' traffic (request rate,
prompt and output lengths, TTFT and ITL percentiles, requests in flight or held for a
scaled-to-zero model) from their /metrics pages or from Prometheus' HTTP API, and each pool's
workers and load from discovery and the load reports workers publish on the event plane (the
same reports routers read)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dynamo import errors
from dynamo.events import load_metrics_subject
from dynamo.model_registry import ModelWatcher
from dynamo.runtime import Runtime, Subscription
from dynamo.tasks import TaskSet
from dynamo.wire import LOAD_CODEC, LoadMetrics
from planner.config import PlannerConfig, Role

log = logging.getLogger(__name__)

TTFT = "dynamo_frontend_time_to_first_token_seconds"
ITL = "dynamo_frontend_inter_token_latency_seconds"
ISL = "dynamo_frontend_input_sequence_tokens"
OSL = "dynamo_frontend_output_sequence_tokens"
INFLIGHT = "dynamo_frontend_inflight_requests"
HELD = "dynamo_frontend_held_requests"


@dataclass(frozen=True, slots=True)
class TrafficStats:
    """The frontends' traffic over one interval."""

    request_rate: float = 0.0  # requests admitted per second
    isl: float = 0.0  # mean prompt tokens
    osl: float = 0.0  # mean output tokens of completed requests
    ttft_p90_s: float | None = None  # None: no request got its first token
    itl_p90_s: float | None = None
    inflight: int = 0
    held: int = 0  # requests waiting for a scaled-to-zero model's first worker


@dataclass(frozen=True, slots=True)
class PoolState:
    workers: int = 0
    active_requests: int = 0
    waiting_requests: int = 0
    kv_usage: float = 0.0  # mean over the pool's workers, 0..1
    waiting_prefill_tokens: int = 0


@dataclass(frozen=True, slots=True)
class FleetState:
    traffic: TrafficStats
    pools: Mapping[Role, PoolState]
    observed_at_s: float = 0.0


# ----------------------------------------------------------------------------- metric pages


@dataclass(slots=True)
class Histogram:
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    count: float = 0.0
    total: float = 0.0

    def minus(self, other: Histogram | None) -> Histogram:
        if other is None:
            return self
        return Histogram(
            {le: max(0.0, c - other.buckets.get(le, 0.0)) for le, c in self.buckets.items()},
            max(0.0, self.count - other.count),
            max(0.0, self.total - other.total),
        )

    def add(self, other: Histogram) -> None:
        for le, c in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + c
        self.count += other.count
        self.total += other.total

    def quantile(self, q: float) -> float | None:
        """Prometheus' histogram_quantile: linear within the bucket the rank falls in."""
        if self.count <= 0 or not self.buckets:
            return None
        rank = q * self.count
        lower_le, lower_c = 0.0, 0.0
        for le in sorted(self.buckets):
            c = self.buckets[le]
            if c >= rank:
                if math.isinf(le):
                    return lower_le
                if c == lower_c:
                    return le
                return lower_le + (le - lower_le) * (rank - lower_c) / (c - lower_c)
            lower_le, lower_c = le, c
        return lower_le


@dataclass(slots=True)
class PageSnapshot:
    """The cumulative series of one or more frontend pages that the planner uses."""

    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=Histogram)
    isl: Histogram = field(default_factory=Histogram)
    osl: Histogram = field(default_factory=Histogram)
    inflight: float = 0.0
    held: float = 0.0

    def add(self, other: PageSnapshot) -> None:
        self.ttft.add(other.ttft)
        self.itl.add(other.itl)
        self.isl.add(other.isl)
        self.osl.add(other.osl)
        self.inflight += other.inflight
        self.held += other.held


def parse_frontend_page(text: str, model: str | None) -> PageSnapshot:
    """A frontend's /metrics page, the series of `model` (every model when None) summed."""
    snap = PageSnapshot()
    histograms = {TTFT: snap.ttft, ITL: snap.itl, ISL: snap.isl, OSL: snap.osl}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if model is not None and sample.labels.get("model", model) != model:
                continue
            name = sample.name
            if name == INFLIGHT:
                snap.inflight += sample.value
            elif name == HELD:
                snap.held += sample.value
            elif name.endswith("_bucket") and name[: -len("_bucket")] in histograms:
                h = histograms[name[: -len("_bucket")]]
                le = float(sample.labels["le"])
                h.buckets[le] = h.buckets.get(le, 0.0) + sample.value
            elif name.endswith("_count") and name[: -len("_count")] in histograms:
                histograms[name[: -len("_count")]].count += sample.value
            elif name.endswith("_sum") and name[: -len("_sum")] in histograms:
                histograms[name[: -len("_sum")]].total += sample.value
    return snap


def traffic_between(prev: PageSnapshot | None, cur: PageSnapshot, dt_s: float) -> TrafficStats:
    """The interval's traffic from two snapshots of cumulative series. A frontend that
    restarted between them (counters went down) counts from zero, as Prometheus' rate does."""
    isl = cur.isl.minus(prev.isl if prev else None)
    osl = cur.osl.minus(prev.osl if prev else None)
    ttft = cur.ttft.minus(prev.ttft if prev else None)
    itl = cur.itl.minus(prev.itl if prev else None)
    if prev is not None and cur.isl.count < prev.isl.count:
        isl, osl, ttft, itl = cur.isl, cur.osl, cur.ttft, cur.itl
    return TrafficStats(
        request_rate=isl.count / dt_s if dt_s > 0 and prev is not None else 0.0,
        isl=isl.total / isl.count if isl.count else 0.0,
        osl=osl.total / osl.count if osl.count else 0.0,
        ttft_p90_s=ttft.quantile(0.9),
        itl_p90_s=itl.quantile(0.9),
        inflight=int(cur.inflight),
        held=int(cur.held),
    )


class FrontendPages:
    """Scrapes the frontends' /metrics pages; each `read` reports the traffic since the last."""

    def __init__(self, urls: Iterable[str], model: str | None, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._urls = tuple(urls)
        self._model = model
        self._client = httpx.AsyncClient(timeout=timeout_s)
        self._clock = clock
        self._prev: PageSnapshot | None = None
        self._prev_at = 0.0

    async def read(self) -> TrafficStats:
        snap = PageSnapshot()
        pages = await asyncio.gather(*(self._client.get(u) for u in self._urls), return_exceptions=True)
        for url, page in zip(self._urls, pages):
            if isinstance(page, BaseException) or page.status_code != 200:
                # No decision on part of the traffic: a missing page would read as a drop to
                # zero (and a scale-down); this interval is skipped and the next reads afresh.
                self._prev = None
                why = page if isinstance(page, BaseException) else f"HTTP {page.status_code}"
                raise errors.DynamoError(f"frontend metrics {url} unreadable: {why}")
            snap.add(parse_frontend_page(page.text, self._model))
        now = self._clock()
        stats = traffic_between(self._prev, snap, now - self._prev_at)
        self._prev, self._prev_at = snap, now
        return stats

    async def aclose(self) -> None:
        await self._client.aclose()


# ------------------------------------------------------------------------------ prometheus


def prometheus_queries(model: str | None, window_s: float) -> dict[str, str]:
    """PromQL for each TrafficStats field, over the last `window_s`."""
    sel = f'{{model="{model}"}}' if model else ""
    w = f"[{max(int(window_s), 1)}s]"

    def rate(name: str) -> str:
        return f"sum(rate({name}{sel}{w}))"

    def p90(name: str) -> str:
        return f"histogram_quantile(0.9, sum by (le) (rate({name}_bucket{sel}{w})))"

    return {
        "request_rate": rate(f"{ISL}_count"),
        "isl": f"{rate(f'{ISL}_sum')} / {rate(f'{ISL}_count')}",
        "osl": f"{rate(f'{OSL}_sum')} / {rate(f'{OSL}_count')}",
        "ttft_p90_s": p90(TTFT),
        "itl_p90_s": p90(ITL),
        "inflight": f"sum({INFLIGHT}{sel})",
        "held": f"sum({HELD}{sel})",
    }


def parse_prometheus_value(document: Mapping[str, object]) -> float | None:
    """The single value of an instant query's answer (`/api/v1/query`); None when the result
    is empty or NaN (no samples in the window)."""
    if document.get("status") != "success":
        raise ValueError(f"Prometheus query failed: {document.get('error')}")
    data = document.get("data")
    if not isinstance(data, Mapping):
        raise ValueError("Prometheus answer without data")
    result = data.get("result")
    if data.get("resultType") == "scalar" and isinstance(result, list):
        value = float(result[1])
    elif isinstance(result, list) and result:
        first = result[0]
        assert isinstance(first, Mapping)
        value = float(first["value"][1])
    else:
        return None
    return None if math.isnan(value) or math.isinf(value) else value


class PrometheusTraffic:
    """The same TrafficStats from Prometheus' HTTP API (`--prometheus-url`)."""

    def __init__(self, url: str, model: str | None, window_s: float, timeout_s: float) -> None:
        self._url = url.rstrip("/") + "/api/v1/query"
        self._queries = prometheus_queries(model, window_s)
        self._client = httpx.AsyncClient(timeout=timeout_s)

    async def _query(self, promql: str) -> float | None:
        try:
            response = await self._client.get(self._url, params={"query": promql})
            return parse_prometheus_value(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("Prometheus query %r failed: %s", promql, exc)
            return None

    async def read(self) -> TrafficStats:
        names = list(self._queries)
        values = dict(zip(names, await asyncio.gather(*(self._query(self._queries[n]) for n in names))))
        return TrafficStats(
            request_rate=values["request_rate"] or 0.0,
            isl=values["isl"] or 0.0,
            osl=values["osl"] or 0.0,
            ttft_p90_s=values["ttft_p90_s"],
            itl_p90_s=values["itl_p90_s"],
            inflight=int(values["inflight"] or 0),
            held=int(values["held"] or 0),
        )

    async def aclose(self) -> None:
        await self._client.aclose()


# --------------------------------------------------------------------------------- workers


class WorkerPools:
    """Each pool's live workers (model cards in discovery, by role) and their last load
    reports (event plane). Workers publish a report only when it changes, so a report is kept
    until its worker's card goes."""

    def __init__(self, runtime: Runtime, model: str | None) -> None:
        self._runtime = runtime
        self._model = model
        self.watcher = ModelWatcher(runtime.discovery, runtime.namespace)
        self._loads: dict[int, LoadMetrics] = {}
        self._subscribed: set[str] = set()
        self._subs: list[Subscription] = []
        self._tasks = TaskSet("planner load subscription", log=log)

    async def start(self) -> None:
        await self.watcher.start()

    async def close(self) -> None:
        for sub in self._subs:
            await sub.close()
        await self._tasks.cancel_all()
        await self.watcher.close()

    async def _follow(self, component: str) -> None:
        if component in self._subscribed:
            return
        self._subscribed.add(component)
        sub = await self._runtime.events.subscribe(load_metrics_subject(self._runtime.namespace, component))
        self._subs.append(sub)
        self._tasks.spawn(self._consume(sub))

    async def _consume(self, sub: Subscription) -> None:
        async for payload in sub:
            report = LOAD_CODEC.decode(payload)
            self._loads[report.worker_id] = report

    def members(self) -> dict[Role, list[int]]:
        """Instance ids of each role's registered workers (of the planned model)."""
        out: dict[Role, list[int]] = {"aggregated": [], "prefill": [], "decode": []}
        for name, entry in self.watcher.models.items():
            if self._model is not None and name != self._model:
                continue
            for instance_id, card in entry.cards.items():
                if card.model_type == "generate":
                    out[card.role].append(instance_id)
        return out

    async def read(self) -> dict[Role, PoolState]:
        for entry in list(self.watcher.models.values()):
            for card in entry.cards.values():
                await self._follow(card.component)
        members = self.members()
        live = {i for ids in members.values() for i in ids}
        for gone in set(self._loads) - live:
            del self._loads[gone]
        pools: dict[Role, PoolState] = {}
        for role, ids in members.items():
            reports = [self._loads[i] for i in ids if i in self._loads]
            usage = [r.kv_active_blocks / r.kv_total_blocks for r in reports if r.kv_total_blocks]
            pools[role] = PoolState(
                workers=len(ids),
                active_requests=sum(r.active_requests for r in reports),
                waiting_requests=sum(r.waiting_requests for r in reports),
                kv_usage=sum(usage) / len(usage) if usage else 0.0,
                waiting_prefill_tokens=sum(r.waiting_prefill_tokens for r in reports),
            )
        return pools


class Observer:
    """One FleetState per call: traffic and pools, read together."""

    def __init__(self, config: PlannerConfig, runtime: Runtime) -> None:
        self.traffic: FrontendPages | PrometheusTraffic | None
        if config.prometheus_url:
            window = max(config.adjustment_interval_s, 30.0)
            self.traffic = PrometheusTraffic(config.prometheus_url, config.model, window, config.scrape_timeout_s)
        elif config.frontend_metrics_urls:
            self.traffic = FrontendPages(config.frontend_metrics_urls, config.model, config.scrape_timeout_s)
        else:
            self.traffic = None
        self.pools = WorkerPools(runtime, config.model)

    async def __aenter__(self) -> Observer:
        await self.pools.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pools.close()
        if self.traffic is not None:
            await self.traffic.aclose()

    async def read(self) -> FleetState:
        traffic = await self.traffic.read() if self.traffic is not None else TrafficStats()
        return FleetState(traffic, await self.pools.read(), time.time())
