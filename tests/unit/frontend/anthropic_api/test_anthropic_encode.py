"""The Anthropic encoders over scripted Generations: the `message` body and the event stream,
checked with the official `anthropic` client's types and its own stream accumulator (a stream
must fold to the same message as the non-streamed body)."""

from __future__ import annotations

import json
from typing import Any

import anthropic.types as at
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from pydantic import TypeAdapter

from frontend.anthropic.encode import message_body, message_events, stop_reason
from frontend.outputs import ChoiceDelta, ToolCallDelta
from tests.unit.frontend.responses_api.scripted import ScriptedGeneration

EVENT = TypeAdapter(at.RawMessageStreamEvent)


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        data = json.loads(data_line[len("data: "):])
        assert data["type"] == name_line[len("event: "):]  # the name and the type always match
        out.append((data["type"], data))
    return out


async def stream(generation: ScriptedGeneration, omit_thinking: bool = False) -> bytes:
    return b"".join([chunk async for chunk in message_events(generation, omit_thinking)])  # type: ignore[arg-type]


def fold(events: list[tuple[str, dict[str, Any]]]) -> at.Message:
    snapshot = None
    bufs: dict[int, bytes] = {}
    for name, data in events:
        if name in ("ping", "error"):
            continue
        snapshot = accumulate_event(event=EVENT.validate_python(data), current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot is not None
    return snapshot


def text_script() -> list[list[ChoiceDelta]]:
    return [
        [ChoiceDelta(0, content="Hello")],
        [ChoiceDelta(0, content=", world"), ChoiceDelta(0, content="!")],
        [ChoiceDelta(0, finish_reason="stop")],
    ]


def tool_script() -> list[list[ChoiceDelta]]:
    return [
        [ChoiceDelta(0, reasoning="Need the weather. ")],
        [ChoiceDelta(0, reasoning="Call it.")],
        [ChoiceDelta(0, content="Let me check.")],
        [ChoiceDelta(0, tool_calls=[ToolCallDelta(0, id="call_1", name="get_weather", arguments='{"city": ')])],
        [ChoiceDelta(0, tool_calls=[ToolCallDelta(0, arguments='"Paris"}')])],
        [ChoiceDelta(0, tool_calls=[ToolCallDelta(1, id="call_2", name="get_time", arguments="{}")])],
        [ChoiceDelta(0, finish_reason="tool_calls")],
    ]


@pytest.mark.parametrize(
    ("finish", "stop_sequence", "tools", "expected"),
    [
        ("stop", None, False, "end_turn"),
        ("stop", "END", False, "stop_sequence"),
        ("length", None, False, "max_tokens"),
        ("length", None, True, "max_tokens"),
        ("tool_calls", None, True, "tool_use"),
        ("stop", None, True, "tool_use"),
    ],
)
def test_stop_reason(finish: str, stop_sequence: str | None, tools: bool, expected: str) -> None:
    assert stop_reason(finish, stop_sequence, tools) == expected


async def test_text_message_body() -> None:
    generation = ScriptedGeneration(text_script())
    result = (await generation.results())[0]
    message = at.Message.model_validate_json(message_body(generation, result, generation.usage()))  # type: ignore[arg-type]
    assert message.id == "msg_0123abcd" and message.type == "message" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Hello, world!"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    # Cached prompt tokens are counted apart, as Anthropic does.
    assert message.usage.input_tokens == 6 and message.usage.cache_read_input_tokens == 4
    assert message.usage.output_tokens == 3


async def test_stop_sequence_is_reported() -> None:
    script = [[ChoiceDelta(0, content="one ")], [ChoiceDelta(0, finish_reason="stop", stop_sequence="two")]]
    generation = ScriptedGeneration(script)
    result = (await generation.results())[0]
    message = at.Message.model_validate_json(message_body(generation, result, generation.usage()))  # type: ignore[arg-type]
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "two"
    events = parse_sse(await stream(ScriptedGeneration(script)))
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "two"}


async def test_thinking_text_and_tool_use_blocks() -> None:
    generation = ScriptedGeneration(tool_script())
    result = (await generation.results())[0]
    message = at.Message.model_validate_json(message_body(generation, result, generation.usage()))  # type: ignore[arg-type]
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    thinking, text, weather, time = message.content
    assert thinking.thinking == "Need the weather. Call it."  # type: ignore[union-attr]
    assert text.text == "Let me check."  # type: ignore[union-attr]
    assert (weather.id, weather.name, weather.input) == ("call_1", "get_weather", {"city": "Paris"})  # type: ignore[union-attr]
    assert (time.name, time.input) == ("get_time", {})  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"


async def test_stream_event_sequence() -> None:
    events = parse_sse(await stream(ScriptedGeneration(text_script())))
    names = [n for n, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 6 and start["usage"]["output_tokens"] == 0
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "Hello"}
    assert events[-2][1]["usage"]["output_tokens"] == 3
    for name, data in events:
        if name != "ping":  # the client reads pings apart from the message events
            EVENT.validate_python(data)  # every other event is one of the client's types


async def test_stream_folds_to_the_non_streamed_message() -> None:
    streamed = fold(parse_sse(await stream(ScriptedGeneration(tool_script()))))
    generation = ScriptedGeneration(tool_script())
    result = (await generation.results())[0]
    whole = json.loads(message_body(generation, result, generation.usage()))
    assert streamed.model_dump(exclude_none=True)["content"] == whole["content"]
    assert streamed.stop_reason == whole["stop_reason"] == "tool_use"
    assert streamed.usage.output_tokens == whole["usage"]["output_tokens"]


async def test_tool_use_stream_uses_input_json_deltas() -> None:
    events = parse_sse(await stream(ScriptedGeneration(tool_script())))
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [s["type"] for s in starts] == ["thinking", "text", "tool_use", "tool_use"]
    assert starts[2] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    pieces = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta" and d["index"] == 2]
    assert "".join(pieces) == '{"city": "Paris"}'
    thinking = [d["delta"] for n, d in events if n == "content_block_delta" and d["index"] == 0]
    assert thinking[0] == {"type": "thinking_delta", "thinking": "Need the weather. "}
    # Every block started is stopped, in order.
    stops = [d["index"] for n, d in events if n == "content_block_stop"]
    assert stops == [0, 1, 2, 3]


async def test_omitted_thinking_keeps_the_block_without_its_text() -> None:
    events = parse_sse(await stream(ScriptedGeneration(tool_script()), omit_thinking=True))
    assert not [d for n, d in events if n == "content_block_delta" and d["delta"]["type"] == "thinking_delta"]
    assert fold(events).content[0].type == "thinking"


async def test_empty_answer_still_has_one_text_block() -> None:
    events = parse_sse(await stream(ScriptedGeneration([[ChoiceDelta(0, finish_reason="length")]])))
    assert [n for n, _ in events][:3] == ["message_start", "content_block_start", "ping"]
    assert fold(events).content[0].type == "text"
    assert fold(events).stop_reason == "max_tokens"


async def test_mid_stream_failure_ends_with_an_error_event() -> None:
    generation = ScriptedGeneration(text_script(), fail_after=1)
    events = parse_sse(await stream(generation))
    assert events[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": events[-1][1]["error"]["message"]}})
    assert "went away" in events[-1][1]["error"]["message"]
    assert "message_stop" not in [n for n, _ in events]
    assert generation.closed


async def test_truncated_tool_arguments_keep_an_empty_input() -> None:
    script = [
        [ChoiceDelta(0, tool_calls=[ToolCallDelta(0, id="c", name="f", arguments='{"a": ')])],
        [ChoiceDelta(0, finish_reason="length")],
    ]
    generation = ScriptedGeneration(script)
    result = (await generation.results())[0]
    message = json.loads(message_body(generation, result, generation.usage()))
    assert message["content"][0] == {"type": "tool_use", "id": "c", "name": "f", "input": {}}
    assert message["stop_reason"] == "max_tokens"
