"""The fused offload/onboard path of kvbm.copy_engine.BlockCopier on a GPU (skipped without CUDA
and Triton, as in CI): blocks gathered in one launch into the staging ring, their device-to-host
copies coalesced across steps, land bit for bit in poisoned pinned slots; onboarding them back
through one scatter launch reproduces the cache; batches past the ring take the per-layer path."""

from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from kvbm.copy_engine import BlockCopier  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_coalesced_offload_and_onboard_are_bit_exact(dtype: torch.dtype) -> None:
    rng = random.Random(5)
    layers, shape, blocks = 4, (16, 2, 64), 96
    g = torch.Generator(device="cuda").manual_seed(1)
    k = [torch.randn((blocks, *shape), generator=g, device="cuda").to(dtype) for _ in range(layers)]
    v = [torch.randn((blocks, *shape), generator=g, device="cuda").to(dtype) for _ in range(layers)]
    elements = shape[0] * shape[1] * shape[2]
    row_bytes = 2 * layers * elements * k[0].element_size()
    host = torch.full((48, 2 * layers, elements), float("nan"), dtype=dtype, pin_memory=True)
    copier = BlockCopier(k, v, host, flush_blocks=5, staging_bytes=8 * row_bytes)
    assert copier.fused and copier.staging_rows == 8
    original = {b: torch.stack([t[b].reshape(-1) for pair in zip(k, v) for t in pair]).cpu() for b in range(48)}
    todo = list(range(48))
    rng.shuffle(todo)
    slots = list(range(48))
    rng.shuffle(slots)
    where: dict[int, int] = {}
    for size in [1, 3, 2, 7, 12, 1, 1, 4, 2, 6, 9]:  # wraps the ring, flushes mid-way, 12 and 9 overflow it
        batch, todo = todo[:size], todo[size:]
        dest = [slots.pop() for _ in batch]
        copier.begin()
        copier.offload_to_host(batch, dest)
        copier.end()
        where.update(zip(batch, dest))
    copier.drain()
    torch.cuda.synchronize()
    for b, slot in where.items():
        assert torch.equal(host[slot], original[b]), (b, slot)
    targets = list(range(48, 48 + len(where)))
    order = sorted(where)
    for part in (slice(0, 5), slice(5, None)):  # one batch the staging holds, one it does not
        copier.begin()
        copier.onboard_from_host([where[b] for b in order[part]], targets[part])
        copier.end()
    torch.cuda.synchronize()
    for b, t in zip(order, targets):
        got = torch.stack([x[t].reshape(-1) for pair in zip(k, v) for x in pair]).cpu()
        assert torch.equal(got, original[b])
    # Host slots and rows of another pinned buffer (staged disk reads) in one scatter launch.
    staged = torch.randn((3, 2 * layers, elements)).to(dtype).pin_memory()
    copier.begin()
    copier.onboard_many([(host, [where[order[0]], where[order[1]]], [90, 91]), (staged, [2, 0], [92, 93])])
    copier.end()
    torch.cuda.synchronize()
    want = {90: original[order[0]], 91: original[order[1]], 92: staged[2], 93: staged[0]}
    for t, data in want.items():
        got = torch.stack([x[t].reshape(-1) for pair in zip(k, v) for x in pair]).cpu()
        assert torch.equal(got, data)


def test_no_copy_compiles_a_kernel_after_the_copier_is_made() -> None:
    """The copy kernel is compiled when the copier is made (warm) and not specialised on the
    block count, so offloads and onboards of any size never compile on a serving step."""
    from kvbm.transfer.torch_ops import _kernels

    kernel = _kernels().copy_blocks

    def compiled() -> int:  # Triton keeps its compiled variants first in each device's cache
        return sum(len(cache[0]) for cache in kernel.device_caches.values())

    layers, shape, blocks = 2, (16, 2, 64), 64
    k = [torch.randn((blocks, *shape), device="cuda") for _ in range(layers)]
    v = [torch.randn((blocks, *shape), device="cuda") for _ in range(layers)]
    host = torch.zeros((64, 2 * layers, shape[0] * shape[1] * shape[2]), pin_memory=True)
    copier = BlockCopier(k, v, host, staging_bytes=64 * 2 * layers * shape[0] * shape[1] * shape[2] * 4)
    made = compiled()
    assert made >= 1
    slot = 0
    for n in (1, 5, 16, 33):
        copier.begin()
        copier.offload_to_host(list(range(n)), list(range(slot, slot + n)))
        copier.end()
        copier.begin()
        copier.onboard_from_host(list(range(slot, slot + n)), list(range(blocks - n, blocks)))
        copier.end()
        slot = (slot + n) % 16
    copier.drain()
    assert compiled() == made
