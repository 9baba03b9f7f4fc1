"""Our request as TensorRT-LLM SamplingParams keyword arguments, and its finish reasons and
logprobs as ours. Pure Python (the engine module builds the SamplingParams, and its
GuidedDecodingParams from the "guided_decoding" dict), so it is unit-tested without TensorRT-LLM.

Mapping notes (TensorRT-LLM 1.2's LLM API):
- logit_bias has no SamplingParams field: it becomes a per-request logits processor (LogitBias).
- frequency/presence penalties count prompt tokens too unless `prompt_ignore_length` says how
  many to skip: set to the prompt's length, which also makes a migrated request count the tokens
  another worker generated (they sit at the end of its prompt), as our wire asks.
- output constraints need the LLM built with `guided_decoding_backend` (xgrammar or llguidance,
  in --extra_llm_api_options); without it they are refused. TensorRT-LLM's GuidedDecodingParams
  has no choice list: a choice becomes a regex.

Refused (InvalidRequest naming the parameter): constraints without a guided-decoding backend; a
migrated request with a constraint (a grammar cannot start part-way); prompt_logprobs (the worker
does not map TensorRT-LLM's prompt-logprob positions, which nobody here has verified).
Logprobs are what TensorRT-LLM returns for `logprobs=k` (the sampled token's and the top k);
its documentation gives `logprobs_mode` a RAW default (the model's distribution, as our wire
asks) where that field exists; not verified against a running TensorRT-LLM."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from dynamo import errors
from dynamo.wire import FinishReason, OutputConstraint, PreprocessedRequest
from workers.limits import GrammarForm, grammar_form, refuse_unresumable, stop_token_ids, tokens_to_generate

# CompletionOutput.finish_reason values of TensorRT-LLM 1.2.
FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "cancelled": "cancelled",
    "timeout": "cancelled",  # its per-request timeout ended it; the client sees it cut short
}


class LogitBias:
    """A TensorRT-LLM per-request logits processor (its LogitsProcessor call signature) that adds
    OpenAI-style biases to the logits in place."""

    def __init__(self, bias: Mapping[int, float]) -> None:
        self.bias = dict(bias)
        self._index: Any = None

    def __call__(self, req_id: int, logits: Any, token_ids: Any, stream_ptr: Any, client_id: Any) -> None:
        import torch

        if self._index is None or self._index[0].device != logits.device:
            ids = torch.tensor(list(self.bias), dtype=torch.long, device=logits.device)
            values = torch.tensor(list(self.bias.values()), dtype=logits.dtype, device=logits.device)
            self._index = (ids, values)
        ids, values = self._index
        logits[..., ids] += values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LogitBias) and other.bias == self.bias

    def __repr__(self) -> str:
        return f"LogitBias({self.bias})"


# GuidedDecodingParams' field per grammar form (json_object is a flag).
GUIDED_FIELDS: dict[GrammarForm, str] = {"json_schema": "json", "regex": "regex", "grammar": "grammar"}


def guided_decoding(constraint: OutputConstraint) -> dict[str, Any]:
    """GuidedDecodingParams keyword arguments for our constraint."""
    form, spec = grammar_form(constraint)
    if form == "json_object":
        return {"json_object": True}
    return {GUIDED_FIELDS[form]: spec}


def sampling_kwargs(
    request: PreprocessedRequest,
    max_seq_len: int,
    eos_token_ids: Collection[int] = (),
    *,
    guided_decoding_backend: str | None = None,
) -> dict[str, Any]:
    """`guided_decoding_backend`: the LLM's (None: built without one). Raises InvalidRequest
    for what TensorRT-LLM cannot do (module docstring) and when nothing is left to generate."""
    sampling, stop = request.sampling, request.stop
    refuse_unresumable(request, "TensorRT-LLM", penalties=False)
    if request.prompt_logprobs is not None and request.generated_before == 0:
        raise errors.InvalidRequest(
            "prompt_logprobs: this TensorRT-LLM worker does not return prompt logprobs",
            param="prompt_logprobs",
        )
    if request.constraint is not None and not guided_decoding_backend:
        raise errors.InvalidRequest(
            "response_format: this TensorRT-LLM worker's LLM was built without a guided decoding "
            "backend (set `guided_decoding_backend: xgrammar` in --extra_llm_api_options)",
            param="response_format",
        )
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
        # 0: the sampled token's logprob only; k: the top k and the sampled token.
        "logprobs": sampling.top_logprobs if sampling.logprobs or sampling.top_logprobs else None,
        "min_p": sampling.min_p or None,
        "repetition_penalty": sampling.repetition_penalty,
        "frequency_penalty": sampling.frequency_penalty or None,
        "presence_penalty": sampling.presence_penalty or None,
    }
    if sampling.frequency_penalty or sampling.presence_penalty:
        # Count output tokens only (OpenAI's definition), the earlier worker's included.
        kwargs["prompt_ignore_length"] = len(request.token_ids) - request.generated_before
    if sampling.logit_bias:
        kwargs["logits_processor"] = LogitBias(sampling.logit_bias)
    if request.constraint is not None:
        kwargs["guided_decoding"] = guided_decoding(request.constraint)
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


def top_logprobs(diff: list[Any], token_ids: list[int], k: int) -> list[list[tuple[int, float]]] | None:
    """Per token: the k best (token id, logprob) of TensorRT-LLM's {token_id: Logprob(logprob,
    rank)} maps, best first (the sampled token is in the map even when it is not among them)."""
    if not diff or k <= 0:
        return None
    out: list[list[tuple[int, float]]] = []
    for entry in diff[-len(token_ids):]:
        if not isinstance(entry, dict):
            return None  # bare floats: no alternatives to give
        ranked = sorted(entry.items(), key=lambda item: _rank(item[1]))
        out.append([(int(tok), float(getattr(lp, "logprob", lp))) for tok, lp in ranked[:k]])
    return out


def _rank(logprob: Any) -> float:
    rank = getattr(logprob, "rank", None)
    return float(rank) if rank is not None else -float(getattr(logprob, "logprob", logprob))
