"""What every command line shares: the event loop (uvloop where present), signal handling,
the logging flags and the system server's flags (/health, /ready, /metrics on a port)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from dynamo import tracing
from dynamo.flags import Flag, FlagGroup
from dynamo.logs import configure_logging

log = logging.getLogger(__name__)

try:
    import uvloop
except ImportError:  # optional (not on Windows): asyncio's own loop then
    uvloop = None  # type: ignore[assignment]

LOGGING_FLAGS = FlagGroup(
    "logging",
    [
        Flag("--log-level", "log level", default="INFO", env="DYN_LOG"),
        Flag("--log-json", "JSON log lines", default=False, env="DYN_LOG_JSON", type=bool),
    ],
)

SYSTEM_FLAGS = FlagGroup(
    "system server",
    [
        Flag(
            "--system-port",
            "serve /health, /ready and /metrics on this port (0: off)",
            default=0,
            env="DYN_SYSTEM_PORT",
            type=int,
        ),
        Flag("--system-host", "address the system server binds", default="0.0.0.0", env="DYN_SYSTEM_HOST"),
    ],
)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    LOGGING_FLAGS.add_to(parser)
    tracing.TRACING_FLAGS.add_to(parser)


async def wait_for_shutdown() -> None:
    """Return on SIGINT or SIGTERM, for the caller to drain. From then on a second one exits
    the process at once, with 128 + the signal's number (an operator's second Ctrl-C, or an
    orchestrator out of patience): without a handler Python would raise KeyboardInterrupt
    wherever the drain stood and print its traceback."""
    received: list[signal.Signals] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first(sig: signal.Signals) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, first, sig)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("%s: draining (send it again to exit at once)", received[0].name)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _exit_now, sig)


def _exit_now(sig: signal.Signals) -> None:
    log.warning("%s during the drain: exiting now, requests in flight are cut", sig.name)
    logging.shutdown()
    # Child processes stop on their own: each reads EOF on the stdin this process held.
    os._exit(128 + sig)


def freeze_startup_objects() -> None:
    """Call once a serving process is up. What exists then (modules, the app, an engine's model:
    ~85k objects in a frontend) lives as long as the process. Frozen, full collections no longer
    walk it; they come every few thousand requests (objects of requests in flight age into the
    oldest generation) and walking it cost up to a tenth of the CPU per request at concurrency
    (benchmarks/RESULTS.md, frontend overhead). Startup's garbage goes first."""
    gc.collect()
    gc.freeze()


def run(main: Callable[[], Coroutine[Any, Any, None]], args: argparse.Namespace) -> None:
    configure_logging(args.log_level, args.log_json)
    # The package whose cli.main called: frontend.cli -> dynamo-frontend, workers.cli -> dynamo-worker.
    package = getattr(main, "__module__", "").split(".")[0]
    service = "dynamo-" + {"workers": "worker"}.get(package, package or "process")
    tracing.setup(tracing.TracingConfig.from_args(args, service))
    try:
        if uvloop is not None:
            uvloop.run(main())
        else:
            asyncio.run(main())
    finally:
        tracing.shutdown()  # spans still batched are written
