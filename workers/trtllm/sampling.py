"""Our request as TensorRT-LLM SamplingParams keyword arguments, and its finish reasons as ours.
Pure Python (the engine module builds the SamplingParams from the dict), so it is unit-tested
without TensorRT-LLM."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from dynamo.wire import FinishReason, PreprocessedRequest
from workers.limits import stop_token_ids, tokens_to_generate

# CompletionOutput.finish_reason values of TensorRT-LLM 1.2.
FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "cancelled": "cancelled",
    "timeout": "cancelled",  # its per-request timeout ended it; the client sees it cut short
}


def sampling_kwargs(
    request: PreprocessedRequest, max_seq_len: int, eos_token_ids: Collection[int] = ()
) -> dict[str, Any]:
    """Raises InvalidRequest when nothing is left to generate."""
    sampling, stop = request.sampling, request.stop
    max_tokens = tokens_to_generate(request, max_seq_len)
    stop_ids = stop_token_ids(request, eos_token_ids)
    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "min_tokens": max(0, stop.min_tokens - request.generated_before) or None,
        "ignore_eos": stop.ignore_eos,
        "stop_token_ids": stop_ids or None,
        "seed": sampling.seed,
        # The frontend detokenizes and applies stop strings.
        "detokenize": False,
        "logprobs": 0 if sampling.logprobs else None,
    }
    if not sampling.temperature:
        # Greedy, spelled the way every TensorRT-LLM sampler honours: keep the top token only.
        kwargs["top_k"] = 1
    else:
        kwargs["temperature"] = sampling.temperature
        if sampling.top_p is not None:
            kwargs["top_p"] = sampling.top_p
        if sampling.top_k:
            kwargs["top_k"] = sampling.top_k
    if eos_token_ids:
        eos = next(iter(eos_token_ids))
        kwargs["end_id"] = eos
        kwargs["pad_id"] = eos
    return {k: v for k, v in kwargs.items() if v is not None}


def finish_reason(reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    return FINISH_REASONS.get(reason, "stop")


def sampled_logprobs(diff: list[Any], token_ids: list[int]) -> list[float] | None:
    """TensorRT-LLM's logprobs_diff: floats, or per-position {token_id: Logprob} maps."""
    if not diff:
        return None
    out: list[float] = []
    for entry, tok in zip(diff[-len(token_ids):], token_ids):
        if isinstance(entry, dict):
            value = entry.get(tok)
            out.append(float(getattr(value, "logprob", value)) if value is not None else float("nan"))
        else:
            out.append(float(entry))
    return out
