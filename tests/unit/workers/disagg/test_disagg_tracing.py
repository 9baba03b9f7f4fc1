"""A traced request through a decode worker and a prefill worker (mocker, embedded runtime):
the remote prefill, the prefill worker's part and the KV transfer are spans in the request's
trace, decoding stays under the decode worker's span."""

from __future__ import annotations

from pathlib import Path

import msgspec

from dynamo import tracing
from dynamo.config import RuntimeConfig
from dynamo.runtime import Runtime
from dynamo.trace_view import read_spans
from dynamo.wire import OUTPUT_CODEC, encode
from tests.unit.workers.disagg.test_disagg_mocker import mocker, request
from workers.disagg.args import DisaggConfig
from workers.worker import Worker, WorkerConfig

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


async def test_remote_prefill_and_kv_transfer_spans(spans_file: Path) -> None:
    disagg = DisaggConfig(min_prefill_tokens=256, kv_link_gbs=25.0)
    async with await Runtime.create(RuntimeConfig()) as rt:
        prt = rt.sibling()
        async with prt, \
                Worker(prt, mocker(), WorkerConfig("m", "/none", "mocker", component="prefill", role="prefill", disagg=disagg)), \
                Worker(rt, mocker(), WorkerConfig("m", "/none", "mocker", role="decode", disagg=disagg)) as decode:
            handler = decode.disagg.decode  # type: ignore[union-attr]
            await handler.client.wait_for_instances(5)  # type: ignore[union-attr]
            client = await rt.endpoint("backend", "generate").client()
            traced = msgspec.structs.replace(request("d", 1000), trace=f"00-{TRACE}-{SPAN}-01")
            stream = await client.generate(encode(traced), decode.instance_id, "d")
            tokens = [t async for p in stream for t in OUTPUT_CODEC.decode(p).token_ids]
            await client.close()
            assert len(tokens) == 6 and handler.stats.remote_prefills == 1
    tracing.shutdown()  # flushes

    spans = {s["name"]: s for s in read_spans([spans_file])}
    assert {s["trace_id"] for s in spans.values()} == {TRACE}

    def parent(name: str) -> str:
        return next(s["name"] for s in spans.values() if s["span_id"] == spans[name]["parent_id"])

    assert spans["worker.generate"]["parent_id"] == SPAN
    assert parent("remote_prefill") == "worker.generate" and spans["remote_prefill"]["status"] == "unset"
    assert parent("prefill.handle") == "remote_prefill"  # the prefill worker's part
    assert parent("prefill") == parent("kv_transfer") == "prefill.handle"
    assert spans["kv_transfer"]["attributes"]["dynamo.kv_bytes"] == 63 * 16 * 131072
    assert parent("engine.decode") == "worker.generate"
    assert "engine.queue" not in spans  # the decode worker never prefilled it
    assert spans["remote_prefill"]["end_ns"] <= spans["engine.decode"]["end_ns"]
