"""Guard: processes the test helpers start keep their traffic on 127.0.0.0/8.

Left to their defaults, workers listen on every interface and advertise the host's
default-route address (the right thing across hosts, the wrong one in a test). `base_env`
(tests/e2e/procs.py) pins every host a process binds or advertises to loopback; this test starts
one of each kind of process through it (aggregated, prefill and decode workers on the TCP
request plane, a KV-routing frontend, `dynamo.serve`), sends requests through them (a
disaggregated one moves KV blocks between the workers), and then checks what they registered
in etcd, what they listen on and what they are connected to: all loopback.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dynamo.runtime.etcd_discovery import EtcdDiscovery
from dynamo.runtime.tcp_plane import SCHEME, parse_address
from dynamo.wire import INSTANCE_CODEC
from tests.e2e.procs import (
    LOOPBACK_ENV,
    TINY_MODEL,
    Stack,
    base_env,
    free_port,
    http_ok,
    in_networks,
    tcp_sockets,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MODEL = "tiny"
MOCKER = ("--engine", "mocker", "--model", TINY_MODEL, "--served-model-name", MODEL, "--speedup-ratio", "100")


def test_base_env_pins_every_host_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LOOPBACK_ENV:
        monkeypatch.setenv(name, "0.0.0.0")  # whatever the caller's environment says
    env = base_env()
    assert {name: env[name] for name in LOOPBACK_ENV} == dict.fromkeys(LOOPBACK_ENV, "127.0.0.1")
    assert base_env(DYN_HTTP_HOST="10.0.0.1")["DYN_HTTP_HOST"] == "10.0.0.1"  # a rig's own address


@pytest.fixture(scope="module")
def fleet(nats_server: str, etcd_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str, str, str]]:
    tmp: Path = tmp_path_factory.mktemp("loopback")
    namespace = f"loop{free_port()}"
    # A long lease: prefill and decode workers import the KV transfer stack (torch) inside
    # their event loop after their lease is granted, which on a loaded machine outlasts the
    # default 10 s TTL; that startup defect is not what this test is about.
    env = base_env(NATS_SERVER=nats_server, ETCD_ENDPOINTS=etcd_server, DYN_NAMESPACE=namespace,
                   DYN_REQUEST_PLANE="tcp", DYN_LEASE_TTL_S="60")
    s = Stack(tmp, env)
    ports = {name: free_port() for name in ("frontend", "serve", "agg", "prefill", "decode")}
    s.start("agg", "dynamo.worker", *MOCKER, "--system-port", str(ports["agg"]))
    s.start("prefill", "dynamo.worker", *MOCKER, "--role", "prefill",
            "--system-port", str(ports["prefill"]))
    s.start("decode", "dynamo.worker", *MOCKER, "--role", "decode",
            "--disagg-min-prefill-tokens", "1", "--system-port", str(ports["decode"]))
    s.start("frontend", "dynamo.frontend", "--http-port", str(ports["frontend"]), "--router-mode", "kv")
    s.start("serve", "dynamo.serve", *MOCKER, "--http-port", str(ports["serve"]),
            "--system-port", str(free_port()))
    frontend, serve = f"http://127.0.0.1:{ports['frontend']}", f"http://127.0.0.1:{ports['serve']}"
    try:
        for name in ("agg", "prefill", "decode"):
            wait_until(lambda: http_ok(f"http://127.0.0.1:{ports[name]}/ready"), 90, f"{name} worker ready")
        wait_until(lambda: http_ok(f"{frontend}/ready") and http_ok(f"{serve}/ready"), 90, "frontends ready")
    except TimeoutError:
        logs = "\n".join(f"--- {p.name}\n{p.log()}" for p in s.procs)
        s.stop_all()
        raise AssertionError(f"fleet did not come up:\n{logs}") from None
    yield s, frontend, serve, namespace
    s.stop_all()


async def _registered(etcd_server: str, namespace: str) -> dict[str, bytes]:
    discovery = await EtcdDiscovery.connect(etcd_server)
    try:
        return {k: v for k, v in (await discovery.get_prefix("v1/")).items() if f"/{namespace}/" in k}
    finally:
        await discovery.close()


def test_every_address_registered_listened_on_or_connected_to_is_loopback(
    fleet: tuple[Stack, str, str, str], etcd_server: str
) -> None:
    stack, frontend, serve, namespace = fleet
    body = {"model": MODEL, "prompt": "loopback " * 40, "max_tokens": 8}
    for base in (frontend, serve):
        for _ in range(4):  # the KV router spreads these over the aggregated and decode workers
            resp = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
            assert resp.status_code == 200, resp.text

    records = asyncio.run(_registered(etcd_server, namespace))
    transports = [INSTANCE_CODEC.decode(v).transport for k, v in records.items() if k.startswith("v1/instances/")]
    assert len(transports) >= 3, records  # agg, prefill (two endpoints), decode
    for transport in transports:
        assert transport.startswith(SCHEME), transport
        host, _, _ = parse_address(transport)
        assert in_networks(host, []), f"a worker advertises {transport}, off loopback"

    seen = 0
    for proc in stack.procs:
        assert proc.popen.poll() is None, f"{proc.name} exited:\n{proc.log()}"
        for state, local, remote in tcp_sockets(proc.popen.pid):
            seen += 1
            assert in_networks(local[0], []), f"{proc.name} has a {state} socket on {local}"
            if state != "LISTEN":
                assert in_networks(remote[0], []), f"{proc.name} is connected to {remote}"
    assert seen >= 3 * len(stack.procs), "expected listeners and connections on every process"
    assert os.path.exists(f"/proc/{stack.procs[0].popen.pid}/net/tcp")
