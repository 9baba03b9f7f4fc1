"""KvBlockManager.execute on CPU: onboard copies are queued between the device-side gathers of
evicted blocks and their device-to-host copies (so the forward pass need not wait for the
latter), except an onboard from a host slot the same plan offloads into, which reads the
offloaded bytes; disk reads staged in the pool are onboarded and their rows fenced; blocks
evicted straight to disk borrow rows of a write pool until written."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kvbm.config import KvbmConfig
from dynamo.wire import KvLayoutSpec as KvLayout
from kvbm.layout import block_header, elements_per_layer, fingerprint, parse_block_header
from kvbm.manager import KvBlockManager
from kvbm.tiered import DISK, HOST, OffloadOp, OnboardOp, TransferPlan

LAYOUT = KvLayout(num_layers=2, block_size_tokens=4, num_kv_heads=2, head_dim=8, dtype="float32")


def kv(num_blocks: int = 8) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shape = (num_blocks, LAYOUT.block_size_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return ([torch.randn(shape, generator=g) for _ in range(2)], [torch.randn(shape, generator=g) for _ in range(2)])


def device_block(k: list[torch.Tensor], v: list[torch.Tensor], b: int) -> torch.Tensor:
    return torch.stack([t[b].reshape(-1) for pair in zip(k, v) for t in pair])


def test_onboards_are_queued_before_the_offloads_device_to_host_copies() -> None:
    k, v = kv()
    mgr = KvBlockManager(KvbmConfig(host_blocks=4), LAYOUT, k, v)
    assert mgr.host is not None
    calls: list[str] = []
    for name in ("gather_for_host", "land_in_host", "onboard_many"):
        fn = getattr(mgr.copier, name)
        setattr(mgr.copier, name, lambda *a, _fn=fn, _n=name: (calls.append(_n), _fn(*a))[1])
    mgr.host.data[1] = torch.full_like(mgr.host.data[1], 7.0)
    evicted = device_block(k, v, 0).clone()
    plan = TransferPlan(offloads=[OffloadOp(0, 0xA, None, HOST, 0)],
                        onboards=[OnboardOp(0xB, HOST, 1, 0)])  # the evicted block receives the hit
    mgr.execute(plan)
    assert calls == ["gather_for_host", "onboard_many", "land_in_host"]
    assert torch.equal(mgr.host.data[0], evicted)  # gathered before the onboard overwrote it
    assert torch.equal(device_block(k, v, 0), mgr.host.data[1])


def test_a_plans_upkeep_time_leaves_its_onboards_out() -> None:
    """What the offload cost model charges to offloads (TransferPlan.upkeep_s) is the plan's
    time without its onboards' launches, which a hit pays for, not the tier's upkeep."""
    k, v = kv()
    mgr = KvBlockManager(KvbmConfig(host_blocks=4), LAYOUT, k, v)
    slow = mgr.copier.onboard_many
    mgr.copier.onboard_many = lambda groups: (time.sleep(0.2), slow(groups))[1]  # type: ignore[method-assign]
    plan = TransferPlan(offloads=[OffloadOp(0, 0xA, None, HOST, 0)], onboards=[OnboardOp(0xB, HOST, 1, 2)])
    started = time.perf_counter()
    mgr.execute(plan)
    assert time.perf_counter() - started >= 0.2
    assert plan.upkeep_s is not None and 0 < plan.upkeep_s < 0.2


def test_onboard_from_a_slot_the_plan_offloads_into_reads_the_offloaded_bytes() -> None:
    k, v = kv()
    mgr = KvBlockManager(KvbmConfig(host_blocks=4), LAYOUT, k, v)
    assert mgr.host is not None
    evicted = device_block(k, v, 2).clone()
    plan = TransferPlan(offloads=[OffloadOp(2, 0xA, None, HOST, 3)], onboards=[OnboardOp(0xA, HOST, 3, 5)])
    mgr.execute(plan)
    assert torch.equal(mgr.host.data[3], evicted) and torch.equal(device_block(k, v, 5), evicted)


def test_staged_disk_blocks_are_onboarded_and_their_rows_reused(tmp_path: Path) -> None:
    k, v = kv()
    mgr = KvBlockManager(KvbmConfig(host_blocks=2, disk_dir=str(tmp_path), disk_blocks=16), LAYOUT, k, v)
    assert mgr.reader is not None and mgr.reader.pool is not None and mgr.disk is not None
    pool = mgr.reader.pool
    mgr.disk.start()
    want = {h: torch.randn((4, elements_per_layer(LAYOUT)), generator=torch.Generator().manual_seed(h)) for h in (1, 2)}
    for h, data in want.items():
        mgr.disk.write(h, None, data)
    mgr.disk.stop()
    free = pool.num_free
    for _ in range(2):
        reads = mgr.reader.start([1, 2])
        assert reads.wait(30)
        plan = TransferPlan(onboards=[OnboardOp(h, DISK, 0, 3 + h, reads.staged(h)) for h in (1, 2)])
        reads.close()  # as at admission: before the plan runs
        assert pool.num_free == free - 2  # not reusable before the plan's copies are queued
        assert mgr.execute(plan) == []
        for h in (1, 2):
            assert torch.equal(device_block(k, v, 3 + h), want[h])
        assert pool.num_free == free
    assert pool.takes == 2 and pool.misses == 0
    mgr.reader.stop()


def test_blocks_evicted_straight_to_disk_borrow_pool_rows_until_written(tmp_path: Path) -> None:
    """Downloaded into rows of a host pool made once (no pinned allocation per batch), which
    return to it when the disk thread has written them; a batch the pool cannot hold gets a
    buffer of its own."""
    import threading

    k, v = kv()
    held = threading.Event()

    def hold(_: int) -> None:
        held.wait(30)

    config = KvbmConfig(disk_dir=str(tmp_path), disk_blocks=16, disk_queue_blocks=3)
    mgr = KvBlockManager(config, LAYOUT, k, v, disk_before_write=hold)
    assert mgr.disk is not None and mgr.write_staging is not None
    pool = mgr.write_staging
    assert pool.rows == 3
    mgr.disk.start()
    want = {b: device_block(k, v, b).clone() for b in range(5)}
    mgr.execute(TransferPlan(offloads=[OffloadOp(b, 0x10 + b, None, DISK, 0) for b in (0, 1)]))
    assert pool.num_free == 1  # held until written
    mgr.execute(TransferPlan(offloads=[OffloadOp(b, 0x10 + b, None, DISK, 0) for b in (2, 3)]))  # too many
    assert pool.num_free == 1 and pool.misses == 1
    for b in range(5):  # the device blocks are reused at once: the pool's copies are the data
        for t in (*k, *v):
            t[b].fill_(-1.0)
    held.set()
    mgr.disk.stop()
    assert pool.num_free == 3
    out = torch.empty((4, elements_per_layer(LAYOUT)))
    for b in range(4):
        assert mgr.disk.read(0x10 + b, out) and torch.equal(out, want[b])
    assert mgr.reader is not None
    mgr.reader.stop()
