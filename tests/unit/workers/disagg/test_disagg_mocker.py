"""Disaggregation on the mocker: no tensors move, the simulated link takes bytes / bandwidth,
and the output equals the aggregated mocker's (the decode worker skips the first token of the
same seeded stream)."""

from __future__ import annotations

import asyncio

from dynamo.config import RuntimeConfig
from dynamo.runtime import Runtime
from dynamo.wire import OUTPUT_CODEC, PreprocessedRequest, StopConditions, encode
from workers.disagg.args import DisaggConfig
from workers.mocker.args import MockerConfig
from workers.mocker.engine import MockerEngine
from workers.worker import Worker, WorkerConfig


def mocker() -> MockerEngine:
    return MockerEngine(MockerConfig(block_size_tokens=16, num_gpu_blocks=512, max_model_len=4096,
                                     speedup_ratio=100.0, vocab_size=1000))


def request(rid: str, n: int) -> PreprocessedRequest:
    return PreprocessedRequest(rid, "m", list(range(n)), stop=StopConditions(max_tokens=6))


async def test_mocker_disaggregated_output_equals_aggregated() -> None:
    async with mocker() as eng:
        expected = [t async for o in eng.generate(request("a", 1000)) for t in o.token_ids]
    disagg = DisaggConfig(min_prefill_tokens=256, kv_link_gbs=25.0)
    async with await Runtime.create(RuntimeConfig()) as rt:
        prt = rt.sibling()
        async with prt, \
                Worker(prt, mocker(), WorkerConfig("m", "/none", "mocker", component="prefill", role="prefill", disagg=disagg)) as prefill, \
                Worker(rt, mocker(), WorkerConfig("m", "/none", "mocker", role="decode", disagg=disagg)) as decode:
            handler = decode.disagg.decode  # type: ignore[union-attr]
            await handler.client.wait_for_instances(5)  # type: ignore[union-attr]
            client = await rt.endpoint("backend", "generate").client()
            stream = await client.generate(encode(request("d", 1000)), decode.instance_id, "d")
            got = [t async for p in stream for t in OUTPUT_CODEC.decode(p).token_ids]
            await client.close()
            assert got == expected
            assert handler.stats.remote_prefills == 1
            agent = prefill.disagg.agent  # type: ignore[union-attr]
            # 63 blocks of 16 tokens x 128 KiB per token (the 8B timing model's KV).
            assert agent.stats.sent_bytes == 63 * 16 * 131072 and agent.stats.by_backend == {"simulated": 1}
            await asyncio.sleep(0)
            assert decode.engine.pool.num_active_blocks == 0  # type: ignore[attr-defined]
