"""The mocker's backend: no bytes move; the sender waits as long as the KV bytes would take
over a link of the given bandwidth (sped up like the mocker's engine), then notifies."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from dynamo.wire import FRAME_END, KvAgentInfo, TransferHeader
from kvbm.transfer.backends import TransferBackend
from kvbm.transfer.framing import header_bytes

if TYPE_CHECKING:
    from kvbm.transfer.agent import KvTransferAgent


class SimulatedBackend(TransferBackend):
    name = "simulated"

    def __init__(self, link_bytes_per_s: float, speedup_ratio: float = 1.0, latency_s: float = 0.0) -> None:
        if not link_bytes_per_s > 0:
            raise ValueError("link bandwidth must be positive")
        self.link_bytes_per_s = link_bytes_per_s
        self.speedup_ratio = speedup_ratio
        self.latency_s = latency_s

    def transfer_time_s(self, num_bytes: int) -> float:
        return (self.latency_s + num_bytes / self.link_bytes_per_s) / self.speedup_ratio

    async def send(
        self,
        agent: KvTransferAgent,
        peer: KvAgentInfo,
        transfer_id: str,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        writer: asyncio.StreamWriter,
    ) -> int:
        size = len(src_block_ids) * agent.block_bytes
        await asyncio.sleep(self.transfer_time_s(size))
        writer.write(header_bytes(TransferHeader(transfer_id, FRAME_END, len(src_block_ids), size)))
        return size
