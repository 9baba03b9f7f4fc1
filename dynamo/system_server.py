"""A small HTTP server for probes and Prometheus: /health, /ready and /metrics, for processes
that have no other HTTP server (workers, the router) and for `dynamo.serve --system-port`,
whose one page merges the frontend's, the router's and every worker's metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dynamo.http_server import LoopServer

log = logging.getLogger(__name__)


def live_asyncio_tasks() -> float:
    """Tasks alive in the running event loop, for a Gauge's set_function: scrapes are served
    on the loop, so a leak of request tasks shows up as a number that never comes back down.
    NaN when called off the loop."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:
        return float("nan")


class MergedMetrics(Collector):
    """Several registries as one: families of one name are merged, and each registry's
    samples get its own extra labels (e.g. the worker instance) so that samples of two workers
    of one process stay distinct on one page."""

    def __init__(self, sources: Sequence[tuple[CollectorRegistry, Mapping[str, str]]]) -> None:
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


def merged_registry(sources: Sequence[tuple[CollectorRegistry, Mapping[str, str]]]) -> CollectorRegistry:
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
    ) -> None:
        self._registry = registry
        self._ready = ready
        self._host, self._port = host, port

        async def health(_: Request) -> Response:
            return JSONResponse({"status": "ok"})

        async def readiness(_: Request) -> Response:
            ok = self._ready()
            return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)

        async def metrics(_: Request) -> Response:
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

    async def __aexit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
