"""One contract, four backends: every test here runs on the embedded backend, on the hub (a
parent's embedded planes served to runtimes that reach them over loopback TCP, as
`dynamo.serve --worker-processes` children do) and on the distributed one (real nats-server and
etcd) with requests over NATS and over direct TCP, so all keep the same semantics."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from dynamo import errors
from dynamo.config import RuntimeConfig
from dynamo.runtime import RequestContext, Runtime, WatchEvent
from dynamo.runtime.hub import HubServer, hub_child_runtime, hub_parent_runtime

pytestmark = pytest.mark.integration

WAIT_S = 5.0


class Backend:
    """Makes runtimes that share one deployment (one namespace), as separate processes would."""

    def __init__(self, config: RuntimeConfig, name: str) -> None:
        self.config = config
        self.name = name
        self._hub: HubServer | None = None
        self._runtimes: list[Runtime] = []
        self._root: Runtime | None = None

    async def runtime(self) -> Runtime:
        if self.config.backend == "distributed":
            rt = await Runtime.create(self.config)
        elif self.name == "hub":
            if self._hub is None:  # the first is the parent, every later one a child of its own
                rt, self._hub = hub_parent_runtime(self.config)
                await self._hub.start()
            else:
                rt = await hub_child_runtime(self.config, self._hub.address)
        elif self._root is None:
            rt = self._root = await Runtime.create(self.config)
        else:
            rt = self._root.sibling()  # embedded: same in-process planes, a lease of its own
        self._runtimes.append(rt)
        return rt

    async def close(self) -> None:
        for rt in reversed(self._runtimes):
            await rt.shutdown()
        if self._hub is not None:
            await self._hub.close()


@pytest.fixture(params=["embedded", "hub", "distributed-nats", "distributed-tcp"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    if request.param.startswith("distributed"):
        config = RuntimeConfig(
            backend="distributed",
            nats_server=request.getfixturevalue("nats_server"),
            etcd_endpoints=(request.getfixturevalue("etcd_server"),),
            namespace=namespace,
            lease_ttl_s=2.0,
            request_ack_timeout_s=2.0,
            request_plane="tcp" if request.param.endswith("tcp") else "nats",
            request_plane_host="127.0.0.1",
        )
    else:
        config = RuntimeConfig(backend="embedded", namespace=namespace, lease_ttl_s=2.0)
    b = Backend(config, "hub" if request.param == "hub" else config.backend)
    try:
        yield b
    finally:
        await b.close()


async def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Bounded polling for a condition that has no event of its own."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


async def within(awaitable: Awaitable[object], what: str, timeout_s: float = WAIT_S) -> object:
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


class Forever:
    """A handler that yields one item and then blocks until cancelled, recording what it saw."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.ctx: RequestContext | None = None

    async def __call__(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        self.ctx = ctx
        yield b"first"
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield b"never"


async def count_to(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    for i in range(int(payload)):
        yield str(i).encode()


# ------------------------------------------------------------------------------------ requests


async def test_stream_arrives_in_order(backend: Backend) -> None:
    server, caller = await backend.runtime(), await backend.runtime()
    served = await server.endpoint("backend", "generate").serve(count_to)
    async with await caller.endpoint("backend", "generate").client() as client:
        assert await client.wait_for_instances(WAIT_S) == [served.instance_id]

        async def one(n: int) -> list[bytes]:
            stream = await client.generate(str(n).encode(), served.instance_id, f"req-{n}")
            return [item async for item in stream]

        results = await within(asyncio.gather(*(one(n) for n in range(1, 41))), "40 concurrent streams")
        assert results == [[str(i).encode() for i in range(n)] for n in range(1, 41)]
    await wait_for(lambda: served.inflight == 0, "handlers to finish")


async def test_handler_errors_arrive_typed(backend: Backend) -> None:
    async def failing(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"partial"
        if payload == b"typed":
            raise errors.InvalidRequest("temperature must be >= 0")
        raise ValueError("engine exploded")

    server, caller = await backend.runtime(), await backend.runtime()
    served = await server.endpoint("backend", "generate").serve(failing)
    async with await caller.endpoint("backend", "generate").client() as client:
        await client.wait_for_instances(WAIT_S)

        stream = await client.generate(b"typed", served.instance_id, "r-typed")
        assert await anext(stream) == b"partial"
        with pytest.raises(errors.InvalidRequest, match="temperature must be >= 0"):
            await anext(stream)

        stream = await client.generate(b"bug", served.instance_id, "r-bug")
        assert await anext(stream) == b"partial"
        with pytest.raises(errors.DynamoError, match="ValueError: engine exploded") as info:
            await anext(stream)
        assert info.value.code == "internal_error"


async def test_caller_cancel_reaches_handler(backend: Backend) -> None:
    handler = Forever()
    server, caller = await backend.runtime(), await backend.runtime()
    served = await server.endpoint("backend", "generate").serve(handler)
    async with await caller.endpoint("backend", "generate").client() as client:
        await client.wait_for_instances(WAIT_S)
        stream = await client.generate(b"", served.instance_id, "r-cancel")
        assert await anext(stream) == b"first"
        await within(handler.started.wait(), "handler to start")
        await stream.aclose()
        await within(handler.cancelled.wait(), "handler to see CancelledError")
        assert handler.ctx is not None and handler.ctx.is_cancelled()
        await wait_for(lambda: served.inflight == 0, "the cancelled handler to be dropped")
        with pytest.raises(StopAsyncIteration):
            await anext(stream)


async def test_unserved_address_is_unavailable_fast(backend: Backend) -> None:
    caller = await backend.runtime()
    address = f"{backend.config.namespace}.backend.generate.{0xDEAD:x}"
    start = time.monotonic()
    with pytest.raises(errors.InstanceUnavailable):
        await caller.requests.call(address, "r-nobody", b"")
    assert time.monotonic() - start < 1.0


async def test_served_stop_cancels_inflight(backend: Backend) -> None:
    handler = Forever()
    server, caller = await backend.runtime(), await backend.runtime()
    served = await server.endpoint("backend", "generate").serve(handler)
    async with await caller.endpoint("backend", "generate").client() as client:
        await client.wait_for_instances(WAIT_S)
        stream = await client.generate(b"", served.instance_id, "r-stop")
        assert await anext(stream) == b"first"
        await within(handler.started.wait(), "handler to start")
        await served.stop()
        assert handler.cancelled.is_set()
        assert served.inflight == 0
        # Stopping deregisters, so the caller's stream fails instead of hanging.
        with pytest.raises(errors.StreamBroken):
            await within(anext(stream), "the stream to fail")
        with pytest.raises(errors.InstanceUnavailable):
            await caller.requests.call(served.served.address, "r-after-stop", b"")  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------- discovery


async def test_deregistration_removes_instance_and_breaks_its_streams(backend: Backend) -> None:
    handler = Forever()
    server, caller = await backend.runtime(), await backend.runtime()
    served = await server.endpoint("backend", "generate").serve(handler)
    async with await caller.endpoint("backend", "generate").client() as client:
        changes: list[tuple[int, bool]] = []
        client.on_change(lambda instance_id, added: changes.append((instance_id, added)))
        assert await client.wait_for_instances(WAIT_S) == [served.instance_id]
        stream = await client.generate(b"", served.instance_id, "r-dereg")
        assert await anext(stream) == b"first"

        await served.deregister()
        with pytest.raises(errors.StreamBroken):
            await within(anext(stream), "the open stream to break")
        assert client.instance_ids() == []
        assert changes[-1] == (served.instance_id, False)


async def test_lease_revoke_removes_instance_and_breaks_its_streams(backend: Backend) -> None:
    handler = Forever()
    server, caller = await backend.runtime(), await backend.runtime()
    served = await server.endpoint("backend", "generate").serve(handler)
    async with await caller.endpoint("backend", "generate").client() as client:
        await client.wait_for_instances(WAIT_S)
        stream = await client.generate(b"", served.instance_id, "r-revoke")
        assert await anext(stream) == b"first"

        await server.discovery.revoke_lease(await server.primary_lease())
        with pytest.raises(errors.StreamBroken, match=f"{served.instance_id:x}"):
            await within(anext(stream), "the open stream to break")
        assert client.instance_ids() == []
        assert await caller.discovery.get_prefix(served.key) == {}


async def test_instances_of_two_servers_are_both_seen(backend: Backend) -> None:
    a, b, caller = await backend.runtime(), await backend.runtime(), await backend.runtime()
    served_a = await a.endpoint("backend", "generate").serve(count_to)
    async with await caller.endpoint("backend", "generate").client() as client:
        assert await client.wait_for_instances(WAIT_S) == [served_a.instance_id]
        served_b = await b.endpoint("backend", "generate").serve(count_to)
        ids = await client.wait_for_instances(WAIT_S, at_least=2)
        assert sorted(ids) == sorted([served_a.instance_id, served_b.instance_id])
        for instance_id in ids:
            stream = await client.generate(b"3", instance_id, f"r-{instance_id:x}")
            assert [x async for x in stream] == [b"0", b"1", b"2"]


async def test_put_under_unknown_lease_fails(backend: Backend) -> None:
    rt = await backend.runtime()
    lease_id = await rt.discovery.create_lease(2.0)
    await rt.discovery.revoke_lease(lease_id)
    with pytest.raises(errors.DynamoError, match="does not exist"):
        await rt.discovery.put(f"{backend.config.namespace}/k", b"v", lease_id=lease_id)


async def test_watch_yields_snapshot_then_changes_in_order(backend: Backend) -> None:
    writer, reader = await backend.runtime(), await backend.runtime()
    prefix = f"{backend.config.namespace}/watched/"
    await writer.discovery.put(prefix + "b", b"2")
    await writer.discovery.put(prefix + "a", b"1")
    await writer.discovery.put(f"{backend.config.namespace}/elsewhere", b"x")

    watch = await reader.discovery.watch_prefix(prefix)
    try:
        await writer.discovery.put(prefix + "c", b"3")
        await writer.discovery.delete(prefix + "a")
        await writer.discovery.put(prefix + "b", b"22")
        lease_id = await writer.discovery.create_lease(2.0)
        await writer.discovery.put(prefix + "leased", b"L", lease_id=lease_id)
        await writer.discovery.revoke_lease(lease_id)

        expected = [
            WatchEvent("put", prefix + "a", b"1"),
            WatchEvent("put", prefix + "b", b"2"),
            WatchEvent("put", prefix + "c", b"3"),
            WatchEvent("delete", prefix + "a"),
            WatchEvent("put", prefix + "b", b"22"),
            WatchEvent("put", prefix + "leased", b"L"),
            WatchEvent("delete", prefix + "leased"),
        ]
        got = [await within(anext(watch), f"watch event {i}") for i in range(len(expected))]
        assert got == expected
        assert await reader.discovery.get_prefix(prefix) == {prefix + "b": b"22", prefix + "c": b"3"}
    finally:
        await watch.close()
    with pytest.raises(StopAsyncIteration):
        await within(anext(watch), "the closed watch to end")


# -------------------------------------------------------------------------------------- events


async def test_events_exact_and_wildcard_subjects(backend: Backend) -> None:
    publisher, subscriber = await backend.runtime(), await backend.runtime()
    ns = backend.config.namespace
    kv = await subscriber.events.subscribe(f"{ns}.kv_events.>")
    load = await subscriber.events.subscribe(f"{ns}.load")
    try:
        await publisher.events.publish(f"{ns}.kv_events.w1", b"e1")
        await publisher.events.publish(f"{ns}.kv_events", b"not below the prefix")
        await publisher.events.publish(f"{ns}.other", b"unrelated")
        await publisher.events.publish(f"{ns}.kv_events.w2.deep", b"e2")
        await publisher.events.publish(f"{ns}.load", b"l1")
        await publisher.events.publish(f"{ns}.load.sub", b"not exact")
        await publisher.events.publish(f"{ns}.kv_events.w1", b"e3")
        await publisher.events.publish(f"{ns}.load", b"l2")

        # One publisher's events arrive in order, so the unmatched ones, sent in between,
        # would have shown up before the later matched ones.
        assert [await within(anext(kv), "kv event") for _ in range(3)] == [b"e1", b"e2", b"e3"]
        assert [await within(anext(load), "load event") for _ in range(2)] == [b"l1", b"l2"]
    finally:
        await kv.close()
        await load.close()
    with pytest.raises(StopAsyncIteration):
        await within(anext(kv), "the closed subscription to end")
