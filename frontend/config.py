"""The frontend's settings: flags (with environment fallbacks) declared once, turned into a
frozen dataclass that the rest of the frontend takes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dynamo.config import env_default


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    http_host: str = "0.0.0.0"
    http_port: int = 8000
    router_mode: str = "round-robin"
    # Bodies beyond this get a 413 before any parsing (a 128k-token prompt is ~1 MB of JSON).
    max_request_body_bytes: int = 16 * 1024 * 1024
    # Instances tried for one request when the chosen one turns out dead before answering.
    max_dispatch_attempts: int = 3
    # None: follow models of the runtime's namespace.
    namespace: str | None = None
    graceful_shutdown_s: float = 5.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FrontendConfig:
        return cls(
            http_host=args.http_host,
            http_port=args.http_port,
            router_mode=getattr(args, "router_mode", cls.router_mode),
            max_request_body_bytes=args.max_request_body_bytes,
            max_dispatch_attempts=args.dispatch_attempts,
            graceful_shutdown_s=args.http_graceful_shutdown_s,
        )


def add_frontend_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("frontend")
    group.add_argument(
        "--http-host",
        default=env_default("DYN_HTTP_HOST", "0.0.0.0"),
        help="address the HTTP server binds [env DYN_HTTP_HOST]",
    )
    group.add_argument(
        "--http-port",
        type=int,
        default=int(env_default("DYN_HTTP_PORT", "8000") or 8000),
        help="HTTP port of the OpenAI-compatible API [env DYN_HTTP_PORT]",
    )
    group.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=int(env_default("DYN_MAX_REQUEST_BODY_BYTES", str(16 * 1024 * 1024)) or 0),
        help="larger request bodies get 413 [env DYN_MAX_REQUEST_BODY_BYTES]",
    )
    group.add_argument(
        "--dispatch-attempts",
        type=int,
        default=int(env_default("DYN_DISPATCH_ATTEMPTS", "3") or 3),
        help="instances tried per request when one is found dead before answering [env DYN_DISPATCH_ATTEMPTS]",
    )
    group.add_argument(
        "--http-graceful-shutdown-s",
        type=float,
        default=float(env_default("DYN_HTTP_GRACEFUL_SHUTDOWN_S", "5") or 5),
        help="how long open HTTP requests may finish at shutdown [env DYN_HTTP_GRACEFUL_SHUTDOWN_S]",
    )
