"""Network partitions between real hosts (network namespaces, tests/netns.py): nats-server,
etcd, two frontends (migration on / off) and three mocker workers, each on its own host and
address, while links between them are cut and restored.

Every test drives concurrent streaming clients from the test host (whose links are never cut),
counts each stream as complete (every token, `finish_reason=length`, `[DONE]`), cleanly errored
(an SSE error event then `[DONE]`, or a 5xx before the stream) or lost (anything else: truncated,
a transport error, or still open at the bound), prints the counts, the longest pause a stream
saw and the time until the fleet's view converged after the heal, and asserts lost == 0.
Waits are bounded waits on observable conditions (a process's /ready or /metrics, etcd's
contents, the streams' own progress); the only timed thing is how long a link stays cut.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from dynamo.runtime.etcd_discovery import EtcdDiscovery
from dynamo.runtime.tcp_plane import parse_address
from dynamo.wire import INSTANCE_CODEC
from tests.e2e.procs import (
    TINY_MODEL,
    Proc,
    Stack,
    host_env,
    in_networks,
    metric_sum,
    rigged_stack,
    tcp_sockets,
    wait_until,
)
from tests.infra import ServerProcess
from tests.netns import PREFIX, Rig, clean_leftovers, require_netns

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

MODEL = "tiny"
WORKERS = ("w1", "w2", "w3")
HOSTS = ("nats", "etcd", "fe", "fe0", *WORKERS)
HTTP_PORT, SYSTEM_PORT = 8000, 9100
LEASE_TTL_S = 2.0
ACK_TIMEOUT_S = 2.0
STREAMS = 48  # per frontend
MAX_TOKENS = 300  # ~2.1 s a stream at 7 ms a step, unloaded
STREAM_BOUND_S = 60.0  # a stream still open this long after the fault is lost (hung)


@dataclass
class Fleet:
    rig: Rig
    stack: Stack
    nats: ServerProcess
    etcd: ServerProcess
    plane: str
    env: dict[str, str]
    workers: dict[str, Proc] = field(default_factory=dict)

    def address(self, host: str) -> str:
        return self.rig.addresses[host]

    @property
    def migrating(self) -> str:
        return f"http://{self.address('fe')}:{HTTP_PORT}"

    @property
    def strict(self) -> str:
        return f"http://{self.address('fe0')}:{HTTP_PORT}"

    def metrics_url(self, host: str) -> str:
        return f"http://{self.address(host)}:{SYSTEM_PORT}/metrics"

    def host_env(self, host: str) -> dict[str, str]:
        return {**self.env, **host_env(self.address(host))}

    def start_worker(self, host: str) -> Proc:
        proc = self.stack.start(
            host, "dynamo.worker", "--engine", "mocker", "--model", TINY_MODEL, "--served-model-name", MODEL,
            "--speedup-ratio", "1", "--graceful-shutdown-timeout-s", "1", "--system-port", str(SYSTEM_PORT),
            wrap=self.rig.wrap(host), env=self.host_env(host),
        )
        self.workers[host] = proc
        return proc

    def instance_id(self, host: str) -> int:
        """The worker's instance id, from its log line `worker <id> serves ...`."""
        proc = self.workers[host]
        found: list[int] = []

        def logged() -> bool:
            m = re.search(r"worker ([0-9a-f]+) serves", proc.log_path.read_text(errors="replace"))
            if m:
                found.append(int(m.group(1), 16))
            return bool(m) or proc.popen.poll() is not None

        wait_until(logged, 60, f"{host} to serve")
        assert found, f"{host} exited:\n{proc.log()}"
        return found[0]

    def instances(self, base: str) -> set[int]:
        try:
            body = httpx.get(f"{base}/ready", timeout=1.0).json()
        except (httpx.HTTPError, ValueError):
            return set()
        return next((set(m["instances"]) for m in body.get("models", []) if m.get("name") == MODEL), set())

    def wait_for_view(self, base: str, hosts: tuple[str, ...], timeout_s: float = 60) -> float:
        """Wait until frontend `base` sees exactly the workers on `hosts`; seconds it took."""
        want = {self.instance_id(h) for h in hosts}
        t0 = time.monotonic()
        wait_until(lambda: self.instances(base) == want, timeout_s, f"{base} to see {sorted(hosts)}", 0.02)
        return time.monotonic() - t0

    def served(self, host: str) -> float:
        """Requests the worker on `host` finished, by its /metrics (0 when unreachable)."""
        return metric_sum(self.metrics_url(host), "dynamo_worker_requests_total") or 0.0

    def logs(self) -> str:
        parts = [f"--- {p.name}\n{p.log()}" for p in self.stack.procs]
        return "\n".join([*parts, f"--- nats\n{self.nats.log()}", f"--- etcd\n{self.etcd.log()}"])


@pytest.fixture(scope="module", params=["tcp", "nats"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    plane: str = request.param
    with rigged_stack(
        HOSTS, tmp_path_factory.mktemp(f"partitions-{plane}"), DYN_NAMESPACE="partitions",
        DYN_LEASE_TTL_S=str(LEASE_TTL_S), DYN_REQUEST_ACK_TIMEOUT_S=str(ACK_TIMEOUT_S), DYN_REQUEST_PLANE=plane,
    ) as rigged:
        f = Fleet(rigged.rig, rigged.stack, rigged.nats, rigged.etcd, plane, rigged.env)
        for host in WORKERS:
            f.start_worker(host)
        for host, limit in (("fe", "3"), ("fe0", "0")):
            rigged.stack.start(host, "dynamo.frontend", "--http-port", str(HTTP_PORT), "--migration-limit", limit,
                               "--router-mode", "round-robin", wrap=rigged.rig.wrap(host), env=f.host_env(host))
        try:
            for base in (f.migrating, f.strict):
                f.wait_for_view(base, WORKERS, 90)
        except (TimeoutError, AssertionError):
            raise AssertionError(f"fleet did not come up:\n{f.logs()}") from None
        yield f


# ------------------------------------------------------------------------------------ load


@dataclass
class Outcome:
    complete: int = 0
    clean_errors: int = 0
    lost: list[str] = field(default_factory=list)
    codes: set[str] = field(default_factory=set)
    max_pause_s: float = 0.0  # the longest wait between two chunks of one stream
    wall_s: float = 0.0

    def line(self, name: str) -> str:
        return (f"[{name}] {self.complete + self.clean_errors + len(self.lost)} streams in {self.wall_s:.1f}s: "
                f"{self.complete} complete, {self.clean_errors} cleanly errored {sorted(self.codes)}, "
                f"{len(self.lost)} lost {self.lost[:3]}; longest pause {self.max_pause_s:.1f}s")


async def _stream(client: httpx.AsyncClient, base: str, index: int, out: Outcome, settled: Callable[[], None],
                  max_tokens: int) -> None:
    """One stream, counted in `out`; `settled()` once it has its first token or has ended."""
    try:
        await _counted_stream(client, base, index, out, settled, max_tokens)
    finally:
        settled()


async def _counted_stream(client: httpx.AsyncClient, base: str, index: int, out: Outcome,
                          started: Callable[[], None], max_tokens: int) -> None:
    body = {"model": MODEL, "prompt": f"partition {index}: count slowly", "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    tokens = chunks = 0
    reason = error = None
    done = False
    last = time.monotonic()
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode()[:200]
                if resp.status_code in (429, 502, 503, 504):
                    out.clean_errors += 1
                    out.codes.add(str(resp.status_code))
                else:
                    out.lost.append(f"HTTP {resp.status_code}: {text}")
                return
            async for line in resp.aiter_lines():
                now = time.monotonic()
                out.max_pause_s = max(out.max_pause_s, now - last)
                last = now
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
                    for choice in event.get("choices", []):
                        chunks += 1
                        if chunks == 1:
                            started()
                        reason = choice.get("finish_reason") or reason
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        out.lost.append(f"transport error {exc!r}")
        return
    if error is not None and done:
        out.clean_errors += 1
        out.codes.add(str(error.get("code")))
    elif done and reason == "length" and tokens == max_tokens:
        out.complete += 1
    else:
        out.lost.append(f"done={done} reason={reason} tokens={tokens} error={error}")


async def load(bases: list[str], fault: Callable[[], object] = lambda: None, streams: int = STREAMS,
               max_tokens: int = MAX_TOKENS) -> list[Outcome]:
    """`streams` concurrent streams of `max_tokens` on each frontend in `bases`; `fault()` runs
    in a thread once every stream has its first token; then every stream must end within
    STREAM_BOUND_S."""
    outs = [Outcome() for _ in bases]
    total = streams * len(bases)
    first = asyncio.Event()
    count = [0]

    def settler() -> Callable[[], None]:
        once = [False]

        def settled() -> None:
            if not once[0]:
                once[0] = True
                count[0] += 1
                if count[0] >= total:
                    first.set()

        return settled

    limits = httpx.Limits(max_connections=total * 2, max_keepalive_connections=total * 2)
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(STREAM_BOUND_S + 30), limits=limits, trust_env=False) as client:
        tasks = [asyncio.create_task(_stream(client, base, i, out, settler(), max_tokens))
                 for base, out in zip(bases, outs) for i in range(streams)]
        # Every stream has its first token (or has already ended): the fault starts.
        await asyncio.wait_for(first.wait(), 30)
        await asyncio.to_thread(fault)
        _, pending = await asyncio.wait(tasks, timeout=STREAM_BOUND_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.monotonic() - t0
    for out in outs:
        out.wall_s = wall
    for task, (base, out) in zip(tasks, [(b, o) for b, o in zip(bases, outs) for _ in range(streams)]):
        if task.cancelled():
            out.lost.append(f"hung past {STREAM_BOUND_S}s on {base}")
    return outs


def report(name: str, fleet: Fleet, outs: list[Outcome], **figures: float) -> None:
    extra = ", ".join(f"{k} {v:.1f}s" for k, v in figures.items())
    for label, out in zip(("migration on", "migration off"), outs):
        print(f"\n{out.line(f'{name}, {label}, {fleet.plane} plane')}")
    if extra:
        print(f"[{name}, {fleet.plane} plane] {extra}")


async def served_everywhere(fleet: Fleet) -> None:
    """Both frontends serve a batch whole, and every worker takes part in it."""
    before = {h: fleet.served(h) for h in WORKERS}
    outs = await load([fleet.migrating, fleet.strict], streams=12)
    for out in outs:
        assert out.lost == [] and out.complete == 12, out
    after = {h: fleet.served(h) for h in WORKERS}
    assert all(after[h] > before[h] for h in WORKERS), (before, after)


# ----------------------------------------------------------------------------------- tests


async def test_every_process_binds_and_advertises_its_own_host(fleet: Fleet) -> None:
    """What the workers registered names their own host's address; every process listens on
    its host's address (or loopback) and talks to addresses of the rig's subnet only."""
    discovery = await EtcdDiscovery.connect(fleet.etcd.url)
    try:
        records = await discovery.get_prefix("v1/instances/partitions/")
    finally:
        await discovery.close()
    by_address = {addr: host for host, addr in fleet.rig.addresses.items()}
    transports = [INSTANCE_CODEC.decode(v).transport for v in records.values()]
    assert len(transports) == len(WORKERS), records
    if fleet.plane == "tcp":
        assert sorted(by_address.get(parse_address(t)[0], t) for t in transports) == sorted(WORKERS), transports
    subnet = [fleet.rig.subnet]
    for proc in fleet.stack.procs:
        own = fleet.address(proc.name)
        for state, local, remote in tcp_sockets(proc.popen.pid):
            assert local[0] == own or in_networks(local[0], []), f"{proc.name} ({own}) has a {state} socket on {local}"
            if state != "LISTEN":
                assert in_networks(remote[0], subnet), f"{proc.name} is connected to {remote}"


async def test_frontend_cut_from_a_worker_mid_stream(fleet: Fleet) -> None:
    """Both frontends lose their link to w1 once every stream has its first token; w1 keeps
    its links to etcd and NATS (it stays registered). On the TCP plane the frontends must notice
    the silent connection themselves: the migrating one moves w1's streams to w2/w3, the strict
    one ends them with an error; no stream may hang. On the NATS plane requests do not use that
    link: nothing happens."""
    cut = [("fe", "w1"), ("fe0", "w1")]
    t_cut: list[float] = []

    def fault() -> None:
        fleet.rig.cut_many(cut)
        t_cut.append(time.monotonic())

    try:
        outs = await load([fleet.migrating, fleet.strict], fault)
    finally:
        fleet.rig.heal_many(cut)
    t_heal = time.monotonic()
    migrating, strict = outs
    report("frontend-worker link cut mid-stream", fleet, outs)
    assert migrating.lost == [] and strict.lost == [], outs
    assert migrating.complete == STREAMS, migrating
    assert strict.complete + strict.clean_errors == STREAMS, strict
    if fleet.plane == "nats":
        assert strict.complete == STREAMS, strict
    # After the heal: w1 takes requests from both frontends again.
    await served_everywhere(fleet)
    print(f"[frontend-worker heal, {fleet.plane} plane] serving on all three workers {time.monotonic() - t_heal:.1f}s after the heal")


def _quiet(fleet: Fleet, host: str) -> bool:
    """The worker has no request in flight and no KV block in use (its /metrics say so)."""
    url = fleet.metrics_url(host)
    return all(metric_sum(url, name) == 0 for name in
               ("dynamo_worker_inflight_requests", "dynamo_worker_requests_active", "dynamo_worker_kv_blocks_active"))


async def test_worker_cut_from_etcd(fleet: Fleet) -> None:
    """w1 loses etcd but keeps its links to the frontends and NATS. Its lease expires (TTL 2 s):
    both frontends forget it, the migrating one moves its streams to w2/w3, the strict one ends
    them cleanly, and both cancel them on w1, which ends with nothing in flight. When the link
    returns w1 finds its lease gone and re-registers under the same instance id."""
    cut = [("w1", "etcd")]
    forgot: list[float] = []
    fronts = (fleet.migrating, fleet.strict)

    def fault() -> None:
        t0 = time.monotonic()
        fleet.rig.cut_many(cut)
        for base in fronts:
            fleet.wait_for_view(base, ("w2", "w3"), 30)
        forgot.append(time.monotonic() - t0)

    try:
        # Streams of ~7 s: the lease expires (2-3 s) while w1's are running.
        outs = await load(list(fronts), fault, max_tokens=1000)
        wait_until(lambda: _quiet(fleet, "w1"), 20, "w1 to end its cancelled streams and free their KV blocks")
    finally:
        t_heal = time.monotonic()
        fleet.rig.heal_many(cut)
    for base in fronts:
        fleet.wait_for_view(base, WORKERS, 60)
    back_s = time.monotonic() - t_heal
    report("worker-etcd link cut", fleet, outs, **{"forgotten by both frontends after": forgot[0],
                                                   "back in both frontends' view after the heal": back_s})
    migrating, strict = outs
    assert migrating.lost == [] and strict.lost == [], outs
    assert migrating.complete == STREAMS, migrating
    assert strict.clean_errors > 0 and strict.complete + strict.clean_errors == STREAMS, strict
    assert "re-registered" in fleet.workers["w1"].log_path.read_text(errors="replace")
    await served_everywhere(fleet)


async def test_worker_cut_from_nats(fleet: Fleet) -> None:
    """w1 loses NATS (8 s) but keeps etcd and the frontends. On the TCP plane NATS carries only
    w1's KV events and load reports: no stream notices. On the NATS plane w1's requests and
    frames ride on it: the frontends cannot tell a silent worker from a slow one, so w1's
    streams pause for the cut; w1 detects its dead connection (pings), reconnects after the
    heal, and what its old connection held is lost: those streams end with a sequence gap,
    migrated or cleanly errored. A stream whose last frames were lost has no later frame to
    show the gap: w1 tells its caller after the reconnect (nats_planes.SUSPECT_S). None may
    hang."""
    cut = [("w1", "nats")]
    w1 = fleet.workers["w1"]

    def logged(text: str) -> Callable[[], bool]:
        return lambda: text in w1.log_path.read_text(errors="replace")

    def fault() -> None:
        fleet.rig.cut_many(cut)
        wait_until(logged("NATS disconnected"), 20, "w1 to find its NATS connection dead")
        time.sleep(2.0)  # the cut's duration (the fault itself), not a synchronisation
        fleet.rig.heal_many(cut)

    t0 = time.monotonic()
    try:
        outs = await load([fleet.migrating, fleet.strict], fault)
    finally:
        fleet.rig.heal_many(cut)
    wait_until(logged("NATS reconnected"), 30, "w1 to reconnect to NATS")
    report("worker-NATS link cut", fleet, outs, **{"w1 reconnected": time.monotonic() - t0})
    migrating, strict = outs
    assert migrating.lost == [] and strict.lost == [], outs
    assert migrating.complete == STREAMS, migrating
    if fleet.plane == "tcp":
        assert strict.complete == STREAMS, strict
    else:
        assert strict.complete + strict.clean_errors == STREAMS, strict
    await served_everywhere(fleet)


async def test_frontends_cut_from_etcd(fleet: Fleet) -> None:
    """Both frontends lose etcd. They keep serving from the instances they know; meanwhile w3
    is drained away (SIGTERM: it deregisters and exits), which they cannot see: requests they
    send to it are refused at once and go to w1/w2. After the heal their watches resume and
    drop w3; a new w3 is then seen by both."""
    cut = [("fe", "etcd"), ("fe0", "etcd")]
    fronts = (fleet.migrating, fleet.strict)
    w3 = fleet.workers["w3"]
    fleet.rig.cut_many(cut)
    try:
        w3.popen.terminate()
        assert w3.popen.wait(timeout=20) == 0, w3.log()
        for base in fronts:
            assert len(fleet.instances(base)) == 3  # their last-known view
        during = await load(list(fronts))
        report("frontends cut from etcd, w3 gone meanwhile", fleet, during)
        for out in during:
            assert out.lost == [] and out.complete == STREAMS, out
    finally:
        t_heal = time.monotonic()
        fleet.rig.heal_many(cut)
    for base in fronts:
        fleet.wait_for_view(base, ("w1", "w2"), 60)
    converged = time.monotonic() - t_heal
    fleet.start_worker("w3")
    for base in fronts:
        fleet.wait_for_view(base, WORKERS, 60)
    print(f"[frontends cut from etcd, {fleet.plane} plane] both frontends dropped w3 {converged:.1f}s after the heal, "
          f"and see its replacement")
    await served_everywhere(fleet)


async def test_flapping_link(fleet: Fleet) -> None:
    """The link between both frontends and w1 flaps: down 1.5 s, up 0.5 s, six times, while
    streams run. Each outage is shorter than the dead-peer bound (5 s), but retransmissions that
    fall into a down phase back off, so on the TCP plane the unacknowledged time adds up to the
    bound and w1's connections are declared dead: its streams migrate, or end cleanly without
    migration. None may be lost or hang."""
    cut = [("fe", "w1"), ("fe0", "w1")]

    def fault() -> None:
        for _ in range(6):  # the fault's own timing
            fleet.rig.cut_many(cut)
            time.sleep(1.5)
            fleet.rig.heal_many(cut)
            time.sleep(0.5)

    try:
        outs = await load([fleet.migrating, fleet.strict], fault)
    finally:
        fleet.rig.heal_many(cut)
    report("flapping frontend-worker link", fleet, outs)
    for out in outs:
        assert out.lost == [] and out.complete + out.clean_errors == STREAMS, out
    assert outs[0].complete == STREAMS, outs[0]
    for base in (fleet.migrating, fleet.strict):
        fleet.wait_for_view(base, WORKERS, 30)
    await served_everywhere(fleet)


def test_rig_cleans_up_after_a_crashed_run(tmp_path: Path) -> None:
    """A run killed after building its rig leaves namespaces and interfaces behind; the next
    rig removes them (by name prefix and dead pid) before building its own."""
    require_netns()
    script = tmp_path / "crash.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from tests.netns import Rig\n"
        "rig = Rig(['a', 'b']).build()\n"
        "print(rig.tag, flush=True)\n"
        "os._exit(0)  # no close(): what a SIGKILLed test run leaves\n"
    )
    tag = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    pid = tag.removeprefix(PREFIX)

    def leftovers() -> list[str]:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
        return [line.split()[0] for line in (names + links).splitlines() if line.startswith((tag + "-", f"dy{pid}-"))]

    assert leftovers(), "the crashed run left nothing to clean"
    assert any(name.startswith(tag) for name in clean_leftovers())
    wait_until(lambda: not leftovers(), 10, f"{tag}'s namespaces and interfaces to go")
