"""dynamo/tracing.py: the W3C traceparent as the OpenTelemetry propagator reads and writes it,
spans linked through a traceparent as they are across processes, the JSON-lines exporter, the
trace field on the wire, and nothing at all when tracing is off."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from opentelemetry import trace as trace_api
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from dynamo import tracing
from dynamo.logs import _JsonFormatter, _RequestIdFilter, request_id_var
from dynamo.trace_view import by_trace, read_spans, render
from dynamo.wire import PreprocessedRequest, encode
from router.protocol import RouteRequest

ROOT = Path(__file__).resolve().parents[3]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"

HEADERS = [
    f"00-{TRACE}-{SPAN}-01",
    f"00-{TRACE}-{SPAN}-00",  # not sampled
    f"01-{TRACE}-{SPAN}-01-future-field",  # a later version may add fields
    f"00-{TRACE}-{SPAN}-01-extra",  # version 00 may not
    f"ff-{TRACE}-{SPAN}-01",  # forbidden version
    f"00-{'0' * 32}-{SPAN}-01",  # zero trace id
    f"00-{TRACE}-{'0' * 16}-01",  # zero span id
    f"00-{TRACE.upper()}-{SPAN}-01",  # upper case
    f"00-{TRACE[:-1]}-{SPAN}-01",
    "garbage",
    "",
]


@pytest.mark.parametrize("header", HEADERS)
def test_traceparent_parsing_agrees_with_opentelemetry(header: str) -> None:
    ctx = trace_api.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": header})).get_span_context()
    parsed = tracing.parse_traceparent(header)
    if not ctx.is_valid:
        assert parsed is None
    else:
        assert parsed == (ctx.trace_id, ctx.span_id, int(ctx.trace_flags))


def test_traceparent_is_formatted_as_opentelemetry_injects_it() -> None:
    ctx = trace_api.SpanContext(int(TRACE, 16), int(SPAN, 16), is_remote=False, trace_flags=trace_api.TraceFlags(1))
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, trace_api.set_span_in_context(trace_api.NonRecordingSpan(ctx)))
    assert tracing.format_traceparent(ctx.trace_id, ctx.span_id, 1) == carrier["traceparent"]


async def test_spans_link_through_traceparents_as_across_processes(spans_file: Path) -> None:
    client = f"00-{TRACE}-{SPAN}-01"
    # "frontend": a server span under the client's, a child made current, its context handed on.
    with tracing.span("POST /v1/chat/completions", client, kind="server") as root:
        assert tracing.current_trace_id() == TRACE
        with tracing.span("route") as route:
            carried = tracing.current_traceparent()
        assert carried == tracing.traceparent(route)
        tracing.emit("preprocess", tracing.CURRENT, 1.0, 1.5, {"n": 1})
    # "worker": a span from the carried string, and one from recorded times under it.
    worker = tracing.start_span("worker.generate", carried, kind="server")
    tracing.emit("engine.decode", tracing.traceparent(worker), 2.0, 2.25)
    tracing.end(worker, attributes={"tokens": 3})
    assert tracing.start_span("untraced", None) is None  # a request without trace context
    with tracing.span("untraced", None) as nothing:
        assert nothing is None
    tracing.shutdown()  # flushes

    spans = {s["name"]: s for s in read_spans([spans_file])}
    assert set(spans) == {"POST /v1/chat/completions", "route", "preprocess", "worker.generate", "engine.decode"}
    assert {s["trace_id"] for s in spans.values()} == {TRACE}
    assert spans["POST /v1/chat/completions"]["parent_id"] == SPAN
    assert spans["route"]["parent_id"] == spans["preprocess"]["parent_id"] == root.get_span_context().span_id.to_bytes(8).hex()
    assert spans["worker.generate"]["parent_id"] == spans["route"]["span_id"]
    assert spans["engine.decode"]["parent_id"] == spans["worker.generate"]["span_id"]
    decode = spans["engine.decode"]
    assert decode["end_ns"] - decode["start_ns"] == pytest.approx(250_000_000, abs=1000)
    assert spans["worker.generate"]["attributes"] == {"tokens": 3}
    assert spans["route"]["service"] == "test-svc"
    tree = render(by_trace(spans.values())[TRACE])
    assert tree.index("POST /v1/chat/completions") < tree.index("route") < tree.index("worker.generate")


async def test_an_exception_fails_the_span(spans_file: Path) -> None:
    with pytest.raises(ValueError), tracing.span("failing"):
        raise ValueError("boom")
    tracing.shutdown()
    [span] = read_spans([spans_file])
    assert span["status"] == "error"


def test_json_logs_carry_request_and_trace_ids(spans_file: Path) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(_JsonFormatter())
    log = logging.getLogger("test_tracing_logs")
    log.addHandler(handler)
    log.propagate = False
    token = request_id_var.set("req-1")
    try:
        with tracing.span("server", f"00-{TRACE}-{SPAN}-01"):
            log.warning("inside")
        log.warning("outside")
    finally:
        request_id_var.reset(token)
        log.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (inside["request_id"], inside["trace_id"]) == ("req-1", TRACE)
    assert outside["trace_id"] == "-"


def test_the_trace_field_on_the_wire_is_optional_both_ways() -> None:
    request = PreprocessedRequest(request_id="r", model="m", token_ids=[1])
    assert b"trace" not in encode(request)  # untraced: not on the wire at all
    traced = msgspec.structs.replace(request, trace=f"00-{TRACE}-{SPAN}-01")
    # A peer without the field ignores it; one with it reads None from a peer without it.
    assert msgspec.msgpack.decode(encode(traced), type=PreprocessedRequest).trace == traced.trace

    class OldRouteRequest(msgspec.Struct, array_like=True):
        request_id: str
        token_ids: list[int]
        candidates: list[int]

    new = RouteRequest("r", [1], [2], "", f"00-{TRACE}-{SPAN}-01")
    assert msgspec.msgpack.decode(encode(new), type=OldRouteRequest).candidates == [2]
    assert msgspec.msgpack.decode(encode(OldRouteRequest("r", [1], [2])), type=RouteRequest).trace is None


def test_tracing_off_sets_up_nothing() -> None:
    """A process with neither variable set: no exporter, the SDK never imported, every call
    returns at once (a fresh interpreter, so that no other test's import counts)."""
    code = (
        "import sys, argparse\n"
        "from dynamo import tracing\n"
        "from dynamo.entry import add_common_args\n"
        "p = argparse.ArgumentParser(); add_common_args(p)\n"
        "assert not tracing.setup(tracing.TracingConfig.from_args(p.parse_args([]), 'x'))\n"
        "assert not tracing.active and tracing.current_traceparent() is None and tracing.current_trace_id() == '-'\n"
        f"assert tracing.start_span('s', '00-{TRACE}-{SPAN}-01') is None\n"
        "with tracing.span('s') as s: assert s is None\n"
        "assert not any(m.startswith('opentelemetry.sdk') for m in sys.modules), 'SDK imported'\n"
        "print('off')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "DYN_TRACE_FILE")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "off", result.stderr


def test_flags_from_the_standard_variables() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    tracing.TRACING_FLAGS.add_to(
        parser, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SERVICE_NAME": "fe-1"}
    )
    config = tracing.TracingConfig.from_args(parser.parse_args([]), "dynamo-frontend")
    assert config.enabled and config.otlp_endpoint == "http://collector:4318" and config.service_name == "fe-1"
    parser = argparse.ArgumentParser()
    tracing.TRACING_FLAGS.add_to(parser, environ={})
    config = tracing.TracingConfig.from_args(parser.parse_args(["--trace-file", "x.jsonl"]), "dynamo-worker")
    assert config.enabled and config.service_name == "dynamo-worker" and config.otlp_url is None
    assert tracing.TracingConfig(otlp_endpoint="http://c:4318/").otlp_url == "http://c:4318/v1/traces"
    both = tracing.TracingConfig(otlp_endpoint="http://c:4318", otlp_traces_endpoint="http://t:9/x")
    assert both.otlp_url == "http://t:9/x"  # the signal-specific variable wins, taken as is


def test_otlp_export_reaches_a_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT's meaning: a base URL; spans are POSTed to URL/v1/traces as
    OTLP protobuf."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append((self.path, self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}/"
        assert tracing.setup(tracing.TracingConfig(otlp_endpoint=endpoint, service_name="otlp-test"))
        try:
            tracing.emit("exported", f"00-{TRACE}-{SPAN}-01", 1.0, 2.0)
        finally:
            tracing.shutdown()  # flushes the batch
    finally:
        server.shutdown()
    [(path, body)] = received
    assert path == "/v1/traces"
    request = ExportTraceServiceRequest.FromString(body)
    [span] = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert span.name == "exported" and span.trace_id.hex() == TRACE and span.parent_span_id.hex() == SPAN
