"""A small HTTP server for probes and Prometheus: /health, /ready and /metrics, for processes
that have no other HTTP server (workers, the router) and for `dynamo.serve --system-port`,
whose one page merges the frontend's, the router's and every worker's metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import httpx
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dynamo.http_server import LoopServer

log = logging.getLogger(__name__)

# A scrape of a worker child's page answers from its event loop; one this late is not waited for.
SCRAPE_TIMEOUT_S = 2.0


def live_asyncio_tasks() -> float:
    """Tasks alive in the running event loop, for a Gauge's set_function: scrapes are served
    on the loop, so a leak of request tasks shows up as a number that never comes back down.
    NaN when called off the loop."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:
        return float("nan")


class MetricSource(Protocol):
    """A registry, or anything else that yields metric families when scraped."""

    def collect(self) -> Iterable[Metric]: ...


class ScrapedMetrics:
    """Another process's /metrics page as a source: `scrape()` fetches and parses it (a
    `dynamo.serve --worker-processes` parent scrapes each worker child before answering its own
    scrape); `collect` yields what the last scrape got, nothing if it failed."""

    def __init__(self, url: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self.url = url
        self._timeout_s = timeout_s
        self._families: list[Metric] = []

    async def scrape(self, client: httpx.AsyncClient) -> None:
        try:
            response = await client.get(self.url, timeout=self._timeout_s)
            response.raise_for_status()
            self._families = list(text_string_to_metric_families(response.text))
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("could not scrape %s: %r", self.url, exc)
            self._families = []

    def collect(self) -> Iterable[Metric]:
        return self._families


class MergedMetrics(Collector):
    """Several registries as one: families of one name are merged, and each registry's
    samples get its own extra labels (e.g. the worker instance) so that samples of two workers
    of one process stay distinct on one page."""

    def __init__(self, sources: Sequence[tuple[MetricSource, Mapping[str, str]]]) -> None:
        self._sources = list(sources)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for registry, labels in self._sources:
            for family in registry.collect():
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    into.samples.append(
                        Sample(sample.name, {**sample.labels, **labels}, sample.value, sample.timestamp, sample.exemplar)
                    )
        yield from merged.values()


def merged_registry(sources: Sequence[tuple[MetricSource, Mapping[str, str]]]) -> CollectorRegistry:
    """One registry that reads `sources` at every scrape (see MergedMetrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedMetrics(sources))
    return registry


class SystemServer:
    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        before_scrape: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`port` 0: an ephemeral one (`bound_port` says which). `before_scrape` is awaited
        before each /metrics answer (to refresh ScrapedMetrics sources)."""
        self._registry = registry
        self._ready = ready
        self._host, self._port = host, port

        async def health(_: Request) -> Response:
            return JSONResponse({"status": "ok"})

        async def readiness(_: Request) -> Response:
            ok = self._ready()
            return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)

        async def metrics(_: Request) -> Response:
            if before_scrape is not None:
                await before_scrape()
            return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)

        app = Starlette(
            routes=[Route("/health", health), Route("/ready", readiness), Route("/metrics", metrics)]
        )
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
        self._server = LoopServer(config)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SystemServer:
        self._task = await self._server.serve_in_task("system-server")
        if not self._server.started:
            await asyncio.gather(self._task, return_exceptions=True)
            raise OSError(f"system server could not listen on {self._host}:{self._port}")
        return self

    @property
    def bound_port(self) -> int:
        """The port listened on (the ephemeral one picked for port 0)."""
        for server in self._server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self._port

    async def __aexit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
