"""PagedEngine's public surface, on the mocker (a PagedEngine with the timing executor): the
optional capabilities are protocols an isinstance check finds, and the disaggregation
operations hand out block ids, not blocks: a held prefill and a reservation keep their blocks
until released (once: a second release does nothing), and decoding from received KV gives the
aggregated engine's tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator

from dynamo.wire import EngineOutput, LoadMetrics, PreprocessedRequest, SamplingOptions, StopConditions
from workers.engine import DisaggEngine, Engine, EngineInfo, KvbmEngine, KvTransferEngine
from workers.mocker.args import MockerConfig
from workers.mocker.engine import MockerEngine

PROMPT = list(range(100, 150))  # 3 full blocks of 16 and 2 tokens


def mocker(num_gpu_blocks: int = 64) -> MockerEngine:
    return MockerEngine(MockerConfig(block_size_tokens=16, num_gpu_blocks=num_gpu_blocks, max_model_len=1024,
                                     speedup_ratio=1e9, vocab_size=1000))


def request(rid: str, max_tokens: int = 6) -> PreprocessedRequest:
    return PreprocessedRequest(rid, "m", PROMPT, sampling=SamplingOptions(seed=3), stop=StopConditions(max_tokens=max_tokens))


class Bare(Engine):
    async def start(self, kv_events: object = None) -> EngineInfo:
        return EngineInfo(16, 16, 1)

    async def stop(self) -> None:
        pass

    async def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        yield EngineOutput([1], "stop")

    def load_metrics(self) -> LoadMetrics:
        return LoadMetrics(worker_id=0)


def test_capabilities_are_found_by_isinstance() -> None:
    engine = mocker()
    assert isinstance(engine, DisaggEngine) and isinstance(engine, KvTransferEngine)
    assert isinstance(engine, KvbmEngine) and engine.kvbm is None
    assert not isinstance(Bare(), DisaggEngine) and not isinstance(Bare(), KvbmEngine)


async def test_held_prefill_keeps_its_blocks_until_released_once() -> None:
    async with mocker() as engine:
        aggregated = [o async for o in engine.generate(request("a"))]
        held = await engine.prefill_held(request("p"))
        assert held.first.token_ids == aggregated[0].token_ids and held.first.finish_reason == "length"
        assert len(held.block_ids) == 4 and engine.pool.num_active_blocks == 4
        engine.release(held)
        engine.release(held)  # a no-op, not a double free
        assert held.block_ids == [] and engine.pool.num_active_blocks == 0
        assert engine.cached_prefix_tokens(PROMPT) == 48  # still cached: the router saw them


async def test_reservation_then_decoding_from_received_kv() -> None:
    async with mocker() as engine:
        aggregated = [o async for o in engine.generate(request("a"))]
    async with mocker() as decode:
        reservation = decode.reserve(PROMPT)
        assert reservation is not None and reservation.matched_blocks == 0
        assert len(reservation.transfer_block_ids) == 4 and decode.pool.num_active_blocks == 4
        outs = [o async for o in decode.generate_from_kv(request("d"), aggregated[0], reservation)]
        assert [o.token_ids for o in outs] == [o.token_ids for o in aggregated]
        assert reservation.block_ids == [] and decode.pool.num_active_blocks == 0
        again = decode.reserve(PROMPT)  # the prompt's full blocks were committed: 3 cached now
        assert again is not None and again.matched_blocks == 3 and again.transfer_block_ids == again.block_ids[3:]
        decode.release(again)
        decode.release(again)
        assert decode.pool.num_active_blocks == 0


async def test_reserve_refuses_when_the_pool_is_full_and_a_stopped_engine_releases() -> None:
    engine = mocker(num_gpu_blocks=6)
    async with engine:
        first = engine.reserve(PROMPT)
        assert first is not None and engine.reserve(PROMPT) is None  # 4 + 4 > 6
        engine.release(first)
    reservation = engine.reserve(PROMPT)
    assert reservation is not None
    stream = engine.generate_from_kv(request("late"), EngineOutput([5]), reservation)
    try:
        async for _ in stream:
            raise AssertionError("a stopped engine generates nothing")
    except Exception as exc:
        assert "not running" in str(exc)
    assert engine.pool.num_active_blocks == 0 and reservation.block_ids == []
