"""KVBM for the mocker: the real tier bookkeeping (TieredCache: capacities, eviction, policy,
KV events) with no bytes behind it. Onboarding costs step time from bytes and bandwidth; tier
upkeep costs none, as in the built-in engine, whose model thread only launches offload copies
and queues disk writes. Given the engine's clock, the disk takes time: a request whose prefix
continues on disk is held back while its blocks are read (SimulatedDiskReader), then onboarded
from host memory like host blocks; writes finish one at a time (SimulatedDiskWriter), and until
then hold their host slots and leave their files unannounced, so a disk slower than the
evictions leaves blocks unkept, as it does the built-in engine (with config.disk_write_gbps;
without it writes take no simulated time)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence

from kvbm.block_pool import KvEventSink
from kvbm.config import KvbmConfig
from kvbm.tiered import DISK, HOST, LowerHit, TieredCache

# What a simulated read leaves for the onboard (a real reader leaves a staging-buffer row).
STAGED = "staged"


class SimulatedReads:
    """The reads of one held-back request's disk blocks (a kvbm.tiered.DiskReads): done once
    the engine's clock passes their end."""

    def __init__(self, reader: SimulatedDiskReader, block_hashes: Sequence[int]) -> None:
        self.hits: list[LowerHit] = []
        self.block_hashes = frozenset(block_hashes)
        self.end_s = math.inf  # set by the reader
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
        self.pending: set[SimulatedReads] = set()  # started, not yet closed
        self.read_time_s = 0.0  # simulated seconds of reading so far
        self._free_at_s = 0.0

    def start(self, block_hashes: Sequence[int]) -> SimulatedReads:
        reads = SimulatedReads(self, block_hashes)
        self.pending.add(reads)
        duration_s = len(reads.block_hashes) * self.block_read_s
        begin_s = max(self.clock(), self._free_at_s)
        reads.end_s = self._free_at_s = begin_s + duration_s
        self.read_time_s += duration_s
        return reads

    def next_end_s(self) -> float | None:
        """When the next read in progress ends; None if none is."""
        ends = [r.end_s for r in self.pending if r.end_s != math.inf and not r.done]
        return min(ends) if ends else None


class SimulatedDiskWriter:
    """The disk thread in the engine's simulated time (a kvbm.tiered.DiskWrites): writes in
    submission order, one at a time, each `block_write_s` after the previous one ends. A
    drive's writes are modelled apart from its reads (each at the disk bandwidth)."""

    def __init__(self, clock: Callable[[], float], block_write_s: float) -> None:
        self.clock = clock
        self.block_write_s = block_write_s
        self.write_time_s = 0.0  # simulated seconds of writing so far
        self._ends: deque[tuple[float, int]] = deque()  # (end, block hash), in order
        self._free_at_s = 0.0

    def submit(self, block_hashes: Sequence[int]) -> None:
        for h in block_hashes:
            self._free_at_s = max(self.clock(), self._free_at_s) + self.block_write_s
            self._ends.append((self._free_at_s, h))
            self.write_time_s += self.block_write_s

    def completed(self) -> list[tuple[int, bool]]:
        now, ends = self.clock(), self._ends
        out: list[tuple[int, bool]] = []
        while ends and ends[0][0] <= now:
            out.append((ends.popleft()[1], True))
        return out


class SimulatedKvbm:
    """Onboarding a block from host memory takes block_bytes / host_gbps (55 GB/s: the pinned
    host copy measured on an H200), from disk block_bytes / disk_gbps (5 GB/s: an NVMe
    drive's sequential read). Blocks on the simulated disk do not survive the process.

    With `clock` (the engine's simulated time in seconds, before the speedup ratio) the disk
    tier has a reader: disk blocks are read while their request is held back, and only their
    copy up from host memory costs step time; with config.disk_write_gbps, a writer too:
    writes take block_bytes / disk_write_gbps each, one after another, off the steps. Given
    `block_size_tokens`, hits are onboarded only where the cost model (fed the simulated read
    times and the executor's step times) finds reading cheaper than recomputing, as in the
    built-in engine."""

    def __init__(
        self, config: KvbmConfig, block_bytes: int, on_event: KvEventSink | None = None,
        clock: Callable[[], float] | None = None, block_size_tokens: int | None = None,
    ) -> None:
        self.config = config
        self.block_bytes = block_bytes
        self.writer: SimulatedDiskWriter | None = None  # None: a plan's writes are done once it runs
        if clock is not None and config.disk_write_gbps is not None and config.disk_capacity_blocks(block_bytes) > 0:
            self.writer = SimulatedDiskWriter(clock, block_bytes / (config.disk_write_gbps * 1e9))
        self.cache = TieredCache(config, block_bytes, on_event, disk_writes=self.writer,
                                 block_size_tokens=block_size_tokens)
        # The executor's part of an offload's cost is none (above), known before any offload: a
        # tier that costs nothing is kept, also one whose hits would be declined.
        self.cache.offload_value.observe_cost("execute", 0.0, 1)
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
        if self.writer is not None:  # queued for the disk thread: no step time
            self.writer.submit([op.block_hash for op in plan.writes]
                               + [op.block_hash for op in plan.offloads if op.tier == DISK])
        self.cache.finish(plan)
        self.onboard_time_s += cost
        return cost
