"""Builds a worker's transfer agent from the --kv-transfer-backend choice: `auto` offers every
backend this process can run (same-process, CUDA IPC on GPUs, NIXL when installed, host always) and each
transfer takes the fastest one both sides share; a named backend is the only one offered."""

from __future__ import annotations

import logging

from dynamo.wire import KvLayoutSpec
from kvbm.transfer.agent import KvTransferAgent
from kvbm.transfer.backends import BACKEND_CHOICES, TransferBackend
from kvbm.transfer.layout import KvMemory

log = logging.getLogger(__name__)


def make_backends(choice: str, memory: KvMemory | None) -> list[TransferBackend]:
    from kvbm.transfer.host import HostBackend
    from kvbm.transfer.local import SameProcessBackend

    if choice not in BACKEND_CHOICES:
        raise ValueError(f"unknown KV transfer backend {choice!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    on_gpu = memory is not None and memory.k[0].device.type == "cuda"
    if choice == "host":
        return [HostBackend()]
    if choice == "same-process":
        if memory is None:
            raise ValueError("--kv-transfer-backend same-process needs an engine with KV tensors")
        return [SameProcessBackend()]
    if choice == "cuda-ipc":
        if not on_gpu:
            raise ValueError("--kv-transfer-backend cuda-ipc needs the KV cache on a GPU")
        from kvbm.transfer.cuda_ipc import CudaIpcBackend

        return [CudaIpcBackend()]
    if choice == "nixl":
        from kvbm.transfer.nixl import NixlBackend, load_nixl

        load_nixl()  # the clear ImportError now, not at the first transfer
        return [NixlBackend()]
    # Peers in this very process (prefill and decode workers of one dynamo.serve) first.
    backends: list[TransferBackend] = [SameProcessBackend()] if memory is not None else []
    if on_gpu:
        from kvbm.transfer.cuda_ipc import CudaIpcBackend

        backends.append(CudaIpcBackend())
        from kvbm.transfer.nixl import NixlBackend, nixl_available

        if nixl_available():
            backends.append(NixlBackend())
    backends.append(HostBackend())
    return backends


async def make_agent(
    choice: str,
    layout: KvLayoutSpec,
    memory: KvMemory | None,
    host: str | None = "127.0.0.1",
    simulated_link_bytes_per_s: float | None = None,
    speedup_ratio: float = 1.0,
) -> KvTransferAgent:
    """A started agent. Engines without KV tensors (the mocker) get the simulated backend."""
    if memory is None:
        from kvbm.transfer.simulated import SimulatedBackend

        backends: list[TransferBackend] = [SimulatedBackend(simulated_link_bytes_per_s or 25e9, speedup_ratio)]
    else:
        backends = make_backends(choice, memory)
    agent = KvTransferAgent(layout, memory, backends, host=host)
    try:
        await agent.start()
    except Exception:
        if choice != "auto" or len(backends) == 1:
            await agent.close()
            raise
        # auto: a backend that cannot start here (no NIXL plugin, no IPC) is left out.
        await agent.close()
        log.warning("a KV transfer backend failed to start; falling back to host", exc_info=True)
        from kvbm.transfer.host import HostBackend

        agent = KvTransferAgent(layout, memory, [HostBackend()], host=host)
        await agent.start()
    return agent
