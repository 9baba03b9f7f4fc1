"""The cost function: overlap wins when load is equal, load wins when it outweighs the
overlap, ties go to the lighter worker, and temperature sampling follows the softmax."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dynamo.wire import LoadMetrics
from router.cost import choose, score_workers, softmax_probabilities
from router.load import LoadTracker

BLOCK = 16


def test_prefers_the_worker_with_the_most_overlap() -> None:
    costs = score_workers([1, 2, 3], {2: 10, 3: 4}, 12, BLOCK, LoadTracker(), 1.0)
    assert choose(costs, 0.0, random.Random(0)).worker_id == 2
    by_worker = {c.worker_id: c for c in costs}
    assert by_worker[2].prefill_blocks == 2
    assert by_worker[1].prefill_blocks == 12
    assert by_worker[2].overlap_blocks == 10


def test_load_outweighs_overlap_when_it_costs_more() -> None:
    load = LoadTracker()
    load.update(LoadMetrics(worker_id=2, kv_active_blocks=500))
    costs = score_workers([1, 2], {2: 10}, 12, BLOCK, load, 1.0)
    assert choose(costs, 0.0, random.Random(0)).worker_id == 1


def test_overlap_weight_trades_cache_hits_against_load() -> None:
    load = LoadTracker()
    load.update(LoadMetrics(worker_id=2, kv_active_blocks=20))
    # Worker 2 saves 10 prefill blocks but holds 20 more active blocks.
    assert choose(score_workers([1, 2], {2: 10}, 12, BLOCK, load, 1.0), 0.0, random.Random(0)).worker_id == 1
    assert choose(score_workers([1, 2], {2: 10}, 12, BLOCK, load, 3.0), 0.0, random.Random(0)).worker_id == 2
    # Weight 0 is pure load balancing.
    assert choose(score_workers([1, 2], {2: 12}, 12, BLOCK, load, 0.0), 0.0, random.Random(0)).worker_id == 1


def test_queued_prefill_tokens_count_as_prefill_blocks() -> None:
    load = LoadTracker()
    load.update(LoadMetrics(worker_id=1, waiting_prefill_tokens=32 * BLOCK))
    (cost,) = score_workers([1], {}, 4, BLOCK, load, 1.0)
    assert cost.prefill_blocks == 36


def test_ties_go_to_the_lower_load_then_at_random() -> None:
    load = LoadTracker()
    # Equal logits (weight 2: 2*4 + 4 == 2*0 + 12), but after admitting the request worker 1
    # would carry 4 + 4 blocks of load and worker 2 would carry 0 + 12.
    load.update(LoadMetrics(worker_id=2, kv_active_blocks=8))
    costs = score_workers([1, 2], {2: 4}, 4, BLOCK, load, 2.0)
    assert costs[0].logit == costs[1].logit
    for seed in range(10):
        assert choose(costs, 0.0, random.Random(seed)).worker_id == 1
    # Fully equal workers: spread at random, not always the first.
    same = score_workers([1, 2, 3], {}, 4, BLOCK, LoadTracker(), 1.0)
    picks = Counter(choose(same, 0.0, random.Random(seed)).worker_id for seed in range(60))
    assert set(picks) == {1, 2, 3}


def test_temperature_sampling_follows_the_softmax() -> None:
    costs = score_workers([1, 2, 3], {1: 8, 2: 4}, 8, BLOCK, LoadTracker(), 1.0)
    probabilities = softmax_probabilities(costs, 0.5)
    assert probabilities[0] > probabilities[1] > probabilities[2]
    assert sum(probabilities) == pytest.approx(1.0)
    rng = random.Random(1)
    n = 20_000
    picks = Counter(choose(costs, 0.5, rng).worker_id for _ in range(n))
    for worker, p in zip((1, 2, 3), probabilities):
        assert picks[worker] / n == pytest.approx(p, abs=0.02)


def test_high_temperature_approaches_uniform_and_equal_costs_are_uniform() -> None:
    costs = score_workers([1, 2], {1: 8}, 8, BLOCK, LoadTracker(), 1.0)
    hot = softmax_probabilities(costs, 1000.0)
    assert hot[0] == pytest.approx(0.5, abs=0.01)
    equal = score_workers([1, 2], {}, 8, BLOCK, LoadTracker(), 1.0)
    assert softmax_probabilities(equal, 0.1) == [0.5, 0.5]


def test_choose_needs_candidates() -> None:
    with pytest.raises(ValueError):
        choose([], 0.0, random.Random(0))
