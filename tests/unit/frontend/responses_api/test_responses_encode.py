"""The Responses encoders over scripted Generations: the response object and the event stream,
decoded with the official `openai` client's types; a stream's final response equals the
non-streamed one (ids aside)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import openai.types.responses as rt
from pydantic import TypeAdapter

from frontend.outputs import ChoiceDelta, ToolCallDelta
from frontend.responses.encode import base_response, response_events, response_object
from frontend.responses.schemas import ResponseObject, decode_responses_request
from tests.unit.frontend.responses_api.scripted import ScriptedGeneration

EVENT = TypeAdapter(rt.ResponseStreamEvent)


def base(**fields: Any) -> ResponseObject:
    request = decode_responses_request(json.dumps({"model": "tiny", "input": "hi", **fields}).encode())
    return base_response(request, "resp_1", "tiny")


def count(text: str) -> int:
    return len(text.split())


async def stream(generation: ScriptedGeneration, response: ResponseObject) -> tuple[list[dict[str, Any]], list[ResponseObject]]:
    saved: list[ResponseObject] = []

    async def save(r: ResponseObject) -> None:
        saved.append(r)

    raw = b"".join([c async for c in response_events(generation, response, count, save)])  # type: ignore[arg-type]
    events = []
    for block in raw.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            event = json.loads(data[len("data: "):])
            assert name == f"event: {event['type']}"
            events.append(event)
    return events, saved


def tool_script() -> list[list[ChoiceDelta]]:
    return [
        [ChoiceDelta(0, reasoning="Think")],
        [ChoiceDelta(0, reasoning="ing.")],
        [ChoiceDelta(0, content="Calling.")],
        [ChoiceDelta(0, tool_calls=[ToolCallDelta(0, id="call_a", name="get_weather", arguments='{"city":')])],
        [ChoiceDelta(0, tool_calls=[ToolCallDelta(0, arguments=' "Rome"}'), ToolCallDelta(1, id="call_b", name="get_time", arguments="{}")])],
        [ChoiceDelta(0, finish_reason="tool_calls")],
    ]


async def test_text_response_object() -> None:
    generation = ScriptedGeneration([[ChoiceDelta(0, content="Hel")], [ChoiceDelta(0, content="lo", finish_reason="stop")]])
    result = (await generation.results())[0]
    obj = response_object(base(max_output_tokens=9, metadata={"k": "v"}), result, generation.usage(), count)
    response = rt.Response.model_validate_json(msgspec.json.encode(obj))
    assert response.status == "completed" and response.output_text == "Hello"
    assert response.id == "resp_1" and response.object == "response" and response.model == "tiny"
    assert response.max_output_tokens == 9 and response.metadata == {"k": "v"}
    message = response.output[0]
    assert message.type == "message" and message.status == "completed" and message.id.startswith("msg_")
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.input_tokens_details.cached_tokens) == (10, 4)
    assert response.usage.output_tokens == 2 and response.usage.total_tokens == 12


async def test_truncated_response_is_incomplete() -> None:
    generation = ScriptedGeneration([[ChoiceDelta(0, content="a b", finish_reason="length")]])
    result = (await generation.results())[0]
    obj = response_object(base(), result, generation.usage(), count)
    assert obj.status == "incomplete" and obj.incomplete_details is not None
    assert obj.incomplete_details.reason == "max_output_tokens"
    events, saved = await stream(ScriptedGeneration([[ChoiceDelta(0, content="a b", finish_reason="length")]]), base())
    assert events[-1]["type"] == "response.incomplete" and saved[0].status == "incomplete"


async def test_reasoning_message_and_function_calls() -> None:
    generation = ScriptedGeneration(tool_script())
    result = (await generation.results())[0]
    obj = response_object(base(), result, generation.usage(), count)
    response = rt.Response.model_validate_json(msgspec.json.encode(obj))
    assert [i.type for i in response.output] == ["reasoning", "message", "function_call", "function_call"]
    reasoning, message, weather, time = response.output
    assert reasoning.content[0].text == "Thinking."  # type: ignore[union-attr,index]
    assert reasoning.summary == []  # type: ignore[union-attr]
    assert message.content[0].text == "Calling."  # type: ignore[union-attr]
    assert (weather.call_id, weather.name, json.loads(weather.arguments)) == ("call_a", "get_weather", {"city": "Rome"})  # type: ignore[union-attr]
    assert weather.id.startswith("fc_") and time.name == "get_time"  # type: ignore[union-attr]
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens == 1


async def test_stream_event_sequence_for_text() -> None:
    script = [[ChoiceDelta(0, content="Hel")], [ChoiceDelta(0, content="lo")], [ChoiceDelta(0, finish_reason="stop")]]
    events, saved = await stream(ScriptedGeneration(script), base())
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for e in events:
        EVENT.validate_python(e)  # each is one of the client's event types
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert events[6]["text"] == "Hello"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "Hello"
    assert saved[0].id == final["id"]  # stored before the final event went out


async def test_stream_with_reasoning_and_calls_matches_the_object() -> None:
    events, _ = await stream(ScriptedGeneration(tool_script()), base())
    for e in events:
        EVENT.validate_python(e)
    types = [e["type"] for e in events]
    assert "response.reasoning_text.delta" in types and "response.reasoning_text.done" in types
    assert types.count("response.function_call_arguments.done") == 2
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    assert added == ["reasoning", "message", "function_call", "function_call"]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta" and e["output_index"] == 2)
    assert deltas == '{"city": "Rome"}'
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["output_index"] for e in done] == [0, 1, 2, 3]
    final = events[-1]["response"]
    generation = ScriptedGeneration(tool_script())
    result = (await generation.results())[0]
    whole = json.loads(msgspec.json.encode(response_object(base(), result, generation.usage(), count)))

    def strip(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in i.items() if k != "id"} for i in items]

    assert strip(final["output"]) == strip(whole["output"])
    assert final["usage"] == whole["usage"]


async def test_mid_stream_failure_is_response_failed() -> None:
    generation = ScriptedGeneration([[ChoiceDelta(0, content="a")], [ChoiceDelta(0, finish_reason="stop")]], fail_after=1)
    events, saved = await stream(generation, base())
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed" and "went away" in events[-1]["response"]["error"]["message"]
    assert not saved and generation.closed
