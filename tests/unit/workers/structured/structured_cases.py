"""Test cases shared by the structured-output tests: the tiny model's vocabulary padded to an
engine vocab of 8,200 ids (the tokenizer has 8,192), constraints and their validators."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema

from dynamo.wire import OutputConstraint

MODEL_DIR = Path(__file__).resolve().parents[4] / "models" / "dynamo-tiny"
TOKENIZER_VOCAB = 8192
ENGINE_VOCAB = 8200  # 8 padded embedding rows

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "active", "role", "tags"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
        "total": {"type": "number", "minimum": 0, "maximum": 1000},
        "status": {"type": "string", "enum": ["open", "paid", "shipped"]},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "maxLength": 8}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "note": {"type": ["string", "null"], "maxLength": 10},
    },
    "required": ["id", "total", "status", "items", "note"],
    "additionalProperties": False,
}
WITH_DEFS = {
    "type": "object",
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x", "y"], "additionalProperties": False}},
    "properties": {
        "start": {"$ref": "#/$defs/point"},
        "end": {"anyOf": [{"$ref": "#/$defs/point"}, {"type": "null"}]},
        "label": {"const": "segment"},
        "when": {"type": "string", "format": "date"},
    },
    "required": ["start", "end", "label", "when"],
    "additionalProperties": False,
}
TOOL_CALL = {  # the shape a forced tool call takes
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "order": ORDER, "with_defs": WITH_DEFS, "tool_call": TOOL_CALL}
REGEXES = [r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)", r"\d{3}-\d{4}", r"(yes|no|maybe)!?", r"#[0-9a-f]{6}"]
CHOICES = [["red", "green", "blue"], ["Paris, France", "Tōkyō", "a \"quoted\" one"]]


def schema_constraint(schema: dict[str, Any]) -> OutputConstraint:
    return OutputConstraint(kind="json_schema", spec=json.dumps(schema))


def check_output(constraint: OutputConstraint, text: str) -> None:
    """Assert `text` satisfies `constraint` (by jsonschema, re, or membership)."""
    if constraint.kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(constraint.spec))
    elif constraint.kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif constraint.kind == "regex":
        assert re.fullmatch(constraint.spec, text), (constraint.spec, text)
    elif constraint.kind == "choice":
        assert text in json.loads(constraint.spec)
    else:
        raise AssertionError(f"no checker for {constraint.kind}")


def all_constraints() -> list[OutputConstraint]:
    out = [schema_constraint(s) for s in SCHEMAS.values()]
    out.append(OutputConstraint(kind="json_object"))
    out += [OutputConstraint(kind="regex", spec=r) for r in REGEXES]
    out += [OutputConstraint(kind="choice", spec=json.dumps(c)) for c in CHOICES]
    return out
