"""KvBlockManager: KVBM for an engine with a real paged KV cache (the built-in engine). The
scheduler talks to its TieredCache on the event loop's thread; the engine runs each step's
TransferPlan with execute() (kvbm.plan_executor) on its model thread, before that step's forward
pass. execute() only launches copies and queues work: it never waits for a copy, a host slot or
the disk. Disk
blocks a prompt needs are read beforehand by a DiskReader (the scheduler holds the request back
meanwhile) and onboarded from pinned memory like host blocks; disk writes go to the disk thread
as host slots plus an event after the device-to-host copies that fill them, which that thread
waits for before reading the slots (they stay pinned until it reports the write done)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch

from kvbm.block_pool import KvEventSink
from kvbm.config import KvbmConfig
from kvbm.copy_engine import BlockCopier
from kvbm.disk_probe import probe_disk_tier
from kvbm.disk_tier import DiskReader, DiskStore, StagingPool
from kvbm.host_tier import HostStore
from dynamo.wire import KvLayoutSpec
from kvbm.layout import block_bytes, elements_per_layer
from kvbm.plan_executor import PlanExecutor
from kvbm.tiered import TieredCache, TransferPlan

log = logging.getLogger(__name__)

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
        host: HostStore | None = None
        if self.cache.host is not None:
            host = HostStore(self.cache.host.capacity_blocks, layout.num_layers, elements_per_layer(layout),
                             k[0].dtype, pin=k[0].device.type == "cuda")
        self.reader: DiskReader | None = None
        if self.disk is not None:
            self.reader = DiskReader.for_tier(self.disk, k[0].dtype, k[0].device.type == "cuda",
                                              config.disk_capacity_blocks(size))
            self.cache.reader = self.reader
            self.cache.disk_probe = self.disk.exists  # workers of one host may share the directory
        self.executor = PlanExecutor(layout, [t for pair in zip(k, v) for t in pair], host, self.disk,
                                     flush_blocks=config.offload_flush_blocks,
                                     disk_queue_blocks=config.disk_queue_blocks, reader=self.reader)

    # The executor's parts, as tests and the engine reach them.
    @property
    def host(self) -> HostStore | None:
        return self.executor.host

    @property
    def copier(self) -> BlockCopier:
        return self.executor.copier

    @property
    def write_staging(self) -> StagingPool | None:
        return self.executor.write_staging

    # --------------------------------------------------------------------------- lifecycle

    async def start(self) -> int:
        """Start the disk thread, index the blocks already on disk (returns their count) and
        measure what reading the disk costs (kvbm/disk_probe.py), off the event loop."""
        if self.disk is None:
            return 0
        await asyncio.to_thread(self.disk.start)
        config = self.cache.config
        assert config.disk_dir is not None
        await asyncio.to_thread(probe_disk_tier, config, self.cache.cost, config.disk_dir, self.layout)
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
        # Offloads staged on the device are flushed by the next step's execute(). A plan still
        # running on the model thread (queued ahead of a step, not waited for) may stage some
        # after this is read: a later step's plan flushes them.
        return self.cache.has_pending() or self.executor.has_pending()

    def take_plan(self) -> TransferPlan:
        return self.cache.take_plan()

    def execute(self, plan: TransferPlan) -> list[int]:
        """On the model thread: runs the plan (PlanExecutor.execute: launches copies and queues
        disk work, waits for neither). Returns the device blocks whose onboard failed (an
        unreadable file): their tokens must be recomputed."""
        done = self.executor.execute(plan)
        for tier, nbytes, seconds in done.reads:
            self.cache.observe_read(tier, nbytes, seconds)
        if done.onboard_bytes:
            self.cache.stats.transfer("onboard", done.onboard_bytes, done.elapsed)
        self.cache.stats.plan_executed(done.elapsed)
        return done.failed

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
