"""KVBM for the mocker: the real tier bookkeeping (TieredCache: capacities, eviction, policy,
KV events) with no bytes behind it. Onboarding costs time from bytes and bandwidth; offloads
run on a side stream in a real engine, off the critical path, so they cost none."""

from __future__ import annotations

from kvbm.block_pool import KvEventSink
from kvbm.config import KvbmConfig
from kvbm.tiered import DISK, HOST, TieredCache


class SimulatedKvbm:
    """Onboarding a block from host memory takes block_bytes / host_gbps (55 GB/s: the pinned
    host copy measured on an H200), from disk block_bytes / disk_gbps (5 GB/s: an NVMe
    drive's sequential read). Blocks on the simulated disk do not survive the process."""

    def __init__(self, config: KvbmConfig, block_bytes: int, on_event: KvEventSink | None = None) -> None:
        self.config = config
        self.block_bytes = block_bytes
        self.cache = TieredCache(config, block_bytes, on_event)
        self.onboard_time_s = 0.0  # simulated, before the speedup ratio

    def step_cost_s(self) -> float:
        """Run the pending plan: the seconds its onboards add to this step."""
        if not self.cache.has_pending():
            return 0.0
        plan = self.cache.take_plan()
        host = sum(1 for op in plan.onboards if op.tier == HOST)
        disk = sum(1 for op in plan.onboards if op.tier == DISK)
        cost = self.block_bytes * (host / (self.config.host_gbps * 1e9) + disk / (self.config.disk_gbps * 1e9))
        self.cache.finish(plan)
        self.onboard_time_s += cost
        return cost
