"""Across hosts: NIXL (UCX/RDMA where present) one-sided WRITEs from the sender's registered
KV blocks into the receiver's, then a completion notice on the agent's TCP connection.

Written against nixl 1.5's Python API (nixl_agent: register_memory, get_agent_metadata,
add_remote_agent, get_xfer_descs, initialize_xfer, transfer, check_xfer_state); import-checked
here but not run: no RDMA hardware was available. Without the `nixl` package it raises a clear
error at start, and `--kv-transfer-backend auto` leaves it out."""

from __future__ import annotations

import asyncio
import importlib
import time
from typing import TYPE_CHECKING, Any

from dynamo.wire import FRAME_END, KvAgentInfo, TransferHeader
from kvbm.transfer.backends import TransferBackend
from kvbm.transfer.framing import header_bytes

if TYPE_CHECKING:
    from kvbm.transfer.agent import KvTransferAgent

_POLL_S = 50e-6  # NIXL reports completion only through check_xfer_state


def load_nixl() -> Any:
    """The nixl API module, or an ImportError that says what to install."""
    for name in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(
        "the nixl KV transfer backend needs the `nixl` package (pip install nixl-cu12 or "
        "nixl-cu13, matching your CUDA); use --kv-transfer-backend host or auto instead"
    )


def nixl_available() -> bool:
    try:
        load_nixl()
    except ImportError:
        return False
    return True


class NixlBackend(TransferBackend):
    name = "nixl"

    def __init__(self) -> None:
        self._api: Any = None
        self._agent: Any = None
        self._mem_type = "DRAM"
        self._regions: list[list[int]] = []
        self._per_block: list[int] = []  # bytes of one block in each registered tensor
        self._remote_names: dict[str, str] = {}

    async def start(self, agent: KvTransferAgent) -> None:
        self._api = load_nixl()
        memory = agent.memory
        if memory is None:
            raise RuntimeError("the nixl KV transfer backend needs KV memory to register")
        tensors = [*memory.k, *memory.v]
        self._mem_type = "VRAM" if tensors[0].device.type == "cuda" else "DRAM"
        self._agent = self._api.nixl_agent(agent.agent_id, self._api.nixl_agent_config(backends=["UCX"]))
        await asyncio.to_thread(self._agent.register_memory, tensors)
        self._regions = [
            [t.data_ptr(), t.numel() * t.element_size(), t.device.index or 0] for t in tensors
        ]
        self._per_block = [t[0].numel() * t.element_size() for t in tensors]

    async def close(self) -> None:
        self._agent = None
        self._remote_names.clear()

    def advertise(self) -> dict[str, object]:
        return {"nixl_metadata": self._agent.get_agent_metadata(), "nixl_regions": self._regions}

    def can_reach(self, local: KvAgentInfo, peer: KvAgentInfo) -> bool:
        return self.name in peer.backends and bool(peer.nixl_metadata)

    def _descs(self, regions: list[list[int]], block_ids: list[int]) -> Any:
        rows = []
        for (base, _, device), per_block in zip(regions, self._per_block):
            rows.extend((base + b * per_block, per_block, device) for b in block_ids)
        return self._agent.get_xfer_descs(rows, self._mem_type)

    def _write(self, remote: str, peer: KvAgentInfo, src: list[int], dst: list[int], transfer_id: str) -> None:
        """On a worker thread: post the WRITE and wait for it (NIXL offers only polling)."""
        handle = self._agent.initialize_xfer(
            "WRITE", self._descs(self._regions, src), self._descs(peer.nixl_regions, dst),
            remote, transfer_id.encode(),
        )
        try:
            state = self._agent.transfer(handle)
            while state == "PROC":
                time.sleep(_POLL_S)
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise RuntimeError(f"NIXL transfer {transfer_id} ended in state {state}")
        finally:
            self._agent.release_xfer_handle(handle)

    async def send(
        self,
        agent: KvTransferAgent,
        peer: KvAgentInfo,
        transfer_id: str,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        writer: asyncio.StreamWriter,
    ) -> int:
        remote = self._remote_names.get(peer.agent_id)
        if remote is None:
            remote = self._remote_names[peer.agent_id] = self._agent.add_remote_agent(peer.nixl_metadata)
        await asyncio.to_thread(self._write, remote, peer, src_block_ids, dst_block_ids, transfer_id)
        size = len(src_block_ids) * agent.block_bytes
        writer.write(header_bytes(TransferHeader(transfer_id, FRAME_END, len(src_block_ids), size)))
        return size
