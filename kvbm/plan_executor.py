"""PlanExecutor: the bytes side of KVBM below one device cache. It runs each step's
TransferPlan (kvbm.tiered) on the thread that runs the model, before that step's forward pass:
offloads into host slots or disk files, onboards into device blocks, writes of host slots to
disk, deletes. It only launches copies and queues disk work; it never waits for a copy, a host
slot or the disk (the one exception: a disk block no DiskReader read beforehand is read here).

Both engines with a real paged cache run plans through it: the built-in engine's
KvBlockManager (scheduler and executor in one process) and vLLM's KVBM connector (the plan
pickled from vLLM's scheduler to its workers). What the cost models need comes back as an
`Executed`, for the caller to feed its TieredCache directly or through vLLM's worker metadata.

Host memory keeps a block as the device cache's pieces in order (kvbm.copy_engine): the
built-in engine's K0, V0, K1, V1 ..., or one piece a layer where a backend keeps a layer's K and
V at one block index (vLLM's CPU and FlashInfer layouts). Either way a block is 2L x E elements,
which is what host slots and disk files hold."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dynamo.wire import KvLayoutSpec
from kvbm.copy_engine import BlockCopier
from kvbm.disk_tier import DiskReader, DiskStore, StagingPool
from kvbm.host_tier import HostStore
from kvbm.layout import block_bytes, elements_per_layer
from kvbm.tiered import DISK, HOST, TransferPlan

# Device blocks evicted straight to disk are downloaded into rows of a pool of this size, held
# until written (pinning host memory per batch, cudaHostAlloc, is slow on the model thread); at
# most the disk queue's bound (TieredCache keeps no more such writes in flight).
WRITE_STAGING_BYTES = 256 << 20


@dataclass(slots=True)
class Executed:
    """What one execute() did and measured."""

    # Device blocks whose onboard failed (an unreadable file; their tokens must be
    # recomputed), and those files' block hashes.
    failed: list[int] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)
    # Onboard reads whose time is known by now: (tier, bytes, seconds). HOST: copies up from
    # host memory (on CUDA, timed on the device and reported once done: often an earlier
    # plan's); DISK: files read here, on this thread.
    reads: list[tuple[str, int, float]] = field(default_factory=list)
    onboard_bytes: int = 0
    elapsed: float = 0.0  # this thread's time in execute()


class PlanExecutor:
    """Runs TransferPlans between a device cache and the host and disk tiers. `pieces`: the
    device cache's tensors of shape [num_blocks, ...], in the order host memory keeps a block's
    pieces (see the module docstring). `host` and `disk` are the tiers' stores (either may be
    None); `reader` reads disk blocks off this thread ahead of their onboard (None: read in
    execute())."""

    def __init__(self, layout: KvLayoutSpec, pieces: Sequence[torch.Tensor], host: HostStore | None,
                 disk: DiskStore | None, *, flush_blocks: int = 1, disk_queue_blocks: int = 256,
                 reader: DiskReader | None = None) -> None:
        first = pieces[0]
        self.layout = layout
        self.block_bytes = block_bytes(layout)
        self.host = host
        self.disk = disk
        self.reader = reader
        self.pin = first.device.type == "cuda"
        self.width = len(pieces)
        host_rows = self.rows(host.data) if host is not None else None
        # Without a GPU the copies are synchronous: holding offloads back would save nothing.
        self.copier = BlockCopier(pieces, [], host_rows, flush_blocks=flush_blocks if self.pin else 1,
                                  ring=host is not None or disk is not None)
        self.write_staging: StagingPool | None = None
        if disk is not None:
            self.write_staging = StagingPool(max(1, min(disk_queue_blocks, WRITE_STAGING_BYTES // self.block_bytes)),
                                             (2 * layout.num_layers, elements_per_layer(layout)), first.dtype,
                                             self.pin)

    def rows(self, blocks: torch.Tensor) -> torch.Tensor:
        """[n, 2L, E] blocks (host slots, disk buffers) as the copier's [n, pieces, ...] rows."""
        return blocks.view(blocks.shape[0], self.width, -1)

    def has_pending(self) -> bool:
        """Offloads staged on the device wait for the next execute() to flush them."""
        return self.copier.has_pending_offloads()

    def execute(self, plan: TransferPlan) -> Executed:
        """Offloads, onboards, deletes and writes (see TransferPlan); sets plan.upkeep_s.
        Launches copies and queues disk work; waits for neither."""
        copier, disk, host = self.copier, self.disk, self.host
        started = time.perf_counter()
        done = Executed()
        if plan.deletes:
            assert disk is not None
            for delete in plan.deletes:  # before this plan's writes: one FIFO on the disk thread
                disk.delete(delete.block_hash)
        copier.begin()
        # Device-side gathers of evicted blocks first (the onboards below may overwrite the
        # blocks), then the onboards the forward pass waits for, and only then the slow
        # device-to-host copies of the gathered blocks, which finish in the background.
        to_host = [op for op in plan.offloads if op.tier == HOST]
        host_gathered = None
        if to_host:
            host_gathered = copier.gather_for_host([op.device_block for op in to_host], [op.slot for op in to_host])
        to_disk = [op for op in plan.offloads if op.tier == DISK]
        disk_gathered = None
        if to_disk:
            assert disk is not None
            # Into ring rows: their download below is queued before any other ring gather.
            disk_gathered = copier.gather_staged([op.device_block for op in to_disk])
            copier.mark_ready()
        from_host = [op for op in plan.onboards if op.tier == HOST]
        # A host slot this plan also offloads into is read only after that copy lands.
        landing = {op.slot for op in to_host}
        early = [op for op in from_host if op.slot not in landing]
        late = [op for op in from_host if op.slot in landing]
        onboards_from = time.perf_counter()  # the onboards' launches: not upkeep (see below)
        timer = copier.timer_start() if plan.onboards else None
        staged: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}
        for op in plan.onboards:
            if op.tier == DISK and op.staged is not None:
                buf, row = op.staged
                group = staged.setdefault(id(buf), (self.rows(buf), [], []))
                group[1].append(row)
                group[2].append(op.device_block)
        groups = list(staged.values())
        if early:
            assert copier.host is not None
            groups.insert(0, (copier.host, [op.slot for op in early], [op.device_block for op in early]))
        if groups:
            copier.onboard_many(groups)  # one scatter launch for host and staged disk hits
        pinned_up = len(early) + sum(len(rows) for _, rows, _ in staged.values())
        if pinned_up and timer is not None:  # what bringing a host (or staged disk) hit up costs
            copier.timer_stop(timer, pinned_up * self.block_bytes)
        from_disk = [op for op in plan.onboards if op.tier == DISK and op.staged is None]
        if from_disk:  # not read beforehand (no reader): read here, blocking
            assert disk is not None
            reading = time.perf_counter()
            buf = torch.empty((len(from_disk), 2 * self.layout.num_layers, elements_per_layer(self.layout)),
                              dtype=copier.dtype)
            good = [i for i, op in enumerate(from_disk) if disk.read(op.block_hash, buf[i])]
            bad = set(range(len(from_disk))) - set(good)
            done.failed = [from_disk[i].device_block for i in sorted(bad)]
            done.unreadable = [from_disk[i].block_hash for i in sorted(bad)]
            if good:
                # The cost model's disk read ends in host memory; the copy up is timed apart.
                done.reads.append((DISK, len(good) * self.block_bytes, time.perf_counter() - reading))
                timer = copier.timer_start()
                copier.onboard_from_cpu(self.rows(buf[good]), [from_disk[i].device_block for i in good])
                copier.timer_stop(timer, len(good) * self.block_bytes)
        onboarding = time.perf_counter() - onboards_from
        if self.reader is not None and self.reader.pool is not None:
            # Staging rows released so far are reused once the copies queued out of them end.
            self.reader.pool.fence(copier.fence())
        if host_gathered is not None:
            copier.land_in_host(host_gathered)
        direct: tuple[list[tuple[int, int | None, torch.Tensor]], object, Callable[[], None] | None] | None = None
        if disk_gathered is not None:
            pool = self.write_staging
            taken = pool.take(len(to_disk)) if pool is not None else None
            if pool is not None and taken is not None:
                ready = copier.download_into(disk_gathered, self.rows(pool.data), taken)
                blocks = [(op.block_hash, op.parent_hash, pool.data[row]) for op, row in zip(to_disk, taken)]
                direct = (blocks, ready, functools.partial(pool.give_back, taken))
            else:  # more in flight than the pool holds: a pinned buffer of its own
                data, ready = copier.download(disk_gathered, self.pin)
                direct = ([(op.block_hash, op.parent_hash, data[i]) for i, op in enumerate(to_disk)], ready, None)
        if late:
            onboards_from = time.perf_counter()
            copier.onboard_from_host([op.slot for op in late], [op.device_block for op in late])
            onboarding += time.perf_counter() - onboards_from
        copier.end()
        if plan.writes:
            assert disk is not None and host is not None
            # The slots were filled by earlier plans; their device-to-host copies are queued
            # by now (end() flushes held ones at the latest), so an event recorded now on the
            # copy stream follows them. The disk thread waits for it, not this one.
            copier.flush_offloads([op.host_slot for op in plan.writes])
            disk.write_batch([(op.block_hash, op.parent_hash, host.data[op.host_slot]) for op in plan.writes],
                             copier.fence(blocking=True))
        if direct is not None:
            assert disk is not None
            disk.write_batch(*direct)
        # Timed copies up that have finished: this plan's without a GPU, earlier ones' on it.
        done.reads += [(HOST, nbytes, seconds) for nbytes, seconds in copier.timings()]
        done.onboard_bytes = (len(plan.onboards) - len(done.failed)) * self.block_bytes
        done.elapsed = time.perf_counter() - started
        # What keeping the tiers cost this thread (TieredCache.finish weighs it per offload).
        plan.upkeep_s = max(0.0, done.elapsed - onboarding)
        return done
