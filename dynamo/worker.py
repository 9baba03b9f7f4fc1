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
        default=int(env_default("DYN_MIGRATION_LIMIT", "0") or 0),
        help="times a request may move to another worker if this one dies (0: never)",
    )
    group.add_argument(
        "--system-port",
        type=int,
        default=int(env_default("DYN_SYSTEM_PORT", "0") or 0),
        help="serve /health, /ready and /metrics on this port (0: off) [env DYN_SYSTEM_PORT]",
    )
    group.add_argument("--system-host", default=env_default("DYN_SYSTEM_HOST", "0.0.0.0"))


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
    from workers.worker import WorkerConfig

    return WorkerConfig(
        served_model_name=served_model_name(args),
        model_path=args.model,
        engine_name=args.engine,
        component=args.component,
        endpoint=args.endpoint,
        role=args.role,
        migration_limit=args.migration_limit,
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
                else:
                    await wait_for_shutdown()

    run(serve, args)


if __name__ == "__main__":
    main()
