"""The backend interface of the transfer agent and backend selection: a backend moves a batch
of blocks to a peer and then tells the peer (over the agent's connection) that they landed."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from dynamo.wire import KvAgentInfo

if TYPE_CHECKING:
    from kvbm.transfer.agent import KvTransferAgent

BACKEND_CHOICES = ("auto", "host", "cuda-ipc", "nixl", "same-process")
# Fastest first: auto takes the first one both sides have that can reach the peer (same-process
# only within one process, cuda-ipc only within one host's GPU domain: kvbm/transfer/locality.py).
PREFERENCE = ("same-process", "cuda-ipc", "nixl", "host", "simulated")


class BackendUnavailable(Exception):
    """Raised by a backend's `send` before it wrote anything to the connection: this peer
    cannot be reached this way after all (e.g. its CUDA IPC handles do not open here). The
    agent remembers it for the peer and sends with the next backend instead."""


class TransferBackend(ABC):
    name: str = "backend"

    async def start(self, agent: KvTransferAgent) -> None:
        return None

    async def close(self) -> None:
        return None

    def advertise(self) -> dict[str, object]:
        """Fields of this agent's KvAgentInfo that peers need to reach it with this backend."""
        return {}

    def can_reach(self, local: KvAgentInfo, peer: KvAgentInfo) -> bool:
        return self.name in peer.backends

    @abstractmethod
    async def send(
        self,
        agent: KvTransferAgent,
        peer: KvAgentInfo,
        transfer_id: str,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        writer: asyncio.StreamWriter,
    ) -> int:
        """Move the blocks and write the frame that completes the transfer; returns KV bytes."""
