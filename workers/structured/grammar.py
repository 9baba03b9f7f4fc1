"""An `OutputConstraint` as llguidance grammar text, and the tokenizer-free syntax check that the
frontend runs before routing. No torch, no tokenizer: importable anywhere."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import llguidance
from llguidance import LLMatcher

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict of the stub only

from dynamo.errors import InvalidRequest
from dynamo.wire import OutputConstraint

# JSON is generated without whitespace between tokens (separators "," and ":"). With flexible
# whitespace a model that is unsure emits newlines and spaces for ever (a random-weight model
# always does); the JSON is the same JSON either way.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}

_ANY_OBJECT = '{"type": "object"}'

_KIND_TEXT = {
    "json_schema": "JSON schema",
    "json_object": "JSON object",
    "regex": "regex",
    "choice": "choice list",
    "grammar": "grammar",
}


def default_field(kind: str) -> str:
    """The request field a constraint of this kind usually comes from (for error messages)."""
    return "response_format" if kind in ("json_schema", "json_object") else f"structured_outputs.{kind}"


def constraint_error(constraint: OutputConstraint, detail: str, field: str | None) -> InvalidRequest:
    field = field or default_field(constraint.kind)
    what = _KIND_TEXT.get(constraint.kind, constraint.kind)
    first = detail.strip().splitlines()[0] if detail.strip() else "rejected"
    if first.startswith("Unimplemented keys"):
        return InvalidRequest(f"unsupported {what} in {field}: {first}", param=field)
    return InvalidRequest(f"invalid {what} in {field}: {first}", param=field)


def _choice_grammar(constraint: OutputConstraint, field: str | None) -> str:
    try:
        choices = json.loads(constraint.spec)
    except ValueError as exc:
        raise constraint_error(constraint, f"not JSON: {exc}", field) from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise constraint_error(constraint, "expected a non-empty JSON list of strings", field)
    if any(c == "" for c in choices):
        raise constraint_error(constraint, "a choice is the empty string", field)
    # Lark string literals take JSON's escapes.
    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def grammar_text(constraint: OutputConstraint, *, field: str | None = None) -> str:
    """llguidance grammar text for `constraint`, not yet validated (see `check_constraint`).

    Raises InvalidRequest for input that cannot even be turned into a grammar (spec not JSON,
    unknown kind)."""
    kind, spec = constraint.kind, constraint.spec
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema(_ANY_OBJECT, defaults=JSON_OPTIONS)
    if kind == "json_schema":
        try:
            schema = json.loads(spec)
        except ValueError as exc:
            raise constraint_error(constraint, f"not JSON: {exc}", field) from None
        if isinstance(schema, bool):  # `true` allows any JSON value; `false` allows none
            if not schema:
                raise constraint_error(constraint, "the schema `false` allows no value", field)
            schema = {}
        if not isinstance(schema, dict):
            raise constraint_error(constraint, "expected a JSON object", field)
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise constraint_error(constraint, str(exc), field) from None
    if kind == "regex":
        if not spec:
            raise constraint_error(constraint, "empty regex", field)
        return LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        return _choice_grammar(constraint, field)
    if kind == "grammar":
        if not spec.strip():
            raise constraint_error(constraint, "empty grammar", field)
        try:  # GBNF/EBNF (`root ::= ...`, xgrammar's dialect) or Lark
            return llguidance.grammar_from("grammar", spec)
        except ValueError as exc:
            raise constraint_error(constraint, str(exc), field) from None
    raise InvalidRequest(f"unknown output constraint kind {kind!r}", param=field)


def validated_grammar_text(constraint: OutputConstraint, *, field: str | None = None) -> str:
    grammar = grammar_text(constraint, field=field)
    error = LLMatcher.validate_grammar(grammar, None)
    if error:
        raise constraint_error(constraint, error, field)
    return grammar


def check_constraint(constraint: OutputConstraint, *, field: str | None = None) -> None:
    """Raise InvalidRequest if `constraint` is not a grammar llguidance can run (bad JSON, bad
    schema or an unsupported keyword, bad regex, bad EBNF). Needs no tokenizer and no torch.

    Cost, p50 (benchmarks/grammar_mask_cost.py): 0.6-0.8 ms for a JSON schema of eight typed
    properties with a nested object, a nested array and a pattern; 0.12-0.15 ms for
    json_object; 0.9-1.4 ms for a regex, a choice list or an EBNF grammar (the lexer is built).
    A caller that sees the same schema on every request can memoize by (kind, spec). A worker
    checks again when it compiles."""
    validated_grammar_text(constraint, field=field)
