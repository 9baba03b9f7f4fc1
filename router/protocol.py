"""Wire types of the standalone router service: a frontend asks `router/select` for a decision
and reports each request's progress on the feedback subject."""

from __future__ import annotations

from typing import Literal

import msgspec

from dynamo.wire import Codec

ROUTER_COMPONENT = "router"
SELECT_ENDPOINT = "select"


def feedback_subject(namespace: str) -> str:
    """Every router replica of the namespace hears every frontend's feedback."""
    return f"{namespace}.{ROUTER_COMPONENT}.feedback"


class RouteRequest(msgspec.Struct, frozen=True, array_like=True):
    request_id: str
    token_ids: list[int]
    candidates: list[int]  # live instance ids serving the request's model
    session_id: str = ""  # session affinity (router/session.py); "" for none
    trace: str | None = None  # W3C traceparent of the frontend's route span (dynamo/tracing.py)


class RouteDecision(msgspec.Struct, frozen=True, array_like=True):
    instance_id: int
    overlap_blocks: float = 0  # tier-weighted, as RoutingDecision's


FeedbackKind = Literal["first_token", "finished", "removed"]


class RouteFeedback(msgspec.Struct, frozen=True, array_like=True):
    """What the frontend learned after routing: prefill done, request gone, instance gone."""

    kind: FeedbackKind
    instance_id: int
    request_id: str = ""


ROUTE_REQUEST_CODEC = Codec(RouteRequest)
ROUTE_DECISION_CODEC = Codec(RouteDecision)
ROUTE_FEEDBACK_CODEC = Codec(RouteFeedback)
