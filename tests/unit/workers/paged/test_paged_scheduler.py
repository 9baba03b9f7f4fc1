"""The paged scheduler on its own (no asyncio, no executor: a seeded stream per request stands in
for sampling): chunked prefill under the token budget, prefix reuse, max_num_seqs, recompute
preemption of the newest request, abort, and the hold-back of a request whose prefix continues
on the KVBM disk tier; a request that wants prompt logprobs takes no prefix hit; per-row step
extras (logprobs, top logprobs, prompt logprobs) reach only the requests that asked."""

from __future__ import annotations

import random

from dynamo.kv_hash import block_hashes
from dynamo.wire import BlockStored, EngineOutput, KvEventData, PromptTokenLogprob, SamplingOptions
from kvbm.block_pool import BlockPool
from kvbm.config import KvbmConfig
from kvbm.simulated import SimulatedDiskReader
from kvbm.tiered import TieredCache
from workers.paged.executor import StepResult
from workers.paged.scheduler import ScheduledBatch, Scheduler
from workers.paged.sequence import Sequence, SeqStatus

VOCAB = 1000


def make(
    block_size: int = 4, num_blocks: int = 64, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
    events: list[KvEventData] | None = None, kvbm: TieredCache | None = None,
) -> Scheduler:
    pool = BlockPool(num_blocks, block_size, on_event=None if events is None else events.append,
                     on_evict=kvbm.evicted if kvbm is not None else None)
    return Scheduler(pool, max_num_seqs, max_num_batched_tokens, kvbm)


def seq(prompt: list[int], max_tokens: int, out: list[EngineOutput], seed: int = 0) -> Sequence:
    return Sequence(f"r{seed}", list(prompt), SamplingOptions(), max_tokens, 10_000, frozenset(), 0, 0,
                    out.append, exec_state=random.Random(seed))


def sample(batch: ScheduledBatch) -> StepResult:
    """One token per sampling row from each request's own stream, as the mocker does."""
    return StepResult([s.exec_state.randrange(VOCAB) for s, samples in zip(batch.seqs, batch.samples) if samples])


def step(scheduler: Scheduler) -> ScheduledBatch:
    batch = scheduler.schedule()
    scheduler.finish_step(batch, sample(batch))
    return batch


def run(scheduler: Scheduler) -> int:
    steps = 0
    while scheduler.has_work():
        batch = scheduler.schedule()
        assert batch.seqs, "no progress"
        assert batch.num_tokens <= scheduler.max_num_batched_tokens
        assert len(scheduler.running) <= scheduler.max_num_seqs
        scheduler.finish_step(batch, sample(batch))
        for s in scheduler.running:  # what steps' inputs copy, in step with the table
            assert s.block_ids == [b.block_id for b in s.block_table]
        steps += 1
    return steps


def test_chunked_prefill_respects_the_token_budget() -> None:
    s = make(max_num_batched_tokens=16)
    out: list[EngineOutput] = []
    s.add(seq(list(range(40)), 3, out))
    first = s.schedule()
    assert first.num_new_tokens == [16] and first.samples == [False]
    s.finish_step(first, sample(first))
    assert out == []  # a prefill chunk produces no token
    steps = run(s)
    assert steps == 2 + 2  # two more chunks (16 + 8), then two decode steps
    assert [len(o.token_ids) for o in out] == [1, 1, 1] and out[-1].finish_reason == "length"
    assert s.pool.num_active_blocks == 0


def test_max_num_seqs_limits_the_running_set() -> None:
    s = make(max_num_seqs=2)
    outs: list[list[EngineOutput]] = [[] for _ in range(5)]
    for i, out in enumerate(outs):
        s.add(seq([i] * 5, 4, out, seed=i))
    step(s)
    assert s.num_running == 2 and s.num_waiting == 3
    run(s)
    assert all(len(o) == 4 for o in outs)


def test_full_blocks_are_committed_as_they_complete_and_reused() -> None:
    events: list[KvEventData] = []
    s = make(events=events)
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


def test_a_block_cached_first_by_another_request_replaces_its_id_too() -> None:
    """Two requests computing the same prompt in one step: the later commit shares the block
    the earlier one cached, and its block ids (a step's input) follow."""
    s = make()
    outs: list[list[EngineOutput]] = [[], []]
    twins = [seq(list(range(10)), 3, out, seed=i) for i, out in enumerate(outs)]
    for twin in twins:
        s.add(twin)
    step(s)
    first, second = twins
    assert second.block_table[:2] == first.block_table[:2]  # shared after the commit
    assert second.block_ids == [b.block_id for b in second.block_table]
    run(s)
    assert [len(o) for o in outs] == [3, 3]


def test_preemption_requeues_the_newest_and_everything_completes() -> None:
    s = make(num_blocks=10, max_num_batched_tokens=64)
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
        solo = make()
        solo.add(seq([100 + i] * 9, 14, alone, seed=i))
        run(solo)
        assert [o.token_ids for o in out] == [o.token_ids for o in alone]


def test_abort_frees_blocks_wherever_the_request_is() -> None:
    s = make(max_num_seqs=1)
    out: list[EngineOutput] = []
    running, waiting = seq([1] * 9, 5, out, seed=1), seq([2] * 9, 5, out, seed=2)
    s.add(running)
    s.add(waiting)
    batch = s.schedule()
    assert s.pool.num_active_blocks == 3
    s.abort(running)
    s.abort(waiting)
    s.finish_step(batch, sample(batch))  # the aborted request's step result is dropped
    assert out == [] and s.pool.num_active_blocks == 0 and not s.has_work()
    assert running.status is SeqStatus.FINISHED
    s.abort(running)  # idempotent


def test_waiting_prefill_tokens_counts_uncomputed_prompts() -> None:
    s = make(max_num_batched_tokens=8)
    out: list[EngineOutput] = []
    s.add(seq([1] * 20, 5, out, seed=1))
    s.add(seq([2] * 6, 5, out, seed=2))
    assert s.waiting_prefill_tokens() == 26
    step(s)  # 8 tokens of the first prompt
    assert s.waiting_prefill_tokens() == 12 + 6


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def on_disk(prompt: list[int], block_size: int) -> tuple[TieredCache, Clock, SimulatedDiskReader]:
    """A disk tier (with a reader that takes 1 s a block) that holds the prompt's full blocks."""
    cache = TieredCache(KvbmConfig(disk_blocks=16), 1 << 20)
    clock = Clock()
    cache.reader = reader = SimulatedDiskReader(clock, 1.0)
    hashes = block_hashes(prompt, block_size)
    assert cache.adopt_disk(list(zip(hashes, [None, *hashes[:-1]]))) == len(hashes)
    return cache, clock, reader


def test_disk_hit_is_held_back_while_the_requests_behind_it_run() -> None:
    prompt = list(range(17))  # four full blocks on disk, the last token computed
    cache, clock, reader = on_disk(prompt, 4)
    s = make(kvbm=cache)
    held_out: list[EngineOutput] = []
    other_out: list[EngineOutput] = []
    held, other = seq(prompt, 2, held_out, seed=1), seq([500] * 6, 2, other_out, seed=2)
    s.add(held)
    s.add(other)
    batch = step(s)
    assert batch.seqs == [other] and s.num_loading == 1 and s.num_waiting == 1
    assert s.waiting_prefill_tokens() == 17  # the held prompt is still to be computed
    run(s)  # the other request completes; the held one is still being read
    assert len(other_out) == 2 and held_out == [] and s.num_loading == 1 and not s.has_work()
    assert s.only_loading()
    clock.now_s = 4.0  # four blocks, one second each
    assert s.has_work()
    batch = step(s)
    assert batch.seqs == [held] and batch.num_new_tokens == [1]  # 16 tokens onboarded, 1 computed
    assert cache.has_pending() and [op.staged is not None for op in cache.take_plan().onboards] == [True] * 4
    run(s)
    assert len(held_out) == 2 and held_out[0].cached_tokens == 16 and not reader.pending
    assert s.pool.num_active_blocks == 0


def test_aborting_a_held_request_closes_its_reads() -> None:
    prompt = list(range(17))
    cache, clock, reader = on_disk(prompt, 4)
    s = make(kvbm=cache)
    out: list[EngineOutput] = []
    held = seq(prompt, 2, out)
    s.add(held)
    assert not s.schedule().seqs and s.only_loading() and reader.pending
    assert reader.next_end_s() == 4.0
    s.abort(held)
    assert not reader.pending and s.num_loading == 0 and not s.has_work() and held.status is SeqStatus.FINISHED
    assert all(entry.ref_count == 0 for entry in cache.disk)  # type: ignore[union-attr]


def test_prompt_logprobs_take_no_prefix_hit_until_their_first_token() -> None:
    s = make()
    prompt = list(range(20))
    first: list[EngineOutput] = []
    s.add(seq(prompt, 2, first))
    run(s)
    out: list[EngineOutput] = []
    wants = seq(prompt, 2, out, seed=1)
    wants.prompt_logprobs = 0
    s.add(wants)
    batch = s.schedule()
    assert batch.num_new_tokens == [20]  # every prompt position computed, though cached
    s.finish_step(batch, sample(batch))
    assert out[0].cached_tokens == 0 and not wants.needs_prompt_logits
    # Preempted after its first token, it recomputes from the cache like any request.
    s.running.remove(wants)
    s._preempt(wants)
    batch = s.schedule()
    assert batch.num_new_tokens[0] < 21


def test_step_extras_go_only_to_the_requests_that_asked() -> None:
    s = make()
    outs: list[list[EngineOutput]] = [[], [], []]
    options = [SamplingOptions(), SamplingOptions(logprobs=True), SamplingOptions(logprobs=True, top_logprobs=1)]
    seqs = []
    for i, (out, sampling) in enumerate(zip(outs, options)):
        sq = Sequence(f"r{i}", [i, i + 1], sampling, 3, 100, frozenset(), 0, 0, out.append, exec_state=None)
        seqs.append(sq)
        s.add(sq)
    seqs[2].prompt_logprobs = 1
    batch = s.schedule()
    entries = [None, PromptTokenLogprob(-1.0, [(5, -0.5)])]
    s.finish_step(batch, StepResult([7, 8, 9], [-0.1, -0.2, -0.3], [None, [(8, -0.2)], [(9, -0.3)]],
                                    [None, None, entries]))
    plain, lp, top = (o[0] for o in outs)
    assert plain.logprobs is None and plain.top_logprobs is None and plain.prompt_logprobs is None
    assert lp.logprobs == [-0.2] and lp.top_logprobs is None  # top_logprobs 0: none sent
    assert top.logprobs == [-0.3] and top.top_logprobs == [[(9, -0.3)]] and top.prompt_logprobs == entries
    batch = s.schedule()
    s.finish_step(batch, StepResult([1, 2, 3], [-1.0] * 3, [[(1, -1.0)]] * 3, [entries] * 3))
    assert outs[2][1].prompt_logprobs is None  # with the first token only
