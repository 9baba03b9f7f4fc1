"""Issue 20 across processes on real nats-server and etcd: session affinity through a standalone
router service (a session stays on one of three mocker workers and moves when that worker dies),
and tenant rate limits held across two frontend replicas.

One stack for both: three mocker workers (each with /metrics, to see which served a request), a
KV router service, and two frontends asking it, with a tenants file."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import TINY_MODEL, Proc, Stack, base_env, free_port, http_ok, metric_samples, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MODEL = "tiny"
LIMITED_KEY = "sk-limited"
OTHER_KEY = "sk-other"
REQUESTS_PER_MIN = 3  # one more every 20 s: none refills while the test runs
TENANTS = {
    "tenants": {
        "limited": {"limits": {"requests_per_min": REQUESTS_PER_MIN}, "keys": [LIMITED_KEY]},
        "other": {"keys": [OTHER_KEY]},
    }
}


class Fleet:
    def __init__(self, stack: Stack, workers: dict[str, tuple[Proc, str]], frontends: list[str], router: str) -> None:
        self.stack = stack
        self.workers = workers  # name -> (process, /metrics URL)
        self.frontends = frontends
        self.router = router  # the router service's /metrics URL
        self.answered = 0  # requests answered 200 so far
        self._counts: dict[str, float] = {}

    def served(self) -> dict[str, float]:
        """Requests each worker has finished, from its own /metrics (a dead one's last count)."""
        for name, (proc, url) in self.workers.items():
            if proc.popen.poll() is None:
                samples = metric_samples(url, "dynamo_worker_requests_total")
                if samples is not None:
                    self._counts[name] = sum(samples.values())
        return dict(self._counts)


@pytest.fixture(scope="module")
def fleet(nats_server: str, etcd_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp: Path = tmp_path_factory.mktemp("traffic")
    tenants = tmp / "tenants.json"
    tenants.write_text(json.dumps(TENANTS))
    env = base_env(
        NATS_SERVER=nats_server,
        ETCD_ENDPOINTS=etcd_server,
        DYN_NAMESPACE=f"traffic{free_port()}",
        DYN_LEASE_TTL_S="2",
        DYN_REQUEST_ACK_TIMEOUT_S="2",
    )
    stack = Stack(tmp, env)
    workers: dict[str, tuple[Proc, str]] = {}
    for name in ("w0", "w1", "w2"):
        port = free_port()
        proc = stack.start(name, "dynamo.worker", "--engine", "mocker", "--model", TINY_MODEL,
                           "--served-model-name", MODEL, "--speedup-ratio", "100", "--system-port", str(port))
        workers[name] = (proc, f"http://127.0.0.1:{port}/metrics")
    router_port = free_port()
    # Stickiness and re-pinning are what this fleet checks; the overload fallback (ratio and
    # margin, router/kv_router.py) has its unit tests, so overload is out of play here.
    stack.start("router", "dynamo.router", "--router-mode", "kv", "--system-port", str(router_port),
                "--router-session-overload-ratio", "1000")
    frontends = []
    for i in range(2):
        port = free_port()
        stack.start(f"frontend{i}", "dynamo.frontend", "--http-port", str(port), "--router-mode", "remote",
                    "--tenants-file", str(tenants))
        frontends.append(f"http://127.0.0.1:{port}")
    try:
        for base in frontends:
            wait_until(lambda: _instances(base) == 3, 90, f"{base} serving the model on three workers")
        wait_until(lambda: http_ok(f"http://127.0.0.1:{router_port}/metrics"), 30, "the router service")
    except TimeoutError:
        logs = "\n".join(f"--- {p.name}\n{p.log()}" for p in stack.procs)
        stack.stop_all()
        raise AssertionError(f"stack did not come up:\n{logs}") from None
    yield Fleet(stack, workers, frontends, f"http://127.0.0.1:{router_port}/metrics")
    stack.stop_all()


def _instances(base: str) -> int:
    try:
        body = httpx.get(f"{base}/ready", timeout=1.0).json()
    except (httpx.HTTPError, ValueError):
        return 0
    return sum(len(m.get("instances", [])) for m in body.get("models", []) if m.get("name") == MODEL)


def complete(fleet: Fleet, base: str, key: str, prompt: str, session: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    if session is not None:
        headers["x-dynamo-session-id"] = session
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    resp = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=30)
    fleet.answered += resp.status_code == 200
    return resp


def served_by(fleet: Fleet, base: str, prompt: str, session: str) -> str:
    """Send one request of `session`; the worker whose finished count went up served it."""
    counts: dict[str, float] = {}

    def all_counted() -> bool:  # every earlier request is in some worker's count
        counts.update(fleet.served())
        return sum(counts.values()) >= fleet.answered

    wait_until(all_counted, 10, "the workers counting every earlier request")
    before = dict(counts)
    resp = complete(fleet, base, OTHER_KEY, prompt, session)
    assert resp.status_code == 200, resp.text
    wait_until(all_counted, 10, "a worker counting the request")
    (worker,) = [name for name in counts if counts[name] > before.get(name, 0)]
    return worker


def affinity(fleet: Fleet, outcome: str) -> float:
    samples = metric_samples(fleet.router, "dynamo_router_session_affinity_total") or {}
    return sum(v for k, v in samples.items() if f'outcome="{outcome}"' in k)


def test_limits_hold_across_two_frontend_replicas(fleet: Fleet) -> None:
    """Requests alternate over the two frontends: together they admit the tenant's limit, no
    more, and the other tenant is still served."""
    statuses = [
        complete(fleet, fleet.frontends[i % 2], LIMITED_KEY, f"limited {i}").status_code for i in range(REQUESTS_PER_MIN)
    ]
    assert statuses == [200] * REQUESTS_PER_MIN
    refused = complete(fleet, fleet.frontends[REQUESTS_PER_MIN % 2], LIMITED_KEY, "one too many")
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-limit-requests"] == str(REQUESTS_PER_MIN)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(refused.headers["retry-after"]) >= 1
    # The other frontend agrees; the other tenant is served by both.
    assert complete(fleet, fleet.frontends[(REQUESTS_PER_MIN + 1) % 2], LIMITED_KEY, "again").status_code == 429
    assert [complete(fleet, base, OTHER_KEY, "unlimited").status_code for base in fleet.frontends] == [200, 200]


def test_a_session_stays_on_its_worker_and_moves_when_it_dies(fleet: Fleet) -> None:
    # Different prompts over both frontends: the pin, not the prompt's cache, keeps them together.
    prompts = [f"turn {i}: " + "tell me more about the weather " * (i + 1) for i in range(5)]
    first = served_by(fleet, fleet.frontends[0], prompts[0], "chat-1")
    assert [served_by(fleet, fleet.frontends[i % 2], p, "chat-1") for i, p in enumerate(prompts[1:])] == [first] * 4
    assert affinity(fleet, "hit") >= 4

    fleet.workers[first][0].kill(signal.SIGKILL)
    moved = served_by(fleet, fleet.frontends[0], "after the crash", "chat-1")
    assert moved != first
    assert [served_by(fleet, fleet.frontends[1], p, "chat-1") for p in prompts[:3]] == [moved] * 3
    assert affinity(fleet, "repin") >= 1
