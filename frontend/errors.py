"""The one place where errors become HTTP: DynamoError (and anything unexpected) -> status,
headers and an OpenAI error body `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dynamo import errors
from frontend.schemas import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

_ENCODER = msgspec.json.Encoder()


class RequestTooLarge(errors.InvalidRequest):
    code = "request_too_large"


class TooManyRequests(errors.Overloaded):
    """This frontend already serves --max-inflight-requests requests."""

    code = "too_many_requests"


class PriorityNotAllowed(errors.DynamoError):
    """A caller that is not a trusted tenant chose its request's priority class."""

    code = "priority_not_allowed"


class Shed(errors.Overloaded):
    """Refused by admission (frontend/admission.py) with its own Retry-After."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueTimeout(Shed):
    """The request waited its class's queue timeout for admission."""

    code = "queue_timeout"


class TtftTargetMissed(Shed):
    """Its predicted time to first token exceeds its class's target."""

    code = "ttft_target_unattainable"


class Unauthorized(errors.DynamoError):
    """Missing or wrong API key."""

    code = "invalid_api_key"


class ClientDisconnected(errors.DynamoError):
    """The HTTP client went away; never sent (there is nobody to send it to), only counted."""

    code = "client_disconnected"


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


# code -> (status, OpenAI error type). Codes not listed here came from a remote handler we do
# not know; they are the worker's fault, so 502.
_STATUS: dict[str, tuple[int, str]] = {
    errors.InvalidRequest.code: (400, "invalid_request_error"),
    RequestTooLarge.code: (413, "invalid_request_error"),
    Unauthorized.code: (401, "invalid_request_error"),
    TooManyRequests.code: (429, "rate_limit_exceeded"),
    PriorityNotAllowed.code: (403, "permission_error"),
    QueueTimeout.code: (503, "service_unavailable"),
    TtftTargetMissed.code: (503, "service_unavailable"),
    errors.RequestTimeout.code: (504, "timeout"),
    errors.ModelNotFound.code: (404, "invalid_request_error"),
    errors.NoInstances.code: (503, "service_unavailable"),
    errors.InstanceUnavailable.code: (503, "service_unavailable"),
    errors.Overloaded.code: (503, "service_unavailable"),
    errors.StreamBroken.code: (502, "server_error"),
    errors.EngineError.code: (500, "server_error"),
    errors.DynamoError.code: (500, "server_error"),
}
_RETRY_LATER = frozenset({429, 503})
_JSON_HEADERS = ((b"content-type", b"application/json"),)


def error_info(exc: BaseException) -> tuple[int, ErrorInfo]:
    """Status and OpenAI error object for any exception (unexpected ones become a 500 that
    names the exception class, never a traceback)."""
    if isinstance(exc, errors.DynamoError):
        status, type_ = _STATUS.get(exc.code, (502, "server_error"))
        message = exc.message
        if status == 502 and exc.code not in _STATUS:
            message = f"worker error ({exc.code}): {exc.message}"
        return status, ErrorInfo(message=message, type=type_, param=exc.param, code=exc.code)
    return 500, ErrorInfo(
        message=f"internal error: {type(exc).__name__}", type="server_error", code="internal_error"
    )


def error_body(info: ErrorInfo) -> bytes:
    return _ENCODER.encode(ErrorResponse(info))


def http_error(exc: BaseException) -> HttpError:
    status, info = error_info(exc)
    if status >= 500 and not isinstance(exc, errors.DynamoError):
        log.error("unexpected error serving a request", exc_info=exc)
    headers = _JSON_HEADERS
    if status in _RETRY_LATER:
        retry_after_s = exc.retry_after_s if isinstance(exc, Shed) else 1
        headers = headers + ((b"retry-after", str(retry_after_s).encode()),)
    return HttpError(status, error_body(info), headers)


def http_status_error(status: int, message: str) -> HttpError:
    """For Starlette's own errors (unknown route 404, wrong method 405)."""
    type_ = "invalid_request_error" if status < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    return HttpError(status, error_body(ErrorInfo(message=message, type=type_, code=code)), _JSON_HEADERS)


def to_response(error: HttpError) -> Response:
    return Response(
        content=error.body,
        status_code=error.status,
        headers={k.decode(): v.decode() for k, v in error.headers},
    )


def install_handlers(app: FastAPI) -> None:
    """Make every error FastAPI/Starlette produce itself an OpenAI error body."""

    async def on_dynamo(_: Request, exc: Exception) -> Response:
        return to_response(http_error(exc))

    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return to_response(http_status_error(exc.status_code, str(exc.detail)))

    async def on_validation(_: Request, exc: Exception) -> Response:
        return to_response(http_error(errors.InvalidRequest(f"invalid request: {exc}")))

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        return to_response(http_error(exc))

    app.add_exception_handler(errors.DynamoError, on_dynamo)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_unexpected)
