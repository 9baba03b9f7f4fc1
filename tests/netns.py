"""A multi-host test rig on one machine: network namespaces ("hosts") joined by veth pairs on a
private subnet the rig picks, with every link between two hosts its own cable that a test can
cut and restore.

Topology. Every host gets one address (`10.X.Y.k/32`) and, for every other host, an interface
`to-<peer>` with a /32 route to that peer through it: a full mesh of point-to-point links. The
test process itself is a host too (`test`, in the namespace it runs in), so it reaches every
frontend, worker and server directly; its own links are never cut. Each link runs through a
"wire" namespace where it is two bridges joined by a middle veth pair:

    host A: to-B == pa<i> [bridge ba<i>] xa<i> == xb<i> [bridge bb<i>] pb<i> == host B: to-A

`cut(a, b)` sets `xa<i>` down, `heal(a, b)` sets it up. Both hosts keep their carrier, routes
and neighbour entries, so a cut behaves like a cable pulled between two switches: packets are
dropped silently both ways (no reset, no "no route to host"); established TCP connections see
nothing until their own timers fire, new connections time out; after the heal retransmissions
go through. (Setting a host's own end down instead would flush its routes and fail its sends at
once, which no real partition does.)

Everything lives in namespaces named `dyrig<pid>-<host>` (the test host's interfaces are the
peers of wire-namespace veths, so they vanish with it). `close()` kills every process started in
the rig and deletes its namespaces, also when a test failed; a rig left behind by a crashed run
(its pid no longer alive) is removed by the next one, by that name prefix.

Needs root and `ip` with netns support (iproute2); `require_netns()` skips with the reason
otherwise. No `tc netem`: a link is either up or cut.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest

PREFIX = "dyrig"
TEST_HOST = "test"
_NAME = re.compile(r"^[a-z][a-z0-9]{0,4}$")  # interface names have 15 characters at most


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _ip_batch(lines: Iterable[str], netns: str | None = None) -> None:
    lines = list(lines)
    if not lines:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".ip", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        _ip(*(("-n", netns) if netns else ()), "-batch", f.name)
    finally:
        os.unlink(f.name)


def netns_unavailable() -> str | None:
    """Why the rig cannot run here, or None."""
    if os.geteuid() != 0:
        return "the network-namespace rig needs root (ip netns add)"
    if shutil.which("ip") is None:
        return "the network-namespace rig needs iproute2's `ip`"
    probe = f"{PREFIX}{os.getpid()}-probe"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` fails here: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def require_netns() -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace(ns: str, grace_s: float = 5.0) -> None:
    """SIGTERM every process in `ns`, SIGKILL what is left after `grace_s`, delete `ns`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
    _ip("netns", "del", ns, check=False)


def clean_leftovers() -> list[str]:
    """Delete the namespaces (and kill the processes) of rigs whose test run is gone."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        found = re.match(rf"^{PREFIX}(\d+)-", name)
        if found and not _alive(int(found.group(1))):
            _kill_namespace(name, grace_s=1.0)
            removed.append(name)
    return removed


def _pick_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that no route or address on this machine touches, chosen from
    the pid so that concurrent runs do not collide."""
    used = _ip("-4", "route", "show", "table", "all", check=False).stdout + _ip("-4", "addr", check=False).stdout
    pid = os.getpid()
    for attempt in range(2048):
        k = (pid + attempt) % 2048
        net = ipaddress.IPv4Network(f"10.{200 + k // 256}.{k % 256}.0/24")
        if f"10.{200 + k // 256}.{k % 256}." not in used:
            return net
    raise RuntimeError("no free /24 in 10.200.0.0/13 for the rig")


@dataclass
class Link:
    index: int
    a: str
    b: str
    up: bool = True


@dataclass
class Rig:
    """Hosts `names` (plus `test`, the test process's own) in a full mesh; see the module doc."""

    names: Sequence[str]
    subnet: ipaddress.IPv4Network = field(default_factory=_pick_subnet)
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    addresses: dict[str, str] = field(default_factory=dict)
    links: dict[frozenset[str], Link] = field(default_factory=dict)
    built: list[str] = field(default_factory=list)  # namespaces created, for close()

    def __post_init__(self) -> None:
        hosts = [TEST_HOST, *self.names]
        for name in hosts:
            if not _NAME.match(name):
                raise ValueError(f"host name {name!r}: 1-5 lowercase letters and digits, starting with a letter")
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"host names must be distinct: {hosts}")
        host_addrs = list(self.subnet.hosts())
        self.addresses = {name: str(host_addrs[i]) for i, name in enumerate(hosts)}
        pairs = [(a, b) for i, a in enumerate(hosts) for b in hosts[i + 1 :]]
        self.links = {frozenset(p): Link(i, *p) for i, p in enumerate(pairs)}

    # --------------------------------------------------------------------------- building

    @property
    def wire(self) -> str:
        return f"{self.tag}-wire"

    def netns(self, host: str) -> str | None:
        """The host's namespace; None for the test host (this process's own)."""
        return None if host == TEST_HOST else f"{self.tag}-{host}"

    def wrap(self, host: str) -> list[str]:
        """The command prefix that runs a program on `host`."""
        ns = self.netns(host)
        return [] if ns is None else ["ip", "netns", "exec", ns]

    def interface(self, host: str, peer: str) -> str:
        """`host`'s interface towards `peer`. In the test process's namespace the names carry
        the pid, so that they collide neither with the machine's own nor with another run's."""
        return f"dy{os.getpid()}-{peer}"[:15] if host == TEST_HOST else f"to-{peer}"

    def build(self) -> Rig:
        clean_leftovers()
        try:
            for host in [None, *self.names]:
                ns = self.wire if host is None else self.netns(host)
                assert ns is not None
                _ip("netns", "add", ns)
                self.built.append(ns)
                _ip("-n", ns, "link", "set", "dev", "lo", "up")
            self._build_links()
        except BaseException:
            self.close()
            raise
        return self

    def _build_links(self) -> None:
        wire: list[str] = []
        per_host: dict[str, list[str]] = {h: [] for h in self.addresses}
        me = str(os.getpid())
        for link in self.links.values():
            i = link.index
            for side, host, peer in (("a", link.a, link.b), ("b", link.b, link.a)):
                ns = self.netns(host) or me  # `netns PID`: the test process's namespace
                wire.append(f"link add name p{side}{i} type veth peer name {self.interface(host, peer)} netns {ns}")
            wire += [
                f"link add name xa{i} type veth peer name xb{i}",
                f"link add name ba{i} type bridge",
                f"link add name bb{i} type bridge",
            ]
            for port, bridge in ((f"pa{i}", f"ba{i}"), (f"xa{i}", f"ba{i}"), (f"pb{i}", f"bb{i}"), (f"xb{i}", f"bb{i}")):
                wire.append(f"link set dev {port} master {bridge} up")
            wire += [f"link set dev ba{i} up", f"link set dev bb{i} up"]
            for host, peer in ((link.a, link.b), (link.b, link.a)):
                dev, mine, theirs = self.interface(host, peer), self.addresses[host], self.addresses[peer]
                per_host[host] += [
                    f"addr add {mine}/32 dev {dev}",
                    f"link set dev {dev} up",
                    f"route add {theirs}/32 dev {dev} src {mine}",
                ]
        _ip_batch(wire, self.wire)
        for host, lines in per_host.items():
            _ip_batch(lines, self.netns(host))

    # ------------------------------------------------------------------------------ links

    def link(self, a: str, b: str) -> Link:
        try:
            return self.links[frozenset((a, b))]
        except KeyError:
            raise KeyError(f"no link between {a!r} and {b!r}") from None

    def cut(self, a: str, b: str) -> None:
        """Drop every packet between hosts a and b, both ways, silently."""
        link = self.link(a, b)
        _ip("-n", self.wire, "link", "set", "dev", f"xa{link.index}", "down")
        link.up = False

    def heal(self, a: str, b: str) -> None:
        link = self.link(a, b)
        _ip("-n", self.wire, "link", "set", "dev", f"xa{link.index}", "up")
        link.up = True

    def cut_many(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Cut several links in one `ip` call (so they go down together)."""
        pairs = list(pairs)
        _ip_batch([f"link set dev xa{self.link(a, b).index} down" for a, b in pairs], self.wire)
        for a, b in pairs:
            self.link(a, b).up = False

    def heal_many(self, pairs: Iterable[tuple[str, str]]) -> None:
        pairs = list(pairs)
        _ip_batch([f"link set dev xa{self.link(a, b).index} up" for a, b in pairs], self.wire)
        for a, b in pairs:
            self.link(a, b).up = True

    def heal_all(self) -> None:
        self.heal_many((link.a, link.b) for link in self.links.values() if not link.up)

    # ---------------------------------------------------------------------------- cleanup

    def close(self) -> None:
        """Kill every process in the rig's namespaces and delete them (idempotent); returns
        once the test host's interfaces are gone too (the kernel removes them asynchronously)."""
        for ns in reversed(self.built):
            _kill_namespace(ns)
        self.built.clear()
        mine = f"dy{os.getpid()}-"
        deadline = time.monotonic() + 10
        while True:
            left = [line.split()[0].split("@")[0] for line in _ip("-br", "link", check=False).stdout.splitlines()
                    if line.startswith(mine)]
            if not left:
                return
            if time.monotonic() > deadline:
                for name in left:
                    _ip("link", "del", "dev", name, check=False)
                return
            time.sleep(0.05)

    def __enter__(self) -> Rig:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Rig", "TEST_HOST", "clean_leftovers", "netns_unavailable", "require_netns"]
