"""The timing model: its figures stay near an 8B Llama on an H100, scale with batch, context and
uncached prompt, and divide by the speedup ratio (computed durations, never wall clock)."""

from __future__ import annotations

import random

import pytest

from dynamo.wire import SamplingOptions
from kvbm.block_pool import BlockPool
from workers.mocker.args import MockerConfig
from workers.mocker.executor import batch_model_time_s
from workers.mocker.timing import TimingModel, attn_pairs
from workers.paged.executor import StepResult
from workers.paged.scheduler import Scheduler
from workers.paged.sequence import Sequence


def test_decode_step_at_batch_one_is_seven_to_eight_ms() -> None:
    assert 7e-3 <= TimingModel().decode_time_s(1, 1000) <= 8e-3


def test_decode_grows_with_batch_and_context() -> None:
    t = TimingModel()
    assert t.decode_time_s(64, 1000) > t.decode_time_s(8, 1000) > t.decode_time_s(1, 1000)
    assert t.decode_time_s(32, 4000) > t.decode_time_s(32, 500)
    # Memory bound: 64 requests cost far less than 64 single steps.
    assert t.decode_time_s(64, 2000) < 3 * t.decode_time_s(1, 2000)


def test_prefill_runs_at_tens_of_thousands_of_tokens_per_second() -> None:
    t = TimingModel()
    tokens_per_s = 2048 / t.prefill_time_s(2048)
    assert 15_000 < tokens_per_s < 60_000
    assert t.prefill_time_s(4096) > 1.9 * t.prefill_time_s(2048)
    # A cached prefix is not recomputed: only the attention over it remains.
    assert t.prefill_time_s(512, num_cached_tokens=1536) < 0.4 * t.prefill_time_s(2048)


def test_speedup_divides_every_duration() -> None:
    slow, fast = TimingModel(), TimingModel(speedup_ratio=10)
    assert fast.decode_time_s(16, 1000) == pytest.approx(slow.decode_time_s(16, 1000) / 10)
    assert fast.prefill_time_s(1000) == pytest.approx(slow.prefill_time_s(1000) / 10)
    assert slow.step_time_s(0, 0, 0) == 0.0


def test_attn_pairs_is_causal() -> None:
    assert attn_pairs(0, 1) == 1
    assert attn_pairs(0, 4) == 10
    assert attn_pairs(10, 1) == 11
    assert attn_pairs(3, 2) == attn_pairs(0, 5) - attn_pairs(0, 3)


def simulated_request_time_s(timing: TimingModel, prompt_len: int, max_tokens: int) -> float:
    """Drive one request through a real scheduler, adding the model's step durations."""
    config = MockerConfig(num_gpu_blocks=256, max_num_batched_tokens=512)
    pool = BlockPool(config.num_gpu_blocks, config.block_size_tokens)
    scheduler = Scheduler(pool, config.max_num_seqs, config.max_num_batched_tokens)
    outputs: list[object] = []
    seq = Sequence("r", list(range(prompt_len)), SamplingOptions(), max_tokens, config.max_model_len, frozenset(),
                   0, 0, outputs.append)
    scheduler.add(seq)
    rng = random.Random(1)
    total = 0.0
    while scheduler.has_work():
        batch = scheduler.schedule()
        total += batch_model_time_s(timing, batch) / timing.speedup_ratio
        scheduler.finish_step(batch, StepResult([rng.randrange(config.vocab_size) for s in batch.samples if s]))
    assert len(outputs) == max_tokens
    return total


def test_a_requests_simulated_time_scales_with_speedup() -> None:
    at_1 = simulated_request_time_s(TimingModel(speedup_ratio=1), 1000, 20)
    at_10 = simulated_request_time_s(TimingModel(speedup_ratio=10), 1000, 20)
    assert at_10 == pytest.approx(at_1 / 10)
    # 1000 prompt tokens in two chunks of the 512 budget, then 19 decode steps of ~7.4 ms.
    t = TimingModel()
    assert at_1 == pytest.approx(
        t.prefill_time_s(512) + t.prefill_time_s(488, 512) + sum(t.decode_time_s(1, 1000 + i) for i in range(1, 20)),
        rel=1e-9,
    )
