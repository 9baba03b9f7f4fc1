"""Responses request (+ the stored conversation it continues) -> ChatCompletionRequest: every
field carried over or refused with a 400 naming it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dynamo import errors
from frontend.responses.convert import Converted, to_chat_request
from frontend.responses.schemas import FunctionCallItem, Item, MessageItem, OutputText, decode_responses_request
from frontend.schemas import NamedToolChoice


def convert(previous: list[Item] | None = None, parser: bool = False, **fields: Any) -> Converted:
    body = {"model": "tiny", "input": "hi", **fields}
    return to_chat_request(decode_responses_request(json.dumps(body).encode()), previous, parser)


def refused(param: str, parser: bool = False, **fields: Any) -> errors.InvalidRequest:
    with pytest.raises(errors.InvalidRequest) as info:
        convert(None, parser, **fields)
    assert info.value.param == param, info.value.message
    return info.value


def test_string_input_and_sampling_fields() -> None:
    chat = convert(instructions="Be brief.", max_output_tokens=7, temperature=0.4, top_p=0.8, user="u", stream=True).chat
    assert [(m.role, m.content) for m in chat.messages] == [("system", "Be brief."), ("user", "hi")]
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.user, chat.stream) == (7, 0.4, 0.8, "u", True)


def test_message_items_and_function_call_items() -> None:
    items = [
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "in Rome?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Use the tool."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
    ]
    converted = convert(input=items)
    chat = converted.chat
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool"]
    assert chat.messages[1].content == "Weather in Rome?"
    assistant = chat.messages[2]
    assert assistant.content == "Checking." and assistant.reasoning_content == "Use the tool."
    assert assistant.tool_calls is not None and assistant.tool_calls[0].function.name == "get_weather"
    assert (chat.messages[3].tool_call_id, chat.messages[3].content) == ("call_1", "Sunny")
    assert len(converted.conversation) == len(items)


def test_previous_conversation_comes_first_without_its_instructions() -> None:
    previous: list[Item] = [
        MessageItem(role="user", content="Name a color."),
        MessageItem(role="assistant", content=[OutputText("Blue.")], id="msg_1", status="completed"),
    ]
    converted = convert(previous, instructions="New rules.", input="Another?")
    assert [(m.role, m.content) for m in converted.chat.messages] == [
        ("system", "New rules."), ("user", "Name a color."), ("assistant", "Blue."), ("user", "Another?"),
    ]
    assert len(converted.conversation) == 3  # previous input + output + the new input


def test_function_calls_without_a_message_make_an_assistant_turn() -> None:
    previous: list[Item] = [
        MessageItem(role="user", content="Weather?"),
        FunctionCallItem(call_id="c1", name="f", arguments="{}", id="fc_1", status="completed"),
        FunctionCallItem(call_id="c2", name="g", arguments="{}", id="fc_2", status="completed"),
    ]
    chat = convert(previous, input=[{"type": "function_call_output", "call_id": "c1", "output": "1"}]).chat
    assert [m.role for m in chat.messages] == ["user", "assistant", "tool"]
    assert [c.id for c in chat.messages[1].tool_calls or ()] == ["c1", "c2"]


def test_tools_tool_choice_and_text_format() -> None:
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}, "strict": True}]
    chat = convert(tools=tools, tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False).chat
    assert chat.tools is not None and chat.tools[0].function.name == "get_weather" and chat.tools[0].function.strict
    assert isinstance(chat.tool_choice, NamedToolChoice) and not chat.parallel_tool_calls
    assert convert(tools=tools, tool_choice="required").chat.tool_choice == "required"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    fmt = convert(text={"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}}).chat.response_format
    assert fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None and fmt.json_schema.schema == schema
    obj = convert(text={"format": {"type": "json_object"}}).chat.response_format
    assert obj is not None and obj.type == "json_object"
    assert convert(text={"format": {"type": "text"}}).chat.response_format is None


def test_reasoning_effort() -> None:
    assert convert(None, True, reasoning={"effort": "medium", "summary": "auto"}).chat.chat_template_kwargs == {"enable_thinking": True}
    assert convert(None, True, reasoning={"effort": "none"}).chat.chat_template_kwargs == {"enable_thinking": False}
    assert convert(None, False, reasoning={"effort": "none"}).chat.chat_template_kwargs is None
    assert "reasoning parser" in refused("reasoning.effort", reasoning={"effort": "medium"}).message
    refused("reasoning.effort", True, reasoning={"effort": "high"})
    refused("reasoning.summary", True, reasoning={"effort": "medium", "summary": "detailed"})


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "x"}]}, "input[0].encrypted_content"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools[0].vector_store_ids"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice.type"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"truncation": "auto"}, "truncation"),
        ({"background": True}, "background"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"prompt_cache_key": "k"}, "prompt_cache_key"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_refusals_name_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        convert(**fields)
    assert info.value.param == param, info.value.message
