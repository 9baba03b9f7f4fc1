"""The hub: one process's embedded discovery and event plane, served to its own child processes.

`dynamo.serve --worker-processes` runs each worker in a child process so that the engine loop and
the frontend's HTTP path each get a core of their own instead of sharing one interpreter (as
vLLM's engine core and SGLang's scheduler run beside their HTTP servers). The children need the
parent's discovery and events without NATS or etcd: the parent serves them here, on a loopback
port, one connection per child; requests go over the direct TCP plane as in a distributed
deployment.

Semantics are the embedded backend's, because the parent's planes *are* embedded ones: a lease a
child keeps alive lives as long as that child's connection, so a child that dies or is killed
is deregistered at once (no TTL to wait for); a watch sees the current contents, then every
change in order; a publish is not acknowledged, and events from one child arrive in order.

Wire format: the TCP plane's frames (FramedConnection) carrying dynamo.wire.HubCall messages
child -> parent and HubPush messages parent -> child.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Coroutine
from typing import Any

from dynamo import errors
from dynamo.config import RuntimeConfig
from dynamo.runtime.embedded import EmbeddedDiscovery, EmbeddedEventPlane, EmbeddedSubscription, EmbeddedWatch
from dynamo.runtime.planes import Discovery, EventPlane, Subscription, Watch, WatchEvent
from dynamo.runtime.runtime import Runtime
from dynamo.runtime.tcp_plane import FramedConnection, TcpRequestPlane
from dynamo.wire import (
    HUB_CALL_DECODER,
    HUB_PUSH_DECODER,
    HubCall,
    HubClose,
    HubDelete,
    HubGet,
    HubLease,
    HubMessage,
    HubPublish,
    HubPush,
    HubPut,
    HubReply,
    HubRequest,
    HubRevoke,
    HubSubscribe,
    HubWatch,
    HubWatchEvent,
)

log = logging.getLogger(__name__)

# Every call is answered by the parent's event loop without waiting on anything else, so a call
# unanswered this long means the parent is stuck or gone.
CALL_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# Parent and children are one machine: nothing of the hub or their request plane leaves it.
LOOPBACK = "127.0.0.1"

# ---------------------------------------------------------------------------------------- parent


class _ChildConnection:
    """The parent's end of one child's connection: answers its calls against the parent's planes
    inline, in arrival order, and forwards what its watches and subscriptions see."""

    def __init__(self, hub: HubServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._hub = hub
        peer = writer.get_extra_info("peername")
        self.conn: FramedConnection[HubCall, HubPush] = FramedConnection(
            reader, writer, self._on_message, self._on_lost, f"hub child {peer}", HUB_CALL_DECODER
        )
        self._leases: set[int] = set()  # kept-alive leases, revoked when the child goes
        self._feeds: dict[int, EmbeddedWatch | EmbeddedSubscription] = {}
        self.forwarders: set[asyncio.Task[None]] = set()

    def _on_message(self, call: HubCall) -> None:
        if isinstance(call, HubPublish):
            self._hub.events.publish_now(call.subject, call.payload)
            return
        try:
            self.conn.send(self._answer(call))
        except errors.DynamoError as exc:
            self.conn.send(HubReply(call.id, error=str(exc) or type(exc).__name__))

    def _answer(self, call: HubRequest) -> HubReply:
        discovery = self._hub.discovery
        if isinstance(call, HubLease):
            lease_id = discovery.create_lease_now(call.ttl_s)
            if call.keep_alive:
                self._leases.add(lease_id)
            return HubReply(call.id, number=lease_id)
        if isinstance(call, HubRevoke):
            self._leases.discard(call.lease_id)
            discovery.expire_lease(call.lease_id)
        elif isinstance(call, HubPut):
            discovery.put_now(call.key, call.value, call.lease_id)
        elif isinstance(call, HubDelete):
            discovery.delete_now(call.key)
        elif isinstance(call, HubGet):
            return HubReply(call.id, values=discovery.get_prefix_now(call.prefix))
        elif isinstance(call, HubWatch):
            watch = discovery.watch_prefix_now(call.prefix)
            self._feeds[call.id] = watch
            self._spawn(self._forward_watch(call.id, watch))
        elif isinstance(call, HubSubscribe):
            sub = self._hub.events.subscribe_now(call.subject)
            self._feeds[call.id] = sub
            self._spawn(self._forward_messages(call.id, sub))
        elif isinstance(call, HubClose):
            feed = self._feeds.pop(call.handle, None)
            if feed is not None:
                feed.close_now()  # its forwarder reads the end and returns
        return HubReply(call.id)

    def _spawn(self, forwarder: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(forwarder)
        self.forwarders.add(task)
        task.add_done_callback(self.forwarders.discard)

    async def _forward_watch(self, handle: int, watch: EmbeddedWatch) -> None:
        async for event in watch:
            self.conn.send(HubWatchEvent(handle, event.kind, event.key, event.value))

    async def _forward_messages(self, handle: int, sub: EmbeddedSubscription) -> None:
        async for payload in sub:
            self.conn.send(HubMessage(handle, payload))

    def _on_lost(self, reason: Exception) -> None:
        # The child is gone (exited, killed, or closed its end): what it held goes with it.
        for lease_id in self._leases:
            self._hub.discovery.expire_lease(lease_id)
        self._leases.clear()
        for feed in self._feeds.values():
            feed.close_now()  # each forwarder reads the end and returns
        self._feeds.clear()
        self._hub._children.discard(self)


class HubServer:
    """Serves `discovery` and `events` (the parent runtime's own embedded planes) on a loopback
    port. Use as an async context manager; `address` is what children connect to."""

    def __init__(self, discovery: EmbeddedDiscovery, events: EmbeddedEventPlane, host: str = LOOPBACK) -> None:
        self.discovery = discovery
        self.events = events
        self._host = host
        self._server: asyncio.Server | None = None
        self._children: set[_ChildConnection] = set()
        self.address = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, self._host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"{self._host}:{port}"
        return self.address

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._children.add(_ChildConnection(self, reader, writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        children = list(self._children)
        for child in children:
            child.conn.close(errors.StreamBroken("the hub closed"))  # ends its forwarders' feeds
        await asyncio.gather(*(child.conn.wait_closed() for child in children))
        await asyncio.gather(*(task for child in children for task in list(child.forwarders)))

    async def __aenter__(self) -> HubServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ----------------------------------------------------------------------------------------- child


class _Feed:
    """What a child's watch or subscription has been sent and not yet read; None ends it."""

    def __init__(self, client: HubClient, handle: int) -> None:
        self._client = client
        self.handle = handle
        self.queue: asyncio.Queue[object] = asyncio.Queue()

    async def next(self) -> object:
        item = await self.queue.get()
        if item is None:
            self.queue.put_nowait(None)  # stays ended for later reads
            raise StopAsyncIteration
        return item

    async def close(self) -> None:
        if self._client._feeds.pop(self.handle, None) is not None:
            self.queue.put_nowait(None)
            if not self._client.closed:
                await self._client.call(HubClose(self._client.next_id(), self.handle))


class _HubWatch(Watch):
    def __init__(self, feed: _Feed) -> None:
        self._feed = feed

    async def __anext__(self) -> WatchEvent:
        event = await self._feed.next()
        assert isinstance(event, WatchEvent)
        return event

    async def close(self) -> None:
        await self._feed.close()


class _HubSubscription(Subscription):
    def __init__(self, feed: _Feed) -> None:
        self._feed = feed

    async def __anext__(self) -> bytes:
        payload = await self._feed.next()
        assert isinstance(payload, bytes)
        return payload

    async def close(self) -> None:
        await self._feed.close()


class HubClient:
    """A child's connection to its parent's hub, shared by its HubDiscovery and HubEventPlane."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[HubReply]] = {}
        self._feeds: dict[int, _Feed] = {}
        self._conn: FramedConnection[HubPush, HubCall] | None = None
        self.closed = False
        self.lost = asyncio.Event()  # set when the parent's end goes away
        self._users = 0

    @classmethod
    async def connect(cls, address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> HubClient:
        client = cls(address)
        host, _, port = address.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
        except (OSError, TimeoutError, ValueError) as exc:
            raise errors.DynamoError(f"cannot reach the hub at {address}: {exc!r}") from exc
        client._conn = FramedConnection(
            reader, writer, client._on_message, client._on_lost, f"hub {address}", HUB_PUSH_DECODER
        )
        return client

    def next_id(self) -> int:
        return next(self._ids)

    def _on_message(self, push: HubPush) -> None:
        if isinstance(push, HubReply):
            future = self._calls.pop(push.id, None)
            if future is not None and not future.done():
                future.set_result(push)
            return
        feed = self._feeds.get(push.handle)
        if feed is None:
            return  # closed here while the parent was still sending
        if isinstance(push, HubWatchEvent):
            feed.queue.put_nowait(WatchEvent(push.kind, push.key, push.value))
        else:
            feed.queue.put_nowait(push.payload)

    def _on_lost(self, reason: Exception) -> None:
        if not self.closed:
            log.warning("lost the hub at %s: %s", self.address, reason)
        self.closed = True
        for future in self._calls.values():
            if not future.done():
                future.set_exception(errors.DynamoError(f"the hub at {self.address} is gone ({reason})"))
        self._calls.clear()
        for feed in self._feeds.values():
            feed.queue.put_nowait(None)
        self._feeds.clear()
        self.lost.set()

    async def call(self, call: HubRequest) -> HubReply:
        if self.closed or self._conn is None:
            raise errors.DynamoError(f"the hub at {self.address} is closed")
        future: asyncio.Future[HubReply] = asyncio.get_running_loop().create_future()
        self._calls[call.id] = future
        self._conn.send(call)
        try:
            reply = await asyncio.wait_for(future, CALL_TIMEOUT_S)
        except TimeoutError:
            self._calls.pop(call.id, None)
            raise errors.DynamoError(f"the hub at {self.address} did not answer within {CALL_TIMEOUT_S}s") from None
        if reply.error:
            raise errors.DynamoError(reply.error)
        return reply

    def publish(self, subject: str, payload: bytes) -> None:
        if self._conn is not None:
            self._conn.send(HubPublish(subject, payload))  # dropped once the hub is gone

    async def open_feed(self, call: HubWatch | HubSubscribe) -> _Feed:
        feed = _Feed(self, call.id)
        self._feeds[call.id] = feed  # before the call: its first events may precede the reply
        try:
            await self.call(call)
        except BaseException:
            self._feeds.pop(call.id, None)
            raise
        return feed

    def acquire(self) -> None:
        self._users += 1

    async def release(self) -> None:
        """Close the connection when its last plane closes."""
        self._users -= 1
        if self._users > 0 or self._conn is None:
            return
        self.closed = True
        conn, self._conn = self._conn, None
        conn.close(errors.StreamBroken("closed"))
        await conn.wait_closed()


class HubDiscovery(Discovery):
    def __init__(self, client: HubClient) -> None:
        self._client = client
        client.acquire()

    @property
    def lost(self) -> asyncio.Event:
        """Set when the parent's end of the hub goes away (the parent is gone)."""
        return self._client.lost

    async def create_lease(self, ttl_s: float, keep_alive: bool = True) -> int:
        reply = await self._client.call(HubLease(self._client.next_id(), ttl_s, keep_alive))
        return reply.number

    # Once the connection is gone, the parent has already dropped this child's kept-alive
    # leases and their keys (or is gone itself): revoking and deleting have nothing left to do,
    # and a child shutting down after its parent should not report them as failures.

    async def revoke_lease(self, lease_id: int) -> None:
        if not self._client.closed:
            await self._client.call(HubRevoke(self._client.next_id(), lease_id))

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        await self._client.call(HubPut(self._client.next_id(), key, value, lease_id))

    async def delete(self, key: str) -> None:
        if not self._client.closed:
            await self._client.call(HubDelete(self._client.next_id(), key))

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        reply = await self._client.call(HubGet(self._client.next_id(), prefix))
        return dict(reply.values)

    async def watch_prefix(self, prefix: str) -> Watch:
        return _HubWatch(await self._client.open_feed(HubWatch(self._client.next_id(), prefix)))

    async def close(self) -> None:
        await self._client.release()


class HubEventPlane(EventPlane):
    def __init__(self, client: HubClient) -> None:
        self._client = client
        client.acquire()

    async def publish(self, subject: str, payload: bytes) -> None:
        self._client.publish(subject, payload)

    async def subscribe(self, subject: str) -> Subscription:
        return _HubSubscription(await self._client.open_feed(HubSubscribe(self._client.next_id(), subject)))

    async def close(self) -> None:
        await self._client.release()


# ------------------------------------------------------------------------------------- runtimes


def hub_parent_runtime(config: RuntimeConfig) -> tuple[Runtime, HubServer]:
    """The parent's runtime (its own embedded discovery and events, requests over direct TCP on
    loopback, so it can call its children's workers) and the hub serving those planes to them.
    Enter the hub (it listens) before starting children; leave it after they are gone."""
    discovery, events = EmbeddedDiscovery(), EmbeddedEventPlane()
    requests = TcpRequestPlane(ack_timeout_s=config.request_ack_timeout_s, advertise_host=LOOPBACK)
    return Runtime(config, discovery, requests, events), HubServer(discovery, events)


async def hub_child_runtime(config: RuntimeConfig, address: str) -> Runtime:
    """A child's runtime on its parent's hub at `address`; it serves requests over direct TCP
    on loopback, where the parent's frontend calls it."""
    client = await HubClient.connect(address)
    requests = TcpRequestPlane(ack_timeout_s=config.request_ack_timeout_s, advertise_host=LOOPBACK)
    return Runtime(config, HubDiscovery(client), requests, HubEventPlane(client))
