"""Our request as SGLang's sampling-params dict, and SGLang's streamed outputs (dicts with
`output_ids` and `meta_info`) as our token deltas, logprobs and finish reasons. Pure Python: no
SGLang import, so it is unit-tested on any machine.

What SGLang cannot do as our API means it is refused (InvalidRequest naming the parameter):
- repetition_penalty: SGLang's counts generated tokens only; ours (vLLM's) counts the prompt too.
- output constraints while SGLang runs with skip_tokenizer_init (this worker's default): SGLang
  then builds no grammar backend (--sglang-structured-outputs keeps its tokenizer).
- a migrated request with a constraint, or with frequency/presence penalties: SGLang can neither
  start a grammar part-way nor count tokens it did not generate.

Logprobs (SGLang's own definition, not the raw model distribution our wire describes and vLLM
returns): log-softmax of the logits after logit_bias, penalties and the grammar mask, divided by
the temperature (SGLANG_RETURN_ORIGINAL_LOGPROB=1 in SGLang's environment drops the division);
greedy requests run at temperature 1 there, so theirs are the processed logits' log-softmax."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from dynamo import errors
from dynamo.wire import FinishReason, OutputConstraint, PreprocessedRequest, PromptTokenLogprob
from workers.limits import GrammarForm, grammar_form, refuse_unresumable, stop_token_ids, tokens_to_generate

# SGLang's "all tokens" top_k (sglang.srt.sampling.sampling_params.TOP_K_ALL, 1 << 30); -1 is
# accepted by SGLang too but is normalized to this.
TOP_K_ALL = 1 << 30

FINISH_TYPES: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}


# SGLang's grammar backends take one of json_schema, regex and ebnf; any JSON object is the
# schema of one.
JSON_OBJECT_SCHEMA = '{"type": "object"}'
GRAMMAR_FIELDS: dict[GrammarForm, str] = {"json_schema": "json_schema", "regex": "regex", "grammar": "ebnf"}


def constraint_params(constraint: OutputConstraint) -> dict[str, str]:
    form, spec = grammar_form(constraint)
    if form == "json_object":
        return {"json_schema": JSON_OBJECT_SCHEMA}
    return {GRAMMAR_FIELDS[form]: spec}


def sampling_params(
    request: PreprocessedRequest,
    context_length: int,
    eos_token_ids: Collection[int] = (),
    *,
    grammar: bool = False,
) -> dict[str, Any]:
    """SGLang's SamplingParams as the dict `Engine.async_generate(sampling_params=...)` takes.
    `grammar`: SGLang runs a grammar backend (its tokenizer is loaded). Raises InvalidRequest
    for what SGLang cannot do (module docstring) and when nothing is left to generate."""
    sampling, stop = request.sampling, request.stop
    refuse_unresumable(request, "SGLang")
    if sampling.repetition_penalty not in (None, 1.0):
        raise errors.InvalidRequest(
            "repetition_penalty: SGLang's repetition penalty counts generated tokens only, not the "
            "prompt as this API's (vLLM's) does",
            param="repetition_penalty",
        )
    if request.constraint is not None and not grammar:
        raise errors.InvalidRequest(
            "response_format: this SGLang worker runs without SGLang's tokenizer "
            "(skip_tokenizer_init), so SGLang has no grammar backend; start it with "
            "--sglang-structured-outputs to serve output constraints",
            param="response_format",
        )
    # SGLang's default is 128 new tokens; ours (OpenAI's) is the rest of the context.
    max_new = tokens_to_generate(request, context_length)
    stop_ids = stop_token_ids(request, eos_token_ids)
    params: dict[str, Any] = {
        # Our wire spells greedy as None or 0; SGLang's default temperature is 1.
        "temperature": sampling.temperature or 0.0,
        "top_p": 1.0 if sampling.top_p is None else sampling.top_p,
        "top_k": TOP_K_ALL if not sampling.top_k else sampling.top_k,
        "max_new_tokens": max_new,
        "min_new_tokens": max(0, stop.min_tokens - request.generated_before),
        "ignore_eos": stop.ignore_eos,
        # The frontend applies stop strings and trims; SGLang must hand back every token.
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if stop_ids:
        params["stop_token_ids"] = stop_ids
    if sampling.seed is not None:
        params["sampling_seed"] = sampling.seed
    if sampling.min_p:
        params["min_p"] = sampling.min_p
    if sampling.frequency_penalty:
        params["frequency_penalty"] = sampling.frequency_penalty
    if sampling.presence_penalty:
        params["presence_penalty"] = sampling.presence_penalty
    if sampling.logit_bias:
        params["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias.items()}
    if request.constraint is not None:
        params.update(constraint_params(request.constraint))
    return params


def logprob_args(request: PreprocessedRequest) -> dict[str, Any]:
    """async_generate's logprob arguments. SGLang takes one top-k for prompt and output and
    computes prompt logprobs from `logprob_start_len` (0: the whole prompt; -1: none)."""
    sampling = request.sampling
    prompt_k = request.prompt_logprobs if request.generated_before == 0 else None
    want = sampling.logprobs or sampling.top_logprobs > 0 or prompt_k is not None
    if not want:
        return {"return_logprob": False}
    return {
        "return_logprob": True,
        "top_logprobs_num": max(sampling.top_logprobs, prompt_k or 0),
        "logprob_start_len": 0 if prompt_k is not None else -1,
    }


def finish_reason(meta_info: Mapping[str, Any]) -> FinishReason | None:
    """SGLang's meta_info["finish_reason"] (None, or {"type": "stop"|"length"|"abort", ...}).
    An abort with an HTTP error status is SGLang rejecting or failing the request: "error"."""
    reason = meta_info.get("finish_reason")
    if reason is None:
        return None
    if isinstance(reason, str):  # defensive: some paths report the bare type
        reason = {"type": reason}
    kind = reason.get("type")
    if kind == "abort" and (reason.get("status_code") or 0) >= 400:
        return "error"
    return FINISH_TYPES.get(kind, "stop")


def abort_error(meta_info: Mapping[str, Any]) -> errors.DynamoError:
    """The error to raise for an "error" finish: 400 is a bad request, 503 overload."""
    reason = meta_info.get("finish_reason") or {}
    message = str(reason.get("message") or "SGLang aborted the request")
    status = reason.get("status_code") or 500
    if status == 400:
        return errors.InvalidRequest(message)
    if status in (429, 503):
        return errors.Overloaded(message)
    return errors.EngineError(message)


class OutputDeltas:
    """Turns SGLang's stream into token deltas. SGLang streams the cumulative output_ids unless
    the server runs with --incremental-streaming-output, where each chunk is a delta; logprobs
    (meta_info["output_token_logprobs"], (logprob, token_id, text) tuples) follow the same rule."""

    def __init__(self, incremental: bool) -> None:
        self.incremental = incremental
        self.sent = 0

    def take(self, out: Mapping[str, Any]) -> list[int]:
        ids = list(out.get("output_ids") or ())
        if self.incremental:
            self.sent += len(ids)
            return ids
        new = ids[self.sent :]
        self.sent = max(self.sent, len(ids))
        return new

    def logprobs(self, out: Mapping[str, Any], count: int) -> list[float] | None:
        entries = (out.get("meta_info") or {}).get("output_token_logprobs")
        if not entries or count == 0:
            return None
        return [float(entry[0]) for entry in entries[-count:]]

    def top_logprobs(self, out: Mapping[str, Any], count: int, k: int) -> list[list[tuple[int, float]]] | None:
        """Per token of this delta: the k best (token id, logprob), best first, from SGLang's
        meta_info["output_top_logprobs"] (per position a list of (logprob, token_id, text))."""
        entries = (out.get("meta_info") or {}).get("output_top_logprobs")
        if not entries or count == 0 or k <= 0:
            return None
        return [_top(position, k) for position in entries[-count:]]


def _top(position: Any, k: int) -> list[tuple[int, float]]:
    ranked = sorted(position or (), key=lambda entry: -float(entry[0]))
    return [(int(entry[1]), float(entry[0])) for entry in ranked[:k]]


def prompt_logprobs(meta_info: Mapping[str, Any], k: int) -> list[PromptTokenLogprob | None] | None:
    """SGLang's input_token_logprobs ((logprob | None, token_id, text) per prompt token, None
    for the first) and input_top_logprobs as one entry per prompt token."""
    tokens = meta_info.get("input_token_logprobs")
    if not tokens:
        return None
    tops = meta_info.get("input_top_logprobs") or [None] * len(tokens)
    out: list[PromptTokenLogprob | None] = []
    for entry, top in zip(tokens, tops):
        if entry is None or entry[0] is None:
            out.append(None)
        else:
            out.append(PromptTokenLogprob(logprob=float(entry[0]), top=_top(top, k)))
    return out
