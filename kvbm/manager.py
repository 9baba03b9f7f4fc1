"""KvBlockManager: KVBM for an engine with a real paged KV cache (the built-in engine). The
scheduler talks to its TieredCache on the event loop's thread; the engine runs each step's
TransferPlan with execute() on its model thread, before that step's forward pass."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence

import torch

from kvbm.block_pool import KvEventSink
from kvbm.config import KvbmConfig
from kvbm.copy_engine import BlockCopier
from kvbm.disk_tier import DiskStore
from kvbm.host_tier import HostStore
from kvbm.layout import KvLayout
from kvbm.tiered import DISK, HOST, TieredCache, TransferPlan

log = logging.getLogger(__name__)


class KvBlockManager:
    """G2 (pinned host tensors) and G3 (files) below a device cache given as per-layer K and V
    tensors of shape [num_blocks, block_size, kv_heads, head_dim]. Build it on the model
    thread (the host tier is a large pinned allocation); start() scans the disk tier."""

    def __init__(self, config: KvbmConfig, layout: KvLayout, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor],
                 on_event: KvEventSink | None = None) -> None:
        block_bytes = layout.block_bytes
        self.layout = layout
        self.disk: DiskStore | None = None
        if config.disk_dir and config.disk_capacity_blocks(block_bytes) > 0:
            self.disk = DiskStore(config.disk_dir, layout, config.disk_queue_blocks)
        else:
            # A real disk tier needs a directory; without one the tier is off.
            config = dataclasses.replace(config, disk_blocks=0, disk_gb=None)
        self.cache = TieredCache(config, block_bytes, on_event, self.disk.backlog if self.disk else None)
        self.host: HostStore | None = None
        if self.cache.host is not None:
            self.host = HostStore(self.cache.host.capacity_blocks, layout.num_layers, layout.elements_per_layer,
                                  k[0].dtype, pin=k[0].device.type == "cuda")
        self.copier = BlockCopier(k, v, self.host.data if self.host else None)

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
        if self.disk is not None:
            await asyncio.to_thread(self.disk.stop)

    # ------------------------------------------------------------------- the step's transfer

    def has_pending(self) -> bool:
        return self.cache.has_pending()

    def take_plan(self) -> TransferPlan:
        return self.cache.take_plan()

    def execute(self, plan: TransferPlan) -> list[int]:
        """On the model thread: spills, offloads, onboards, deletes (see TransferPlan).
        Returns the device blocks whose onboard failed (an unreadable file): their tokens
        must be recomputed."""
        copier, disk, host = self.copier, self.disk, self.host
        started = time.perf_counter()
        copier.begin()
        if plan.spills:
            assert disk is not None and host is not None
            copier.drain()  # the slots may still be receiving the last plan's offloads
            for op in plan.spills:
                disk.write(op.block_hash, op.parent_hash, host.data[op.host_slot].clone())
        to_host = [op for op in plan.offloads if op.tier == HOST]
        if to_host:
            copier.offload_to_host([op.device_block for op in to_host], [op.slot for op in to_host])
        to_disk = [op for op in plan.offloads if op.tier == DISK]
        if to_disk:
            assert disk is not None
            data = copier.to_cpu([op.device_block for op in to_disk])
            for i, op in enumerate(to_disk):
                disk.write(op.block_hash, op.parent_hash, data[i])
        from_host = [op for op in plan.onboards if op.tier == HOST]
        if from_host:
            copier.onboard_from_host([op.slot for op in from_host], [op.device_block for op in from_host])
        failed: list[int] = []
        from_disk = [op for op in plan.onboards if op.tier == DISK]
        if from_disk:
            assert disk is not None
            buf = torch.empty((len(from_disk), 2 * self.layout.num_layers, self.layout.elements_per_layer),
                              dtype=copier.dtype)
            good = [i for i, op in enumerate(from_disk) if disk.read(op.block_hash, buf[i])]
            failed = [from_disk[i].device_block for i in range(len(from_disk)) if i not in set(good)]
            if good:
                copier.onboard_from_cpu(buf[good], [from_disk[i].device_block for i in good])
        for op in plan.deletes:
            assert disk is not None
            disk.delete(op.block_hash)
        copier.end()
        onboard_bytes = (len(plan.onboards) - len(failed)) * self.layout.block_bytes
        if onboard_bytes:
            self.cache.stats.transfer("onboard", onboard_bytes, time.perf_counter() - started)
        return failed

    def finish(self, plan: TransferPlan, failed: Sequence[int] = ()) -> None:
        """On the event loop's thread after execute(): unpin, and forget unreadable files."""
        self.cache.finish(plan)
        if failed:
            bad = set(failed)
            for op in plan.onboards:
                if op.device_block in bad:
                    log.warning("kvbm: disk block %016x unreadable; recomputing it", op.block_hash)
                    self.cache.forget_disk(op.block_hash)
