"""Our request's sampling options and stop conditions as vLLM SamplingParams, and vLLM's finish
reasons as ours. The frontend detokenizes and applies stop strings, so vLLM streams token deltas
only (output_kind DELTA, detokenize=False)."""

from __future__ import annotations

from collections.abc import Collection

from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, SamplingParams

from dynamo import errors
from dynamo.wire import FinishReason, PreprocessedRequest
from workers.limits import stop_token_ids, tokens_to_generate

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "cancelled",
    "repetition": "stop",  # vLLM's repetition detector ended it on purpose, like a stop
    "error": "error",
}


def sampling_params(
    request: PreprocessedRequest, max_model_len: int, eos_token_ids: Collection[int] = ()
) -> SamplingParams:
    """Raises InvalidRequest for a request vLLM would reject or that has nothing left to do."""
    sampling, stop = request.sampling, request.stop
    # vLLM's own default is 16 tokens; ours (OpenAI's) is the rest of the context.
    max_tokens = tokens_to_generate(request, max_model_len)
    stop_ids = stop_token_ids(request, eos_token_ids)
    try:
        return SamplingParams(
            # Our wire spells greedy as None or 0; vLLM's default temperature is 1.
            temperature=sampling.temperature or 0.0,
            top_p=1.0 if sampling.top_p is None else sampling.top_p,
            top_k=0 if sampling.top_k is None else sampling.top_k,
            seed=sampling.seed,
            max_tokens=max_tokens,
            min_tokens=max(0, stop.min_tokens - request.generated_before),
            stop_token_ids=stop_ids,
            ignore_eos=stop.ignore_eos,
            logprobs=0 if sampling.logprobs else None,  # 0: the sampled token's logprob only
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,
            skip_special_tokens=False,
        )
    except (ValueError, VLLMClientError) as exc:  # vLLM validates in SamplingParams.__post_init__
        raise errors.InvalidRequest(str(exc)) from None
