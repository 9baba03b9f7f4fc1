"""The frontend's command line (`python -m dynamo.frontend`): the OpenAI-compatible HTTP
frontend with its embedded router (or a remote one), following workers and models through
discovery."""

from __future__ import annotations

import argparse
import sys

from prometheus_client import CollectorRegistry

from dynamo.config import Backend, RuntimeConfig, add_runtime_args
from dynamo.entry import add_common_args, freeze_startup_objects, run, wait_for_shutdown
from dynamo.runtime import Runtime
from frontend.config import FrontendConfig, add_frontend_args
from frontend.models import RouterFactory
from frontend.service import Frontend
from router.args import RouterConfig, add_router_args
from router.metrics import RouterMetrics
from router.modes import model_router_factory


def add_args(parser: argparse.ArgumentParser, default_backend: Backend) -> None:
    """Every flag of a frontend process: logging, runtime, frontend and router."""
    add_common_args(parser)
    add_runtime_args(parser, default_backend=default_backend)
    add_frontend_args(parser)
    add_router_args(parser)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dynamo.frontend", description="OpenAI-compatible HTTP frontend and router."
    )
    add_args(parser, default_backend="distributed")
    return parser


def router_factory(runtime: Runtime, args: argparse.Namespace, registry: CollectorRegistry) -> RouterFactory:
    """One router per model, of --router-mode, reporting into the frontend's registry."""
    return model_router_factory(runtime, args.router_mode, RouterConfig.from_args(args), RouterMetrics(registry))


async def serve_frontend(args: argparse.Namespace) -> None:
    """Serve until SIGINT/SIGTERM."""
    registry = CollectorRegistry()
    async with await Runtime.create(RuntimeConfig.from_args(args)) as runtime:
        factory = router_factory(runtime, args, registry)
        async with Frontend(runtime, FrontendConfig.from_args(args), factory, registry=registry):
            freeze_startup_objects()
            await wait_for_shutdown()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    run(lambda: serve_frontend(args), args)
