"""The app over the embedded runtime with a real (scripted) worker handler: chat and text
completions, streaming and not, usage, stop strings, models, readiness, metrics, cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from frontend.schemas import ChatCompletionChunk, ChatMessage, ChatCompletionResponse, CompletionChunk, CompletionResponse
from frontend.tokenizer import ModelTokenizer
from tests.unit.frontend.conftest import MODEL, Stack, start_worker

TEXT = "Hello world, this is a test of the frontend."


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def sse_events(raw: str) -> list[str]:
    assert raw.endswith("\n\n")
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


async def test_chat_non_streaming_with_usage(stack: Stack, tokenizer: ModelTokenizer) -> None:
    script = tokenizer.encode(TEXT, add_special_tokens=False)
    worker = await start_worker(stack, script)
    resp = await stack.client.post("/v1/chat/completions", json=chat_body(max_tokens=100))
    assert resp.status_code == 200, resp.text
    body = msgspec.json.decode(resp.content, type=ChatCompletionResponse)
    assert body.choices[0].message.content == TEXT
    assert body.choices[0].finish_reason == "length"
    prompt = tokenizer.encode(tokenizer.render_chat([ChatMessage(role="user", content="hi")]), add_special_tokens=False)
    assert body.usage.prompt_tokens == len(prompt)
    assert body.usage.completion_tokens == len(script)
    assert body.usage.total_tokens == len(prompt) + len(script)
    assert body.usage.prompt_tokens_details is not None and body.usage.prompt_tokens_details.cached_tokens == 3
    sent = worker.requests[0]
    assert sent.token_ids == prompt
    assert sent.stop.max_tokens == 100
    assert set(tokenizer.eos_token_ids) <= set(sent.stop.stop_token_ids)


async def test_chat_streaming_with_include_usage(stack: Stack, tokenizer: ModelTokenizer) -> None:
    script = tokenizer.encode(TEXT, add_special_tokens=False)
    await start_worker(stack, script)
    resp = await stack.client.post(
        "/v1/chat/completions",
        json=chat_body(max_tokens=50, stream=True, stream_options={"include_usage": True}),
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [msgspec.json.decode(e, type=ChatCompletionChunk) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(script)
    assert len({c.id for c in chunks}) == 1


async def test_eos_ends_with_stop_and_is_not_in_text(stack: Stack, tokenizer: ModelTokenizer) -> None:
    script = tokenizer.encode("Done here", add_special_tokens=False) + [tokenizer.eos_token_ids[0]]
    await start_worker(stack, script)
    resp = await stack.client.post("/v1/chat/completions", json=chat_body())
    body = resp.json()
    assert body["choices"][0]["message"]["content"] == "Done here"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(script)


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_string_truncates_and_cancels_worker(stack: Stack, tokenizer: ModelTokenizer, stream: bool) -> None:
    script = tokenizer.encode(TEXT, add_special_tokens=False)
    worker = await start_worker(stack, script)
    resp = await stack.client.post("/v1/chat/completions", json=chat_body(stop=["is a", "zzz"], stream=stream))
    assert resp.status_code == 200
    if stream:
        chunks = [msgspec.json.decode(e, type=ChatCompletionChunk) for e in sse_events(resp.text)[:-1]]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        text = resp.json()["choices"][0]["message"]["content"]
        reason = resp.json()["choices"][0]["finish_reason"]
    assert text == "Hello world, this "
    assert reason == "stop"


async def test_completions_streaming_and_not(stack: Stack, tokenizer: ModelTokenizer) -> None:
    script = tokenizer.encode(TEXT, add_special_tokens=False)
    worker = await start_worker(stack, script)
    resp = await stack.client.post("/v1/completions", json={"model": MODEL, "prompt": "The for statement", "max_tokens": 5})
    body = msgspec.json.decode(resp.content, type=CompletionResponse)
    assert body.choices[0].text == tokenizer.decode(script[:5])
    assert body.choices[0].finish_reason == "length"
    assert body.usage.completion_tokens == 5
    assert worker.requests[0].token_ids == tokenizer.encode("The for statement", add_special_tokens=True)

    resp = await stack.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7], "stream": True, "max_tokens": 100}
    )
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [msgspec.json.decode(e, type=CompletionChunk) for e in events[:-1]]
    assert "".join(c.choices[0].text for c in chunks) == TEXT
    assert chunks[-1].choices[0].finish_reason == "length"
    assert worker.requests[1].token_ids == [5, 6, 7]


async def test_max_tokens_defaults_to_rest_of_context(stack: Stack, tokenizer: ModelTokenizer) -> None:
    worker = await start_worker(stack, [10, 11])
    await stack.client.post("/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7]})
    assert worker.requests[0].stop.max_tokens == 256 - 3


async def test_models_and_ready_follow_workers(stack: Stack) -> None:
    resp = await stack.client.get("/ready")
    assert resp.status_code == 503
    assert (await stack.client.get("/v1/models")).json() == {"data": [], "object": "list"}
    assert (await stack.client.get("/health")).status_code == 200
    worker = await start_worker(stack, [10])
    resp = await stack.client.get("/ready")
    assert resp.status_code == 200
    assert resp.json()["models"] == [{"name": MODEL, "instances": [worker.instance_id]}]
    models = (await stack.client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    await worker.runtime.shutdown()  # revokes the lease: the model goes away
    await stack.manager.wait_until(lambda: MODEL not in stack.manager.models, 5)
    assert (await stack.client.get("/ready")).status_code == 503
    resp = await stack.client.post("/v1/chat/completions", json=chat_body())
    assert resp.status_code == 404


async def test_metrics_are_exposed(stack: Stack, tokenizer: ModelTokenizer) -> None:
    await start_worker(stack, tokenizer.encode(TEXT, add_special_tokens=False))
    await stack.client.post("/v1/chat/completions", json=chat_body(stream=True))
    await stack.client.post("/v1/chat/completions", json=chat_body(temperature=9))
    text = (await stack.client.get("/metrics")).text
    for name in (
        "dynamo_frontend_requests_total",
        "dynamo_frontend_inflight_requests",
        "dynamo_frontend_time_to_first_token_seconds",
        "dynamo_frontend_inter_token_latency_seconds",
        "dynamo_frontend_input_sequence_tokens",
        "dynamo_frontend_output_sequence_tokens",
        "dynamo_frontend_request_duration_seconds",
    ):
        assert name in text, name
    assert 'dynamo_frontend_requests_total{endpoint="chat_completions",model="tiny",request_type="stream",status="success"} 1.0' in text
    assert 'status="error"' in text
    assert 'dynamo_frontend_inflight_requests{model="tiny"} 0.0' in text


async def test_no_live_instance_is_503(stack: Stack) -> None:
    worker = await start_worker(stack, [10])
    assert worker.served is not None
    await worker.served.deregister()  # the model card stays, the endpoint instance is gone
    model = stack.manager.models[MODEL]
    await stack.manager.wait_until(lambda: not model.instance_ids(), 5)
    resp = await stack.client.post("/v1/chat/completions", json=chat_body())
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "no_instances"


async def test_worker_error_before_output_is_5xx(stack: Stack) -> None:
    await start_worker(stack, [10, 11, 12], fail_after=0)
    resp = await stack.client.post("/v1/chat/completions", json=chat_body())
    assert resp.status_code == 500  # the worker's handler raised: internal_error, carried over
    assert "engine exploded" in resp.json()["error"]["message"]


async def test_worker_error_mid_stream_ends_with_error_event(stack: Stack, tokenizer: ModelTokenizer) -> None:
    await start_worker(stack, tokenizer.encode(TEXT, add_special_tokens=False), fail_after=3)
    resp = await stack.client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status_code == 200
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    error = msgspec.json.decode(events[-2])["error"]
    assert "engine exploded" in error["message"] and error["type"] == "server_error"
    resp = await stack.client.post("/v1/chat/completions", json=chat_body())  # non-streaming: 500
    assert resp.status_code == 500


async def test_dead_instance_is_skipped(stack: Stack, tokenizer: ModelTokenizer) -> None:
    good = await start_worker(stack, [10, 11])
    bad = await start_worker(stack, [12])
    assert bad.served is not None
    # The instance stays registered but nobody serves its address any more.
    await bad.served.served.stop()
    for _ in range(4):
        resp = await stack.client.post("/v1/chat/completions", json=chat_body())
        assert resp.status_code == 200, resp.text
    assert len(good.requests) == 4


async def _asgi_call(app: Any, body: dict[str, Any], disconnect: asyncio.Event) -> list[dict[str, Any]]:
    """Drive the ASGI app directly so the test decides exactly when the client disconnects."""
    sent: list[dict[str, Any]] = []
    payload = msgspec.json.encode(body)
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_worker(stack: Stack, stream: bool) -> None:
    gate = asyncio.Event()  # never set: the worker stalls after its first token
    worker = await start_worker(stack, [10, 11, 12, 13], gate=gate)
    disconnect = asyncio.Event()
    call = asyncio.create_task(_asgi_call(stack.app, chat_body(stream=stream), disconnect))
    await worker.started.wait()
    disconnect.set()
    sent = await asyncio.wait_for(call, 5)
    await asyncio.wait_for(worker.cancelled.wait(), 5)
    if stream:
        assert sent[0]["status"] == 200  # the first token was streamed before the disconnect
    text = (await stack.client.get("/metrics")).text
    assert 'status="cancelled"' in text
    assert 'dynamo_frontend_inflight_requests{model="tiny"} 0.0' in text


async def test_single_token_stream_is_not_duplicated(stack: Stack, tokenizer: ModelTokenizer) -> None:
    script = tokenizer.encode(TEXT, add_special_tokens=False)
    await start_worker(stack, script)
    resp = await stack.client.post("/v1/chat/completions", json=chat_body(max_tokens=1, stream=True))
    chunks = [msgspec.json.decode(e, type=ChatCompletionChunk) for e in sse_events(resp.text)[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == tokenizer.decode(script[:1])
    assert chunks[-1].choices[0].finish_reason == "length"
