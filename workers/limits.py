"""What every engine adapter derives from our request the same way, before spelling it in its
engine's sampling parameters: generation limits, stop ids, and output-constraint checks."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Literal

from dynamo import errors
from dynamo.wire import OutputConstraint, PreprocessedRequest


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


# ------------------------------------------------------------------- output constraints


def choice_list(constraint: OutputConstraint) -> list[str]:
    """A choice constraint's allowed strings (its spec is a JSON list of strings)."""
    try:
        choices = json.loads(constraint.spec)
    except ValueError:
        choices = None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise errors.InvalidRequest(
            f"a choice constraint needs a non-empty JSON list of strings, got {constraint.spec!r}",
            param="response_format",
        )
    return choices


_REGEX_SPECIAL = frozenset("\\.^$|?*+()[]{}/")


def choice_regex(choices: list[str]) -> str:
    """A regular expression matching exactly one of `choices`, for engines whose grammar
    backends take regexes but no choice list. Only the metacharacters every backend's dialect
    shares are escaped (xgrammar rejects some of Python's re.escape spellings, e.g. "\\ ")."""
    return "|".join("(" + "".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in c) + ")" for c in choices)


def json_schema_text(constraint: OutputConstraint) -> str:
    """A json_schema constraint's spec, checked to be a JSON object (a schema); the engine's
    grammar compiler judges the rest."""
    try:
        schema = json.loads(constraint.spec)
    except ValueError as exc:
        raise errors.InvalidRequest(f"the JSON schema is not JSON: {exc}", param="response_format") from None
    if not isinstance(schema, dict):
        raise errors.InvalidRequest("a JSON schema must be a JSON object", param="response_format")
    return constraint.spec


# What grammar backends without a choice list take (SGLang's, TensorRT-LLM's): a JSON schema,
# any JSON object, a regex or a grammar; each engine spells the four its own way.
GrammarForm = Literal["json_schema", "json_object", "regex", "grammar"]


def grammar_form(constraint: OutputConstraint) -> tuple[GrammarForm, str]:
    """Our constraint as one of the four grammar forms and its spec: a choice becomes a regex,
    a JSON schema is checked to be an object, json_object has no spec (""). Raises
    InvalidRequest for a malformed spec or an unknown kind."""
    kind = constraint.kind
    if kind == "json_schema":
        return "json_schema", json_schema_text(constraint)
    if kind == "json_object":
        return "json_object", ""
    if kind == "regex":
        return "regex", constraint.spec
    if kind == "choice":
        return "regex", choice_regex(choice_list(constraint))
    if kind == "grammar":
        return "grammar", constraint.spec
    raise errors.InvalidRequest(f"unknown constraint kind {kind!r}", param="response_format")


def refuse_unresumable(request: PreprocessedRequest, engine: str, *, penalties: bool = True) -> None:
    """For engines that cannot resume a grammar (or output-token penalty counts) part-way:
    refuse a migrated request that would need it, naming the parameter, rather than continue
    it unconstrained (or with the earlier tokens forgotten). `penalties`: frequency/presence
    penalties count output tokens only in this engine."""
    if request.generated_before <= 0:
        return
    if request.constraint is not None:
        raise errors.InvalidRequest(
            f"response_format: {engine} cannot resume an output constraint after a migration "
            f"({request.generated_before} tokens were generated by another worker)",
            param="response_format",
        )
    sampling = request.sampling
    for name in ("frequency_penalty", "presence_penalty"):
        if penalties and getattr(sampling, name):
            raise errors.InvalidRequest(
                f"{name}: {engine} counts only its own output tokens and cannot count the "
                f"{request.generated_before} generated by another worker before a migration",
                param=name,
            )
