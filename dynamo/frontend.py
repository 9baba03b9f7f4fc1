"""`python -m dynamo.frontend`: the OpenAI-compatible HTTP frontend with its embedded router,
following workers and models through discovery."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from dynamo.config import RuntimeConfig, add_runtime_args
from dynamo.entry import add_common_args, run, wait_for_shutdown


def add_args(parser: argparse.ArgumentParser, default_backend: str) -> None:
    from frontend.service import add_frontend_args
    from router.args import add_router_args

    add_common_args(parser)
    add_runtime_args(parser, default_backend=default_backend)  # type: ignore[arg-type]
    add_frontend_args(parser)
    add_router_args(parser)


def router_factory(runtime, args: argparse.Namespace):  # -> Callable[[ModelCard], Router]
    """Each model gets its own router, sized by the block size its workers registered."""
    from router.args import RouterConfig
    from router.kv_router import make_router

    config = RouterConfig.from_args(args)

    def make(card):
        return make_router(
            args.router_mode,
            replace(config, kv_block_size=card.kv_block_size),
            runtime.events,
            card.namespace,
            card.component,
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

        async with await Runtime.create(RuntimeConfig.from_args(args)) as runtime:
            async with Frontend(runtime, FrontendConfig.from_args(args), router_factory(runtime, args)):
                await wait_for_shutdown()

    run(serve, args)


if __name__ == "__main__":
    main()
