"""End to end over HTTP: a frontend and two mocker workers in separate processes on real
nats-server and etcd, driven with the official openai client."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.procs import TINY_MODEL, Stack, base_env, free_port, http_ok, metric_samples, metric_sum, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MODEL = "tiny"
LEASE_TTL_S = "2"


@pytest.fixture(scope="module")
def stack(nats_server: str, etcd_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    tmp: Path = tmp_path_factory.mktemp("e2e")
    env = base_env(
        NATS_SERVER=nats_server,
        ETCD_ENDPOINTS=etcd_server,
        DYN_NAMESPACE=f"e2e{free_port()}",
        DYN_LEASE_TTL_S=LEASE_TTL_S,
        DYN_REQUEST_ACK_TIMEOUT_S="2",
    )
    s = Stack(tmp, env)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    worker_args = ("dynamo.worker", "--engine", "mocker", "--model", TINY_MODEL,
                   "--served-model-name", MODEL, "--speedup-ratio", "100")
    s.start("worker-a", *worker_args)
    s.start("worker-b", *worker_args)
    frontend = s.start("frontend", "dynamo.frontend", "--http-port", str(port), "--router-mode", "round-robin")
    try:
        wait_until(lambda: http_ok(f"{base}/ready"), 90, "frontend ready with the model")
        wait_until(lambda: len(_model_instances(base)) == 2 or frontend.popen.poll() is not None,
                   60, "both workers registered")
    except TimeoutError:
        logs = "\n".join(f"--- {p.name}\n{p.log()}" for p in s.procs)
        s.stop_all()
        raise AssertionError(f"stack did not come up:\n{logs}") from None
    yield s, base
    s.stop_all()


@pytest.fixture(scope="module")
def kv_frontend(stack: tuple[Stack, str]) -> str:
    """A second frontend on the same workers, with the KV router."""
    s, _ = stack
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = s.start("frontend-kv", "dynamo.frontend", "--http-port", str(port), "--router-mode", "kv")
    wait_until(lambda: len(_model_instances(base)) == 2 or proc.popen.poll() is not None, 90, "kv frontend sees both workers")
    assert proc.popen.poll() is None, proc.log()
    return base


def _model_instances(base: str) -> list[int]:
    """Instance ids behind the model, from the frontend's own view (the /ready detail)."""
    try:
        body = httpx.get(f"{base}/ready", timeout=1.0).json()
    except (httpx.HTTPError, ValueError):
        return []
    for model in body.get("models", []):
        if model.get("name") == MODEL:
            return list(model.get("instances", []))
    return []


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_lists_the_served_model(stack: tuple[Stack, str]) -> None:
    _, base = stack
    ids = [m.id for m in client(base).models.list().data]
    assert MODEL in ids


def test_chat_completion_non_streaming(stack: tuple[Stack, str]) -> None:
    _, base = stack
    resp = client(base).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about list comprehensions."}],
        max_tokens=12,
        extra_body={"ignore_eos": True},
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens > 5
    assert resp.choices[0].message.content


def test_chat_completion_streaming_with_usage(stack: tuple[Stack, str]) -> None:
    _, base = stack
    chunks = list(
        client(base).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Stream something."}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_completions_endpoint(stack: tuple[Stack, str]) -> None:
    _, base = stack
    resp = client(base).completions.create(
        model=MODEL, prompt="The for statement", max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 8


def test_both_workers_serve_round_robin(stack: tuple[Stack, str]) -> None:
    _, base = stack
    assert len(_model_instances(base)) == 2
    metrics_before = httpx.get(f"{base}/metrics").text
    assert "dynamo_frontend_requests_total" in metrics_before


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "nope"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL}, 400, "messages"),
        ({"model": MODEL, "messages": "hello"}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 7}, 400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 5000}]}, 400, "context"),
    ],
)
def test_bad_input_gets_openai_error(stack: tuple[Stack, str], body: dict, status: int, needle: str) -> None:
    _, base = stack
    resp = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert needle in error["message"] or needle == error.get("param")
    assert error["type"]


def test_malformed_json_is_400(stack: tuple[Stack, str]) -> None:
    _, base = stack
    resp = httpx.post(
        f"{base}/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert resp.status_code == 400
    assert "JSON" in resp.json()["error"]["message"] or "json" in resp.json()["error"]["message"]


def test_killed_worker_is_forgotten_and_requests_keep_succeeding(stack: tuple[Stack, str], kv_frontend: str) -> None:
    """Last in this module: it kills one of the two workers. The KV router's index drops the
    dead worker's blocks once its lease ends."""
    s, base = stack

    # Distinct long prompts sent at once: the KV router spreads the burst over both workers
    # (each sees the other's in-flight load), so both hold indexed blocks.
    async def spread() -> None:
        aclient = openai.AsyncOpenAI(base_url=f"{kv_frontend}/v1", api_key="unused", max_retries=0, timeout=30)
        await asyncio.gather(
            *(
                aclient.completions.create(model=MODEL, prompt=f"prompt {i}: " + "lorem ipsum dolor " * 40, max_tokens=4)
                for i in range(6)
            )
        )
        await aclient.close()

    asyncio.run(spread())
    decisions = {k: v for k, v in (metric_samples(f"{kv_frontend}/metrics", "dynamo_router_decisions_total") or {}).items() if v > 0}
    assert len(decisions) == 2, decisions

    def index_blocks() -> float:
        return metric_sum(f"{kv_frontend}/metrics", "dynamo_router_index_blocks") or 0.0

    wait_until(lambda: index_blocks() >= 6 * 8, 10, "the KV router indexing both workers' blocks")
    indexed = index_blocks()

    victim = next(p for p in s.procs if p.name == "worker-b")
    victim.kill(signal.SIGKILL)
    # Requests right after the kill must still succeed: the frontend skips a worker that does
    # not answer and tries the other one.
    for _ in range(6):
        resp = client(base).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "still there?"}], max_tokens=4
        )
        assert resp.choices[0].message.content is not None
    wait_until(lambda: len(_model_instances(base)) == 1, 30, "the killed worker's lease to expire")
    wait_until(lambda: len(_model_instances(kv_frontend)) == 1, 30, "the kv frontend to forget the killed worker")
    # The dead worker's blocks left the index; the survivor's stayed.
    wait_until(lambda: 0 < index_blocks() < indexed, 10, "the dead worker's blocks to leave the KV index")

    async def burst() -> None:
        aclient = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
        results = await asyncio.gather(
            *(
                aclient.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4
                )
                for i in range(16)
            )
        )
        assert all(r.choices[0].finish_reason in ("length", "stop") for r in results)
        await aclient.close()

    asyncio.run(burst())
