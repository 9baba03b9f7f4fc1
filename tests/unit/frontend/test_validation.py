"""Every bad input gets an OpenAI error body with the right 4xx and a message (or param) that
names the problem; nothing becomes a 500."""

from __future__ import annotations

from typing import Any

import pytest

from dynamo import errors

from frontend.schemas import decode_chat_request, openapi_schema
from tests.unit.frontend.conftest import CONTEXT, MODEL, Stack, start_worker

MSG = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "nope", "messages": MSG}, 404, "nope"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL}, 400, "messages"),
        ({"messages": MSG}, 400, "model"),
        ({"model": MODEL, "messages": "hello"}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ({"model": MODEL, "messages": [{"content": "x"}]}, 400, "messages[0].role"),
        ({"model": MODEL, "messages": MSG, "temperature": 7}, 400, "temperature"),
        ({"model": MODEL, "messages": MSG, "temperature": -0.1}, 400, "temperature"),
        ({"model": MODEL, "messages": MSG, "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "messages": MSG, "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "messages": MSG, "top_p": 1.5}, 400, "top_p"),
        ({"model": MODEL, "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "messages": MSG, "max_tokens": "ten"}, 400, "max_tokens"),
        ({"model": MODEL, "messages": MSG, "max_tokens": CONTEXT}, 400, "max_tokens"),
        ({"model": MODEL, "messages": MSG, "n": 0}, 400, "n"),
        ({"model": MODEL, "messages": MSG, "n": 129}, 400, "n"),
        ({"model": MODEL, "messages": MSG, "unknown_field": 1}, 400, "unknown_field"),
        ({"model": MODEL, "messages": MSG, "logit_bias": {"99999": 5}}, 400, "logit_bias"),
        ({"model": MODEL, "messages": MSG, "logit_bias": {"x": 5}}, 400, "logit_bias"),
        ({"model": MODEL, "messages": MSG, "logit_bias": {"5": 101}}, 400, "logit_bias"),
        ({"model": MODEL, "messages": MSG, "top_logprobs": 3}, 400, "top_logprobs"),
        ({"model": MODEL, "messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ({"model": MODEL, "messages": MSG, "tool_choice": "required"}, 400, "tool_choice"),
        (
            {"model": MODEL, "messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
             "tool_choice": {"type": "function", "function": {"name": "g"}}},
            400,
            "tool_choice",
        ),
        ({"model": MODEL, "messages": MSG, "response_format": {"type": "json_schema"}}, 400, "response_format"),
        ({"model": MODEL, "messages": MSG, "response_format": {"type": "xml"}}, 400, "response_format"),
        ({"model": MODEL, "messages": MSG, "functions": [{"name": "f"}]}, 400, "functions"),
        ({"model": MODEL, "messages": MSG, "store": True}, 400, "store"),
        ({"model": MODEL, "messages": MSG, "reasoning_effort": "high"}, 400, "reasoning_effort"),
        ({"model": MODEL, "messages": MSG, "modalities": ["audio"]}, 400, "modalities"),
        (
            {"model": MODEL, "messages": MSG, "response_format": {"type": "json_object"}, "guided_regex": "a+"},
            400,
            "guided_regex",
        ),
        (
            {"model": MODEL, "messages": MSG, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            400,
            "tools",
        ),
        ({"model": MODEL, "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": MODEL, "messages": MSG, "stop": [""]}, 400, "stop"),
        ({"model": MODEL, "messages": MSG, "stream": "yes"}, 400, "stream"),
        ({"model": MODEL, "messages": MSG, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"model": MODEL, "messages": MSG, "min_tokens": 10, "max_tokens": 5}, 400, "min_tokens"),
        ({"model": MODEL, "messages": MSG, "stop_token_ids": [99999]}, 400, "stop_token_ids"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "context"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "image_url"),
    ],
)
async def test_bad_chat_input(stack: Stack, body: dict[str, Any], status: int, needle: str) -> None:
    await start_worker(stack, [10])
    resp = await stack.client.post("/v1/chat/completions", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert needle in error["message"] or needle == error["param"], error
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "prompt": [1, "b"]}, "prompt"),
        ({"model": MODEL, "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": MODEL, "prompt": []}, "prompt"),
        ({"model": MODEL, "prompt": [1, 2, 100000]}, "prompt"),
        ({"model": MODEL, "prompt": [1, -2]}, "prompt"),
        ({"model": MODEL, "prompt": list(range(CONTEXT))}, "context"),
        ({"model": MODEL, "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": MODEL, "prompt": "x", "stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
async def test_bad_completion_input(stack: Stack, body: dict[str, Any], needle: str) -> None:
    await start_worker(stack, [10])
    resp = await stack.client.post("/v1/completions", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert needle in error["message"] or needle == error["param"], error


@pytest.mark.parametrize("raw", [b'{"model": "tiny", "messages": [', b"", b"not json", b"\xff\xfe"])
async def test_malformed_json_is_400(stack: Stack, raw: bytes) -> None:
    resp = await stack.client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400
    assert "JSON" in resp.json()["error"]["message"]


async def test_non_object_body_is_400(stack: Stack) -> None:
    resp = await stack.client.post("/v1/chat/completions", json=[1, 2])
    assert resp.status_code == 400
    assert "object" in resp.json()["error"]["message"]


async def test_body_too_large_is_413(stack: Stack) -> None:
    resp = await stack.client.post("/v1/completions", content=b"x" * ((1 << 20) + 1))
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"


async def test_unknown_route_and_method_are_openai_errors(stack: Stack) -> None:
    resp = await stack.client.get("/v1/nope")
    assert resp.status_code == 404 and "error" in resp.json()
    resp = await stack.client.get("/v1/chat/completions")
    assert resp.status_code == 405 and "error" in resp.json()


async def test_openapi_json_describes_routes(stack: Stack) -> None:
    schema = (await stack.client.get("/openapi.json")).json()
    assert schema["openapi"].startswith("3.1")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/ready"} <= set(schema["paths"])
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["properties"]["temperature"]["anyOf"][0]["maximum"] == 2.0
    assert set(chat["required"]) == {"model", "messages"}


async def test_openapi_json_lists_every_route_served(stack: Stack) -> None:
    from starlette.routing import Route

    schema = (await stack.client.get("/openapi.json")).json()
    served = {
        (route.path, method.lower())
        for route in stack.app.router.routes  # type: ignore[attr-defined]
        if isinstance(route, Route) and route.include_in_schema
        for method in (route.methods or ()) - {"HEAD"}
    }
    documented = {(path, method) for path, ops in schema["paths"].items() for method in ops}
    assert served - {("/openapi.json", "get")} <= documented, served - documented
    assert ("/v1/responses/{response_id}", "delete") in documented


def test_schema_generation_is_stable() -> None:
    assert openapi_schema("a", "1") == openapi_schema("a", "1")


def test_decode_keeps_extensions() -> None:
    req = decode_chat_request(
        b'{"model":"m","messages":[{"role":"user","content":"x"}],"ignore_eos":true,'
        b'"min_tokens":2,"stop_token_ids":[5],"seed":7}'
    )
    assert req.ignore_eos and req.min_tokens == 2 and req.stop_token_ids == [5] and req.seed == 7
    with pytest.raises(errors.InvalidRequest) as info:
        decode_chat_request(b'{"model":"m","messages":[{"role":"user","content":"x"}],"unknown_field":1}')
    assert info.value.param == "unknown_field"
