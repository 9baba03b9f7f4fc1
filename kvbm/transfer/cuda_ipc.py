"""Same-host GPUs: the receiver exports CUDA IPC handles of its K and V tensors once; the
sender opens them (cached per peer) and copies blocks GPU to GPU with no bounce through host
memory, then notifies: one Triton kernel reads every source block over NVLink and writes it
straight into its target block (`BlockCopier`); without Triton, gather / peer copy / scatter.

The kernel runs on the receiver's GPU (it pulls): torch maps another process's memory only
for the GPU that memory lives on, so a kernel on the sender's GPU cannot touch it (measured:
an illegal address), while the receiver's GPU reaches the sender's own memory through plain
peer access. Pulling measured as fast as pushing (issue 4's table in benchmarks/RESULTS.md).

Both processes must see the same GPUs under the same indices (do not narrow
CUDA_VISIBLE_DEVICES per worker; pick the GPU with --device cuda:N instead) and share the PID
and IPC namespaces: `can_reach` requires equal host_ids, which encode all of that
(locality.py), so containers that share only a hostname and boot id (host networking) get
another backend. Should a peer's handles still fail to open, `send` raises BackendUnavailable
before writing anything and the agent moves this and later transfers to the next backend."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dynamo.wire import FRAME_END, KvAgentInfo, TransferHeader
from kvbm.transfer.backends import BackendUnavailable, TransferBackend
from kvbm.transfer.framing import header_bytes
from kvbm.transfer.torch_ops import BlockCopier, copy_blocks, export_handles, open_handles

if TYPE_CHECKING:
    from kvbm.transfer.agent import KvTransferAgent

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Peer:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    copier: BlockCopier | None  # None: no direct kernel for this pair, the staged path


class CudaIpcBackend(TransferBackend):
    name = "cuda-ipc"

    def __init__(self) -> None:
        self._peers: dict[str, _Peer] = {}
        self._handles = b""

    async def start(self, agent: KvTransferAgent) -> None:
        memory = agent.memory
        if memory is None or memory.k[0].device.type != "cuda":
            raise RuntimeError("the cuda-ipc KV transfer backend needs the KV cache on a GPU")
        self._handles = await memory.run(lambda: export_handles([*memory.k, *memory.v]))

    async def close(self) -> None:
        self._peers.clear()

    def advertise(self) -> dict[str, object]:
        return {"cuda_ipc": self._handles}

    def can_reach(self, local: KvAgentInfo, peer: KvAgentInfo) -> bool:
        return (
            self.name in peer.backends and peer.host_id == local.host_id
            and peer.device.startswith("cuda") and bool(peer.cuda_ipc)
        )

    async def send(
        self,
        agent: KvTransferAgent,
        peer: KvAgentInfo,
        transfer_id: str,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        writer: asyncio.StreamWriter,
    ) -> int:
        memory = agent.memory
        assert memory is not None
        entry = self._peers.get(peer.agent_id)
        if entry is None:
            try:
                entry = await memory.run(lambda: self._open(memory.k, memory.v, peer))
            except Exception as exc:  # the driver refused the handles: nothing sent yet
                raise BackendUnavailable(f"the peer's CUDA IPC handles do not open here: {exc}") from exc
            self._peers[peer.agent_id] = entry
        target = entry
        await memory.run(
            lambda: copy_blocks(memory.k, memory.v, src_block_ids, target.k, target.v, dst_block_ids, target.copier)
        )
        size = len(src_block_ids) * agent.block_bytes
        writer.write(header_bytes(TransferHeader(transfer_id, FRAME_END, len(src_block_ids), size)))
        return size

    @staticmethod
    def _open(k: list[torch.Tensor], v: list[torch.Tensor], peer: KvAgentInfo) -> _Peer:
        """Map the peer's KV (once per peer) and build the copy kernel's tables for the pair."""
        tensors = open_handles(peer.cuda_ipc)
        half = len(tensors) // 2
        dst_k, dst_v = tensors[:half], tensors[half:]
        reason = BlockCopier.reason_unsupported(k, v, dst_k, dst_v)
        if reason:
            log.warning("cuda-ipc to %s: gather / peer copy / scatter, not the direct kernel: %s", peer.agent_id, reason)
            return _Peer(dst_k, dst_v, None)
        return _Peer(dst_k, dst_v, BlockCopier(k, v, dst_k, dst_v, launch_device=dst_k[0].device))
