"""The frontend's settings: flags (with environment fallbacks) declared once, turned into a
frozen dataclass that the rest of the frontend takes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from dynamo.flags import Flag, FlagGroup


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    http_host: str = "0.0.0.0"
    http_port: int = 8000
    router_mode: str = "round-robin"
    # Session affinity (router flags --router-session-header / --router-session-from-user):
    # where a request's session id comes from; the router pins sessions (router/session.py).
    session_header: str = "x-dynamo-session-id"
    session_from_user: bool = False
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
    # Requests that wait for a slot past max_inflight_requests, by priority class and fairly
    # between tenants (frontend/admission.py); 0: none wait, past the limit is 429 at once.
    max_waiting_requests: int = 0
    # How long a request may wait for admission before a 503 (a class may set its own).
    queue_timeout_s: float = 30.0
    # Fraction of max_inflight_requests that tenants holding fewer slots (per weight) than the
    # largest holder may use past the limit, instead of waiting for another tenant's request to
    # end; 0: a hard limit.
    fair_share_headroom: float = 0.0
    # Prompt tokens a worker prefills per second, for TTFT predictions against a class's
    # target (SLO-aware admission); 0: no predictions, targets unused.
    slo_prefill_tokens_per_s: float = 0.0
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
    # A request for a model this frontend served and that has no worker now (scaled to zero)
    # waits this long for one to register, then gets 503 with Retry-After; 0: 503 at once.
    scale_from_zero_wait_s: float = 30.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FrontendConfig:
        return cls(
            http_host=args.http_host,
            http_port=args.http_port,
            router_mode=getattr(args, "router_mode", _D.router_mode),
            session_header=getattr(args, "router_session_header", _D.session_header),
            session_from_user=getattr(args, "router_session_from_user", _D.session_from_user),
            max_request_body_bytes=args.max_request_body_bytes,
            max_dispatch_attempts=args.dispatch_attempts,
            graceful_shutdown_s=args.http_graceful_shutdown_s,
            keep_alive_s=args.http_keep_alive_s,
            migration_limit=getattr(args, "migration_limit", None),
            request_timeout_s=args.request_timeout_s,
            max_inflight_requests=args.max_inflight_requests,
            max_waiting_requests=args.max_waiting_requests,
            queue_timeout_s=args.queue_timeout_s,
            fair_share_headroom=args.fair_share_headroom,
            slo_prefill_tokens_per_s=args.slo_prefill_tokens_per_s,
            api_keys=_split(args.api_key),
            tenants_file=args.tenants_file or None,
            tenants_poll_s=args.tenants_poll_s,
            cors_allow_origins=_split(args.cors_allow_origins),
            response_store_ttl_s=args.response_store_ttl_s,
            scale_from_zero_wait_s=args.scale_from_zero_wait_s,
        )


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


_D = FrontendConfig()  # the declared defaults (a slots dataclass has no class attributes to read)

FRONTEND_FLAGS = FlagGroup(
    "frontend",
    [
        Flag("--http-host", "address the HTTP server binds", default=_D.http_host, env="DYN_HTTP_HOST"),
        Flag("--http-port", "HTTP port of the OpenAI-compatible API", default=_D.http_port, env="DYN_HTTP_PORT", type=int),
        Flag(
            "--max-request-body-bytes", "larger request bodies get 413",
            default=_D.max_request_body_bytes, env="DYN_MAX_REQUEST_BODY_BYTES", type=int,
        ),
        Flag(
            "--dispatch-attempts", "instances tried per request when one is found dead before answering",
            default=_D.max_dispatch_attempts, env="DYN_DISPATCH_ATTEMPTS", type=int,
        ),
        Flag(
            "--http-keep-alive-s",
            "how long an idle keep-alive connection stays open; keep it above the idle timeout of "
            "any load balancer in front",
            default=_D.keep_alive_s, env="DYN_HTTP_KEEP_ALIVE_S", type=float,
        ),
        Flag(
            "--http-graceful-shutdown-s", "how long open HTTP requests may finish at shutdown",
            default=_D.graceful_shutdown_s, env="DYN_HTTP_GRACEFUL_SHUTDOWN_S", type=float,
        ),
        Flag(
            "--migration-limit",
            "times a request may move to another worker when its stream breaks mid-generation; "
            "overrides the limit each worker registers",
            env="DYN_MIGRATION_LIMIT", type=int, default_doc="the worker's",
        ),
        Flag(
            "--request-timeout-s",
            "cancel a request that runs longer than this; 504 before the first token, an SSE error "
            "event after (0: no limit)",
            default=_D.request_timeout_s, env="DYN_REQUEST_TIMEOUT_S", type=float,
        ),
        Flag(
            "--max-inflight-requests",
            "requests served at once; more wait (--max-waiting-requests) or get 429 with Retry-After "
            "(0: unbounded)",
            default=_D.max_inflight_requests, env="DYN_MAX_INFLIGHT_REQUESTS", type=int,
        ),
        Flag(
            "--max-waiting-requests",
            "requests that wait for a slot past --max-inflight-requests, highest priority class first "
            "and fairly between tenants; more get 429 (0: none wait; docs/tenants.md)",
            default=_D.max_waiting_requests, env="DYN_MAX_WAITING_REQUESTS", type=int,
        ),
        Flag(
            "--queue-timeout-s",
            "a request waiting longer than this for admission gets 503 with Retry-After (a priority "
            "class may set its own)",
            default=_D.queue_timeout_s, env="DYN_QUEUE_TIMEOUT_S", type=float,
        ),
        Flag(
            "--fair-share-headroom",
            "fraction of --max-inflight-requests that tenants holding fewer slots (per weight) than "
            "the largest holder may use past the limit, so a light tenant need not wait for a heavy "
            "one's request to end (0: the limit is hard)",
            default=_D.fair_share_headroom, env="DYN_FAIR_SHARE_HEADROOM", type=float,
        ),
        Flag(
            "--slo-prefill-tokens-per-s",
            "prompt tokens a worker prefills per second: predicts a request's TTFT from the router's "
            "load view against its priority class's ttft_target_ms (0: no predictions; needs "
            "--router-mode kv or least-loaded)",
            default=_D.slo_prefill_tokens_per_s, env="DYN_SLO_PREFILL_TOKENS_PER_S", type=float,
        ),
        Flag(
            "--api-key",
            "require `Authorization: Bearer KEY` (or `x-api-key`) on /v1/*; comma-separated keys "
            "allowed. Prefer the env var: command lines are visible in `ps`",
            env="DYN_API_KEY", default_doc="no authentication",
        ),
        Flag(
            "--tenants-file",
            "YAML or JSON keys file: API key -> tenant, priority class and per-minute limits "
            "(requests, input and output tokens); re-read when it changes; --api-key's keys are "
            "the tenant `default` (docs/tenants.md)",
            env="DYN_TENANTS_FILE", default_doc="none",
        ),
        Flag(
            "--tenants-poll-s", "how often the tenants file is checked for changes",
            default=_D.tenants_poll_s, env="DYN_TENANTS_POLL_S", type=float,
        ),
        Flag(
            "--cors-allow-origins", "comma-separated origins allowed by CORS, `*` for any",
            env="DYN_CORS_ALLOW_ORIGINS", default_doc="CORS off",
        ),
        Flag(
            "--response-store-ttl-s",
            "how long a stored /v1/responses response can be read or continued by "
            "previous_response_id, on any frontend of the namespace",
            default=_D.response_store_ttl_s, env="DYN_RESPONSE_STORE_TTL_S", type=float,
        ),
        Flag(
            "--scale-from-zero-wait-s",
            "a request for a model this frontend has served that has no worker now (scaled to zero "
            "by the planner) waits this long for one to register, then gets 503 with Retry-After "
            "(0: 503 at once)",
            default=_D.scale_from_zero_wait_s, env="DYN_SCALE_FROM_ZERO_WAIT_S", type=float,
        ),
    ],
)


def add_frontend_args(parser: argparse.ArgumentParser) -> None:
    FRONTEND_FLAGS.add_to(parser)
