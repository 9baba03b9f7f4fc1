"""The planner loop: every adjustment interval, observe the fleet, predict the next interval's
load, decide replicas per pool and hand them to the connector; each decision is logged and
exported."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from dynamo import errors
from dynamo.tasks import TaskSet
from planner.config import PlannerConfig
from planner.connectors import Connector
from planner.decide import Decider, Decision, Prediction
from planner.metrics import PlannerMetrics
from planner.observe import FleetState, Observer
from planner.perf_model import PerfModel
from planner.predict import make_predictor

log = logging.getLogger(__name__)


class Planner:
    """`async with Planner(...)`: runs the loop as a task it owns until exit; the connector's
    workers are left to the connector's own close."""

    def __init__(
        self,
        config: PlannerConfig,
        observer: Observer,
        connector: Connector,
        metrics: PlannerMetrics,
        perf_model: PerfModel | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.observer = observer
        self.connector = connector
        self.metrics = metrics
        self.decider = Decider(config, perf_model)
        self._clock = clock
        self._rate = make_predictor(config.predictor, config.predictor_window)
        self._isl = make_predictor(config.predictor, config.predictor_window)
        self._osl = make_predictor(config.predictor, config.predictor_window)
        self._tasks = TaskSet("planner loop", log=log)
        self.last_decisions: list[Decision] = []
        self.steps = 0

    async def __aenter__(self) -> Planner:
        self._tasks.spawn(self._run(), name="planner-loop")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._tasks.cancel_all()

    async def _run(self) -> None:
        interval = self.config.adjustment_interval_s
        next_at = self._clock()
        while True:
            try:
                await asyncio.wait_for(self.step(), max(interval, 5.0) * 3)
            except (errors.DynamoError, TimeoutError, OSError) as exc:
                self.metrics.errors.inc()
                log.warning("planner: adjustment failed: %s", exc)
            except Exception:  # noqa: BLE001 - one bad interval must not stop the planning
                self.metrics.errors.inc()
                log.exception("planner: adjustment failed")
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - self._clock()))
            next_at = max(next_at, self._clock() - interval)  # after a long stall, no burst of steps

    def _predict(self, fleet: FleetState) -> Prediction:
        t = fleet.traffic
        self._rate.observe(t.request_rate)
        # Lengths are only observed when requests were seen; an idle interval says nothing.
        if t.isl > 0:
            self._isl.observe(t.isl)
        if t.osl > 0:
            self._osl.observe(t.osl)
        # The rate is planned for a worker started now: lead time ahead of the next interval.
        steps = 1.0 + self.config.lead_time_s / self.config.adjustment_interval_s
        return Prediction(self._rate.predict(steps), self._isl.predict(), self._osl.predict())

    async def step(self) -> list[Decision]:
        fleet = await self.observer.read()
        prediction = self._predict(fleet)
        current = await self.connector.replicas()
        now = self._clock()
        decisions = self.decider.decide(fleet, prediction, current, now)
        for d in decisions:
            if d.desired != d.current:
                await self.connector.scale(d.role, d.desired)
                self.decider.applied(d, now)
        self.metrics.record(fleet, prediction, decisions)
        self.last_decisions = decisions
        self.steps += 1
        t = fleet.traffic
        # Changes, and decisions held back (bounds, budget, cooldown), at INFO; steady ones at DEBUG.
        notable = [d for d in decisions if d.desired != d.current or d.wanted != d.current]
        log.log(
            logging.INFO if notable else logging.DEBUG,
            "planner: rate %.2f/s (predicted %.2f), isl %.0f, osl %.0f, ttft p90 %s, itl p90 %s, held %d; %s",
            t.request_rate, prediction.request_rate, prediction.isl, prediction.osl,
            "-" if t.ttft_p90_s is None else f"{t.ttft_p90_s * 1000:.0f}ms",
            "-" if t.itl_p90_s is None else f"{t.itl_p90_s * 1000:.1f}ms",
            t.held,
            ", ".join(f"{d.role} {d.current}->{d.desired} ({d.reason})" for d in decisions),
        )
        return decisions
