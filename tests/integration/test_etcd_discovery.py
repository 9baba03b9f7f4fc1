"""EtcdDiscovery against a real etcd: leases that expire when their keep-alive stops, the
lease-lost hook, gap-free watches under concurrent writes, restarts and clear connect errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from dynamo import errors
from dynamo.runtime.etcd_discovery import EtcdDiscovery, parse_endpoint
from dynamo.runtime.planes import Watch, WatchEvent
from tests.infra import ServerProcess, free_port, start_etcd

pytestmark = pytest.mark.integration

TTL_S = 1.0  # tests/infra.py runs etcd with short raft timings, so 1 s is allowed


@pytest.fixture
async def discovery(etcd_server: str) -> AsyncIterator[EtcdDiscovery]:
    d = await EtcdDiscovery.connect(etcd_server, timeout_s=2.0)
    try:
        yield d
    finally:
        await d.close()


@pytest.fixture
def prefix() -> str:
    return f"test/{uuid.uuid4().hex[:10]}/"


async def next_event(watch: Watch, timeout_s: float = 5.0) -> WatchEvent:
    try:
        return await asyncio.wait_for(anext(watch), timeout_s)
    except TimeoutError:
        raise AssertionError(f"no watch event within {timeout_s}s") from None


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from dynamo.runtime.etcd_discovery import EtcdDiscovery

    async def main() -> None:
        d = await EtcdDiscovery.connect(sys.argv[1], timeout_s=2.0)
        lease_id = await d.create_lease(float(sys.argv[3]))
        await d.put(sys.argv[2], b"held", lease_id=lease_id)
        print(lease_id, flush=True)
        await asyncio.Event().wait()  # keep the lease alive until killed

    asyncio.run(main())
    """
)


@pytest.fixture
def lease_holder(etcd_server: str, prefix: str) -> Iterator[subprocess.Popen[str]]:
    """A separate process holding a TTL_S lease on `<prefix>holder`, killed by the test."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, etcd_server, prefix + "holder", str(TTL_S)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_parse_endpoint() -> None:
    assert parse_endpoint("http://10.0.0.5:2379") == ("10.0.0.5", 2379)
    assert parse_endpoint("etcd:12379") == ("etcd", 12379)
    assert parse_endpoint("http://etcd") == ("etcd", 2379)


async def test_lease_expires_when_its_holder_dies(
    discovery: EtcdDiscovery, prefix: str, lease_holder: subprocess.Popen[str]
) -> None:
    watch = await discovery.watch_prefix(prefix)
    try:
        # Our own lease, granted before the holder's and kept alive by this process.
        ours = await discovery.create_lease(TTL_S)
        await discovery.put(prefix + "ours", b"alive", lease_id=ours)
        assert await next_event(watch) == WatchEvent("put", prefix + "ours", b"alive")

        assert lease_holder.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(lease_holder.stdout.readline), 10)
        assert int(line)
        assert await next_event(watch) == WatchEvent("put", prefix + "holder", b"held")

        lease_holder.kill()
        killed_at = time.monotonic()
        assert await next_event(watch, timeout_s=TTL_S + 3.0) == WatchEvent("delete", prefix + "holder")
        # etcd checks expiry every 500 ms, and the TTL is counted from the last refresh.
        assert time.monotonic() - killed_at < TTL_S + 1.5

        # Ours was granted earlier, with the same TTL, so only its keep-alive saved it.
        assert await discovery.get_prefix(prefix) == {prefix + "ours": b"alive"}
    finally:
        await watch.close()


async def test_lease_lost_hook_fires(discovery: EtcdDiscovery, etcd_server: str, prefix: str) -> None:
    lost: asyncio.Queue[int] = asyncio.Queue()

    async def on_lease_lost(lease_id: int) -> None:
        lost.put_nowait(lease_id)

    discovery.on_lease_lost = on_lease_lost
    lease_id = await discovery.create_lease(TTL_S)
    await discovery.put(prefix + "k", b"v", lease_id=lease_id)

    # Another client revokes it, as etcd would on expiry during an outage.
    other = await EtcdDiscovery.connect(etcd_server, timeout_s=2.0)
    try:
        await other.revoke_lease(lease_id)
    finally:
        await other.close()
    assert await asyncio.wait_for(lost.get(), TTL_S + 3.0) == lease_id
    assert await discovery.get_prefix(prefix) == {}
    await discovery.revoke_lease(lease_id)  # already gone: not an error


async def test_watch_has_no_gap_and_no_duplicate_under_concurrent_writes(
    discovery: EtcdDiscovery, etcd_server: str, prefix: str
) -> None:
    writer = await EtcdDiscovery.connect(etcd_server, timeout_s=2.0)
    total = 300
    halfway = asyncio.Event()

    async def write_all() -> None:
        for i in range(total):
            await writer.put(f"{prefix}{i:05d}", str(i).encode())
            if i == total // 3:
                halfway.set()

    task = asyncio.create_task(write_all())
    try:
        await asyncio.wait_for(halfway.wait(), 10)
        watch = await discovery.watch_prefix(prefix)  # opened while writes are in flight
        try:
            seen: list[str] = []
            while len(seen) < total:
                event = await next_event(watch)
                assert event.kind == "put"
                seen.append(event.key)
            assert seen == [f"{prefix}{i:05d}" for i in range(total)]
        finally:
            await watch.close()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await writer.close()


async def test_close_revokes_leases_so_keys_vanish_at_once(etcd_server: str, prefix: str) -> None:
    observer = await EtcdDiscovery.connect(etcd_server, timeout_s=2.0)
    try:
        watch = await observer.watch_prefix(prefix)
        d = await EtcdDiscovery.connect(etcd_server, timeout_s=2.0)
        lease_id = await d.create_lease(30.0)  # far longer than this test
        await d.put(prefix + "k", b"v", lease_id=lease_id)
        assert (await next_event(watch)).kind == "put"
        await d.close()
        assert await next_event(watch, timeout_s=2.0) == WatchEvent("delete", prefix + "k")
    finally:
        await observer.close()


async def test_lease_not_kept_alive_outlives_close_and_expires_at_its_ttl(etcd_server: str, prefix: str) -> None:
    # The response store's leases: its records stay for their TTL whatever becomes of the writer.
    observer = await EtcdDiscovery.connect(etcd_server, timeout_s=2.0)
    d = await EtcdDiscovery.connect(etcd_server, timeout_s=2.0)
    try:
        watch = await observer.watch_prefix(prefix)
        long_lease = await d.create_lease(300.0, keep_alive=False)
        await d.put(prefix + "kept", b"v", lease_id=long_lease)
        short_lease = await d.create_lease(TTL_S, keep_alive=False)
        await d.put(prefix + "short", b"v", lease_id=short_lease)
        assert {(await next_event(watch)).key for _ in range(2)} == {prefix + "kept", prefix + "short"}
        # Not refreshed, the short lease expires although its holder is alive...
        assert await next_event(watch, timeout_s=15.0) == WatchEvent("delete", prefix + "short")
        await d.close()
        # ...and closing the holder leaves the long one be.
        assert prefix + "kept" in await observer.get_prefix(prefix)
        await observer.revoke_lease(long_lease)
    finally:
        await d.close()
        await observer.close()


async def test_connect_to_unreachable_etcd_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(errors.DynamoError, match=f"etcd at {url}"):
        await EtcdDiscovery.connect(url, timeout_s=1.0)
    assert time.monotonic() - start < 3.0


@pytest.fixture
def private_etcd() -> Iterator[ServerProcess]:
    proc = start_etcd()
    try:
        yield proc
    finally:
        proc.stop()


async def test_watch_resumes_after_etcd_restart(private_etcd: ServerProcess, prefix: str) -> None:
    d = await EtcdDiscovery.connect(private_etcd.url, timeout_s=2.0)
    try:
        watch = await d.watch_prefix(prefix)
        await d.put(prefix + "before", b"1")
        assert await next_event(watch) == WatchEvent("put", prefix + "before", b"1")

        private_etcd.kill()
        private_etcd.start()  # same ports and data directory

        other = await EtcdDiscovery.connect(private_etcd.url, timeout_s=2.0)
        try:
            await other.put(prefix + "after", b"2")
        finally:
            await other.close()
        assert await next_event(watch, timeout_s=10.0) == WatchEvent("put", prefix + "after", b"2")
        await watch.close()
    finally:
        await d.close()
