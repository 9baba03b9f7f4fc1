"""Distributed tracing end to end (dynamo/tracing.py): a frontend, the router as its own process
(`python -m dynamo.router`, asked by the frontend's `--router-mode remote`) and a mocker worker,
on real nats-server and etcd, each writing its spans to its own file (DYN_TRACE_FILE). The
frontend reaches the router over the TCP request plane and the worker over NATS, so the trace
context crosses both planes. The spans of the three files must assemble into one trace with the
right parent links, under the client's traceparent when it sent one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dynamo.trace_view import by_trace, read_spans
from tests.e2e.procs import TINY_MODEL, Stack, base_env, free_port, http_ok, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MODEL = "tiny"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Traced:
    def __init__(self, stack: Stack, base: str, files: dict[str, Path]) -> None:
        self.stack, self.base, self.files = stack, base, files

    def spans(self, trace_id: str) -> list[dict]:
        return by_trace(read_spans(self.files.values())).get(trace_id, [])

    def wait_for(self, trace_id: str, names: set[str]) -> list[dict]:
        """The trace's spans once every name in `names` is among them (each process exports in
        batches, on its own schedule)."""
        wait_until(lambda: names <= {s["name"] for s in self.spans(trace_id)}, 20, f"spans {sorted(names)}")
        return self.spans(trace_id)


@pytest.fixture(scope="module")
def traced(nats_server: str, etcd_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    tmp: Path = tmp_path_factory.mktemp("tracing")
    env = base_env(
        NATS_SERVER=nats_server,
        ETCD_ENDPOINTS=etcd_server,
        DYN_NAMESPACE=f"trace{free_port()}",
        DYN_LEASE_TTL_S="2",
        OTEL_BSP_SCHEDULE_DELAY="50",  # export within 50 ms instead of 5 s
        OTEL_SERVICE_NAME="",  # each process's own default name
    )
    files = {name: tmp / f"{name}.jsonl" for name in ("frontend", "router", "worker")}
    s = Stack(tmp, env)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    s.start(
        "worker", "dynamo.worker", "--engine", "mocker", "--model", TINY_MODEL, "--served-model-name", MODEL,
        "--speedup-ratio", "100", "--request-plane", "nats", "--trace-file", str(files["worker"]),
    )
    router = s.start("router", "dynamo.router", "--trace-file", str(files["router"]))
    frontend = s.start(
        "frontend", "dynamo.frontend", "--http-port", str(port), "--router-mode", "remote", "--log-json",
        env={**env, "DYN_TRACE_FILE": str(files["frontend"])},
    )
    try:
        wait_until(lambda: http_ok(f"{base}/ready") or frontend.popen.poll() is not None, 60, "frontend ready")
        wait_until(lambda: "router service serves" in router.log() or router.popen.poll() is not None, 60, "router up")
        assert frontend.popen.poll() is None and router.popen.poll() is None
    except (TimeoutError, AssertionError):
        logs = "\n".join(f"--- {p.name}\n{p.log()}" for p in s.procs)
        s.stop_all()
        raise AssertionError(f"stack did not come up:\n{logs}") from None
    yield Traced(s, base, files)
    s.stop_all()


def _chat(base: str, headers: dict[str, str] | None = None, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **extra}
    response = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers or {}, timeout=30)
    assert response.status_code == 200, response.text
    return response


def test_spans_of_three_processes_make_one_trace_under_the_clients_span(traced: Traced) -> None:
    response = _chat(traced.base, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}, user="trace-test-user")
    expected = {
        "POST /v1/chat/completions", "preprocess", "queue", "generate", "route", "first_token",
        "router.select", "worker.generate", "engine.queue", "engine.prefill", "engine.decode",
    }
    spans = traced.wait_for(CLIENT_TRACE, expected)
    by_name = {s["name"]: s for s in spans}

    def parent(name: str) -> dict:
        child = by_name[name]
        found = [s for s in spans if s["span_id"] == child["parent_id"]]
        assert found, f"{name}: parent {child['parent_id']} not in the trace"
        return found[0]

    root = by_name["POST /v1/chat/completions"]
    # The client's span is the root's parent; the response names the root.
    assert root["parent_id"] == CLIENT_SPAN and root["parent_remote"] and root["kind"] == "server"
    assert response.headers["traceresponse"] == f"00-{CLIENT_TRACE}-{root['span_id']}-01"
    for name in ("preprocess", "queue", "generate"):
        assert parent(name) is root, name
    for name in ("route", "first_token", "worker.generate"):
        assert parent(name)["name"] == "generate", name
    assert parent("router.select")["name"] == "route"  # across the TCP plane, in the router process
    for name in ("engine.queue", "engine.prefill", "engine.decode"):
        assert parent(name)["name"] == "worker.generate", name  # across NATS, in the worker
    services = {s["name"]: s["service"] for s in spans}
    assert services["router.select"] == "dynamo-router"
    assert services["worker.generate"] == services["engine.decode"] == "dynamo-worker"
    assert services["generate"] == "dynamo-frontend"
    # Each span is in its own process's file.
    for process, names in (("router", {"router.select"}), ("worker", {"worker.generate", "engine.prefill"})):
        assert names <= {s["name"] for s in read_spans([traced.files[process]])}
    request_id = root["attributes"]["dynamo.request_id"]
    assert by_name["worker.generate"]["attributes"]["dynamo.request_id"] == request_id
    assert by_name["engine.decode"]["attributes"]["dynamo.output_tokens"] == 4
    # Engine phases in order, inside the worker's span.
    q, p, d = by_name["engine.queue"], by_name["engine.prefill"], by_name["engine.decode"]
    assert q["end_ns"] <= p["start_ns"] + 1000 and p["end_ns"] <= d["start_ns"] + 1000
    # The JSON log line of this request (its `user` is logged) carries both ids.
    frontend = next(p for p in traced.stack.procs if p.name == "frontend")
    lines = [json.loads(line) for line in frontend.log_path.read_text().splitlines() if "trace-test-user" in line]
    assert lines and lines[0]["trace_id"] == CLIENT_TRACE and lines[0]["request_id"] == request_id


def test_a_request_without_traceparent_starts_its_own_trace(traced: Traced) -> None:
    response = _chat(traced.base)
    trace_id = response.headers["traceresponse"].split("-")[1]
    assert trace_id != CLIENT_TRACE
    spans = traced.wait_for(trace_id, {"POST /v1/chat/completions", "router.select", "engine.decode"})
    roots = [s for s in spans if s["parent_id"] is None]
    assert [s["name"] for s in roots] == ["POST /v1/chat/completions"]
