"""A runtime whose etcd lease is lost re-registers everything under a new lease with the same
instance id, and a client watching the endpoint sees it come back; one that callers cannot reach
(its NATS link is cut while it serves on NATS) withdraws its instance from discovery, so its
callers' streams end, and returns after the heal; URLs with credentials are redacted from what
gets logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import pytest

from dynamo import errors
from dynamo.config import RuntimeConfig, redact_url
from dynamo.runtime import RequestContext, Runtime
from dynamo.runtime.distributed import connect_distributed
from dynamo.runtime import runtime as runtime_module
from tests.infra import LinkToNats, ServerProcess, free_port, start_nats

pytestmark = pytest.mark.integration


async def _echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield payload


async def test_lost_lease_is_regranted_and_registrations_reput(
    nats_server: str, etcd_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = RuntimeConfig(
        backend="distributed", nats_server=nats_server, etcd_endpoints=(etcd_server,),
        namespace=f"relet{free_port()}", lease_ttl_s=1.0, request_plane_host="127.0.0.1",
    )
    caplog.set_level(logging.INFO)
    async with await Runtime.create(config) as server, await Runtime.create(config) as caller:
        served = await server.endpoint("worker", "generate").serve(_echo)
        instance_id = served.instance_id
        old_lease = await server.primary_lease()
        client = await caller.endpoint("worker", "generate").client()
        try:
            await client.wait_for_instances(timeout_s=5)
            gone = asyncio.Event()
            back = asyncio.Event()
            client.on_change(lambda i, up: (back if up else gone).set() if i == instance_id else None)
            # What an etcd outage longer than the TTL does: the lease and its keys vanish.
            await server.discovery._client.revoke_lease(old_lease)  # type: ignore[attr-defined]
            await asyncio.wait_for(gone.wait(), 5)
            await asyncio.wait_for(back.wait(), 5)  # re-put within a keep-alive interval
            assert await server.primary_lease() != old_lease
            assert await server.instance_id() == instance_id
            stream = await client.generate(b"still here", instance_id, "r1")
            assert [item async for item in stream] == [b"still here"]
        finally:
            await client.close()
    assert any("re-registered" in r.getMessage() for r in caplog.records)


async def test_an_instance_callers_cannot_reach_is_withdrawn_until_they_can(
    etcd_server: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's link to NATS is cut for longer than the withdrawal grace while it streams:
    callers cannot tell a silent worker from a slow one, but the worker finds its connection
    dead, withdraws its instance, and the caller's stream ends (StreamBroken: it may migrate)
    instead of waiting for the outage to end. After the heal it is back in discovery, under
    the same instance id, and serves."""
    monkeypatch.setattr(runtime_module, "WITHDRAW_AFTER_S", 1.0)
    caplog.set_level(logging.INFO)
    nats: ServerProcess = start_nats()
    link = LinkToNats(nats.url)
    namespace = f"unreachable{free_port()}"

    def config(nats_url: str) -> RuntimeConfig:
        return RuntimeConfig(
            backend="distributed", nats_server=nats_url, etcd_endpoints=(etcd_server,), request_plane="nats",
            namespace=namespace, lease_ttl_s=2.0,
        )

    async def waits(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"first"
        if payload == b"wait":
            await asyncio.Event().wait()

    def logged(text: str) -> bool:
        return any(text in r.getMessage() for r in caplog.records)

    async def until(condition: Callable[[], bool]) -> None:
        while not condition():
            await asyncio.sleep(0.01)

    try:
        worker_config = config(await link.start())
        async with await Runtime.create(worker_config) as server, await Runtime.create(config(nats.url)) as caller:
            served = await server.endpoint("worker", "generate").serve(waits)
            client = await caller.endpoint("worker", "generate").client()
            try:
                await client.wait_for_instances(timeout_s=5)
                gone, back = asyncio.Event(), asyncio.Event()
                client.on_change(lambda i, up: (back if up else gone).set() if i == served.instance_id else None)
                stream = await client.generate(b"wait", served.instance_id, "r-cut")
                assert await anext(stream) == b"first"

                link.cut = True
                # Found dead by the pings (4-6 s), then the grace: the stream ends, not hangs.
                with pytest.raises(errors.StreamBroken, match="went away"):
                    await asyncio.wait_for(anext(stream), 20)
                assert gone.is_set()
                await asyncio.wait_for(until(lambda: logged("withdrawn from discovery")), 10)
                link.cut = False
                await asyncio.wait_for(back.wait(), 20)
                again = await client.generate(b"", served.instance_id, "r-after")
                assert [item async for item in again] == [b"first"]
                # The caller may see the key before the worker has the answer to its put: the
                # log line follows that answer.
                await asyncio.wait_for(until(lambda: logged("back in discovery")), 10)
            finally:
                await client.close()
    finally:
        await link.close()
        nats.stop()


def test_redact_url_hides_credentials() -> None:
    assert redact_url("nats://alice:s3cret@10.0.0.1:4222") == "nats://***@10.0.0.1:4222"
    assert redact_url("a nats://u:p@h:1, tls://t@h2:2") == "a nats://***@h:1, tls://***@h2:2"
    assert redact_url("http://127.0.0.1:2379") == "http://127.0.0.1:2379"


async def test_unreachable_nats_with_credentials_is_named_without_them(etcd_server: str) -> None:
    port = free_port()
    config = RuntimeConfig(
        backend="distributed", nats_server=f"nats://bob:hunter2@127.0.0.1:{port}", etcd_endpoints=(etcd_server,)
    )
    with pytest.raises(errors.DynamoError) as info:
        await connect_distributed(config, connect_timeout_s=1.0)
    assert "hunter2" not in str(info.value)
    assert f"nats://***@127.0.0.1:{port}" in str(info.value)
