"""The planner's Prometheus metrics (`dynamo_planner_*`), on a registry passed in: what it saw,
what it predicted, what it decided and why."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from planner.decide import Decision, Prediction
from planner.observe import FleetState


class PlannerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.desired = Gauge(
            "dynamo_planner_desired_replicas", "Replicas the planner wants for each pool (KEDA/HPA may act on it)",
            ["role"], registry=registry,
        )
        self.current = Gauge(
            "dynamo_planner_current_replicas", "Replicas each pool had when the planner decided", ["role"],
            registry=registry,
        )
        self.serving = Gauge(
            "dynamo_planner_serving_replicas",
            "Workers of each pool registered in discovery when the planner decided (started and serving)",
            ["role"], registry=registry,
        )
        self.wanted = Gauge(
            "dynamo_planner_wanted_replicas",
            "Replicas the mode asked for, before min/max bounds, the GPU budget and cooldowns", ["role"],
            registry=registry,
        )
        self.decisions = Counter(
            "dynamo_planner_decisions",  # exposed as ..._decisions_total
            "Decisions by pool and reason (sla_model, ttft_over_target, itl_over_target, "
            "latency_near_target, queue_high, kv_high, load_low, idle, held_request, traffic, "
            "min_replicas, max_replicas, gpu_budget, cooldown, steady)",
            ["role", "reason"], registry=registry,
        )
        self.predicted_rate = Gauge(
            "dynamo_planner_predicted_request_rate", "Requests per second predicted for the next interval",
            registry=registry,
        )
        self.predicted_isl = Gauge(
            "dynamo_planner_predicted_input_tokens", "Mean prompt tokens predicted for the next interval",
            registry=registry,
        )
        self.predicted_osl = Gauge(
            "dynamo_planner_predicted_output_tokens", "Mean output tokens predicted for the next interval",
            registry=registry,
        )
        self.observed_rate = Gauge(
            "dynamo_planner_observed_request_rate", "Requests per second in the last interval", registry=registry
        )
        self.observed_ttft = Gauge(
            "dynamo_planner_observed_ttft_p90_seconds", "p90 time to first token in the last interval (NaN: none)",
            registry=registry,
        )
        self.observed_itl = Gauge(
            "dynamo_planner_observed_itl_p90_seconds", "p90 inter-token latency in the last interval (NaN: none)",
            registry=registry,
        )
        self.errors = Counter(
            "dynamo_planner_errors",  # exposed as ..._errors_total
            "Adjustment intervals that failed (observation or connector)", registry=registry,
        )

    def record(self, fleet: FleetState, prediction: Prediction, decisions: list[Decision]) -> None:
        t = fleet.traffic
        self.observed_rate.set(t.request_rate)
        self.observed_ttft.set(float("nan") if t.ttft_p90_s is None else t.ttft_p90_s)
        self.observed_itl.set(float("nan") if t.itl_p90_s is None else t.itl_p90_s)
        self.predicted_rate.set(prediction.request_rate)
        self.predicted_isl.set(prediction.isl)
        self.predicted_osl.set(prediction.osl)
        for d in decisions:
            self.desired.labels(d.role).set(d.desired)
            self.current.labels(d.role).set(d.current)
            self.wanted.labels(d.role).set(d.wanted)
            pool = fleet.pools.get(d.role)
            self.serving.labels(d.role).set(pool.workers if pool is not None else 0)
            self.decisions.labels(d.role, d.reason).inc()
