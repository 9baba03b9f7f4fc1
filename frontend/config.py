"""The frontend's settings: flags (with environment fallbacks) declared once, turned into a
frozen dataclass that the rest of the frontend takes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

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
    # Longer than load balancers' idle timeouts (ALB 60 s) so the server never closes a
    # keep-alive connection the balancer or a client is about to reuse (502s, resent requests).
    keep_alive_s: float = 75.0
    # Times one request may move to another worker after its stream broke mid-generation.
    # None: each model's card decides (the worker's --migration-limit); set: overrides it.
    migration_limit: int | None = None
    # Whole-request deadline (first byte to last token); 0: none.
    request_timeout_s: float = 0.0
    # Requests in flight in this frontend before new ones get 429; 0: unbounded.
    max_inflight_requests: int = 8192  # 0: unbounded
    # Bearer tokens accepted on /v1/*; empty: no authentication.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # Keys file of tenants (key -> tenant, priority, limits; docs/tenants.md); None: no tenants
    # beyond `api_keys`, which are the tenant `default`.
    tenants_file: str | None = None
    # How often the tenants file's mtime is checked for a change.
    tenants_poll_s: float = 2.0
    # Origins allowed by CORS; empty: CORS headers are never sent.
    cors_allow_origins: tuple[str, ...] = ()
    # How long /v1/responses keeps a stored response (GET, previous_response_id).
    response_store_ttl_s: float = 3600.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FrontendConfig:
        return cls(
            http_host=args.http_host,
            http_port=args.http_port,
            router_mode=getattr(args, "router_mode", cls.router_mode),
            max_request_body_bytes=args.max_request_body_bytes,
            max_dispatch_attempts=args.dispatch_attempts,
            graceful_shutdown_s=args.http_graceful_shutdown_s,
            keep_alive_s=args.http_keep_alive_s,
            migration_limit=getattr(args, "migration_limit", None),
            request_timeout_s=args.request_timeout_s,
            max_inflight_requests=args.max_inflight_requests,
            api_keys=_split(args.api_key),
            tenants_file=args.tenants_file or None,
            tenants_poll_s=args.tenants_poll_s,
            cors_allow_origins=_split(args.cors_allow_origins),
            response_store_ttl_s=args.response_store_ttl_s,
        )


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _optional_int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


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
        "--http-keep-alive-s",
        type=float,
        default=float(env_default("DYN_HTTP_KEEP_ALIVE_S", "75") or 75),
        help="how long an idle keep-alive connection stays open; keep it above the idle timeout "
        "of any load balancer in front [env DYN_HTTP_KEEP_ALIVE_S]",
    )
    group.add_argument(
        "--http-graceful-shutdown-s",
        type=float,
        default=float(env_default("DYN_HTTP_GRACEFUL_SHUTDOWN_S", "5") or 5),
        help="how long open HTTP requests may finish at shutdown [env DYN_HTTP_GRACEFUL_SHUTDOWN_S]",
    )
    group.add_argument(
        "--migration-limit",
        type=int,
        default=_optional_int(env_default("DYN_MIGRATION_LIMIT")),
        help="times a request may move to another worker when its stream breaks mid-generation; "
        "overrides the limit each worker registers (default: the worker's) [env DYN_MIGRATION_LIMIT]",
    )
    group.add_argument(
        "--request-timeout-s",
        type=float,
        default=float(env_default("DYN_REQUEST_TIMEOUT_S", "0") or 0),
        help="cancel a request that runs longer than this; 504 before the first token, an SSE "
        "error event after (0: no limit) [env DYN_REQUEST_TIMEOUT_S]",
    )
    group.add_argument(
        "--max-inflight-requests",
        type=int,
        default=int(env_default("DYN_MAX_INFLIGHT_REQUESTS", "8192") or 0),
        help="requests served at once; more get 429 with Retry-After (default 8192; 0: unbounded) "
        "[env DYN_MAX_INFLIGHT_REQUESTS]",
    )
    group.add_argument(
        "--api-key",
        default=env_default("DYN_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/*; comma-separated keys allowed. Prefer "
        "the env var: command lines are visible in `ps` [env DYN_API_KEY]",
    )
    group.add_argument(
        "--tenants-file",
        default=env_default("DYN_TENANTS_FILE"),
        help="YAML or JSON keys file: API key -> tenant, priority class and per-minute limits "
        "(requests, input and output tokens); re-read when it changes; --api-key's keys are the "
        "tenant `default` (docs/tenants.md) [env DYN_TENANTS_FILE]",
    )
    group.add_argument(
        "--tenants-poll-s",
        type=float,
        default=float(env_default("DYN_TENANTS_POLL_S", "2") or 2),
        help="how often the tenants file is checked for changes (default 2) [env DYN_TENANTS_POLL_S]",
    )
    group.add_argument(
        "--cors-allow-origins",
        default=env_default("DYN_CORS_ALLOW_ORIGINS"),
        help="comma-separated origins allowed by CORS, `*` for any (default: CORS off) "
        "[env DYN_CORS_ALLOW_ORIGINS]",
    )
    group.add_argument(
        "--response-store-ttl-s",
        type=float,
        default=float(env_default("DYN_RESPONSE_STORE_TTL_S", "3600") or 3600),
        help="how long a stored /v1/responses response can be read or continued by "
        "previous_response_id, on any frontend of the namespace (default 3600) [env DYN_RESPONSE_STORE_TTL_S]",
    )
