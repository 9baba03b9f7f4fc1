"""Same-host GPUs: the receiver exports CUDA IPC handles of its K and V tensors once; the
sender opens them (cached per peer) and copies blocks GPU to GPU (gather, one peer copy over
NVLink, scatter on the target GPU), with no bounce through host memory, then notifies.

Both processes must see the same GPUs under the same indices (do not narrow
CUDA_VISIBLE_DEVICES per worker; pick the GPU with --device cuda:N instead)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import torch

from dynamo.wire import KvAgentInfo, TransferHeader
from kvbm.transfer.backends import TransferBackend
from kvbm.transfer.framing import FRAME_DONE, header_bytes
from kvbm.transfer.torch_ops import copy_blocks, export_handles, open_handles

if TYPE_CHECKING:
    from kvbm.transfer.agent import KvTransferAgent


class CudaIpcBackend(TransferBackend):
    name = "cuda-ipc"

    def __init__(self) -> None:
        self._peers: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
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
        peer_kv = self._peers.get(peer.agent_id)
        if peer_kv is None:
            tensors = await memory.run(lambda: open_handles(peer.cuda_ipc))
            half = len(tensors) // 2
            peer_kv = self._peers[peer.agent_id] = (tensors[:half], tensors[half:])
        dst_k, dst_v = peer_kv
        await memory.run(lambda: copy_blocks(memory.k, memory.v, src_block_ids, dst_k, dst_v, dst_block_ids))
        size = len(src_block_ids) * agent.block_bytes
        writer.write(header_bytes(TransferHeader(transfer_id, FRAME_DONE, len(src_block_ids), size)))
        return size
