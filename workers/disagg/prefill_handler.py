"""The prefill role: serves `prefill` requests from decode workers. Each runs the prompt only
(its first token, max_tokens=1 semantics), sends the prompt's KV blocks to the decode worker's
transfer agent, releases the blocks (they stay cached here, so the KV router sees the overlap)
and answers with the first token."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from dynamo import tracing
from dynamo.runtime import RequestContext
from dynamo.wire import REMOTE_PREFILL_CODEC, RemotePrefillResult, encode
from kvbm.transfer.agent import KvTransferAgent
from kvbm.transfer.layout import check_compatible
from workers.engine import ConnectorDisaggEngine, DisaggEngine

log = logging.getLogger(__name__)

PREFILL_ENDPOINT = "prefill"


class PrefillHandler:
    def __init__(self, engine: DisaggEngine | ConnectorDisaggEngine, agent: KvTransferAgent | None) -> None:
        self.engine = engine
        self.agent = agent

    async def handle(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        req = REMOTE_PREFILL_CODEC.decode(payload)
        trace = req.request.trace if tracing.active else None
        started_s = time.perf_counter()
        engine = self.engine
        if isinstance(engine, ConnectorDisaggEngine):
            # The engine keeps the KV; the decode worker's engine pulls it (its transfer
            # parameters travel in the answer).
            check_compatible(engine.kv_layout(), req.decode_agent.layout)
            first, params = await engine.prefill_export(req.request)
            if trace is not None:
                _emit_spans(trace, req.request.request_id, started_s, time.perf_counter(), None, {})
            yield encode(RemotePrefillResult(first=first, num_blocks=0, kv_bytes=0, backend="connector", kv_params=params))
            return
        assert self.agent is not None
        # Before computing anything: a layout mismatch is a deployment error, said clearly.
        check_compatible(self.agent.layout, req.decode_agent.layout)
        held = await engine.prefill_held(req.request)
        prefilled_s = time.perf_counter()
        try:
            src = held.block_ids[req.skip_blocks :]
            num_bytes, backend = await self.agent.send(req.decode_agent, req.transfer_id, src, req.dst_block_ids)
        finally:
            engine.release(held)
        if trace is not None:
            transfer = {"dynamo.kv_blocks": len(src), "dynamo.kv_bytes": num_bytes, "dynamo.kv_backend": backend}
            _emit_spans(trace, req.request.request_id, started_s, prefilled_s, time.perf_counter(), transfer)
        yield encode(RemotePrefillResult(first=held.first, num_blocks=len(src), kv_bytes=num_bytes, backend=backend))


def _emit_spans(
    trace: str, request_id: str, started_s: float, prefilled_s: float, sent_s: float | None, transfer: dict[str, object]
) -> None:
    """The prefill worker's part of a traced request, from recorded times: `prefill.handle`
    (a child of the decode worker's remote_prefill span) with `prefill` and `kv_transfer`."""
    end_s = sent_s if sent_s is not None else prefilled_s
    handle = tracing.start_span(
        "prefill.handle", trace, kind="server", start_s=started_s, attributes={"dynamo.request_id": request_id}
    )
    tracing.emit("prefill", handle, started_s, prefilled_s)
    if sent_s is not None:
        tracing.emit("kv_transfer", handle, prefilled_s, sent_s, transfer)
    tracing.end(handle, end_s)
