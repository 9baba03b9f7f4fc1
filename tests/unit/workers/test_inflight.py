"""The engine adapters' own count of their requests (workers/inflight.py): running, waiting and
prefill tokens through a request's life, and the load it reports where the engine's lags."""

from __future__ import annotations

from dynamo.wire import LoadMetrics
from workers.inflight import InflightRequests


def test_a_request_waits_until_its_first_output_and_leaves_when_it_ends() -> None:
    inflight = InflightRequests()
    inflight.started("a", 100)
    inflight.started("b", 30)
    assert (inflight.count, inflight.running, inflight.waiting, inflight.waiting_prefill_tokens) == (2, 0, 2, 130)
    inflight.first_output("a")
    inflight.first_output("a")  # later outputs change nothing
    assert (inflight.running, inflight.waiting, inflight.waiting_prefill_tokens) == (1, 1, 30)
    inflight.ended("b")  # ended before any output (cancelled, failed)
    inflight.ended("a")
    assert (inflight.count, inflight.running, inflight.waiting, inflight.waiting_prefill_tokens) == (0, 0, 0, 0)


def test_an_engine_report_lags_when_it_shows_nothing_while_requests_are_in_flight() -> None:
    inflight = InflightRequests()
    empty = LoadMetrics(worker_id=0, kv_active_blocks=7)
    assert not inflight.lags(empty)
    inflight.started("a", 12)
    assert inflight.lags(empty)
    assert not inflight.lags(LoadMetrics(worker_id=0, waiting_requests=1))
    assert not inflight.lags(LoadMetrics(worker_id=0, active_requests=1))
    assert inflight.load(7, 64, 5.0) == LoadMetrics(
        worker_id=0, waiting_requests=1, kv_active_blocks=7, kv_total_blocks=64, waiting_prefill_tokens=12, timestamp_s=5.0
    )
