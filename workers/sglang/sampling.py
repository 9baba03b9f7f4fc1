"""Our request as SGLang's sampling-params dict, and SGLang's streamed outputs (dicts with
`output_ids` and `meta_info`) as our token deltas and finish reasons. Pure Python: no SGLang
import, so it is unit-tested on any machine."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from dynamo import errors
from dynamo.wire import FinishReason, PreprocessedRequest
from workers.limits import stop_token_ids, tokens_to_generate

# SGLang's "all tokens" top_k (sglang.srt.sampling.sampling_params.TOP_K_ALL, 1 << 30); -1 is
# accepted by SGLang too but is normalized to this.
TOP_K_ALL = 1 << 30

FINISH_TYPES: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}


def sampling_params(
    request: PreprocessedRequest, context_length: int, eos_token_ids: Collection[int] = ()
) -> dict[str, Any]:
    """SGLang's SamplingParams as the dict `Engine.async_generate(sampling_params=...)` takes.
    Raises InvalidRequest when nothing is left to generate."""
    sampling, stop = request.sampling, request.stop
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
    return params


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
