"""The router as a standalone service (`python -m dynamo.router`): serves `router/select` on the
request plane for frontends, which use RemoteRouter (router/remote.py) in place of an embedded
router.

Replicas stay consistent the way embedded routers do: each consumes every worker's KV events
and load reports, and every frontend's feedback reaches every replica. A replica's in-flight
predictions cover the requests it routed itself; the workers' load reports cover the rest.
Session pins (router/session.py) are per replica too: frontends send all of a session's requests
to the same replica (router/remote.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import msgspec

from dynamo import errors, tracing
from dynamo.logs import request_id_var
from dynamo.runtime.planes import RequestContext, Subscription
from dynamo.runtime.runtime import Client, Runtime, ServedEndpoint
from dynamo.wire import PreprocessedRequest, encode
from router.args import RouterConfig
from router.metrics import RouterMetrics
from router.modes import make_router
from router.protocol import (
    ROUTE_FEEDBACK_CODEC,
    ROUTE_REQUEST_CODEC,
    ROUTER_COMPONENT,
    SELECT_ENDPOINT,
    RouteDecision,
    feedback_subject,
)

log = logging.getLogger(__name__)


class RouterService:
    """One router for one worker component, served at `router/select`; an async context
    manager owning the router, the endpoint, the worker watch and the feedback consumer."""

    def __init__(
        self,
        runtime: Runtime,
        config: RouterConfig,
        *,
        mode: str = "kv",
        component: str = "backend",
        worker_endpoint: str = "generate",
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.runtime = runtime
        self.router = make_router(
            mode, config, runtime.events, runtime.namespace, component, metrics=metrics
        )
        self._component = component
        self._worker_endpoint = runtime.endpoint(component, worker_endpoint)
        self._workers: Client | None = None
        self._served: ServedEndpoint | None = None
        self._feedback: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.router.start()
        # Forget a worker the moment its lease ends, whether or not a frontend says so.
        self._workers = Client(self.runtime, self._worker_endpoint.path)
        self._workers.on_change(self._on_worker_change)
        await self._workers.start()
        self._feedback = await self.runtime.events.subscribe(feedback_subject(self.runtime.namespace))
        self._task = asyncio.create_task(self._consume_feedback(self._feedback))
        endpoint = self.runtime.endpoint(ROUTER_COMPONENT, SELECT_ENDPOINT)
        self._served = await endpoint.serve(self._select)
        log.info(
            "router service serves %s/%s (%s mode) for the workers of %s/%s",
            self.runtime.namespace, ROUTER_COMPONENT, self.router.mode, self.runtime.namespace, self._component,
        )

    async def close(self) -> None:
        if self._served is not None:
            await self._served.stop()
        if self._feedback is not None:
            await self._feedback.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._workers is not None:
            await self._workers.close()
        await self.router.close()

    async def __aenter__(self) -> RouterService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _select(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        try:
            route = ROUTE_REQUEST_CODEC.decode(payload)
        except msgspec.MsgspecError as exc:
            raise errors.InvalidRequest(f"malformed route request: {exc}") from None
        request = PreprocessedRequest(
            request_id=route.request_id, model="", token_ids=route.token_ids, session_id=route.session_id
        )
        request_id_var.set(route.request_id)  # this request's task logs under its id
        with tracing.span("router.select", route.trace, kind="server") as span:
            decision = await self.router.select(request, route.candidates)
            if span is not None:
                span.set_attributes(
                    {"dynamo.request_id": route.request_id, "dynamo.instance_id": f"{decision.instance_id:x}",
                     "dynamo.overlap_blocks": decision.overlap_blocks, "dynamo.candidates": len(route.candidates)}
                )
        yield encode(RouteDecision(decision.instance_id, decision.overlap_blocks))

    def _on_worker_change(self, instance_id: int, added: bool) -> None:
        if not added:
            self.router.instance_removed(instance_id)

    async def _consume_feedback(self, sub: Subscription) -> None:
        async for payload in sub:
            try:
                feedback = ROUTE_FEEDBACK_CODEC.decode(payload)
            except msgspec.MsgspecError as exc:
                log.warning("dropping malformed router feedback: %s", exc)
                continue
            if feedback.kind == "first_token":
                self.router.first_token(feedback.request_id, feedback.instance_id)
            elif feedback.kind == "finished":
                self.router.request_finished(feedback.request_id, feedback.instance_id)
            else:
                self.router.instance_removed(feedback.instance_id)


async def serve_router(
    runtime: Runtime,
    config: RouterConfig,
    *,
    mode: str = "kv",
    component: str = "backend",
    metrics: RouterMetrics | None = None,
) -> None:
    """Serve the router until cancelled."""
    async with RouterService(runtime, config, mode=mode, component=component, metrics=metrics):
        await asyncio.Event().wait()
