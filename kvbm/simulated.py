"""KVBM for the mocker: the real tier bookkeeping (TieredCache: capacities, eviction, policy,
KV events) with no bytes behind it. Onboarding costs time from bytes and bandwidth; offloads
run on a side stream in a real engine, off the critical path, so they cost none. Given the
engine's clock, disk reads take the built-in engine's path: a request whose prefix continues on
disk is held back while its blocks are read (SimulatedDiskReader), then onboarded from host
memory like host blocks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from kvbm.block_pool import KvEventSink
from kvbm.config import KvbmConfig
from kvbm.tiered import DISK, HOST, DiskReads, LowerHit, TieredCache

# What a simulated read leaves for the onboard (a real reader leaves a staging-buffer row).
STAGED = "staged"


class SimulatedReads:
    """The reads of one held-back request's disk blocks (a kvbm.tiered.DiskReads): done once
    the engine's clock passes their end."""

    def __init__(self, reader: SimulatedDiskReader, block_hashes: Sequence[int]) -> None:
        self.hits: list[LowerHit] = []
        self.block_hashes = frozenset(block_hashes)
        self.end_s = math.inf  # until submitted
        self._reader = reader

    @property
    def done(self) -> bool:
        return self._reader.clock() >= self.end_s

    def staged(self, block_hash: int) -> object:
        return STAGED if block_hash in self.block_hashes and self.done else None

    def close(self) -> None:
        self._reader.pending.discard(self)


class SimulatedDiskReader:
    """One drive read at `disk_gbps`, a request's blocks after the previous request's (FIFO),
    in the engine's simulated time. Nothing else moves that clock while every request waits for
    a read: the engine then jumps it to `next_end_s()`."""

    def __init__(self, clock: Callable[[], float], block_read_s: float) -> None:
        self.clock = clock
        self.block_read_s = block_read_s
        self.pending: set[SimulatedReads] = set()  # started or deferred, not yet closed
        self.read_time_s = 0.0  # simulated seconds of reading so far
        self._free_at_s = 0.0

    def start(self, block_hashes: Sequence[int], defer: bool = False) -> SimulatedReads:
        reads = SimulatedReads(self, block_hashes)
        self.pending.add(reads)
        if not defer:
            self.submit(reads)
        return reads

    def submit(self, reads: DiskReads) -> None:
        assert isinstance(reads, SimulatedReads)
        duration_s = len(reads.block_hashes) * self.block_read_s
        begin_s = max(self.clock(), self._free_at_s)
        reads.end_s = self._free_at_s = begin_s + duration_s
        self.read_time_s += duration_s

    def next_end_s(self) -> float | None:
        """When the next read in progress ends; None if none is."""
        ends = [r.end_s for r in self.pending if r.end_s != math.inf and not r.done]
        return min(ends) if ends else None


class SimulatedKvbm:
    """Onboarding a block from host memory takes block_bytes / host_gbps (55 GB/s: the pinned
    host copy measured on an H200), from disk block_bytes / disk_gbps (5 GB/s: an NVMe
    drive's sequential read). Blocks on the simulated disk do not survive the process.

    With `clock` (the engine's simulated time in seconds, before the speedup ratio) the disk
    tier has a reader: disk blocks are read while their request is held back, and only their
    copy up from host memory costs step time. Given `block_size_tokens`, hits are onboarded
    only where the cost model (fed the simulated read times and the executor's step times)
    finds reading cheaper than recomputing, as in the built-in engine."""

    def __init__(
        self, config: KvbmConfig, block_bytes: int, on_event: KvEventSink | None = None,
        clock: Callable[[], float] | None = None, block_size_tokens: int | None = None,
    ) -> None:
        self.config = config
        self.block_bytes = block_bytes
        self.cache = TieredCache(config, block_bytes, on_event, block_size_tokens=block_size_tokens)
        self.onboard_time_s = 0.0  # simulated, before the speedup ratio
        self.reader: SimulatedDiskReader | None = None
        if clock is not None:
            self.cache.clock = clock  # step times in simulated seconds, like the reads
        if clock is not None and self.cache.disk is not None:
            self.reader = SimulatedDiskReader(clock, block_bytes / (config.disk_gbps * 1e9))
            self.cache.reader = self.reader

    @property
    def disk_read_time_s(self) -> float:
        """Simulated seconds of held-back disk reads (off the steps), before the speedup ratio."""
        return self.reader.read_time_s if self.reader is not None else 0.0

    def step_cost_s(self) -> float:
        """Run the pending plan: the seconds its onboards add to this step."""
        if not self.cache.has_pending():
            return 0.0
        plan = self.cache.take_plan()
        # A disk block read beforehand waits in host memory: it comes up at host speed.
        host = sum(1 for op in plan.onboards if op.tier == HOST or op.staged is not None)
        disk = sum(1 for op in plan.onboards if op.tier == DISK and op.staged is None)
        host_s = self.block_bytes * host / (self.config.host_gbps * 1e9)
        disk_s = self.block_bytes * disk / (self.config.disk_gbps * 1e9)
        cost = host_s + disk_s
        if host:
            self.cache.observe_read(HOST, host * self.block_bytes, host_s)
        if disk:  # read on the step (no reader): what a disk hit costs here
            self.cache.observe_read(DISK, disk * self.block_bytes, disk_s)
        if plan.reads_after:
            assert self.reader is not None
            for reads in plan.reads_after:  # their blocks' writes are queued now
                self.reader.submit(reads)
        self.cache.finish(plan)
        self.onboard_time_s += cost
        return cost
