"""The mocker's chooser: output ends within a token budget and is valid for common schemas,
regexes and choices (walking a witness), for EBNF grammars (by search), and after a migration
(replayed output, another seed)."""

from __future__ import annotations

import json

import pytest
from structured_cases import all_constraints, check_output

from dynamo.wire import OutputConstraint
from workers.structured import GrammarCompiler, GrammarTokenChooser
from workers.structured.witness import NoWitness, regex_witness, witness_text

BUDGET = 200


def run(compiler: GrammarCompiler, constraint: OutputConstraint, seed: int, replay: list[int] | None = None) -> list[int]:
    compiled = compiler.compile(constraint)
    matcher = compiled.matcher()
    if replay:
        assert matcher.accept_many(replay)
    chooser = GrammarTokenChooser(compiled, seed=seed)
    for _ in range(BUDGET):
        token = chooser.next_token(matcher)
        assert matcher.accept(token), (constraint, token)
        if matcher.is_terminated():
            return matcher.accepted_ids[:-1]
    raise AssertionError(f"no end within {BUDGET} tokens: {compiler.vocab.decode_bytes(matcher.accepted_ids)!r}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ends_with_valid_output(compiler: GrammarCompiler, seed: int) -> None:
    for constraint in all_constraints():
        ids = run(compiler, constraint, seed)
        check_output(constraint, compiler.vocab.decode_bytes(ids).decode())


def test_more_schemas(compiler: GrammarCompiler) -> None:
    schemas = [
        {"type": "object", "properties": {"s": {"type": "string", "minLength": 8}, "n": {"type": "number", "exclusiveMinimum": 2.5}}, "required": ["s", "n"]},
        {"type": "array", "items": {"type": "integer", "minimum": 10}, "minItems": 2},
        {"type": "object", "properties": {"opt": {"type": "string"}, "req": {"type": "boolean"}}, "required": ["req"]},
        {"type": "object", "properties": {"x": {"oneOf": [{"type": "string", "format": "email"}, {"type": "integer"}]}}, "required": ["x"]},
        {"type": "object", "properties": {"items": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "minItems": 2}}, "required": ["items"]},
        {"type": "object", "properties": {"uuid": {"type": "string", "format": "uuid"}, "at": {"type": "string", "format": "date-time"}}, "required": ["uuid", "at"]},
        {"type": "object", "allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"properties": {"b": {"type": "null"}}, "required": ["b"]}]},
        {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        {"type": "integer", "multipleOf": 7, "minimum": 20},
    ]
    for schema in schemas:
        constraint = OutputConstraint("json_schema", json.dumps(schema))
        ids = run(compiler, constraint, 0)
        check_output(constraint, compiler.vocab.decode_bytes(ids).decode())


GRAMMARS = [
    ('root ::= "(" root ")" | "x"', lambda s: s == "x"),
    ('root ::= item ("," item)*\nitem ::= [a-z]+ "=" [0-9]+', lambda s: all("=" in p for p in s.split(","))),
    ('start: "<" NAME ">" /[a-z ]+/ "</" NAME ">"\nNAME: /[a-z]{3,}/', lambda s: s.startswith("<") and s.endswith(">")),
    ('root ::= "{" ws "\\"k\\"" ws ":" ws [0-9]+ ws "}"\nws ::= [ \\t\\n]*', lambda s: json.loads(s)["k"] >= 0),
]


@pytest.mark.parametrize(("grammar", "valid"), GRAMMARS, ids=[g.split("\n")[0][:24] for g, _ in GRAMMARS])
def test_ebnf_grammars_end_by_search(compiler: GrammarCompiler, grammar: str, valid) -> None:
    constraint = OutputConstraint("grammar", grammar)
    assert not GrammarTokenChooser(compiler.compile(constraint)).has_witness
    text = compiler.vocab.decode_bytes(run(compiler, constraint, 0)).decode()
    assert valid(text), text


def test_migrated_request_goes_on(compiler: GrammarCompiler) -> None:
    """The new worker gets the generated ids: with the same seed it finishes the same output;
    with another seed (another witness) it still ends with valid output."""
    for constraint in all_constraints():
        full = run(compiler, constraint, seed=4)
        for cut in (1, len(full) // 2, len(full) - 1):
            if cut <= 0:
                continue
            assert run(compiler, constraint, seed=4, replay=full[:cut]) == full
            other = run(compiler, constraint, seed=9, replay=full[:cut])
            check_output(constraint, compiler.vocab.decode_bytes(other).decode())


def test_witnesses() -> None:
    assert regex_witness(r"\d{3}-[a-z]+") == "000-a"
    assert regex_witness(r"(abc|x)y?") == "x"
    assert regex_witness(r"[^a0]b") == "Ab"
    assert regex_witness(r"(a)\1") == "aa"
    with pytest.raises(NoWitness):
        witness_text(OutputConstraint("grammar", 'root ::= "a"'))
    with pytest.raises(NoWitness):
        witness_text(OutputConstraint("json_schema", json.dumps({"type": "string", "format": "made-up"})))
