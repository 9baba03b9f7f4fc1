"""sampling.py: the batched Sampler equals a per-row reference (written the plain way, one row and
one token at a time) on random logits, over several steps of penalty counts, with every feature
mixed in one batch; seeded rows are reproducible whatever they are batched with; logprobs are the
raw model's; the inverse-CDF draw follows the distribution."""

from __future__ import annotations

import math
import random
from collections import Counter

import torch

from workers.builtin.sampling import BANNED_LOGIT, PenaltyInit, SampleRow, Sampler, SamplingParams

VOCAB = 1000
CPU = torch.device("cpu")


def _reference(
    logits: torch.Tensor, params: SamplingParams, rng: random.Random | None, banned: tuple[int, ...],
    prompt: list[int], output: list[int],
) -> int:
    """One row, the plain way (vLLM's order): bias, penalties, ban, then greedy or temperature,
    min_p, top-k, top-p and an inverse-CDF draw with the row's uniform."""
    x = logits.float().clone()
    for token, bias in zip(params.bias_ids, params.bias_values):
        x[token] += bias
    if params.penalized:
        counts = Counter(output)
        for token in set(prompt) | set(output):
            value = float(x[token])
            x[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
        for token, count in counts.items():
            x[token] -= params.frequency_penalty * count + params.presence_penalty
    for token in banned:
        x[token] = BANNED_LOGIT
    if params.greedy:
        return int(x.argmax())
    scores = x / params.temperature
    if params.min_p > 0:
        probs = torch.softmax(scores, -1)
        scores[probs < params.min_p * probs.max()] = float("-inf")
    if 0 < params.top_k < VOCAB:
        kth = torch.sort(scores, descending=True).values[params.top_k - 1]
        scores[scores < kth] = float("-inf")
    if params.top_p < 1:
        order = torch.argsort(scores, descending=True)
        probs = torch.softmax(scores[order], -1)
        mass_before = 0.0
        for rank, token in enumerate(order.tolist()):
            if rank > 0 and mass_before >= params.top_p:
                scores[token] = float("-inf")
            mass_before += float(probs[rank])
    probs = torch.softmax(scores, -1).double()
    assert rng is not None
    point = rng.random() * float(probs.sum())
    total = 0.0
    for token, p in enumerate(probs.tolist()):
        total += p
        if total > point:
            return token
    return int(probs.argmax())


CASES = [
    SamplingParams(),
    SamplingParams(bias_ids=(5, 9), bias_values=(30.0, -100.0)),
    SamplingParams(repetition_penalty=1.8),
    SamplingParams(frequency_penalty=1.5, presence_penalty=0.7),
    SamplingParams(repetition_penalty=0.7, frequency_penalty=-0.5, logprobs=True),
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.3, top_k=7),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=0.9, min_p=0.2),
    SamplingParams(temperature=1.1, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.3, bias_ids=(1,), bias_values=(3.0,)),
    SamplingParams(temperature=0.7, frequency_penalty=0.8, top_logprobs=3, logprobs=True),
]


def _rows(seeds: list[int], step: int, histories: list[tuple[list[int], list[int]]]) -> list[SampleRow]:
    rows = []
    for i, params in enumerate(CASES):
        rng = random.Random(seeds[i]) if not params.greedy else None
        banned = (11, 12) if i % 3 == 0 else ()
        init = None
        if params.penalized and step == 0:
            init = PenaltyInit(*histories[i])
        rows.append(SampleRow(params, rng, banned, None, i if params.penalized else -1, init))
    return rows


def test_batched_sampler_equals_the_per_row_reference_over_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler(VOCAB, CPU)
    histories = [([3, 4, 5, 6] * (i + 1), [7, 8, 8, 9][: i % 4]) for i in range(len(CASES))]
    sampler_rngs = [random.Random(100 + i) for i in range(len(CASES))]
    reference_rngs = [random.Random(100 + i) for i in range(len(CASES))]
    for step in range(6):
        logits = torch.randn(len(CASES), VOCAB, generator=gen) * 3
        rows = _rows([0] * len(CASES), step, histories)
        for i, row in enumerate(rows):
            row.rng = sampler_rngs[i] if row.rng is not None else None
        expected = [
            _reference(logits[i], row.params, reference_rngs[i] if row.rng is not None else None,
                       row.banned_token_ids, *histories[i])
            for i, row in enumerate(rows)
        ]
        got = sampler.sample(logits, rows)
        assert got.token_ids == expected, f"step {step}"
        for i, token in enumerate(got.token_ids):
            histories[i][1].append(token)
        # Logprobs are the raw model's, whatever bias and penalties did.
        raw = torch.log_softmax(logits, -1)
        assert got.logprobs is not None and got.top_logprobs is not None
        for i, row in enumerate(rows):
            if row.params.wants_logprobs:
                assert math.isclose(got.logprobs[i], float(raw[i, got.token_ids[i]]), abs_tol=1e-5)
            if row.params.top_logprobs:
                top = got.top_logprobs[i]
                assert top is not None
                values, ids = raw[i].topk(row.params.top_logprobs)
                assert [t for t, _ in top] == ids.tolist()
                assert all(math.isclose(a, b, abs_tol=1e-5) for (_, a), b in zip(top, values.tolist()))
            else:
                assert got.top_logprobs[i] is None


def test_seeded_rows_do_not_depend_on_their_batch() -> None:
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_p=0.95)

    def draw(batch: list[int]) -> list[int]:
        sampler = Sampler(VOCAB, CPU)
        rngs = {i: random.Random(i) for i in batch}
        out: list[list[int]] = []
        for _ in range(5):
            rows = [SampleRow(params if i % 2 else SamplingParams(top_k=5, temperature=2.0), rngs[i]) for i in batch]
            out.append(sampler.sample(logits[batch], rows).token_ids)
        return [step[batch.index(3)] for step in out]

    alone = draw([3])
    assert draw([0, 1, 2, 3, 4, 5]) == alone
    assert draw([7, 3]) == alone


def test_logit_bias_forces_and_bans_under_greedy() -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))
    best = logits.argmax(-1).tolist()
    sampler = Sampler(VOCAB, CPU)
    rows = [
        SampleRow(SamplingParams(bias_ids=(17,), bias_values=(100.0,), logprobs=True), None),
        SampleRow(SamplingParams(bias_ids=(best[1],), bias_values=(-100.0,)), None),
    ]
    got = sampler.sample(logits, rows)
    assert got.token_ids[0] == 17
    assert got.token_ids[1] != best[1] and got.token_ids[1] == int(logits[1].topk(2).indices[1])
    assert got.logprobs is not None and math.isclose(got.logprobs[0], float(torch.log_softmax(logits[0], -1)[17]), abs_tol=1e-6)


def test_top_k_top_p_min_p_restrict_the_choice() -> None:
    logits = torch.tensor([[1.0, 5.0, 4.9, 0.5] + [-10.0] * (VOCAB - 4)])
    sampler = Sampler(VOCAB, CPU)
    for seed in range(30):
        k = sampler.sample(logits, [SampleRow(SamplingParams(temperature=5.0, top_k=2), random.Random(seed))])
        assert k.token_ids[0] in (1, 2)
        p = sampler.sample(logits, [SampleRow(SamplingParams(temperature=1.0, top_p=0.01), random.Random(seed))])
        assert p.token_ids == [1]  # the top token always survives
        m = sampler.sample(logits, [SampleRow(SamplingParams(temperature=3.0, min_p=0.5), random.Random(seed))])
        assert m.token_ids[0] in (1, 2)


def test_inverse_cdf_draw_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.full((1, VOCAB), float("-inf"))
    logits[0, :4] = probs.log()
    sampler = Sampler(VOCAB, CPU)
    rng = random.Random(5)
    draws = Counter(sampler.sample(logits, [SampleRow(SamplingParams(temperature=1.0), rng)]).token_ids[0] for _ in range(4000))
    assert set(draws) <= {0, 1, 2, 3}
    for token, p in enumerate(probs.tolist()):
        assert abs(draws[token] / 4000 - p) < 0.03, draws


def test_banned_ids_are_never_chosen_but_never_leave_a_row_empty() -> None:
    sampler = Sampler(VOCAB, CPU)
    logits = torch.zeros(1, VOCAB)
    logits[0, 1] = 9.0
    assert sampler.sample(logits, [SampleRow(SamplingParams(), None, banned_token_ids=(1,))]).token_ids != [1]
    # Everything but the banned id is impossible (a grammar that allows only a stop token):
    # the banned id is still chosen rather than an impossible one.
    only = torch.full((1, VOCAB), float("-inf"))
    only[0, 4] = 0.0
    assert sampler.sample(only, [SampleRow(SamplingParams(), None, banned_token_ids=(4,))]).token_ids == [4]
    assert sampler.sample(only, [SampleRow(SamplingParams(temperature=1.0), random.Random(0), (4,))]).token_ids == [4]


def test_penalty_rows_grow_and_are_reinitialised() -> None:
    sampler = Sampler(VOCAB, CPU)
    logits = torch.zeros(1, VOCAB)
    logits[0, 2] = 1.0
    params = SamplingParams(presence_penalty=2.0)
    # Slot 40 forces the counts to grow past their first rows; token 2 was output before.
    got = sampler.sample(logits, [SampleRow(params, None, (), None, 40, PenaltyInit([], [2]))])
    assert got.token_ids != [2]
    # The same slot reused by a fresh request starts from its own tokens only.
    got = sampler.sample(logits, [SampleRow(params, None, (), None, 40, PenaltyInit([2], []))])
    assert got.token_ids == [2]
    assert sampler.penalties.counts.shape[0] >= 41
