"""The HTTP surface: a FastAPI app whose POST API routes are plain ASGI endpoints
(frontend/endpoint.py: no per-request dependency injection or pydantic; they also watch for
client disconnects and cancel the work).

The completion routes are dispatched before FastAPI's middleware stack (`FrontendApp.__call__`):
each of those middlewares wraps `send`, so every SSE write of a stream would pass through five
of them. Whatever they would add is done on that path itself: API-key auth, the body limit,
OpenAI error bodies (also for unexpected errors) and metrics; requests carrying an `Origin`
header take the full stack when CORS is on, so CORS behaves exactly as it does elsewhere."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dynamo import errors
from frontend.anthropic import register_anthropic_routes
from frontend.anthropic.routes import OPENAPI_OPERATIONS as ANTHROPIC_OPERATIONS
from frontend.config import FrontendConfig
from frontend.embeddings import OPENAPI_OPERATIONS as EMBEDDINGS_OPERATIONS, register_embeddings
from frontend.admission import AdmissionConfig, AdmissionGate, router_ttft_predictor
from frontend.endpoint import ApiEndpoint, Handler, JsonReply, Reply, StreamReply, send_bytes
from frontend.errors import Unauthorized, error_info, http_error, install_handlers
from frontend.metrics import FrontendMetrics
from frontend.models import ModelManager
from frontend.pipeline import EndpointKind, Pipeline, PipelineConfig, RequestGeneration
from frontend.rate_limit import TENANT_SCOPE_KEY, Clock, RateLimiter
from frontend.responses import register_responses_routes
from frontend.responses.routes import OPENAPI_OPERATIONS as RESPONSES_OPERATIONS
from frontend.schemas import (
    ModelList,
    ModelObject,
    ReadyModel,
    ReadyStatus,
    openapi_schema,
)
from frontend.session import CURRENT_SESSION, header_session
from frontend.sse import DONE, ChunkWriter, error_event, response_body
from frontend.tenants import Tenant, TenantRegistry
from frontend.tokenize_api import OPENAPI_OPERATIONS as TOKENIZE_OPERATIONS, register_tokenize_routes

_encode = msgspec.json.encode

class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` (or Anthropic's `x-api-key: <key>`) on /v1/*; /health, /ready, /metrics and the schema stay
    open for probes and scrapers. The key is looked up by its SHA-256 digest (frontend/tenants.py),
    so timing says nothing about the stored keys; its tenant's TenantQuota goes into the scope
    (`TENANT_SCOPE_KEY`) for the endpoint's rate-limit admission."""

    def __init__(self, app: ASGIApp, tenants: TenantRegistry, limiter: RateLimiter, metrics: FrontendMetrics) -> None:
        self.app = app
        self._tenants = tenants
        self._limiter = limiter
        self._metrics = metrics

    def _tenant(self, scope: Scope) -> Tenant | None:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return None
                return self._tenants.lookup(token.strip())
            if name == b"x-api-key":  # how Anthropic's clients send their key
                return self._tenants.lookup(value.strip())
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            self._tenants.start()  # the file's poller; no-op once running or without a file
            tenant = self._tenant(scope)
            if tenant is None:
                self._metrics.rejected.labels("unauthorized").inc()
                error = http_error(Unauthorized("invalid or missing API key: send `Authorization: Bearer <key>`"))
                await send_bytes(send, error.status, [*error.headers, (b"www-authenticate", b"Bearer")], error.body)
                return
            scope[TENANT_SCOPE_KEY] = self._limiter.quota(tenant)
        await self.app(scope, receive, send)


def openai_handler(kind: EndpointKind, pipeline: Pipeline) -> Handler:
    """POST /v1/chat/completions or /v1/completions: open the request, then one JSON body or
    the SSE stream."""

    async def handle(body: bytes, arrived_s: float) -> Reply:
        generation = await pipeline.open(kind, body, arrived_s, len(body))
        if generation.stream:
            return StreamReply(openai_stream(generation), _ends_stream, generation.aclose)
        try:
            results = await generation.results()
        finally:
            await generation.aclose()
        return JsonReply(
            response_body(
                generation.kind, generation.response_id, generation.created, generation.model,
                results, generation.usage(), generation.prepared.output.logprobs,
            )
        )

    return handle


def _ends_stream(chunk: bytes) -> bool:
    return chunk.endswith(DONE)  # nothing but an OpenAI stream's last chunk does


async def openai_stream(generation: RequestGeneration) -> AsyncIterator[bytes]:
    """SSE bytes of an opened generation: one write per burst of outputs; the last write also
    carries the finish chunks, the usage chunk and `data: [DONE]`. Errors after the first token
    end the stream with an OpenAI error event."""
    prepared = generation.prepared
    writer = ChunkWriter(
        generation.kind, generation.response_id, generation.created, generation.model,
        prepared.include_usage, prepared.output.legacy_logprobs,
    )
    bursts = generation.bursts()
    chunk = b""
    try:
        async for deltas in bursts:
            chunk = writer.deltas(deltas)
            if generation.finished:
                # The last burst goes out with the usage chunk and [DONE], in one write.
                tail = [chunk]
                if prepared.include_usage:
                    tail.append(writer.usage(generation.usage()))
                tail.append(DONE)
                chunk = b"".join(tail)
            yield chunk
            chunk = b""
    except errors.DynamoError as exc:
        _, info = error_info(exc)
        # Events of outputs that came before the failing one are still the client's.
        yield b"".join((chunk, error_event(info), DONE))
    finally:
        await bursts.aclose()  # type: ignore[attr-defined]


class FrontendApp(FastAPI):
    """FastAPI with the completion routes served ahead of its middleware stack (see the module
    docstring). `direct` maps a path to the ASGI app that serves POSTs to it directly."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.direct: dict[str, ASGIApp] = {}
        # With CORS on, browser requests (they carry Origin) need CORSMiddleware's headers.
        self.cors_enabled = False
        self.session_header = b"x-dynamo-session-id"  # create_app sets the configured one

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            session = header_session(scope, self.session_header)
            if session:  # for the router's session affinity, read by the pipeline
                reset = CURRENT_SESSION.set(session)
                try:
                    await self._post(scope, receive, send)
                finally:
                    CURRENT_SESSION.reset(reset)
                return
            await self._post(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
        direct = self.direct.get(scope["path"])
        if direct is not None and not (self.cors_enabled and _has_origin(scope)):
            await direct(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _has_origin(scope: Scope) -> bool:
    return any(name == b"origin" for name, _ in scope["headers"])


def create_app(
    manager: ModelManager, metrics: FrontendMetrics, config: FrontendConfig, clock: Clock = time.monotonic
) -> FastAPI:
    """`clock` drives the tenants' token buckets (tests pass a fake one)."""
    app = FrontendApp(title="dynamo frontend", version="0.1.0", docs_url=None, redoc_url=None)
    install_handlers(app)
    # Tenants: --api-key's keys (tenant `default`) and the keys file's; no keys: no auth.
    tenants = TenantRegistry(
        Path(config.tenants_file) if config.tenants_file else None, config.api_keys, config.tenants_poll_s
    )
    limiter = RateLimiter(metrics, clock)
    app.state.tenants = tenants
    app.state.rate_limiter = limiter
    auth = bool(config.api_keys or config.tenants_file)
    pipeline = Pipeline(
        manager,
        metrics,
        PipelineConfig(
            max_dispatch_attempts=config.max_dispatch_attempts,
            migration_limit=config.migration_limit,
            request_timeout_s=config.request_timeout_s,
            session_from_user=config.session_from_user,
        ),
    )
    app.state.pipeline = pipeline
    app.session_header = config.session_header.lower().encode()
    limit = AdmissionGate(
        AdmissionConfig(
            config.max_inflight_requests,
            config.max_waiting_requests,
            config.queue_timeout_s,
            config.fair_share_headroom,
        ),
        metrics,
        lambda: tenants.table,  # re-read per request: the tenants file's classes are hot-reloaded
        router_ttft_predictor(manager, config.slo_prefill_tokens_per_s),
    )
    app.state.inflight_limit = limit

    for path, kind in (("/v1/chat/completions", "chat"), ("/v1/completions", "completion")):
        endpoint = ApiEndpoint(openai_handler(kind, pipeline), http_error, config.max_request_body_bytes, limit)  # type: ignore[arg-type]
        # Also a route of the full stack, for requests that need its middleware (CORS).
        app.router.routes.append(Route(path, endpoint, methods=["POST"]))
        # ApiKeyMiddleware reads only the request headers: it does not wrap send.
        direct: ASGIApp = ApiKeyMiddleware(endpoint, tenants, limiter, metrics) if auth else endpoint
        app.direct[path] = direct
    # The other APIs, each in its own package, on the same pipeline.
    register_anthropic_routes(app, pipeline, manager, config)
    register_responses_routes(app, pipeline, manager, config)
    register_tokenize_routes(app, manager, config)
    register_embeddings(app, manager, metrics, config)
    app.cors_enabled = bool(config.cors_allow_origins)
    # The last middleware added runs first: CORS answers preflights before auth asks for a key.
    if auth:
        app.add_middleware(ApiKeyMiddleware, tenants=tenants, limiter=limiter, metrics=metrics)
    if config.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_allow_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type"],
        )

    schema = openapi_schema(
        app.title,
        app.version,
        [*ANTHROPIC_OPERATIONS, *RESPONSES_OPERATIONS, *TOKENIZE_OPERATIONS, *EMBEDDINGS_OPERATIONS],
    )

    def openapi() -> dict[str, Any]:
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/v1/models", include_in_schema=False)
    async def list_models() -> Response:
        models = [
            ModelObject(
                id=name,
                created=0,
                capabilities=["embeddings"] if model.card.model_type == "embedding" else ["chat", "completions"],
                max_model_len=model.card.context_length,
            )
            for name, model in sorted(manager.models.items())
            if model.entry.cards
        ]
        return Response(_encode(ModelList(data=models)), media_type="application/json")

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        return Response(b'{"status":"healthy"}', media_type="application/json")

    @app.get("/ready", include_in_schema=False)
    async def ready() -> Response:
        is_ready = manager.ready()
        status = ReadyStatus(
            status="ready" if is_ready else "not_ready",
            models=[ReadyModel(name, model.instance_ids()) for name, model in sorted(manager.models.items())],
        )
        return Response(_encode(status), status_code=200 if is_ready else 503, media_type="application/json")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
