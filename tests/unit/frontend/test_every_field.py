"""Every field of the chat and completions request schemas is honoured or refused, never
ignored: for each one, a request that sets it either gets a 400 naming it, or visibly changes
what the worker is asked to do or what the client gets back. A field added to the schemas
without an entry here fails the coverage test.

What each engine then does with what it is asked (logit_bias, penalties, constraints...) is
tested on the engines themselves (tests/unit/workers, tests/integration/test_vllm_worker.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from dynamo.wire import PreprocessedRequest
from frontend.schemas import ChatCompletionRequest, CompletionRequest
from frontend.tokenizer import ModelTokenizer
from tests.unit.frontend.conftest import MODEL, Stack, start_worker
from tests.unit.frontend.test_api_surface import TIME, WEATHER, tools_model  # noqa: F401 - fixture

Check = Callable[[PreprocessedRequest, dict[str, Any] | str], bool]


@dataclass(frozen=True)
class Honoured:
    """Setting `value` makes `check(worker_request, response)` true (and it is false without)."""

    value: Any
    check: Check
    extra: dict[str, Any] | None = None  # other fields the value needs (e.g. tools for tool_choice)


@dataclass(frozen=True)
class Refused:
    value: Any
    extra: dict[str, Any] | None = None


def _content(resp: dict[str, Any] | str) -> str:
    assert isinstance(resp, dict)
    choice = resp["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


TOOLS = [WEATHER, TIME]

CHAT_FIELDS: dict[str, Honoured | Refused | None] = {
    "model": None,  # required: every request names it (unknown names: 404, test_validation.py)
    "messages": None,  # required: the prompt itself
    "max_tokens": Honoured(2, lambda r, _: r.stop.max_tokens == 2),
    "max_completion_tokens": Honoured(3, lambda r, _: r.stop.max_tokens == 3),
    "temperature": Honoured(0.7, lambda r, _: r.sampling.temperature == 0.7),
    "top_p": Honoured(0.5, lambda r, _: r.sampling.top_p == 0.5),
    "n": Honoured(2, lambda _, resp: isinstance(resp, dict) and len(resp["choices"]) == 2),
    "stream": Honoured(True, lambda _, resp: isinstance(resp, str) and resp.endswith("data: [DONE]\n\n")),
    "stream_options": Honoured(
        {"include_usage": True}, lambda _, resp: isinstance(resp, str) and '"usage":{' in resp, {"stream": True}
    ),
    "stop": Honoured(["two"], lambda _, resp: _content(resp) == "one "),
    "seed": Honoured(5, lambda r, _: r.sampling.seed == 5),
    "frequency_penalty": Honoured(0.5, lambda r, _: r.sampling.frequency_penalty == 0.5),
    "presence_penalty": Honoured(0.5, lambda r, _: r.sampling.presence_penalty == 0.5),
    "logit_bias": Honoured({"7": 10}, lambda r, _: r.sampling.logit_bias == {7: 10.0}),
    "user": Honoured("someone", lambda *_: True),  # checked by the log line in its own test below
    "top_k": Honoured(3, lambda r, _: r.sampling.top_k == 3),
    "min_p": Honoured(0.2, lambda r, _: r.sampling.min_p == 0.2),
    "repetition_penalty": Honoured(1.3, lambda r, _: r.sampling.repetition_penalty == 1.3),
    "min_tokens": Honoured(2, lambda r, _: r.stop.min_tokens == 2),
    "ignore_eos": Honoured(True, lambda r, _: r.stop.ignore_eos and not r.stop.stop_token_ids),
    "stop_token_ids": Honoured([9], lambda r, _: 9 in r.stop.stop_token_ids),
    "structured_outputs": Honoured({"regex": "a+"}, lambda r, _: r.constraint is not None and r.constraint.kind == "regex"),
    "guided_json": Honoured({"type": "object"}, lambda r, _: r.constraint is not None and r.constraint.kind == "json_schema"),
    "guided_regex": Honoured("a+", lambda r, _: r.constraint is not None and r.constraint.spec == "a+"),
    "guided_choice": Honoured(["a", "b"], lambda r, _: r.constraint is not None and r.constraint.kind == "choice"),
    "guided_grammar": Honoured('root ::= "a"', lambda r, _: r.constraint is not None and r.constraint.kind == "grammar"),
    "service_tier": Refused("flex"),
    "store": Refused(True),
    "metadata": Refused({"k": "v"}),
    "logprobs": Honoured(True, lambda r, resp: r.sampling.logprobs and isinstance(resp, dict) and resp["choices"][0]["logprobs"] is not None),
    "top_logprobs": Honoured(2, lambda r, _: r.sampling.top_logprobs == 2, {"logprobs": True}),
    "tools": Honoured(TOOLS, lambda r, _: r.constraint is None),  # offered to the template: see the prompt check below
    "tool_choice": Honoured("required", lambda r, _: r.constraint is not None and '"minItems"' in r.constraint.spec, {"tools": TOOLS}),
    "parallel_tool_calls": Honoured(
        False, lambda r, _: r.constraint is not None and '"maxItems": 1' in r.constraint.spec, {"tools": TOOLS, "tool_choice": "required"}
    ),
    "response_format": Honoured({"type": "json_object"}, lambda r, _: r.constraint is not None and r.constraint.kind == "json_object"),
    "chat_template_kwargs": Honoured({"enable_thinking": False}, lambda r, _: True),  # prompt check below
    "functions": Refused([{"name": "f"}]),
    "function_call": Refused("auto"),
    "modalities": Refused(["audio"]),
    "audio": Refused({"voice": "x"}),
    "prediction": Refused({"type": "content", "content": "x"}),
    "reasoning_effort": Refused("low"),
    "web_search_options": Refused({}),
}

COMPLETION_FIELDS: dict[str, Honoured | Refused | None] = {
    **{k: v for k, v in CHAT_FIELDS.items() if k in CompletionRequest.__struct_fields__},
    "prompt": None,  # required
    "echo": Honoured(True, lambda _, resp: _content(resp).startswith("hi")),
    "logprobs": Honoured(1, lambda r, resp: r.sampling.top_logprobs == 1 and isinstance(resp, dict) and "tokens" in (resp["choices"][0]["logprobs"] or {})),
    "suffix": Refused("end"),
    "best_of": Refused(3),
    "n": Honoured(2, lambda _, resp: isinstance(resp, dict) and len(resp["choices"]) == 2),
}


def test_every_field_has_an_entry() -> None:
    assert set(CHAT_FIELDS) == set(ChatCompletionRequest.__struct_fields__)
    assert set(COMPLETION_FIELDS) == set(CompletionRequest.__struct_fields__)


def _cases(fields: dict[str, Honoured | Refused | None]) -> list[tuple[str, Honoured | Refused]]:
    return [(name, entry) for name, entry in fields.items() if entry is not None]


async def _post(stack: Stack, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any] | str]:
    resp = await stack.client.post(path, json=body)
    if body.get("stream") and resp.status_code == 200:
        return resp.status_code, resp.text
    return resp.status_code, resp.json()


async def _walk(stack: Stack, path: str, base: dict[str, Any], name: str, entry: Honoured | Refused) -> None:
    body = {**base, **(entry.extra or {}), name: entry.value}
    status, resp = await _post(stack, path, body)
    if isinstance(entry, Refused):
        assert status == 400, resp
        assert isinstance(resp, dict)
        error = resp["error"]
        assert error["param"] == name or name in error["message"], error
        return
    assert status == 200, resp
    worker = stack.workers[-1]
    assert entry.check(worker.requests[-1], resp), (name, worker.requests[-1], resp)
    # ...and not without it (the check is about the field, not about any request).
    if name not in ("user", "tools", "chat_template_kwargs"):
        status, resp = await _post(stack, path, {**base, **(entry.extra or {})})
        assert status == 200, resp
        assert not entry.check(worker.requests[-1], resp), f"{name}: the check holds without the field"


@pytest.mark.parametrize(("name", "entry"), _cases(CHAT_FIELDS), ids=[n for n, _ in _cases(CHAT_FIELDS)])
async def test_chat_field(stack: Stack, tokenizer: ModelTokenizer, tools_model: str, name: str, entry: Honoured | Refused) -> None:  # noqa: F811
    await start_worker(stack, tokenizer.encode("one two", add_special_tokens=False), model_path=tools_model)
    await _walk(stack, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}, name, entry)


@pytest.mark.parametrize(("name", "entry"), _cases(COMPLETION_FIELDS), ids=[n for n, _ in _cases(COMPLETION_FIELDS)])
async def test_completion_field(stack: Stack, tokenizer: ModelTokenizer, name: str, entry: Honoured | Refused) -> None:
    await start_worker(stack, tokenizer.encode("one two", add_special_tokens=False))
    await _walk(stack, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 20}, name, entry)


async def test_tools_and_template_kwargs_change_the_prompt(stack: Stack, tokenizer: ModelTokenizer, tools_model: str) -> None:  # noqa: F811
    worker = await start_worker(stack, tokenizer.encode("x", add_special_tokens=False), model_path=tools_model)
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    prompts = []
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}, {"tools": TOOLS, "tool_choice": "required"}, {"chat_template_kwargs": {"enable_thinking": False}}):
        resp = await stack.client.post("/v1/chat/completions", json={**base, **extra})
        assert resp.status_code == 200, resp.text
        prompts.append(tokenizer.decode(worker.requests[-1].token_ids, skip_special_tokens=False))
    plain, tools_none, tools_required, no_thinking = prompts
    assert "get_weather" not in plain and "get_weather" not in tools_none and "get_weather" in tools_required
    assert "</think>" in no_thinking and "</think>" not in plain


async def test_user_is_logged_with_the_request(stack: Stack, tokenizer: ModelTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    await start_worker(stack, tokenizer.encode("x", add_special_tokens=False))
    with caplog.at_level(logging.INFO, logger="frontend.pipeline"):
        resp = await stack.client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "user": "alice-42"}
        )
    assert resp.status_code == 200
    assert any("alice-42" in r.getMessage() for r in caplog.records)
