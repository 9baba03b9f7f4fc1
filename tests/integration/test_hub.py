"""The hub's own guarantees, beyond the runtime contract it shares with every backend
(test_runtime_contract.py): a child's kept-alive leases last exactly as long as its connection,
events cross between processes in order, and a child learns at once that its parent is gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dynamo import errors
from dynamo.runtime.embedded import EmbeddedDiscovery, EmbeddedEventPlane
from dynamo.runtime.hub import HubClient, HubDiscovery, HubEventPlane, HubServer
from dynamo.runtime.planes import WatchEvent

pytestmark = pytest.mark.integration

WAIT_S = 5.0


@pytest.fixture
async def hub() -> AsyncIterator[HubServer]:
    async with HubServer(EmbeddedDiscovery(), EmbeddedEventPlane()) as server:
        yield server


async def test_a_dropped_child_loses_its_kept_alive_keys_at_once(hub: HubServer) -> None:
    client = await HubClient.connect(hub.address)
    child = HubDiscovery(client)
    kept = await child.create_lease(10.0)
    timed = await child.create_lease(10.0, keep_alive=False)
    await child.put("k/kept", b"1", lease_id=kept)
    await child.put("k/timed", b"2", lease_id=timed)
    watch = await hub.discovery.watch_prefix("k/")
    seen = [await asyncio.wait_for(anext(watch), WAIT_S) for _ in range(2)]
    assert {e.key for e in seen} == {"k/kept", "k/timed"}
    # As if the child had been killed: its end of the connection just goes.
    assert client._conn is not None
    client._conn.close(errors.StreamBroken("killed"))
    assert await asyncio.wait_for(anext(watch), WAIT_S) == WatchEvent("delete", "k/kept")
    # A lease not kept alive outlives its holder, as on etcd (until its TTL there).
    assert await hub.discovery.get_prefix("k/") == {"k/timed": b"2"}
    await watch.close()


async def test_events_cross_processes_in_order(hub: HubServer) -> None:
    publisher_client, subscriber_client = await HubClient.connect(hub.address), await HubClient.connect(hub.address)
    publisher, subscriber = HubEventPlane(publisher_client), HubEventPlane(subscriber_client)
    in_parent = await hub.events.subscribe("kv.>")
    in_child = await subscriber.subscribe("kv.>")
    other = await subscriber.subscribe("load")
    for i in range(500):
        await publisher.publish(f"kv.w{i % 3}", str(i).encode())
    await hub.events.publish("load", b"from the parent")
    for sub in (in_parent, in_child):
        got = [await asyncio.wait_for(anext(sub), WAIT_S) for _ in range(500)]
        assert got == [str(i).encode() for i in range(500)]
    assert await asyncio.wait_for(anext(other), WAIT_S) == b"from the parent"
    await in_parent.close()
    await in_child.close()
    await other.close()
    await publisher.close()
    await subscriber.close()


async def test_a_child_learns_its_parent_is_gone(hub: HubServer) -> None:
    client = await HubClient.connect(hub.address)
    discovery = HubDiscovery(client)
    watch = await discovery.watch_prefix("anything/")
    await hub.close()
    await asyncio.wait_for(discovery.lost.wait(), WAIT_S)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(watch), WAIT_S)
    with pytest.raises(errors.DynamoError, match="hub"):
        await discovery.put("k", b"v")


async def test_an_unreachable_hub_fails_with_its_address() -> None:
    with pytest.raises(errors.DynamoError, match="127.0.0.1:1"):
        await HubClient.connect("127.0.0.1:1", timeout_s=2.0)
