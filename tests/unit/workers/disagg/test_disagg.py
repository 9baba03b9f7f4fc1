"""Disaggregated prefill/decode on the embedded runtime with the built-in engine on CPU: greedy
output equals aggregated output token for token (handler level and through the HTTP frontend),
short prompts stay local, a prefill worker that dies mid-transfer or hangs and KV lost on the
wire cost only a local prefill, and every transfer buffer and KV block is released afterwards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from dynamo.config import RuntimeConfig
from dynamo.runtime import Runtime
from dynamo.wire import OUTPUT_CODEC, PreprocessedRequest, StopConditions, encode
from frontend.service import Frontend, FrontendConfig
from router.base import RoundRobinRouter
from workers.builtin.args import DEFAULT_MODEL, BuiltinConfig
from workers.builtin.engine import BuiltinEngine
from workers.disagg.args import DisaggConfig
from workers.worker import Worker, WorkerConfig

pytest.importorskip("torch")

MODEL = "tiny"
PROMPTS = [list(range(10, 60)), [7, 9, 11] * 13, list(range(300, 341))]  # 50, 39, 41 tokens
SHORT = [5, 6, 7, 8, 9]


def builtin() -> BuiltinEngine:
    return BuiltinEngine(BuiltinConfig(model=DEFAULT_MODEL, dtype="float32", device="cpu",
                                       block_size_tokens=4, num_gpu_blocks=96, max_num_batched_tokens=64))


def request(rid: str, prompt: list[int], max_tokens: int = 8) -> PreprocessedRequest:
    return PreprocessedRequest(rid, MODEL, prompt, stop=StopConditions(max_tokens=max_tokens, ignore_eos=True))


def worker(rt: Runtime, role: str, disagg: DisaggConfig, engine: BuiltinEngine | None = None) -> Worker:
    component = disagg.prefill_component if role == "prefill" else "backend"
    config = WorkerConfig(MODEL, DEFAULT_MODEL, "builtin", component=component, role=role, disagg=disagg)  # type: ignore[arg-type]
    return Worker(rt, engine or builtin(), config)


@contextlib.asynccontextmanager
async def fleet(disagg: DisaggConfig) -> AsyncIterator[tuple[Runtime, Worker, Worker]]:
    """One decode and one prefill worker, each on its own lease, sharing embedded planes."""
    async with await Runtime.create(RuntimeConfig()) as rt:
        prt = rt.sibling()
        async with prt, worker(prt, "prefill", disagg) as prefill, worker(rt, "decode", disagg) as decode:
            assert decode.disagg is not None and decode.disagg.decode is not None
            await decode.disagg.decode.client.wait_for_instances(5)  # type: ignore[union-attr]
            yield rt, decode, prefill


async def run_request(rt: Runtime, instance_id: int, req: PreprocessedRequest) -> list[int]:
    client = await rt.endpoint("backend", "generate").client()
    try:
        stream = await client.generate(encode(req), instance_id, req.request_id)
        outs = [OUTPUT_CODEC.decode(p) async for p in stream]
    finally:
        await client.close()
    assert outs[-1].finish_reason == "length"
    return [t for o in outs for t in o.token_ids]


async def aggregated(prompts: list[list[int]], max_tokens: int = 8) -> list[list[int]]:
    async with builtin() as eng:
        out = []
        for i, prompt in enumerate(prompts):
            out.append([t for o in [x async for x in eng.generate(request(f"a{i}", prompt, max_tokens))] for t in o.token_ids])
        return out


def assert_released(decode: Worker, prefill: Worker) -> None:
    for w in (decode, prefill):
        assert w.disagg is not None and w.disagg.agent.buffer_bytes == 0
        assert w.engine.pool.num_active_blocks == 0  # type: ignore[attr-defined]


HOST = DisaggConfig(min_prefill_tokens=8, kv_transfer_backend="host", prefill_timeout_s=20)
AUTO = DisaggConfig(min_prefill_tokens=8, prefill_timeout_s=20)


async def test_disaggregated_greedy_output_equals_aggregated() -> None:
    """auto between workers of one process: the same-process backend (a direct copy into the
    decode engine's tensors, no host staging, kvbm/transfer/local.py); the host path through
    these handlers is the HTTP frontend's test and the failure tests below."""
    expected = await aggregated(PROMPTS)
    async with fleet(AUTO) as (rt, decode, prefill):
        got = await asyncio.gather(*(run_request(rt, decode.instance_id, request(f"d{i}", p)) for i, p in enumerate(PROMPTS)))
        assert list(got) == expected
        handler = decode.disagg.decode  # type: ignore[union-attr]
        assert handler.stats.remote_prefills == len(PROMPTS) and handler.stats.fallbacks == 0
        assert prefill.disagg.agent.stats.by_backend == {"same-process": len(PROMPTS)}  # type: ignore[union-attr]
        # The same prompt again: its prefix is cached on the decode worker now, so only the
        # uncached tail (below the threshold) is left: prefilled locally, same tokens.
        assert await run_request(rt, decode.instance_id, request("again", PROMPTS[0])) == expected[0]
        assert handler.stats.local_prefills == 1
        assert_released(decode, prefill)


async def test_short_prompts_are_prefilled_locally() -> None:
    expected = await aggregated([SHORT])
    async with fleet(HOST) as (rt, decode, prefill):
        assert await run_request(rt, decode.instance_id, request("s", SHORT)) == expected[0]
        handler = decode.disagg.decode  # type: ignore[union-attr]
        assert (handler.stats.local_prefills, handler.stats.remote_prefills) == (1, 0)
        assert prefill.disagg.agent.stats.sent_transfers == 0  # type: ignore[union-attr]


async def test_prefill_worker_dying_mid_transfer_falls_back_to_local_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvbm.transfer import host

    expected = await aggregated(PROMPTS[:1])
    async with fleet(HOST) as (rt, decode, prefill):
        real_drain = asyncio.StreamWriter.drain
        killed = asyncio.Event()

        async def die_after_first_chunk(self: asyncio.StreamWriter) -> None:
            # The prefill worker's process "dies" with half its KV on the wire.
            await real_drain(self)
            self.transport.abort()
            killed.set()
            raise ConnectionResetError("prefill worker killed")

        monkeypatch.setattr(host, "SEND_CHUNK_BYTES", 4096)
        monkeypatch.setattr(asyncio.StreamWriter, "drain", die_after_first_chunk)
        tokens = await run_request(rt, decode.instance_id, request("k", PROMPTS[0]))
        monkeypatch.setattr(asyncio.StreamWriter, "drain", real_drain)
        assert killed.is_set()
        assert tokens == expected[0]
        handler = decode.disagg.decode  # type: ignore[union-attr]
        assert handler.stats.fallbacks == 1 and handler.stats.local_prefills == 1
        assert decode.disagg.agent.stats.failed_transfers == 1  # type: ignore[union-attr]
        assert_released(decode, prefill)


@pytest.mark.parametrize("how", ["hangs", "stopped"])
async def test_hung_or_stopped_prefill_worker_falls_back(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.paged.engine import PagedEngine

    expected = await aggregated(PROMPTS[:1])
    entered = asyncio.Event()

    async def hang(self: PagedEngine, request: PreprocessedRequest) -> None:
        entered.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(PagedEngine, "prefill_held", hang)  # only prefill workers call it
    timeout_s = 0.3 if how == "hangs" else 30.0
    config = DisaggConfig(min_prefill_tokens=8, kv_transfer_backend="host", prefill_timeout_s=timeout_s)
    async with fleet(config) as (rt, decode, prefill):
        loop = asyncio.get_running_loop()
        start = loop.time()
        task = asyncio.create_task(run_request(rt, decode.instance_id, request("h", PROMPTS[0])))
        await entered.wait()
        if how == "stopped":
            await prefill.stop()  # its in-flight prefill is cancelled and its endpoint goes
        assert await task == expected[0]
        assert loop.time() - start < 10  # not the 30 s timeout: the failure is noticed
        handler = decode.disagg.decode  # type: ignore[union-attr]
        assert handler.stats.fallbacks == 1 and handler.stats.remote_prefills == 0
        assert decode.disagg.agent.buffer_bytes == 0  # type: ignore[union-attr]
        assert decode.engine.pool.num_active_blocks == 0  # type: ignore[attr-defined]


async def test_a_landing_notice_lost_after_the_answer_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A link cut before any frame of the transfer got through, found by neither end: the
    prefill worker answers and no frame ever comes. The decode worker gives up LANDING_GRACE_S
    after the answer (not at prefill_timeout_s) and prefills locally."""
    from kvbm.transfer.host import HostBackend
    from workers.disagg import decode_handler

    expected = await aggregated(PROMPTS[:1])
    sent = asyncio.Event()

    async def lost_on_the_wire(self: HostBackend, agent: object, peer: object, transfer_id: str,
                               src: list[int], dst: list[int], writer: asyncio.StreamWriter) -> int:
        sent.set()
        return len(src) * agent.block_bytes  # type: ignore[attr-defined]

    monkeypatch.setattr(HostBackend, "send", lost_on_the_wire)
    monkeypatch.setattr(decode_handler, "LANDING_GRACE_S", 0.2)
    config = DisaggConfig(min_prefill_tokens=8, kv_transfer_backend="host", prefill_timeout_s=600)
    async with fleet(config) as (rt, decode, prefill):
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await run_request(rt, decode.instance_id, request("lost", PROMPTS[0])) == expected[0]
        assert sent.is_set()
        assert loop.time() - start < 60  # the grace after the answer, not the 600 s timeout
        handler = decode.disagg.decode  # type: ignore[union-attr]
        assert handler.stats.fallbacks == 1 and handler.stats.remote_prefills == 0
        assert prefill.disagg.agent.stats.sent_transfers == 1  # type: ignore[union-attr]
        assert_released(decode, prefill)


async def test_kv_still_landing_after_the_answer_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """The opposite case: the bytes are here but their scatter waits for the model thread, so
    the landing notice comes after the answer. The decode worker asks whether the transfer
    has begun arriving and, as it has, waits on (its connection bounds it) instead of giving
    up: the scatter is held until that question was asked."""
    expected = await aggregated(PROMPTS[:1])
    async with fleet(HOST) as (rt, decode, prefill):
        agent = decode.disagg.agent  # type: ignore[union-attr]
        memory, real_run, real_begun = agent.memory, agent.memory.run, agent.begun
        asked = asyncio.Event()

        def begun(transfer_id: str) -> bool:
            asked.set()  # only after the prefill worker's answer, with the landing still pending
            return real_begun(transfer_id)

        async def held_run(fn: object) -> object:
            await asked.wait()
            return await real_run(fn)  # type: ignore[arg-type]

        monkeypatch.setattr(agent, "begun", begun)
        monkeypatch.setattr(memory, "run", held_run)
        assert await run_request(rt, decode.instance_id, request("late", PROMPTS[0])) == expected[0]
        handler = decode.disagg.decode  # type: ignore[union-attr]
        assert asked.is_set() and handler.stats.fallbacks == 0 and handler.stats.remote_prefills == 1
        assert_released(decode, prefill)


async def test_disaggregated_through_the_http_frontend() -> None:
    expected = await aggregated(PROMPTS[:2], max_tokens=6)
    async with fleet(HOST) as (rt, decode, prefill):
        config = FrontendConfig(http_host="127.0.0.1", http_port=0)
        async with Frontend(rt, config, lambda card: RoundRobinRouter()) as frontend:
            await frontend.manager.wait_until(frontend.manager.ready, 10)
            assert frontend.manager.get(MODEL).instance_ids() == [decode.instance_id]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{frontend.port}") as http:
                for prompt, want in zip(PROMPTS[:2], expected):
                    resp = await http.post("/v1/completions", json={
                        "model": MODEL, "prompt": prompt, "max_tokens": 6, "ignore_eos": True,
                        "temperature": 0,
                    }, timeout=60)
                    assert resp.status_code == 200, resp.text
                    body = resp.json()
                    assert body["usage"]["completion_tokens"] == 6
                    text = body["choices"][0]["text"]
                    tokenizer = await frontend.manager.tokenizers.get(DEFAULT_MODEL)
                    assert text == tokenizer.decode(want)
        assert decode.disagg.decode.stats.remote_prefills == 2  # type: ignore[union-attr]
        # ...and the worker's metrics say so.
        samples = {
            (s.labels["where"], s.labels["reason"]): s.value
            for m in decode.registry.collect() if m.name == "dynamo_worker_prefills"
            for s in m.samples if s.name == "dynamo_worker_prefills_total"
        }
        assert samples == {("remote", ""): 2.0}
        assert_released(decode, prefill)
