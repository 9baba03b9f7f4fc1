"""A worker's Prometheus metrics (`dynamo_worker_*`), on a registry passed in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from dynamo.system_server import live_asyncio_tasks
from dynamo.wire import LoadMetrics


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        labels = ["model"]
        self._model = model
        self.requests = Counter(
            "dynamo_worker_requests_total", "Requests served, by outcome", ["model", "status"], registry=registry
        )
        self.output_tokens = Counter(
            "dynamo_worker_output_tokens_total", "Tokens generated", labels, registry=registry
        ).labels(model)
        self.inflight = Gauge(
            "dynamo_worker_inflight_requests", "Requests being served", labels, registry=registry
        ).labels(model)
        self._active = Gauge("dynamo_worker_requests_active", "Requests running in the engine", labels, registry=registry).labels(model)
        self._waiting = Gauge("dynamo_worker_requests_waiting", "Requests queued in the engine", labels, registry=registry).labels(model)
        self._kv_active = Gauge("dynamo_worker_kv_blocks_active", "KV blocks in use", labels, registry=registry).labels(model)
        self._kv_total = Gauge("dynamo_worker_kv_blocks_total", "KV blocks in the pool", labels, registry=registry).labels(model)
        self._kv_usage = Gauge("dynamo_worker_kv_usage_ratio", "KV blocks in use / total", labels, registry=registry).labels(model)
        self._prefills = Counter(
            "dynamo_worker_prefills_total",
            "Prompts a decode worker had prefilled, by where (remote: on a prefill worker, KV "
            "transferred; local: here) and why local (short, no prefill worker, prefill queue full, "
            "remote failed)",
            ["model", "where", "reason"],
            registry=registry,
        )
        Gauge("dynamo_worker_asyncio_tasks", "asyncio tasks alive in the worker's event loop",
              registry=registry).set_function(live_asyncio_tasks)

    def prefilled(self, where: str, reason: str) -> None:
        self._prefills.labels(self._model, where, reason).inc()

    def finished(self, status: str) -> None:
        self.requests.labels(self._model, status).inc()

    def observe_load(self, load: LoadMetrics) -> None:
        self._active.set(load.active_requests)
        self._waiting.set(load.waiting_requests)
        self._kv_active.set(load.kv_active_blocks)
        self._kv_total.set(load.kv_total_blocks)
        self._kv_usage.set(load.kv_active_blocks / load.kv_total_blocks if load.kv_total_blocks else 0.0)
