"""A model scaled to zero (its last worker gone) stays known to the frontend: a request for it
waits, bounded, for a worker to register (the planner's cue is the held-requests gauge), and
gets 503 with Retry-After in the OpenAI error shape when none comes. A name never served is
still a 404 at once."""

from __future__ import annotations

import asyncio

from dynamo.model_registry import planned_model_key
from tests.unit.frontend.conftest import MODEL, Stack, start_worker


def chat_body() -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def scale_to_zero(stack: Stack) -> None:
    worker = await start_worker(stack, [10, 11])
    await worker.runtime.shutdown()  # revokes the lease: the model's last instance goes
    await stack.manager.wait_until(lambda: MODEL not in stack.manager.models, 5)


async def wait_held(stack: Stack) -> None:
    async def held() -> None:
        while stack.manager.held_requests(MODEL) != 1:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(held(), 5)  # the request waits for a worker, not a 404


async def test_request_is_held_until_a_worker_registers(stack: Stack) -> None:
    await scale_to_zero(stack)
    stack.manager.scale_from_zero_wait_s = 10.0
    request = asyncio.create_task(stack.client.post("/v1/chat/completions", json=chat_body()))
    await wait_held(stack)
    assert not request.done()
    await start_worker(stack, [12, 13])
    resp = await asyncio.wait_for(request, 10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 2
    assert stack.manager.held_requests(MODEL) == 0


async def test_no_worker_in_time_is_503_with_retry_after(stack: Stack) -> None:
    await scale_to_zero(stack)
    stack.manager.scale_from_zero_wait_s = 0.2
    resp = await stack.client.post("/v1/chat/completions", json=chat_body())
    assert resp.status_code == 503
    assert resp.headers["retry-after"]
    error = resp.json()["error"]
    assert error["code"] == "no_instances" and error["type"] == "service_unavailable"
    assert "scaled to zero" in error["message"]


async def test_unknown_model_is_404_at_once(stack: Stack) -> None:
    stack.manager.scale_from_zero_wait_s = 30.0
    resp = await asyncio.wait_for(
        stack.client.post("/v1/chat/completions", json={**chat_body(), "model": "never-served"}), 5
    )
    assert resp.status_code == 404


async def test_a_model_a_planner_announces_is_held_though_never_served(stack: Stack) -> None:
    stack.manager.scale_from_zero_wait_s = 10.0
    await stack.runtime.discovery.put(planned_model_key(stack.runtime.namespace, MODEL), b"")

    async def announced() -> None:
        while MODEL not in stack.manager.watcher.planned:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(announced(), 5)
    request = asyncio.create_task(stack.client.post("/v1/chat/completions", json=chat_body()))
    await wait_held(stack)
    await start_worker(stack, [12, 13])
    resp = await asyncio.wait_for(request, 10)
    assert resp.status_code == 200, resp.text
