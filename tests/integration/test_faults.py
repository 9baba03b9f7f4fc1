"""Fault injection on real processes: 64 concurrent streaming clients against two frontends
(migration on / off) and mocker workers on their own nats-server and etcd, while a worker is
SIGKILLed, nats-server restarts, and etcd is down for 10 s. Loopback only; every wait bounded.

Every test runs on both request planes: the direct TCP plane (the default; NATS carries only
events, so its restart must not touch a stream) and the NATS plane (a restart breaks every
stream in flight: migration must save them all, and without it each must end cleanly).
Tests run in order on one module-scoped fleet per plane; each replaces what it destroyed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import TINY_MODEL, Proc, Stack, base_env, free_port, http_ok, metric_sum, wait_until
from tests.infra import ServerProcess, start_etcd, start_nats

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

MODEL = "tiny"
CLIENTS = 64
MAX_TOKENS = 160  # ~1.2 s per stream at --speedup-ratio 1 (7 ms a step)
CLIENT_TIMEOUT_S = 45.0


@dataclass
class Fleet:
    stack: Stack
    nats: ServerProcess
    etcd: ServerProcess
    migrating: str  # base URL of the frontend with --migration-limit 3
    strict: str  # base URL of the frontend with --migration-limit 0
    plane: str  # the request plane: "tcp" or "nats"
    nats_monitor: str = ""  # nats-server's monitoring URL
    nats_clients: tuple[int, int] = (0, 0)  # (connections, subscriptions) before a restart
    workers: list[Proc] = field(default_factory=list)
    spawned: int = 0
    system_ports: dict[str, int] = field(default_factory=dict)  # worker name -> /metrics port

    def start_worker(self) -> Proc:
        self.spawned += 1
        name, port = f"worker-{self.spawned}", free_port()
        proc = self.stack.start(
            name, "dynamo.worker", "--engine", "mocker", "--model", TINY_MODEL,
            "--served-model-name", MODEL, "--speedup-ratio", "1", "--graceful-shutdown-timeout-s", "1",
            "--system-port", str(port),
        )
        self.system_ports[name] = port
        self.workers.append(proc)
        return proc

    def wait_for_workers(self, count: int) -> None:
        for base in (self.migrating, self.strict):
            wait_until(lambda: len(_instances(base)) == count, 60, f"{count} workers behind {base}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()}" for p in self.stack.procs)


def _instances(base: str) -> list[int]:
    try:
        body = httpx.get(f"{base}/ready", timeout=1.0).json()
    except (httpx.HTTPError, ValueError):
        return []
    return next((list(m["instances"]) for m in body.get("models", []) if m.get("name") == MODEL), [])


@pytest.fixture(scope="module", params=["tcp", "nats"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # Our own servers: these tests kill and restart them, which the session fixtures must not see.
    plane: str = request.param
    monitor_port = free_port()
    nats, etcd = start_nats(extra_args=["-m", str(monitor_port)]), start_etcd()
    # The monitor listens a moment after the client port that start_nats waits for: bound before
    # the frontends' ports are picked, or one of them could be given the same free port.
    wait_until(lambda: http_ok(f"http://127.0.0.1:{monitor_port}/varz"), 30, "nats-server's monitoring port")
    tmp: Path = tmp_path_factory.mktemp(f"faults-{plane}")
    env = base_env(
        NATS_SERVER=nats.url,
        ETCD_ENDPOINTS=etcd.url,
        DYN_NAMESPACE=f"faults{free_port()}",
        DYN_LEASE_TTL_S="2",
        DYN_REQUEST_ACK_TIMEOUT_S="2",
        DYN_REQUEST_PLANE=plane,
    )
    stack = Stack(tmp, env)
    ports = free_port(), free_port()
    f = Fleet(stack, nats, etcd, f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}", plane,
              f"http://127.0.0.1:{monitor_port}")
    try:
        for _ in range(3):
            f.start_worker()
        for port, limit in zip(ports, ("3", "0")):
            stack.start(f"frontend-{limit}", "dynamo.frontend", "--http-port", str(port), "--migration-limit", limit)
        for base in (f.migrating, f.strict):
            wait_until(lambda: http_ok(f"{base}/ready"), 90, f"frontend {base} ready")
        f.wait_for_workers(3)
    except (TimeoutError, RuntimeError):
        logs = f.logs()
        stack.stop_all()
        nats.stop()
        etcd.stop()
        raise AssertionError(f"fleet did not come up:\n{logs}") from None
    yield f
    stack.stop_all()
    nats.stop()
    etcd.stop()


@dataclass
class Outcome:
    complete: int = 0  # finish_reason length with MAX_TOKENS tokens
    clean_errors: int = 0  # an SSE error event (or a 5xx before the stream) then the end
    bad: list[str] = field(default_factory=list)  # truncated, wrong count, hung, ...
    errors: list[str] = field(default_factory=list)


async def _one_stream(client: httpx.AsyncClient, base: str, index: int, outcome: Outcome, first: asyncio.Event,
                      started: list[int]) -> None:
    body = {
        "model": MODEL, "prompt": f"request {index}: count slowly", "max_tokens": MAX_TOKENS,
        "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode()
                (outcome.errors if resp.status_code in (429, 502, 503, 504) else outcome.bad).append(text[:200])
                if resp.status_code in (429, 502, 503, 504):
                    outcome.clean_errors += 1
                return
            tokens = chunks = 0
            reason = error = None
            done = False
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                    continue
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    continue
                for choice in event.get("choices", []):
                    chunks += 1
                    if chunks == 1:
                        started[0] += 1
                        if started[0] >= CLIENTS:
                            first.set()
                    reason = choice.get("finish_reason") or reason
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        outcome.bad.append(f"transport error {exc!r}")
        return
    if error is not None and done:
        outcome.clean_errors += 1
        outcome.errors.append(str(error.get("code")))
    elif done and reason == "length" and tokens == MAX_TOKENS:
        outcome.complete += 1
    else:
        outcome.bad.append(f"done={done} reason={reason} tokens={tokens} error={error}")


async def _load(base: str, fault: object, settle_s: float = 0.0) -> tuple[Outcome, float]:
    """CLIENTS concurrent streams; `fault()` runs (in a thread: it blocks) once every stream
    has its first token. Returns the outcome and the wall time."""
    outcome = Outcome()
    first = asyncio.Event()
    started = [0]
    limits = httpx.Limits(max_connections=CLIENTS * 2, max_keepalive_connections=CLIENTS * 2)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        tasks = [asyncio.create_task(_one_stream(client, base, i, outcome, first, started)) for i in range(CLIENTS)]
        waiter = asyncio.create_task(first.wait())
        await asyncio.wait([waiter, *tasks], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        await asyncio.to_thread(fault)  # type: ignore[arg-type]
        done, pending = await asyncio.wait(tasks, timeout=CLIENT_TIMEOUT_S + settle_s)
        for task in pending:
            task.cancel()
            outcome.bad.append("hung")
        for task in done:
            if task.exception() is not None:
                outcome.bad.append(repr(task.exception()))
    return outcome, time.perf_counter() - t0


def _report(name: str, outcome: Outcome, wall_s: float) -> None:
    print(f"\n[{name}] {CLIENTS} streams in {wall_s:.1f}s: {outcome.complete} complete, "
          f"{outcome.clean_errors} clean errors {sorted(set(outcome.errors))}, {len(outcome.bad)} bad {outcome.bad[:3]}")


async def test_1000_client_disconnects_leave_nothing_behind(fleet: Fleet) -> None:
    """Clients that drop their connection after the first token, 64 at a time: every worker
    process ends up with 0 requests and 0 KV blocks in use and no more asyncio tasks than
    before, and the frontend likewise."""
    disconnected = 0
    sem = asyncio.Semaphore(CLIENTS)
    limits = httpx.Limits(max_connections=CLIENTS * 2, max_keepalive_connections=0)

    async def one(client: httpx.AsyncClient, index: int) -> None:
        nonlocal disconnected
        body = {"model": MODEL, "prompt": f"drop {index}", "max_tokens": 1000, "stream": True, "ignore_eos": True}
        async with sem, client.stream("POST", f"{fleet.migrating}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    disconnected += 1
                    break  # leaving the block closes the connection mid-stream

    pages = [f"http://127.0.0.1:{fleet.system_ports[w.name]}/metrics" for w in fleet.workers]
    frontend_page = f"{fleet.migrating}/metrics"
    # Tasks alive before, once every connection and lazily started task exists (one warm-up load).
    warm, _ = await _load(fleet.migrating, lambda: None)
    assert warm.complete == CLIENTS, warm
    wait_until(lambda: metric_sum(frontend_page, "dynamo_frontend_inflight_requests") == 0, 20, "warm-up to end")
    tasks_before = [metric_sum(page, "dynamo_worker_asyncio_tasks") for page in pages]
    frontend_tasks_before = metric_sum(frontend_page, "dynamo_frontend_asyncio_tasks")
    assert all(t is not None and t > 0 for t in tasks_before) and frontend_tasks_before

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        await asyncio.gather(*(one(client, i) for i in range(1000)))
    assert disconnected == 1000

    def drained() -> bool:
        for page, before in zip(pages, tasks_before):
            for name in ("dynamo_worker_inflight_requests", "dynamo_worker_requests_active", "dynamo_worker_kv_blocks_active"):
                if metric_sum(page, name) != 0:
                    return False
            tasks = metric_sum(page, "dynamo_worker_asyncio_tasks")
            if tasks is None or tasks > before:  # type: ignore[operator]
                return False
        tasks = metric_sum(frontend_page, "dynamo_frontend_asyncio_tasks")
        return (
            metric_sum(frontend_page, "dynamo_frontend_inflight_requests") == 0
            and tasks is not None and tasks <= frontend_tasks_before  # type: ignore[operator]
        )

    wait_until(drained, 20, "every disconnected request to end on its worker, free its KV blocks and its tasks")
    print(f"\n[1000 disconnects, {fleet.plane} plane] {time.perf_counter() - t0:.1f}s, then 0 requests, 0 KV "
          f"blocks and no more tasks than before ({tasks_before}, frontend {frontend_tasks_before}) on "
          f"{len(pages)} workers")
    # The fleet still serves whole streams afterwards.
    after, _ = await _load(fleet.migrating, lambda: None)
    assert after.bad == [] and after.complete == CLIENTS, after


def _kill_one_worker(fleet: Fleet) -> None:
    victim = fleet.workers.pop(0)
    victim.kill(signal.SIGKILL)


async def test_sigkill_worker_with_migration_loses_nothing(fleet: Fleet) -> None:
    outcome, wall_s = await _load(fleet.migrating, lambda: _kill_one_worker(fleet))
    _report(f"sigkill, migration on, {fleet.plane} plane", outcome, wall_s)
    assert outcome.bad == [] and outcome.complete == CLIENTS, outcome
    fleet.start_worker()
    fleet.wait_for_workers(3)


async def test_sigkill_worker_without_migration_ends_affected_streams_cleanly(fleet: Fleet) -> None:
    outcome, wall_s = await _load(fleet.strict, lambda: _kill_one_worker(fleet))
    _report(f"sigkill, migration off, {fleet.plane} plane", outcome, wall_s)
    assert outcome.bad == [], outcome
    assert outcome.clean_errors > 0 and outcome.complete + outcome.clean_errors == CLIENTS
    fleet.start_worker()
    fleet.wait_for_workers(3)


def _sigterm_one_worker(fleet: Fleet, exit_codes: list[int | None]) -> None:
    """SIGTERM: the worker deregisters, lets in-flight streams run for its 1 s graceful deadline,
    cancels the rest (the frontend migrates them) and exits on its own."""
    victim = fleet.workers.pop(0)
    victim.popen.send_signal(signal.SIGTERM)
    try:
        exit_codes.append(victim.popen.wait(timeout=15))
    except Exception:  # noqa: BLE001 - reported by the assertion below
        victim.kill()
        exit_codes.append(None)


@pytest.mark.parametrize("frontend", ["migrating", "strict"])
async def test_sigterm_drains_a_worker(fleet: Fleet, frontend: str) -> None:
    exit_codes: list[int | None] = []
    outcome, wall_s = await _load(getattr(fleet, frontend), lambda: _sigterm_one_worker(fleet, exit_codes))
    _report(f"sigterm, {frontend}, {fleet.plane} plane", outcome, wall_s)
    assert exit_codes == [0], f"the drained worker exited with {exit_codes}"
    assert outcome.bad == [], outcome
    if frontend == "migrating":
        assert outcome.complete == CLIENTS, outcome
    else:
        assert outcome.complete + outcome.clean_errors == CLIENTS, outcome
    # Deregistered: both frontends see two workers, then three once a replacement starts.
    fleet.wait_for_workers(2)
    fleet.start_worker()
    fleet.wait_for_workers(3)


def _nats_clients(fleet: Fleet) -> tuple[int, int]:
    """(client connections, subscriptions) on nats-server, from its monitoring endpoint."""
    try:
        conns = httpx.get(f"{fleet.nats_monitor}/connz", timeout=1.0).json()["num_connections"]
        subs = httpx.get(f"{fleet.nats_monitor}/subsz", timeout=1.0).json()["num_subscriptions"]
    except (httpx.HTTPError, ValueError, KeyError):
        return 0, 0
    return int(conns), int(subs)


def _restart_nats(fleet: Fleet) -> None:
    fleet.nats_clients = _nats_clients(fleet)
    fleet.nats.kill(signal.SIGKILL)
    fleet.nats.start()  # same port and data directory


async def test_nats_restart_with_migration_loses_nothing(fleet: Fleet) -> None:
    outcome, wall_s = await _load(fleet.migrating, lambda: _restart_nats(fleet))
    _report(f"nats restart, migration on, {fleet.plane} plane", outcome, wall_s)
    assert outcome.bad == [] and outcome.complete == CLIENTS, outcome
    await _served_after_nats_returned(fleet)


async def test_nats_restart_without_migration_ends_streams_cleanly(fleet: Fleet) -> None:
    outcome, wall_s = await _load(fleet.strict, lambda: _restart_nats(fleet))
    _report(f"nats restart, migration off, {fleet.plane} plane", outcome, wall_s)
    assert outcome.bad == [], outcome
    if fleet.plane == "tcp":
        # NATS carries only events here: no stream may notice its restart.
        assert outcome.complete == CLIENTS, outcome
    else:
        # Streams ride on NATS: the restart breaks them, and each ends with an error event.
        assert outcome.clean_errors > 0 and outcome.complete + outcome.clean_errors == CLIENTS, outcome
    await _served_after_nats_returned(fleet)


async def _served_after_nats_returned(fleet: Fleet) -> None:
    """Clients reconnected to the restarted server: the fleet serves every request again."""
    fleet.wait_for_workers(3)  # they never left etcd: this alone does not say NATS is back
    # Every process reconnects on its own schedule (nats-py's reconnect wait): until a worker has
    # re-subscribed, requests to it get "no responders". Wait for what was there before.
    conns, subs = fleet.nats_clients
    assert conns > 0 and subs > 0, "nats-server's monitoring answered nothing before the restart"
    wait_until(lambda: all(now >= then for now, then in zip(_nats_clients(fleet), (conns, subs))), 60,
               f"{conns} NATS connections and {subs} subscriptions back after the restart")
    for base in (fleet.migrating, fleet.strict):
        after, _ = await _load(base, lambda: None)
        assert after.bad == [] and after.complete == CLIENTS, after


def _etcd_outage(fleet: Fleet, base: str, outcomes: list[Outcome]) -> None:
    """etcd down for 10 s; meanwhile more requests must be served from last-known instances."""
    fleet.etcd.kill(signal.SIGTERM)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        outcome, _ = asyncio.run(_load(base, lambda: None))
        outcomes.append(outcome)
    fleet.etcd.start()


@pytest.mark.parametrize("frontend", ["migrating", "strict"])
async def test_etcd_outage_keeps_serving(fleet: Fleet, frontend: str) -> None:
    base = getattr(fleet, frontend)
    during: list[Outcome] = []
    outcome, wall_s = await _load(base, lambda: _etcd_outage(fleet, base, during))
    _report(f"etcd down 10 s ({frontend})", outcome, wall_s)
    for i, extra in enumerate(during):
        _report(f"  during the outage, batch {i}", extra, 0.0)
    everything = [outcome, *during]
    assert all(o.bad == [] for o in everything), everything
    if frontend == "migrating":
        assert all(o.complete == CLIENTS for o in everything), everything
    # etcd is back: every worker is still (or again) registered, and requests succeed.
    fleet.wait_for_workers(3)
    after, _ = await _load(base, lambda: None)
    assert after.complete == CLIENTS, after
