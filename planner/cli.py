"""The planner's command line (`python -m dynamo.planner`, `dynamo planner`): SLA-driven
autoscaling of the worker pools of one namespace (docs/planner.md)."""

from __future__ import annotations

import argparse
import contextlib
import sys

from prometheus_client import CollectorRegistry

from dynamo.config import RuntimeConfig, add_runtime_args
from dynamo.entry import SYSTEM_FLAGS, add_common_args, run, wait_for_shutdown
from dynamo.model_registry import planned_model_key
from dynamo.runtime import Runtime
from dynamo.system_server import SystemServer
from planner.config import PlannerConfig, add_planner_args
from planner.connectors import Connector
from planner.connectors.kubernetes import KubernetesConnector
from planner.connectors.local import LocalConnector
from planner.connectors.metrics import MetricsConnector
from planner.metrics import PlannerMetrics
from planner.observe import Observer
from planner.perf_model import PerfModel, load_perf_model
from planner.service import Planner


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """`argv` is unused: the same signature as the other entry points' parsers."""
    parser = argparse.ArgumentParser(
        prog="python -m dynamo.planner",
        description="Scale the aggregated, prefill and decode worker pools to the load and the latency targets.",
    )
    add_common_args(parser)
    add_runtime_args(parser, default_backend="distributed")
    add_planner_args(parser)
    SYSTEM_FLAGS.add_to(parser)
    return parser


def make_connector(config: PlannerConfig) -> Connector:
    if config.connector == "local":
        return LocalConnector(config.worker_args, config.worker_stop_timeout_s)
    if config.connector == "kubernetes":
        return KubernetesConnector(config.k8s_namespace, config.k8s_deployments, config.roles, config.k8s_timeout_s)
    return MetricsConnector()


async def serve_planner(config: PlannerConfig, runtime_config: RuntimeConfig, args: argparse.Namespace) -> None:
    """Plan until SIGINT/SIGTERM; the local connector's workers are drained on the way out."""
    perf_model: PerfModel | None = load_perf_model(config.perf_model_path) if config.perf_model_path else None
    registry = CollectorRegistry()
    metrics = PlannerMetrics(registry)
    connector = make_connector(config)
    async with await Runtime.create(runtime_config) as runtime:
        if config.model:
            # Frontends then know the model while its pools are at zero (they hold its requests
            # for a worker instead of answering 404); the key goes with this planner's lease.
            await runtime.register(planned_model_key(runtime.namespace, config.model), b"")
        async with contextlib.AsyncExitStack() as stack:
            await connector.start()
            stack.push_async_callback(connector.close)
            observer = await stack.enter_async_context(Observer(config, runtime))
            if args.system_port:
                await stack.enter_async_context(SystemServer(args.system_host, args.system_port, registry, lambda: True))
            await stack.enter_async_context(Planner(config, observer, connector, metrics, perf_model))
            await wait_for_shutdown()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        config = PlannerConfig.from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if config.mode == "sla" and config.perf_model_path is None:
        parser.error("--mode sla needs --perf-model (benchmarks/profile_worker.py writes one), or use --mode load")
    if config.connector == "local" and not any(config.worker_args.get(r) for r in config.roles):
        parser.error("the local connector needs --worker-args (what `python -m dynamo.worker` is started with)")
    if not config.frontend_metrics_urls and not config.prometheus_url:
        parser.error("give --frontend-metrics-url (the frontends' /metrics) or --prometheus-url")
    run(lambda: serve_planner(config, RuntimeConfig.from_args(args), args), args)
