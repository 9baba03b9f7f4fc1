"""Request and event planes on NATS core (nats-py), sharing one connection.

A request is a RequestEnvelope published to the instance's own subject with a reply subject on
the caller's inbox; the empty reply is the server's ack (or the NATS server's "no responders"
status), and the response frames follow on the caller's inbox. Payloads
(request envelopes and single frames) are limited by the server's max_payload, 1 MiB by default.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
from nats import errors as nats_errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSub

from dynamo import errors
from dynamo.config import redact_url
from dynamo.runtime.nats_fastpath import add_direct, make_client, remove_direct
from dynamo.runtime.planes import (
    EventPlane,
    Handler,
    RequestContext,
    RequestPlane,
    ResponseStream,
    Served,
    Subscription,
)
from dynamo.runtime.streaming import FrameStream, run_handler
from dynamo.runtime.tcp_plane import DEAD_PEER_S, bound_dead_peer
from dynamo.wire import ENVELOPE_CODEC, FRAME_CODEC, FRAME_ERROR, RequestEnvelope, StreamFrame, encode

log = logging.getLogger(__name__)

CANCEL_SUFFIX = ".cancel"
# Events a subscriber may fall behind by before new ones are dropped (and counted); KV events
# carry per-worker sequence numbers, so a consumer detects the loss and resynchronises.
EVENT_QUEUE_LIMIT = 65536
# Frames the response inbox may buffer before nats-py drops them as a slow consumer. The
# callback only decodes and enqueues, so this is reached only if the event loop is starved.
_MUX_PENDING_MSGS = 1 << 20
_MUX_PENDING_BYTES = 1 << 30
# A connection whose server stopped answering (a cut link, a host gone without closing the
# socket) is declared stale after PING_MAX_OUTSTANDING pings of PING_INTERVAL_S went unanswered
# (4-6 s), then reconnected: its caller streams fail at once instead of waiting for frames that
# cannot come. nats-py's defaults (120 s, 2) took 4-6 minutes.
PING_INTERVAL_S = 2.0
PING_MAX_OUTSTANDING = 2
# Frames a server published this long before its connection was declared dead may have gone
# down with it: the stale check's pings, then closing the old socket (bounded by DEAD_PEER_S),
# twice over for a loaded event loop.
SUSPECT_S = 2 * ((PING_MAX_OUTSTANDING + 1) * PING_INTERVAL_S + DEAD_PEER_S)


class NatsConnection:
    """One NATS connection shared by the planes of a runtime; closed when the last user
    releases it. Reconnects forever; listeners hear about disconnects."""

    def __init__(self, nc: NatsClient, servers: list[str]) -> None:
        self.nc = nc
        self.servers = servers
        self._users = 0
        self._disconnect_listeners: list[Callable[[], None]] = []
        self._reconnect_listeners: list[Callable[[], None]] = []

    @classmethod
    async def connect(
        cls,
        servers: list[str],
        *,
        name: str,
        timeout_s: float = 5.0,
        reconnect_wait_s: float = 0.5,
        tls_ca: str | None = None,
        creds_path: str | None = None,
        fastpath: bool = True,
    ) -> NatsConnection:
        """`user:password@` in a server URL authenticates (nats-py reads it); `tls_ca` turns on
        TLS verified against that CA; `creds_path` is a NATS .creds file (JWT + nkey);
        `fastpath` lets the request plane's response inbox use dynamo/runtime/nats_fastpath.py
        where this nats-py supports it (False: nats-py's public API only)."""
        holder: list[NatsConnection] = []
        where = redact_url(", ".join(servers))  # URLs may carry passwords: never log them
        options: dict[str, Any] = {}
        if tls_ca:
            try:
                options["tls"] = ssl.create_default_context(cafile=tls_ca)
            except OSError as exc:  # ssl.SSLError is an OSError
                raise errors.DynamoError(f"cannot load the NATS TLS CA {tls_ca!r}: {exc}") from exc
        if creds_path:
            options["user_credentials"] = creds_path

        async def on_error(exc: Exception) -> None:
            log.warning("NATS (%s): %s", where, redact_url(repr(exc)))

        async def on_disconnect() -> None:
            if nc.is_closed:  # our own close, not an outage
                return
            log.warning("NATS disconnected from %s; reconnecting", where)
            for conn in holder:
                conn._notify_disconnect()

        async def on_reconnect() -> None:
            _bound_dead_peer(nc)
            log.info("NATS reconnected to %s", where)
            for conn in holder:
                conn._notify_reconnect()

        async def on_closed() -> None:
            log.info("NATS connection to %s closed", where)

        nc = make_client(fastpath)
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=servers,
                    name=name,
                    connect_timeout=timeout_s,  # type: ignore[arg-type]
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=reconnect_wait_s,  # type: ignore[arg-type]
                    ping_interval=PING_INTERVAL_S,  # type: ignore[arg-type]
                    max_outstanding_pings=PING_MAX_OUTSTANDING,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    closed_cb=on_closed,
                    **options,
                ),
                timeout_s,
            )
        except (TimeoutError, OSError, nats_errors.Error) as exc:
            await _close_quietly(nc)
            raise errors.DynamoError(
                f"cannot connect to NATS at {where} within {timeout_s}s: {redact_url(repr(exc))}"
            ) from exc
        _bound_dead_peer(nc)
        conn = cls(nc, servers)
        holder.append(conn)
        return conn

    def acquire(self) -> NatsConnection:
        self._users += 1
        return self

    async def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            await _close_quietly(self.nc)

    async def close(self) -> None:
        """Close regardless of users (for failed setup)."""
        await _close_quietly(self.nc)

    def on_disconnect(self, listener: Callable[[], None]) -> None:
        self._disconnect_listeners.append(listener)

    def _notify_disconnect(self) -> None:
        for listener in self._disconnect_listeners:
            listener()

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        """`listener()` runs once a reconnect is complete: the subscriptions were re-sent and
        the server has processed them (nats-py flushes them before its reconnected callback)."""
        self._reconnect_listeners.append(listener)

    def _notify_reconnect(self) -> None:
        for listener in self._reconnect_listeners:
            listener()

    async def sync(self, timeout_s: float) -> None:
        """Return once nats-server has processed everything this connection sent before."""
        await sync(self.nc, timeout_s)


async def sync(nc: NatsClient, timeout_s: float) -> None:
    """Return once nats-server has processed every command `nc` queued before the call, so
    that a SUB just made routes other clients' messages to us (and an UNSUB no longer does).

    nats-py's flush() does not promise that: it writes its PING straight to the socket, ahead
    of the commands (SUB, UNSUB, PUB) still queued for its flusher task, so the PONG can come
    back before the server has seen a SUB made just before. A caller on another connection then
    gets "no responders" from an address serve() already returned (measured with nats-py 2.16,
    fast path or not: 5% of calls made right after serve() on an idle 2-core VM, 6-11% with
    both cores busy). Instead, a message to a fresh inbox of our own is queued behind those
    commands like any publish; it comes back to us (NATS echoes a connection's messages to its
    own subscriptions) only after the server has processed them. Public API only, so it holds
    on both of the request plane's paths; another client's wildcard subscription that also
    receives it changes nothing."""
    inbox = nc.new_inbox()
    echoed: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
    sub = await nc.subscribe(inbox, future=echoed, max_msgs=1)
    await sub.unsubscribe(limit=1)  # the server drops the interest after the echo
    await nc.publish(inbox, b"")
    try:
        await asyncio.wait_for(echoed, timeout_s)
    except TimeoutError:
        try:
            await sub.unsubscribe()
        except nats_errors.Error as exc:
            log.debug("unsubscribing %s: %r", inbox, exc)
        raise


def _bound_dead_peer(nc: NatsClient) -> None:
    """Give the connection's socket the TCP request plane's dead-peer bound (keepalive and
    TCP_USER_TIMEOUT, tcp_plane.bound_dead_peer). Without it a link cut while the socket holds
    unsent data (a worker streaming frames) stays unnoticed for the kernel's ~15 minutes: the
    PING that nats-py's stale check sends never gets its PONG, but its reconnect then waits
    for the old transport to close, which waits for that data to be sent. With it the kernel
    fails the socket after DEAD_PEER_S and nats-py reconnects. nats-py takes no socket
    options, so this reaches its transport's stream writer (a private attribute, present
    throughout nats-py 2.x); where it is missing the socket keeps the kernel's defaults."""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    if writer is not None:
        bound_dead_peer(writer)  # a socket already gone: the reconnect handles it


async def _close_quietly(nc: NatsClient) -> None:
    if nc.is_closed:
        return
    try:
        await asyncio.wait_for(nc.close(), 5.0)
    except (TimeoutError, OSError, nats_errors.Error) as exc:
        log.warning("closing NATS connection: %r", exc)


# Request acks share the response inbox with the streams, under tokens of their own.
_ACK_PREFIX = "a"
_ACKED = object()
_NO_RESPONDERS = object()
_TIMED_OUT = object()
_STATUS_HEADER = "Status"  # nats.js.api.Header.STATUS
_NO_RESPONDERS_STATUS = "503"


def _settle(future: asyncio.Future[object], outcome: object) -> None:
    if not future.done():
        future.set_result(outcome)


def _too_large(what: str, size: int, max_payload: int) -> errors.DynamoError:
    return errors.DynamoError(
        f"{what} of {size} bytes exceeds the NATS server's max_payload of {max_payload} bytes "
        "(raise max_payload in the nats-server config, or send less)"
    )


# ------------------------------------------------------------------------------------ requests


class _NatsServed(Served):
    """Server side of one instance address: requests on `address`, cancels on `address.cancel`."""

    def __init__(self, plane: NatsRequestPlane, address: str, handler: Handler) -> None:
        self._plane = plane
        self._nc = plane._nc
        self.address = address
        self._handler = handler
        self._subs: list[NatsSub] = []
        # Keyed by the caller's inbox, which is unique per call (request ids may repeat when a
        # request migrates), so a cancel names exactly one stream.
        self._tasks: dict[str, tuple[asyncio.Task[None], RequestContext]] = {}
        # (finished at, reply_to, the seq after its last frame) of streams that ended recently:
        # those that ended within SUSPECT_S of a disconnect are told after the reconnect.
        self._finished: deque[tuple[float, str, int]] = deque()
        self._stopped = False

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        self._subs.append(await self._nc.subscribe(self.address, cb=self._on_request))
        self._subs.append(await self._nc.subscribe(self.address + CANCEL_SUFFIX, cb=self._on_cancel))
        # Once synced, the server routes to us: safe to advertise the address in discovery.
        await sync(self._nc, self._plane.ack_timeout_s)

    async def _on_request(self, msg: Msg) -> None:
        try:
            envelope = ENVELOPE_CODEC.decode(msg.data)
        except msgspec.DecodeError as exc:
            # Not acked, so the caller gets InstanceUnavailable after its ack timeout.
            log.warning("malformed request envelope on %s: %s", self.address, exc)
            return
        if self._stopped:
            return
        ctx = RequestContext(envelope.request_id)
        key = envelope.reply_to
        task = asyncio.create_task(self._run(envelope, ctx))
        self._tasks[key] = (task, ctx)
        task.add_done_callback(lambda _: self._tasks.pop(key, None))
        await msg.respond(b"")

    async def _run(self, envelope: RequestEnvelope, ctx: RequestContext) -> None:
        nc = self._nc
        reply_to = envelope.reply_to
        max_payload = nc.max_payload

        next_seq = 0

        async def send(frame: StreamFrame) -> None:
            nonlocal next_seq
            data = encode(frame)
            if len(data) > max_payload:
                # run_handler turns this into an error frame, which does fit.
                raise _too_large("response frame", len(data), max_payload)
            await nc.publish(reply_to, data)
            next_seq = frame.seq + 1

        try:
            await run_handler(self._handler, envelope.payload, ctx, send)
        except nats_errors.Error as exc:
            # The connection is closed or its outbound buffer is full while reconnecting: the
            # caller learns it from the frame sent after the reconnect (streams_lost).
            log.warning("could not send response of request %s: %r", ctx.request_id, exc)
        finally:
            self._note_finished(reply_to, next_seq)

    def _note_finished(self, reply_to: str, next_seq: int) -> None:
        now = time.monotonic()
        finished = self._finished
        finished.append((now, reply_to, next_seq))
        # While disconnected every entry is kept: they are the ones to tell after the
        # reconnect (no request arrives meanwhile, so they are at most the streams in flight).
        if self._nc.is_connected:
            while finished and finished[0][0] < now - SUSPECT_S:
                finished.popleft()

    async def streams_lost(self, disconnected_at: float) -> int:
        """After a reconnect: what this server published on its old connection in the last
        SUSPECT_S before the disconnect was noticed, and what it could not publish since, may be
        lost, and NATS core does not say. A stream whose last frames went down with it would
        wait for them forever: its caller has no other way to learn that the stream ended. So
        each stream that ended since then gets one more frame, an error right after its last
        one. A caller that had every frame has finished the stream and drops it unread; one
        that missed some sees a gap or the error, and fails the stream (StreamBroken: it may
        migrate). Streams still running need nothing: their next frame shows any gap. Returns
        how many were told."""
        since = disconnected_at - SUSPECT_S
        told = 0
        for finished_at, reply_to, next_seq in list(self._finished):
            if finished_at < since:
                continue
            frame = StreamFrame(
                next_seq, FRAME_ERROR, code=errors.StreamBroken.code,
                error=f"the worker at {self.address} lost its NATS connection while this stream ended; "
                      "its last frames may be lost",
            )
            try:
                await self._nc.publish(reply_to, encode(frame))
            except nats_errors.Error as exc:  # disconnected again: the next reconnect tells them
                log.debug("could not tell %s its stream may have lost frames: %r", reply_to, exc)
                return told
            told += 1
        self._finished.clear()
        return told

    async def _on_cancel(self, msg: Msg) -> None:
        entry = self._tasks.get(msg.data.decode())
        if entry is not None:
            task, ctx = entry
            ctx.cancelled.set()
            task.cancel()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._plane._served.pop(self.address, None)
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except nats_errors.Error as exc:  # connection already closed: nothing to undo
                log.debug("unsubscribing %s: %r", sub.subject, exc)
        self._subs.clear()
        if self._nc.is_connected:
            # Once synced, callers get "no responders" at once instead of an ack timeout.
            try:
                await sync(self._nc, self._plane.ack_timeout_s)
            except (TimeoutError, nats_errors.Error) as exc:
                log.debug("flushing after unsubscribing %s: %r", self.address, exc)
        tasks = list(self._tasks.values())
        for task, ctx in tasks:
            ctx.stop_reason = f"worker at {self.address} stopped during the request"
            task.cancel()
        await asyncio.gather(*(task for task, _ in tasks), return_exceptions=True)
        if self._nc.is_connected:
            # Push the "stopped" frames out before the caller of stop() closes the connection.
            try:
                await sync(self._nc, self._plane.ack_timeout_s)
            except (TimeoutError, nats_errors.Error) as exc:
                log.debug("flushing after stopping %s: %r", self.address, exc)


class _NatsStream(FrameStream):
    """Caller side of one call: fed by the plane's inbox subscription, unregistered when it
    finishes, and cancelled remotely by a message to `<address>.cancel`."""

    def __init__(self, plane: NatsRequestPlane, token: str, address: str, inbox: str, request_id: str) -> None:
        super().__init__(request_id, self._send_cancel)
        self._plane = plane
        self._token = token
        self._address = address
        self._inbox = inbox

    def _finish(self) -> None:
        super()._finish()
        self._plane._streams.pop(self._token, None)

    async def _send_cancel(self) -> None:
        self._plane._streams.pop(self._token, None)
        try:
            await self._plane._nc.publish(self._address + CANCEL_SUFFIX, self._inbox.encode())
        except nats_errors.Error as exc:
            log.warning("could not cancel request %s on %s: %r", self.request_id, self._address, exc)


class NatsRequestPlane(RequestPlane):
    """Calls and serves instance addresses (NATS subjects). All response streams of this
    plane arrive on one wildcard inbox subscription and are demultiplexed by its last token,
    so a call costs no SUB/UNSUB round trip and no per-call subscription task."""

    def __init__(self, conn: NatsConnection, *, ack_timeout_s: float) -> None:
        self._conn = conn.acquire()
        self._nc = conn.nc
        self.ack_timeout_s = ack_timeout_s
        self._served: dict[str, _NatsServed] = {}
        self._streams: dict[str, _NatsStream] = {}
        self._acks: dict[str, asyncio.Future[object]] = {}
        self._background: set[asyncio.Future[None]] = set()
        self._inbox_prefix = self._nc.new_inbox() + "."
        self._prefix_len = len(self._inbox_prefix)
        self._tokens = itertools.count()
        self._mux: NatsSub | None = None
        self._closed = False
        self._disconnected_at: float | None = None
        self._reachability_listeners: list[Callable[[bool], None]] = []
        conn.on_disconnect(self._connection_lost)
        conn.on_reconnect(self._reconnected)

    @classmethod
    async def create(cls, conn: NatsConnection, *, ack_timeout_s: float) -> NatsRequestPlane:
        plane = cls(conn, ack_timeout_s=ack_timeout_s)
        plane._mux = await plane._nc.subscribe(
            plane._inbox_prefix + "*",
            cb=plane._on_frame,
            pending_msgs_limit=_MUX_PENDING_MSGS,
            pending_bytes_limit=_MUX_PENDING_BYTES,
        )
        # Header-less frames skip nats-py's Msg path where the fast path is on; the server's
        # no-responders status (a header) still comes to _on_frame.
        add_direct(plane._nc, plane._mux._id, plane._on_frame_direct)
        return plane

    async def _on_frame(self, msg: Msg) -> None:
        token = msg.subject[self._prefix_len :]
        if msg.headers and msg.headers.get(_STATUS_HEADER) == _NO_RESPONDERS_STATUS:
            # The server's answer to a request published where nobody subscribes.
            ack = self._acks.get(token)
            if ack is not None and not ack.done():
                ack.set_result(_NO_RESPONDERS)
            return
        self._deliver(token, msg.data)

    def _on_frame_direct(self, subject: bytes, data: bytes) -> None:
        self._deliver(subject[self._prefix_len :].decode(), data)

    def _deliver(self, token: str, data: bytes) -> None:
        stream = self._streams.get(token)
        if stream is None:
            ack = self._acks.get(token)
            if ack is not None and not ack.done():
                ack.set_result(_ACKED)
            return  # otherwise a late frame of a stream that already finished or was cancelled
        try:
            stream.feed(FRAME_CODEC.decode(data))
        except msgspec.DecodeError as exc:
            stream.abort(errors.StreamBroken(f"malformed response frame for {stream.request_id}: {exc}"))

    def on_reachability(self, listener: Callable[[bool], None]) -> None:
        self._reachability_listeners.append(listener)

    def _connection_lost(self) -> None:
        if self._disconnected_at is None:  # the first of an outage's failed attempts
            self._disconnected_at = time.monotonic()
            for listener in self._reachability_listeners:
                listener(False)
        # NATS core does not redeliver what was published while we were away: a stream that
        # outlived the disconnect may have lost frames, so fail it now rather than hang.
        for stream in list(self._streams.values()):
            stream.abort(errors.StreamBroken(f"NATS connection lost during request {stream.request_id}"))

    def _reconnected(self) -> None:
        disconnected_at, self._disconnected_at = self._disconnected_at, None
        if disconnected_at is None or self._closed:
            return
        for listener in self._reachability_listeners:
            listener(True)
        if not self._served:
            return
        task = asyncio.ensure_future(self._tell_streams_lost(disconnected_at))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _tell_streams_lost(self, disconnected_at: float) -> None:
        told = 0
        for served in list(self._served.values()):
            told += await served.streams_lost(disconnected_at)
        if told:
            log.warning("told the callers of %d streams that ended around the NATS outage that "
                        "their last frames may be lost", told)

    async def serve(self, address: str, handler: Handler) -> Served:
        if address in self._served:
            raise errors.DynamoError(f"address {address!r} is already served")
        served = _NatsServed(self, address, handler)
        self._served[address] = served
        try:
            await served.start()
        except (TimeoutError, nats_errors.Error) as exc:
            await served.stop()
            raise errors.DynamoError(f"cannot serve {address} on NATS: {exc!r}") from exc
        return served

    async def call(self, address: str, request_id: str, payload: bytes) -> ResponseStream:
        nc = self._nc
        token = str(next(self._tokens))
        inbox = self._inbox_prefix + token
        data = encode(RequestEnvelope(request_id, inbox, payload))
        if len(data) > nc.max_payload:
            raise _too_large(f"request {request_id}", len(data), nc.max_payload)
        # Registered before sending: frames may overtake the ack.
        stream = _NatsStream(self, token, address, inbox, request_id)
        self._streams[token] = stream
        # The server's (empty) ack comes to our own inbox too, under its own token, instead of
        # through nats-py's request(): no Msg, no response subscription task, no wait_for.
        ack_token = _ACK_PREFIX + token
        loop = asyncio.get_running_loop()
        ack: asyncio.Future[object] = loop.create_future()
        self._acks[ack_token] = ack
        timer = loop.call_later(self.ack_timeout_s, _settle, ack, _TIMED_OUT)
        try:
            await nc.publish(address, data, reply=self._inbox_prefix + ack_token)
            outcome = await ack
        except nats_errors.Error as exc:
            self._streams.pop(token, None)
            raise errors.InstanceUnavailable(f"cannot send request {request_id} to {address}: {exc!r}") from exc
        except asyncio.CancelledError:
            self._streams.pop(token, None)
            # The server may have taken it: tell it to stop, without awaiting (we are cancelled).
            task = asyncio.ensure_future(stream._send_cancel())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            raise
        finally:
            timer.cancel()
            self._acks.pop(ack_token, None)
        if outcome is _NO_RESPONDERS:
            self._streams.pop(token, None)
            raise errors.InstanceUnavailable(f"no server at {address}")
        if outcome is _TIMED_OUT:
            # The server may have started after all: tell it to stop, best effort.
            await stream._send_cancel()
            raise errors.InstanceUnavailable(
                f"{address} did not accept request {request_id} within {self.ack_timeout_s}s"
            )
        return stream

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for served in list(self._served.values()):
            await served.stop()
        for stream in list(self._streams.values()):
            stream.abort(errors.StreamBroken(f"request plane closed during request {stream.request_id}"))
        if self._background:  # cancels of calls that were cancelled while waiting for the ack
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._mux is not None:
            remove_direct(self._nc, self._mux._id)
        if self._mux is not None and not self._nc.is_closed:
            try:
                await self._mux.unsubscribe()
            except nats_errors.Error as exc:
                log.debug("unsubscribing the response inbox: %r", exc)
        await self._conn.release()


# -------------------------------------------------------------------------------------- events


class _NatsSubscription(Subscription):
    def __init__(self, plane: NatsEventPlane, subject: str) -> None:
        self._plane = plane
        self.subject = subject
        # Unbounded queue with a limit checked by hand, so that closing can always enqueue
        # the end marker; the NATS read loop is never blocked either way.
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._sub: NatsSub | None = None
        self.dropped = 0
        self._closed = False

    async def _on_msg(self, msg: Msg) -> None:
        if self._queue.qsize() >= EVENT_QUEUE_LIMIT:
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # log at 1, 2, 4, 8, ... drops
                log.warning("subscriber of %s is behind; %d events dropped", self.subject, self.dropped)
            return
        self._queue.put_nowait(msg.data)

    async def __anext__(self) -> bytes:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)
            raise StopAsyncIteration
        return item

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._plane._subs.discard(self)
        if self._sub is not None and not self._plane._nc.is_closed:
            try:
                await self._sub.unsubscribe()
            except nats_errors.Error as exc:
                log.debug("unsubscribing %s: %r", self.subject, exc)
        self._queue.put_nowait(None)


class NatsEventPlane(EventPlane):
    """Publish/subscribe on NATS subjects; `prefix.>` matches every subject below `prefix`."""

    def __init__(self, conn: NatsConnection, *, timeout_s: float = 5.0) -> None:
        self._conn = conn.acquire()
        self._nc = conn.nc
        self._timeout_s = timeout_s
        self._subs: set[_NatsSubscription] = set()
        self._closed = False

    @property
    def client(self) -> NatsClient:
        """The NATS client, for components that need JetStream (the frontend's rate-limit
        store, frontend/rate_limit_store.py); the plane owns it."""
        return self._nc

    async def publish(self, subject: str, payload: bytes) -> None:
        if len(payload) > self._nc.max_payload:
            raise _too_large(f"event on {subject}", len(payload), self._nc.max_payload)
        try:
            await self._nc.publish(subject, payload)
        except nats_errors.Error as exc:
            raise errors.DynamoError(f"cannot publish on {subject}: {exc!r}") from exc

    async def subscribe(self, subject: str) -> Subscription:
        sub = _NatsSubscription(self, subject)
        try:
            sub._sub = await self._nc.subscribe(subject, cb=sub._on_msg)
            # Returns once the server has the interest, as the embedded plane does: an event
            # published after subscribe() returns is delivered.
            await sync(self._nc, self._timeout_s)
        except (TimeoutError, nats_errors.Error) as exc:
            await sub.close()
            raise errors.DynamoError(f"cannot subscribe to {subject}: {exc!r}") from exc
        self._subs.add(sub)
        return sub

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.close()
        await self._conn.release()
