"""What reading a disk tier's blocks back costs, measured when the tier opens, so that the tier is
judged before its first offload. Before it the onboard cost model started from the configured
bandwidth (optimistic, so a tier is tried), and a disk dearer than recompute took every eviction
until a hit of its own had been read and timed: on two CPU cores its writer's time was what the
first turns' prefills lost (benchmarks/RESULTS.md, "KVBM run 10").

A few block files are written to a scratch directory inside the tier's root (the same
filesystem; never the tier's own directory, which this worker indexes and a neighbour may scan),
then read back by a DiskReader as a disk hit's blocks are read, the fastest of a few rounds
counting (a stall elsewhere at startup is not the disk). The reads are timed as the tier will
see them: its files are written without fsync, so while the tier fits in the memory the kernel
has to cache files, a hit on a recently written block is a page-cache read; only a tier larger
than that reads the device, and only then are the probe's files flushed and dropped from the
page cache first (on one H100 machine a cold probe read 0.9-1.4 GB/s while the tier's real hits,
page-cache reads of a 2 GB tier on a 128 GB host, came at 1.2-2.1 GB/s with a 2 ms start, and
judging the tier by the cold figure left it unused: RESULTS.md, "the read probe").
Blocking: the built-in engine runs it on a worker thread, the vLLM connector's scheduler side
where it builds (and scans) the tier."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dynamo.wire import KvLayoutSpec
from kvbm.config import KvbmConfig
from kvbm.disk_tier import DiskReader, DiskStore
from kvbm.layout import block_bytes, elements_per_layer
from kvbm.onboard_cost import OnboardCostModel
from kvbm.tiered import DISK

log = logging.getLogger(__name__)

# Blocks read together in a round (a short prompt's disk hits), timed rounds (after one that
# starts the reader's threads and touches its staging rows), and a bound on all the files' bytes.
PROBE_BLOCKS = 8
PROBE_ROUNDS = 3
PROBE_MAX_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class DiskReadProbe:
    """The fastest round: `blocks` files of `nbytes` in all, read in `seconds` (from the start
    of their reads to the end of the last, as a disk hit's reads are timed)."""

    blocks: int
    nbytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9


def probe_disk_reads(root: str | Path, layout: KvLayoutSpec, blocks: int = PROBE_BLOCKS,
                     rounds: int = PROBE_ROUNDS, cold: bool = True) -> DiskReadProbe:
    """Time reading back `blocks` fresh block files of `layout` under `root`, `rounds` times
    (fewer blocks if they would pass PROBE_MAX_BYTES); `cold`: each file flushed and dropped
    from the page cache first. The files are removed. Raises OSError."""
    size = block_bytes(layout)
    per_round = max(1, min(blocks, PROBE_MAX_BYTES // ((rounds + 1) * size)))
    Path(root).mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".kvbm-read-probe-", dir=root)
    store = DiskStore(scratch, layout)
    reader: DiskReader | None = None
    try:
        store.dir.mkdir(parents=True)
        data = torch.zeros((2 * layout.num_layers, elements_per_layer(layout)), dtype=getattr(torch, layout.dtype))
        hashes = [[r * per_round + i + 1 for i in range(per_round)] for r in range(rounds + 1)]
        for h in (h for batch in hashes for h in batch):
            path = store.write_now(h, None, data)
            if cold:
                _drop_from_page_cache(path)
        reader = DiskReader.for_tier(store, data.dtype, pin=False, capacity_blocks=per_round)
        best = float("inf")
        for r, batch in enumerate(hashes):
            started = time.perf_counter()
            reads = reader.start(batch)
            reads.wait()
            elapsed = time.perf_counter() - started
            ok = all(reads.ok)
            reads.close()
            if reader.pool is not None:
                reader.pool.fence(None)  # nothing copies out of the rows: free for the next round
            if not ok:
                raise OSError(f"a probe file in {store.dir} could not be read back")
            if r > 0:  # the first round starts the threads and touches the rows
                best = min(best, elapsed)
        return DiskReadProbe(per_round, per_round * size, best)
    finally:
        if reader is not None:
            reader.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def probe_disk_tier(config: KvbmConfig, cost: OnboardCostModel, root: str | Path,
                    layout: KvLayoutSpec) -> DiskReadProbe | None:
    """With `config.disk_probe`, probe the disk tier at `root` and make the result `cost`'s
    disk estimate until a real read replaces it (both engines open their tiers through here).
    None when the probe is off or failed (logged: the configured bandwidth stands)."""
    if not config.disk_probe:
        return None
    tier_bytes = config.disk_capacity_blocks(block_bytes(layout)) * block_bytes(layout)
    cold = reads_miss_page_cache(tier_bytes)
    try:
        probe = probe_disk_reads(root, layout, cold=cold)
    except OSError as exc:
        log.warning("kvbm: disk read probe in %s failed (%s); estimating disk reads at %g GB/s until one is read",
                    root, exc, config.disk_gbps)
        return None
    cost.prior_read(DISK, probe.nbytes, probe.seconds)
    log.info("kvbm: disk tier in %s reads %d blocks (%d KiB, %s) in %.2f ms: %.3f GB/s until a hit is read",
             root, probe.blocks, probe.nbytes >> 10, "from the device" if cold else "from the page cache",
             probe.seconds * 1e3, probe.gbps)
    return probe


def reads_miss_page_cache(tier_bytes: int, meminfo: str | Path = "/proc/meminfo") -> bool:
    """Whether a disk tier of `tier_bytes` reads its device rather than the page cache: it
    holds more than half the memory the kernel reports available for caching files
    (MemAvailable; unknown, e.g. not Linux: assume the device)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return tier_bytes > int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return True


def _drop_from_page_cache(path: Path) -> None:
    """Flush a file and drop its pages, so that reading it back reads the disk (where the kernel
    can: not on tmpfs, whose pages are the file, nor without posix_fadvise)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        fadvise = getattr(os, "posix_fadvise", None)
        if fadvise is not None:
            fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
