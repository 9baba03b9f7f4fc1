"""The OpenAI surface on the frontend's side, over a scripted worker: n choices, prompt lists,
logprobs (chat and legacy completions shapes, echo), forced and parsed tool calls, structured
output constraints reaching the worker, reasoning; streamed answers equal non-streamed ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest

from frontend.tokenizer import ModelTokenizer
from tests.unit.frontend.conftest import MODEL, TINY_MODEL, Stack, start_worker

# A Hermes/Qwen-style template on the tiny model's tokenizer: it reads `tools`, writes earlier
# calls back as <tool_call> JSON, and opens a <think> block when asked to.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n"
    'Call tools as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
    "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tools-model")
    for name in ("tokenizer.json", "generation_config.json", "config.json"):
        if (Path(TINY_MODEL) / name).is_file():
            shutil.copy(Path(TINY_MODEL) / name, root / name)
    config = json.loads((Path(TINY_MODEL) / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOLS_TEMPLATE
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return str(root)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def events(raw: str) -> list[dict[str, Any]]:
    out = []
    for e in raw.split("\n\n"):
        if e and e != "data: [DONE]":
            assert e.startswith("data: "), e
            out.append(json.loads(e[len("data: "):]))
    return out


def ids(tokenizer: ModelTokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def streamed_calls(chunks: list[dict[str, Any]], index: int = 0) -> list[dict[str, str]]:
    """Tool-call fragments of one choice, concatenated as an OpenAI client does."""
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for choice in c["choices"]:
            if choice["index"] != index:
                continue
            for frag in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(frag["index"], {"id": "", "name": "", "arguments": ""})
                call["id"] = frag.get("id") or call["id"]
                fn = frag.get("function") or {}
                call["name"] = fn.get("name") or call["name"]
                call["arguments"] += fn.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


# ------------------------------------------------------------------------------ n and batches


async def test_n_choices_fan_out_with_distinct_seeds(stack: Stack, tokenizer: ModelTokenizer) -> None:
    script = ids(tokenizer, "one two three")
    worker = await start_worker(stack, script)
    resp = await stack.client.post("/v1/chat/completions", json=chat(n=3, seed=7, temperature=1.0, max_tokens=20))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "one two three" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 3 * len(script)
    assert body["usage"]["prompt_tokens"] == len(worker.requests[0].token_ids)  # the prompt counts once
    assert sorted(r.sampling.seed for r in worker.requests) == [7, 8, 9]
    assert len({r.request_id for r in worker.requests}) == 3


async def test_n_choices_stream(stack: Stack, tokenizer: ModelTokenizer) -> None:
    await start_worker(stack, ids(tokenizer, "alpha beta"))
    resp = await stack.client.post(
        "/v1/chat/completions", json=chat(n=2, max_tokens=20, stream=True, stream_options={"include_usage": True})
    )
    chunks = events(resp.text)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content") or "" for c in mine) == "alpha beta"
        assert mine[-1]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2 * len(ids(tokenizer, "alpha beta"))


async def test_completion_prompt_list_and_echo(stack: Stack, tokenizer: ModelTokenizer) -> None:
    worker = await start_worker(stack, ids(tokenizer, " end"))
    resp = await stack.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": ["first", "second"], "n": 2, "echo": True, "max_tokens": 5}
    )
    assert resp.status_code == 200, resp.text
    texts = [c["text"] for c in resp.json()["choices"]]
    assert texts == ["first end", "first end", "second end", "second end"]
    assert len(worker.requests) == 4


# ------------------------------------------------------------------------------------ logprobs


async def test_chat_logprobs(stack: Stack, tokenizer: ModelTokenizer) -> None:
    script = ids(tokenizer, "Hello world")
    await start_worker(stack, script)
    resp = await stack.client.post("/v1/chat/completions", json=chat(logprobs=True, top_logprobs=2, max_tokens=10))
    content = resp.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [tokenizer.decode([t]) for t in script]
    for c in content:
        assert len(c["top_logprobs"]) == 2
        assert c["logprob"] == max(t["logprob"] for t in c["top_logprobs"])
        assert bytes(c["bytes"]).decode() == c["token"]
    stream = await stack.client.post(
        "/v1/chat/completions", json=chat(logprobs=True, top_logprobs=2, max_tokens=10, stream=True)
    )
    streamed = [lp for c in events(stream.text) for ch in c["choices"] for lp in (ch.get("logprobs") or {}).get("content") or []]
    assert streamed == content


async def test_completion_legacy_logprobs_with_echo(stack: Stack, tokenizer: ModelTokenizer) -> None:
    script = ids(tokenizer, " there")
    await start_worker(stack, script)
    resp = await stack.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Hello you", "logprobs": 1, "echo": True, "max_tokens": 5}
    )
    choice = resp.json()["choices"][0]
    lp = choice["logprobs"]
    prompt = tokenizer.encode("Hello you", add_special_tokens=True)
    assert len(lp["tokens"]) == len(prompt) + len(script)
    assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1] == -1.0
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"])
    assert choice["text"] == "Hello you there"


# ---------------------------------------------------------------------------------- tool calls


async def test_named_tool_choice_constrains_and_returns_the_call(
    stack: Stack, tokenizer: ModelTokenizer, tools_model: str
) -> None:
    args = '{"city": "Paris"}'
    worker = await start_worker(stack, ids(tokenizer, args), model_path=tools_model, finish="stop")
    body = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=50)
    resp = await stack.client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("get_weather", args)]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"
    sent = worker.requests[0]
    assert sent.constraint is not None and sent.constraint.kind == "json_schema"
    assert json.loads(sent.constraint.spec) == WEATHER["function"]["parameters"]
    # The template saw the tools.
    assert "get_weather" in tokenizer.decode(sent.token_ids, skip_special_tokens=False)
    stream = await stack.client.post("/v1/chat/completions", json={**body, "stream": True})
    streamed = streamed_calls(events(stream.text))
    assert [(c["name"], c["arguments"]) for c in streamed] == [("get_weather", args)]


async def test_required_tool_choice(stack: Stack, tokenizer: ModelTokenizer, tools_model: str) -> None:
    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'
    worker = await start_worker(stack, ids(tokenizer, text), model_path=tools_model)
    body = chat(tools=[WEATHER, TIME], tool_choice="required", max_tokens=100)
    resp = await stack.client.post("/v1/chat/completions", json=body)
    calls = resp.json()["choices"][0]["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {}),
    ]
    assert len({c["id"] for c in calls}) == 2
    schema = json.loads(worker.requests[0].constraint.spec)  # type: ignore[union-attr]
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    single = await stack.client.post("/v1/chat/completions", json={**body, "parallel_tool_calls": False})
    assert single.status_code == 200
    assert json.loads(worker.requests[-1].constraint.spec)["maxItems"] == 1  # type: ignore[union-attr]
    stream = await stack.client.post("/v1/chat/completions", json={**body, "stream": True})
    assert [(c["name"], c["arguments"]) for c in streamed_calls(events(stream.text))] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls
    ]


async def test_tool_call_history_reaches_the_template(stack: Stack, tokenizer: ModelTokenizer, tools_model: str) -> None:
    worker = await start_worker(stack, ids(tokenizer, "It is sunny."), model_path=tools_model)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    resp = await stack.client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages, "tools": [WEATHER], "tool_choice": "none"}
    )
    assert resp.status_code == 200, resp.text
    prompt = tokenizer.decode(worker.requests[0].token_ids, skip_special_tokens=False)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    assert "<tools>" not in prompt  # tool_choice none: the model is not offered the tools


async def test_auto_tool_calls_parsed_from_the_model_format(
    stack: Stack, tokenizer: ModelTokenizer, tools_model: str
) -> None:
    text = 'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    await start_worker(stack, ids(tokenizer, text), model_path=tools_model, finish="stop")
    body = chat(tools=[WEATHER], max_tokens=100)
    resp = await stack.client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["message"]["content"] == "Let me check."
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("get_weather", {"city": "Rome"})]
    stream = await stack.client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = events(stream.text)
    assert [(c["name"], c["arguments"]) for c in streamed_calls(chunks)] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls
    ]
    assert "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"]) == "Let me check."


# --------------------------------------------------------------------------- structured output


@pytest.mark.parametrize(
    ("extra", "kind", "spec"),
    [
        ({"response_format": {"type": "json_object"}}, "json_object", ""),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}}},
            "json_schema",
            '{"type": "object"}',
        ),
        ({"structured_outputs": {"regex": "[a-z]+"}}, "regex", "[a-z]+"),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", '["yes", "no"]'),
        ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"'),
    ],
)
async def test_constraints_reach_the_worker(
    stack: Stack, tokenizer: ModelTokenizer, extra: dict[str, Any], kind: str, spec: str
) -> None:
    worker = await start_worker(stack, ids(tokenizer, "{}"))
    resp = await stack.client.post("/v1/chat/completions", json=chat(max_tokens=5, **extra))
    assert resp.status_code == 200, resp.text
    constraint = worker.requests[0].constraint
    assert constraint is not None and (constraint.kind, constraint.spec) == (kind, spec)


async def test_sampling_fields_reach_the_worker(stack: Stack, tokenizer: ModelTokenizer) -> None:
    worker = await start_worker(stack, ids(tokenizer, "x"))
    body = chat(
        max_tokens=5, logit_bias={"17": 5.5, "18": -100}, frequency_penalty=0.5, presence_penalty=-0.5,
        repetition_penalty=1.2, min_p=0.1, top_k=4, user="u1",
    )
    resp = await stack.client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    s = worker.requests[0].sampling
    assert s.logit_bias == {17: 5.5, 18: -100.0}
    assert (s.frequency_penalty, s.presence_penalty, s.repetition_penalty, s.min_p, s.top_k) == (0.5, -0.5, 1.2, 0.1, 4)


# ----------------------------------------------------------------------------------- reasoning


async def test_reasoning_split_from_content(stack: Stack, tokenizer: ModelTokenizer, tmp_path: Path) -> None:
    root = tmp_path / "think-model"
    shutil.copytree(TINY_MODEL, root, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = json.loads((root / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOLS_TEMPLATE + "{# <think> #}"
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    text = "<think>Two plus two.</think>Four."
    await start_worker(stack, ids(tokenizer, text), model_path=str(root), finish="stop")
    resp = await stack.client.post("/v1/chat/completions", json=chat(max_tokens=50))
    message = resp.json()["choices"][0]["message"]
    assert message["reasoning_content"] == "Two plus two." and message["content"] == "Four."
    stream = await stack.client.post("/v1/chat/completions", json=chat(max_tokens=50, stream=True))
    deltas = [ch["delta"] for c in events(stream.text) for ch in c["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Two plus two."
    assert "".join(d.get("content") or "" for d in deltas) == "Four."
    off = await stack.client.post("/v1/chat/completions", json=chat(max_tokens=50, chat_template_kwargs={"enable_thinking": False}))
    assert off.json()["choices"][0]["message"]["content"] == text


def test_chunk_templates_are_the_struct_encoding() -> None:
    """The per-token byte templates are the schema Struct with the text cut out: one shape."""
    from frontend.schemas import ChatChunkChoice, ChatCompletionChunk, ChunkDelta
    from frontend.sse import ChunkWriter

    w = ChunkWriter("chat", "id-1", 5, "m", include_usage=True)
    w.first("a")
    assert w.text('x"y', index=0) == b"data: " + msgspec.json.encode(
        ChatCompletionChunk("id-1", "chat.completion.chunk", 5, "m", [ChatChunkChoice(0, ChunkDelta(content='x"y'))], None)
    ) + b"\n\n"
