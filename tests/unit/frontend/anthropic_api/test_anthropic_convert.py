"""Anthropic Messages request -> ChatCompletionRequest: every field carried over or refused
with a 400 naming it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dynamo import errors
from frontend.anthropic.convert import Converted, to_chat_request
from frontend.anthropic.schemas import decode_messages_request
from frontend.schemas import NamedToolChoice


def convert(reasoning: bool = False, **fields: Any) -> Converted:
    body = {"model": "tiny", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **fields}
    return to_chat_request(decode_messages_request(json.dumps(body).encode()), reasoning)


def refused(param: str, reasoning: bool = False, **fields: Any) -> errors.InvalidRequest:
    with pytest.raises(errors.InvalidRequest) as info:
        convert(reasoning, **fields)
    assert info.value.param == param, info.value.message
    return info.value


def test_plain_fields_are_carried_over() -> None:
    chat = convert(
        temperature=0.5, top_p=0.9, top_k=5, stop_sequences=["END"], stream=True, metadata={"user_id": "u1"}
    ).chat
    assert chat.model == "tiny" and chat.max_tokens == 64
    assert (chat.temperature, chat.top_p, chat.top_k) == (0.5, 0.9, 5)
    assert chat.stop == ["END"] and chat.stream and chat.user == "u1"
    assert [(m.role, m.content) for m in chat.messages] == [("user", "hi")]


@pytest.mark.parametrize(
    "system", ["Be brief.", [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]]
)
def test_system_prompt_string_or_blocks(system: Any) -> None:
    chat = convert(system=system).chat
    assert (chat.messages[0].role, chat.messages[0].content) == ("system", "Be brief.")


def test_tool_use_and_tool_result_blocks() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Use the tool.", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "Sunny"}]},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "boom", "is_error": True},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    chat = convert(messages=messages).chat
    roles = [m.role for m in chat.messages]
    assert roles == ["user", "assistant", "tool", "tool", "user"]
    assistant = chat.messages[1]
    assert assistant.content == "Checking." and assistant.reasoning_content == "Use the tool."
    assert assistant.tool_calls is not None
    call = assistant.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("toolu_1", "get_weather", {"city": "Paris"})
    assert (chat.messages[2].tool_call_id, chat.messages[2].content) == ("toolu_1", "Sunny")
    assert chat.messages[3].content == "Error: boom"
    assert chat.messages[4].content == "And tomorrow?"


def test_tools_and_tool_choice() -> None:
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {}}}]
    chat = convert(tools=tools).chat
    assert chat.tools is not None and chat.tools[0].function.name == "get_weather"
    assert chat.tools[0].function.parameters == {"type": "object", "properties": {}}
    assert chat.tool_choice is None and chat.parallel_tool_calls
    assert convert(tools=tools, tool_choice={"type": "auto"}).chat.tool_choice == "auto"
    assert convert(tools=tools, tool_choice={"type": "any"}).chat.tool_choice == "required"
    assert convert(tools=tools, tool_choice={"type": "none"}).chat.tool_choice == "none"
    named = convert(tools=tools, tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}).chat
    assert isinstance(named.tool_choice, NamedToolChoice) and named.tool_choice.function.name == "get_weather"
    assert named.parallel_tool_calls is False


def test_thinking_needs_a_reasoning_parser() -> None:
    error = refused("thinking", thinking={"type": "enabled", "budget_tokens": 2048}, max_tokens=4096)
    assert "reasoning parser" in error.message
    converted = convert(True, thinking={"type": "enabled", "budget_tokens": 2048}, max_tokens=4096)
    assert converted.chat.chat_template_kwargs == {"enable_thinking": True} and not converted.omit_thinking
    assert convert(True, thinking={"type": "disabled"}).chat.chat_template_kwargs == {"enable_thinking": False}
    assert convert(False, thinking={"type": "disabled"}).chat.chat_template_kwargs is None
    assert convert(True, thinking={"type": "adaptive", "display": "omitted"}).omit_thinking


def test_thinking_budget_rules() -> None:
    refused("thinking.budget_tokens", True, thinking={"type": "enabled", "budget_tokens": 0}, max_tokens=4096)
    refused("thinking.budget_tokens", True, thinking={"type": "enabled", "budget_tokens": 4096}, max_tokens=4096)
    refused("thinking.budget_tokens", True, thinking={"type": "enabled"}, max_tokens=4096)


def test_output_config_format_becomes_a_json_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = convert(output_config={"format": {"type": "json_schema", "schema": schema}}).chat
    assert chat.response_format is not None and chat.response_format.type == "json_schema"
    assert chat.response_format.json_schema is not None and chat.response_format.json_schema.schema == schema


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}]}]},
         "messages[0].content[0].content[0].type"),
        ({"messages": [{"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, "messages[0].content[0].type"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
        ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"mcp_servers": []}, "mcp_servers"),
        ({"output_config": {"effort": "high"}}, "output_config.effort"),
    ],
)
def test_refusals_name_the_field(fields: dict[str, Any], param: str) -> None:
    refused(param, **fields)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"model": "tiny", "max_tokens": 5, "messages": []}, "messages"),
        ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "temperature": 1.5}, "temperature"),
        ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "frequency_penalty": 1}, "frequency_penalty"),
        ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type"),
    ],
)
def test_schema_errors_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        decode_messages_request(json.dumps(body).encode())
    assert info.value.param == param, info.value.message
