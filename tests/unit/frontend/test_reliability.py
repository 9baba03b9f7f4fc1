"""Migration, request timeouts, the in-flight limit, worker overload, API keys and CORS, on the
embedded runtime with scripted workers and a real uvicorn server on loopback (httpx's ASGI
transport buffers whole responses, and these tests act mid-stream)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from dynamo import errors
from dynamo.runtime import RequestContext
from dynamo.wire import REQUEST_CODEC, EngineOutput, encode
from frontend.config import FrontendConfig
from frontend.service import Frontend
from router.base import RoundRobinRouter
from tests.unit.frontend.conftest import MODEL, ScriptedWorker, Stack

FULL = list(range(300, 320))


class ContinuingWorker(ScriptedWorker):
    """Answers with `script[generated_before:max_tokens]`: what an engine resuming a migrated
    request would produce, so the client's text must equal the undisturbed one."""

    async def handle(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        request = REQUEST_CODEC.decode(payload)
        self.requests.append(request)
        self.started.set()
        limit = request.stop.max_tokens or len(self.script)
        tokens = self.script[request.generated_before : limit]
        for i, token in enumerate(tokens):
            if i > 0 and self.gate is not None:
                await self.gate.wait()
            reason = "length" if i == len(tokens) - 1 else None
            yield encode(EngineOutput([token], reason))


class StallingWorker(ScriptedWorker):
    """Never answers; records the cancellation."""

    async def handle(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        self.requests.append(REQUEST_CODEC.decode(payload))
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()
        yield b""  # pragma: no cover - makes this an async generator


class OverloadedWorker(ScriptedWorker):
    async def handle(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        self.requests.append(REQUEST_CODEC.decode(payload))
        raise errors.Overloaded("queue full")
        yield b""  # pragma: no cover


async def _start(stack: Stack, cls: type[ScriptedWorker] = ScriptedWorker, **kwargs: object) -> ScriptedWorker:
    """A worker of class `cls` on its own lease, started and registered."""
    worker = cls(stack.make_worker(FULL).runtime, FULL, **kwargs)  # type: ignore[arg-type]
    await worker.start()
    return worker


@contextlib.asynccontextmanager
async def _frontend(
    stack: Stack, *workers: ScriptedWorker, **config: object
) -> AsyncIterator[tuple[httpx.AsyncClient, CollectorRegistry, Frontend]]:
    """A Frontend on an ephemeral loopback port that already sees `workers`."""
    registry = CollectorRegistry()
    cfg = FrontendConfig(http_host="127.0.0.1", http_port=0, **config)  # type: ignore[arg-type]
    async with Frontend(stack.runtime, cfg, lambda card: RoundRobinRouter(), registry=registry) as frontend:
        await _wait_for(frontend, *workers)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{frontend.port}", timeout=10) as client:
            yield client, registry, frontend


async def _wait_for(frontend: Frontend, *workers: ScriptedWorker) -> None:
    ids = {w.instance_id for w in workers}
    manager = frontend.manager
    await manager.wait_until(lambda: manager.ready() and ids <= set(manager.models[MODEL].instance_ids()), 5)


def _body(stream: bool = True, max_tokens: int = len(FULL)) -> dict[str, object]:
    return {"model": MODEL, "prompt": "hello there", "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}


def _events(text: str) -> list[dict[str, object]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def _text(sse: str) -> str:
    return "".join(str(e["choices"][0]["text"]) for e in _events(sse) if e.get("choices"))


async def test_broken_stream_migrates_with_prompt_plus_generated_tokens(stack: Stack) -> None:
    a = await _start(stack, gate=asyncio.Event())
    async with _frontend(stack, a, migration_limit=2) as (client, registry, frontend):
        async with client.stream("POST", "/v1/completions", json=_body()) as resp:
            assert resp.status_code == 200
            lines = resp.aiter_lines()
            first = await anext(lines)
            assert first.startswith("data: ")
            b = await _start(stack, ContinuingWorker)
            await _wait_for(frontend, b)
            assert a.served is not None
            await a.served.stop()  # the worker goes away mid-stream: its stream breaks
            rest = "\n".join([line async for line in lines])
        assert "error" not in rest
        assert rest.rstrip().endswith("data: [DONE]")
        migrated = b.requests[0]
        assert migrated.token_ids == [*a.requests[0].token_ids, FULL[0]]
        assert migrated.generated_before == 1
        assert migrated.stop.max_tokens == len(FULL)  # engines subtract generated_before themselves
        assert registry.get_sample_value("dynamo_frontend_migrations_total", {"model": MODEL}) == 1
        # Worker b alone, undisturbed, produces the reference text: no token lost or repeated.
        reference = await client.post("/v1/completions", json=_body(stream=False))
        assert _text(first + "\n" + rest) == reference.json()["choices"][0]["text"]


async def test_without_migration_a_broken_stream_ends_with_an_error_event(stack: Stack) -> None:
    a = await _start(stack, gate=asyncio.Event())
    async with _frontend(stack, a, migration_limit=0) as (client, _, _f):
        async with client.stream("POST", "/v1/completions", json=_body()) as resp:
            lines = resp.aiter_lines()
            await anext(lines)
            assert a.served is not None
            await a.served.stop()
            rest = "\n".join([line async for line in lines])
    assert '"code":"stream_broken"' in rest.replace(" ", "")
    assert rest.rstrip().endswith("data: [DONE]")


async def test_timeout_before_first_token_is_504_and_cancels_the_worker(stack: Stack) -> None:
    worker = await _start(stack, StallingWorker)
    async with _frontend(stack, worker, request_timeout_s=0.2) as (client, _, _f):
        resp = await client.post("/v1/completions", json=_body(stream=False))
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "request_timeout"
    await asyncio.wait_for(worker.cancelled.wait(), 5)


async def test_timeout_mid_stream_ends_with_an_error_event_and_cancels(stack: Stack) -> None:
    worker = await _start(stack, gate=asyncio.Event())
    async with _frontend(stack, worker, request_timeout_s=0.3) as (client, _, _f):
        resp = await client.post("/v1/completions", json=_body())
    assert resp.status_code == 200
    assert '"code":"request_timeout"' in resp.text.replace(" ", "")
    assert resp.text.rstrip().endswith("data: [DONE]")
    await asyncio.wait_for(worker.cancelled.wait(), 5)


async def test_inflight_limit_answers_429_with_retry_after(stack: Stack) -> None:
    gate = asyncio.Event()
    worker = await _start(stack, gate=gate)
    async with _frontend(stack, worker, max_inflight_requests=1) as (client, registry, _f):
        async with client.stream("POST", "/v1/completions", json=_body()) as held:
            lines = held.aiter_lines()
            await anext(lines)
            resp = await client.post("/v1/completions", json=_body(stream=False))
            assert resp.status_code == 429
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["code"] == "too_many_requests"
            gate.set()
            assert "data: [DONE]" in [line async for line in lines]
        assert (await client.post("/v1/completions", json=_body(stream=False))).status_code == 200
        assert registry.get_sample_value("dynamo_frontend_rejected_requests_total", {"reason": "overloaded"}) == 1


async def test_every_worker_overloaded_is_503_with_retry_after(stack: Stack) -> None:
    workers = [await _start(stack, OverloadedWorker) for _ in range(2)]
    async with _frontend(stack, *workers) as (client, _, _f):
        resp = await client.post("/v1/completions", json=_body(stream=False))
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "overloaded"
    assert all(len(w.requests) == 1 for w in workers)  # each was tried once


async def test_api_key_guards_v1_but_not_probes(stack: Stack) -> None:
    worker = await _start(stack)
    async with _frontend(stack, worker, api_keys=("k1", "k2")) as (client, _, _f):
        missing = await client.post("/v1/completions", json=_body(stream=False))
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = await client.post("/v1/completions", json=_body(stream=False), headers={"Authorization": "Bearer k2"})
        assert ok.status_code == 200
        # Anthropic's clients send x-api-key.
        assert (await client.get("/v1/models", headers={"x-api-key": "k1"})).status_code == 200
        assert (await client.get("/v1/models", headers={"x-api-key": "nope"})).status_code == 401
        for path in ("/health", "/ready", "/metrics", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path


async def test_cors_is_off_by_default_and_on_when_configured(stack: Stack) -> None:
    worker = await _start(stack)
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with _frontend(stack, worker) as (off, _, _f):
        resp = await off.options("/v1/completions", headers=preflight)
        assert "access-control-allow-origin" not in resp.headers
    config = {"cors_allow_origins": ("https://app.example",), "api_keys": ("k",)}
    async with _frontend(stack, worker, **config) as (on, _, _f):
        resp = await on.options("/v1/completions", headers=preflight)
        assert resp.status_code == 200  # the preflight needs no key
        assert resp.headers["access-control-allow-origin"] == "https://app.example"
