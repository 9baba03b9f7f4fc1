"""The mocker's scheduler on its own (no asyncio): chunked prefill under the token budget,
prefix reuse, max_num_seqs, and recompute preemption of the newest request."""

from __future__ import annotations

import random

from dynamo.wire import BlockStored, EngineOutput, KvEventData
from kvbm.block_pool import BlockPool
from workers.mocker.args import MockerConfig
from workers.mocker.scheduler import Scheduler
from workers.mocker.sequence import MockSequence, SeqStatus


def make(config: MockerConfig, events: list[KvEventData] | None = None) -> Scheduler:
    pool = BlockPool(config.num_gpu_blocks, config.block_size_tokens,
                     on_event=None if events is None else events.append)
    return Scheduler(config, pool)


def seq(prompt: list[int], max_tokens: int, out: list[EngineOutput], seed: int = 0) -> MockSequence:
    return MockSequence(f"r{seed}", list(prompt), max_tokens, 10_000, frozenset(), 0, 0,
                        random.Random(seed), out.append)


def run(scheduler: Scheduler) -> int:
    steps = 0
    while scheduler.has_work():
        batch = scheduler.schedule()
        assert batch.seqs, "no progress"
        assert batch.num_tokens <= scheduler.config.max_num_batched_tokens
        assert len(scheduler.running) <= scheduler.config.max_num_seqs
        scheduler.finish_step(batch)
        steps += 1
    return steps


def test_chunked_prefill_respects_the_token_budget() -> None:
    s = make(MockerConfig(block_size_tokens=4, num_gpu_blocks=64, max_num_batched_tokens=16))
    out: list[EngineOutput] = []
    s.add(seq(list(range(40)), 3, out))
    first = s.schedule()
    assert first.num_new_tokens == [16]
    s.finish_step(first)
    assert out == []  # a prefill chunk produces no token
    steps = run(s)
    assert steps == 2 + 2  # two more chunks (16 + 8), then two decode steps
    assert [len(o.token_ids) for o in out] == [1, 1, 1] and out[-1].finish_reason == "length"
    assert s.pool.num_active_blocks == 0


def test_max_num_seqs_limits_the_running_set() -> None:
    s = make(MockerConfig(block_size_tokens=4, num_gpu_blocks=64, max_num_seqs=2))
    outs = [[] for _ in range(5)]  # type: list[list[EngineOutput]]
    for i, out in enumerate(outs):
        s.add(seq([i] * 5, 4, out, seed=i))
    s.finish_step(s.schedule())
    assert s.num_running == 2 and s.num_waiting == 3
    run(s)
    assert all(len(o) == 4 for o in outs)


def test_full_blocks_are_committed_as_they_complete_and_reused() -> None:
    events: list[KvEventData] = []
    s = make(MockerConfig(block_size_tokens=4, num_gpu_blocks=64), events)
    out: list[EngineOutput] = []
    s.add(seq(list(range(10)), 7, out))
    run(s)
    stored = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
    # 10 prompt + 6 computed generated tokens (the last token is never computed) = 4 blocks.
    assert len(stored) == 4
    again: list[EngineOutput] = []
    events.clear()
    s.add(seq(list(range(10)), 2, again))
    run(s)
    assert again[0].cached_tokens == 8
    assert not any(isinstance(e, BlockStored) for e in events)


def test_preemption_requeues_the_newest_and_everything_completes() -> None:
    config = MockerConfig(block_size_tokens=4, num_gpu_blocks=10, max_num_batched_tokens=64)
    s = make(config)
    outs: list[list[EngineOutput]] = [[] for _ in range(4)]
    for i, out in enumerate(outs):
        s.add(seq([100 + i] * 9, 14, out, seed=i))
    run(s)
    assert s.num_preemptions > 0
    assert [len(o) for o in outs] == [14] * 4
    assert all(o[-1].finish_reason == "length" for o in outs)
    assert s.pool.num_active_blocks == 0
    # Recompute does not change a request's tokens: same as running each alone.
    for i, out in enumerate(outs):
        alone: list[EngineOutput] = []
        solo = make(MockerConfig(block_size_tokens=4, num_gpu_blocks=64))
        solo.add(seq([100 + i] * 9, 14, alone, seed=i))
        run(solo)
        assert [o.token_ids for o in out] == [o.token_ids for o in alone]


def test_abort_frees_blocks_wherever_the_request_is() -> None:
    s = make(MockerConfig(block_size_tokens=4, num_gpu_blocks=64, max_num_seqs=1))
    out: list[EngineOutput] = []
    running, waiting = seq([1] * 9, 5, out, seed=1), seq([2] * 9, 5, out, seed=2)
    s.add(running)
    s.add(waiting)
    batch = s.schedule()
    assert s.pool.num_active_blocks == 3
    s.abort(running)
    s.abort(waiting)
    s.finish_step(batch)  # the aborted request's step result is dropped
    assert out == [] and s.pool.num_active_blocks == 0 and not s.has_work()
    assert running.status is SeqStatus.FINISHED
    s.abort(running)  # idempotent


def test_waiting_prefill_tokens_counts_uncomputed_prompts() -> None:
    s = make(MockerConfig(block_size_tokens=4, num_gpu_blocks=64, max_num_batched_tokens=8))
    out: list[EngineOutput] = []
    s.add(seq([1] * 20, 5, out, seed=1))
    s.add(seq([2] * 6, 5, out, seed=2))
    assert s.waiting_prefill_tokens() == 26
    s.finish_step(s.schedule())  # 8 tokens of the first prompt
    assert s.waiting_prefill_tokens() == 12 + 6
