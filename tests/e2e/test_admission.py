"""Priorities and SLO-aware admission (frontend/admission.py) in real `python -m dynamo.serve`
processes with mocker workers, as a user configures them: a tenants file and flags.

- Under saturation (one in-flight slot) a high-priority request overtakes queued low-priority
  ones, and a trusted tenant's `x-dynamo-priority` header counts. Order is read from which
  stream starts: with one slot only the admitted request can produce tokens, and each holds the
  slot until the test ends it.
- A request of a class with a TTFT target is shed with 503 and Retry-After while the router's
  load view shows prefill queued ahead of it, and admitted once that queue is gone."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import TINY_MODEL, Stack, base_env, free_port, metric_samples, metric_sum, wait_ready, wait_until

pytestmark = pytest.mark.e2e

MODEL = "tiny"

TENANTS = {
    "priority_classes": [
        {"name": "interactive"},
        {"name": "realtime", "ttft_target_ms": 100, "over_target": "shed"},
        {"name": "default"},
        {"name": "batch"},
    ],
    "tenants": {
        "chat": {"priority": "interactive", "keys": ["sk-chat"]},
        "nightly": {"priority": "batch", "keys": ["sk-nightly"]},
        "ops": {"priority": "batch", "trusted": True, "keys": ["sk-ops"]},
        "voice": {"priority": "realtime", "keys": ["sk-voice"]},
    },
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`queue`: one in-flight slot, 8 may wait. `slo`: a kv router whose load view predicts
    TTFT at 1000 prompt tokens/s, in front of a worker that runs one request at a time."""
    tmp = tmp_path_factory.mktemp("admission")
    tenants = tmp / "tenants.json"
    tenants.write_text(json.dumps(TENANTS))
    stack = Stack(tmp, base_env(OMP_NUM_THREADS="1"))
    common = ("dynamo.serve", "--engine", "mocker", "--model", TINY_MODEL, "--served-model-name", MODEL,
              "--tenants-file", str(tenants))
    ports = {"queue": free_port(), "slo": free_port()}
    stack.start("queue", *common, "--http-port", str(ports["queue"]),
                "--max-inflight-requests", "1", "--max-waiting-requests", "8")
    stack.start("slo", *common, "--http-port", str(ports["slo"]), "--router-mode", "kv",
                "--slo-prefill-tokens-per-s", "1000", "--max-num-seqs", "1")
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    try:
        for proc in stack.procs:
            wait_ready(proc, urls[proc.name], 120)
        yield urls
    finally:
        stack.stop_all()


def _body(max_tokens: int, prompt: str = "tell me a story", stream: bool = True) -> dict[str, object]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}


def _auth(key: str, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **headers}


@contextlib.asynccontextmanager
async def _held_stream(client: httpx.AsyncClient, key: str, **body: object) -> AsyncIterator[None]:
    """A stream that has produced its first token; closing it drops the connection, which ends
    the request and frees its slot."""
    async with client.stream("POST", "/v1/completions", json={**_body(2000), **body}, headers=_auth(key)) as resp:
        assert resp.status_code == 200, await resp.aread()
        await _first_token(lines := resp.aiter_lines())
        yield
        del lines


async def _first_token(lines: AsyncIterator[str]) -> None:
    """Reads up to the first token. The caller keeps `lines` referenced while it holds the
    stream: a line iterator left to the garbage collector closes the connection."""
    async for line in lines:
        if line.startswith("data: {"):
            return


def _depth(url: str, priority: str, tenant: str) -> float:
    samples = metric_samples(f"{url}/metrics", "dynamo_frontend_queue_depth") or {}
    return samples.get(f'dynamo_frontend_queue_depth{{priority="{priority}",tenant="{tenant}"}}', 0.0)


async def _until(condition: object, what: str) -> None:
    """Bounded wait on server state seen through /metrics (it has no push of its own)."""
    await asyncio.to_thread(wait_until, condition, 30, what)  # type: ignore[arg-type]


async def test_high_priority_overtakes_queued_low_priority(servers: dict[str, str]) -> None:
    url = servers["queue"]
    started: asyncio.Queue[str] = asyncio.Queue()
    stop = {label: asyncio.Event() for label in ("nightly-1", "nightly-2", "chat", "ops")}

    async def one(client: httpx.AsyncClient, label: str, key: str, **headers: str) -> None:
        body = _body(2000)
        async with client.stream("POST", "/v1/completions", json=body, headers=_auth(key, **headers)) as resp:
            assert resp.status_code == 200, await resp.aread()
            await _first_token(lines := resp.aiter_lines())
            await started.put(label)
            await stop[label].wait()  # holds the one slot until the test moves on
            del lines

    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        tasks: list[asyncio.Task[None]] = []
        async with _held_stream(client, "sk-nightly"):
            # Queued while the slot is held, lowest class first; each waits in the queue
            # before the next is sent, so arrival order is known.
            for label, key, headers, priority, tenant in (
                ("nightly-1", "sk-nightly", {}, "batch", "nightly"),
                ("nightly-2", "sk-nightly", {}, "batch", "nightly"),
                ("chat", "sk-chat", {}, "interactive", "chat"),
                ("ops", "sk-ops", {"x-dynamo-priority": "interactive"}, "interactive", "ops"),
            ):
                before = _depth(url, priority, tenant)
                tasks.append(asyncio.create_task(one(client, label, key, **headers)))
                await _until(lambda: _depth(url, priority, tenant) == before + 1, f"{label} to queue")
        # The holder is gone: one queued request at a time gets the slot, in priority order.
        order = []
        for _ in stop:
            label = await asyncio.wait_for(started.get(), 30)
            assert started.empty(), "two requests streamed at once with one slot"
            order.append(label)
            stop[label].set()
        await asyncio.gather(*tasks)
    assert order[:2] in (["chat", "ops"], ["ops", "chat"]), order  # interactive: the trusted header counted
    assert order[2:] == ["nightly-1", "nightly-2"], order


async def test_untrusted_priority_header_is_refused(servers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=servers["queue"], timeout=30) as client:
        resp = await client.post(
            "/v1/completions", json=_body(4, stream=False), headers=_auth("sk-nightly", **{"x-dynamo-priority": "interactive"})
        )
    assert resp.status_code == 403
    assert resp.json()["error"]["param"] == "x-dynamo-priority"


async def test_request_predicted_to_miss_its_ttft_target_is_shed(servers: dict[str, str]) -> None:
    url = servers["slo"]
    long_prompt = " ".join(["story"] * 400)
    decisions_before = metric_sum(f"{url}/metrics", "dynamo_router_decisions_total") or 0.0
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async with _held_stream(client, "sk-chat"):  # the worker's one running request
            # A long prompt waits on the worker, unprefilled: the router counts it as queued.
            waiting = asyncio.create_task(
                client.post("/v1/completions", json=_body(4, long_prompt, stream=False), headers=_auth("sk-chat"))
            )
            await _until(
                lambda: (metric_sum(f"{url}/metrics", "dynamo_router_decisions_total") or 0) >= decisions_before + 2,
                "the long prompt to be routed",
            )
            shed = await client.post("/v1/completions", json=_body(4, stream=False), headers=_auth("sk-voice"))
            assert shed.status_code == 503, shed.text
            assert int(shed.headers["retry-after"]) >= 1
            assert shed.json()["error"]["code"] == "ttft_target_unattainable"
            # A class without a target is not shed: it is admitted and waits on the worker.
            assert not waiting.done()
        assert (await waiting).status_code == 200
        # Nothing queued ahead any more: admitted.
        served = await client.post("/v1/completions", json=_body(4, stream=False), headers=_auth("sk-voice"))
        assert served.status_code == 200, served.text
    rejected = metric_samples(f"{url}/metrics", "dynamo_frontend_rejected_requests_total") or {}
    assert rejected.get('dynamo_frontend_rejected_requests_total{reason="ttft_target"}') == 1
