"""Errors in Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`. The status
(and Retry-After) come from frontend/errors.py's one table; only the error type is Anthropic's,
chosen by status the way Anthropic's API pairs them."""

from __future__ import annotations

import msgspec

from frontend.anthropic.schemas import ErrorBody, ErrorDetail
from frontend.errors import HttpError, error_info, http_error

_encode = msgspec.json.encode

# HTTP status -> Anthropic error type (Anthropic's own pairs; 502/504 have no type of their own).
_TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_detail(exc: BaseException) -> tuple[int, ErrorDetail]:
    status, info = error_info(exc)
    message = info.message if info.param is None or info.param in info.message else f"{info.message} (param: {info.param})"
    return status, ErrorDetail(type=error_type(status), message=message)


def anthropic_http_error(exc: BaseException) -> HttpError:
    """Status and headers as for the OpenAI routes, body in Anthropic's shape."""
    openai_shaped = http_error(exc)  # also logs unexpected errors, once
    _, detail = error_detail(exc)
    return HttpError(openai_shaped.status, _encode(ErrorBody(detail)), openai_shaped.headers)


def anthropic_status_error(status: int, message: str) -> HttpError:
    return HttpError(
        status,
        _encode(ErrorBody(ErrorDetail(type=error_type(status), message=message))),
        ((b"content-type", b"application/json"),),
    )
