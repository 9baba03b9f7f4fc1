"""`python -m dynamo.serve`: frontend, router and worker(s) in one process on the embedded
runtime, the local default; with --runtime distributed it joins a NATS/etcd deployment.

It composes the other packages' command lines (frontend/cli.py, workers/cli.py), so it lives
above all of them: in frontend/ it would make the frontend import the engines, in workers/ it
would make the workers import the HTTP service, and in dynamo/ it would make the runtime import
everything built on it again."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from dynamo.config import RuntimeConfig
from dynamo.entry import SYSTEM_FLAGS, freeze_startup_objects, run, wait_for_shutdown
from dynamo.flags import Flag, FlagGroup
from dynamo.runtime import Runtime
from dynamo.runtime.hub import LOOPBACK, hub_parent_runtime
from dynamo.system_server import MetricSource, ScrapedMetrics, SystemServer, merged_registry
from frontend.cli import add_args as add_frontend_args
from frontend.cli import router_factory
from frontend.config import FrontendConfig
from frontend.service import Frontend
from workers.cli import add_model_args, add_worker_args, chosen_engine, default_model_dir, worker_config
from workers.registry import engine_spec
from serve.worker_process import ChildSpec, WorkerExited, WorkerProcess
from workers.worker import Worker, WorkerConfig

SERVE_FLAGS = FlagGroup(
    "serve",
    [
        Flag("--num-workers", "workers to run in this process", default=1, env="DYN_NUM_WORKERS", type=int),
        Flag(
            "--worker-processes",
            "run each worker in a child process of its own (the frontend and router stay in this "
            "one), so the engine loop and the HTTP path each get a core; no NATS or etcd needed",
            default=None,
            env="DYN_WORKER_PROCESSES",
            type=bool,
            default_doc="on for the built-in engine on a GPU, else off",
        ),
        Flag(
            "--num-prefill-workers",
            "prefill workers in this process; when > 0 the --num-workers workers become decode "
            "workers (disaggregated prefill, docs/disaggregation.md)",
            default=0,
            env="DYN_NUM_PREFILL_WORKERS",
            type=int,
        ),
    ],
)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dynamo.serve", description="Frontend, router and worker(s) in one process."
    )
    add_frontend_args(parser, default_backend="embedded")
    add_model_args(parser, default_model=default_model_dir())
    # One --migration-limit, the frontend's: in one process it is the number for every request.
    add_worker_args(parser, skip=("--migration-limit",))
    SYSTEM_FLAGS.add_to(parser)
    SERVE_FLAGS.add_to(parser)
    engine_spec(chosen_engine(argv)).add_args(parser)
    return parser


def worker_roles(args: argparse.Namespace) -> list[WorkerConfig]:
    """One config per worker: --num-workers aggregated workers, or as many decode workers plus
    --num-prefill-workers prefill workers."""
    config = worker_config(args)
    if args.num_prefill_workers <= 0:
        return [config] * args.num_workers
    assert config.disagg is not None
    return [replace(config, role="decode")] * args.num_workers + [
        replace(config, role="prefill", component=config.disagg.prefill_component)
    ] * args.num_prefill_workers


async def serve_all(args: argparse.Namespace) -> None:
    """Serve until SIGINT/SIGTERM, then drain the HTTP server and the workers."""
    if args.worker_processes:
        await serve_with_worker_processes(args)
        return
    spec = engine_spec(args.engine)
    registry = CollectorRegistry()
    async with await Runtime.create(RuntimeConfig.from_args(args)) as runtime:
        async with contextlib.AsyncExitStack() as stack:
            workers: list[Worker] = []
            for i, role_config in enumerate(worker_roles(args)):
                # Each worker needs its own lease (its instance id) on the shared planes.
                worker_runtime = runtime if i == 0 else runtime.sibling()
                if i > 0:
                    await stack.enter_async_context(worker_runtime)
                # An engine that configures itself for its role (vLLM installs its transfer
                # connector) is built from the role's flags.
                engine = spec.create(argparse.Namespace(**{**vars(args), "role": role_config.role}))
                workers.append(await stack.enter_async_context(Worker(worker_runtime, engine, role_config)))
            frontend = await stack.enter_async_context(
                Frontend(
                    runtime,
                    FrontendConfig.from_args(args),
                    router_factory(runtime, args, registry),
                    registry=registry,
                )
            )
            if args.system_port:
                # One page: the frontend's and router's metrics, and each worker's (its KVBM
                # tiers included), labelled by worker instance.
                sources: list[tuple[CollectorRegistry, dict[str, str]]] = [(registry, {})] + [
                    (w.registry, {"worker_instance": f"{w.instance_id:x}"}) for w in workers
                ]
                await stack.enter_async_context(
                    SystemServer(
                        args.system_host,
                        args.system_port,
                        merged_registry(sources),
                        lambda: all(w.ready() for w in workers),
                    )
                )
            freeze_startup_objects()  # the engines' models included
            await wait_for_shutdown()
            # The HTTP server drains first (in-flight requests finish within
            # --http-graceful-shutdown-s), then the workers, which then have nothing left.
            await frontend.stop()
            await asyncio.gather(*(w.drain(args.graceful_shutdown_timeout_s) for w in workers))


async def serve_with_worker_processes(args: argparse.Namespace) -> None:
    """The frontend and router here, each worker in a child process on this process's hub.
    Exits with an error when a worker process dies: a server without its engine serves nothing."""
    registry = CollectorRegistry()
    if getattr(args, "kv_transfer_host", None) is None:
        # Disaggregated children move KV between each other, never off this machine.
        args = argparse.Namespace(**{**vars(args), "kv_transfer_host": LOOPBACK})
    runtime, hub = hub_parent_runtime(RuntimeConfig.from_args(args))
    died: WorkerProcess | None = None
    async with runtime, hub:
        children = [WorkerProcess(ChildSpec(args, role, hub.address, i)) for i, role in enumerate(worker_roles(args))]
        try:
            # One at a time, as in one process: an engine sizing its KV cache from free GPU
            # memory must see what the one before it took.
            for child in children:
                await child.start()
            async with contextlib.AsyncExitStack() as stack:
                frontend = await stack.enter_async_context(
                    Frontend(runtime, FrontendConfig.from_args(args), router_factory(runtime, args, registry), registry=registry)
                )
                if args.system_port:
                    # One page, as in one process: the frontend's and router's metrics, and each
                    # worker child's, scraped from its loopback page at every scrape of this one.
                    await stack.enter_async_context(worker_processes_system_server(args, registry, children))
                freeze_startup_objects()
                died = await _shutdown_or_first_exit(children)
                await frontend.stop()
        except WorkerExited as exc:
            raise SystemExit(str(exc)) from None
        finally:
            await asyncio.gather(*(c.stop(args.graceful_shutdown_timeout_s) for c in children))
    if died is not None:
        raise SystemExit(f"{died.label} exited unexpectedly; stopping")


@contextlib.asynccontextmanager
async def worker_processes_system_server(
    args: argparse.Namespace, registry: CollectorRegistry, children: list[WorkerProcess]
) -> AsyncIterator[SystemServer]:
    scraped = [
        (ScrapedMetrics(f"http://{LOOPBACK}:{c.metrics_port}/metrics"), {"worker_instance": f"{c.instance_id:x}"})
        for c in children
    ]
    sources: list[tuple[MetricSource, dict[str, str]]] = [(registry, {}), *scraped]
    async with httpx.AsyncClient() as client:

        async def scrape_children() -> None:
            await asyncio.gather(*(source.scrape(client) for source, _ in scraped))

        server = SystemServer(
            args.system_host,
            args.system_port,
            merged_registry(sources),
            lambda: all(c.running for c in children),
            before_scrape=scrape_children,
        )
        async with server:
            yield server


async def _shutdown_or_first_exit(children: list[WorkerProcess]) -> WorkerProcess | None:
    """Wait for SIGINT/SIGTERM (None) or for a worker process to exit (that worker)."""
    shutdown = asyncio.create_task(wait_for_shutdown())
    exits: dict[asyncio.Future[Any], WorkerProcess] = {asyncio.create_task(c.wait()): c for c in children}
    try:
        done, _ = await asyncio.wait({shutdown, *exits}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (shutdown, *exits):
            task.cancel()
        await asyncio.gather(shutdown, *exits, return_exceptions=True)
    return next((exits[t] for t in done if t in exits), None)


def worker_processes(args: argparse.Namespace) -> bool:
    """--worker-processes as given, else the engine's own default (EngineSpec.own_process),
    which only the embedded runtime can follow."""
    if args.worker_processes is not None:
        return bool(args.worker_processes)
    return args.runtime == "embedded" and engine_spec(args.engine).own_process(args)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if args.num_workers < 1:
        raise SystemExit("--num-workers must be at least 1")
    args.worker_processes = worker_processes(args)
    if args.worker_processes and args.runtime != "embedded":
        # The children live on this process's hub; on NATS and etcd, workers are processes of
        # their own already.
        raise SystemExit("--worker-processes needs the embedded runtime; with --runtime distributed run dynamo.worker processes")
    run(lambda: serve_all(args), args)
