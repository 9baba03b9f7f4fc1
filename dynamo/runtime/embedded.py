"""The embedded backend: discovery, requests and events in one process, no servers.

Same semantics as the distributed backend (leases expire, watches see puts and deletes in
order, streams are framed and cancellable), so code tested here behaves the same on NATS/etcd.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid

from dynamo import errors
from dynamo.runtime.planes import (
    Discovery,
    EventPlane,
    Handler,
    RequestContext,
    RequestPlane,
    ResponseStream,
    Served,
    Subscription,
    Watch,
    WatchEvent,
)
from dynamo.runtime.streaming import FrameStream, run_handler
from dynamo.wire import StreamFrame

# ------------------------------------------------------------------------------------ requests


class _EmbeddedServed(Served):
    def __init__(self, plane: EmbeddedRequestPlane, address: str, handler: Handler) -> None:
        self._plane = plane
        self.address = address
        self.handler = handler
        self.tasks: dict[asyncio.Task[None], RequestContext] = {}

    @property
    def inflight(self) -> int:
        return len(self.tasks)

    async def stop(self) -> None:
        self._plane._servers.pop(self.address, None)
        tasks = list(self.tasks.items())
        for task, ctx in tasks:
            ctx.stop_reason = f"worker at {self.address} stopped during the request"
            task.cancel()
        await asyncio.gather(*(task for task, _ in tasks), return_exceptions=True)


class EmbeddedRequestPlane(RequestPlane):
    def __init__(self) -> None:
        self._servers: dict[str, _EmbeddedServed] = {}

    async def serve(self, address: str, handler: Handler) -> Served:
        if address in self._servers:
            raise errors.DynamoError(f"address {address!r} is already served")
        served = _EmbeddedServed(self, address, handler)
        self._servers[address] = served
        return served

    async def call(self, address: str, request_id: str, payload: bytes) -> ResponseStream:
        served = self._servers.get(address)
        if served is None:
            raise errors.InstanceUnavailable(f"no server at {address}")
        ctx = RequestContext(request_id)
        task: asyncio.Task[None] | None = None

        async def cancel() -> None:
            ctx.cancelled.set()
            if task is not None and not task.done():
                task.cancel()

        stream = FrameStream(request_id, cancel)

        async def send(frame: StreamFrame) -> None:
            stream.feed(frame)

        task = asyncio.create_task(run_handler(served.handler, payload, ctx, send))
        served.tasks[task] = ctx
        task.add_done_callback(lambda t: served.tasks.pop(t, None))
        return stream

    async def close(self) -> None:
        for served in list(self._servers.values()):
            await served.stop()


# -------------------------------------------------------------------------------------- events


class EmbeddedSubscription(Subscription):
    def __init__(self, plane: EmbeddedEventPlane, subject: str) -> None:
        self._plane = plane
        self.subject = subject
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def matches(self, subject: str) -> bool:
        if self.subject.endswith(".>"):
            return subject.startswith(self.subject[:-1])
        return subject == self.subject

    async def __anext__(self) -> bytes:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        self._plane._subs.discard(self)
        self.queue.put_nowait(None)


class EmbeddedEventPlane(EventPlane):
    def __init__(self) -> None:
        self._subs: set[EmbeddedSubscription] = set()

    # The *_now methods never wait; the hub (dynamo/runtime/hub.py) calls them inline so that
    # its children's calls take effect in the order they arrived.

    async def publish(self, subject: str, payload: bytes) -> None:
        self.publish_now(subject, payload)

    def publish_now(self, subject: str, payload: bytes) -> None:
        for sub in list(self._subs):
            if sub.matches(subject):
                sub.queue.put_nowait(payload)

    async def subscribe(self, subject: str) -> Subscription:
        return self.subscribe_now(subject)

    def subscribe_now(self, subject: str) -> EmbeddedSubscription:
        sub = EmbeddedSubscription(self, subject)
        self._subs.add(sub)
        return sub

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.close()


# ----------------------------------------------------------------------------------- discovery


class EmbeddedWatch(Watch):
    def __init__(self, discovery: EmbeddedDiscovery, prefix: str) -> None:
        self._discovery = discovery
        self.prefix = prefix
        self.queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()

    async def __anext__(self) -> WatchEvent:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        self._discovery._watches.discard(self)
        self.queue.put_nowait(None)


class EmbeddedDiscovery(Discovery):
    """An in-memory key-value store with leases that expire unless kept alive."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, int | None]] = {}
        self._leases: dict[int, float] = {}  # lease id -> ttl_s
        self._watches: set[EmbeddedWatch] = set()
        self._ids = itertools.count(uuid.uuid4().int & 0xFFFF_FFFF | 1 << 40)

    def _notify(self, event: WatchEvent) -> None:
        for watch in list(self._watches):
            if event.key.startswith(watch.prefix):
                watch.queue.put_nowait(event)

    # The *_now methods never wait: see EmbeddedEventPlane.

    async def create_lease(self, ttl_s: float, keep_alive: bool = True) -> int:
        return self.create_lease_now(ttl_s)

    def create_lease_now(self, ttl_s: float) -> int:
        lease_id = next(self._ids)
        self._leases[lease_id] = ttl_s
        # In one process nothing can stop the keep-alive except revoking, so no timer is armed;
        # `expire_lease` lets tests reproduce an expiry. A lease not kept alive is not expired
        # here either: its holders revoke it when due (the store lives and dies with the process).
        return lease_id

    def expire_lease(self, lease_id: int) -> None:
        """Drop a lease and its keys as if its keep-alive had stopped."""
        self._leases.pop(lease_id, None)
        for key, (_, owner) in list(self._data.items()):
            if owner == lease_id:
                del self._data[key]
                self._notify(WatchEvent("delete", key))

    async def revoke_lease(self, lease_id: int) -> None:
        self.expire_lease(lease_id)

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        self.put_now(key, value, lease_id)

    def put_now(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        if lease_id is not None and lease_id not in self._leases:
            raise errors.DynamoError(f"lease {lease_id:x} does not exist")
        self._data[key] = (value, lease_id)
        self._notify(WatchEvent("put", key, value))

    async def delete(self, key: str) -> None:
        self.delete_now(key)

    def delete_now(self, key: str) -> None:
        if self._data.pop(key, None) is not None:
            self._notify(WatchEvent("delete", key))

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return self.get_prefix_now(prefix)

    def get_prefix_now(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, (v, _) in self._data.items() if k.startswith(prefix)}

    async def watch_prefix(self, prefix: str) -> Watch:
        return self.watch_prefix_now(prefix)

    def watch_prefix_now(self, prefix: str) -> EmbeddedWatch:
        watch = EmbeddedWatch(self, prefix)
        for key, (value, _) in sorted(self._data.items()):
            if key.startswith(prefix):
                watch.queue.put_nowait(WatchEvent("put", key, value))
        self._watches.add(watch)
        return watch

    async def close(self) -> None:
        for watch in list(self._watches):
            await watch.close()
