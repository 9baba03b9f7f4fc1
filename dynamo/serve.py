"""`python -m dynamo.serve`: frontend, router and worker(s) in one process on the embedded
runtime — the local default. With --runtime distributed it joins a NATS/etcd deployment."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from dynamo.config import RuntimeConfig, env_default
from dynamo.entry import add_model_args, default_model_dir, run, wait_for_shutdown


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--engine", default=env_default("DYN_ENGINE", DEFAULT_ENGINE))
    engine_name = pre.parse_known_args(argv)[0].engine

    from dynamo.frontend import add_args as add_frontend_args
    from dynamo.worker import add_worker_args
    from workers.engines import engine_spec

    parser = argparse.ArgumentParser(
        prog="python -m dynamo.serve",
        description="Frontend, router and worker(s) in one process.",
        conflict_handler="resolve",
    )
    add_frontend_args(parser, default_backend="embedded")
    add_model_args(parser, default_model=default_model_dir())
    parser.set_defaults(engine=engine_name)
    add_worker_args(parser)
    parser.add_argument(
        "--num-workers",
        type=int,
        default=int(env_default("DYN_NUM_WORKERS", "1") or 1),
        help="workers to run in this process [env DYN_NUM_WORKERS]",
    )
    parser.add_argument(
        "--num-prefill-workers",
        type=int,
        default=int(env_default("DYN_NUM_PREFILL_WORKERS", "0") or 0),
        help="prefill workers in this process; when > 0 the --num-workers workers become "
        "decode workers (disaggregated prefill, docs/disaggregation.md) [env DYN_NUM_PREFILL_WORKERS]",
    )
    engine_spec(engine_name).add_args(parser)
    return parser


DEFAULT_ENGINE = "builtin"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if args.num_workers < 1:
        raise SystemExit("--num-workers must be at least 1")

    async def serve() -> None:
        from dynamo.frontend import router_factory
        from dynamo.runtime import Runtime
        from dynamo.worker import worker_config
        from frontend.service import Frontend, FrontendConfig
        from workers.engines import engine_spec
        from workers.worker import Worker

        from prometheus_client import CollectorRegistry

        spec = engine_spec(args.engine)
        registry = CollectorRegistry()
        async with await Runtime.create(RuntimeConfig.from_args(args)) as runtime:
            async with contextlib.AsyncExitStack() as stack:
                workers: list[Worker] = []
                config = worker_config(args)
                roles = [config] * args.num_workers
                if args.num_prefill_workers > 0:  # disaggregated: decode workers + prefill workers
                    from dataclasses import replace

                    assert config.disagg is not None
                    roles = [replace(config, role="decode")] * args.num_workers + [
                        replace(config, role="prefill", component=config.disagg.prefill_component)
                    ] * args.num_prefill_workers
                for i, role_config in enumerate(roles):
                    # Each worker needs its own lease (its instance id) on the shared planes.
                    worker_runtime = runtime if i == 0 else runtime.sibling()
                    if i > 0:
                        await stack.enter_async_context(worker_runtime)
                    workers.append(
                        await stack.enter_async_context(
                            Worker(worker_runtime, spec.create(args), role_config)
                        )
                    )
                frontend = await stack.enter_async_context(
                    Frontend(
                        runtime,
                        FrontendConfig.from_args(args),
                        router_factory(runtime, args, registry),
                        registry=registry,
                    )
                )
                await wait_for_shutdown()
                # The HTTP server drains first (in-flight requests finish within
                # --http-graceful-shutdown-s), then the workers, which then have nothing left.
                await frontend.stop()
                await asyncio.gather(*(w.drain(args.graceful_shutdown_timeout_s) for w in workers))

    run(serve, args)


if __name__ == "__main__":
    main()
