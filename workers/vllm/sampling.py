"""Our request's sampling options, stop conditions and output constraint as vLLM SamplingParams,
and vLLM's finish reasons as ours. The frontend detokenizes and applies stop strings, so vLLM
streams token deltas only (output_kind DELTA, detokenize=False).

Logprobs: vLLM 0.32's default `logprobs_mode` is "raw_logprobs": log-softmax of the model's
logits before logit_bias, penalties, temperature, top-k/top-p and min-p, which is what our wire
promises. One exception, vLLM's own: structured outputs mask the logits before the sampler
sees them, so a constrained request's logprobs are those of the masked, renormalised
distribution (as vLLM's own server returns them)."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from vllm.v1.structured_output.request import get_structured_output_key

from dynamo import errors
from dynamo.wire import FinishReason, OutputConstraint, PreprocessedRequest
from workers.limits import stop_token_ids, tokens_to_generate
from workers.vllm.replay import REPLAY_KEY, replay_args

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "cancelled",
    "repetition": "stop",  # vLLM's repetition detector ended it on purpose, like a stop
    "error": "error",
}

# vLLM's SamplingParams field names that our wire spells differently.
_OUR_PARAM = {"logprobs": "top_logprobs"}


def constraint_params(constraint: OutputConstraint) -> StructuredOutputsParams:
    """Our constraint as vLLM's structured-outputs params (its `response_format`, `guided_*`)."""
    kind, spec = constraint.kind, constraint.spec
    try:
        if kind == "json_schema":
            return StructuredOutputsParams(json=spec)
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True)
        if kind == "regex":
            return StructuredOutputsParams(regex=spec)
        if kind == "grammar":
            return StructuredOutputsParams(grammar=spec)
        if kind == "choice":
            choices = json.loads(spec)
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                raise ValueError("choice must be a JSON list of strings")
            return StructuredOutputsParams(choice=choices)
    except (ValueError, VLLMClientError) as exc:  # json.JSONDecodeError is a ValueError
        raise errors.InvalidRequest(f"invalid {kind} constraint: {exc}", param="response_format") from None
    raise errors.InvalidRequest(f"unknown constraint kind {kind!r}", param="response_format")


class ConstraintValidator:
    """vLLM's own structured-output validation, the one AsyncLLM runs when it admits a request
    (backend choice, schema and grammar checks), run here first so that a bad constraint is an
    InvalidRequest naming response_format, and so that a migrated request's replay compiles
    with the backend vLLM would have picked. vLLM 0.32 keeps the check in a private method."""

    def __init__(self, model_config: Any, structured_config: Any, tokenizer: Any) -> None:
        self.model_config = model_config
        self.structured_config = structured_config
        self.tokenizer = tokenizer

    def validate(self, structured: StructuredOutputsParams) -> StructuredOutputsParams:
        probe = SamplingParams(structured_outputs=structured, detokenize=False)
        try:
            probe._validate_structured_outputs(self.model_config, self.structured_config, self.tokenizer)
        except (ValueError, VLLMClientError) as exc:
            raise errors.InvalidRequest(f"invalid response_format: {exc}", param="response_format") from None
        return structured


def needs_replay(request: PreprocessedRequest) -> bool:
    """A migrated request whose earlier tokens must reach the sampler as output, not prompt:
    its grammar must resume after them, and frequency/presence penalties count them."""
    sampling = request.sampling
    return request.generated_before > 0 and (
        request.constraint is not None or bool(sampling.frequency_penalty) or bool(sampling.presence_penalty)
    )


def sampling_params(
    request: PreprocessedRequest,
    max_model_len: int,
    eos_token_ids: Collection[int] = (),
    *,
    replay_available: bool = True,
    validator: ConstraintValidator | None = None,
) -> SamplingParams:
    """Raises InvalidRequest for a request vLLM would reject or that has nothing left to do.

    `replay_available`: the engine runs with our migration-replay logits processor (see
    workers/vllm/replay.py); without it a migrated request that needs one is refused.
    `validator`: checks the constraint as vLLM will (None: vLLM checks it on admission)."""
    sampling, stop = request.sampling, request.stop
    # vLLM's own default is 16 tokens; ours (OpenAI's) is the rest of the context.
    max_tokens = tokens_to_generate(request, max_model_len)
    stop_ids = stop_token_ids(request, eos_token_ids)
    migrated = request.generated_before > 0
    structured = None
    if request.constraint is not None:
        structured = constraint_params(request.constraint)
        if validator is not None:
            structured = validator.validate(structured)
    extra_args: dict[str, Any] | None = None
    if needs_replay(request):
        if not replay_available:
            param = "response_format" if request.constraint is not None else (
                "frequency_penalty" if sampling.frequency_penalty else "presence_penalty"
            )
            raise errors.InvalidRequest(
                f"{param} cannot be resumed after a migration on this vLLM worker: it runs "
                "without the migration-replay logits processor (vLLM allows no custom logits "
                "processors with speculative decoding)",
                param=param,
            )
        prior = list(request.token_ids[len(request.token_ids) - request.generated_before :])
        key = None
        if structured is not None:
            kind, spec = get_structured_output_key(structured)
            key = (kind.name, spec)
        backend = structured._backend if structured is not None else None
        extra_args = {REPLAY_KEY: replay_args(prior, key, backend)}
        structured = None  # the replay processor constrains it instead
    want_logprobs = sampling.logprobs or sampling.top_logprobs > 0
    try:
        return SamplingParams(
            # Our wire spells greedy as None or 0; vLLM's default temperature is 1.
            temperature=sampling.temperature or 0.0,
            top_p=1.0 if sampling.top_p is None else sampling.top_p,
            top_k=0 if sampling.top_k is None else sampling.top_k,
            min_p=sampling.min_p or 0.0,
            seed=sampling.seed,
            repetition_penalty=1.0 if sampling.repetition_penalty is None else sampling.repetition_penalty,
            frequency_penalty=sampling.frequency_penalty or 0.0,
            presence_penalty=sampling.presence_penalty or 0.0,
            logit_bias=dict(sampling.logit_bias) or None,
            max_tokens=max_tokens,
            min_tokens=max(0, stop.min_tokens - request.generated_before),
            stop_token_ids=stop_ids,
            ignore_eos=stop.ignore_eos,
            # k alternatives per position; vLLM adds the sampled token's own entry to them.
            logprobs=sampling.top_logprobs if want_logprobs else None,
            # The first worker sent the prompt's logprobs with its first chunk; a migrated
            # request's prompt also holds generated tokens, whose logprobs were sent as output.
            prompt_logprobs=None if migrated else request.prompt_logprobs,
            structured_outputs=structured,
            extra_args=extra_args,
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,
            skip_special_tokens=False,
        )
    except (ValueError, VLLMClientError) as exc:  # vLLM validates in SamplingParams.__post_init__
        raise invalid_request(exc) from None


def invalid_request(exc: Exception) -> errors.InvalidRequest:
    """vLLM's validation error as ours, naming the parameter in our wire's spelling."""
    param = getattr(exc, "parameter", None)
    return errors.InvalidRequest(str(exc), param=_OUR_PARAM.get(param, param) if param else None)

