"""The response store on the embedded runtime's discovery: records under per-bucket leases,
expiry at exactly the TTL on read, leases revoked once every record under them is due, and a
second store on the same discovery (another replica) reading what the first wrote, also after
the first is gone. On etcd: tests/integration/test_etcd_discovery.py."""

from __future__ import annotations

import pytest

from dynamo.runtime.embedded import EmbeddedDiscovery
from frontend.responses.schemas import MessageItem, OutputText, ResponseObject, StoredResponse, TextConfigOut, TextFormatOut, ReasoningOut
from frontend.responses.store import BUCKETS_PER_TTL, DiscoveryResponseStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def record(response_id: str, store: DiscoveryResponseStore) -> StoredResponse:
    response = ResponseObject(
        id=response_id, created_at=0, model="tiny", status="completed",
        output=[MessageItem(role="assistant", content=[OutputText("hi there")], id="msg_1", status="completed")],
        tools=[], tool_choice="auto", parallel_tool_calls=True, text=TextConfigOut(TextFormatOut("text")),
        reasoning=ReasoningOut(), store=True,
    )
    return StoredResponse(response=response, input=[MessageItem(role="user", content="hello")], expires_at_s=store.expires_at())


def leases(discovery: EmbeddedDiscovery) -> int:
    return len(discovery._leases)


async def test_put_get_delete_and_another_replica_reads_it() -> None:
    discovery, clock = EmbeddedDiscovery(), Clock()
    a = DiscoveryResponseStore(discovery, "ns", ttl_s=100, clock=clock)
    b = DiscoveryResponseStore(discovery, "ns", ttl_s=100, clock=clock)
    await a.put(record("resp_1", a))
    got = await b.get("resp_1")
    assert got is not None and got.response.id == "resp_1"
    assert [type(i).__name__ for i in got.conversation()] == ["MessageItem", "MessageItem"]
    assert await DiscoveryResponseStore(discovery, "other", ttl_s=100, clock=clock).get("resp_1") is None
    assert await b.get("resp_10") is None  # the key is exact, not a prefix
    assert await b.delete("resp_1") and not await b.delete("resp_1")
    assert await a.get("resp_1") is None


async def test_one_lease_per_bucket_and_expiry() -> None:
    discovery, clock = EmbeddedDiscovery(), Clock()
    store = DiscoveryResponseStore(discovery, "ns", ttl_s=100, clock=clock)
    bucket_s = 100 / BUCKETS_PER_TTL
    clock.now = 1_000_000.0  # a bucket boundary (multiple of 25)
    for i in range(5):
        await store.put(record(f"resp_{i}", store))
    assert leases(discovery) == 1  # five records, one lease
    clock.now += bucket_s
    await store.put(record("resp_late", store))
    assert leases(discovery) == 2
    clock.now = 1_000_000.0 + 100 - 1
    assert await store.get("resp_0") is not None
    clock.now = 1_000_000.0 + 100  # exactly the TTL: gone for readers
    assert await store.get("resp_0") is None
    assert await store.get("resp_late") is not None
    # The first bucket's lease goes once its last possible record is ttl old.
    clock.now = 1_000_000.0 + bucket_s + 100
    await store.get("resp_late")
    assert leases(discovery) == 1 and "v1/responses/ns/resp_0" not in await discovery.get_prefix("v1/responses/")
    clock.now += bucket_s
    await store.get("resp_late")
    assert leases(discovery) == 0 and not await discovery.get_prefix("v1/responses/")


async def test_records_outlive_their_writer() -> None:
    # A rolling update replaces frontends: what one stored stays readable by the others.
    discovery, clock = EmbeddedDiscovery(), Clock()
    writer = DiscoveryResponseStore(discovery, "ns", ttl_s=100, clock=clock)
    await writer.put(record("resp_1", writer))
    del writer
    await discovery.close()
    reader = DiscoveryResponseStore(discovery, "ns", ttl_s=100, clock=clock)
    assert await reader.get("resp_1") is not None


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DiscoveryResponseStore(EmbeddedDiscovery(), "ns", ttl_s=0)


async def test_concurrent_first_writes_share_the_bucket_lease() -> None:
    import asyncio

    discovery, clock = EmbeddedDiscovery(), Clock()
    store = DiscoveryResponseStore(discovery, "ns", ttl_s=100, clock=clock)
    await asyncio.gather(*(store.put(record(f"resp_{i}", store)) for i in range(8)))
    assert leases(discovery) == 1
