"""KvBlockManager: KVBM for an engine with a real paged KV cache (the built-in engine). The
scheduler talks to its TieredCache on the event loop's thread; the engine runs each step's
TransferPlan with execute() on its model thread, before that step's forward pass. No disk I/O
runs there: disk blocks a prompt needs are read beforehand by a DiskReader (the scheduler holds
the request back meanwhile) and onboarded from pinned memory like host blocks; writes are queued
for the disk thread, their device-to-host copies left running on the copier's side stream."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Sequence

import torch

from kvbm.block_pool import KvEventSink
from kvbm.config import KvbmConfig
from kvbm.copy_engine import BlockCopier
from kvbm.disk_tier import DiskReader, DiskStore
from kvbm.host_tier import HostStore
from dynamo.wire import KvLayoutSpec
from kvbm.layout import block_bytes, elements_per_layer
from kvbm.tiered import DISK, HOST, TieredCache, TransferPlan

log = logging.getLogger(__name__)

# Disk reads land in one staging pool of this size (pinned on CUDA, allocated once with the
# reader); a request it cannot hold at the moment gets a buffer of its own.
STAGING_BYTES = 512 << 20
STAGING_MAX_ROWS = 8192


class KvBlockManager:
    """G2 (pinned host tensors) and G3 (files) below a device cache given as per-layer K and V
    tensors of shape [num_blocks, block_size, kv_heads, head_dim]. Build it on the model
    thread (the host tier is a large pinned allocation); start() scans the disk tier."""

    def __init__(self, config: KvbmConfig, layout: KvLayoutSpec, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor],
                 on_event: KvEventSink | None = None) -> None:
        size = block_bytes(layout)
        self.layout = layout
        self.disk: DiskStore | None = None
        if config.disk_dir and config.disk_capacity_blocks(size) > 0:
            self.disk = DiskStore(config.disk_dir, layout, config.disk_queue_blocks)
        else:
            # A real disk tier needs a directory; without one the tier is off.
            config = dataclasses.replace(config, disk_blocks=0, disk_gb=None)
        self.cache = TieredCache(config, size, on_event, self.disk.backlog if self.disk else None,
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
        if self.disk is not None:
            rows = max(1, min(STAGING_MAX_ROWS, STAGING_BYTES // size))
            self.reader = DiskReader(self.disk, k[0].dtype, self.pin, threads=min(4, os.cpu_count() or 1),
                                     staging_rows=rows)
            self.cache.reader = self.reader
            self.cache.disk_probe = self.disk.exists  # workers of one host may share the directory
        self._dropped: list[int] = []  # disk writes the full queue refused (model thread -> finish)

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
        """On the model thread: spills, offloads, onboards, deletes (see TransferPlan).
        Returns the device blocks whose onboard failed (an unreadable file): their tokens
        must be recomputed."""
        copier, disk, host = self.copier, self.disk, self.host
        started = time.perf_counter()
        for nbytes, seconds in copier.timings():  # earlier plans' onboards, done by now
            self.cache.observe_read(HOST, nbytes, seconds)
        if plan.spills:
            # The slots may still be receiving earlier plans' offloads. Before begin(): their
            # held copies then queue behind the forward pass that wrote them, so waiting for
            # them does not wait for the one in flight (the overlap loop's).
            copier.drain()
        copier.begin()
        if plan.spills:
            assert disk is not None and host is not None
            # One batched copy out of the slots (phase 2 may overwrite them); the disk thread
            # writes from it, on the CPU only: pageable memory (pinning it per plan is slow).
            idx = torch.tensor([op.host_slot for op in plan.spills], dtype=torch.long)
            data = torch.index_select(host.data, 0, idx)
            for i, op in enumerate(plan.spills):
                self._write(op.block_hash, op.parent_hash, data[i], None)
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
        if self.reader is not None and self.reader.pool is not None:
            # Staging rows released so far are reused once the copies queued out of them end.
            self.reader.pool.fence(copier.fence())
        if host_gathered is not None:
            copier.land_in_host(host_gathered)
        if disk_gathered is not None:
            data, ready = copier.download(disk_gathered, self.pin)
            for i, op in enumerate(to_disk):
                self._write(op.block_hash, op.parent_hash, data[i], ready)
        if late:
            copier.onboard_from_host([op.slot for op in late], [op.device_block for op in late])
        for op in plan.deletes:
            assert disk is not None
            disk.delete(op.block_hash)
        if plan.reads_after:
            assert self.reader is not None
            for reads in plan.reads_after:  # their blocks' writes are queued now
                self.reader.submit(reads)
        copier.end()
        onboard_bytes = (len(plan.onboards) - len(failed)) * block_bytes(self.layout)
        if onboard_bytes:
            self.cache.stats.transfer("onboard", onboard_bytes, time.perf_counter() - started)
        return failed

    def _write(self, block_hash: int, parent_hash: int | None, data: torch.Tensor, ready: object) -> None:
        assert self.disk is not None
        if not self.disk.write(block_hash, parent_hash, data, ready):
            self._dropped.append(block_hash)

    def finish(self, plan: TransferPlan, failed: Sequence[int] = ()) -> None:
        """On the event loop's thread after execute(): unpin, and forget unreadable files
        and writes the full disk queue dropped."""
        self.cache.finish(plan)
        dropped, self._dropped = self._dropped, []
        for block_hash in dropped:
            self.cache.stats.skip()
            self.cache.forget_disk(block_hash)
        if failed:
            bad = set(failed)
            for op in plan.onboards:
                if op.device_block in bad:
                    log.warning("kvbm: disk block %016x unreadable; recomputing it", op.block_hash)
                    self.cache.forget_disk(op.block_hash)
