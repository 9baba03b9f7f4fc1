"""The project's one exception hierarchy. The frontend maps these to HTTP statuses in one place
(frontend/errors.py); workers send them across the request plane by `code`."""

from __future__ import annotations


class DynamoError(Exception):
    """Base of every error this project raises on purpose."""

    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(DynamoError):
    """The client sent something wrong (bad field, out-of-range value, prompt too long)."""

    code = "invalid_request"


class ModelNotFound(DynamoError):
    code = "model_not_found"


class NoInstances(DynamoError):
    """No live worker serves the endpoint or model right now."""

    code = "no_instances"


class InstanceUnavailable(DynamoError):
    """The chosen instance did not answer (dead, or gone between routing and sending)."""

    code = "instance_unavailable"


class StreamBroken(DynamoError):
    """A response stream ended without an end frame, lost a frame, or its worker died."""

    code = "stream_broken"


class Overloaded(DynamoError):
    """No capacity right now (a full queue); the caller may retry elsewhere or later."""

    code = "overloaded"


class RequestTimeout(DynamoError):
    """The request ran past its deadline and was cancelled."""

    code = "request_timeout"


class EngineError(DynamoError):
    """The engine failed while serving a request."""

    code = "engine_error"


class RemoteError(DynamoError):
    """An error raised by a remote handler, carried across the request plane by its code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


_BY_CODE: dict[str, type[DynamoError]] = {
    cls.code: cls
    for cls in (
        DynamoError,
        InvalidRequest,
        ModelNotFound,
        NoInstances,
        InstanceUnavailable,
        StreamBroken,
        Overloaded,
        RequestTimeout,
        EngineError,
    )
}


def from_code(code: str, message: str) -> DynamoError:
    """Rebuild a typed error on the caller's side of the request plane."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return RemoteError(message, code)
    return cls(message)
