"""Tier upkeep never waits on the model thread (kvbm/manager.py, kvbm/disk_tier.py, kvbm/tiered.py):
with the disk thread held back by DiskStore's `before_write` hook, the model thread's KVBM calls
(evicted, take_plan, execute, finish) return while the writes are still pending; host slots being
written stay pinned, and a block that then finds no slot is not kept (counted); the router is
told of a file only once it is written; a block onboarded after its write completed comes back
bit for bit; the disk thread reads a slot only after the event of the copy that fills it. The
mocker's simulated writer holds slots the same way. Synchronised with threading.Event
handshakes; the timeouts only turn a hang into a failure."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dynamo.wire import BlockRemoved, BlockStored, KvEventData, KvLayoutSpec
from kvbm.block_pool import EvictedBlock
from kvbm.config import KvbmConfig
from kvbm.disk_tier import DiskStore
from kvbm.layout import elements_per_layer
from kvbm.manager import KvBlockManager
from kvbm.simulated import SimulatedKvbm

LAYOUT = KvLayoutSpec(num_layers=2, block_size_tokens=4, num_kv_heads=2, head_dim=8, dtype="float32")
HANG_S = 60  # a call that waited for the stuck disk would never return: fail instead of hanging


class StuckDisk:
    """A `before_write` hook: the disk thread announces each write it reaches and waits until
    the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.reached = threading.Event()
        self.hashes: list[int] = []

    def __call__(self, block_hash: int) -> None:
        self.hashes.append(block_hash)
        self.reached.set()
        assert self.gate.wait(HANG_S)


def kv(num_blocks: int = 16, device: str = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    shape = (num_blocks, LAYOUT.block_size_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    k = [torch.randn(shape, generator=g).to(device) for _ in range(LAYOUT.num_layers)]
    v = [torch.randn(shape, generator=g).to(device) for _ in range(LAYOUT.num_layers)]
    return k, v


def device_block(k: list[torch.Tensor], v: list[torch.Tensor], b: int) -> torch.Tensor:
    return torch.stack([t[b].reshape(-1) for pair in zip(k, v) for t in pair]).cpu()


def returns(fn: Callable[[], Any]) -> Any:
    """Run a model-thread call on a thread of its own; fail if it does not return (it would be
    waiting for the stuck disk)."""
    out: list[Any] = []
    done = threading.Event()

    def run() -> None:
        out.append(fn())
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(HANG_S), "a KVBM call waited for the disk"
    return out[0]


def step(mgr: KvBlockManager) -> None:
    """One engine step's KVBM work, as the built-in executor does it."""
    if mgr.has_pending():
        plan = mgr.take_plan()
        failed = returns(lambda: mgr.execute(plan))
        mgr.finish(plan, failed)


def announced_on_disk(events: list[KvEventData]) -> set[int]:
    held: set[int] = set()
    for e in events:
        if isinstance(e, BlockStored) and e.tier == "disk":
            held.update(e.block_hashes)
        elif isinstance(e, BlockRemoved) and e.tier == "disk":
            held.difference_update(e.block_hashes)
    return held


def test_writes_never_hold_up_the_model_thread_and_are_announced_once_on_disk(tmp_path: Path) -> None:
    stuck = StuckDisk()
    events: list[KvEventData] = []
    k, v = kv()
    config = KvbmConfig(host_blocks=2, disk_dir=str(tmp_path), disk_blocks=16, disk_queue_blocks=2)
    mgr = KvBlockManager(config, LAYOUT, k, v, on_event=events.append, disk_before_write=stuck)
    disk, cache, host = mgr.disk, mgr.cache, mgr.host
    assert disk is not None and host is not None and cache.host is not None
    disk.start()
    want = {0xA: device_block(k, v, 0), 0xB: device_block(k, v, 1)}

    def check_announcements() -> None:  # nothing on the router's books that is not a whole file
        assert all(disk.exists(h) for h in announced_on_disk(events))

    try:
        cache.evicted([EvictedBlock(0, 0xA, None), EvictedBlock(1, 0xB, 0xA)])
        step(mgr)  # the offloads into the host slots; their writes ahead go into the next plan
        plan = mgr.take_plan()
        assert sorted(op.block_hash for op in plan.writes) == [0xA, 0xB]
        returns(lambda: mgr.execute(plan))  # queues the writes, returns
        mgr.finish(plan)
        assert stuck.reached.wait(HANG_S)  # the disk thread is inside the first write, held there
        assert disk.backlog() == 2 and cache.writing == {0xA, 0xB}
        assert all(e.ref_count == 1 for e in cache.host)  # the slots being written stay pinned
        assert announced_on_disk(events) == set() and not disk.exists(0xA)
        hits = cache.lookup([0xA, 0xB], 0)
        assert [h.tier for h in hits] == ["host", "host"]  # from the pinned slots: the files are not there yet
        cache.release(hits)

        # Two more blocks leave the device: every host slot is being written and the writer's
        # queue is full, so they are not kept (counted) rather than waited for.
        returns(lambda: cache.evicted([EvictedBlock(2, 0xC, None), EvictedBlock(3, 0xD, 0xC)]))
        assert cache.stats.skipped_by == {("host", "slots_busy"): 2}
        assert not cache.has_pending()
        check_announcements()

        stuck.gate.set()
        disk.stop()  # the queued writes finish
        cache.finish(cache.take_plan())  # a step boundary polls the finished writes
        assert announced_on_disk(events) == {0xA, 0xB} and cache.writing == frozenset()
        check_announcements()
        assert all(e.ref_count == 0 for e in cache.host)
        assert cache.stats.offload_blocks["disk"] == 2

        # Two fresh blocks push 0xA and 0xB out of the host (free: they are on disk); read
        # back from disk and onboarded, they are the evicted device blocks bit for bit.
        cache.evicted([EvictedBlock(4, 0xE, None), EvictedBlock(5, 0xF, 0xE)])
        step(mgr)
        assert 0xA not in cache.host and cache.stats.skipped_by == {("host", "slots_busy"): 2}
        assert mgr.reader is not None
        hits = cache.lookup([0xA, 0xB], 0)
        assert [h.tier for h in hits] == ["disk", "disk"]
        reads = cache.start_reads(hits)
        assert reads is not None and reads.wait(HANG_S)  # type: ignore[attr-defined]
        staged = cache.lookup_staged([0xA, 0xB], 0, reads)
        cache.onboard([0xA, 0xB], 0, staged, [8, 9])
        cache.close_reads(reads)
        step(mgr)
        for h, b in ((0xA, 8), (0xB, 9)):
            assert torch.equal(device_block(k, v, b), want[h])
        check_announcements()
    finally:
        stuck.gate.set()
        disk.stop()
        if mgr.reader is not None:
            mgr.reader.stop()


def test_the_disk_thread_reads_a_slot_only_after_the_copy_filling_it(tmp_path: Path) -> None:
    """`ready` stands for the device-to-host copy's event: the bytes written are those there
    once it completes, not those there when the write was queued."""

    class Copy:  # a CUDA event's synchronize(), completed by the test
        def __init__(self) -> None:
            self.waited = threading.Event()
            self.done = threading.Event()

        def synchronize(self) -> None:
            self.waited.set()
            assert self.done.wait(HANG_S)

    store = DiskStore(tmp_path, LAYOUT, report_writes=True)
    store.start()
    slot = torch.zeros((2 * LAYOUT.num_layers, elements_per_layer(LAYOUT)))
    copy = Copy()
    try:
        assert store.write_batch([(0x5, None, slot)], copy)  # returns at once
        assert copy.waited.wait(HANG_S) and store.completed() == [] and not store.exists(0x5)
        slot.fill_(7.0)  # the copy lands
        copy.done.set()
    finally:
        copy.done.set()
        store.stop()
    assert store.completed() == [(0x5, True)]
    out = torch.empty_like(slot)
    assert store.read(0x5, out) and torch.equal(out, torch.full_like(slot, 7.0))


def test_a_write_that_fails_is_reported_and_the_thread_goes_on(tmp_path: Path) -> None:
    def failing(block_hash: int) -> None:
        if block_hash == 0x1:
            raise OSError("disk full")

    store = DiskStore(tmp_path, LAYOUT, report_writes=True, before_write=failing)
    store.start()
    data = torch.ones((2 * LAYOUT.num_layers, elements_per_layer(LAYOUT)))
    store.write_batch([(0x1, None, data), (0x2, None, data)])
    store.stop()
    assert store.completed() == [(0x1, False), (0x2, True)] and store.write_errors == 1
    assert not store.exists(0x1) and store.exists(0x2)


def test_the_mockers_writer_holds_host_slots_until_its_writes_end() -> None:
    """SimulatedKvbm with a write bandwidth: writes take simulated time off the steps (no
    step cost), their host slots stay pinned meanwhile, and blocks that find every slot so
    held and the queue full are skipped, as in the built-in engine."""
    clock = [0.0]
    mb = 1 << 20
    config = KvbmConfig(host_blocks=2, disk_blocks=16, disk_queue_blocks=2, disk_write_gbps=1e-3)  # 1 s a block
    sim = SimulatedKvbm(config, mb, clock=lambda: clock[0], block_size_tokens=16)
    cache = sim.cache
    assert sim.writer is not None
    cache.evicted([EvictedBlock(0, 0xA, None), EvictedBlock(1, 0xB, 0xA)])
    assert sim.step_cost_s() == 0.0
    assert sim.step_cost_s() == 0.0  # the writes ahead: queued, no step time
    assert cache.writing == {0xA, 0xB}
    cache.evicted([EvictedBlock(2, 0xC, None)])
    assert cache.stats.skipped_by == {("host", "slots_busy"): 1}
    clock[0] = 1.05 * mb / 1e6  # the first write is done, the second not
    cache.evicted([EvictedBlock(3, 0xD, None)])  # takes 0xA's slot: it is on disk now
    assert cache.writing == {0xB} and cache.host is not None and 0xA not in cache.host
    assert [h.tier for h in cache.lookup([0xA], 0)] == ["disk"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_writes_wait_for_their_copies_on_the_disk_thread(tmp_path: Path) -> None:
    """The real events: offloaded on the copier's side stream (held in the staging ring), then
    written ahead by the next plan while the disk thread is held back; the files hold the
    device blocks bit for bit."""
    stuck = StuckDisk()
    k, v = kv(device="cuda")
    config = KvbmConfig(host_blocks=8, disk_dir=str(tmp_path), disk_blocks=16, offload_flush_blocks=16)
    mgr = KvBlockManager(config, LAYOUT, k, v, disk_before_write=stuck)
    disk = mgr.disk
    assert disk is not None
    disk.start()
    try:
        blocks = [EvictedBlock(b, 0x100 + b, None) for b in range(4)]
        want = {blk.block_hash: device_block(k, v, blk.block_id) for blk in blocks}
        mgr.cache.evicted(blocks)
        step(mgr)
        plan = mgr.take_plan()
        assert len(plan.writes) == 4
        returns(lambda: mgr.execute(plan))
        mgr.finish(plan)
        for blk in blocks:  # the device blocks are reused meanwhile
            for t in (*k, *v):
                t[blk.block_id].fill_(-1.0)
        assert stuck.reached.wait(HANG_S) and disk.backlog() == 4
        stuck.gate.set()
        disk.stop()
        out = torch.empty_like(next(iter(want.values())))
        for h, data in want.items():
            assert disk.read(h, out) and torch.equal(out, data)
    finally:
        stuck.gate.set()
        disk.stop()
        if mgr.reader is not None:
            mgr.reader.stop()
