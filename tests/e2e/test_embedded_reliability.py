"""Cancellation, overload and graceful drain with the real Frontend and mocker Workers in one
process on the embedded runtime (the `python -m dynamo.serve` wiring), over loopback HTTP.

The project's packages are imported inside the fixtures: importing `frontend` while collecting
would shadow tests/unit/frontend's package for the collection that follows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.e2e.procs import TINY_MODEL

if TYPE_CHECKING:
    from dynamo.runtime import Runtime
    from frontend.config import FrontendConfig
    from frontend.service import Frontend
    from workers.mocker.engine import MockerEngine
    from workers.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.e2e]

MODEL = "tiny"


@dataclass
class Fleet:
    runtime: Runtime
    frontend: Frontend
    workers: list[Worker]
    client: httpx.AsyncClient

    def engines(self) -> list[MockerEngine]:
        return [w.engine for w in self.workers]  # type: ignore[misc]


@contextlib.asynccontextmanager
async def fleet(
    num_workers: int,
    speedup: float,
    frontend: dict[str, Any] | None = None,
    worker: dict[str, Any] | None = None,
    engine_args: tuple[str, ...] = (),
) -> AsyncIterator[Fleet]:
    from prometheus_client import CollectorRegistry

    from dynamo.config import RuntimeConfig
    from dynamo.runtime import Runtime
    from dynamo.serve import build_parser
    from frontend.config import FrontendConfig
    from frontend.service import Frontend
    from router.base import RoundRobinRouter
    from workers.registry import engine_spec
    from workers.worker import Worker, WorkerConfig

    args = build_parser(["--engine", "mocker"]).parse_args(
        ["--engine", "mocker", "--model", TINY_MODEL, "--speedup-ratio", str(speedup), *engine_args]
    )
    worker_config = WorkerConfig(MODEL, TINY_MODEL, "mocker", **(worker or {}))
    async with contextlib.AsyncExitStack() as stack:
        runtime = await stack.enter_async_context(await Runtime.create(RuntimeConfig()))
        workers = []
        for _ in range(num_workers):
            rt = await stack.enter_async_context(runtime.sibling())
            workers.append(await stack.enter_async_context(Worker(rt, engine_spec("mocker").create(args), worker_config)))
        config = FrontendConfig(http_host="127.0.0.1", http_port=0, **(frontend or {}))
        front = await stack.enter_async_context(
            Frontend(runtime, config, lambda card: RoundRobinRouter(), registry=CollectorRegistry())
        )
        manager = front.manager
        await manager.wait_until(
            lambda: manager.ready() and len(manager.models[MODEL].instance_ids()) == num_workers, 10
        )
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.port}", timeout=30, limits=limits)
        )
        yield Fleet(runtime, front, workers, client)


def _body(max_tokens: int, stream: bool = True) -> dict[str, object]:
    return {
        "model": MODEL,
        "prompt": "tell me a story",
        "max_tokens": max_tokens,
        "stream": stream,
        "ignore_eos": True,
        "stream_options": {"include_usage": True} if stream else None,
    }


async def _wait_for(condition: object, timeout_s: float, what: str) -> None:
    """Bounded wait on a condition of engine state that has no event of its own."""
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_1000_disconnected_streams_leave_no_blocks_and_no_tasks() -> None:
    async with fleet(num_workers=2, speedup=20) as f:
        # Warm up once so that lazily created long-lived tasks exist before we count.
        assert (await f.client.post("/v1/completions", json=_body(4, stream=False))).status_code == 200
        await _wait_for(lambda: all(e.pool.num_active_blocks == 0 for e in f.engines()), 5, "warm-up to free")
        tasks_before = len(asyncio.all_tasks())
        sem = asyncio.Semaphore(64)
        started = 0

        async def one() -> None:
            nonlocal started
            # Closing a response before its end closes its connection: the server sees a disconnect.
            async with sem, f.client.stream("POST", "/v1/completions", json=_body(1000)) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        started += 1
                        break  # leaving the block drops the connection mid-stream

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(1000)))
        assert started == 1000
        await _wait_for(
            lambda: all(e.pool.num_active_blocks == 0 and e.scheduler.num_running == 0 for e in f.engines()),
            10, "every cancelled request to free its KV blocks",
        )
        await _wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before, 10, "request tasks to end")
        assert all(w._active == 0 for w in f.workers)
        assert f.frontend.app.state.inflight_limit.count == 0
        print(f"1000 disconnected streams in {time.perf_counter() - t0:.1f}s; tasks {tasks_before} -> "
              f"{len(asyncio.all_tasks())}; active KV blocks {[e.pool.num_active_blocks for e in f.engines()]}")


async def test_past_capacity_requests_get_429_or_503_quickly() -> None:
    # One worker admitting 2 requests and queueing 2; a frontend serving at most 12 at once.
    async with fleet(
        num_workers=1,
        speedup=1,
        frontend={"max_inflight_requests": 12},
        worker={"max_queued_requests": 2},
        engine_args=("--max-num-seqs", "2"),
    ) as f:

        async def one() -> tuple[int, float, str]:
            t0 = time.perf_counter()
            resp = await f.client.post("/v1/completions", json=_body(200, stream=False))
            return resp.status_code, time.perf_counter() - t0, resp.headers.get("retry-after", "")

        tasks = [asyncio.create_task(one()) for _ in range(40)]
        rejected: list[tuple[int, float, str]] = []
        for next_done in asyncio.as_completed(tasks):
            status, elapsed_s, retry_after = await next_done
            if status == 200:
                break  # the first success arrives only after every rejection
            rejected.append((status, elapsed_s, retry_after))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    statuses = sorted({s for s, _, _ in rejected})
    assert statuses == [429, 503], rejected
    assert len(rejected) >= 40 - 4, rejected  # 2 running + 2 queued may succeed
    assert all(retry == "1" for _, _, retry in rejected)
    slowest = max(t for _, t, _ in rejected)
    assert slowest < 1.0, f"a rejection took {slowest:.2f}s"
    print(f"overload: {len(rejected)} rejected ({statuses}), slowest rejection {slowest * 1000:.0f} ms")


async def test_draining_worker_finishes_or_hands_over_every_stream() -> None:
    max_tokens = 300
    async with fleet(num_workers=2, speedup=4, frontend={"migration_limit": 3}) as f:

        async def one() -> tuple[int, str | None]:
            async with f.client.stream("POST", "/v1/completions", json=_body(max_tokens)) as resp:
                assert resp.status_code == 200
                tokens, reason = 0, None
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    for choice in event.get("choices", []):
                        reason = choice.get("finish_reason") or reason
                return tokens, reason

        tasks = [asyncio.create_task(one()) for _ in range(16)]
        victim = f.workers[0]
        await _wait_for(lambda: victim._active >= 4, 10, "streams on the worker to drain")
        await victim.drain(timeout_s=0.2)  # far shorter than the streams: they must migrate
        results = await asyncio.gather(*tasks)
    assert results == [(max_tokens, "length")] * 16
