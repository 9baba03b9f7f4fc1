"""The generation limits every engine adapter derives from our request the same way, before
spelling them in its engine's sampling parameters."""

from __future__ import annotations

from collections.abc import Collection

from dynamo import errors
from dynamo.wire import PreprocessedRequest


def tokens_to_generate(request: PreprocessedRequest, context_length: int) -> int:
    """New tokens this request may still produce: `max_tokens` less what an earlier worker
    generated (migration), or, with no `max_tokens`, the rest of the context (OpenAI's default,
    not the engines' own small defaults). Raises InvalidRequest when nothing is left."""
    stop = request.stop
    prompt_len = len(request.token_ids)
    if stop.max_tokens is None:
        left = context_length - prompt_len
    else:
        left = stop.max_tokens - request.generated_before
    if left <= 0:
        raise errors.InvalidRequest(
            f"nothing left to generate: max_tokens is {stop.max_tokens}, {request.generated_before} "
            f"tokens were generated before and the prompt has {prompt_len} of {context_length}",
            param="max_tokens",
        )
    return left


def stop_token_ids(request: PreprocessedRequest, eos_token_ids: Collection[int] = ()) -> list[int]:
    """The request's stop token ids, without the EOS ids when it asks to ignore EOS."""
    stop = request.stop
    ids = list(stop.stop_token_ids)
    if stop.ignore_eos:
        ids = [t for t in ids if t not in eos_token_ids]
    return ids
