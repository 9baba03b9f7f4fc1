"""The prefill role: serves `prefill` requests from decode workers. Each runs the prompt only
(its first token, max_tokens=1 semantics), sends the prompt's KV blocks to the decode worker's
transfer agent, releases the blocks (they stay cached here, so the KV router sees the overlap)
and answers with the first token."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from dynamo.runtime import RequestContext
from dynamo.wire import REMOTE_PREFILL_CODEC, RemotePrefillResult, encode
from kvbm.transfer.agent import KvTransferAgent
from kvbm.transfer.layout import check_compatible
from workers.engine import DisaggEngine

log = logging.getLogger(__name__)

PREFILL_ENDPOINT = "prefill"


class PrefillHandler:
    def __init__(self, engine: DisaggEngine, agent: KvTransferAgent) -> None:
        self.engine = engine
        self.agent = agent

    async def handle(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        req = REMOTE_PREFILL_CODEC.decode(payload)
        # Before computing anything: a layout mismatch is a deployment error, said clearly.
        check_compatible(self.agent.layout, req.decode_agent.layout)
        held = await self.engine.prefill_held(req.request)
        try:
            src = held.block_ids[req.skip_blocks :]
            num_bytes, backend = await self.agent.send(req.decode_agent, req.transfer_id, src, req.dst_block_ids)
        finally:
            self.engine.release(held)
        yield encode(RemotePrefillResult(first=held.first, num_blocks=len(src), kv_bytes=num_bytes, backend=backend))
