"""The router as a standalone service (`python -m dynamo.router`): serves `router/select` on the
request plane for frontends, which use RemoteRouter in place of an embedded router.

Replicas stay consistent the way embedded routers do: each consumes every worker's KV events
and load reports, and every frontend's feedback reaches every replica. A replica's in-flight
predictions cover the requests it routed itself; the workers' load reports cover the rest.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

import msgspec

from dynamo import errors
from dynamo.runtime.planes import RequestContext, Subscription
from dynamo.runtime.runtime import Client, Runtime, ServedEndpoint
from dynamo.wire import PreprocessedRequest, encode
from router.args import RouterConfig
from router.base import Router, RoutingDecision
from router.kv_router import make_router
from router.metrics import RouterMetrics
from router.protocol import (
    ROUTE_DECISION_CODEC,
    ROUTE_FEEDBACK_CODEC,
    ROUTE_REQUEST_CODEC,
    ROUTER_COMPONENT,
    SELECT_ENDPOINT,
    RouteDecision,
    RouteFeedback,
    RouteRequest,
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
        request = PreprocessedRequest(request_id=route.request_id, model="", token_ids=route.token_ids)
        decision = await self.router.select(request, route.candidates)
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


class RemoteRouter(Router):
    """A frontend's Router that asks a router service (any replica) for each decision."""

    mode = "remote"

    def __init__(self, runtime: Runtime, *, namespace: str | None = None, wait_s: float = 5.0) -> None:
        self.runtime = runtime
        self._namespace = namespace or runtime.namespace
        self._wait_s = wait_s
        self._client: Client | None = None
        self._replica = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        endpoint = self.runtime.endpoint(ROUTER_COMPONENT, SELECT_ENDPOINT, self._namespace)
        self._client = await endpoint.client()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._client is not None:
            await self._client.close()

    async def select(
        self, request: PreprocessedRequest, candidates: Sequence[int]
    ) -> RoutingDecision:
        if not candidates:
            raise errors.NoInstances("no live worker serves this model")
        assert self._client is not None, "start() the router first"
        replicas = self._client.instance_ids() or await self._client.wait_for_instances(self._wait_s)
        replica = replicas[next(self._replica) % len(replicas)]
        payload = encode(RouteRequest(request.request_id, request.token_ids, list(candidates)))
        stream = await self._client.generate(payload, replica, f"route-{request.request_id}")
        async with stream:
            async for data in stream:
                decision = ROUTE_DECISION_CODEC.decode(data)
                return RoutingDecision(decision.instance_id, decision.overlap_blocks)
        raise errors.StreamBroken("router service answered no decision")

    def request_finished(self, request_id: str, instance_id: int) -> None:
        self._send(RouteFeedback("finished", instance_id, request_id))

    def first_token(self, request_id: str, instance_id: int) -> None:
        self._send(RouteFeedback("first_token", instance_id, request_id))

    def instance_removed(self, instance_id: int) -> None:
        self._send(RouteFeedback("removed", instance_id))

    def _send(self, feedback: RouteFeedback) -> None:
        # The Router callbacks are synchronous; publishing is not: own the task until it ends.
        self._spawn(self.runtime.events.publish(feedback_subject(self._namespace), encode(feedback)))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not send router feedback: %s", task.exception())
