"""vLLM's logprobs (per position a {token id: Logprob(logprob, rank)} map holding the chosen or
prompt token and the top k) as our wire's: the chosen token's logprob, and the k alternatives
best first.

vLLM puts the chosen token's entry first in each map and the top k after it, so its own OpenAI
server, which takes the first k entries, lists a chosen token that is not among the k most likely
(a sampled or logit-biased one) in place of the k-th. We list the k most likely, by vLLM's rank,
as OpenAI documents top_logprobs; for greedy, unbiased tokens the two agree."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dynamo.wire import PromptTokenLogprob


def top_k(position: Mapping[int, Any], k: int) -> list[tuple[int, float]]:
    """The k best entries of one position's map, best first (ties kept in vLLM's order)."""
    if k <= 0:
        return []
    ranked = sorted(position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 62)
    return [(int(tok), float(lp.logprob)) for tok, lp in ranked[:k]]


def sample_logprobs(
    positions: Sequence[Mapping[int, Any] | None], token_ids: list[int], k: int
) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
    """Per generated token: its logprob and (k > 0) its top-k alternatives. `positions` is
    vLLM's list for this delta (DELTA output: one map per token of token_ids)."""
    start = len(positions) - len(token_ids)  # DELTA: normally 0; tolerate a cumulative list
    chosen: list[float] = []
    tops: list[list[tuple[int, float]]] = []
    for i, tok in enumerate(token_ids):
        position = positions[start + i] or {}
        entry = position.get(tok)
        chosen.append(float(entry.logprob) if entry is not None else float("nan"))
        if k:
            tops.append(top_k(position, k))
    return chosen, (tops if k else None)


def prompt_logprobs(
    positions: Sequence[Mapping[int, Any] | None], prompt_ids: Sequence[int], k: int
) -> list[PromptTokenLogprob | None]:
    """vLLM's prompt logprobs (None for the first token, then a map per prompt token holding that
    token and the top k) as one entry per prompt token."""
    out: list[PromptTokenLogprob | None] = []
    for tok, position in zip(prompt_ids, positions):
        if position is None:
            out.append(None)
            continue
        entry = position.get(tok)
        logprob = float(entry.logprob) if entry is not None else float("nan")
        out.append(PromptTokenLogprob(logprob=logprob, top=top_k(position, k)))
    return out
