"""OpenAI request -> PreprocessedRequest: chat template, tokenization, and the checks that need
the model (context length, token ids in the vocabulary) or OpenAI's own rules (n=1, stops)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from dynamo import errors
from dynamo.wire import ModelCard, PreprocessedRequest, SamplingOptions, StopConditions
from frontend.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from frontend.tokenizer import ModelTokenizer


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request ready to route, with what the response side needs to know about it."""

    request: PreprocessedRequest
    stop_strings: tuple[str, ...]
    # Ids that end generation (EOS unless ignore_eos, plus stop_token_ids); their text is not
    # part of the output.
    stop_token_ids: frozenset[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    echo_text: str = ""


def preprocess_chat(
    body: ChatCompletionRequest, card: ModelCard, tokenizer: ModelTokenizer, request_id: str
) -> Prepared:
    prompt = tokenizer.render_chat(body.messages)
    # The template already spells BOS and other special tokens as text.
    token_ids = tokenizer.encode(prompt, add_special_tokens=False)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    return _prepare(body, card, tokenizer, request_id, token_ids, max_tokens, param, "messages")


def preprocess_completion(
    body: CompletionRequest, card: ModelCard, tokenizer: ModelTokenizer, request_id: str
) -> Prepared:
    prompt = body.prompt
    if isinstance(prompt, list):
        if all(isinstance(p, int) for p in prompt):
            token_ids = list(prompt)  # type: ignore[arg-type]
        elif len(prompt) == 1 and isinstance(prompt[0], str):
            token_ids = tokenizer.encode(prompt[0], add_special_tokens=True)
        elif len(prompt) == 1 and isinstance(prompt[0], list):
            token_ids = list(prompt[0])
        else:
            raise errors.InvalidRequest(
                f"prompt is a batch of {len(prompt)} prompts; this server takes one prompt per request",
                param="prompt",
            )
        _check_vocab(token_ids, tokenizer, "prompt")
    else:
        token_ids = tokenizer.encode(prompt, add_special_tokens=True)
    if body.suffix:
        raise errors.InvalidRequest("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != 1:
        raise errors.InvalidRequest(f"best_of={body.best_of} is not supported; only 1", param="best_of")
    prepared = _prepare(body, card, tokenizer, request_id, token_ids, body.max_tokens, "max_tokens", "prompt")
    if body.echo:
        text = prompt if isinstance(prompt, str) else tokenizer.decode(token_ids)
        prepared = replace(prepared, echo_text=text)
    return prepared


def _check_vocab(token_ids: list[int], tokenizer: ModelTokenizer, param: str) -> None:
    vocab = tokenizer.vocab_size
    for t in token_ids:
        if t >= vocab:
            raise errors.InvalidRequest(f"token id {t} is outside the vocabulary (size {vocab})", param=param)


def _prepare(
    body: SamplingFields,
    card: ModelCard,
    tokenizer: ModelTokenizer,
    request_id: str,
    token_ids: list[int],
    max_tokens: int | None,
    max_tokens_param: str,
    prompt_param: str,
) -> Prepared:
    if body.n != 1:
        raise errors.InvalidRequest(f"n={body.n} is not supported; this server returns one choice (n=1)", param="n")
    if not token_ids:
        raise errors.InvalidRequest("the prompt is empty", param=prompt_param)
    context = card.context_length
    prompt_len = len(token_ids)
    if prompt_len >= context:
        raise errors.InvalidRequest(
            f"This model's maximum context length is {context} tokens. However, your "
            f"{prompt_param} resulted in {prompt_len} tokens, leaving no room for a completion.",
            param=prompt_param,
        )
    room = context - prompt_len
    if max_tokens is None:
        max_tokens = room  # OpenAI semantics: generate up to the end of the context
    elif max_tokens > room:
        raise errors.InvalidRequest(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_param}, {max_tokens} "
            f"in the completion). Please reduce the {prompt_param} or {max_tokens_param}.",
            param=max_tokens_param,
        )
    if body.min_tokens > max_tokens:
        raise errors.InvalidRequest(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens"
        )
    if body.top_k is not None and body.top_k != -1 and body.top_k < 1:
        raise errors.InvalidRequest(f"top_k must be -1 (off) or >= 1, got {body.top_k}", param="top_k")

    stop = body.stop
    stop_strings: tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not s for s in stop_strings):
        raise errors.InvalidRequest("stop strings must not be empty", param="stop")

    user_stop_ids = list(body.stop_token_ids or ())
    if user_stop_ids:
        _check_vocab(user_stop_ids, tokenizer, "stop_token_ids")
    wire_stop_ids = list(user_stop_ids)
    if not body.ignore_eos:
        wire_stop_ids.extend(t for t in tokenizer.eos_token_ids if t not in wire_stop_ids)

    request = PreprocessedRequest(
        request_id=request_id,
        model=body.model,
        token_ids=token_ids,
        sampling=SamplingOptions(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k if body.top_k not in (None, -1) else None,
            seed=body.seed,
        ),
        stop=StopConditions(
            max_tokens=max_tokens,
            stop_token_ids=wire_stop_ids,
            min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos,
        ),
    )
    return Prepared(
        request=request,
        stop_strings=stop_strings,
        stop_token_ids=frozenset(wire_stop_ids),
        max_tokens=max_tokens,
        stream=body.stream,
        include_usage=body.stream_options is not None and body.stream_options.include_usage,
    )
