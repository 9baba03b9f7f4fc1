"""What every load-aware routing mode shares (LoadAwareRouter: the workers' load reports,
this router's in-flight requests, its decision metrics and tasks), and the simplest such mode,
`least-loaded`."""

from __future__ import annotations

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
from dynamo.events import load_metrics_subject
from dynamo.runtime.planes import EventPlane, Subscription
from dynamo.tasks import TaskSet
from dynamo.wire import LOAD_CODEC, PreprocessedRequest
from router.args import RouterConfig
from router.base import Router, RoutingDecision
from router.cost import WorkerCost, choose, score_workers
from router.load import LoadTracker
from router.metrics import RouterMetrics

log = logging.getLogger(__name__)

# Removed workers remembered so their late events do not bring them back (lease ids are
# never reused, so forgetting the oldest is safe).
_REMOVED_MEMORY = 4096


class LoadAwareRouter(Router):
    """The base of the modes that weigh load: owns the load-metrics subscription, this
    router's in-flight predictions and its tasks."""

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
        self._tasks = TaskSet("router task", log=log)
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
        await self._tasks.cancel_all()

    async def __aenter__(self) -> LoadAwareRouter:
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
            prefill_tokens=max(prompt_tokens - round(best.overlap_blocks * block_size), 0),
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
        self._tasks.spawn(coro)

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


class LeastLoadedRouter(LoadAwareRouter):
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
