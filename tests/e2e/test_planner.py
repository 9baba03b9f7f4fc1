"""The planner end to end: real nats-server and etcd, a frontend, and the planner with its
local connector starting and stopping mocker worker processes (disaggregated: a decode pool
and a prefill pool, both allowed to reach zero), in SLA mode with the performance model that
benchmarks/profile_worker.py measured for this mocker configuration
(tests/e2e/planner_mocker_perf.json).

In order, on one stack:
1. idle: the pools are at zero; the first request is held by the frontend (the planner
   announced the model) until the planner, cued by the held request, has started a worker;
2. a load ramp, 1 -> 3 -> 1 requests/s of short prompts: the decode pool grows until the
   recent TTFT p90 is back under target, then shrinks back; every stream completes;
3. a shift to long prompts: the prefill pool grows from zero.

Each mocker worker runs one stream at a time (--max-num-seqs 1) at a quarter of the modelled
H100's speed (--speedup-ratio 0.25: few requests load a worker, so the test itself costs little
CPU): about 2 requests/s of these 16-token answers, so 3/s needs a second worker. Waits are bounded waits on
conditions; nothing asserts wall-clock durations.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import TINY_MODEL, Stack, base_env, free_port, http_ok, metric_samples, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MODEL = "tiny"
PERF_MODEL = str(Path(__file__).with_name("planner_mocker_perf.json"))
TTFT_TARGET_S = 2.5
OUTPUT_TOKENS = 16
SHORT_PROMPT = 64
LONG_PROMPT = 1500  # over the decode workers' --disagg-min-prefill-tokens (512): prefilled remotely
WORKER_ARGS = (
    f"--engine mocker --model {TINY_MODEL} --served-model-name {MODEL} --max-num-seqs 1 "
    "--speedup-ratio 0.25 --graceful-shutdown-timeout-s 15"
)


@dataclass
class Fleet:
    stack: Stack
    base: str  # the frontend
    planner_metrics: str

    def desired(self, role: str) -> int | None:
        return self._gauge("dynamo_planner_desired_replicas", role)

    def registered(self, role: str) -> int | None:
        """The pool's workers registered in discovery, as the planner last saw them."""
        return self._gauge("dynamo_planner_serving_replicas", role)

    def _gauge(self, name: str, role: str) -> int | None:
        samples = metric_samples(self.planner_metrics, name)
        if not samples:
            return None
        value = samples.get(f'{name}{{role="{role}"}}')
        return None if value is None else int(value)

    def serving(self) -> int:
        """Decode workers the frontend routes to (its /ready detail)."""
        try:
            body = httpx.get(f"{self.base}/ready", timeout=2.0).json()
        except (httpx.HTTPError, ValueError):
            return -1
        return sum(len(m.get("instances", [])) for m in body.get("models", []) if m.get("name") == MODEL)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()}" for p in self.stack.procs)


@pytest.fixture(scope="module")
def fleet(nats_server: str, etcd_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("planner")
    env = base_env(
        NATS_SERVER=nats_server,
        ETCD_ENDPOINTS=etcd_server,
        DYN_NAMESPACE=f"planner{free_port()}",
        DYN_REQUEST_ACK_TIMEOUT_S="2",
        DYN_SCALE_FROM_ZERO_WAIT_S="60",
    )
    s = Stack(tmp, env)
    port, planner_port = free_port(), free_port()
    fleet = Fleet(s, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{planner_port}/metrics")
    s.start("frontend", "dynamo.frontend", "--http-port", str(port), "--router-mode", "least-loaded")
    s.start(
        "planner", "dynamo.planner", "--topology", "disagg", "--mode", "sla", "--perf-model", PERF_MODEL,
        "--model", MODEL, "--frontend-metrics-url", f"{fleet.base}/metrics",
        "--adjustment-interval-s", "1", "--predictor", "holt",
        "--ttft-ms", str(TTFT_TARGET_S * 1000), "--itl-ms", "200",
        "--decode-min", "0", "--decode-max", "4", "--prefill-min", "0", "--prefill-max", "2",
        "--scale-down-cooldown-s", "2", "--worker-args", WORKER_ARGS, "--worker-stop-timeout-s", "30",
        "--system-port", str(planner_port),
    )
    try:
        wait_until(lambda: http_ok(f"{fleet.base}/health") and fleet.desired("decode") == 0, 60, "frontend and planner up")
    except TimeoutError:
        logs = fleet.logs()
        s.stop_all()
        raise AssertionError(f"stack did not come up:\n{logs}") from None
    yield fleet
    s.stop_all()


# ------------------------------------------------------------------------------ load


@dataclass
class Outcome:
    started_s: float
    ttft_s: float = float("nan")
    tokens: int = 0
    finish: str | None = None
    error: str = ""

    @property
    def complete(self) -> bool:
        return not self.error and self.finish == "length" and self.tokens == OUTPUT_TOKENS


@dataclass
class Load:
    client: httpx.AsyncClient
    rng: random.Random = field(default_factory=lambda: random.Random(17))
    outcomes: list[Outcome] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def one(self, prompt_tokens: int) -> None:
        out = Outcome(time.monotonic())
        self.outcomes.append(out)
        body = {
            "model": MODEL, "prompt": [self.rng.randrange(10, 8000) for _ in range(prompt_tokens)],
            "max_tokens": OUTPUT_TOKENS, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    out.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                    return
                done = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        continue
                    msg = json.loads(data)
                    if "error" in msg:
                        out.error = str(msg["error"])[:200]
                    for choice in msg.get("choices") or []:
                        if choice.get("text") and out.ttft_s != out.ttft_s:
                            out.ttft_s = time.monotonic() - out.started_s
                        out.finish = choice.get("finish_reason") or out.finish
                    if msg.get("usage"):
                        out.tokens = msg["usage"]["completion_tokens"]
                if not done and not out.error:
                    out.error = "stream ended without [DONE]"
        except httpx.HTTPError as exc:
            out.error = f"{type(exc).__name__}: {exc}"

    async def run(self, rate_per_s: float, prompt_tokens: int, until: Callable[[], bool], timeout_s: float,
                  what: str, fleet: Fleet) -> None:
        """Open-loop arrivals at `rate_per_s` until `until()` holds (checked off the loop, as
        it does blocking HTTP), bounded by `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        next_at = loop.time()
        check = loop.run_in_executor(None, until)
        while True:
            if check.done():
                if check.result():
                    return
                check = loop.run_in_executor(None, until)
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{fleet.logs()}")
            task = asyncio.create_task(self.one(prompt_tokens))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            # A loop that fell behind skips arrivals instead of sending them in a burst.
            next_at = max(next_at + 1.0 / rate_per_s, loop.time())
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def finish(self, timeout_s: float = 60.0) -> None:
        if self.tasks:
            await asyncio.wait_for(asyncio.gather(*self.tasks), timeout_s)

    def recent_ttft_p90(self, window_s: float) -> float | None:
        now = time.monotonic()
        ttfts = sorted(o.ttft_s for o in self.outcomes if now - window_s <= o.started_s and o.ttft_s == o.ttft_s)
        if len(ttfts) < 5:
            return None
        return ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))]

    def failures(self) -> list[str]:
        return [o.error or f"finish {o.finish!r}, {o.tokens} tokens" for o in self.outcomes if not o.complete]


def client(fleet: Fleet) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=fleet.base, timeout=90.0, limits=httpx.Limits(max_connections=500))


# ------------------------------------------------------------------------------ tests


async def test_idle_pools_are_at_zero_and_the_first_request_is_held_then_served(fleet: Fleet) -> None:
    assert fleet.desired("decode") == 0 and fleet.desired("prefill") == 0
    assert fleet.serving() == 0
    async with client(fleet) as c:
        load = Load(c)
        await asyncio.wait_for(load.one(SHORT_PROMPT), 60)
    assert load.failures() == []


async def test_load_ramp_grows_the_decode_pool_then_shrinks_it_losing_nothing(fleet: Fleet) -> None:
    async with client(fleet) as c:
        load = Load(c)
        await load.run(1, SHORT_PROMPT, lambda: fleet.serving() >= 1, 60, "a decode worker at low load", fleet)
        peak = 0

        def grown_and_fast() -> bool:
            nonlocal peak
            peak = max(peak, fleet.serving())
            p90 = load.recent_ttft_p90(4.0)
            return peak >= 2 and p90 is not None and p90 <= TTFT_TARGET_S

        await load.run(3, SHORT_PROMPT, grown_and_fast, 120, "more decode workers and TTFT p90 under target", fleet)
        await load.run(1, SHORT_PROMPT, lambda: fleet.desired("decode") == 1 and fleet.serving() == 1, 60,
                       "the decode pool back to one worker", fleet)
        await load.finish()
    assert peak >= 2
    # Every stream of the ramp complete (how many there were depends on how fast each phase's
    # condition was met, not on the planner).
    assert load.outcomes and load.failures() == [], load.failures()[:5]


async def test_long_prompts_grow_the_prefill_pool(fleet: Fleet) -> None:
    assert fleet.desired("prefill") == 0
    async with client(fleet) as c:
        load = Load(c)
        await load.run(1.5, LONG_PROMPT, lambda: (fleet.registered("prefill") or 0) >= 1, 90,
                       "a prefill worker serving", fleet)
        await load.finish()
    assert load.failures() == [], load.failures()[:5]
