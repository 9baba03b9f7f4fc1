"""Prometheus metrics of the router, registered on a registry the caller passes in: decisions,
predicted overlap, index size, KV event outcomes and load-report lag."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_OVERLAP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RouterMetrics:
    """One per registry; every router of the process shares it (labels tell them apart)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "dynamo_router_decisions",
            "Routing decisions, by mode and chosen worker",
            ["mode", "worker"],
            registry=registry,
        )
        self.overlap_blocks = Histogram(
            "dynamo_router_overlap_blocks",
            "Prompt blocks the router predicted cached on the chosen worker",
            ["mode"],
            buckets=_OVERLAP_BUCKETS,
            registry=registry,
        )
        self.index_blocks = Gauge(
            "dynamo_router_index_blocks",
            "Distinct KV block hashes in the router's index",
            ["component"],
            registry=registry,
        )
        self.kv_events = Counter(
            "dynamo_router_kv_events",
            "KV events received, by outcome (applied, stale, gap, invalid)",
            ["component", "outcome"],
            registry=registry,
        )
        self.snapshot_requests = Counter(
            "dynamo_router_snapshot_requests",
            "KvSnapshotRequests sent (after a gap or for a worker not heard from)",
            ["component"],
            registry=registry,
        )
        self.kv_event_lag_s = Histogram(
            "dynamo_router_kv_event_lag_seconds",
            "Age of a worker's KV event when the router applies it (publication to index)",
            ["component"],
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        self.load_report_lag_s = Histogram(
            "dynamo_router_load_report_lag_seconds",
            "Age of a worker's load report when the router receives it",
            ["component"],
            buckets=_LAG_BUCKETS,
            registry=registry,
        )

        self.session_affinity = Counter(
            "dynamo_router_session_affinity",
            "Requests with a session id, by outcome: hit (sent to its pinned worker), miss (no "
            "live pin), repin (pinned worker gone), overloaded (pinned worker overloaded)",
            ["component", "outcome"],
            registry=registry,
        )
        self.sessions = Gauge(
            "dynamo_router_sessions",
            "Sessions pinned to a worker in this router's table",
            ["component"],
            registry=registry,
        )

    def watch_index(self, component: str, size: Callable[[], int]) -> None:
        """Report the index size at scrape time: no bookkeeping on the event path."""
        self.index_blocks.labels(component).set_function(size)

    def forget_index(self, component: str) -> None:
        for gauge in (self.index_blocks, self.sessions):
            try:
                gauge.remove(component)
            except KeyError:
                pass
