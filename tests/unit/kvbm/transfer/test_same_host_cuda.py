"""The same-host decision on a real GPU (skipped without CUDA): two processes on one machine and
one GPU. In one PID namespace they get CUDA IPC; a sender in a PID namespace of its own (as a
container with host networking has: same hostname and boot id) gets host transfer, logged; and
with the old rule forced (its host_id made equal), CUDA IPC is tried and the transfer still
lands. The receiver runs in the test process, the sender in a subprocess (the code in SENDER,
run with `python -c`). CI has no GPU: these run only where CUDA is."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import msgspec  # noqa: E402

from dynamo.wire import KvAgentInfo, KvLayoutSpec  # noqa: E402
from kvbm.transfer.factory import make_agent  # noqa: E402
from kvbm.transfer.layout import KvMemory  # noqa: E402

ROOT = Path(__file__).resolve().parents[4]
LAYOUT = KvLayoutSpec(num_layers=2, block_size_tokens=16, num_kv_heads=8, head_dim=128, dtype="float16")
BLOCKS = 32

SENDER = textwrap.dedent('''
    import asyncio, sys, msgspec, torch
    from dynamo.wire import KvAgentInfo, KvLayoutSpec
    from kvbm.transfer.factory import make_agent
    from kvbm.transfer.layout import KvMemory

    async def main():
        peer = msgspec.msgpack.decode(bytes.fromhex(sys.argv[1]), type=KvAgentInfo)
        force_host_id = sys.argv[2] if len(sys.argv) > 2 else None
        layout = peer.layout
        g = torch.Generator(device="cuda").manual_seed(7)
        shape = (32, layout.block_size_tokens, layout.num_kv_heads, layout.head_dim)
        k = [torch.randn(shape, generator=g, device="cuda", dtype=torch.float16) for _ in range(layout.num_layers)]
        v = [torch.randn(shape, generator=g, device="cuda", dtype=torch.float16) for _ in range(layout.num_layers)]
        async def run(fn):
            return fn()
        agent = await make_agent("auto", layout, KvMemory(k, v, layout, run), host="127.0.0.1")
        if force_host_id:  # the old rule: same hostname and boot id is enough
            agent.host_id = force_host_id
            agent._info = msgspec.structs.replace(agent.info, host_id=force_host_id)
        try:
            _, backend = await agent.send(peer, "t", [1, 5, 9], [2, 3, 4])
            print("BACKEND", backend, agent.host_id, flush=True)
        finally:
            await agent.close()

    asyncio.run(main())
''')


def expected_blocks() -> tuple[list, list]:
    g = torch.Generator(device="cuda").manual_seed(7)
    shape = (BLOCKS, LAYOUT.block_size_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    k = [torch.randn(shape, generator=g, device="cuda", dtype=torch.float16) for _ in range(LAYOUT.num_layers)]
    v = [torch.randn(shape, generator=g, device="cuda", dtype=torch.float16) for _ in range(LAYOUT.num_layers)]
    return k, v


async def run_inline(fn):  # type: ignore[no-untyped-def]
    return fn()


async def transfer(prefix: list[str], force_same_host_id: bool = False) -> tuple[str, str, str]:
    """Receive three blocks from a sender started with `prefix` (e.g. unshare); (backend, the
    sender's host id, its stderr)."""
    shape = (BLOCKS, LAYOUT.block_size_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    k = [torch.zeros(shape, device="cuda", dtype=torch.float16) for _ in range(LAYOUT.num_layers)]
    v = [torch.zeros(shape, device="cuda", dtype=torch.float16) for _ in range(LAYOUT.num_layers)]
    agent = await make_agent("auto", LAYOUT, KvMemory(k, v, LAYOUT, run_inline), host="127.0.0.1")
    try:
        assert "cuda-ipc" in agent.info.backends
        landed = agent.expect("t", [2, 3, 4])
        args = [msgspec.msgpack.encode(agent.info).hex()] + ([agent.host_id] if force_same_host_id else [])
        proc = await asyncio.create_subprocess_exec(
            *prefix, sys.executable, "-c", SENDER, *args, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()[-3000:]
        await asyncio.wait_for(landed, 30)
        torch.cuda.synchronize()
        ek, ev = expected_blocks()
        for layer in range(LAYOUT.num_layers):
            assert torch.equal(k[layer][[2, 3, 4]], ek[layer][[1, 5, 9]])
            assert torch.equal(v[layer][[2, 3, 4]], ev[layer][[1, 5, 9]])
        line = next(x for x in out.decode().splitlines() if x.startswith("BACKEND"))
        _, backend, host_id = line.split()
        return backend, host_id, err.decode()
    finally:
        await agent.close()


async def test_one_pid_namespace_gets_cuda_ipc() -> None:
    backend, _, _ = await transfer([])
    assert backend == "cuda-ipc"


def _unshare() -> list[str]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a PID namespace of its own")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid refused here: {probe.stderr.decode().strip()}")
    return ["unshare", "--pid", "--fork", "--mount-proc"]


async def test_a_sender_in_another_pid_namespace_picks_host_and_says_why() -> None:
    backend, _, err = await transfer(_unshare())
    assert backend == "host"
    assert "uses host, not cuda-ipc" in err


async def test_with_the_old_rule_cuda_ipc_is_tried_and_the_transfer_still_lands() -> None:
    """Forcing equal host_ids (the old hostname + boot id rule) makes the sender try CUDA IPC
    across PID namespaces. Whatever the driver does with that, the transfer lands: either the
    handles open, or the fallback moves it to host before any byte is sent. Measured on an
    H100 (driver 580, Firecracker VM, 2026-12-06): the handles opened, backend cuda-ipc, data
    correct; the other two tests passed there too."""
    backend, _, err = await transfer(_unshare(), force_same_host_id=True)
    print(f"old rule across PID namespaces: backend {backend}; log: {err.strip()[-500:]}")
    assert backend in ("cuda-ipc", "host")
    if backend == "host":
        assert "cuda-ipc unavailable" in err
