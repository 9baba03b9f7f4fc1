"""A small HTTP server for processes that have no other (workers, the router): /health,
/ready and /metrics for probes and Prometheus."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)


def live_asyncio_tasks() -> float:
    """Tasks alive in the running event loop, for a Gauge's set_function: scrapes are served
    on the loop, so a leak of request tasks shows up as a number that never comes back down.
    NaN when called off the loop."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:
        return float("nan")


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
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SystemServer:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the bind error
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
