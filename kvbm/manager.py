"""KvBlockManager: KVBM for an engine with a real paged KV cache (the built-in engine). The
scheduler talks to its TieredCache on the event loop's thread; the engine runs each step's
TransferPlan with execute() on its model thread, before that step's forward pass. execute()
only launches copies and queues work: it never waits for a copy, a host slot or the disk. Disk
blocks a prompt needs are read beforehand by a DiskReader (the scheduler holds the request back
meanwhile) and onboarded from pinned memory like host blocks; disk writes go to the disk thread
as host slots plus an event after the device-to-host copies that fill them, which that thread
waits for before reading the slots (they stay pinned until it reports the write done)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence

import torch

from kvbm.block_pool import KvEventSink
from kvbm.config import KvbmConfig
from kvbm.copy_engine import BlockCopier
from kvbm.disk_tier import DiskReader, DiskStore, StagingPool
from kvbm.host_tier import HostStore
from dynamo.wire import KvLayoutSpec
from kvbm.layout import block_bytes, elements_per_layer
from kvbm.tiered import DISK, HOST, TieredCache, TransferPlan

log = logging.getLogger(__name__)

# Disk reads land in one staging pool of this size (pinned on CUDA, allocated once with the
# reader); a request it cannot hold at the moment gets a buffer of its own.
STAGING_BYTES = 512 << 20
STAGING_MAX_ROWS = 8192
# Device blocks evicted straight to disk are downloaded into rows of a pool of this size, held
# until written (pinning host memory per batch, cudaHostAlloc, is slow on the model thread); at
# most the disk queue's bound (TieredCache keeps no more such writes in flight).
WRITE_STAGING_BYTES = 256 << 20


class KvBlockManager:
    """G2 (pinned host tensors) and G3 (files) below a device cache given as per-layer K and V
    tensors of shape [num_blocks, block_size, kv_heads, head_dim]. Build it on the model
    thread (the host tier is a large pinned allocation); start() scans the disk tier."""

    def __init__(self, config: KvbmConfig, layout: KvLayoutSpec, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor],
                 on_event: KvEventSink | None = None, disk_before_write: Callable[[int], None] | None = None) -> None:
        """`disk_before_write`: see DiskStore's `before_write` (tests hold writes back with it)."""
        size = block_bytes(layout)
        self.layout = layout
        self.disk: DiskStore | None = None
        if config.disk_dir and config.disk_capacity_blocks(size) > 0:
            self.disk = DiskStore(config.disk_dir, layout, config.disk_queue_blocks, report_writes=True,
                                  before_write=disk_before_write)
        else:
            # A real disk tier needs a directory; without one the tier is off.
            config = dataclasses.replace(config, disk_blocks=0, disk_gb=None)
        self.cache = TieredCache(config, size, on_event, disk_writes=self.disk,
                                 block_size_tokens=layout.block_size_tokens)
        self.host: HostStore | None = None
        if self.cache.host is not None:
            self.host = HostStore(self.cache.host.capacity_blocks, layout.num_layers, elements_per_layer(layout),
                                  k[0].dtype, pin=k[0].device.type == "cuda")
        self.pin = k[0].device.type == "cuda"
        # Without a GPU the copies are synchronous: holding offloads back would save nothing.
        self.copier = BlockCopier(k, v, self.host.data if self.host else None,
                                  flush_blocks=config.offload_flush_blocks if self.pin else 1)
        self.reader: DiskReader | None = None
        self.write_staging: StagingPool | None = None
        if self.disk is not None:
            self.write_staging = StagingPool(max(1, min(config.disk_queue_blocks, WRITE_STAGING_BYTES // size)),
                                             (2 * layout.num_layers, elements_per_layer(layout)), k[0].dtype, self.pin)
            rows = max(1, min(STAGING_MAX_ROWS, STAGING_BYTES // size))
            self.reader = DiskReader(self.disk, k[0].dtype, self.pin, threads=min(4, os.cpu_count() or 1),
                                     staging_rows=rows)
            self.cache.reader = self.reader
            self.cache.disk_probe = self.disk.exists  # workers of one host may share the directory

    # --------------------------------------------------------------------------- lifecycle

    async def start(self) -> int:
        """Start the disk thread and index the blocks already on disk; returns their count."""
        if self.disk is None:
            return 0
        await asyncio.to_thread(self.disk.start)
        found = await asyncio.to_thread(self.disk.scan)
        adopted = self.cache.adopt_disk(found)
        if adopted:
            log.info("kvbm: found %d blocks in %s", adopted, self.disk.dir)
        return adopted

    async def stop(self) -> None:
        """Let queued disk writes finish (they are what a restart finds)."""
        if self.reader is not None:
            await asyncio.to_thread(self.reader.stop)
        if self.disk is not None:
            await asyncio.to_thread(self.disk.stop)

    # ------------------------------------------------------------------- the step's transfer

    def has_pending(self) -> bool:
        # Offloads staged on the device are flushed by the next step's execute().
        return self.cache.has_pending() or self.copier.has_pending_offloads()

    def take_plan(self) -> TransferPlan:
        return self.cache.take_plan()

    def execute(self, plan: TransferPlan) -> list[int]:
        """On the model thread: offloads, onboards, deletes and writes (see TransferPlan).
        Returns the device blocks whose onboard failed (an unreadable file): their tokens
        must be recomputed. Launches copies and queues disk work; waits for neither."""
        copier, disk, host = self.copier, self.disk, self.host
        started = time.perf_counter()
        for nbytes, seconds in copier.timings():  # earlier plans' onboards, done by now
            self.cache.observe_read(HOST, nbytes, seconds)
        if plan.deletes:
            assert disk is not None
            for op in plan.deletes:  # before this plan's writes: one FIFO on the disk thread
                disk.delete(op.block_hash)
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
            disk_gathered = copier.gather([op.device_block for op in to_disk])
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
                group = staged.setdefault(id(buf), (buf, [], []))
                group[1].append(row)
                group[2].append(op.device_block)
        groups = list(staged.values())
        if early:
            assert host is not None
            groups.insert(0, (host.data, [op.slot for op in early], [op.device_block for op in early]))
        if groups:
            copier.onboard_many(groups)  # one scatter launch for host and staged disk hits
        pinned_up = len(early) + sum(len(rows) for _, rows, _ in staged.values())
        if pinned_up and timer is not None:  # what bringing a host (or staged disk) hit up costs
            copier.timer_stop(timer, pinned_up * block_bytes(self.layout))
        failed: list[int] = []
        from_disk = [op for op in plan.onboards if op.tier == DISK and op.staged is None]
        if from_disk:  # not read beforehand (no reader was set): read here, blocking
            assert disk is not None
            buf = torch.empty((len(from_disk), 2 * self.layout.num_layers, elements_per_layer(self.layout)),
                              dtype=copier.dtype)
            good = [i for i, op in enumerate(from_disk) if disk.read(op.block_hash, buf[i])]
            failed = [from_disk[i].device_block for i in range(len(from_disk)) if i not in set(good)]
            if good:
                copier.onboard_from_cpu(buf[good], [from_disk[i].device_block for i in good])
        onboarding = time.perf_counter() - onboards_from
        if self.reader is not None and self.reader.pool is not None:
            # Staging rows released so far are reused once the copies queued out of them end.
            self.reader.pool.fence(copier.fence())
        if host_gathered is not None:
            copier.land_in_host(host_gathered)
        direct: tuple[list[tuple[int, int | None, torch.Tensor]], object, Callable[[], None] | None] | None = None
        if disk_gathered is not None:
            pool = self.write_staging
            rows = pool.take(len(to_disk)) if pool is not None else None
            if pool is not None and rows is not None:
                ready = copier.download_into(disk_gathered, pool.data, rows)
                blocks = [(op.block_hash, op.parent_hash, pool.data[row]) for op, row in zip(to_disk, rows)]
                direct = (blocks, ready, functools.partial(pool.give_back, rows))
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
        onboard_bytes = (len(plan.onboards) - len(failed)) * block_bytes(self.layout)
        elapsed = time.perf_counter() - started
        # What keeping the tiers cost this thread (TieredCache.finish weighs it per offload).
        plan.upkeep_s = max(0.0, elapsed - onboarding)
        if onboard_bytes:
            self.cache.stats.transfer("onboard", onboard_bytes, elapsed)
        self.cache.stats.plan_executed(elapsed)
        return failed

    def finish(self, plan: TransferPlan, failed: Sequence[int] = ()) -> None:
        """On the event loop's thread after execute(): unpin, and forget unreadable files.
        (Writes report themselves: the cache polls the disk store.)"""
        self.cache.finish(plan)
        if failed:
            bad = set(failed)
            for op in plan.onboards:
                if op.device_block in bad:
                    log.warning("kvbm: disk block %016x unreadable; recomputing it", op.block_hash)
                    self.cache.forget_disk(op.block_hash)
