"""Same process: the prefill and decode engines of one `dynamo.serve` (its
--num-prefill-workers) live in one process, so the sender copies its blocks straight into the
receiver's KV tensors, found in a process-local registry of started agents' memory. No CUDA
IPC (the driver does not open a process's own handles) and no host staging:

- both caches on one GPU: one launch of the project's block-copy kernel (`BlockCopier`,
  kvbm/transfer/torch_ops.py), every (block, layer) piece from its source block to its target
  block in one pass;
- on two GPUs of the process: the same kernel on the sender's GPU, pushing over peer access
  (in one process the receiver's memory is plain device memory, so pushing works, unlike CUDA
  IPC, which must pull); without peer access or Triton: gather, one peer copy, scatter;
- on the CPU (CI): the same `copy_blocks`, as slices or index copies.

The copy runs on the sender's engine thread (`KvMemory.run`), ordered after the prefill that
wrote the blocks; the decode engine reads the target blocks only after the agent's completion
notice, which is sent once the copy has finished. Offered only to peers whose advertised
process token (kvbm/transfer/locality.process_token) equals this process's and whose agent is
registered here; a peer that closed in the meantime gets BackendUnavailable (the next backend)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from dynamo.wire import FRAME_END, KvAgentInfo, TransferHeader
from kvbm.transfer.backends import BackendUnavailable, TransferBackend
from kvbm.transfer.framing import header_bytes
from kvbm.transfer.layout import KvMemory
from kvbm.transfer.locality import process_token
from kvbm.transfer.torch_ops import BlockCopier, copy_blocks

if TYPE_CHECKING:
    from kvbm.transfer.agent import KvTransferAgent

# agent_id -> the KV memory of every agent started in this process with this backend.
_MEMORY: dict[str, KvMemory] = {}


def registered(agent_id: str) -> KvMemory | None:
    return _MEMORY.get(agent_id)


class SameProcessBackend(TransferBackend):
    name = "same-process"

    def __init__(self) -> None:
        self._token = ""
        self._agent_id = ""
        self._copiers: dict[str, BlockCopier | None] = {}  # per peer; None: no direct kernel

    async def start(self, agent: KvTransferAgent) -> None:
        if agent.memory is None:
            raise RuntimeError("the same-process KV transfer backend needs KV memory")
        self._token = process_token()
        self._agent_id = agent.agent_id
        _MEMORY[agent.agent_id] = agent.memory

    async def close(self) -> None:
        if self._agent_id:
            _MEMORY.pop(self._agent_id, None)
        self._copiers.clear()

    def advertise(self) -> dict[str, object]:
        return {"process_id": self._token}

    def can_reach(self, local: KvAgentInfo, peer: KvAgentInfo) -> bool:
        return (
            self.name in peer.backends and bool(peer.process_id) and peer.process_id == local.process_id
            and peer.agent_id in _MEMORY
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
        target = _MEMORY.get(peer.agent_id)
        if memory is None or target is None:  # nothing written yet: the next backend
            raise BackendUnavailable("the peer's transfer agent is no longer registered in this process")
        if peer.agent_id in self._copiers:
            copier = self._copiers[peer.agent_id]
        else:
            copier = await memory.run(lambda: _copier(memory, target))
            self._copiers[peer.agent_id] = copier
        await memory.run(
            lambda: copy_blocks(memory.k, memory.v, src_block_ids, target.k, target.v, dst_block_ids, copier)
        )
        size = len(src_block_ids) * agent.block_bytes
        writer.write(header_bytes(TransferHeader(transfer_id, FRAME_END, len(src_block_ids), size)))
        return size


def _copier(src: KvMemory, dst: KvMemory) -> BlockCopier | None:
    """The direct kernel for this pair of caches (pushing from the sender's GPU), or None for
    copy_blocks' fallbacks (CPU tensors, no Triton, no peer access)."""
    if BlockCopier.reason_unsupported(src.k, src.v, dst.k, dst.v):
        return None
    return BlockCopier(src.k, src.v, dst.k, dst.v)
