"""A runtime whose etcd lease is lost re-registers everything under a new lease with the same
instance id, and a client watching the endpoint sees it come back; URLs with credentials are
redacted from what gets logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from dynamo import errors
from dynamo.config import RuntimeConfig, redact_url
from dynamo.runtime import RequestContext, Runtime
from dynamo.runtime.distributed import connect_distributed
from tests.infra import free_port

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
