"""/v1/messages and /v1/messages/count_tokens over the real pipeline and a scripted worker,
driven with the official `anthropic` client (in process, over ASGI)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import pytest

from frontend.tokenizer import ModelTokenizer
from tests.unit.frontend.conftest import MODEL, Stack, ids, start_worker
from tests.unit.frontend.responses_api.scripted import sdk_http_client, serve_apis, think_model
from tests.unit.frontend.test_api_surface import tools_model  # noqa: F401 - fixture

WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[anthropic.AsyncAnthropic]:
    http = sdk_http_client(stack)
    async with anthropic.AsyncAnthropic(api_key="unused", base_url="http://test", http_client=http, max_retries=0) as c:
        yield c


async def test_message_non_streaming(stack: Stack, client: anthropic.AsyncAnthropic, tokenizer: ModelTokenizer) -> None:
    worker = await start_worker(stack, ids(tokenizer, "Hello there."), finish="stop")
    message = await client.messages.create(
        model=MODEL,
        max_tokens=32,
        system="Be brief.",
        messages=[{"role": "user", "content": "Say hello."}],
        extra_body={"temperature": 0.3, "top_k": 4},
    )
    assert message.content[0].type == "text" and message.content[0].text == "Hello there."
    assert message.stop_reason == "end_turn" and message.role == "assistant"
    request = worker.requests[0]
    assert request.stop.max_tokens == 32
    assert (request.sampling.temperature, request.sampling.top_k) == (0.3, 4)
    prompt = tokenizer.decode(request.token_ids, skip_special_tokens=False)
    assert "system\nBe brief." in prompt and "user\nSay hello." in prompt
    usage = message.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == len(request.token_ids)
    assert usage.cache_read_input_tokens == 3  # the scripted worker's cached tokens
    assert usage.output_tokens == len(ids(tokenizer, "Hello there."))


async def test_max_tokens_and_stop_sequence(stack: Stack, client: anthropic.AsyncAnthropic, tokenizer: ModelTokenizer) -> None:
    await start_worker(stack, ids(tokenizer, "one two three four"))
    cut = await client.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "count"}])
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2
    stopped = await client.messages.create(
        model=MODEL, max_tokens=20, stop_sequences=["three"], messages=[{"role": "user", "content": "count"}]
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "three"
    assert stopped.content[0].text == "one two "  # type: ignore[union-attr]


async def test_streaming_folds_to_the_same_message(
    stack: Stack, client: anthropic.AsyncAnthropic, tokenizer: ModelTokenizer
) -> None:
    await start_worker(stack, ids(tokenizer, "Streaming works fine."), finish="stop")
    kwargs = {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": "go"}]}
    whole = await client.messages.create(**kwargs)  # type: ignore[arg-type]
    names = []
    async with client.messages.stream(**kwargs) as stream:  # type: ignore[arg-type]
        async for event in stream:
            names.append(event.type)
        final = await stream.get_final_message()
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert "content_block_delta" in names and "message_delta" in names
    assert final.content[0].text == whole.content[0].text == "Streaming works fine."  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == whole.usage.output_tokens


async def test_tool_use_round_trip(
    stack: Stack, client: anthropic.AsyncAnthropic, tokenizer: ModelTokenizer, tools_model: str  # noqa: F811
) -> None:
    text = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    worker = await start_worker(stack, ids(tokenizer, text), model_path=tools_model, finish="stop")
    messages: list[dict[str, object]] = [{"role": "user", "content": "Weather in Rome?"}]
    message = await client.messages.create(model=MODEL, max_tokens=60, tools=[WEATHER], messages=messages)  # type: ignore[list-item]
    assert [b.type for b in message.content] == ["text", "tool_use"]
    call = message.content[1]
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Rome"}
    assert message.stop_reason == "tool_use"
    async with client.messages.stream(model=MODEL, max_tokens=60, tools=[WEATHER], messages=messages) as stream:  # type: ignore[list-item,arg-type]
        streamed = await stream.get_final_message()
    assert streamed.content[1].input == {"city": "Rome"} and streamed.stop_reason == "tool_use"  # type: ignore[union-attr]
    # The call and its result go back to the model through the template.
    follow_up = [
        *messages,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 25C"}]},
    ]
    await client.messages.create(model=MODEL, max_tokens=60, tools=[WEATHER], messages=follow_up)  # type: ignore[arg-type]
    prompt = tokenizer.decode(worker.requests[-1].token_ids, skip_special_tokens=False)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>' in prompt
    assert "tool\nSunny, 25C" in prompt
    assert "<tools>" in prompt


async def test_forced_tool_choice_constrains_the_worker(
    stack: Stack, client: anthropic.AsyncAnthropic, tokenizer: ModelTokenizer, tools_model: str  # noqa: F811
) -> None:
    worker = await start_worker(stack, ids(tokenizer, '{"city": "Oslo"}'), model_path=tools_model, finish="stop")
    message = await client.messages.create(
        model=MODEL, max_tokens=50, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Oslo?"}],
    )
    assert worker.requests[0].constraint is not None
    assert message.content[-1].type == "tool_use" and message.content[-1].input == {"city": "Oslo"}
    assert message.stop_reason == "tool_use"


async def test_thinking_blocks(stack: Stack, client: anthropic.AsyncAnthropic, tokenizer: ModelTokenizer, tmp_path: Path) -> None:
    worker = await start_worker(stack, ids(tokenizer, "<think>Two plus two.</think>Four."), model_path=think_model(tmp_path), finish="stop")
    message = await client.messages.create(
        model=MODEL, max_tokens=100, thinking={"type": "enabled", "budget_tokens": 50},
        messages=[{"role": "user", "content": "2+2?"}],
    )
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Two plus two." and message.content[1].text == "Four."  # type: ignore[union-attr]
    async with client.messages.stream(
        model=MODEL, max_tokens=100, thinking={"type": "enabled", "budget_tokens": 50},
        messages=[{"role": "user", "content": "2+2?"}],
    ) as stream:
        streamed = await stream.get_final_message()
    assert streamed.content[0].thinking == "Two plus two."  # type: ignore[union-attr]
    await client.messages.create(
        model=MODEL, max_tokens=50, thinking={"type": "disabled"}, messages=[{"role": "user", "content": "2+2?"}]
    )
    prompt = tokenizer.decode(worker.requests[-1].token_ids, skip_special_tokens=False)
    assert prompt.endswith("<think>\n\n</think>\n\n")  # the template's thinking-off switch


async def test_thinking_without_a_reasoning_parser_is_400(
    stack: Stack, client: anthropic.AsyncAnthropic, tokenizer: ModelTokenizer
) -> None:
    await start_worker(stack, ids(tokenizer, "x"))
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(
            model=MODEL, max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 1024},
            messages=[{"role": "user", "content": "hi"}],
        )
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "thinking" in info.value.body["error"]["message"]  # type: ignore[index]


async def test_errors_in_anthropic_shape(stack: Stack, tokenizer: ModelTokenizer) -> None:
    serve_apis(stack)
    await start_worker(stack, ids(tokenizer, "x"))
    missing = await stack.client.post("/v1/messages", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert missing.status_code == 400
    body = missing.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    unknown = await stack.client.post(
        "/v1/messages", json={"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    image = await stack.client.post(
        "/v1/messages",
        json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    )
    assert image.status_code == 400 and "image" in image.json()["error"]["message"]
    malformed = await stack.client.post("/v1/messages", content=b'{"model":', headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"


async def test_count_tokens(stack: Stack, client: anthropic.AsyncAnthropic, tokenizer: ModelTokenizer, tools_model: str) -> None:  # noqa: F811
    worker = await start_worker(stack, ids(tokenizer, "x"), model_path=tools_model, finish="stop")
    messages = [{"role": "user", "content": "Weather in Rome?"}]
    count = await client.messages.count_tokens(model=MODEL, system="Be brief.", messages=messages)  # type: ignore[arg-type]
    with_tools = await client.messages.count_tokens(model=MODEL, system="Be brief.", messages=messages, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    assert with_tools.input_tokens > count.input_tokens
    # The count is the prompt the worker would get.
    await client.messages.create(model=MODEL, max_tokens=5, system="Be brief.", messages=messages)  # type: ignore[arg-type]
    assert count.input_tokens == len(worker.requests[-1].token_ids)
    assert json.loads(count.model_dump_json()) == {"input_tokens": count.input_tokens}
