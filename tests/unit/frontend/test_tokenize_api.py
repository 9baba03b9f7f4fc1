"""POST /tokenize and /detokenize (vLLM's shapes) over the real model manager: a prompt or chat
messages in, the model's token ids, count and context length out; and back."""

from __future__ import annotations

import pytest

from frontend.tokenizer import ModelTokenizer
from tests.unit.frontend.conftest import CONTEXT, MODEL, Stack, start_worker
from tests.unit.frontend.responses_api.scripted import serve_apis
from tests.unit.frontend.test_api_surface import WEATHER, tools_model  # noqa: F401 - fixture


@pytest.fixture
async def served(stack: Stack, tokenizer: ModelTokenizer) -> Stack:
    serve_apis(stack)
    stack.worker = await start_worker(stack, [1])  # type: ignore[attr-defined]
    return stack


async def test_tokenize_prompt(served: Stack, tokenizer: ModelTokenizer) -> None:
    resp = await served.client.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["tokens"] == tokenizer.encode("Hello world", add_special_tokens=True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == CONTEXT
    assert "token_strs" not in body
    strs = (await served.client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})).json()
    assert strs["token_strs"] == [tokenizer.tokenizer.id_to_token(i) for i in strs["tokens"]]  # model is optional


async def test_tokenize_chat_matches_the_prompt_a_worker_gets(served: Stack, tokenizer: ModelTokenizer) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    resp = await served.client.post("/tokenize", json={"model": MODEL, "messages": messages})
    chat = await served.client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1})
    assert chat.status_code == 200
    assert resp.json()["tokens"] == served.worker.requests[-1].token_ids  # type: ignore[attr-defined]
    no_prompt = await served.client.post(
        "/tokenize", json={"model": MODEL, "messages": messages, "add_generation_prompt": False}
    )
    assert tokenizer.decode(no_prompt.json()["tokens"], skip_special_tokens=False).endswith("Hi there<|im_end|>\n")


async def test_continue_final_message(served: Stack, tokenizer: ModelTokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once upon"}]
    resp = await served.client.post(
        "/tokenize",
        json={"messages": messages, "add_generation_prompt": False, "continue_final_message": True},
    )
    assert resp.status_code == 200, resp.text
    assert tokenizer.decode(resp.json()["tokens"], skip_special_tokens=False).endswith("assistant\nOnce upon")
    both = await served.client.post("/tokenize", json={"messages": messages, "continue_final_message": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"


async def test_tokenize_chat_with_tools(stack: Stack, tools_model: str) -> None:  # noqa: F811
    serve_apis(stack)
    await start_worker(stack, [1], model_path=tools_model)
    messages = [{"role": "user", "content": "Weather?"}]
    plain = (await stack.client.post("/tokenize", json={"messages": messages})).json()
    with_tools = (await stack.client.post("/tokenize", json={"messages": messages, "tools": [WEATHER]})).json()
    assert with_tools["count"] > plain["count"]


async def test_detokenize_round_trip(served: Stack, tokenizer: ModelTokenizer) -> None:
    tokens = tokenizer.encode("Round trip text", add_special_tokens=False)
    resp = await served.client.post("/detokenize", json={"model": MODEL, "tokens": tokens})
    assert resp.status_code == 200 and resp.json() == {"prompt": "Round trip text"}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/tokenize", {"model": MODEL}, 400, "prompt"),
        ("/tokenize", {"model": MODEL, "prompt": "x", "bogus": 1}, 400, "bogus"),
        ("/tokenize", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "chat_template": "{{ x }}"}, 400, "chat_template"),
        ("/detokenize", {"model": MODEL, "tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": [-1]}, 400, "tokens[0]"),
    ],
)
async def test_bad_requests(served: Stack, path: str, body: dict[str, object], status: int, param: str) -> None:
    resp = await served.client.post(path, json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param
