"""What every entry point shares: the event loop (uvloop where present), signal handling,
and the flags for the model and the worker that serve, frontend and worker all spell alike."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from dynamo.config import env_default
from dynamo.logs import configure_logging


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default=env_default("DYN_LOG", "INFO"), help="log level [env DYN_LOG]"
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=env_default("DYN_LOG_JSON", "0") == "1",
        help="JSON log lines [env DYN_LOG_JSON=1]",
    )


def add_model_args(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--engine",
        default=env_default("DYN_ENGINE", "mocker"),
        help="engine to serve: mocker, builtin, vllm, sglang or trtllm (see docs/engines.md) "
        "[env DYN_ENGINE]",
    )
    group.add_argument(
        "--model",
        default=env_default("DYN_MODEL", default_model),
        required=default_model is None and "DYN_MODEL" not in os.environ,
        help="local model directory (Hugging Face layout) [env DYN_MODEL]",
    )
    group.add_argument(
        "--served-model-name",
        default=env_default("DYN_SERVED_MODEL_NAME"),
        help="model name clients ask for (default: the model directory's name)",
    )


def served_model_name(args: argparse.Namespace) -> str:
    return args.served_model_name or Path(args.model).resolve().name


def default_model_dir() -> str:
    """The project's own small model, shipped in models/dynamo-tiny."""
    return str(Path(__file__).resolve().parent.parent / "models" / "dynamo-tiny")


async def wait_for_shutdown() -> None:
    """Return on SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(main: Callable[[], Awaitable[None]], args: argparse.Namespace) -> None:
    configure_logging(args.log_level, args.log_json)
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
