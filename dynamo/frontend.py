"""`python -m dynamo.frontend`: the OpenAI-compatible HTTP frontend with its embedded router,
following workers and models through discovery."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from dynamo.config import RuntimeConfig, add_runtime_args
from dynamo.entry import add_common_args, run, wait_for_shutdown

if TYPE_CHECKING:
    from dynamo.runtime import Runtime
    from dynamo.wire import ModelCard
    from router.base import Router


def add_args(parser: argparse.ArgumentParser, default_backend: str) -> None:
    from frontend.service import add_frontend_args
    from router.args import add_router_args

    add_common_args(parser)
    add_runtime_args(parser, default_backend=default_backend)  # type: ignore[arg-type]
    add_frontend_args(parser)
    add_router_args(parser)


def router_factory(
    runtime: Runtime, args: argparse.Namespace, registry: CollectorRegistry
) -> Callable[[ModelCard], Router]:
    """Each model gets its own router, sized by the block size its workers registered; all of
    them report into the frontend's metrics registry."""
    from router.args import RouterConfig
    from router.kv_router import make_router
    from router.metrics import RouterMetrics
    from router.service import RemoteRouter

    config = RouterConfig.from_args(args)
    metrics = RouterMetrics(registry)

    def make(card: ModelCard) -> Router:
        if args.router_mode == "remote":
            return RemoteRouter(runtime, namespace=card.namespace)
        block_size = card.kv_block_size or config.kv_block_size
        return make_router(
            args.router_mode,
            replace(config, kv_block_size=block_size),
            runtime.events,
            card.namespace,
            card.component,
            metrics=metrics,
        )

    return make


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dynamo.frontend",
        description="OpenAI-compatible HTTP frontend and router.",
        conflict_handler="resolve",
    )
    add_args(parser, default_backend="distributed")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    async def serve() -> None:
        from dynamo.runtime import Runtime
        from frontend.service import Frontend, FrontendConfig

        registry = CollectorRegistry()
        async with await Runtime.create(RuntimeConfig.from_args(args)) as runtime:
            factory = router_factory(runtime, args, registry)
            async with Frontend(runtime, FrontendConfig.from_args(args), factory, registry=registry):
                await wait_for_shutdown()

    run(serve, args)


if __name__ == "__main__":
    main()
