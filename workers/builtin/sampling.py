"""Token sampling for one step's batch of logits: greedy, temperature, top-k, top-p, a seeded
torch.Generator per request for reproducibility, min_tokens (stop ids masked), and the chosen
token's logprob under the model's raw distribution."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass(slots=True)
class SampleRow:
    """What sampling needs for one row of logits."""

    params: SamplingParams
    generator: torch.Generator | None
    banned_token_ids: tuple[int, ...] = ()  # stop ids not allowed yet (min_tokens)


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # per row; None when no row asked


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> SampleResult:
    """`logits` [N, vocab], one row per entry of `rows`."""
    logits = logits.float()
    if any(r.banned_token_ids for r in rows):
        logits = logits.clone()
        for i, r in enumerate(rows):
            if r.banned_token_ids:
                logits[i, list(r.banned_token_ids)] = float("-inf")
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        tokens = tokens.clone()
        for i in sampled:
            tokens[i] = _sample_row(logits[i], rows[i])
    token_ids = tokens.tolist()
    logprobs: list[float] | None = None
    if any(r.params.logprobs for r in rows):
        chosen = torch.log_softmax(logits, dim=-1).gather(1, tokens.view(-1, 1)).view(-1)
        logprobs = chosen.tolist()
    return SampleResult(token_ids, logprobs)


def _sample_row(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    params = row.params
    scores = logits / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # before it already does. The top token always survives.
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=row.generator)[0]
