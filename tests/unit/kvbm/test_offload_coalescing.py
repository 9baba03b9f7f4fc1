"""Offload coalescing in kvbm.copy_engine.BlockCopier (on CPU; the same bookkeeping runs on
CUDA with the fused gather): blocks gathered into the staging ring wait for their copy to host
memory until `flush_blocks` wait or the next step boundary, never longer; a read of a slot still
waiting flushes first; and whatever the flush boundaries, every host slot ends up with its
block, so onboarding the slots back reproduces the cache bit for bit."""

from __future__ import annotations

import random

import torch

from dynamo.wire import KvLayoutSpec
from kvbm.config import KvbmConfig
from kvbm.copy_engine import BlockCopier
from kvbm.manager import KvBlockManager
from kvbm.tiered import HOST, OffloadOp, OnboardOp, TransferPlan, WriteOp

LAYERS, TOKENS, HEADS, DIM = 2, 4, 2, 8
ELEMENTS = TOKENS * HEADS * DIM
ROW_BYTES = 2 * LAYERS * ELEMENTS * 4


def cache(num_blocks: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, TOKENS, HEADS, DIM)
    return [torch.randn(shape, generator=g) for _ in range(LAYERS)], [torch.randn(shape, generator=g) for _ in range(LAYERS)]


def block(k: list[torch.Tensor], v: list[torch.Tensor], b: int) -> torch.Tensor:
    return torch.stack([t[b].reshape(-1) for pair in zip(k, v) for t in pair])


def poisoned_host(slots: int) -> torch.Tensor:
    return torch.full((slots, 2 * LAYERS, ELEMENTS), float("nan"))


def test_offload_then_onboard_equals_the_original_across_flush_boundaries() -> None:
    rng = random.Random(7)
    k, v = cache(64, seed=1)
    original = [block(k, v, b).clone() for b in range(32)]
    host = poisoned_host(40)
    # A ring of 6 rows with flushes at 4: batches wrap around it, flush mid-batch, and a batch
    # of 9 goes past the ring (its own buffer).
    copier = BlockCopier(k, v, host, flush_blocks=4, staging_bytes=6 * ROW_BYTES)
    assert copier.staging_rows == 6
    where: dict[int, int] = {}  # device block -> host slot
    free_slots = list(range(40))
    rng.shuffle(free_slots)
    todo = list(range(32))
    rng.shuffle(todo)
    for size in [1, 2, 3, 1, 9, 2, 1, 5, 3, 1, 4]:
        batch, todo = todo[:size], todo[size:]
        slots = [free_slots.pop() for _ in batch]
        copier.begin()
        copier.offload_to_host(batch, slots)
        copier.end()
        where.update(zip(batch, slots))
    assert not todo and copier.flushes >= 3
    copier.drain()
    assert not copier.has_pending_offloads()
    for b, slot in where.items():
        assert torch.equal(host[slot], original[b])
    # Back into other device blocks, in one batch, in an order unlike the slots'.
    blocks = sorted(where)
    targets = [32 + i for i in range(len(blocks))]
    copier.begin()
    copier.onboard_from_host([where[b] for b in blocks], targets)
    copier.end()
    for b, t in zip(blocks, targets):
        assert torch.equal(block(k, v, t), original[b])


def test_nothing_waits_beyond_the_next_step_and_a_full_batch_goes_at_once() -> None:
    k, v = cache(16, seed=2)
    host = poisoned_host(16)
    copier = BlockCopier(k, v, host, flush_blocks=4)
    copier.begin()
    copier.offload_to_host([3], [5])
    copier.end()
    assert copier.has_pending_offloads() and torch.isnan(host[5]).all()  # held for company
    copier.begin()  # the next step offloads nothing: the held block goes now
    copier.end()
    assert not copier.has_pending_offloads() and torch.equal(host[5], block(k, v, 3))
    copier.begin()
    copier.offload_to_host([1, 2, 4, 6], [0, 1, 2, 3])  # flush_blocks of them: no wait
    assert not copier.has_pending_offloads()
    copier.end()
    for slot, b in enumerate([1, 2, 4, 6]):
        assert torch.equal(host[slot], block(k, v, b))
    # Held blocks join the next step's batch: one flush for both steps.
    copier.begin()
    copier.offload_to_host([7], [8])
    copier.end()
    flushes = copier.flushes
    copier.begin()
    copier.offload_to_host([9], [9])
    copier.end()
    assert copier.flushes == flushes + 1 and not copier.has_pending_offloads()
    assert torch.equal(host[8], block(k, v, 7)) and torch.equal(host[9], block(k, v, 9))


def test_reading_a_slot_still_waiting_for_its_copy_flushes_it_first() -> None:
    k, v = cache(16, seed=3)
    host = poisoned_host(8)
    copier = BlockCopier(k, v, host, flush_blocks=8)
    want = block(k, v, 2).clone()
    copier.begin()
    copier.offload_to_host([2], [4])
    copier.onboard_from_host([4], [11])  # in the same step, before any flush
    copier.end()
    assert torch.equal(block(k, v, 11), want)


def test_manager_flushes_held_offloads_at_the_next_step() -> None:
    layout = KvLayoutSpec(num_layers=LAYERS, block_size_tokens=TOKENS, num_kv_heads=HEADS, head_dim=DIM, dtype="float32")
    k, v = cache(16, seed=4)
    mgr = KvBlockManager(KvbmConfig(host_blocks=8, offload_flush_blocks=4), layout, k, v)
    assert mgr.host is not None and mgr.copier.flush_blocks == 1  # CPU: synchronous copies, no hold
    mgr.copier.flush_blocks = 4  # as on CUDA
    want = block(k, v, 0).clone()
    mgr.execute(TransferPlan(offloads=[OffloadOp(0, 0xA, None, HOST, 2)]))
    assert mgr.has_pending()  # the engine runs execute() before the next step for it
    mgr.execute(TransferPlan())
    assert not mgr.has_pending() and torch.equal(mgr.host.data[2], want)
    # A host hit on a block whose copy is still held reads the offloaded bytes.
    want = block(k, v, 1).clone()
    mgr.execute(TransferPlan(offloads=[OffloadOp(1, 0xB, None, HOST, 3)]))
    mgr.execute(TransferPlan(onboards=[OnboardOp(0xB, HOST, 3, 9)]))
    assert torch.equal(block(k, v, 9), want)


def test_one_onboard_call_for_host_slots_and_staged_rows() -> None:
    k, v = cache(16, seed=5)
    host = poisoned_host(8)
    copier = BlockCopier(k, v, host, flush_blocks=8)
    copier.begin()
    copier.offload_to_host([1, 2], [6, 3])  # held: the onboard below must see them
    staged = torch.randn((5, 2 * LAYERS, ELEMENTS), generator=torch.Generator().manual_seed(9))
    want = {10: block(k, v, 2).clone(), 11: block(k, v, 1).clone(), 12: staged[4], 13: staged[0]}
    copier.onboard_many([(host, [3, 6], [10, 11]), (staged, [4, 0], [12, 13])])
    copier.end()
    for b, data in want.items():
        assert torch.equal(block(k, v, b), data)


def test_a_write_of_a_slot_whose_copy_is_held_writes_the_offloaded_bytes(tmp_path: object) -> None:
    layout = KvLayoutSpec(num_layers=LAYERS, block_size_tokens=TOKENS, num_kv_heads=HEADS, head_dim=DIM, dtype="float32")
    k, v = cache(16, seed=6)
    mgr = KvBlockManager(KvbmConfig(host_blocks=8, disk_dir=str(tmp_path), disk_blocks=8), layout, k, v)
    mgr.copier.flush_blocks = 4
    assert mgr.disk is not None
    mgr.disk.start()
    want = block(k, v, 4).clone()
    mgr.execute(TransferPlan(offloads=[OffloadOp(4, 0xC, None, HOST, 5)]))
    assert mgr.copier.has_pending_offloads()
    mgr.execute(TransferPlan(writes=[WriteOp(0xC, None, 5)]))
    mgr.disk.stop()
    out = torch.empty_like(want)
    assert mgr.disk.read(0xC, out) and torch.equal(out, want)
