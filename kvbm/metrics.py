"""KVBM counters: plain per-tier tallies (KvbmStats, read by tests and benchmarks) that also feed
Prometheus metrics (`dynamo_kvbm_*`, KvbmMetrics on a registry passed in) once one is bound."""

from __future__ import annotations

from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Model-thread seconds per executed plan: a plan that only launches copies takes tens of
# microseconds; one that waited on a copy or the disk would land in the top buckets.
PLAN_SECONDS_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1)


class KvbmMetrics:
    def __init__(self, registry: CollectorRegistry, model: str = "") -> None:
        labels = ["model", "tier"]
        self._model = model
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.blocks_used = Gauge("dynamo_kvbm_blocks_used", "Blocks held in a KVBM tier", labels, registry=registry)
        self.blocks_total = Gauge("dynamo_kvbm_blocks_total", "Capacity of a KVBM tier in blocks", labels, registry=registry)
        self.hits = Counter("dynamo_kvbm_hit_blocks_total", "Prompt blocks found in a lower tier", labels, registry=registry)
        self.offload_blocks = Counter("dynamo_kvbm_offload_blocks_total", "Blocks copied down into a tier", labels, registry=registry)
        self.offload_bytes = Counter("dynamo_kvbm_offload_bytes_total", "Bytes copied down into a tier", labels, registry=registry)
        self.onboard_blocks = Counter("dynamo_kvbm_onboard_blocks_total", "Blocks copied from a tier into the device", labels, registry=registry)
        self.onboard_bytes = Counter("dynamo_kvbm_onboard_bytes_total", "Bytes copied from a tier into the device", labels, registry=registry)
        # A tier is a cache: upkeep it cannot do at once is skipped, never waited for.
        self.skipped = Counter("dynamo_kvbm_offload_skipped_blocks_total",
                               "Blocks not kept in a tier, by reason: policy (the offload policy declined), cost_model "
                               "(offloading to the tier did not pay: kvbm/offload_value.py), slots_busy "
                               "(every slot pinned by writes or onboards in progress), queue_full (the disk writer was "
                               "behind), write_failed", ["model", "tier", "reason"], registry=registry)
        self.plan_seconds = Histogram("dynamo_kvbm_plan_seconds",
                                      "Seconds the engine's model thread spent executing one KVBM plan (copy launches, "
                                      "disk writes queued)", ["model"], buckets=PLAN_SECONDS_BUCKETS, registry=registry)
        self.gbps = Gauge("dynamo_kvbm_transfer_gbps", "Throughput of the last batched transfer, GB/s", ["model", "direction"], registry=registry)
        self.decisions = Counter("dynamo_kvbm_onboard_decision_blocks_total",
                                 "Lower-tier prompt hits of admitted requests, onboarded or recomputed (cheaper than reading them)",
                                 ["model", "tier", "decision"], registry=registry)
        self.read_gbps = Gauge("dynamo_kvbm_read_gbps", "Measured bandwidth of bringing a tier's blocks to the device (cost model), GB/s", labels, registry=registry)
        self.read_latency = Gauge("dynamo_kvbm_read_latency_seconds", "Measured fixed cost of one batch of a tier's reads (cost model)", labels, registry=registry)
        self.recompute_rate = Gauge("dynamo_kvbm_recompute_tokens_per_second", "Measured marginal prefill rate the cost model compares reads with", ["model"], registry=registry)

    def of(self, metric: Any, *labels: str) -> Any:
        """`metric`'s child for this model and `labels`, resolved once: labels() takes a lock
        and microseconds a call, and some of these move every step, on the event loop."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self._model, *labels)
        return child

    def tier(self, tier: str, used: int, total: int) -> None:
        self.of(self.blocks_used, tier).set(used)
        self.of(self.blocks_total, tier).set(total)


@dataclass(slots=True)
class KvbmStats:
    hits: Tally[str] = field(default_factory=Tally)
    offload_blocks: Tally[str] = field(default_factory=Tally)
    offload_bytes: Tally[str] = field(default_factory=Tally)
    onboard_blocks: Tally[str] = field(default_factory=Tally)
    onboard_bytes: Tally[str] = field(default_factory=Tally)
    skipped_by: Tally[tuple[str, str]] = field(default_factory=Tally)  # (tier, reason) -> blocks
    # Lower-tier hits of admitted requests by (tier, "onboard" | "recompute"): the cost model's
    # decisions (a hit recomputed because reading it would have been slower).
    decisions: Tally[tuple[str, str]] = field(default_factory=Tally)
    adopted: int = 0  # blocks a neighbour sharing the disk directory wrote, found on lookup
    # The model thread's time in KVBM plans (KvBlockManager.execute): total, count, longest.
    plan_seconds: float = 0.0
    plans: int = 0
    plan_max_seconds: float = 0.0
    metrics: KvbmMetrics | None = None

    def hit(self, tier: str, blocks: int) -> None:
        self.hits[tier] += blocks
        if self.metrics is not None:
            self.metrics.of(self.metrics.hits, tier).inc(blocks)

    def offloaded(self, tier: str, blocks: int, nbytes: int) -> None:
        self.offload_blocks[tier] += blocks
        self.offload_bytes[tier] += nbytes
        if self.metrics is not None:
            m = self.metrics
            m.of(m.offload_blocks, tier).inc(blocks)
            m.of(m.offload_bytes, tier).inc(nbytes)

    def onboarded(self, tier: str, blocks: int, nbytes: int) -> None:
        self.onboard_blocks[tier] += blocks
        self.onboard_bytes[tier] += nbytes
        if self.metrics is not None:
            m = self.metrics
            m.of(m.onboard_blocks, tier).inc(blocks)
            m.of(m.onboard_bytes, tier).inc(nbytes)

    def decided(self, tier: str, decision: str, blocks: int) -> None:
        if blocks <= 0:
            return
        self.decisions[(tier, decision)] += blocks
        if self.metrics is not None:
            self.metrics.of(self.metrics.decisions, tier, decision).inc(blocks)

    def estimates(self, snapshot: dict[str, float | None]) -> None:
        """The cost model's current estimates (OnboardCostModel.snapshot) as gauges."""
        m = self.metrics
        if m is None:
            return
        for tier in ("host", "disk"):
            gbps, latency = snapshot.get(f"{tier}_gbps"), snapshot.get(f"{tier}_latency_s")
            if gbps is not None:
                m.of(m.read_gbps, tier).set(gbps)
            if latency is not None:
                m.of(m.read_latency, tier).set(latency)
        rate = snapshot.get("recompute_tokens_per_s")
        if rate is not None:
            m.of(m.recompute_rate).set(rate)

    def skip(self, tier: str, reason: str, blocks: int = 1) -> None:
        """`blocks` were not kept in `tier` for `reason` (see KvbmMetrics.skipped)."""
        if blocks <= 0:
            return
        self.skipped_by[(tier, reason)] += blocks
        if self.metrics is not None:
            self.metrics.of(self.metrics.skipped, tier, reason).inc(blocks)

    @property
    def skipped(self) -> int:
        """Blocks not kept, every tier and reason."""
        return sum(self.skipped_by.values())

    def plan_executed(self, seconds: float) -> None:
        """On the model thread: one plan took `seconds` of it."""
        self.plan_seconds += seconds
        self.plans += 1
        self.plan_max_seconds = max(self.plan_max_seconds, seconds)
        if self.metrics is not None:
            self.metrics.of(self.metrics.plan_seconds).observe(seconds)

    def transfer(self, direction: str, nbytes: int, seconds: float) -> None:
        if self.metrics is not None and seconds > 0:
            self.metrics.of(self.metrics.gbps, direction).set(nbytes / seconds / 1e9)
