"""TLS to the infrastructure, for real: nats-server with TLS and etcd with TLS and client
certificates (mTLS), from a throwaway CA (trustme). A runtime given the CA (and etcd's client
certificate) registers, discovers and serves a request over NATS; one without them fails with
a clear, bounded error naming the server."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynamo import errors
from dynamo.config import RuntimeConfig
from dynamo.runtime import RequestContext, Runtime
from dynamo.runtime.distributed import connect_distributed
from tests.infra import ServerProcess, start_etcd, start_nats

trustme = pytest.importorskip("trustme")

pytestmark = pytest.mark.integration


@dataclass
class Secured:
    nats: ServerProcess
    etcd: ServerProcess
    ca: str  # PEM of the CA that signed both servers and the client
    client_cert: str
    client_key: str

    def config(self, **overrides: object) -> RuntimeConfig:
        settings: dict[str, object] = dict(
            backend="distributed",
            nats_server=self.nats.url,
            nats_tls_ca=self.ca,
            etcd_endpoints=(self.etcd.url,),
            etcd_ca=self.ca,
            etcd_cert=self.client_cert,
            etcd_key=self.client_key,
            namespace=f"tls{uuid.uuid4().hex[:8]}",
            request_plane_host="127.0.0.1",  # should a test serve on the TCP plane: loopback
        )
        settings.update(overrides)
        return RuntimeConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tmp: Path = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("dynamo-client")
    paths = {name: str(tmp / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
    ca.cert_pem.write_to_path(paths["ca.pem"])
    server.cert_chain_pems[0].write_to_path(paths["server.pem"])
    server.private_key_pem.write_to_path(paths["server.key"])
    client.cert_chain_pems[0].write_to_path(paths["client.pem"])
    client.private_key_pem.write_to_path(paths["client.key"])
    nats = start_nats(extra_args=["--tls", "--tlscert", paths["server.pem"], "--tlskey", paths["server.key"]])
    try:
        etcd = start_etcd(tls=(paths["server.pem"], paths["server.key"], paths["ca.pem"]))
    except BaseException:
        nats.stop()
        raise
    yield Secured(nats, etcd, paths["ca.pem"], paths["client.pem"], paths["client.key"])
    etcd.stop()
    nats.stop()


async def echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    for part in payload.split(b" "):
        yield part


async def test_runtime_serves_over_tls_nats_and_mtls_etcd(secured: Secured) -> None:
    # Requests on NATS, as the entry points choose when NATS is secured (the TCP plane has no TLS).
    config = secured.config(request_plane="nats")
    async with await Runtime.create(config) as server, await Runtime.create(config) as caller:
        assert await server.primary_lease() > 0  # etcd over mTLS: a lease was granted
        served = await server.endpoint("backend", "generate").serve(echo)
        async with await caller.endpoint("backend", "generate").client() as client:
            assert await client.wait_for_instances(10.0) == [served.instance_id]  # discovery via etcd
            stream = await client.generate(b"over tls", served.instance_id, "r-tls")
            assert [item async for item in stream] == [b"over", b"tls"]  # request and stream via NATS


async def test_nats_without_the_ca_fails_clearly(secured: Secured) -> None:
    config = secured.config(nats_tls_ca=None)
    start = time.monotonic()
    with pytest.raises(errors.DynamoError, match="NATS"):
        await connect_distributed(config, connect_timeout_s=2.0)
    assert time.monotonic() - start < 10.0


async def test_etcd_without_a_client_certificate_fails_clearly(secured: Secured) -> None:
    config = secured.config(etcd_cert=None, etcd_key=None)
    start = time.monotonic()
    with pytest.raises(errors.DynamoError, match="etcd"):
        await connect_distributed(config, connect_timeout_s=2.0)
    assert time.monotonic() - start < 10.0
