"""planner/observe.py: a frontend page's cumulative series -> one interval's traffic (rate,
lengths, p90s from bucket deltas as Prometheus' histogram_quantile computes them), and
Prometheus' HTTP API answers."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram as PromHistogram, generate_latest

from planner.observe import (
    HELD, INFLIGHT, ISL, ITL, OSL, TTFT, Histogram, parse_frontend_page, parse_prometheus_value,
    prometheus_queries, traffic_between,
)


class Page:
    """The frontend's metrics by name (as frontend/metrics.py declares them), for two models."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        buckets = (0.05, 0.1, 0.25, 0.5, 1.0)
        self.ttft = PromHistogram(TTFT, "ttft", ["model"], buckets=buckets, registry=self.registry)
        self.itl = PromHistogram(ITL, "itl", ["model"], buckets=(0.01, 0.02, 0.05), registry=self.registry)
        self.isl = PromHistogram(ISL, "isl", ["model"], buckets=(128, 1024, 8192), registry=self.registry)
        self.osl = PromHistogram(OSL, "osl", ["model"], buckets=(128, 1024), registry=self.registry)
        self.inflight = Gauge(INFLIGHT, "inflight", ["model"], registry=self.registry)
        self.held = Gauge(HELD, "held", ["model"], registry=self.registry)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def test_interval_traffic_from_two_pages() -> None:
    page = Page()
    page.isl.labels("tiny").observe(100)
    page.isl.labels("other").observe(5000)  # another model: not planned here
    before = parse_frontend_page(page.text(), "tiny")
    for _ in range(10):
        page.isl.labels("tiny").observe(300)
        page.osl.labels("tiny").observe(50)
    for v in [0.04] * 8 + [0.3, 0.3]:
        page.ttft.labels("tiny").observe(v)
    page.itl.labels("tiny").observe(0.015)
    page.inflight.labels("tiny").set(3)
    page.held.labels("tiny").set(1)
    after = parse_frontend_page(page.text(), "tiny")
    t = traffic_between(before, after, 2.0)
    assert t.request_rate == pytest.approx(5.0)  # 10 admitted in 2 s
    assert t.isl == pytest.approx(300) and t.osl == pytest.approx(50)
    # rank 9 of 10 falls in the (0.25, 0.5] bucket, which holds ranks 9 and 10: linear within it.
    assert t.ttft_p90_s == pytest.approx(0.25 + (0.5 - 0.25) * (9 - 8) / (10 - 8))
    assert t.itl_p90_s is not None and 0.01 < t.itl_p90_s <= 0.02
    assert (t.inflight, t.held) == (3, 1)
    every = traffic_between(parse_frontend_page(Page().text(), None), parse_frontend_page(page.text(), None), 1.0)
    assert every.request_rate == pytest.approx(12.0)


def test_no_previous_page_and_a_restarted_frontend() -> None:
    page = Page()
    page.isl.labels("m").observe(10)
    snap = parse_frontend_page(page.text(), None)
    assert traffic_between(None, snap, 1.0).request_rate == 0.0  # nothing to take a rate over
    restarted = parse_frontend_page(Page().text(), None)
    t = traffic_between(snap, restarted, 1.0)
    assert t.request_rate == 0.0 and t.ttft_p90_s is None


def test_histogram_quantile_edges() -> None:
    assert Histogram().quantile(0.9) is None
    h = Histogram({0.1: 0.0, 0.5: 10.0, math.inf: 10.0}, 10.0, 2.0)
    assert h.quantile(0.5) == pytest.approx(0.3)
    over = Histogram({0.1: 0.0, math.inf: 5.0}, 5.0, 9.0)
    assert over.quantile(0.9) == 0.1  # in the +Inf bucket: its lower edge, as Prometheus does


def test_prometheus_answers() -> None:
    vector = {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1733472000.0, "2.5"]}]}}
    assert parse_prometheus_value(vector) == 2.5
    assert parse_prometheus_value({"status": "success", "data": {"resultType": "vector", "result": []}}) is None
    nan = {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1.0, "NaN"]}]}}
    assert parse_prometheus_value(nan) is None
    assert parse_prometheus_value({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "7"]}}) == 7.0
    with pytest.raises(ValueError):
        parse_prometheus_value({"status": "error", "errorType": "bad_data", "error": "parse error"})


def test_prometheus_queries_select_the_model_and_window() -> None:
    q = prometheus_queries("tiny", 60)
    assert q["request_rate"] == f'sum(rate({ISL}_count{{model="tiny"}}[60s]))'
    assert q["ttft_p90_s"] == f'histogram_quantile(0.9, sum by (le) (rate({TTFT}_bucket{{model="tiny"}}[60s])))'
    assert "{" not in prometheus_queries(None, 30)["held"]
