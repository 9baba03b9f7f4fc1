"""RemoteRouter: a frontend's router that asks the standalone router service
(`python -m dynamo.router`, router/service.py) for each decision and reports back to it."""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Sequence

from dynamo import errors, tracing
from dynamo.runtime.runtime import Client, Runtime
from dynamo.tasks import TaskSet
from dynamo.wire import PreprocessedRequest, encode
from router.base import Router, RoutingDecision
from router.protocol import (
    ROUTE_DECISION_CODEC,
    ROUTER_COMPONENT,
    SELECT_ENDPOINT,
    RouteFeedback,
    RouteRequest,
    feedback_subject,
)

log = logging.getLogger(__name__)


class RemoteRouter(Router):
    """A frontend's Router that asks a router service (any replica) for each decision."""

    mode = "remote"

    def __init__(self, runtime: Runtime, *, namespace: str | None = None, wait_s: float = 5.0) -> None:
        self.runtime = runtime
        self._namespace = namespace or runtime.namespace
        self._wait_s = wait_s
        self._client: Client | None = None
        self._replica = itertools.count()
        # The Router callbacks are synchronous; publishing is not: the tasks are owned here.
        self._tasks = TaskSet("router feedback", log=log, level=logging.WARNING)

    async def start(self) -> None:
        endpoint = self.runtime.endpoint(ROUTER_COMPONENT, SELECT_ENDPOINT, self._namespace)
        self._client = await endpoint.client()

    async def close(self) -> None:
        await self._tasks.cancel_all()
        if self._client is not None:
            await self._client.close()

    async def select(
        self, request: PreprocessedRequest, candidates: Sequence[int]
    ) -> RoutingDecision:
        if not candidates:
            raise errors.NoInstances("no live worker serves this model")
        assert self._client is not None, "start() the router first"
        replicas = self._client.instance_ids() or await self._client.wait_for_instances(self._wait_s)
        if request.session_id:
            # Each replica keeps its own session table: a session's requests go to one replica
            # (while the set of replicas stays the same) so they find their pin there.
            replica = session_replica(request.session_id, replicas)
        else:
            replica = replicas[next(self._replica) % len(replicas)]
        # The current span is the frontend's route span (frontend/choice_stream.py), when traced.
        trace = tracing.current_traceparent() if tracing.active else None
        payload = encode(
            RouteRequest(request.request_id, request.token_ids, list(candidates), request.session_id, trace)
        )
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
        self._tasks.spawn(self.runtime.events.publish(feedback_subject(self._namespace), encode(feedback)))


def session_replica(session_id: str, replicas: Sequence[int]) -> int:
    """The replica a session's requests go to: rendezvous hashing, so a replica that joins or
    leaves moves only the sessions it wins or held (they re-pin there by normal scoring)."""
    key = session_id.encode()

    def weight(replica: int) -> bytes:
        return hashlib.blake2b(key + replica.to_bytes(8, "little"), digest_size=8).digest()

    return max(replicas, key=weight)
