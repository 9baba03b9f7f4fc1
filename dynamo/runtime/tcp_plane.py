"""A request plane over direct TCP: callers connect to the worker itself, with no broker hop.

A process that serves anything listens on one TCP port; each served name (the same instance
name the NATS plane uses as a subject) is advertised in discovery as `tcp://host:port/name`, so a
caller needs no extra lookup. A caller keeps one persistent connection per worker address and
multiplexes every concurrent request over it as numbered streams.

Wire format, both directions: frames of a 4-byte big-endian length followed by one msgpack
message (dynamo.wire.TcpMessage: request, cancel, ack, response frame), each naming its stream.
Semantics mirror the NATS plane: `call` returns once the server acked; an unserved name is
refused at once (NATS's "no responders"); no ack within the ack timeout is InstanceUnavailable;
a refused or reset connection is InstanceUnavailable before the ack and StreamBroken after it.

Writes are coalesced without delaying any: the first message of a loop iteration goes to the
socket at once, the ones produced later in the same iteration are gathered and written together
when it ends (and the transport itself gathers whatever piles up while the kernel buffer is full).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

import msgspec

from dynamo import errors
from dynamo.runtime.planes import Handler, RequestContext, RequestPlane, ResponseStream, Served
from dynamo.runtime.streaming import FrameStream, run_handler
from dynamo.wire import (
    FRAME_DATA,
    TCP_MESSAGE_DECODER,
    StreamFrame,
    TcpAck,
    TcpCancel,
    TcpFrame,
    TcpMessage,
    TcpRequest,
)

log = logging.getLogger(__name__)

SCHEME = "tcp://"
_HEADER = struct.Struct(">I")
# A frame this large is a protocol error (or garbage on the port), not a response: refuse it
# rather than buffer it. Requests carry token ids, so even long prompts stay far below.
MAX_FRAME_BYTES = 64 << 20
_READ_CHUNK = 1 << 16
# Outbound bytes a connection may hold before a sender waits for the peer to read; a peer that
# reads nothing for DRAIN_TIMEOUT_S is treated as dead and its connection closed.
_HIGH_WATER = 4 << 20
DRAIN_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 2.0

In = TypeVar("In")
Out = TypeVar("Out")

_ACKED = object()
_TIMED_OUT = object()


def transport_address(host: str, port: int, name: str) -> str:
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{SCHEME}{host}:{port}/{name}"


def parse_address(address: str) -> tuple[str, int, str]:
    """`tcp://host:port/name` -> (host, port, name); DynamoError when malformed."""
    if not address.startswith(SCHEME):
        raise errors.DynamoError(f"not a TCP request-plane address: {address!r}")
    hostport, sep, name = address[len(SCHEME) :].partition("/")
    host, colon, port_text = hostport.rpartition(":")
    if not sep or not name or not colon or not host or not port_text.isdigit():
        raise errors.DynamoError(f"malformed TCP request-plane address: {address!r}")
    return host.strip("[]"), int(port_text), name


def default_advertise_host() -> str:
    """This host's address on its default route (the one peers on other hosts reach), found
    without sending anything; loopback when there is no route at all."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # UDP connect only picks a route
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _settle(future: asyncio.Future[object], outcome: object) -> None:
    if not future.done():
        future.set_result(outcome)


# A peer whose host vanished or whose link was cut without closing the connection (power loss,
# network partition) is declared dead this long after it last answered, on both sides of a
# connection: the receiving side (a frontend waiting for frames) by keepalive probes, sent after
# KEEPALIVE_IDLE_S of silence every KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES unanswered; the
# sending side (a worker streaming into a cut link) by TCP_USER_TIMEOUT on unacknowledged data.
# Kernels answer probes and acknowledge data whatever their process is doing, so a busy peer is
# never mistaken for a dead one. Measured across network namespaces (tests/integration/
# test_partitions.py): a frontend cut from a worker mid-stream migrated its streams after a
# 5-6 s pause; with the former 10 s + 3 x 5 s it took 25 s.
KEEPALIVE_IDLE_S = 2
KEEPALIVE_INTERVAL_S = 1
KEEPALIVE_PROBES = 3
DEAD_PEER_S = KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_PROBES


def enable_keepalive(sock: socket.socket) -> None:
    """Find a silent dead peer within DEAD_PEER_S, even while no request is open to it (also
    used on the NATS connections: dynamo/runtime/nats_planes.py)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
        ("TCP_USER_TIMEOUT", DEAD_PEER_S * 1000),
    ):
        if hasattr(socket, option):  # Linux names; other platforms keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def bound_dead_peer(writer: asyncio.StreamWriter) -> None:
    """enable_keepalive on a stream's socket where it is TCP (connections this process did
    not open itself: NATS's, the KV transfer agents'). A socket already reset keeps the
    kernel's defaults: its connection fails on its own."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        enable_keepalive(sock)
    except OSError as exc:
        log.debug("socket options: %r", exc)


# --------------------------------------------------------------------------------- connection


class FramedConnection(Generic[In, Out]):
    """One TCP connection carrying length-prefixed msgpack messages, either side: the request
    plane's (In and Out both TcpMessage) and the hub's (dynamo/runtime/hub.py).

    `on_message` is called for every message `decoder` decodes, from the read task; `on_lost`
    once when the connection ends for any reason (EOF, reset, protocol error, close())."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_message: Callable[[In], None],
        on_lost: Callable[[Exception], None],
        label: str,
        decoder: msgspec.msgpack.Decoder[In],
    ) -> None:
        self._decoder = decoder
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport
        self._on_message = on_message
        self._on_lost = on_lost
        self.label = label
        self._encoder = msgspec.msgpack.Encoder()
        self._loop = asyncio.get_running_loop()
        # Messages produced after the first one of this loop iteration; None when nothing was
        # written in this iteration yet (the next message then goes out at once).
        self._pending: bytearray | None = None
        self.closed = False
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            enable_keepalive(sock)
        self._transport.set_write_buffer_limits(high=_HIGH_WATER)
        self._read_task: asyncio.Task[None] = asyncio.create_task(self._read_loop(), name=f"tcp-plane-read {label}")

    # ---- writing

    def send(self, message: Out) -> None:
        """Queue one message; never blocks. Dropped if the connection is closed (its streams
        are failed or cancelled by `on_lost`)."""
        if self.closed:
            return
        pending = self._pending
        if pending is None:
            buf = bytearray(4)
            self._encoder.encode_into(message, buf, 4)
            _HEADER.pack_into(buf, 0, len(buf) - 4)
            self._transport.write(buf)
            self._pending = bytearray()
            self._loop.call_soon(self._flush)
        else:
            start = len(pending)
            pending.extend(b"\0\0\0\0")
            self._encoder.encode_into(message, pending, start + 4)
            _HEADER.pack_into(pending, start, len(pending) - start - 4)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self.closed:
            self._transport.write(pending)

    @property
    def buffered(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._pending or b"")

    async def drain(self) -> None:
        """Wait until the peer has read enough; a peer stuck for DRAIN_TIMEOUT_S is dead."""
        if self.buffered <= _HIGH_WATER or self.closed:
            return
        self._flush()
        try:
            await asyncio.wait_for(self._writer.drain(), DRAIN_TIMEOUT_S)
        except TimeoutError:
            self.close(errors.StreamBroken(f"{self.label} read nothing for {DRAIN_TIMEOUT_S}s"))
        except ConnectionError:
            pass  # the read task reports the loss

    # ---- reading

    async def _read_loop(self) -> None:
        reason: Exception = errors.StreamBroken(f"connection to {self.label} closed by the peer")
        buf = bytearray()
        try:
            while True:
                data = await self._reader.read(_READ_CHUNK)
                if not data:
                    break
                buf += data
                pos, size = 0, len(buf)
                while size - pos >= 4:
                    (length,) = _HEADER.unpack_from(buf, pos)
                    if length > MAX_FRAME_BYTES:
                        raise errors.StreamBroken(f"{self.label} sent a frame of {length} bytes")
                    end = pos + 4 + length
                    if end > size:
                        break  # the rest of this frame is still on its way
                    message = self._decoder.decode(buf[pos + 4 : end])
                    pos = end
                    self._on_message(message)
                if pos:
                    del buf[:pos]
        except asyncio.CancelledError:
            reason = errors.StreamBroken(f"connection to {self.label} closed")
            raise
        except (ConnectionError, OSError) as exc:
            reason = errors.StreamBroken(f"connection to {self.label} lost: {exc!r}")
        except msgspec.DecodeError as exc:
            reason = errors.StreamBroken(f"malformed message from {self.label}: {exc}")
        except errors.StreamBroken as exc:
            reason = exc
        finally:
            self.close(reason)

    # ---- closing

    def close(self, reason: Exception) -> None:
        """Close now (buffered output is still flushed by the transport) and report the loss."""
        if self.closed:
            return
        self._flush()
        self.closed = True
        self._transport.close()
        if self._read_task is not asyncio.current_task():
            self._read_task.cancel()
        self._on_lost(reason)

    async def wait_closed(self) -> None:
        await asyncio.gather(self._read_task, return_exceptions=True)
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT_S)


# -------------------------------------------------------------------------------------- server


class _TcpServed(Served):
    """One served name on the plane's listener. `address` is what callers pass to call()."""

    def __init__(self, plane: TcpRequestPlane, name: str, address: str, handler: Handler) -> None:
        self._plane = plane
        self.name = name
        self.address = address
        self.handler = handler
        # (connection id, stream id) -> its handler task; a stream id is unique per connection.
        self.tasks: dict[tuple[int, int], tuple[asyncio.Task[None], RequestContext]] = {}
        self.stopped = False

    @property
    def transport(self) -> str:
        return self.address

    @property
    def inflight(self) -> int:
        return len(self.tasks)

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True  # refuse new requests from here on, as unsubscribing does on NATS
        self._plane._served.pop(self.name, None)
        tasks = list(self.tasks.values())
        for task, ctx in tasks:
            ctx.stop_reason = f"worker at {self.address} stopped during the request"
            task.cancel()
        await asyncio.gather(*(task for task, _ in tasks), return_exceptions=True)
        # The "stopped" frames are queued: let them reach the callers (bounded) before the
        # caller of stop() closes the plane and its connections.
        await self._plane._drain_server_connections()


class _ServerConnection:
    """The worker's end of one caller's connection: runs a handler task per stream."""

    def __init__(self, plane: TcpRequestPlane, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._plane = plane
        peer = writer.get_extra_info("peername")
        self.conn: FramedConnection[TcpMessage, TcpMessage] = FramedConnection(
            reader, writer, self._on_message, self._on_lost, f"caller {peer}", TCP_MESSAGE_DECODER
        )
        self._tasks: dict[int, tuple[asyncio.Task[None], RequestContext, _TcpServed]] = {}

    def _on_message(self, message: TcpMessage) -> None:
        if isinstance(message, TcpRequest):
            self._start(message)
        elif isinstance(message, TcpCancel):
            entry = self._tasks.get(message.sid)
            if entry is not None:
                task, ctx, _ = entry
                ctx.cancelled.set()
                task.cancel()
        else:
            log.warning("unexpected %s from %s", type(message).__name__, self.conn.label)

    def _start(self, request: TcpRequest) -> None:
        served = self._plane._served.get(request.address)
        if served is None or served.stopped:
            self.conn.send(TcpAck(request.sid, f"no server at {request.address}"))
            return
        sid = request.sid
        ctx = RequestContext(request.request_id)
        task = asyncio.create_task(self._run(served, sid, request.payload, ctx))
        key = (id(self), sid)
        self._tasks[sid] = (task, ctx, served)
        served.tasks[key] = (task, ctx)

        def done(_: asyncio.Task[None]) -> None:
            self._tasks.pop(sid, None)
            served.tasks.pop(key, None)

        task.add_done_callback(done)
        # Sent before the task runs, so the ack precedes every frame of the stream.
        self.conn.send(TcpAck(sid))

    async def _run(self, served: _TcpServed, sid: int, payload: bytes, ctx: RequestContext) -> None:
        conn = self.conn

        async def send(frame: StreamFrame) -> None:
            conn.send(TcpFrame(sid, frame))
            if conn.buffered > _HIGH_WATER:
                await conn.drain()

        await run_handler(served.handler, payload, ctx, send)

    def _on_lost(self, reason: Exception) -> None:
        # The caller is gone: nobody reads these streams any more, so free their handlers.
        self._plane._server_conns.discard(self)
        for task, ctx, _ in list(self._tasks.values()):
            ctx.cancelled.set()
            task.cancel()

    async def drain(self) -> None:
        self.conn._flush()
        if self.conn.closed:
            return
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(self.conn._writer.drain(), CLOSE_TIMEOUT_S)


# -------------------------------------------------------------------------------------- caller


class _TcpStream(FrameStream):
    """Caller side of one stream; cancelled remotely by a cancel message on its connection."""

    def __init__(self, peer: _Peer, sid: int, request_id: str) -> None:
        super().__init__(request_id, self._send_cancel)
        self._peer = peer
        self._sid = sid

    def _finish(self) -> None:
        super()._finish()
        self._peer.streams.pop(self._sid, None)

    async def _send_cancel(self) -> None:
        self._peer.streams.pop(self._sid, None)
        self._peer.conn.send(TcpCancel(self._sid))  # dropped if the connection is gone


class _Peer:
    """The caller's connection to one worker address, shared by all its streams."""

    def __init__(self, plane: TcpRequestPlane, key: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._plane = plane
        self.key = key
        self.streams: dict[int, _TcpStream] = {}
        self.acks: dict[int, asyncio.Future[object]] = {}
        self._sids = itertools.count()
        self.conn: FramedConnection[TcpMessage, TcpMessage] = FramedConnection(
            reader, writer, self._on_message, self._on_lost, f"worker {key[0]}:{key[1]}", TCP_MESSAGE_DECODER
        )

    def next_sid(self) -> int:
        return next(self._sids)

    def _on_message(self, message: TcpMessage) -> None:
        if isinstance(message, TcpFrame):
            stream = self.streams.get(message.sid)
            if stream is None:
                return  # a late frame of a stream that finished or was cancelled
            frame = message.frame
            if frame.kind != FRAME_DATA:
                self.streams.pop(message.sid, None)  # the last frame: nothing follows
            stream.feed(frame)
        elif isinstance(message, TcpAck):
            ack = self.acks.get(message.sid)
            if ack is not None and not ack.done():
                ack.set_result(message.error or _ACKED)
        else:
            log.warning("unexpected %s from %s", type(message).__name__, self.conn.label)

    def _on_lost(self, reason: Exception) -> None:
        if self._plane._peers.get(self.key) is self:
            del self._plane._peers[self.key]  # the next call reconnects
        for ack in self.acks.values():
            _settle(ack, reason)
        for stream in list(self.streams.values()):
            stream.abort(errors.StreamBroken(f"request {stream.request_id}: {reason}"))
        self.streams.clear()


# --------------------------------------------------------------------------------------- plane


class TcpRequestPlane(RequestPlane):
    """Serves names on one lazily opened listener and calls `tcp://host:port/name` addresses."""

    def __init__(
        self,
        *,
        ack_timeout_s: float,
        advertise_host: str | None = None,
        port: int = 0,
    ) -> None:
        self.ack_timeout_s = ack_timeout_s
        self._advertise_host = advertise_host
        self._port = port
        self._server: asyncio.Server | None = None
        self._listen: tuple[str, int] | None = None
        self._listen_lock = asyncio.Lock()
        self._served: dict[str, _TcpServed] = {}
        self._server_conns: set[_ServerConnection] = set()
        self._peers: dict[tuple[str, int], _Peer] = {}
        self._connecting: dict[tuple[str, int], asyncio.Task[_Peer]] = {}
        self._closed = False

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """(advertised host, port) once something is served."""
        return self._listen

    # ---- serving

    async def _ensure_listening(self) -> tuple[str, int]:
        async with self._listen_lock:
            if self._listen is not None:
                return self._listen
            advertise = self._advertise_host or default_advertise_host()
            # An explicit host is also where we bind; the detected one may change with routes,
            # so then every interface is bound.
            bind = self._advertise_host or "0.0.0.0"
            try:
                self._server = await asyncio.start_server(self._on_connection, bind, self._port, reuse_address=True)
            except OSError as exc:
                raise errors.DynamoError(f"cannot listen for TCP requests on {bind}:{self._port}: {exc}") from exc
            port = int(self._server.sockets[0].getsockname()[1])
            self._listen = (advertise, port)
            log.info("TCP request plane listening on %s:%d (advertised as %s:%d)", bind, port, advertise, port)
            return self._listen

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.close()
            return
        self._server_conns.add(_ServerConnection(self, reader, writer))

    async def _drain_server_connections(self) -> None:
        await asyncio.gather(*(c.drain() for c in list(self._server_conns)), return_exceptions=True)

    async def serve(self, address: str, handler: Handler) -> Served:
        if self._closed:
            raise errors.DynamoError("the TCP request plane is closed")
        if address in self._served:
            raise errors.DynamoError(f"address {address!r} is already served")
        host, port = await self._ensure_listening()
        served = _TcpServed(self, address, transport_address(host, port, address), handler)
        self._served[address] = served
        return served

    # ---- calling

    async def _peer(self, host: str, port: int) -> _Peer:
        key = (host, port)
        peer = self._peers.get(key)
        if peer is not None and not peer.conn.closed:
            return peer
        task = self._connecting.get(key)
        if task is None:
            task = asyncio.create_task(self._connect(key), name=f"tcp-plane-connect {host}:{port}")
            self._connecting[key] = task
            task.add_done_callback(lambda _: self._connecting.pop(key, None))
        # Shielded: one caller giving up must not fail the connect for the others.
        return await asyncio.shield(task)

    async def _connect(self, key: tuple[str, int]) -> _Peer:
        host, port = key
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.ack_timeout_s)
        except TimeoutError:
            raise errors.InstanceUnavailable(
                f"cannot connect to {host}:{port} within {self.ack_timeout_s}s"
            ) from None
        except OSError as exc:
            raise errors.InstanceUnavailable(f"cannot connect to {host}:{port}: {exc}") from exc
        if self._closed:
            writer.close()
            raise errors.InstanceUnavailable("the TCP request plane is closed")
        peer = _Peer(self, key, reader, writer)
        self._peers[key] = peer
        return peer

    async def call(self, address: str, request_id: str, payload: bytes) -> ResponseStream:
        if self._closed:
            raise errors.InstanceUnavailable("the TCP request plane is closed")
        if not address.startswith(SCHEME):
            # A NATS subject: where this plane is the only one (the hub's processes), nobody
            # serves it, which is what a caller must learn, as from NATS's "no responders".
            raise errors.InstanceUnavailable(f"no server at {address} (not a TCP request-plane address)")
        host, port, name = parse_address(address)
        peer = await self._peer(host, port)
        sid = peer.next_sid()
        stream = _TcpStream(peer, sid, request_id)
        peer.streams[sid] = stream  # registered before sending: frames follow the ack at once
        loop = asyncio.get_running_loop()
        ack: asyncio.Future[object] = loop.create_future()
        peer.acks[sid] = ack
        timer = loop.call_later(self.ack_timeout_s, _settle, ack, _TIMED_OUT)
        try:
            peer.conn.send(TcpRequest(sid, name, request_id, payload))
            outcome = await ack
        except asyncio.CancelledError:
            # The server may have taken it: tell it to stop (a plain write, nothing to await).
            await stream._send_cancel()
            raise
        finally:
            timer.cancel()
            peer.acks.pop(sid, None)
        if outcome is _ACKED:
            return stream
        peer.streams.pop(sid, None)
        if outcome is _TIMED_OUT:
            await stream._send_cancel()  # it may have started after all: best effort
            raise errors.InstanceUnavailable(
                f"{address} did not accept request {request_id} within {self.ack_timeout_s}s"
            )
        if isinstance(outcome, Exception):  # the connection died before the ack
            raise errors.InstanceUnavailable(f"cannot send request {request_id} to {address}: {outcome}")
        raise errors.InstanceUnavailable(str(outcome))

    # ---- closing

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for served in list(self._served.values()):
            await served.stop()
        if self._server is not None:
            self._server.close()
        for task in list(self._connecting.values()):
            task.cancel()
        await asyncio.gather(*self._connecting.values(), return_exceptions=True)
        conns = [c.conn for c in self._server_conns] + [p.conn for p in self._peers.values()]
        for conn in conns:
            conn.close(errors.StreamBroken("request plane closed"))
        await asyncio.gather(*(c.wait_closed() for c in conns), return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), CLOSE_TIMEOUT_S)


# -------------------------------------------------------------------------- choosing per call

RequestPlaneKind = Literal["nats", "tcp"]


class SchemeRequestPlane(RequestPlane):
    """The distributed runtime's request plane: serves on the configured plane and calls each
    address on the plane that its form names (`tcp://...` or a NATS subject), so callers reach
    workers of either kind during a rollout from one plane to the other."""

    def __init__(self, serve_on: RequestPlaneKind, nats: RequestPlane, tcp: TcpRequestPlane) -> None:
        self.serve_on = serve_on
        self.nats = nats
        self.tcp = tcp

    async def serve(self, address: str, handler: Handler) -> Served:
        plane = self.tcp if self.serve_on == "tcp" else self.nats
        return await plane.serve(address, handler)

    async def call(self, address: str, request_id: str, payload: bytes) -> ResponseStream:
        if address.startswith(SCHEME):
            return await self.tcp.call(address, request_id, payload)
        return await self.nats.call(address, request_id, payload)

    def on_reachability(self, listener: Callable[[bool], None]) -> None:
        if self.serve_on != "tcp":  # the NATS link matters to callers only where we serve on it
            self.nats.on_reachability(listener)

    async def close(self) -> None:
        try:
            await self.tcp.close()
        finally:
            await self.nats.close()
