"""End to end over HTTP: the Responses API, Anthropic Messages and tokenize/detokenize through
two frontend processes and a mocker worker on real nats-server and etcd, driven with the
official `openai` and `anthropic` clients. A conversation started on one frontend continues
on the other (the response store is etcd).

The mocker draws random tokens, so answers are checked for shape, accounting and routing, not
content; tool calls parsed from model output are covered over the real pipeline in
tests/unit/frontend/{anthropic_api,responses_api}."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.e2e.procs import TINY_MODEL, Stack, base_env, free_port, http_ok, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MODEL = "tiny"

# The tiny model's tokenizer with a template that presents tools (Hermes style), so that
# requests with tools are served rather than refused.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WEATHER_OPENAI = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_ANTHROPIC = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def _tools_model(root: Path) -> str:
    model = root / "tools-model"
    shutil.copytree(TINY_MODEL, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOLS_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return str(model)


@pytest.fixture(scope="module")
def frontends(nats_server: str, etcd_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Two frontends (A, B) of one namespace on one etcd, and one mocker worker."""
    tmp: Path = tmp_path_factory.mktemp("api")
    env = base_env(
        NATS_SERVER=nats_server,
        ETCD_ENDPOINTS=etcd_server,
        DYN_NAMESPACE=f"api{free_port()}",
        DYN_LEASE_TTL_S="2",
        DYN_REQUEST_ACK_TIMEOUT_S="2",
    )
    s = Stack(tmp, env)
    s.start(
        "worker", "dynamo.worker", "--engine", "mocker", "--model", _tools_model(tmp),
        "--served-model-name", MODEL, "--speedup-ratio", "100",
    )
    bases = []
    for name in ("frontend-a", "frontend-b"):
        port = free_port()
        s.start(name, "dynamo.frontend", "--http-port", str(port), "--router-mode", "round-robin")
        bases.append(f"http://127.0.0.1:{port}")
    try:
        for base in bases:
            wait_until(lambda: http_ok(f"{base}/ready"), 90, f"{base} ready with the model")
    except TimeoutError:
        logs = "\n".join(f"--- {p.name}\n{p.log()}" for p in s.procs)
        s.stop_all()
        raise AssertionError(f"stack did not come up:\n{logs}") from None
    yield bases[0], bases[1]
    s.stop_all()


def oai(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)


def claude(base: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=30)


# ------------------------------------------------------------------------------- Responses API


def test_response_text(frontends: tuple[str, str]) -> None:
    a, _ = frontends
    response = oai(a).responses.create(model=MODEL, input="Say something.", max_output_tokens=8)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 8
    assert response.output[0].type == "message" and response.output_text


def test_response_streaming(frontends: tuple[str, str]) -> None:
    a, _ = frontends
    events = list(oai(a).responses.create(model=MODEL, input="Stream something.", max_output_tokens=6, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.incomplete"  # max_output_tokens reached
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text


def test_response_with_function_tools(frontends: tuple[str, str]) -> None:
    a, _ = frontends
    client = oai(a)
    first = client.responses.create(
        model=MODEL, input="Weather in Rome?", tools=[WEATHER_OPENAI], max_output_tokens=6  # type: ignore[list-item]
    )
    assert first.tools[0].name == "get_weather"  # type: ignore[union-attr]
    # A function call and its output continue the conversation.
    follow = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[WEATHER_OPENAI], max_output_tokens=4,  # type: ignore[list-item]
        input=[
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
        ],
    )
    assert follow.usage is not None and first.usage is not None
    assert follow.usage.input_tokens > first.usage.input_tokens


def test_conversation_continues_on_another_frontend(frontends: tuple[str, str]) -> None:
    a, b = frontends
    first = oai(a).responses.create(model=MODEL, input="Name a color.", max_output_tokens=5)
    assert oai(b).responses.retrieve(first.id).output_text == first.output_text
    second = oai(b).responses.create(model=MODEL, input="Another one?", previous_response_id=first.id, max_output_tokens=5)
    assert second.previous_response_id == first.id
    assert first.usage is not None and second.usage is not None
    # The second prompt holds the first one, its answer and the new input.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    tokenized = httpx.post(
        f"{b}/tokenize",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Name a color."}]},
        timeout=10,
    ).json()
    assert tokenized["count"] == first.usage.input_tokens
    oai(b).responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oai(a).responses.retrieve(first.id)


def test_responses_bad_inputs(frontends: tuple[str, str]) -> None:
    a, _ = frontends
    with pytest.raises(openai.BadRequestError) as info:
        oai(a).responses.create(model=MODEL, input="x", previous_response_id="resp_unknown")
    assert info.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]
    for body in ({"model": MODEL, "input": []}, {"model": MODEL, "input": ""}):
        resp = httpx.post(f"{a}/v1/responses", json=body, timeout=10)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "input"


# -------------------------------------------------------------------------- Anthropic Messages


def test_messages_non_streaming(frontends: tuple[str, str]) -> None:
    _, b = frontends
    message = claude(b).messages.create(
        model=MODEL, max_tokens=7, system="Be brief.", messages=[{"role": "user", "content": "Hello"}]
    )
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 7
    assert message.content[0].type == "text" and message.content[0].text
    count = claude(b).messages.count_tokens(model=MODEL, system="Be brief.", messages=[{"role": "user", "content": "Hello"}])
    assert count.input_tokens == message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)


def test_messages_streaming_with_tools(frontends: tuple[str, str]) -> None:
    a, _ = frontends
    history = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}]},
    ]
    names = []
    with claude(a).messages.stream(model=MODEL, max_tokens=6, tools=[WEATHER_ANTHROPIC], messages=history) as stream:  # type: ignore[arg-type,list-item]
        for event in stream:
            names.append(event.type)
        final = stream.get_final_message()
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert "content_block_delta" in names and "message_delta" in names
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 6
    plain = claude(a).messages.create(model=MODEL, max_tokens=6, messages=[{"role": "user", "content": "Weather in Rome?"}])
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) > plain.usage.input_tokens + (
        plain.usage.cache_read_input_tokens or 0
    )  # the tools, the call and its result are in the prompt


def test_messages_bad_inputs(frontends: tuple[str, str]) -> None:
    a, _ = frontends
    resp = httpx.post(f"{a}/v1/messages", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, timeout=10)
    assert resp.status_code == 400
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as info:
        claude(a).messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):
        claude(a).messages.create(model=MODEL, max_tokens=5, messages=[])


# ------------------------------------------------------------------------ tokenize/detokenize


def test_tokenize_detokenize(frontends: tuple[str, str]) -> None:
    a, _ = frontends
    tokens = httpx.post(f"{a}/tokenize", json={"model": MODEL, "prompt": "Hello world"}, timeout=10).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] > 0
    text = httpx.post(f"{a}/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}, timeout=10).json()
    assert text["prompt"].endswith("Hello world")
