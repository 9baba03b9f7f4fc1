"""frontend/session.py: the session id reaches the worker's request (and so the router) from
the x-dynamo-session-id header, or from OpenAI's `user` when allowed."""

from __future__ import annotations

from frontend.session import CURRENT_SESSION, request_session
from tests.unit.frontend.conftest import MODEL, Stack, start_worker


async def test_the_session_header_reaches_the_routed_request(stack: Stack) -> None:
    worker = await start_worker(stack, [5, 6])
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 2, "user": "u1"}
    resp = await stack.client.post("/v1/completions", json=body, headers={"x-dynamo-session-id": " chat-7 "})
    assert resp.status_code == 200, resp.text
    assert [r.session_id for r in worker.requests] == ["chat-7", "chat-7"]  # every choice
    resp = await stack.client.post("/v1/completions", json=body)
    assert resp.status_code == 200
    assert worker.requests[-1].session_id == ""  # `user` counts only with --router-session-from-user
    assert CURRENT_SESSION.get() == ""  # nothing left behind in the caller's context


def test_user_is_the_session_only_when_allowed_and_without_a_header() -> None:
    assert request_session("u1", from_user=False) == ""
    assert request_session("u1", from_user=True) == "u1"
    reset = CURRENT_SESSION.set("from-header")
    try:
        assert request_session("u1", from_user=True) == "from-header"
    finally:
        CURRENT_SESSION.reset(reset)
