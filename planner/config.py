"""The planner's flags (DYN_PLANNER_* fallbacks), declared once, and the frozen PlannerConfig
the rest of the planner takes."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from typing import Literal

from dynamo.flags import Flag, FlagGroup

Role = Literal["aggregated", "prefill", "decode"]
Mode = Literal["load", "sla"]
Topology = Literal["agg", "disagg"]
ConnectorKind = Literal["local", "kubernetes", "metrics"]
PredictorKind = Literal["constant", "moving-average", "holt"]

ROLES_OF: dict[str, tuple[Role, ...]] = {"agg": ("aggregated",), "disagg": ("prefill", "decode")}


@dataclass(frozen=True, slots=True)
class Bounds:
    min_replicas: int = 0
    max_replicas: int = 8

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    mode: Mode = "sla"
    topology: Topology = "agg"
    connector: ConnectorKind = "local"
    adjustment_interval_s: float = 30.0
    predictor: PredictorKind = "holt"
    predictor_window: int = 5  # moving average: intervals averaged
    # How far ahead of the next interval to plan: about a worker's start-up time, so that a
    # rising trend has its workers serving when the load arrives (trend predictors only).
    lead_time_s: float = 0.0
    ttft_target_s: float = 0.5
    itl_target_s: float = 0.05
    perf_model_path: str | None = None
    # Disaggregated: prompts shorter than this are prefilled by the decode workers themselves
    # (their --disagg-min-prefill-tokens), so their prefill counts toward the decode pool.
    local_prefill_below_tokens: int = 512
    bounds: dict[Role, Bounds] = field(default_factory=dict)
    gpus_per_worker: dict[Role, int] = field(default_factory=dict)
    gpu_budget: int = 0  # 0: unbounded
    scale_up_cooldown_s: float = 0.0
    scale_down_cooldown_s: float = 60.0
    # Load mode: waiting requests per worker and KV usage bands.
    queue_high: float = 2.0
    queue_low: float = 0.5
    kv_high: float = 0.8
    kv_low: float = 0.3
    # Where to read the fleet from.
    model: str | None = None  # None: every model of the namespace
    frontend_metrics_urls: tuple[str, ...] = ()
    prometheus_url: str | None = None
    scrape_timeout_s: float = 2.0
    # Local connector: the arguments of `python -m dynamo.worker` per role.
    worker_args: dict[Role, tuple[str, ...]] = field(default_factory=dict)
    worker_stop_timeout_s: float = 60.0
    # Kubernetes connector.
    k8s_namespace: str = "dynamo"
    k8s_deployments: dict[Role, str] = field(default_factory=dict)
    k8s_timeout_s: float = 10.0

    @property
    def roles(self) -> tuple[Role, ...]:
        return ROLES_OF[self.topology]

    def bounds_of(self, role: Role) -> Bounds:
        return self.bounds.get(role, Bounds())

    def gpus_of(self, role: Role) -> int:
        return self.gpus_per_worker.get(role, 1)

    def __post_init__(self) -> None:
        if self.adjustment_interval_s <= 0:
            raise ValueError("adjustment_interval_s must be positive")
        if self.ttft_target_s <= 0 or self.itl_target_s <= 0:
            raise ValueError("--ttft-ms and --itl-ms must be positive")
        for role, b in self.bounds.items():
            if not 0 <= b.min_replicas <= b.max_replicas:
                raise ValueError(f"{role}: need 0 <= min replicas <= max replicas, got {b}")
        if not (0 <= self.queue_low <= self.queue_high and 0 <= self.kv_low <= self.kv_high <= 1):
            raise ValueError("load bands: need queue_low <= queue_high and 0 <= kv_low <= kv_high <= 1")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PlannerConfig:
        return cls(
            mode=args.mode,
            topology=args.topology,
            connector=args.connector,
            adjustment_interval_s=args.adjustment_interval_s,
            predictor=args.predictor,
            predictor_window=args.predictor_window,
            lead_time_s=args.lead_time_s,
            ttft_target_s=args.ttft_ms / 1000.0,
            itl_target_s=args.itl_ms / 1000.0,
            perf_model_path=args.perf_model or None,
            local_prefill_below_tokens=args.local_prefill_below_tokens,
            bounds={
                "aggregated": Bounds(args.agg_min, args.agg_max),
                "prefill": Bounds(args.prefill_min, args.prefill_max),
                "decode": Bounds(args.decode_min, args.decode_max),
            },
            gpus_per_worker={
                "aggregated": args.gpus_per_worker, "prefill": args.gpus_per_worker, "decode": args.gpus_per_worker,
            },
            gpu_budget=args.gpu_budget,
            scale_up_cooldown_s=args.scale_up_cooldown_s,
            scale_down_cooldown_s=args.scale_down_cooldown_s,
            queue_high=args.queue_high,
            queue_low=args.queue_low,
            kv_high=args.kv_high,
            kv_low=args.kv_low,
            model=args.model or None,
            frontend_metrics_urls=tuple(u.strip() for u in (args.frontend_metrics_url or "").split(",") if u.strip()),
            prometheus_url=args.prometheus_url or None,
            worker_args={
                "aggregated": tuple(shlex.split(args.worker_args or "")),
                "decode": tuple(shlex.split(args.decode_worker_args or args.worker_args or "")),
                "prefill": tuple(shlex.split(args.prefill_worker_args or args.worker_args or "")),
            },
            worker_stop_timeout_s=args.worker_stop_timeout_s,
            k8s_namespace=args.k8s_namespace,
            k8s_deployments={
                "aggregated": args.k8s_agg_deployment,
                "prefill": args.k8s_prefill_deployment,
                "decode": args.k8s_decode_deployment,
            },
        )


_D = PlannerConfig()

PLANNER_FLAGS = FlagGroup(
    "planner",
    [
        Flag("--mode", "sla: replicas from --ttft-ms/--itl-ms and the performance model; load: keep "
             "queue depth and KV usage inside bands", default=_D.mode, env="DYN_PLANNER_MODE",
             choices=("sla", "load")),
        Flag("--topology", "agg: one pool of aggregated workers; disagg: prefill and decode pools",
             default=_D.topology, env="DYN_PLANNER_TOPOLOGY", choices=("agg", "disagg")),
        Flag("--connector", "how decisions become replicas: local worker processes, Kubernetes "
             "Deployments' scale, or only the dynamo_planner_desired_replicas metric (KEDA/HPA act on it)",
             default=_D.connector, env="DYN_PLANNER_CONNECTOR", choices=("local", "kubernetes", "metrics")),
        Flag("--adjustment-interval-s", "seconds between observations and decisions",
             default=_D.adjustment_interval_s, env="DYN_PLANNER_ADJUSTMENT_INTERVAL_S", type=float),
        Flag("--predictor", "how the next interval's load is predicted from the past ones",
             default=_D.predictor, env="DYN_PLANNER_PREDICTOR", choices=("constant", "moving-average", "holt")),
        Flag("--predictor-window", "moving-average: intervals averaged", default=_D.predictor_window,
             env="DYN_PLANNER_PREDICTOR_WINDOW", type=int),
        Flag("--lead-time-s", "plan this far beyond the next interval (about a worker's start-up), so "
             "workers for a rising load serve when it arrives; holt only", default=_D.lead_time_s,
             env="DYN_PLANNER_LEAD_TIME_S", type=float),
        Flag("--ttft-ms", "SLA: time-to-first-token target (p90)", default=_D.ttft_target_s * 1000,
             env="DYN_PLANNER_TTFT_MS", type=float),
        Flag("--itl-ms", "SLA: inter-token latency target (p90)", default=_D.itl_target_s * 1000,
             env="DYN_PLANNER_ITL_MS", type=float),
        Flag("--perf-model", "SLA: the workers' performance model, as benchmarks/profile_worker.py writes it",
             env="DYN_PLANNER_PERF_MODEL", default_doc="required in sla mode"),
        Flag("--local-prefill-below-tokens", "disagg: the decode workers' --disagg-min-prefill-tokens; "
             "shorter prompts are prefilled on the decode pool and count toward it",
             default=_D.local_prefill_below_tokens, env="DYN_PLANNER_LOCAL_PREFILL_BELOW_TOKENS", type=int),
        Flag("--agg-min", "fewest aggregated workers (0: the pool may scale to zero)", default=1,
             env="DYN_PLANNER_AGG_MIN", type=int),
        Flag("--agg-max", "most aggregated workers", default=8, env="DYN_PLANNER_AGG_MAX", type=int),
        Flag("--prefill-min", "fewest prefill workers (decode workers prefill locally without any)", default=0,
             env="DYN_PLANNER_PREFILL_MIN", type=int),
        Flag("--prefill-max", "most prefill workers", default=8, env="DYN_PLANNER_PREFILL_MAX", type=int),
        Flag("--decode-min", "fewest decode workers (0: the pool may scale to zero)", default=1,
             env="DYN_PLANNER_DECODE_MIN", type=int),
        Flag("--decode-max", "most decode workers", default=8, env="DYN_PLANNER_DECODE_MAX", type=int),
        Flag("--gpus-per-worker", "GPUs one worker uses, counted against --gpu-budget", default=1,
             env="DYN_PLANNER_GPUS_PER_WORKER", type=int),
        Flag("--gpu-budget", "most GPUs all pools together may use (0: no limit)", default=_D.gpu_budget,
             env="DYN_PLANNER_GPU_BUDGET", type=int),
        Flag("--scale-up-cooldown-s", "least time between two scale-ups of one pool",
             default=_D.scale_up_cooldown_s, env="DYN_PLANNER_SCALE_UP_COOLDOWN_S", type=float),
        Flag("--scale-down-cooldown-s", "least time after any change of a pool before it scales down",
             default=_D.scale_down_cooldown_s, env="DYN_PLANNER_SCALE_DOWN_COOLDOWN_S", type=float),
        Flag("--queue-high", "load: waiting requests per worker above which a pool grows",
             default=_D.queue_high, env="DYN_PLANNER_QUEUE_HIGH", type=float),
        Flag("--queue-low", "load: waiting requests per worker below which (with low KV usage) a pool shrinks",
             default=_D.queue_low, env="DYN_PLANNER_QUEUE_LOW", type=float),
        Flag("--kv-high", "load: KV usage above which a pool grows", default=_D.kv_high,
             env="DYN_PLANNER_KV_HIGH", type=float),
        Flag("--kv-low", "load: KV usage below which (with short queues) a pool shrinks", default=_D.kv_low,
             env="DYN_PLANNER_KV_LOW", type=float),
        Flag("--model", "the served model whose pools are planned", env="DYN_PLANNER_MODEL",
             default_doc="every model in the namespace"),
        Flag("--frontend-metrics-url", "the frontends' /metrics pages, comma separated (rates, lengths, "
             "TTFT, ITL)", env="DYN_PLANNER_FRONTEND_METRICS_URL", default_doc="none"),
        Flag("--prometheus-url", "read the fleet from Prometheus' HTTP API instead of the /metrics pages",
             env="DYN_PLANNER_PROMETHEUS_URL", default_doc="none"),
        Flag("--worker-args", "local: arguments of `python -m dynamo.worker` for a new worker",
             env="DYN_PLANNER_WORKER_ARGS", default_doc="none"),
        Flag("--prefill-worker-args", "local: likewise for prefill workers (--role prefill is added)",
             env="DYN_PLANNER_PREFILL_WORKER_ARGS", default_doc="--worker-args"),
        Flag("--decode-worker-args", "local: likewise for decode workers (--role decode is added)",
             env="DYN_PLANNER_DECODE_WORKER_ARGS", default_doc="--worker-args"),
        Flag("--worker-stop-timeout-s", "local: a worker told to drain (SIGTERM) is killed after this "
             "long; keep it above the workers' --graceful-shutdown-timeout-s",
             default=_D.worker_stop_timeout_s, env="DYN_PLANNER_WORKER_STOP_TIMEOUT_S", type=float),
        Flag("--k8s-namespace", "kubernetes: namespace of the worker Deployments", default=_D.k8s_namespace,
             env="DYN_PLANNER_K8S_NAMESPACE"),
        Flag("--k8s-agg-deployment", "kubernetes: Deployment of the aggregated workers",
             default="dynamo-worker", env="DYN_PLANNER_K8S_AGG_DEPLOYMENT"),
        Flag("--k8s-prefill-deployment", "kubernetes: Deployment of the prefill workers",
             default="dynamo-prefill", env="DYN_PLANNER_K8S_PREFILL_DEPLOYMENT"),
        Flag("--k8s-decode-deployment", "kubernetes: Deployment of the decode workers",
             default="dynamo-decode", env="DYN_PLANNER_K8S_DECODE_DEPLOYMENT"),
    ],
)


def add_planner_args(parser: argparse.ArgumentParser) -> None:
    PLANNER_FLAGS.add_to(parser)
