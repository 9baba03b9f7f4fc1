"""connect_distributed: a runtime on real servers, and clear, bounded failures naming the
unreachable server when one is down."""

from __future__ import annotations

import time

import pytest

from dynamo import errors
from dynamo.config import RuntimeConfig
from dynamo.runtime import Runtime
from dynamo.runtime.distributed import connect_distributed
from tests.infra import free_port

pytestmark = pytest.mark.integration


async def test_runtime_create_distributed(nats_server: str, etcd_server: str) -> None:
    config = RuntimeConfig(
        backend="distributed", nats_server=f" {nats_server} ,", etcd_endpoints=(etcd_server,), namespace="connect"
    )
    async with await Runtime.create(config) as rt:
        lease_id = await rt.primary_lease()
        assert lease_id > 0


async def test_unreachable_etcd_is_named(nats_server: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = RuntimeConfig(backend="distributed", nats_server=nats_server, etcd_endpoints=(dead,))
    start = time.monotonic()
    with pytest.raises(errors.DynamoError, match=f"etcd at {dead}"):
        await connect_distributed(config, connect_timeout_s=1.0)
    assert time.monotonic() - start < 3.0


async def test_unreachable_nats_is_named(etcd_server: str) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    config = RuntimeConfig(backend="distributed", nats_server=dead, etcd_endpoints=(etcd_server,))
    with pytest.raises(errors.DynamoError, match=f"NATS at {dead}"):
        await connect_distributed(config, connect_timeout_s=1.0)
