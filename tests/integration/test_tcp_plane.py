"""The direct TCP request plane on real sockets: multiplexing, framing across arbitrary read
sizes, a SIGKILLed worker process, caller cancellation, refusals, and reconnecting to a worker
that came back on another (or the same) port. The runtime contract suite also runs over it."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import struct
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest

from dynamo import errors
from dynamo.config import DEFAULT_REQUEST_PLANE, RuntimeConfig, add_runtime_args
from dynamo.runtime import RequestContext, Runtime
from dynamo.runtime.tcp_plane import SchemeRequestPlane, TcpRequestPlane, parse_address, transport_address
from dynamo.wire import TCP_MESSAGE_DECODER, StreamFrame, TcpAck, TcpFrame, TcpMessage, TcpRequest
from tests.integration.test_runtime_contract import WAIT_S, Forever, within

pytestmark = pytest.mark.integration

NAME = "ns.backend.generate.1"


async def count_to(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    for i in range(int(payload)):
        yield str(i).encode()
        if i % 7 == 0:
            await asyncio.sleep(0)  # interleave the streams on the connection


@pytest.fixture
async def planes() -> AsyncIterator[tuple[TcpRequestPlane, TcpRequestPlane]]:
    server = TcpRequestPlane(ack_timeout_s=2.0, advertise_host="127.0.0.1")
    caller = TcpRequestPlane(ack_timeout_s=2.0)
    try:
        yield server, caller
    finally:
        await caller.close()
        await server.close()


def _encode(message: TcpMessage) -> bytes:
    body = msgspec.msgpack.encode(message)
    return struct.pack(">I", len(body)) + body


def _decode_all(data: bytes) -> list[TcpMessage]:
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append(TCP_MESSAGE_DECODER.decode(data[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return out


# ------------------------------------------------------------------------------ multiplexing


async def test_many_concurrent_streams_share_one_connection(planes: tuple[TcpRequestPlane, TcpRequestPlane]) -> None:
    server, caller = planes
    served = await server.serve(NAME, count_to)
    assert served.transport is not None and served.transport.startswith("tcp://127.0.0.1:")

    async def one(n: int) -> list[bytes]:
        stream = await caller.call(served.transport, f"r{n}", str(n).encode())
        return [item async for item in stream]

    results = await within(asyncio.gather(*(one(n % 50) for n in range(400))), "400 concurrent streams")
    assert results == [[str(i).encode() for i in range(n % 50)] for n in range(400)]
    assert len(caller._peers) == 1
    assert len(server._server_conns) == 1
    assert served.inflight == 0


async def test_address_round_trip() -> None:
    assert parse_address(transport_address("10.0.0.5", 4100, NAME)) == ("10.0.0.5", 4100, NAME)
    assert parse_address(transport_address("::1", 4100, NAME)) == ("::1", 4100, NAME)
    for bad in ("tcp://host/name", "tcp://host:x/name", "tcp://host:1", "nats.subject"):
        with pytest.raises(errors.DynamoError):
            parse_address(bad)


# ---------------------------------------------------------------------------------- framing


async def test_server_parses_requests_split_at_every_byte(planes: tuple[TcpRequestPlane, TcpRequestPlane]) -> None:
    server, _ = planes
    served = await server.serve(NAME, count_to)
    host, port, name = parse_address(served.transport or "")
    reader, writer = await asyncio.open_connection(host, port)
    try:
        wire = b"".join(_encode(TcpRequest(sid, name, f"r{sid}", str(sid).encode())) for sid in range(1, 6))
        rng = random.Random(7)
        pos = 0
        while pos < len(wire):  # chunks of 1..9 bytes, each flushed on its own
            step = rng.randint(1, 9)
            writer.write(wire[pos : pos + step])
            await writer.drain()
            await asyncio.sleep(0)
            pos += step
        # Acks, then frames 0..sid-1 and an end frame for every stream sid: read until all ended.
        received: bytes = b""
        ended: set[int] = set()
        while len(ended) < 5:
            received += await within(reader.read(1 << 16), "response bytes")  # type: ignore[operator]
            pos, messages = 0, []
            while len(received) - pos >= 4:
                (length,) = struct.unpack_from(">I", received, pos)
                if len(received) - pos - 4 < length:
                    break
                messages.append(TCP_MESSAGE_DECODER.decode(received[pos + 4 : pos + 4 + length]))
                pos += 4 + length
            for m in messages:
                if isinstance(m, TcpFrame) and m.frame.kind == 1:
                    ended.add(m.sid)
        messages = _decode_all(received[: pos])
        acks = [m.sid for m in messages if isinstance(m, TcpAck)]
        assert sorted(acks) == [1, 2, 3, 4, 5]
        for sid in range(1, 6):
            frames = [m.frame for m in messages if isinstance(m, TcpFrame) and m.sid == sid]
            assert [f.data for f in frames[:-1]] == [str(i).encode() for i in range(sid)]
            assert [f.seq for f in frames] == list(range(sid + 1))
    finally:
        writer.close()


async def test_caller_parses_frames_split_at_arbitrary_sizes() -> None:
    """A hand-written worker answers with every message of three streams in one byte string,
    written in random chunk sizes (1 byte up to several messages): the caller must rebuild each
    stream exactly."""
    rng = random.Random(11)
    expected = {sid: [bytes([65 + sid]) * rng.randint(0, 300) for _ in range(40)] for sid in range(3)}

    async def fake_worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        seen: list[TcpRequest] = []
        while len(seen) < 3:
            buf += await reader.read(1 << 16)
            seen = [m for m in _decode_all(buf) if isinstance(m, TcpRequest)] if buf else []
        wire = b"".join(_encode(TcpAck(r.sid)) for r in seen)
        for i in range(41):  # interleaved: frame i of every stream, then i + 1, ...
            for r in seen:
                frame = StreamFrame(i, 0, expected[r.sid][i]) if i < 40 else StreamFrame(i, 1)
                wire += _encode(TcpFrame(r.sid, frame))
        pos = 0
        while pos < len(wire):
            step = rng.choice([1, 2, 3, 5, 17, 64, 1000, 5000])
            writer.write(wire[pos : pos + step])
            await writer.drain()
            await asyncio.sleep(0)
            pos += step
        await reader.read()  # until the caller closes

    listener = await asyncio.start_server(fake_worker, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    caller = TcpRequestPlane(ack_timeout_s=2.0)
    try:
        streams = await within(
            asyncio.gather(*(caller.call(transport_address("127.0.0.1", port, NAME), f"r{i}", b"") for i in range(3))),
            "three acks",
        )

        async def drain(stream: object) -> list[bytes]:
            return [item async for item in stream]  # type: ignore[attr-defined]

        results = await within(asyncio.gather(*(drain(s) for s in streams)), "three streams")  # type: ignore[union-attr]
        assert sorted(results) == sorted(expected.values())
    finally:
        await caller.close()
        listener.close()


async def test_oversized_frame_breaks_the_connection() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        writer.write(_encode(TcpAck(0)) + struct.pack(">I", 1 << 31))
        await writer.drain()
        await reader.read()

    listener = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    caller = TcpRequestPlane(ack_timeout_s=2.0)
    try:
        stream = await caller.call(transport_address("127.0.0.1", port, NAME), "r", b"")
        with pytest.raises(errors.StreamBroken, match="frame of"):
            await within(anext(stream), "the stream to break")
    finally:
        await caller.close()
        listener.close()


# ------------------------------------------------------------------------- faults and refusals


WORKER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from dynamo.runtime.tcp_plane import TcpRequestPlane

    async def forever(payload, ctx):
        yield b"first"
        await asyncio.Event().wait()

    async def main():
        plane = TcpRequestPlane(ack_timeout_s=2.0, advertise_host="127.0.0.1")
        served = await plane.serve("ns.backend.generate.1", forever)
        print(served.transport, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_sigkilled_worker_breaks_open_streams_promptly() -> None:
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT], stdout=subprocess.PIPE, text=True)
    caller = TcpRequestPlane(ack_timeout_s=2.0)
    try:
        assert proc.stdout is not None
        address = (await within(asyncio.to_thread(proc.stdout.readline), "the worker to listen", 30)).strip()  # type: ignore[union-attr]
        streams = [await caller.call(address, f"r{i}", b"") for i in range(8)]
        for stream in streams:
            assert await within(anext(stream), "the first frame") == b"first"
        proc.send_signal(signal.SIGKILL)
        for stream in streams:
            with pytest.raises(errors.StreamBroken):
                await within(anext(stream), "the stream to break after SIGKILL")
        # Nothing listens there any more: refused at once, not after the ack timeout (or, if the
        # kernel was still tearing the listener down, accepted and then reset: same error).
        with pytest.raises(errors.InstanceUnavailable):
            await within(caller.call(address, "r-after", b""), "the refusal", 1.5)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        await caller.close()


async def test_caller_cancel_and_caller_disconnect_free_the_handler(
    planes: tuple[TcpRequestPlane, TcpRequestPlane],
) -> None:
    server, caller = planes
    handler = Forever()
    served = await server.serve(NAME, handler)
    stream = await caller.call(served.transport or "", "r-cancel", b"")
    assert await within(anext(stream), "first") == b"first"
    await within(handler.started.wait(), "the handler to start")
    await stream.aclose()
    await within(handler.cancelled.wait(), "the handler to be cancelled")
    assert handler.ctx is not None and handler.ctx.is_cancelled()
    while served.inflight:
        await within(asyncio.sleep(0.01), "tick")

    # A caller that vanishes (its plane closes the connection) frees its handlers too.
    other = TcpRequestPlane(ack_timeout_s=2.0)
    second = Forever()
    served2 = await server.serve(NAME + "b", second)
    await anext(await other.call(served2.transport or "", "r-gone", b""))
    await other.close()
    await within(second.cancelled.wait(), "the orphaned handler to be cancelled")


async def test_caller_cancelled_while_waiting_for_ack_cancels_remotely(
    planes: tuple[TcpRequestPlane, TcpRequestPlane],
) -> None:
    server, caller = planes
    handler = Forever()
    served = await server.serve(NAME, handler)
    task = asyncio.create_task(caller.call(served.transport or "", "r", b""))
    await within(handler.started.wait(), "the handler to start")
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await within(handler.cancelled.wait(), "the remote cancel")
    else:  # the ack won the race: closing the stream is the caller's job then
        await task.result().aclose()
        await within(handler.cancelled.wait(), "the remote cancel")


async def test_unserved_name_and_silent_server_are_unavailable(planes: tuple[TcpRequestPlane, TcpRequestPlane]) -> None:
    server, caller = planes
    served = await server.serve(NAME, count_to)
    host, port, _ = parse_address(served.transport or "")
    with pytest.raises(errors.InstanceUnavailable, match="no server at"):
        await within(caller.call(transport_address(host, port, "ns.backend.generate.dead"), "r", b""), "refusal", 1.0)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never acks

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    quick = TcpRequestPlane(ack_timeout_s=0.3)
    try:
        with pytest.raises(errors.InstanceUnavailable, match="did not accept"):
            await within(quick.call(transport_address("127.0.0.1", listener.sockets[0].getsockname()[1], NAME), "r", b""), "ack timeout")
    finally:
        await quick.close()
        listener.close()


async def test_stop_sends_stream_broken_and_refuses_new_calls(planes: tuple[TcpRequestPlane, TcpRequestPlane]) -> None:
    server, caller = planes
    handler = Forever()
    served = await server.serve(NAME, handler)
    stream = await caller.call(served.transport or "", "r", b"")
    assert await anext(stream) == b"first"
    await within(handler.started.wait(), "start")
    await served.stop()
    with pytest.raises(errors.StreamBroken, match="stopped during the request"):
        await within(anext(stream), "the stopped frame")
    with pytest.raises(errors.InstanceUnavailable):
        await caller.call(served.transport or "", "r2", b"")


async def test_reconnects_after_worker_restarts_on_new_and_same_port() -> None:
    caller = TcpRequestPlane(ack_timeout_s=2.0)
    first = TcpRequestPlane(ack_timeout_s=2.0, advertise_host="127.0.0.1")
    try:
        old = await first.serve(NAME, count_to)
        assert [x async for x in await caller.call(old.transport or "", "a", b"2")] == [b"0", b"1"]
        _, port, _ = parse_address(old.transport or "")
        await first.close()  # the worker exits

        with pytest.raises(errors.InstanceUnavailable):
            await within(caller.call(old.transport or "", "b", b"1"), "refusal")
        moved = TcpRequestPlane(ack_timeout_s=2.0, advertise_host="127.0.0.1")
        new = await moved.serve(NAME, count_to)
        assert new.transport != old.transport
        assert [x async for x in await caller.call(new.transport or "", "c", b"3")] == [b"0", b"1", b"2"]
        await moved.close()

        same = TcpRequestPlane(ack_timeout_s=2.0, advertise_host="127.0.0.1", port=port)
        again = await same.serve(NAME, count_to)
        assert again.transport == old.transport
        assert [x async for x in await caller.call(again.transport or "", "d", b"1")] == [b"0"]
        await same.close()
    finally:
        await caller.close()
        await first.close()


# -------------------------------------------------------------------------- runtime + selection


def test_request_plane_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    def parse(argv: list[str]) -> RuntimeConfig:
        parser = argparse.ArgumentParser()
        add_runtime_args(parser, "distributed")
        return RuntimeConfig.from_args(parser.parse_args(argv))

    monkeypatch.delenv("DYN_REQUEST_PLANE", raising=False)
    monkeypatch.delenv("DYN_REQUEST_PLANE_HOST", raising=False)
    assert parse([]).request_plane == DEFAULT_REQUEST_PLANE == RuntimeConfig().request_plane
    assert parse([]).request_plane_host is None
    config = parse(["--request-plane", "tcp", "--request-plane-host", "10.1.2.3", "--request-plane-port", "4100"])
    assert (config.request_plane, config.request_plane_host, config.request_plane_port) == ("tcp", "10.1.2.3", 4100)
    monkeypatch.setenv("DYN_REQUEST_PLANE", "tcp")
    monkeypatch.setenv("DYN_REQUEST_PLANE_HOST", "127.0.0.2")
    assert (parse([]).request_plane, parse([]).request_plane_host) == ("tcp", "127.0.0.2")
    monkeypatch.setenv("DYN_REQUEST_PLANE", "nats")
    assert parse([]).request_plane == "nats"
    # Secured NATS keeps requests on NATS unless tcp is asked for explicitly.
    monkeypatch.delenv("DYN_REQUEST_PLANE")
    assert parse(["--nats-tls-ca", "/ca.pem"]).request_plane == "nats"
    assert parse(["--nats-server", "nats://u:p@h:4222"]).request_plane == "nats"
    assert parse(["--nats-tls-ca", "/ca.pem", "--request-plane", "tcp"]).request_plane == "tcp"


async def test_tcp_worker_registers_its_address_and_nats_callers_reach_it(nats_server: str, etcd_server: str) -> None:
    """A tcp worker's discovery record holds host:port; a caller configured for nats still
    reaches it (and a tcp caller reaches a nats worker): mixed fleets work during a rollout."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    base = RuntimeConfig(
        backend="distributed", nats_server=nats_server, etcd_endpoints=(etcd_server,), namespace=ns,
        lease_ttl_s=2.0, request_ack_timeout_s=2.0, request_plane="nats", request_plane_host="127.0.0.1",
    )
    tcp_cfg = dataclasses.replace(base, request_plane="tcp")
    async with await Runtime.create(tcp_cfg) as tcp_rt, await Runtime.create(base) as nats_rt:
        assert isinstance(tcp_rt.requests, SchemeRequestPlane)
        tcp_served = await tcp_rt.endpoint("backend", "generate").serve(count_to)
        nats_served = await nats_rt.endpoint("backend", "generate").serve(count_to)
        for rt in (tcp_rt, nats_rt):
            async with await rt.endpoint("backend", "generate").client() as client:
                await client.wait_for_instances(WAIT_S, at_least=2)
                assert client.instances[tcp_served.instance_id].transport.startswith("tcp://127.0.0.1:")
                assert not client.instances[nats_served.instance_id].transport.startswith("tcp://")
                for instance_id in (tcp_served.instance_id, nats_served.instance_id):
                    stream = await client.generate(b"3", instance_id, f"r{instance_id:x}")
                    assert [x async for x in stream] == [b"0", b"1", b"2"]
