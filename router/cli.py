"""The router service's command line (`python -m dynamo.router`): the standalone KV-aware
router. Frontends started with `--router-mode remote` ask it (any replica) for each decision;
replicas consume the same KV events and share request feedback, so they stay consistent."""

from __future__ import annotations

import argparse
import contextlib
import sys

from prometheus_client import CollectorRegistry

from dynamo.config import RuntimeConfig, add_runtime_args
from dynamo.entry import SYSTEM_FLAGS, add_common_args, run, wait_for_shutdown
from dynamo.flags import Flag, FlagGroup
from dynamo.runtime import Runtime
from dynamo.system_server import SystemServer
from router.args import RouterConfig, add_router_args
from router.metrics import RouterMetrics
from router.service import RouterService

SERVICE_FLAGS = FlagGroup(
    "router service",
    [
        Flag(
            "--component",
            "the workers' component whose KV events and load to follow",
            default="backend",
            env="DYN_COMPONENT",
        ),
    ],
)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dynamo.router", description="Standalone KV-aware router service."
    )
    add_common_args(parser)
    add_runtime_args(parser, default_backend="distributed")
    add_router_args(parser, default_mode="kv")
    SERVICE_FLAGS.add_to(parser)
    SYSTEM_FLAGS.add_to(parser)
    return parser


async def serve_router(args: argparse.Namespace) -> None:
    """Serve until SIGINT/SIGTERM."""
    registry = CollectorRegistry()
    async with await Runtime.create(RuntimeConfig.from_args(args)) as runtime:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(
                RouterService(
                    runtime,
                    RouterConfig.from_args(args),
                    mode=args.router_mode,
                    component=args.component,
                    metrics=RouterMetrics(registry),
                )
            )
            if args.system_port:
                await stack.enter_async_context(
                    SystemServer(args.system_host, args.system_port, registry, lambda: True)
                )
            await wait_for_shutdown()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.router_mode == "remote":
        parser.error("the router service itself cannot use --router-mode remote")
    run(lambda: serve_router(args), args)
