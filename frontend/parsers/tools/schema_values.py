"""A tool parameter's text, as XML formats write it, turned into the JSON value its schema
asks for (Qwen3-Coder's `<parameter=days>3</parameter>` is the integer 3 when `days` is an
integer). Text that fits no declared type stays a string: the client validates."""

from __future__ import annotations

import ast
from typing import Any

from frontend.parsers.tools.base import strict_loads


def schema_types(schema: Any) -> set[str]:
    """The JSON types a schema allows (from `type`, or its `anyOf`/`oneOf` branches)."""
    if not isinstance(schema, dict):
        return set()
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {t for t in declared if isinstance(t, str)}
    out: set[str] = set()
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            out |= schema_types(sub)
    return out


_NOT_JSON = object()  # sentinel: the text did not parse as JSON
_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def convert_value(text: str, schema: Any) -> Any:
    """A parameter's text as the JSON value its schema asks for. Text that does not fit the
    schema stays a string (the client validates); without a schema, JSON if it parses."""
    types = schema_types(schema)
    if types == {"string"}:
        return text
    stripped = text.strip()
    try:
        value = strict_loads(stripped)
    except (ValueError, RecursionError):
        value = _NOT_JSON
    if not types:
        return text if value is _NOT_JSON else value
    if value is not _NOT_JSON and any(_CHECKS.get(t, _never)(value) for t in types):
        return value
    lowered = stripped.lower()
    if "boolean" in types and lowered in ("true", "false"):
        return lowered == "true"
    if "integer" in types and isinstance(value, float) and value.is_integer():
        return int(value)
    if "null" in types and lowered in ("null", "none"):
        return None
    if types & {"object", "array"}:
        try:  # a Python literal: single quotes, True/False/None
            literal = ast.literal_eval(stripped)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            literal = _NOT_JSON
        if isinstance(literal, dict) and "object" in types or isinstance(literal, list) and "array" in types:
            return literal
    return text


def _never(value: Any) -> bool:
    return False
