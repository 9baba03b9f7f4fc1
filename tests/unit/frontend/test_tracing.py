"""The frontend's spans (dynamo/tracing.py) on the embedded runtime with scripted workers: what
each worker is sent carries the span it belongs under, and a migration is a span of its own,
parent of the second worker's part."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dynamo import tracing
from dynamo.trace_view import read_spans
from tests.unit.frontend.conftest import Stack
from tests.unit.frontend.test_reliability import ContinuingWorker, _body, _frontend, _start, _wait_for

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


async def test_a_migration_is_a_span_parenting_the_second_workers_request(stack: Stack, spans_file: Path) -> None:
    a = await _start(stack, gate=asyncio.Event())
    headers = {"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"}
    async with _frontend(stack, a, migration_limit=2) as (client, _, frontend):
        async with client.stream("POST", "/v1/completions", json=_body(), headers=headers) as resp:
            assert resp.status_code == 200
            traceresponse = resp.headers["traceresponse"]
            lines = resp.aiter_lines()
            await anext(lines)
            b = await _start(stack, ContinuingWorker)
            await _wait_for(frontend, b)
            assert a.served is not None
            await a.served.stop()  # a's stream breaks mid-way: the choice moves to b
            rest = "\n".join([line async for line in lines])
        assert rest.rstrip().endswith("data: [DONE]")
    tracing.shutdown()  # flushes

    spans = read_spans([spans_file])
    assert {s["trace_id"] for s in spans} == {TRACE}
    by_id = {s["span_id"]: s for s in spans}
    [root] = [s for s in spans if s["name"] == "POST /v1/completions"]
    [generate] = [s for s in spans if s["name"] == "generate"]
    [migration] = [s for s in spans if s["name"] == "migration"]
    assert root["parent_id"] == CLIENT_SPAN and traceresponse == f"00-{TRACE}-{root['span_id']}-01"
    assert generate["parent_id"] == root["span_id"] and migration["parent_id"] == generate["span_id"]
    assert migration["attributes"]["dynamo.generated_tokens"] == 1
    assert generate["attributes"]["dynamo.migrations"] == 1
    # Worker a was sent the choice's span, worker b the migration's.
    assert a.requests[0].trace == f"00-{TRACE}-{generate['span_id']}-01"
    assert b.requests[0].trace == f"00-{TRACE}-{migration['span_id']}-01"
    # Two dispatches: the first under the choice's span, the second under the migration's.
    routes = sorted((s for s in spans if s["name"] == "route"), key=lambda s: s["start_ns"])
    assert [by_id[s["parent_id"]]["name"] for s in routes] == ["generate", "migration"]
    firsts = sorted((s for s in spans if s["name"] == "first_token"), key=lambda s: s["start_ns"])
    assert [by_id[s["parent_id"]]["name"] for s in firsts] == ["generate", "migration"]
    assert migration["start_ns"] <= firsts[1]["end_ns"] <= migration["end_ns"]


async def test_untraced_when_off(stack: Stack) -> None:
    assert not tracing.active
    a = await _start(stack)
    async with _frontend(stack, a) as (client, _, _frontend_):
        resp = await client.post("/v1/completions", json=_body(stream=False),
                                 headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"})
        assert resp.status_code == 200
        assert "traceresponse" not in resp.headers
    assert a.requests[0].trace is None  # nothing on the wire


async def test_an_unsampled_request_records_nothing_and_carries_nothing(stack: Stack, spans_file: Path) -> None:
    """The client's traceparent says "not sampled": no span anywhere, and the workers are not
    even told (parent-based sampling, at the cost of one check)."""
    a = await _start(stack)
    async with _frontend(stack, a) as (client, _, _frontend_):
        resp = await client.post("/v1/completions", json=_body(stream=False),
                                 headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-00"})
        assert resp.status_code == 200
    assert a.requests[0].trace is None
    tracing.shutdown()
    assert read_spans([spans_file]) == []


async def test_a_stream_failing_mid_way_fails_its_span(stack: Stack, spans_file: Path) -> None:
    a = await _start(stack, fail_after=2)
    async with _frontend(stack, a) as (client, _, _frontend_):
        resp = await client.post("/v1/completions", json=_body(), headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"})
        assert resp.status_code == 200 and "error" in resp.text  # the error event, after the first tokens
    tracing.shutdown()
    [generate] = [s for s in read_spans([spans_file]) if s["name"] == "generate"]
    assert generate["status"] == "error"
