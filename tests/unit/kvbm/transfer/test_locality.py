"""The same-host decision for CUDA IPC (kvbm/transfer/locality.py, the agent's backend choice):
a host_id carries the GPU domain (namespaces, /dev/shm, the visible GPUs), so processes of one
machine that see different devices are not offered CUDA IPC; handles that still do not open
move the transfer to the next backend before any byte is sent. Fast, on the CPU; the
two-process version with real workers is tests/integration/test_transfer_same_host.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from dynamo.wire import KvLayoutSpec  # noqa: E402
from kvbm.transfer.agent import KvTransferAgent  # noqa: E402
from kvbm.transfer.cuda_ipc import CudaIpcBackend  # noqa: E402
from kvbm.transfer.host import HostBackend  # noqa: E402
from kvbm.transfer.layout import KvMemory  # noqa: E402
from kvbm.transfer.locality import DOMAIN_SEP, GpuDomain, local_host_id, machine_id, split_host_id  # noqa: E402

LAYOUT = KvLayoutSpec(num_layers=2, block_size_tokens=4, num_kv_heads=2, head_dim=8, dtype="float32")


def host_id_in_process(**env: str) -> str:
    """local_host_id() of a fresh interpreter with `env` added (CUDA not initialised)."""
    code = "from kvbm.transfer.locality import local_host_id; print(local_host_id())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip()


def test_processes_that_see_different_devices_get_different_host_ids() -> None:
    a, b, a_again = (host_id_in_process(CUDA_VISIBLE_DEVICES=d) for d in ("0", "1", "0"))
    assert split_host_id(a)[0] == split_host_id(b)[0] == machine_id(), "same machine"
    assert a != b, "different CUDA_VISIBLE_DEVICES: different GPU domain"
    assert a == a_again == host_id_in_process(CUDA_VISIBLE_DEVICES="0", UNRELATED="x")
    assert host_id_in_process(CUDA_VISIBLE_DEVICES="0", NVIDIA_VISIBLE_DEVICES="GPU-1") != a
    assert local_host_id().startswith(machine_id() + DOMAIN_SEP)


def test_the_domain_covers_namespaces_shared_memory_and_gpu_order() -> None:
    here = GpuDomain.current()
    assert here.pid_ns.startswith("pid:") and here.ipc_ns.startswith("ipc:")
    fingerprints = {here.fingerprint()}
    for change in ({"pid_ns": "pid:[1]"}, {"ipc_ns": "ipc:[1]"}, {"shm_dev": "0:99"}):
        fingerprints.add(dataclasses.replace(here, **change).fingerprint())
    two = GpuDomain(here.pid_ns, here.ipc_ns, here.shm_dev, ("GPU-a", "GPU-b"))
    swapped = GpuDomain(here.pid_ns, here.ipc_ns, here.shm_dev, ("GPU-b", "GPU-a"))
    fingerprints |= {two.fingerprint(), swapped.fingerprint()}
    assert len(fingerprints) == 6, "each input changes the domain; so does the GPUs' index order"


class StandIn(CudaIpcBackend):
    """CudaIpcBackend's choice rule on CPU memory; its handles never open (a GPU this process
    cannot see)."""

    def __init__(self) -> None:
        super().__init__()
        self.open_attempts = 0

    async def start(self, agent: KvTransferAgent) -> None:
        self._handles = b"stand-in"

    def can_reach(self, local, peer):  # type: ignore[no-untyped-def]
        return self.name in peer.backends and peer.host_id == local.host_id and bool(peer.cuda_ipc)

    def _open(self, k, v, peer):  # type: ignore[no-untyped-def, override]
        self.open_attempts += 1
        raise RuntimeError("CUDA error: invalid device context")


async def run_inline(fn):  # type: ignore[no-untyped-def]
    return await asyncio.to_thread(fn)


def memory(seed: int) -> KvMemory:
    g = torch.Generator().manual_seed(seed)
    shape = (8, LAYOUT.block_size_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    k = [torch.randn(shape, generator=g) for _ in range(LAYOUT.num_layers)]
    v = [torch.randn(shape, generator=g) for _ in range(LAYOUT.num_layers)]
    return KvMemory(k, v, LAYOUT, run_inline)


def agent(seed: int, host_id: str, ipc: StandIn | None = None) -> KvTransferAgent:
    return KvTransferAgent(LAYOUT, memory(seed), [ipc or StandIn(), HostBackend()], host_id=host_id)


MACHINE = machine_id()


async def test_same_machine_other_gpu_domain_picks_host_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    ipc = StandIn()
    async with agent(1, f"{MACHINE}{DOMAIN_SEP}aaaa", ipc) as src, agent(2, f"{MACHINE}{DOMAIN_SEP}bbbb") as dst:
        with caplog.at_level(logging.WARNING, logger="kvbm.transfer.agent"):
            assert src.choose_backend(dst.info).name == "host"
            landed = dst.expect("t", [5])
            assert (await src.send(dst.info, "t", [1], [5]))[1] == "host"
            await asyncio.wait_for(landed, 5)
        assert torch.equal(dst.memory.k[0][5], src.memory.k[0][1])  # type: ignore[union-attr]
        assert ipc.open_attempts == 0
        lines = [r.getMessage() for r in caplog.records if "not cuda-ipc" in r.getMessage()]
        assert len(lines) == 1, "logged once per peer"
        assert "GPU domain bbbb, here aaaa" in lines[0]


async def test_same_domain_is_offered_cuda_ipc_and_other_machines_or_old_peers_are_not() -> None:
    same = f"{MACHINE}{DOMAIN_SEP}aaaa"
    async with agent(1, same) as src, agent(2, same) as peer, agent(3, f"elsewhere/x{DOMAIN_SEP}aaaa") as far, \
            agent(4, MACHINE) as old:
        assert src.choose_backend(peer.info).name == "cuda-ipc"
        assert src.choose_backend(far.info).name == "host"
        assert src.choose_backend(old.info).name == "host", "a peer without a GPU domain: no CUDA IPC"


async def test_handles_that_do_not_open_fall_back_before_any_byte_is_sent(caplog: pytest.LogCaptureFixture) -> None:
    ipc = StandIn()
    same = f"{MACHINE}{DOMAIN_SEP}aaaa"
    async with agent(1, same, ipc) as src, agent(2, same) as dst:
        with caplog.at_level(logging.WARNING, logger="kvbm.transfer.agent"):
            for i, (s, d) in enumerate([(0, 3), (2, 6)]):
                landed = dst.expect(f"t{i}", [d])
                assert (await src.send(dst.info, f"t{i}", [s], [d]))[1] == "host"
                assert await asyncio.wait_for(landed, 5) > 0
                assert torch.equal(dst.memory.v[1][d], src.memory.v[1][s])  # type: ignore[union-attr]
        assert ipc.open_attempts == 1, "tried once; later transfers to that peer skip it"
        text = caplog.text
        assert "cuda-ipc unavailable" in text and "invalid device context" in text
        assert "could not open the peer's CUDA IPC handles" in text
        assert src.stats.by_backend == {"host": 2} and dst.stats.failed_transfers == 0
