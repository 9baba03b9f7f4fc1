"""A request's session id, for the router's session affinity (router/session.py).

It comes from a header (`--router-session-header`, by default `x-dynamo-session-id`, the one
NVIDIA Dynamo's frontend reads and its clients and aiperf send) or, with
`--router-session-from-user`, from the OpenAI `user` field of a request without the header. The
app reads the header once per request (`bind`) into a context variable, so the pipeline sees it
without every API handler passing it along; the pipeline stamps it on each choice's
PreprocessedRequest (`with_session`), where the router, embedded or remote, finds it.
"""

from __future__ import annotations

import contextvars
import dataclasses

import msgspec
from starlette.types import Scope

from frontend.preprocess import Prepared

# Longer ids are cut: the router keeps every live one in memory.
MAX_SESSION_ID_CHARS = 256

CURRENT_SESSION: contextvars.ContextVar[str] = contextvars.ContextVar("dynamo_session_id", default="")


def header_session(scope: Scope, header: bytes) -> str:
    """The session id in the request's `header` (lower-case name), or ""."""
    for name, value in scope["headers"]:
        if name == header:
            return value.decode("latin-1").strip()[:MAX_SESSION_ID_CHARS]
    return ""


def request_session(user: str | None, from_user: bool) -> str:
    """The current request's session id: its header's, else its `user` when allowed."""
    session = CURRENT_SESSION.get()
    if not session and from_user and user:
        session = user[:MAX_SESSION_ID_CHARS]
    return session


def with_session(prepared: Prepared, session: str) -> Prepared:
    """`prepared` with every choice's request carrying `session`."""
    choices = [
        dataclasses.replace(c, request=msgspec.structs.replace(c.request, session_id=session))
        for c in prepared.choices
    ]
    return dataclasses.replace(prepared, choices=choices)
