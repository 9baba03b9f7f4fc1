"""The system server: /health, /ready and /metrics on a port of their own, and one metrics page
merged from several registries (dynamo.serve: frontend and router, and each worker)."""

from __future__ import annotations

import socket

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dynamo.system_server import ScrapedMetrics, SystemServer, merged_registry
from tests.infra import free_port


def test_merged_registry_labels_each_source_and_merges_families() -> None:
    frontend, worker_a, worker_b = CollectorRegistry(), CollectorRegistry(), CollectorRegistry()
    Counter("dynamo_router_decisions", "decisions", ["mode"], registry=frontend).labels("kv").inc(3)
    for registry, blocks in ((worker_a, 5), (worker_b, 7)):
        Gauge("dynamo_kvbm_blocks_used", "used", ["tier"], registry=registry).labels("host").set(blocks)
    merged = merged_registry([(frontend, {}), (worker_a, {"worker_instance": "a"}), (worker_b, {"worker_instance": "b"})])
    text = generate_latest(merged).decode()
    assert 'dynamo_router_decisions_total{mode="kv"} 3.0' in text
    assert 'dynamo_kvbm_blocks_used{tier="host",worker_instance="a"} 5.0' in text
    assert 'dynamo_kvbm_blocks_used{tier="host",worker_instance="b"} 7.0' in text
    assert text.count("# TYPE dynamo_kvbm_blocks_used gauge") == 1  # one family, two samples


async def test_scraped_pages_merge_like_registries() -> None:
    """A worker child's page, fetched over HTTP and parsed, lands on the parent's page as the
    same families an in-process worker's registry would give: counters, gauges, histograms."""
    worker, parent = CollectorRegistry(), CollectorRegistry()
    Counter("dynamo_worker_output_tokens", "tokens", ["model"], registry=worker).labels("m").inc(7)
    Histogram("dynamo_worker_step_seconds", "steps", registry=worker).observe(0.3)
    Counter("dynamo_router_decisions", "decisions", registry=parent).inc()
    port = free_port()
    async with SystemServer("127.0.0.1", 0, worker, lambda: True) as child:
        scraped = ScrapedMetrics(f"http://127.0.0.1:{child.bound_port}/metrics")
        merged = merged_registry([(parent, {}), (scraped, {"worker_instance": "a"})])
        async with httpx.AsyncClient() as client:
            async with SystemServer("127.0.0.1", port, merged, lambda: True, before_scrape=lambda: scraped.scrape(client)):
                text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    assert 'dynamo_worker_output_tokens_total{model="m",worker_instance="a"} 7.0' in text
    assert 'dynamo_worker_step_seconds_count{worker_instance="a"} 1.0' in text
    assert "dynamo_router_decisions_total 1.0" in text
    assert text.count("# TYPE dynamo_worker_output_tokens_total counter") == 1
    # A page that cannot be fetched gives nothing rather than failing the parent's scrape.
    gone = ScrapedMetrics(f"http://127.0.0.1:{free_port()}/metrics", timeout_s=1.0)
    async with httpx.AsyncClient() as client:
        await gone.scrape(client)
    assert list(gone.collect()) == []


async def test_serves_health_ready_and_metrics() -> None:
    registry = CollectorRegistry()
    Counter("dynamo_test_things", "things", registry=registry).inc()
    ready = False
    port = free_port()
    async with SystemServer("127.0.0.1", port, registry, lambda: ready):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/ready")).status_code == 503
            ready = True
            assert (await client.get("/ready")).status_code == 200
            assert "dynamo_test_things_total 1.0" in (await client.get("/metrics")).text


async def test_a_port_in_use_fails_clearly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="could not listen"):
            async with SystemServer("127.0.0.1", port, CollectorRegistry(), lambda: True):
                pass
