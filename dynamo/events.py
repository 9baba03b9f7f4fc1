"""Event-plane subjects and the publishers workers use for KV events and load metrics."""

from __future__ import annotations

import time

from dynamo.runtime.planes import EventPlane
from dynamo.wire import KvCacheEvent, KvEventData, LoadMetrics, encode


def kv_events_subject(namespace: str, component: str) -> str:
    return f"{namespace}.{component}.kv_events"


def load_metrics_subject(namespace: str, component: str) -> str:
    return f"{namespace}.{component}.load_metrics"


def kv_snapshot_subject(namespace: str, component: str) -> str:
    """Routers ask workers to re-publish their cache state here (after a gap or restart)."""
    return f"{namespace}.{component}.kv_snapshot"


class KvEventPublisher:
    """Numbers a worker's KV events consecutively and publishes them in order.

    Numbering here, at the single point of publication, is what lets a consumer tell a lost
    event (a gap) from a quiet worker.
    """

    def __init__(self, events: EventPlane, subject: str, worker_id: int) -> None:
        self._events = events
        self._subject = subject
        self.worker_id = worker_id
        self._next_event_id = 0

    async def publish(self, data: KvEventData) -> KvCacheEvent:
        event = KvCacheEvent(self.worker_id, self._next_event_id, data, time.time())
        self._next_event_id += 1
        await self._events.publish(self._subject, encode(event))
        return event


class LoadPublisher:
    def __init__(self, events: EventPlane, subject: str) -> None:
        self._events = events
        self._subject = subject

    async def publish(self, metrics: LoadMetrics) -> None:
        await self._events.publish(self._subject, encode(metrics))
