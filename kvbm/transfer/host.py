"""The portable backend: blocks gathered into one contiguous host buffer (pinned when the KV
is on a GPU) and streamed over the agent's TCP connection in large writes; the receiver
scatters them into its blocks. Chosen over chunked request-plane responses: no broker hop,
no 1 MiB NATS payload limit, one length-prefixed stream per transfer."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import torch

from dynamo.wire import FRAME_DATA, KvAgentInfo, TransferHeader
from kvbm.transfer.backends import TransferBackend
from kvbm.transfer.framing import header_bytes
from kvbm.transfer.torch_ops import buffer_shape, gather_blocks

if TYPE_CHECKING:
    from kvbm.transfer.agent import KvTransferAgent

SEND_CHUNK_BYTES = 16 << 20  # per write + drain: bounds the transport's own copy of the data


class HostBackend(TransferBackend):
    name = "host"

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
        if memory is None:
            raise RuntimeError("the host backend needs KV memory to send from")
        size = len(src_block_ids) * agent.block_bytes
        agent.buffer_bytes += size
        try:

            def gather() -> torch.Tensor:
                k = memory.k
                if k[0].device.type == "cpu":
                    return gather_blocks(k, memory.v, src_block_ids)
                out = torch.empty(buffer_shape(k, len(src_block_ids)), dtype=k[0].dtype, pin_memory=True)
                gather_blocks(k, memory.v, src_block_ids, out=out)
                torch.cuda.current_stream(k[0].device).synchronize()
                return out

            buffer = await memory.run(gather)
            writer.write(header_bytes(TransferHeader(transfer_id, FRAME_DATA, len(src_block_ids), size)))
            view = memoryview(buffer.view(torch.uint8).reshape(-1).numpy())
            try:
                for offset in range(0, size, SEND_CHUNK_BYTES):
                    writer.write(view[offset : offset + SEND_CHUNK_BYTES])
                    await writer.drain()
            finally:
                view.release()
                del buffer
        finally:
            agent.buffer_bytes -= size
        return size
