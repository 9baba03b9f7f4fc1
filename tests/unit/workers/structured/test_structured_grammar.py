"""check_constraint and compile errors: every bad constraint is an InvalidRequest that names
the problem; the check needs neither torch nor a tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from structured_cases import all_constraints

from dynamo.errors import InvalidRequest
from dynamo.wire import OutputConstraint
from workers.structured import GrammarCompiler, check_constraint

BAD = [
    (OutputConstraint("json_schema", "{not json"), "invalid JSON schema in response_format: not JSON"),
    (OutputConstraint("json_schema", "[1, 2]"), "invalid JSON schema in response_format: expected a JSON object"),
    (OutputConstraint("json_schema", "false"), "allows no value"),
    (OutputConstraint("json_schema", json.dumps({"type": "nonsense"})), "invalid JSON schema in response_format: Invalid type: nonsense"),
    (OutputConstraint("json_schema", json.dumps({"type": "object", "minProperties": "x"})), "minProperties"),
    (OutputConstraint("json_schema", json.dumps({"type": "array", "uniqueItems": True})), "unsupported JSON schema in response_format: Unimplemented keys"),
    (OutputConstraint("json_schema", json.dumps({"$ref": "#/$defs/missing"})), "invalid JSON schema"),
    (OutputConstraint("regex", "a(b"), "invalid regex in structured_outputs.regex"),
    (OutputConstraint("regex", ""), "empty regex"),
    (OutputConstraint("choice", "[]"), "non-empty JSON list of strings"),
    (OutputConstraint("choice", '["a", 1]'), "non-empty JSON list of strings"),
    (OutputConstraint("choice", "nope"), "invalid choice list in structured_outputs.choice: not JSON"),
    (OutputConstraint("grammar", "start: foo"), 'unknown name: "foo"'),
    (OutputConstraint("grammar", "root ::= undefined_rule"), "invalid grammar in structured_outputs.grammar: "),
    (OutputConstraint("grammar", "  "), "empty grammar"),
]


@pytest.mark.parametrize(("constraint", "message"), BAD, ids=[f"{c.kind}:{c.spec[:20]}" for c, _ in BAD])
def test_bad_constraints_are_invalid_requests(constraint: OutputConstraint, message: str, compiler: GrammarCompiler) -> None:
    with pytest.raises(InvalidRequest) as checked:
        check_constraint(constraint)
    assert message in checked.value.message
    assert checked.value.param in ("response_format", f"structured_outputs.{constraint.kind}")
    with pytest.raises(InvalidRequest) as compiled:
        compiler.compile(constraint)
    assert compiled.value.message == checked.value.message


def test_field_names_the_request_field() -> None:
    with pytest.raises(InvalidRequest) as raised:
        check_constraint(OutputConstraint("json_schema", "{"), field="tools[0].function.parameters")
    assert raised.value.message.startswith("invalid JSON schema in tools[0].function.parameters: ")
    assert raised.value.param == "tools[0].function.parameters"


def test_good_constraints_pass() -> None:
    for constraint in all_constraints():
        check_constraint(constraint)
    check_constraint(OutputConstraint("grammar", 'root ::= "yes" | "no"'))
    check_constraint(OutputConstraint("grammar", 'start: "a"+ "b"'))  # Lark too
    check_constraint(OutputConstraint("json_schema", "true"))


def test_check_is_cheap() -> None:
    """The frontend calls it before routing; well under a millisecond for a JSON schema."""
    constraint = all_constraints()[1]
    check_constraint(constraint)
    started = time.perf_counter()
    for _ in range(20):
        check_constraint(constraint)
    assert (time.perf_counter() - started) / 20 < 0.02  # generous: a shared CI box


def test_check_imports_no_torch() -> None:
    code = (
        "import sys, json\n"
        "from dynamo.wire import OutputConstraint\n"
        "from workers.structured import check_constraint, GrammarCompiler, GrammarTokenChooser\n"
        "check_constraint(OutputConstraint('json_schema', json.dumps({'type': 'object'})))\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
