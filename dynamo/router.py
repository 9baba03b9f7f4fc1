"""`python -m dynamo.router`: the standalone KV-aware router service. Frontends started with
`--router-mode remote` ask it (any replica) for each decision; replicas consume the same KV
events and share request feedback, so they stay consistent."""

from __future__ import annotations

import argparse
import sys

from prometheus_client import CollectorRegistry

from dynamo.config import RuntimeConfig, add_runtime_args, env_default
from dynamo.entry import add_common_args, run, wait_for_shutdown


def main(argv: list[str] | None = None) -> None:
    from router.args import add_router_args

    parser = argparse.ArgumentParser(
        prog="python -m dynamo.router",
        description="Standalone KV-aware router service.",
        conflict_handler="resolve",
    )
    add_common_args(parser)
    add_runtime_args(parser, default_backend="distributed")
    add_router_args(parser)
    parser.set_defaults(router_mode="kv")
    parser.add_argument(
        "--component",
        default=env_default("DYN_COMPONENT", "backend"),
        help="the workers' component whose KV events and load to follow",
    )
    parser.add_argument(
        "--system-port",
        type=int,
        default=int(env_default("DYN_SYSTEM_PORT", "0") or 0),
        help="serve /health, /ready and /metrics on this port (0: off) [env DYN_SYSTEM_PORT]",
    )
    parser.add_argument("--system-host", default=env_default("DYN_SYSTEM_HOST", "0.0.0.0"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.router_mode == "remote":
        raise SystemExit("the router service itself cannot use --router-mode remote")

    async def serve() -> None:
        import contextlib

        from dynamo.runtime import Runtime
        from router.args import RouterConfig
        from router.metrics import RouterMetrics
        from router.service import RouterService

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
                    from dynamo.system_server import SystemServer

                    await stack.enter_async_context(
                        SystemServer(args.system_host, args.system_port, registry, lambda: True)
                    )
                await wait_for_shutdown()

    run(serve, args)


if __name__ == "__main__":
    main()
