"""The `kv` routing mode: a KV index fed by the workers' events (or, in approximate mode, caches
predicted from the router's own decisions) and the cost function of router/cost.py."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from dynamo.events import kv_events_subject, kv_snapshot_subject
from dynamo.kv_hash import block_hashes
from dynamo.runtime.planes import EventPlane, Subscription
from dynamo.wire import (
    KV_EVENT_CODEC,
    AllBlocksCleared,
    BlockRemoved,
    KvSnapshotRequest,
    PreprocessedRequest,
    encode,
)
from router.approx import ApproxIndex
from router.args import RouterConfig
from router.base import RoutingDecision
from router.cost import WorkerCost, choose, score_workers
from router.indexer import EventOutcome, KvIndex
from router.load_aware import LoadAwareRouter
from router.metrics import RouterMetrics
from router.session import Affinity, SessionTable

_TIE_EPSILON = 1e-9

__all__ = ["KvRouter"]

log = logging.getLogger(__name__)


class KvRouter(LoadAwareRouter):
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
        self.sessions: SessionTable | None = None
        if config.session_ttl_s > 0:
            self.sessions = SessionTable(config.session_ttl_s, clock)
            self.metrics.sessions.labels(self._label).set_function(self.sessions.__len__)
            self._affinity = {
                outcome: self.metrics.session_affinity.labels(self._label, outcome.value)
                for outcome in Affinity
            }

    async def start(self) -> None:
        await super().start()
        if self.index is not None:
            sub = await self.events.subscribe(kv_events_subject(self.namespace, self.component))
            self._subs.append(sub)
            self._spawn(self._consume_kv_events(sub, self.index))

    async def close(self) -> None:
        await super().close()
        self.metrics.forget_index(self._label)  # the sessions gauge too

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
        if self.sessions is not None and request.session_id:
            best = self._session_choice(request.session_id, self.sessions, costs)
        else:
            best = choose(costs, self.config.temperature, self._rng)
        for predicted in (self.approx, self.predicted):
            if predicted is not None:
                predicted.record(best.worker_id, hashes, self._clock())
        return self._commit(request, best)

    def _session_choice(self, session: str, table: SessionTable, costs: list[WorkerCost]) -> WorkerCost:
        """The session's pinned worker while it is a candidate and not overloaded; otherwise
        normal scoring's choice, to which the session is (re-)pinned."""
        pinned = table.get(session)
        outcome = Affinity.MISS
        if pinned is not None:
            outcome = Affinity.REPIN
            for cost in costs:
                if cost.worker_id == pinned:
                    if not self._overloaded(cost, costs):
                        table.pin(session, pinned)
                        self._affinity[Affinity.HIT].inc()
                        return cost
                    outcome = Affinity.OVERLOADED
                    break
        best = choose(costs, self.config.temperature, self._rng)
        table.pin(session, best.worker_id)
        self._affinity[outcome].inc()
        return best

    def _overloaded(self, pinned: WorkerCost, costs: list[WorkerCost]) -> bool:
        """The pinned worker's cost (router/cost.py: its queued and uncached prefill, its
        decode load; its cached prefix already counts in its favour) exceeds the ratio times
        the cheapest candidate's: a session may cost up to that much more than plain KV routing
        would pay, in exchange for staying where its cache is; and by more than
        `session_overload_min_blocks` blocks of prefill, so that near idle a lagging load report
        (the session's previous turn, still counted) does not move a session off its cache."""
        best = min(c.logit for c in costs)
        margin = self.config.overlap_score_weight * self.config.session_overload_min_blocks
        return pinned.logit > max(self.config.session_overload_ratio * best, best + margin) + _TIE_EPSILON

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
