"""PlanExecutor over the device caches both engines give it: the built-in engine's per-layer K
and V tensors, and vLLM's layouts (a layer's K and V at one block index, one piece a layer).
Host slots and disk files hold a block as the same 2L x E elements either way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynamo.wire import KvLayoutSpec
from kvbm.disk_tier import DiskStore
from kvbm.host_tier import HostStore
from kvbm.layout import elements_per_layer
from kvbm.plan_executor import PlanExecutor
from kvbm.tiered import DISK, HOST, OffloadOp, OnboardOp, TransferPlan, WriteOp

LAYOUT = KvLayoutSpec(num_layers=2, block_size_tokens=4, num_kv_heads=2, head_dim=8, dtype="float32")
BLOCKS = 8
E = elements_per_layer(LAYOUT)


def kv_apart() -> list[torch.Tensor]:
    """K0, V0, K1, V1 as [blocks, block_size, heads, head_dim] (the built-in engine)."""
    g = torch.Generator().manual_seed(1)
    shape = (BLOCKS, LAYOUT.block_size_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return [torch.randn(shape, generator=g) for _ in range(2 * LAYOUT.num_layers)]


def kv_together() -> list[torch.Tensor]:
    """One [blocks, heads, block_size, 2 * head_dim] tensor a layer (vLLM's CPU backend)."""
    g = torch.Generator().manual_seed(2)
    shape = (BLOCKS, LAYOUT.num_kv_heads, LAYOUT.block_size_tokens, 2 * LAYOUT.head_dim)
    return [torch.randn(shape, generator=g) for _ in range(LAYOUT.num_layers)]


def block(pieces: list[torch.Tensor], b: int) -> torch.Tensor:
    """Device block b as host memory keeps it: [2L, E]."""
    return torch.cat([t[b].reshape(-1) for t in pieces]).view(2 * LAYOUT.num_layers, E)


def test_host_round_trip_in_both_layouts() -> None:
    for pieces in (kv_apart(), kv_together()):
        host = HostStore(4, LAYOUT.num_layers, E, torch.float32, pin=False)
        ex = PlanExecutor(LAYOUT, pieces, host, None)
        want = block(pieces, 3).clone()
        ex.execute(TransferPlan(offloads=[OffloadOp(3, 0xA, None, HOST, 1)]))
        assert torch.equal(host.data[1], want)
        done = ex.execute(TransferPlan(onboards=[OnboardOp(0xA, HOST, 1, 6)]))
        assert torch.equal(block(pieces, 6), want)
        assert done.failed == [] and done.onboard_bytes == want.numel() * 4
        assert [(tier, nbytes) for tier, nbytes, _ in done.reads] == [(HOST, want.numel() * 4)]


def test_disk_round_trip_in_both_layouts_files_hold_the_host_rows_bytes(tmp_path: Path) -> None:
    for i, pieces in enumerate((kv_apart(), kv_together())):
        host = HostStore(4, LAYOUT.num_layers, E, torch.float32, pin=False)
        disk = DiskStore(tmp_path / str(i), LAYOUT, report_writes=True)
        disk.start()
        ex = PlanExecutor(LAYOUT, pieces, host, disk)
        host.data[2] = block(pieces, 5)
        want = [block(pieces, 5).clone(), block(pieces, 1).clone()]
        ex.execute(TransferPlan(writes=[WriteOp(0xB, None, 2)], offloads=[OffloadOp(1, 0xC, 0xB, DISK, 0)]))
        disk.stop()  # returns once the queued writes are done
        assert disk.completed() == [(0xB, True), (0xC, True)]
        disk.start()
        done = ex.execute(TransferPlan(onboards=[OnboardOp(0xB, DISK, 0, 6), OnboardOp(0xC, DISK, 1, 7),
                                                 OnboardOp(0xD, DISK, 2, 0)]))
        assert torch.equal(block(pieces, 6), want[0]) and torch.equal(block(pieces, 7), want[1])
        assert done.failed == [0] and done.unreadable == [0xD]  # no such file: recompute block 0
        assert [tier for tier, _, _ in done.reads] == [DISK, HOST]
        disk.stop()
        assert disk.path(0xB).read_bytes()[-want[0].numel() * 4:] == want[0].numpy().tobytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the side stream and the fused copy kernel)")
def test_gpu_round_trips_in_every_layout(tmp_path: Path) -> None:
    """On CUDA: offloads land in pinned slots in the background, onboards run on the side
    stream before the next forward pass's work, disk writes wait for their slots' copies; the
    flash layout's K and V halves ([2, blocks, ...]) are pieces too."""
    flash = [torch.randn(2, BLOCKS, LAYOUT.block_size_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim, device="cuda")
             for _ in range(LAYOUT.num_layers)]
    layouts = {"apart": [t.cuda() for t in kv_apart()], "together": [t.cuda() for t in kv_together()],
               "flash": [half for t in flash for half in (t[0], t[1])]}
    for name, pieces in layouts.items():
        host = HostStore(4, LAYOUT.num_layers, E, torch.float32, pin=True)
        disk = DiskStore(tmp_path / name, LAYOUT, report_writes=True)
        disk.start()
        ex = PlanExecutor(LAYOUT, pieces, host, disk, flush_blocks=4)
        want = [block(pieces, b).cpu() for b in (2, 3)]
        ex.execute(TransferPlan(offloads=[OffloadOp(2, 0xA, None, HOST, 0), OffloadOp(3, 0xB, 0xA, DISK, 0)]))
        # The next step: the host slot goes to disk too; block 2 is overwritten by the forward pass.
        ex.execute(TransferPlan(writes=[WriteOp(0xA, None, 0)]))
        for t in pieces:
            t[2].zero_()
        ex.execute(TransferPlan(onboards=[OnboardOp(0xA, HOST, 0, 5)]))
        torch.cuda.synchronize()
        assert torch.equal(block(pieces, 5).cpu(), want[0]), name
        disk.stop()
        assert sorted(disk.completed()) == [(0xA, True), (0xB, True)], name
        out = torch.empty(2 * LAYOUT.num_layers, E)
        assert disk.read(0xA, out) and torch.equal(out, want[0]), name
        assert disk.read(0xB, out) and torch.equal(out, want[1]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the offload ring's copy kernel)")
def test_gpu_disk_tier_without_a_host_tier_gathers_through_the_ring(tmp_path: Path) -> None:
    pieces = [t.cuda() for t in kv_apart()]
    disk = DiskStore(tmp_path, LAYOUT, report_writes=True)
    disk.start()
    ex = PlanExecutor(LAYOUT, pieces, None, disk)
    assert ex.copier.fused and ex.copier._ring is not None  # made (and its kernel compiled) up front
    want = [block(pieces, b).cpu() for b in range(BLOCKS)]
    for b in range(BLOCKS):
        ex.execute(TransferPlan(offloads=[OffloadOp(b, 0x100 + b, None, DISK, 0)]))
        pieces[0][b].zero_()  # the next forward pass reuses the device block
    disk.stop()
    assert sorted(disk.completed()) == [(0x100 + b, True) for b in range(BLOCKS)]
    out = torch.empty(2 * LAYOUT.num_layers, E)
    for b in range(BLOCKS):
        assert disk.read(0x100 + b, out) and torch.equal(out, want[b]), b
