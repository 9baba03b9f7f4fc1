"""The KV-aware scheduling cost: what it would cost each candidate worker to serve a request,
and the choice among them (the cheapest, or a softmax sample with a temperature).

For worker w and a request of `request_blocks` full blocks, `overlap_blocks[w]` of them cached
(a weighted count when the index knows KVBM's lower tiers: a host or disk block counts a
fraction of a device block, router/indexer.py):

    prefill_blocks[w] = queued_prefill_tokens[w] / block_size + (request_blocks - overlap[w])
    decode_blocks[w]  = active_kv_blocks[w] + request_blocks
    logit[w]          = overlap_score_weight * prefill_blocks[w] + decode_blocks[w]

Lower is better. The prefill term is time to first token (blocks to compute before this
request's first token, queued work included); the decode term is the KV the worker would hold,
which slows every decode step there. A higher weight favours cache hits (TTFT); 0 is pure load
balancing. Loads include this router's not-yet-reported requests (router/load.py).
With temperature 0 the minimum wins, ties going to the lower load, then at random. With
temperature T > 0 the logits are scaled to [0, 1] and a worker is drawn with probability
proportional to exp(-scaled / T), so T is independent of the magnitude of the costs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.load import LoadTracker

# Logits this close are a tie: float sums of block counts differ by far more when they differ.
_TIE_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class WorkerCost:
    worker_id: int
    overlap_blocks: float
    prefill_blocks: float
    decode_blocks: float
    logit: float

    @property
    def load_blocks(self) -> float:
        return self.prefill_blocks + self.decode_blocks


def score_workers(
    candidates: Sequence[int],
    overlaps: Mapping[int, float],
    request_blocks: int,
    block_size_tokens: int,
    load: LoadTracker,
    overlap_score_weight: float,
) -> list[WorkerCost]:
    """The cost of each candidate, in candidate order."""
    costs: list[WorkerCost] = []
    for worker in candidates:
        overlap = min(overlaps.get(worker, 0), request_blocks)
        worker_load = load.load(worker)
        prefill = worker_load.prefill_tokens / block_size_tokens + (request_blocks - overlap)
        decode = float(worker_load.decode_blocks + request_blocks)
        costs.append(
            WorkerCost(worker, overlap, prefill, decode, overlap_score_weight * prefill + decode)
        )
    return costs


def choose(costs: Sequence[WorkerCost], temperature: float, rng: random.Random) -> WorkerCost:
    """The cheapest worker (temperature 0) or a softmax sample over scaled logits."""
    if not costs:
        raise ValueError("no candidates to choose from")
    if temperature > 0 and len(costs) > 1:
        return costs[_sample(costs, temperature, rng)]
    best = min(c.logit for c in costs)
    tied = [c for c in costs if c.logit - best <= _TIE_EPSILON]
    if len(tied) > 1:
        least = min(c.load_blocks for c in tied)
        tied = [c for c in tied if c.load_blocks - least <= _TIE_EPSILON]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def softmax_probabilities(costs: Sequence[WorkerCost], temperature: float) -> list[float]:
    """P(pick each worker) at `temperature` > 0: exp(-scaled_logit / T), normalised."""
    logits = [c.logit for c in costs]
    low, high = min(logits), max(logits)
    if high - low <= _TIE_EPSILON:
        return [1.0 / len(costs)] * len(costs)
    span = high - low
    # Largest weight is exp(0) = 1, so this never overflows.
    weights = [math.exp(-(logit - low) / span / temperature) for logit in logits]
    total = sum(weights)
    return [w / total for w in weights]


def _sample(costs: Sequence[WorkerCost], temperature: float, rng: random.Random) -> int:
    probabilities = softmax_probabilities(costs, temperature)
    return rng.choices(range(len(costs)), weights=probabilities)[0]
