"""The load-aware routing modes: `kv` (KV index + cost function, or approximate mode without
events) and `least-loaded`, plus `make_router`, the factory that builds any mode."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry

from dynamo import errors
from dynamo.events import kv_events_subject, kv_snapshot_subject, load_metrics_subject
from dynamo.kv_hash import block_hashes
from dynamo.runtime.planes import EventPlane, Subscription
from dynamo.wire import (
    KV_EVENT_CODEC,
    LOAD_CODEC,
    AllBlocksCleared,
    BlockRemoved,
    KvSnapshotRequest,
    PreprocessedRequest,
    encode,
)
from router.approx import ApproxIndex
from router.args import RouterConfig
from router.base import RandomRouter, RoundRobinRouter, Router, RoutingDecision
from router.cost import WorkerCost, choose, score_workers
from router.indexer import EventOutcome, KvIndex
from router.load import LoadTracker
from router.metrics import RouterMetrics

__all__ = ["KvRouter", "LeastLoadedRouter", "RouterConfig", "make_router"]

log = logging.getLogger(__name__)

# Removed workers remembered so their late events do not bring them back (lease ids are
# never reused, so forgetting the oldest is safe).
_REMOVED_MEMORY = 4096


class _LoadAwareRouter(Router):
    """Owns the load-metrics subscription, this router's in-flight predictions and its tasks."""

    def __init__(
        self,
        config: RouterConfig,
        events: EventPlane,
        namespace: str,
        component: str,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.config = config
        self.events = events
        self.namespace = namespace
        self.component = component
        self.metrics = metrics if metrics is not None else RouterMetrics(CollectorRegistry())
        self.load = LoadTracker()
        self._rng = random.Random(config.seed)
        self._removed: OrderedDict[int, None] = OrderedDict()
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._label = f"{namespace}/{component}"
        # Labelled counters by worker id, so labels() stays off the hot path.
        self._decisions: dict[int, Any] = {}
        self._overlap_hist = self.metrics.overlap_blocks.labels(self.mode)

    async def start(self) -> None:
        sub = await self.events.subscribe(load_metrics_subject(self.namespace, self.component))
        self._subs.append(sub)
        self._spawn(self._consume_load(sub))

    async def close(self) -> None:
        for sub in self._subs:
            await sub.close()
        self._subs.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def __aenter__(self) -> _LoadAwareRouter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def request_finished(self, request_id: str, instance_id: int) -> None:
        self.load.finished(request_id)

    def first_token(self, request_id: str, instance_id: int) -> None:
        self.load.first_token(request_id)

    def instance_removed(self, instance_id: int) -> None:
        self.load.remove_worker(instance_id)
        self._removed[instance_id] = None
        if len(self._removed) > _REMOVED_MEMORY:
            self._removed.popitem(last=False)

    # ------------------------------------------------------------------------------ helpers

    def _admit(self, candidates: Sequence[int]) -> None:
        if not candidates:
            raise errors.NoInstances("no live worker serves this model")
        if self._removed:
            for worker in candidates:  # offered again: it is alive after all
                self._removed.pop(worker, None)

    def _commit(self, request: PreprocessedRequest, best: WorkerCost) -> RoutingDecision:
        """Count the chosen worker's new work until the request reports back."""
        block_size = self.config.kv_block_size
        prompt_tokens = len(request.token_ids)
        self.load.add(
            request.request_id,
            best.worker_id,
            prefill_tokens=max(prompt_tokens - best.overlap_blocks * block_size, 0),
            decode_blocks=math.ceil(prompt_tokens / block_size),
            prompt_tokens=prompt_tokens,
        )
        counter = self._decisions.get(best.worker_id)
        if counter is None:
            counter = self._decisions[best.worker_id] = self.metrics.decisions.labels(
                self.mode, f"{best.worker_id:x}"
            )
        counter.inc()
        self._overlap_hist.observe(best.overlap_blocks)
        return RoutingDecision(best.worker_id, best.overlap_blocks)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("router task failed", exc_info=task.exception())

    async def _consume_load(self, sub: Subscription) -> None:
        lag = self.metrics.load_report_lag_s.labels(self._label)
        async for payload in sub:
            try:
                metrics = LOAD_CODEC.decode(payload)
            except msgspec.MsgspecError as exc:
                log.warning("dropping malformed load report: %s", exc)
                continue
            if metrics.worker_id in self._removed:
                continue
            self.load.update(metrics)
            if metrics.timestamp_s > 0:
                lag.observe(max(time.time() - metrics.timestamp_s, 0.0))


class LeastLoadedRouter(_LoadAwareRouter):
    """The worker with the fewest active KV blocks and queued prefill, in-flight included."""

    mode = "least-loaded"

    async def select(
        self, request: PreprocessedRequest, candidates: Sequence[int]
    ) -> RoutingDecision:
        self._admit(candidates)
        request_blocks = len(request.token_ids) // self.config.kv_block_size
        costs = score_workers(
            candidates, {}, request_blocks, self.config.kv_block_size, self.load, 1.0
        )
        return self._commit(request, choose(costs, 0.0, self._rng))


class KvRouter(_LoadAwareRouter):
    """Routes each request to the worker whose cache and load make it cheapest (router/cost.py).

    With KV events it keeps a KvIndex from the workers' events and asks a worker for a
    snapshot (KvSnapshotRequest on the component's snapshot subject) when its events have a
    gap or when it is offered as a candidate before the router has heard from it; the worker
    answers with AllBlocksCleared followed by its whole cache as ordinary numbered events.
    Without events (approximate mode) it predicts caches from its own decisions.
    """

    mode = "kv"

    def __init__(
        self,
        config: RouterConfig,
        events: EventPlane,
        namespace: str,
        component: str,
        metrics: RouterMetrics | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        super().__init__(config, events, namespace, component, metrics)
        self._clock = clock
        self.index: KvIndex | None = None
        self.approx: ApproxIndex | None = None
        # With events: this router's own recent decisions, until the events confirm them.
        self.predicted: ApproxIndex | None = None
        if config.use_kv_events:
            self.index = KvIndex(tier_weights={"host": config.host_hit_weight, "disk": config.disk_hit_weight})
            if config.prediction_ttl_s > 0:
                self.predicted = ApproxIndex(config.prediction_ttl_s, config.approx_capacity_blocks)
        else:
            self.approx = ApproxIndex(config.approx_ttl_s, config.approx_capacity_blocks)
        # Workers heard from or asked for a snapshot; others get asked when first offered.
        self._known: set[int] = set()
        self._snapshot_sent_at: dict[int, float] = {}
        self._snapshot_subject = kv_snapshot_subject(namespace, component)
        source = self.index if self.index is not None else self.approx
        assert source is not None
        self.metrics.watch_index(self._label, source.num_blocks)
        self._event_outcomes = {
            outcome: self.metrics.kv_events.labels(self._label, outcome.value)
            for outcome in EventOutcome
        }

    async def start(self) -> None:
        await super().start()
        if self.index is not None:
            sub = await self.events.subscribe(kv_events_subject(self.namespace, self.component))
            self._subs.append(sub)
            self._spawn(self._consume_kv_events(sub, self.index))

    async def close(self) -> None:
        await super().close()
        self.metrics.forget_index(self._label)

    async def select(
        self, request: PreprocessedRequest, candidates: Sequence[int]
    ) -> RoutingDecision:
        self._admit(candidates)
        hashes = block_hashes(request.token_ids, self.config.kv_block_size)
        if self.index is not None:
            self._resync_as_needed(candidates, self.index)
            overlaps = dict(self.index.find_matches(hashes))
            if self.predicted is not None:
                for worker, blocks in self.predicted.find_matches(hashes, self._clock()).items():
                    if blocks > overlaps.get(worker, 0):
                        overlaps[worker] = blocks
        else:
            assert self.approx is not None
            overlaps = self.approx.find_matches(hashes, self._clock())
        costs = score_workers(
            candidates,
            overlaps,
            len(hashes),
            self.config.kv_block_size,
            self.load,
            self.config.overlap_score_weight,
        )
        best = choose(costs, self.config.temperature, self._rng)
        for predicted in (self.approx, self.predicted):
            if predicted is not None:
                predicted.record(best.worker_id, hashes, self._clock())
        return self._commit(request, best)

    def instance_removed(self, instance_id: int) -> None:
        super().instance_removed(instance_id)
        if self.index is not None:
            self.index.remove_worker(instance_id)
        for predicted in (self.approx, self.predicted):
            if predicted is not None:
                predicted.remove_worker(instance_id)
        self._known.discard(instance_id)
        self._snapshot_sent_at.pop(instance_id, None)

    # ------------------------------------------------------------------------- KV events

    async def _consume_kv_events(self, sub: Subscription, index: KvIndex) -> None:
        lag = self.metrics.kv_event_lag_s.labels(self._label)
        async for payload in sub:
            try:
                event = KV_EVENT_CODEC.decode(payload)
            except msgspec.MsgspecError as exc:
                log.warning("dropping malformed KV event: %s", exc)
                self.metrics.kv_events.labels(self._label, "invalid").inc()
                continue
            worker = event.worker_id
            if worker in self._removed:
                continue
            self._known.add(worker)
            outcome = index.apply_event(event)
            self._event_outcomes[outcome].inc()
            if self.predicted is not None:  # an eviction or clear overrules a prediction
                if isinstance(event.data, BlockRemoved):
                    self.predicted.forget(worker, event.data.block_hashes)
                elif isinstance(event.data, AllBlocksCleared):
                    self.predicted.remove_worker(worker)
            if event.timestamp_s > 0:
                lag.observe(max(time.time() - event.timestamp_s, 0.0))
            if outcome is EventOutcome.GAP:
                log.info("KV events of worker %x have a gap; asking for a snapshot", worker)
                self._request_snapshot(worker)
            elif isinstance(event.data, AllBlocksCleared):
                self._snapshot_sent_at.pop(worker, None)

    def _resync_as_needed(self, candidates: Sequence[int], index: KvIndex) -> None:
        for worker in candidates:
            if worker not in self._known:
                self._known.add(worker)
                self._request_snapshot(worker)
            elif index.needs_resync(worker):
                self._request_snapshot(worker)

    def _request_snapshot(self, worker: int) -> None:
        """Ask `worker` to re-publish its cache, at most once per retry interval."""
        now = self._clock()
        sent_at = self._snapshot_sent_at.get(worker)
        if sent_at is not None and now - sent_at < self.config.snapshot_retry_s:
            return
        self._snapshot_sent_at[worker] = now
        self.metrics.snapshot_requests.labels(self._label).inc()
        self._spawn(self._publish_snapshot_request(worker))

    async def _publish_snapshot_request(self, worker: int) -> None:
        try:
            await self.events.publish(self._snapshot_subject, encode(KvSnapshotRequest(worker)))
        except Exception as exc:  # noqa: BLE001 - any transport failure; nothing is lost
            # The retry timer sends it again on the next gap or selection of this worker.
            log.warning("could not ask worker %x for a KV snapshot: %s", worker, exc)


def make_router(
    mode: str,
    config: RouterConfig,
    events: EventPlane,
    namespace: str,
    component: str,
    *,
    metrics: RouterMetrics | None = None,
) -> Router:
    """A router of `mode` (round-robin, random, kv, least-loaded) for one component's workers.
    The caller awaits `start()` before the first `select()` and `close()` at the end."""
    mode = mode.replace("_", "-")
    if mode == "round-robin":
        return RoundRobinRouter()
    if mode == "random":
        return RandomRouter(config.seed)
    if mode == "kv":
        return KvRouter(config, events, namespace, component, metrics)
    if mode == "least-loaded":
        return LeastLoadedRouter(config, events, namespace, component, metrics)
    raise ValueError(f"unknown router mode {mode!r}")
