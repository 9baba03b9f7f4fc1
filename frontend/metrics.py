"""The frontend's Prometheus metrics (`dynamo_frontend_*`) on a registry passed in, with the
labelled children cached per model so the per-token path does no label lookups."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dynamo.system_server import live_asyncio_tasks

PREFIX = "dynamo_frontend_"

_LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
_ITL_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@dataclass(slots=True)
class ModelMetrics:
    """The labelled children for one model; looked up once per request."""

    inflight: Gauge
    ttft: Histogram
    itl: Histogram
    input_tokens: Histogram
    output_tokens: Histogram
    duration: Histogram


@dataclass(slots=True)
class TenantMetrics:
    """The labelled children for one tenant (tenant names come from the tenants file, not
    from clients: bounded)."""

    admitted: Counter
    limited: Counter
    input_tokens: Counter
    output_tokens: Counter


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            f"{PREFIX}requests",  # exposed as ..._requests_total
            "Requests by model, endpoint, request type (stream/unary) and status",
            ["model", "endpoint", "request_type", "status"],
            registry=registry,
        )
        self.inflight = Gauge(
            f"{PREFIX}inflight_requests", "Requests in flight", ["model"], registry=registry
        )
        self.held = Gauge(
            f"{PREFIX}held_requests",
            "Requests waiting for a worker of a model scaled to zero (--scale-from-zero-wait-s)",
            ["model"], registry=registry,
        )
        Gauge(f"{PREFIX}asyncio_tasks", "asyncio tasks alive in the frontend's event loop",
              registry=registry).set_function(live_asyncio_tasks)
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "Time from request arrival to the first output token",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.itl = Histogram(
            f"{PREFIX}inter_token_latency_seconds",
            "Time between consecutive output chunks, per token",
            ["model"],
            buckets=_ITL_BUCKETS_S,
            registry=registry,
        )
        self.input_tokens = Histogram(
            f"{PREFIX}input_sequence_tokens", "Prompt length in tokens", ["model"],
            buckets=_TOKEN_BUCKETS, registry=registry,
        )
        self.output_tokens = Histogram(
            f"{PREFIX}output_sequence_tokens", "Completion length in tokens", ["model"],
            buckets=_TOKEN_BUCKETS, registry=registry,
        )
        self.duration = Histogram(
            f"{PREFIX}request_duration_seconds", "Request duration, arrival to last byte", ["model"],
            buckets=_DURATION_BUCKETS_S, registry=registry,
        )
        self.migrations = Counter(
            f"{PREFIX}migrations",  # exposed as ..._migrations_total
            "Requests moved to another worker after their stream broke mid-generation",
            ["model"],
            registry=registry,
        )
        self.rejected = Counter(
            f"{PREFIX}rejected_requests",
            "Requests refused before any work: reason is overloaded (429), rate_limited (429, a "
            "tenant's limit), unauthorized (401), queue_timeout (503), ttft_target (503: predicted "
            "to miss its class's TTFT target) or priority_not_allowed (403)",
            ["reason"],
            registry=registry,
        )
        self.tenant_requests = Counter(
            f"{PREFIX}tenant_requests",  # exposed as ..._tenant_requests_total
            "Requests of each tenant at admission: outcome is admitted or limited (429)",
            ["tenant", "outcome"],
            registry=registry,
        )
        self.tenant_tokens = Counter(
            f"{PREFIX}tenant_tokens",  # exposed as ..._tenant_tokens_total
            "Tokens charged to each tenant's limits: direction is input (prompt) or output",
            ["tenant", "direction"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}queue_depth",
            "Requests waiting for admission (frontend/admission.py), by priority class and tenant",
            ["priority", "tenant"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}queue_wait_seconds",
            "Time a request waited for admission, by priority class (admitted ones only)",
            ["priority"],
            buckets=_LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._models: dict[str, ModelMetrics] = {}
        self._tenants: dict[str, TenantMetrics] = {}

    def for_model(self, model: str) -> ModelMetrics:
        metrics = self._models.get(model)
        if metrics is None:
            metrics = ModelMetrics(
                inflight=self.inflight.labels(model),
                ttft=self.ttft.labels(model),
                itl=self.itl.labels(model),
                input_tokens=self.input_tokens.labels(model),
                output_tokens=self.output_tokens.labels(model),
                duration=self.duration.labels(model),
            )
            self._models[model] = metrics
        return metrics

    def for_tenant(self, tenant: str) -> TenantMetrics:
        metrics = self._tenants.get(tenant)
        if metrics is None:
            metrics = self._tenants[tenant] = TenantMetrics(
                admitted=self.tenant_requests.labels(tenant, "admitted"),
                limited=self.tenant_requests.labels(tenant, "limited"),
                input_tokens=self.tenant_tokens.labels(tenant, "input"),
                output_tokens=self.tenant_tokens.labels(tenant, "output"),
            )
        return metrics

    def count(self, model: str, endpoint: str, request_type: str, status: str) -> None:
        self.requests.labels(model, endpoint, request_type, status).inc()
