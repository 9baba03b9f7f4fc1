"""The frontend as a component: `async with Frontend(runtime, config, router_factory)` follows
the models in discovery and serves the OpenAI API with uvicorn as a task on the current loop."""

from __future__ import annotations

import asyncio
import importlib.util
import logging

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from dynamo import errors
from dynamo.http_server import LoopServer
from dynamo.model_registry import ModelWatcher
from dynamo.runtime import Runtime
from frontend.app import create_app
from frontend.config import FrontendConfig, add_frontend_args
from frontend.metrics import FrontendMetrics
from frontend.models import ModelManager, RouterFactory
from frontend.rate_limit_store import BucketStore, shared_store

__all__ = ["Frontend", "FrontendConfig", "add_frontend_args"]

log = logging.getLogger(__name__)


class Frontend:
    """Owns the ModelWatcher, the ModelManager and the HTTP server task."""

    def __init__(
        self,
        runtime: Runtime,
        config: FrontendConfig,
        router_factory: RouterFactory,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = FrontendMetrics(self.registry)
        self.watcher = ModelWatcher(runtime.discovery, config.namespace or runtime.namespace)
        self.manager = ModelManager(
            runtime, self.watcher, router_factory,
            scale_from_zero_wait_s=config.scale_from_zero_wait_s, held=self.metrics.held,
        )
        self.app: FastAPI = create_app(self.manager, self.metrics, config)
        self._server: LoopServer | None = None
        self._server_task: asyncio.Task[None] | None = None
        self._rate_store: BucketStore | None = None
        self.port: int = config.http_port  # the bound port (differs when http_port is 0)

    async def start(self) -> None:
        await self.watcher.start()
        await self.manager.start()
        self.app.state.tenants.start()  # the tenants file's poller (frontend/tenants.py)
        if self.config.tenants_file:
            # Tenant limits held across replicas (NATS KV); None on the embedded runtime.
            self._rate_store = await shared_store(self.runtime.events, self.config.namespace or self.runtime.namespace)
            if self._rate_store is not None:
                self.app.state.rate_limiter.share(self._rate_store)
        uv_config = uvicorn.Config(
            self.app,
            host=self.config.http_host,
            port=self.config.http_port,
            loop="none",  # run on the caller's loop (uvloop when the entry point installed it)
            http="httptools" if importlib.util.find_spec("httptools") else "h11",
            lifespan="off",
            access_log=False,  # no per-request logging on the hot path
            log_level="warning",
            timeout_graceful_shutdown=self.config.graceful_shutdown_s,
            timeout_keep_alive=self.config.keep_alive_s,
        )
        server = LoopServer(uv_config)
        self._server = server
        self._server_task = await server.serve_in_task("frontend-http")
        if not server.started:
            await self.stop()
            raise errors.DynamoError(
                f"HTTP server could not listen on {self.config.http_host}:{self.config.http_port}"
            )
        sockets = [s for srv in server.servers for s in (srv.sockets or ())]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("frontend listening on http://%s:%d", self.config.http_host, self.port)

    async def stop(self) -> None:
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            try:
                await self._server_task
            except OSError as exc:  # it could not listen (LoopServer)
                log.debug("HTTP server ended with %r", exc)
            self._server = None
            self._server_task = None
        await self.app.state.tenants.aclose()
        if self._rate_store is not None:
            await self._rate_store.close()
        await self.manager.close()
        await self.watcher.close()

    async def __aenter__(self) -> Frontend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
