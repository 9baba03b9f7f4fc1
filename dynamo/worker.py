"""`python -m dynamo.worker`: serve one engine as a worker on the distributed runtime."""

from __future__ import annotations

import argparse
import sys

from dynamo.config import RuntimeConfig, add_runtime_args, env_default
from dynamo.entry import add_common_args, add_model_args, run, served_model_name, wait_for_shutdown


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("worker")
    group.add_argument(
        "--role",
        choices=["aggregated", "prefill", "decode"],
        default=env_default("DYN_ROLE", "aggregated"),
        help="aggregated serves whole requests; prefill/decode split them [env DYN_ROLE]",
    )
    group.add_argument("--component", default=env_default("DYN_COMPONENT", "backend"))
    group.add_argument("--endpoint", default=env_default("DYN_ENDPOINT", "generate"))
    group.add_argument(
        "--migration-limit",
        type=int,
        # On by default, unlike NVIDIA Dynamo (0): a worker lost mid-stream should cost the
        # client a pause, not its answer; 3 bounds what one poisonous request can take down.
        default=int(env_default("DYN_MIGRATION_LIMIT", "3") or 0),
        help="times a request may move to another worker if this one dies mid-stream (0: never); "
        "registered in the model card, a frontend's own --migration-limit overrides it "
        "[env DYN_MIGRATION_LIMIT]",
    )
    group.add_argument(
        "--graceful-shutdown-timeout-s",
        type=float,
        default=float(env_default("DYN_GRACEFUL_SHUTDOWN_TIMEOUT_S", "30") or 0),
        help="on SIGTERM, how long in-flight requests may finish after the worker deregistered; "
        "those still running are then cancelled (and migrated by the frontend) "
        "[env DYN_GRACEFUL_SHUTDOWN_TIMEOUT_S]",
    )
    group.add_argument(
        "--max-queued-requests",
        type=int,
        default=int(env_default("DYN_MAX_QUEUED_REQUESTS", "1024") or 0),
        help="requests waiting for the engine before new ones are refused as overloaded, so the "
        "frontend tries another worker or answers 503 (default 1024; 0: unbounded) "
        "[env DYN_MAX_QUEUED_REQUESTS]",
    )
    group.add_argument(
        "--system-port",
        type=int,
        default=int(env_default("DYN_SYSTEM_PORT", "0") or 0),
        help="serve /health, /ready and /metrics on this port (0: off) [env DYN_SYSTEM_PORT]",
    )
    group.add_argument("--system-host", default=env_default("DYN_SYSTEM_HOST", "0.0.0.0"))
    from workers.disagg.args import add_disagg_args

    add_disagg_args(parser)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Two passes: --engine decides which engine's flags exist."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--engine", default=env_default("DYN_ENGINE", "mocker"))
    engine_name = pre.parse_known_args(argv)[0].engine

    from workers.engines import engine_spec

    parser = argparse.ArgumentParser(
        prog="python -m dynamo.worker",
        description="Serve an LLM engine as a worker.",
        conflict_handler="resolve",
    )
    add_common_args(parser)
    add_runtime_args(parser, default_backend="distributed")
    add_model_args(parser)
    add_worker_args(parser)
    engine_spec(engine_name).add_args(parser)
    return parser


def worker_config(args: argparse.Namespace):  # -> workers.worker.WorkerConfig
    from workers.disagg.args import DisaggConfig
    from workers.worker import WorkerConfig

    component = args.component
    if args.role == "prefill" and component == "backend":
        # Prefill workers must not share the decode workers' component: the frontend routes
        # there, and decode workers watch the prefill component's KV events and load.
        component = args.disagg_prefill_component
    return WorkerConfig(
        served_model_name=served_model_name(args),
        model_path=args.model,
        engine_name=args.engine,
        component=component,
        disagg=DisaggConfig.from_args(args),
        endpoint=args.endpoint,
        role=args.role,
        migration_limit=args.migration_limit,
        max_queued_requests=args.max_queued_requests,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)

    async def serve() -> None:
        from dynamo.runtime import Runtime
        from workers.engines import engine_spec
        from workers.worker import Worker

        async with await Runtime.create(RuntimeConfig.from_args(args)) as runtime:
            engine = engine_spec(args.engine).create(args)
            async with Worker(runtime, engine, worker_config(args)) as worker:
                if args.system_port:
                    from dynamo.system_server import SystemServer

                    async with SystemServer(args.system_host, args.system_port, worker.registry, worker.ready):
                        await wait_for_shutdown()
                        await worker.drain(args.graceful_shutdown_timeout_s)
                else:
                    await wait_for_shutdown()
                    await worker.drain(args.graceful_shutdown_timeout_s)

    run(serve, args)


if __name__ == "__main__":
    main()
