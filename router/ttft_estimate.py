"""Predicted time to first token of a request not yet routed, from a router's load view: the
prefill queued on the least-loaded candidate, plus the prompt tokens waiting ahead of it in the
frontend, plus its own prompt, at the fleet's prefill rate.

    queued_s    = (min_w queued_prefill_tokens[w] + ahead_tokens / len(candidates)) / rate
    predicted_s = queued_s + prompt_tokens / rate

Cache hits are not counted (the request's overlap is known only once it is tokenized), so the
prediction errs high for prompts whose prefix is cached."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.load import LoadTracker


@dataclass(frozen=True, slots=True)
class TtftPrediction:
    queued_s: float  # waiting for prefill queued ahead of the request
    predicted_s: float  # queued_s plus the request's own prefill

    def misses(self, target_s: float) -> bool:
        """Over the target because of the queue: with nothing queued ahead the request is
        admitted even when its own prefill alone is longer than the target (waiting would not
        help it)."""
        return self.queued_s > 0 and self.predicted_s > target_s


def predict_ttft(
    load: LoadTracker,
    candidates: Sequence[int],
    prompt_tokens: int,
    prefill_tokens_per_s: float,
    ahead_tokens: int = 0,
) -> TtftPrediction | None:
    """None without candidates (nothing to predict from) or without a prefill rate."""
    if not candidates or prefill_tokens_per_s <= 0:
        return None
    queued_tokens = min(load.load(w).prefill_tokens for w in candidates) + ahead_tokens / len(candidates)
    queued_s = queued_tokens / prefill_tokens_per_s
    return TtftPrediction(queued_s, queued_s + prompt_tokens / prefill_tokens_per_s)
