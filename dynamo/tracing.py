"""Distributed tracing: a request's W3C trace context (`traceparent`) rides in the wire requests
(PreprocessedRequest.trace, the router service's RouteRequest.trace) from the frontend through the
router and either request plane to the worker and its engine; each process exports its spans with
OpenTelemetry, over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set and as JSON lines when
DYN_TRACE_FILE is. With neither, nothing is set up, the OpenTelemetry SDK is never imported and
every function here returns at its first test (`active` is False, a request's `trace` is None).

The tracer is process-global, as OpenTelemetry's own tracer provider is: one exporter per process,
set up by the entry point (dynamo/entry.py `run`). Passing it down instead would touch every
constructor from the HTTP endpoint to the engine's request stream for a concern that has exactly
one value per process.

Times handed in are `time.perf_counter()` seconds (what the code already records); spans carry
wall-clock nanoseconds, converted with one offset taken at setup.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, Union

from dynamo.flags import Flag, FlagGroup

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

TRACING_FLAGS = FlagGroup(
    "tracing",
    [
        Flag(
            "--otlp-endpoint",
            "export spans with OpenTelemetry over OTLP/HTTP (protobuf) to this collector URL (spans go "
            "to URL/v1/traces; the exporter's other OTEL_EXPORTER_OTLP_* variables apply); unset and "
            "no --trace-file: tracing is off",
            env="OTEL_EXPORTER_OTLP_ENDPOINT",
            metavar="URL",
        ),
        Flag(
            "--otlp-traces-endpoint",
            "the full URL spans are POSTed to, as is (the spec's signal-specific variable; wins over "
            "--otlp-endpoint)",
            env="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            metavar="URL",
        ),
        Flag(
            "--trace-file",
            "append spans to this file as JSON lines (for tests and debugging; with or without OTLP)",
            env="DYN_TRACE_FILE",
            metavar="PATH",
        ),
        Flag(
            "--trace-service-name",
            "the service.name spans are exported under",
            env="OTEL_SERVICE_NAME",
            default_doc="dynamo-frontend, dynamo-router, dynamo-worker or dynamo-serve",
        ),
    ],
)

SpanKind = Literal["internal", "server", "client"]


@dataclass(frozen=True, slots=True)
class TracingConfig:
    otlp_endpoint: str | None = None  # a base URL: spans go to URL/v1/traces
    trace_file: str | None = None
    service_name: str = "dynamo"
    otlp_traces_endpoint: str | None = None  # the full URL, taken as is

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint or self.otlp_traces_endpoint or self.trace_file)

    @property
    def otlp_url(self) -> str | None:
        """Where OTLP/HTTP spans are POSTed, as the spec resolves the two variables."""
        if self.otlp_traces_endpoint:
            return self.otlp_traces_endpoint
        if self.otlp_endpoint:
            return self.otlp_endpoint.rstrip("/") + "/v1/traces"
        return None

    @classmethod
    def from_args(cls, args: Any, default_service_name: str) -> TracingConfig:
        return cls(
            otlp_endpoint=getattr(args, "otlp_endpoint", None) or None,
            trace_file=getattr(args, "trace_file", None) or None,
            service_name=getattr(args, "trace_service_name", None) or default_service_name,
            otlp_traces_endpoint=getattr(args, "otlp_traces_endpoint", None) or None,
        )


# Read on hot paths as `tracing.active`: one attribute load when tracing is off.
active = False
_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_offset_ns = 0  # wall-clock ns minus perf_counter ns
_kinds: dict[str, Any] = {}
# opentelemetry.trace and opentelemetry.context, imported by setup() only.
_api: Any = None
_context_api: ModuleType | None = None
_NOOP: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def setup(config: TracingConfig) -> bool:
    """Install the exporters `config` asks for; False (and nothing imported) when it asks for
    none. Called once per process by the entry point; `shutdown()` flushes."""
    global active, _tracer, _provider, _offset_ns, _api, _context_api
    if not config.enabled:
        return False
    from opentelemetry import context as context_api
    from opentelemetry import trace as trace_api
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Only what was given wins over OTEL_RESOURCE_ATTRIBUTES; the SDK reads the sampler
    # (OTEL_TRACES_SAMPLER) and the batching (OTEL_BSP_*) from the environment itself.
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    url = config.otlp_url
    if url is not None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Given explicitly, the exporter takes the URL as is: otlp_url applies the spec's rules.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    if config.trace_file:
        provider.add_span_processor(BatchSpanProcessor(json_lines_exporter(config.trace_file)))
    _kinds.update(
        internal=trace_api.SpanKind.INTERNAL, server=trace_api.SpanKind.SERVER, client=trace_api.SpanKind.CLIENT
    )
    _api, _context_api = trace_api, context_api
    _provider = provider
    _tracer = provider.get_tracer("dynamo")
    _offset_ns = time.time_ns() - time.perf_counter_ns()
    active = True
    log.info(
        "tracing on as %s:%s%s", config.service_name,
        f" OTLP to {url}" if url else "",
        f" spans to {config.trace_file}" if config.trace_file else "",
    )
    return True


def flush() -> None:
    """Export every span ended so far, now (on this thread)."""
    if _provider is not None:
        _provider.force_flush()


def shutdown() -> None:
    """Flush and stop the exporters (spans still batched are written)."""
    global active, _tracer, _provider, _api, _context_api
    provider, _provider = _provider, None
    active, _tracer, _api, _context_api = False, None, None, None
    _extract.cache_clear()
    if provider is not None:
        provider.shutdown()


# ------------------------------------------------------------------------------------------
# W3C trace context
# ------------------------------------------------------------------------------------------

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def parse_traceparent(header: str) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a W3C `traceparent`, or None when it is not a valid
    one (the spec's rule: then start a new trace)."""
    match = _TRACEPARENT.fullmatch(header.strip())
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None  # ff is forbidden; version 00 has exactly four fields
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags_hex, 16)


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def traceparent(s: Span | None) -> str | None:
    """The `traceparent` that makes a remote span a child of `s`."""
    if s is None:
        return None
    ctx = s.get_span_context()
    return format_traceparent(ctx.trace_id, ctx.span_id, int(ctx.trace_flags))


def extract(header: str | None) -> Context | None:
    """The context that starts a child of the remote span a `traceparent` names; None when
    tracing is off or the header is missing or invalid (a child of it is then a new root)."""
    if _api is None or header is None:
        return None
    return _extract(header)


# A request's traceparent parents several spans in each process (a worker's engine spans, a
# choice's route and first_token): parsed once. Contexts are immutable, so sharing them is safe.
@functools.lru_cache(maxsize=1024)
def _extract(header: str) -> Context | None:
    api = _api
    parsed = parse_traceparent(header)
    if parsed is None or api is None:
        return None
    trace_id, span_id, flags = parsed
    remote = api.SpanContext(trace_id, span_id, is_remote=True, trace_flags=api.TraceFlags(flags & 0x01))
    return api.set_span_in_context(api.NonRecordingSpan(remote))


def recording() -> bool:
    """Whether the current span is recorded (tracing on and the request sampled): what is not
    recorded need not be carried on, so an unsampled request costs its processes nothing more."""
    return _api is not None and _api.get_current_span().is_recording()


def current_traceparent() -> str | None:
    """The `traceparent` of the current span (to carry in an outgoing request), or None."""
    api = _api
    if api is None:
        return None
    ctx = api.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format_traceparent(ctx.trace_id, ctx.span_id, int(ctx.trace_flags))


def current_trace_id() -> str:
    """The current trace's id in hex, or "-" (for log lines)."""
    api = _api
    if api is None:
        return "-"
    ctx = api.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else "-"


# ------------------------------------------------------------------------------------------
# Spans
# ------------------------------------------------------------------------------------------


class _Current(enum.Enum):
    CURRENT = 0


# A span's parent: this sentinel for the current span; a `traceparent` string (from the wire:
# an invalid one starts a new trace); a local span; None for "this request is not traced",
# which makes no span at all.
CURRENT = _Current.CURRENT
Parent = Union[str, "Span", _Current, None]


def _context(parent: str | Span | _Current) -> Context | None:
    if parent is CURRENT:
        return None
    if isinstance(parent, str):
        return extract(parent)
    assert _api is not None
    return _api.set_span_in_context(parent)


def start_span(
    name: str,
    parent: Parent = CURRENT,
    *,
    kind: SpanKind = "internal",
    start_s: float | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Span | None:
    """A span, not made current, under `parent`; None when tracing is off or `parent` is None.
    End it with `end`."""
    tracer = _tracer
    if tracer is None or parent is None:
        return None
    return tracer.start_span(
        name,
        context=_context(parent),
        kind=_kinds[kind],
        attributes=attributes,
        start_time=None if start_s is None else _ns(start_s),
    )


def end(s: Span | None, end_s: float | None = None, attributes: Mapping[str, Any] | None = None) -> None:
    if s is None:
        return
    if attributes:
        s.set_attributes(attributes)
    s.end(None if end_s is None else _ns(end_s))


def emit(
    name: str,
    parent: Parent,
    start_s: float,
    end_s: float,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """A finished span from recorded times (for work timed where a span would cost too much)."""
    end(start_span(name, parent, start_s=start_s, attributes=attributes), end_s)


def span(
    name: str,
    parent: Parent = CURRENT,
    *,
    kind: SpanKind = "internal",
    attributes: Mapping[str, Any] | None = None,
) -> contextlib.AbstractContextManager[Span | None]:
    """`with tracing.span(...) as s:` a span made current for the block, so that calls in it
    carry it on (`current_traceparent`); an exception fails it. `s` is None, and the block
    costs one call, when tracing is off or `parent` is None."""
    if _tracer is None or parent is None:
        return _NOOP
    return _current_span(name, parent, kind, attributes)


@contextlib.contextmanager
def _current_span(name: str, parent: Parent, kind: SpanKind, attributes: Mapping[str, Any] | None) -> Iterator[Span | None]:
    s = start_span(name, parent, kind=kind, attributes=attributes)
    assert s is not None and _api is not None and _context_api is not None
    token = _context_api.attach(_api.set_span_in_context(s))
    try:
        yield s
    except BaseException as exc:
        fail(s, exc)
        raise
    finally:
        _context_api.detach(token)
        s.end()


def annotate(attributes: Mapping[str, Any]) -> None:
    """Set attributes on the current span (nothing when tracing is off)."""
    if _api is not None:
        _api.get_current_span().set_attributes(attributes)


def attach(s: Span | None) -> object:
    """Make `s` current until `detach(token)` (for a span that covers a whole function whose
    body a `with` would have to re-indent); returns the token, None when `s` is None."""
    if s is None or _api is None or _context_api is None:
        return None
    return _context_api.attach(_api.set_span_in_context(s))


def detach(token: object) -> None:
    if token is not None and _context_api is not None:
        _context_api.detach(token)


def fail(s: Span | None, error: BaseException | str) -> None:
    """Mark `s` failed (a cancellation counts: the client or a deadline ended the work)."""
    if s is None or _api is None:
        return
    if isinstance(error, BaseException):
        s.record_exception(error)
        error = f"{type(error).__name__}: {error}"
    s.set_status(_api.Status(_api.StatusCode.ERROR, error))


def _ns(perf_s: float) -> int:
    return _offset_ns + int(perf_s * 1e9)


# ------------------------------------------------------------------------------------------
# The file exporter
# ------------------------------------------------------------------------------------------


def span_record(s: ReadableSpan) -> dict[str, Any]:
    """One finished span as the file exporter writes it: ids in W3C hex, times in wall-clock ns."""
    ctx = s.context
    parent = s.parent
    return {
        "name": s.name,
        "trace_id": f"{ctx.trace_id:032x}" if ctx is not None else None,
        "span_id": f"{ctx.span_id:016x}" if ctx is not None else None,
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "parent_remote": bool(parent is not None and parent.is_remote),
        "kind": s.kind.name.lower(),
        "start_ns": s.start_time,
        "end_ns": s.end_time,
        "status": s.status.status_code.name.lower(),
        "service": s.resource.attributes.get("service.name"),
        "attributes": dict(s.attributes or {}),
    }


def json_lines_exporter(path: str) -> SpanExporter:
    """A SpanExporter appending one JSON object per span (`span_record`) to `path`; it runs on
    the batch processor's thread, never on the event loop."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonLinesExporter(SpanExporter):
        def __init__(self) -> None:
            self._out = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by shutdown()

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            self._out.write("".join(json.dumps(span_record(s)) + "\n" for s in spans))
            self._out.flush()
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            self._out.close()

    return JsonLinesExporter()
