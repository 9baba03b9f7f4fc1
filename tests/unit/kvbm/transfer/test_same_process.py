"""The same-process backend (kvbm/transfer/local.py): agents of one process copy blocks
straight into each other's KV tensors (no host staging, no CUDA IPC), chosen only when the
peer's advertised process token is this process's and its agent is registered here; any other
peer (another process, a closed agent, an old peer without a token) gets the next backend.
CPU tensors; the end-to-end version through the prefill/decode handlers is in
tests/unit/workers/disagg/test_disagg.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import msgspec
import pytest

torch = pytest.importorskip("torch")

from dynamo.wire import KvLayoutSpec  # noqa: E402
from kvbm.transfer import local  # noqa: E402
from kvbm.transfer.agent import KvTransferAgent  # noqa: E402
from kvbm.transfer.factory import make_agent, make_backends  # noqa: E402
from kvbm.transfer.host import HostBackend  # noqa: E402
from kvbm.transfer.layout import KvMemory  # noqa: E402
from kvbm.transfer.locality import process_token  # noqa: E402

LAYOUT = KvLayoutSpec(num_layers=3, block_size_tokens=4, num_kv_heads=2, head_dim=8, dtype="float32")


async def run_inline(fn):  # type: ignore[no-untyped-def]
    return fn()


def memory(seed: int, num_blocks: int = 12) -> KvMemory:
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, LAYOUT.block_size_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    k = [torch.randn(shape, generator=g) for _ in range(LAYOUT.num_layers)]
    v = [torch.randn(shape, generator=g) for _ in range(LAYOUT.num_layers)]
    return KvMemory(k, v, LAYOUT, run_inline)


@contextlib.asynccontextmanager
async def started(seed: int) -> AsyncIterator[KvTransferAgent]:
    agent = await make_agent("auto", LAYOUT, memory(seed), host="127.0.0.1")  # started already
    try:
        yield agent
    finally:
        await agent.close()


async def test_auto_picks_same_process_and_moves_the_blocks() -> None:
    assert [b.name for b in make_backends("auto", memory(0))][0] == "same-process"
    async with started(1) as src, \
            started(2) as dst:
        assert src.info.process_id == dst.info.process_id == process_token()
        assert src.choose_backend(dst.info).name == "same-process"
        before = [t.clone() for t in (*dst.memory.k, *dst.memory.v)]  # type: ignore[union-attr]
        src_ids, dst_ids = [3, 4, 5, 9, 0], [7, 8, 9, 1, 11]  # a run and scattered ids
        landed = dst.expect("t", dst_ids)
        num_bytes, backend = await src.send(dst.info, "t", src_ids, dst_ids)
        assert backend == "same-process" and await asyncio.wait_for(landed, 5) == num_bytes
        assert num_bytes == len(src_ids) * src.block_bytes
        for side in ("k", "v"):
            for s_layer, d_layer, old in zip(getattr(src.memory, side), getattr(dst.memory, side),
                                             before if side == "k" else before[LAYOUT.num_layers:]):
                assert torch.equal(d_layer[dst_ids], s_layer[src_ids])
                untouched = [b for b in range(12) if b not in dst_ids]
                assert torch.equal(d_layer[untouched], old[untouched]), "only the target blocks are written"
        assert src.stats.by_backend == {"same-process": 1} and dst.stats.received_transfers == 1
        assert src.buffer_bytes == dst.buffer_bytes == 0, "no staging buffer"
    assert local.registered(src.agent_id) is None and local.registered(dst.agent_id) is None


async def test_only_peers_of_this_process_get_it() -> None:
    async with started(1) as src, \
            started(2) as dst, \
            KvTransferAgent(LAYOUT, memory(3), [HostBackend()]) as host_only:
        other = msgspec.structs.replace(dst.info, process_id=dst.info.process_id.replace("pid:", "pid:9"))
        assert src.choose_backend(other).name == "host", "another process's token"
        assert src.choose_backend(msgspec.structs.replace(dst.info, process_id="")).name == "host", "an old peer"
        assert src.choose_backend(host_only.info).name == "host", "a peer that does not offer it"
        closed = dst.info
    assert src.choose_backend(closed).name == "host", "a peer whose agent closed is no longer registered"
    # Another interpreter on this machine: same host id for CUDA IPC purposes, other process.
    code = "from kvbm.transfer.locality import process_token; print(process_token())"
    theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                            env={**os.environ}).stdout.strip()
    assert theirs and theirs != process_token() and theirs.split("|pid:")[0] == process_token().split("|pid:")[0]


async def test_a_peer_closed_mid_choice_falls_back_before_a_byte_moves() -> None:
    async with started(1) as src, \
            started(2) as dst:
        assert src.choose_backend(dst.info).name == "same-process"
        # Registry entry gone between the choice and the send (a worker stopping): the
        # backend refuses before writing, the agent sends the same transfer over host.
        saved = local._MEMORY.pop(dst.agent_id)
        real_can_reach = local.SameProcessBackend.can_reach
        try:
            local.SameProcessBackend.can_reach = lambda self, a, b: True  # type: ignore[method-assign]
            landed = dst.expect("t", [2])
            assert (await src.send(dst.info, "t", [6], [2]))[1] == "host"
            await asyncio.wait_for(landed, 5)
        finally:
            local.SameProcessBackend.can_reach = real_can_reach  # type: ignore[method-assign]
            local._MEMORY[dst.agent_id] = saved
        assert torch.equal(dst.memory.k[2][2], src.memory.k[2][6])  # type: ignore[union-attr]


def test_named_backend() -> None:
    assert [b.name for b in make_backends("same-process", memory(0))] == ["same-process"]
    with pytest.raises(ValueError, match="KV tensors"):
        make_backends("same-process", None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
async def test_on_one_gpu_the_block_copy_kernel_moves_the_blocks(dtype: torch.dtype) -> None:
    """Both caches on one GPU (two engines of one process sharing it): the direct kernel, the
    blocks equal bit for bit, nothing else written."""
    layout = KvLayoutSpec(num_layers=4, block_size_tokens=16, num_kv_heads=8, head_dim=64,
                          dtype=str(dtype).removeprefix("torch."))
    shape = (64, 16, 8, 64)

    def cache(seed: int) -> KvMemory:
        g = torch.Generator(device="cuda").manual_seed(seed)
        k = [torch.randn(shape, generator=g, device="cuda").to(dtype) for _ in range(4)]
        v = [torch.randn(shape, generator=g, device="cuda").to(dtype) for _ in range(4)]
        return KvMemory(k, v, layout, run_inline)

    src = await make_agent("auto", layout, cache(1), host="127.0.0.1")
    dst = await make_agent("auto", layout, cache(2), host="127.0.0.1")
    try:
        before = [t.clone() for t in (*dst.memory.k, *dst.memory.v)]  # type: ignore[union-attr]
        src_ids, dst_ids = list(range(10, 40)) + [3, 63], list(range(0, 30)) + [50, 40]
        landed = dst.expect("t", dst_ids)
        assert (await src.send(dst.info, "t", src_ids, dst_ids))[1] == "same-process"
        await asyncio.wait_for(landed, 10)
        copier = src.backends["same-process"]._copiers[dst.agent_id]  # type: ignore[attr-defined]
        assert copier is not None, "the direct kernel, not a fallback"
        untouched = [b for b in range(64) if b not in dst_ids]
        for i, (s, d) in enumerate(zip((*src.memory.k, *src.memory.v), (*dst.memory.k, *dst.memory.v))):  # type: ignore[union-attr]
            assert torch.equal(d[dst_ids], s[src_ids])
            assert torch.equal(d[untouched], before[i][untouched])
    finally:
        await src.close()
        await dst.close()
