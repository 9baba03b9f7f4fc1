"""/v1/responses over the real pipeline and a scripted worker, driven with the official `openai`
client (in process, over ASGI): text, streaming, function tools, reasoning, store and
previous_response_id, GET/DELETE, errors in OpenAI's shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from frontend.tokenizer import ModelTokenizer
from tests.unit.frontend.conftest import MODEL, Stack, ids, start_worker
from tests.unit.frontend.responses_api.scripted import sdk_http_client, serve_apis, think_model
from tests.unit.frontend.test_api_surface import tools_model  # noqa: F401 - fixture

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    http = sdk_http_client(stack)
    async with openai.AsyncOpenAI(api_key="unused", base_url="http://test/v1", http_client=http, max_retries=0) as c:
        yield c


async def test_text_response_and_retrieve(stack: Stack, client: openai.AsyncOpenAI, tokenizer: ModelTokenizer) -> None:
    worker = await start_worker(stack, ids(tokenizer, "Blue is calm."), finish="stop")
    response = await client.responses.create(
        model=MODEL, input="Name a color.", instructions="Be brief.", max_output_tokens=20, metadata={"k": "v"}
    )
    assert response.status == "completed" and response.output_text == "Blue is calm."
    assert response.id.startswith("resp_") and response.metadata == {"k": "v"}
    prompt = tokenizer.decode(worker.requests[0].token_ids, skip_special_tokens=False)
    assert "system\nBe brief." in prompt and "user\nName a color." in prompt
    assert worker.requests[0].stop.max_tokens == 20
    assert response.usage is not None and response.usage.input_tokens == len(worker.requests[0].token_ids)
    got = await client.responses.retrieve(response.id)
    assert got.output_text == "Blue is calm." and got.id == response.id
    await client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)


async def test_streaming(stack: Stack, client: openai.AsyncOpenAI, tokenizer: ModelTokenizer) -> None:
    await start_worker(stack, ids(tokenizer, "Streaming works fine."), finish="stop")
    kinds = []
    stream = await client.responses.create(model=MODEL, input="go", stream=True)
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.completed":
            final = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert final.output_text == "Streaming works fine."
    stored = await client.responses.retrieve(final.id)
    assert stored.output_text == final.output_text
    async with client.responses.stream(model=MODEL, input="go") as helper:  # the client's own accumulator
        accumulated = await helper.get_final_response()
    assert accumulated.output_text == "Streaming works fine."


async def test_two_turn_conversation_by_previous_response_id(
    stack: Stack, client: openai.AsyncOpenAI, tokenizer: ModelTokenizer
) -> None:
    worker = await start_worker(stack, ids(tokenizer, "Blue."), finish="stop")
    first = await client.responses.create(model=MODEL, input="Name a color.", instructions="Only the first turn.")
    second = await client.responses.create(model=MODEL, input="Another one?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    prompt = tokenizer.decode(worker.requests[-1].token_ids, skip_special_tokens=False)
    assert "user\nName a color.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>user\nAnother one?" in prompt
    assert "Only the first turn." not in prompt  # instructions are not carried over
    # Without instructions, a continuation extends the first turn's prompt: a shared prefix for
    # KV-aware routing.
    plain = await client.responses.create(model=MODEL, input="Name a color.")
    await client.responses.create(model=MODEL, input="Another one?", previous_response_id=plain.id)
    first_prompt, continued = worker.requests[-2].token_ids, worker.requests[-1].token_ids
    assert continued[: len(first_prompt)] == first_prompt


async def test_input_items_listed_and_paged(stack: Stack, client: openai.AsyncOpenAI, tokenizer: ModelTokenizer) -> None:
    await start_worker(stack, ids(tokenizer, "Blue."), finish="stop")
    first = await client.responses.create(model=MODEL, input="Name a color.")
    second = await client.responses.create(model=MODEL, input="Another one?", previous_response_id=first.id)
    # The whole conversation the second answer came from, newest first by default.
    items = (await client.responses.input_items.list(second.id)).data
    texts = [getattr(item, "content")[0].text for item in items]
    assert texts == ["Another one?", "Blue.", "Name a color."]
    assert all(item.id for item in items) and len({item.id for item in items}) == 3
    # Ids given at store time are the ones the next response's listing shows.
    assert [i.id for i in (await client.responses.input_items.list(first.id)).data] == [items[-1].id]
    asc = await client.responses.input_items.list(second.id, order="asc", limit=2)
    assert [i.id for i in asc.data] == [items[2].id, items[1].id] and asc.has_more
    rest = await client.responses.input_items.list(second.id, order="asc", after=asc.data[-1].id)
    assert [i.id for i in rest.data] == [items[0].id] and not rest.has_more
    for query, param in (("limit=0", "limit"), ("order=up", "order"), ("after=msg_nope", "after"),
                         ("include=file_search_call.results", "include"), ("before=x", "before")):
        resp = await stack.client.get(f"/v1/responses/{second.id}/input_items?{query}")
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    assert (await stack.client.get("/v1/responses/resp_missing/input_items")).status_code == 404
    resp = await stack.client.get(f"/v1/responses/{second.id}?stream=true")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "stream"


async def test_store_false_is_not_kept(stack: Stack, client: openai.AsyncOpenAI, tokenizer: ModelTokenizer) -> None:
    await start_worker(stack, ids(tokenizer, "x"), finish="stop")
    response = await client.responses.create(model=MODEL, input="hi", store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=MODEL, input="again", previous_response_id=response.id)
    error = info.value.body
    assert error["code"] == "previous_response_not_found" and error["param"] == "previous_response_id"  # type: ignore[index]


async def test_function_tools(
    stack: Stack, client: openai.AsyncOpenAI, tokenizer: ModelTokenizer, tools_model: str  # noqa: F811
) -> None:
    text = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    worker = await start_worker(stack, ids(tokenizer, text), model_path=tools_model, finish="stop")
    response = await client.responses.create(model=MODEL, input="Weather in Rome?", tools=[WEATHER], max_output_tokens=60)  # type: ignore[list-item]
    calls = [i for i in response.output if i.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].arguments == '{"city": "Rome"}'
    assert response.output_text == "Checking."
    events = []
    async with client.responses.stream(model=MODEL, input="Weather in Rome?", tools=[WEATHER], max_output_tokens=60) as s:  # type: ignore[list-item]
        async for event in s:
            events.append(event.type)
        streamed = await s.get_final_response()
    assert "response.function_call_arguments.delta" in events and "response.function_call_arguments.done" in events
    assert [i.type for i in streamed.output] == [i.type for i in response.output]
    # The tool's output continues the stored conversation.
    await client.responses.create(
        model=MODEL, previous_response_id=response.id, tools=[WEATHER], max_output_tokens=40,  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny"}],
    )
    prompt = tokenizer.decode(worker.requests[-1].token_ids, skip_special_tokens=False)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>' in prompt
    assert "tool\nSunny" in prompt


async def test_reasoning_items(stack: Stack, client: openai.AsyncOpenAI, tokenizer: ModelTokenizer, tmp_path: Path) -> None:
    await start_worker(stack, ids(tokenizer, "<think>Two plus two.</think>Four."), model_path=think_model(tmp_path), finish="stop")
    response = await client.responses.create(model=MODEL, input="2+2?", reasoning={"effort": "medium"})
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "Two plus two." and response.output_text == "Four."
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens > 0
    stream = await client.responses.create(model=MODEL, input="2+2?", stream=True)
    kinds = [e.type async for e in stream]
    assert "response.reasoning_text.delta" in kinds


async def test_errors_in_openai_shape(stack: Stack, tokenizer: ModelTokenizer) -> None:
    serve_apis(stack)
    await start_worker(stack, ids(tokenizer, "x"))
    cases = [
        ({"model": MODEL, "input": []}, 400, "input"),
        ({"model": MODEL, "input": ""}, 400, "input"),
        ({"model": MODEL, "input": "x", "previous_response_id": "resp_missing"}, 400, "previous_response_id"),
        ({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"model": "nope", "input": "x"}, 404, "model"),
        ({"model": MODEL, "input": "x", "reasoning": {"effort": "medium"}}, 400, "reasoning.effort"),
    ]
    for body, status, param in cases:
        resp = await stack.client.post("/v1/responses", json=body)
        assert resp.status_code == status, (body, resp.text)
        assert resp.json()["error"]["param"] == param, resp.text
    missing = await stack.client.get("/v1/responses/resp_missing")
    assert missing.status_code == 404 and "resp_missing" in missing.json()["error"]["message"]
    assert (await stack.client.delete("/v1/responses/resp_missing")).status_code == 404
