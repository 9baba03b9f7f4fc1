"""End to end over the direct TCP request plane: `python -m dynamo.frontend` and two mocker
workers started with DYN_REQUEST_PLANE=tcp on real nats-server (events) and etcd (discovery),
driven with the official openai client; a worker is SIGKILLed under streaming load and the
frontend migrates its streams to the survivor."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from dynamo.config import RuntimeConfig
from dynamo.runtime import Runtime
from dynamo.wire import INSTANCE_CODEC
from tests.e2e.procs import TINY_MODEL, Stack, base_env, free_port, http_ok, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MODEL = "tiny"
STREAMS = 24
MAX_TOKENS = 120  # ~1 s per stream at --speedup-ratio 1: long enough to be cut by the kill


def _instances(base: str) -> list[int]:
    try:
        body = httpx.get(f"{base}/ready", timeout=1.0).json()
    except (httpx.HTTPError, ValueError):
        return []
    return next((list(m["instances"]) for m in body.get("models", []) if m.get("name") == MODEL), [])


@pytest.fixture(scope="module")
def stack(nats_server: str, etcd_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str, str]]:
    tmp: Path = tmp_path_factory.mktemp("e2e-tcp")
    namespace = f"tcp{free_port()}"
    env = base_env(
        NATS_SERVER=nats_server,
        ETCD_ENDPOINTS=etcd_server,
        DYN_NAMESPACE=namespace,
        DYN_LEASE_TTL_S="2",
        DYN_REQUEST_ACK_TIMEOUT_S="2",
        DYN_REQUEST_PLANE="tcp",
        DYN_REQUEST_PLANE_HOST="127.0.0.1",
    )
    s = Stack(tmp, env)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    worker_args = ("dynamo.worker", "--engine", "mocker", "--model", TINY_MODEL,
                   "--served-model-name", MODEL, "--speedup-ratio", "1")
    s.start("worker-a", *worker_args)
    s.start("worker-b", *worker_args)
    s.start("frontend", "dynamo.frontend", "--http-port", str(port), "--router-mode", "round-robin",
            "--migration-limit", "3")
    try:
        wait_until(lambda: http_ok(f"{base}/ready"), 90, "frontend ready with the model")
        wait_until(lambda: len(_instances(base)) == 2, 60, "both workers registered")
    except TimeoutError:
        logs = "\n".join(f"--- {p.name}\n{p.log()}" for p in s.procs)
        s.stop_all()
        raise AssertionError(f"stack did not come up:\n{logs}") from None
    yield s, base, etcd_server
    s.stop_all()


def test_workers_advertise_tcp_addresses(stack: tuple[Stack, str, str]) -> None:
    s, _, etcd = stack
    namespace = s.env["DYN_NAMESPACE"]

    async def read() -> list[str]:
        config = RuntimeConfig(backend="distributed", nats_server=s.env["NATS_SERVER"], etcd_endpoints=(etcd,),
                               namespace=namespace)
        async with await Runtime.create(config) as rt:
            records = await rt.discovery.get_prefix(f"v1/instances/{namespace}/")
            return [INSTANCE_CODEC.decode(v).transport for v in records.values()]

    transports = asyncio.run(read())
    generate = [t for t in transports if "/" in t and t.rsplit("/", 1)[1].split(".")[2] == "generate"]
    assert len(generate) == 2 and all(t.startswith("tcp://127.0.0.1:") for t in generate), transports


def test_chat_completion_over_tcp(stack: tuple[Stack, str, str]) -> None:
    _, base, _ = stack
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello over tcp"}], max_tokens=8,
        extra_body={"ignore_eos": True},
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 8


def test_sigkill_worker_mid_stream_migrates_every_stream(stack: tuple[Stack, str, str]) -> None:
    """Last in this module: it kills a worker."""
    s, base, _ = stack

    async def run() -> list[tuple[str | None, int]]:
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=45)
        started = asyncio.Event()
        first_tokens = [0]

        async def one(i: int) -> tuple[str | None, int]:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"stream {i}"}], max_tokens=MAX_TOKENS,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )
            reason, tokens, seen_first = None, 0, False
            async for chunk in stream:
                if chunk.choices and not seen_first:
                    seen_first = True
                    first_tokens[0] += 1
                    if first_tokens[0] == STREAMS:
                        started.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    reason = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return reason, tokens

        tasks = [asyncio.create_task(one(i)) for i in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 30)
        victim = next(p for p in s.procs if p.name == "worker-b")
        await asyncio.to_thread(victim.kill, signal.SIGKILL)
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            await client.close()

    results = asyncio.run(run())
    assert results == [("length", MAX_TOKENS)] * STREAMS
    wait_until(lambda: len(_instances(base)) == 1, 30, "the killed worker's lease to expire")
