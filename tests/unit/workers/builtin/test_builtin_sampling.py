"""sampling.py: greedy, top-k/top-p limits, seeded reproducibility, banned ids, logprobs."""

from __future__ import annotations

import math

import torch

from workers.builtin.sampling import SampleRow, SamplingParams, sample


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_and_logprobs() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    rows = [SampleRow(SamplingParams(logprobs=True), None), SampleRow(SamplingParams(), None)]
    result = sample(logits, rows)
    assert result.token_ids == [1, 0]
    assert result.logprobs is not None
    assert math.isclose(result.logprobs[0], torch.log_softmax(logits[0], -1)[1].item(), rel_tol=1e-6)


def test_top_k_and_top_p_restrict_the_choice() -> None:
    logits = torch.tensor([[1.0, 5.0, 4.9, 0.5]])
    for seed in range(20):
        k = sample(logits, [SampleRow(SamplingParams(temperature=5.0, top_k=2), _gen(seed))])
        assert k.token_ids[0] in (1, 2)
        p = sample(logits, [SampleRow(SamplingParams(temperature=1.0, top_p=0.01), _gen(seed))])
        assert p.token_ids == [1]  # the top token always survives


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    logits = torch.zeros(1, 1000)
    params = SamplingParams(temperature=1.0)

    def draw(seed: int) -> list[int]:
        g = _gen(seed)
        return [sample(logits, [SampleRow(params, g)]).token_ids[0] for _ in range(8)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_banned_ids_are_never_chosen() -> None:
    logits = torch.tensor([[0.0, 9.0, 1.0]])
    assert sample(logits, [SampleRow(SamplingParams(), None, banned_token_ids=(1,))]).token_ids == [2]
