"""A short text that satisfies a constraint: a small valid instance of a JSON schema, a shortest
match of a regex, one of the choices. The mocker walks it token by token (chooser.py); the
grammar matcher checks every token, so a witness that is wrong only costs a fallback.

Covers what structured-output requests use: object (required properties, in schema order),
array (minItems, items, prefixItems), string (enum, const, pattern, format, min/maxLength),
number and integer (bounds, multipleOf), boolean, null, anyOf/oneOf (first branch that works),
allOf (merged), local $ref. Regexes as Python's `re` parses them."""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any

# The parser behind `re` (public as sre_parse until 3.11, deprecated since): the one place that
# knows Python's regex syntax. Only the witness uses it; a construct it does not know is NoWitness.
import re._constants as sre_constants  # type: ignore[import-not-found]
import re._parser as sre_parse  # type: ignore[import-not-found]

from dynamo.wire import OutputConstraint


class NoWitness(Exception):
    """The constraint uses something this module cannot build an instance for."""


_WORDS = ("alpha", "bravo", "delta", "echo", "lima", "sierra", "tango", "zulu")
_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "email": "a@example.com",
    "uuid": "00000000-0000-0000-0000-000000000000",
    "uri": "https://example.com",
    "hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
}
_MAX_DEPTH = 32


def witness_text(constraint: OutputConstraint, seed: int = 0) -> str:
    """Raises NoWitness where it cannot build one (EBNF grammars, unsupported keywords)."""
    rng = random.Random(seed)
    kind = constraint.kind
    if kind == "json_object":
        return "{}"
    if kind == "json_schema":
        try:
            schema = json.loads(constraint.spec)
        except ValueError as exc:
            raise NoWitness(str(exc)) from None
        if schema is True:
            schema = {}
        value = _JsonWitness(schema, rng).build(schema, 0)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if kind == "regex":
        return regex_witness(constraint.spec)
    if kind == "choice":
        choices = json.loads(constraint.spec)
        return rng.choice(choices)
    raise NoWitness(f"no witness for {kind} constraints")


class _JsonWitness:
    def __init__(self, root: Any, rng: random.Random) -> None:
        self.root = root
        self.rng = rng

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise NoWitness(f"non-local $ref {ref!r}")
        node = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise NoWitness(f"unresolvable $ref {ref!r}")
            node = node[part]
        return node

    def build(self, schema: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise NoWitness("schema nests too deep")
        if schema is True or schema == {}:
            return None
        if not isinstance(schema, dict):
            raise NoWitness(f"schema {schema!r}")
        if "$ref" in schema:
            target = self._resolve(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            return self.build({**target, **rest} if isinstance(target, dict) else target, depth + 1)
        if "allOf" in schema:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self._resolve(part["$ref"]) if isinstance(part, dict) and "$ref" in part else part
                merged = _merge(merged, part)
            return self.build(merged, depth + 1)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self.rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                base = {k: v for k, v in schema.items() if k != key}
                errors = []
                for branch in schema[key]:
                    try:
                        return self.build(_merge(base, branch) if base else branch, depth + 1)
                    except NoWitness as exc:
                        errors.append(str(exc))
                raise NoWitness("; ".join(errors))
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = "null" if "null" in kind else kind[0]
        if kind is None:
            kind = _infer_type(schema)
        build = getattr(self, f"_{kind}", None)
        if build is None:
            raise NoWitness(f"type {kind!r}")
        return build(schema, depth)

    def _null(self, schema: dict[str, Any], depth: int) -> Any:
        return None

    def _boolean(self, schema: dict[str, Any], depth: int) -> Any:
        return self.rng.random() < 0.5

    def _integer(self, schema: dict[str, Any], depth: int) -> Any:
        low = schema.get("minimum")
        high = schema.get("maximum")
        if "exclusiveMinimum" in schema:
            low = math.floor(schema["exclusiveMinimum"]) + 1
        if "exclusiveMaximum" in schema:
            high = math.ceil(schema["exclusiveMaximum"]) - 1
        value = math.ceil(low) if low is not None else 0 if high is None or high >= 0 else math.floor(high)
        step = schema.get("multipleOf")
        if step:
            value = math.ceil(value / step) * step
            value = int(value) if float(value).is_integer() else value
        if high is not None and value > high:
            raise NoWitness("no integer in bounds")
        return int(value)

    def _number(self, schema: dict[str, Any], depth: int) -> Any:
        if "multipleOf" in schema or not any(k in schema for k in ("exclusiveMinimum", "exclusiveMaximum")):
            return self._integer(schema, depth)
        low = schema.get("exclusiveMinimum", schema.get("minimum"))
        high = schema.get("exclusiveMaximum", schema.get("maximum"))
        if low is None:
            assert high is not None
            return high - 1 if high <= 0 else 0
        if high is None:
            return math.floor(low) + 1
        return (low + high) / 2

    def _string(self, schema: dict[str, Any], depth: int) -> Any:
        if "pattern" in schema:
            return regex_witness(schema["pattern"])
        fmt = schema.get("format")
        if fmt is not None:
            if fmt not in _FORMATS:
                raise NoWitness(f"string format {fmt!r}")
            return _FORMATS[fmt]
        low = int(schema.get("minLength", 0))
        high = schema.get("maxLength")
        text = self.rng.choice(_WORDS)
        if len(text) < low:
            text += "a" * (low - len(text))
        if high is not None:
            text = text[: int(high)]
        return text

    def _array(self, schema: dict[str, Any], depth: int) -> Any:
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", {})
        if isinstance(items, list):  # draft-04..2019 tuple form
            prefix, items = items, schema.get("additionalItems", {})
        count = max(int(schema.get("minItems", 0)), 0)
        out = [self.build(prefix[i], depth + 1) for i in range(min(count, len(prefix)))]
        while len(out) < count:
            if items is False:
                raise NoWitness("minItems beyond prefixItems with items false")
            out.append(self.build(items, depth + 1))
        return out

    def _object(self, schema: dict[str, Any], depth: int) -> Any:
        properties = schema.get("properties") or {}
        required = list(schema.get("required") or [])
        out: dict[str, Any] = {}
        for name, sub in properties.items():  # schema order: the grammar's order
            if name in required:
                out[name] = self.build(sub, depth + 1)
        for name in required:
            if name not in out:
                extra = schema.get("additionalProperties", {})
                if extra is False:
                    raise NoWitness(f"required {name!r} is not an allowed property")
                out[name] = self.build(extra if isinstance(extra, dict) else {}, depth + 1)
        return out


def _infer_type(schema: dict[str, Any]) -> str:
    if any(k in schema for k in ("properties", "required", "additionalProperties")):
        return "object"
    if any(k in schema for k in ("items", "prefixItems", "minItems")):
        return "array"
    if any(k in schema for k in ("pattern", "format", "minLength", "maxLength")):
        return "string"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")):
        return "number"
    return "null"


def _merge(a: dict[str, Any], b: Any) -> dict[str, Any]:
    if not isinstance(b, dict):
        raise NoWitness("allOf/anyOf branch is not an object schema")
    out = dict(a)
    for key, value in b.items():
        if key == "properties":
            out[key] = {**out.get(key, {}), **value}
        elif key == "required":
            out[key] = list(dict.fromkeys([*out.get(key, []), *value]))
        else:
            out[key] = value
    return out


# --- regex ------------------------------------------------------------------------------------

_C = sre_constants
_CATEGORY_CHAR = {
    _C.CATEGORY_DIGIT: "0",
    _C.CATEGORY_NOT_DIGIT: "a",
    _C.CATEGORY_SPACE: " ",
    _C.CATEGORY_NOT_SPACE: "a",
    _C.CATEGORY_WORD: "a",
    _C.CATEGORY_NOT_WORD: " ",
}
_CANDIDATES = "a0A _-.x9Z~!"


def regex_witness(pattern: str) -> str:
    """A short string that `pattern` matches in full (anchors are ignored)."""
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError) as exc:
        raise NoWitness(f"regex: {exc}") from None
    groups: dict[int, str] = {}
    text = _sre(parsed, groups)
    if re.fullmatch(pattern, text) is None and re.search(pattern, text) is None:
        raise NoWitness(f"regex {pattern!r}: built {text!r}, which does not match")
    return text


def _sre(items: Any, groups: dict[int, str]) -> str:
    return "".join(_sre_item(op, av, groups) for op, av in items)


def _in_set(items: list[tuple[Any, Any]], char: str) -> bool:
    code = ord(char)
    for op, av in items:
        if op is _C.LITERAL and av == code:
            return True
        if op is _C.RANGE and av[0] <= code <= av[1]:
            return True
        if op is _C.CATEGORY and re.fullmatch(_category_regex(av), char):
            return True
    return False


def _category_regex(category: Any) -> str:
    return {
        _C.CATEGORY_DIGIT: r"\d",
        _C.CATEGORY_NOT_DIGIT: r"\D",
        _C.CATEGORY_SPACE: r"\s",
        _C.CATEGORY_NOT_SPACE: r"\S",
        _C.CATEGORY_WORD: r"\w",
        _C.CATEGORY_NOT_WORD: r"\W",
    }.get(category, r"[^\s\S]")


def _sre_item(op: Any, av: Any, groups: dict[int, str]) -> str:
    if op is _C.LITERAL:
        return chr(av)
    if op is _C.NOT_LITERAL:
        return "a" if av != ord("a") else "b"
    if op is _C.ANY:
        return "a"
    if op is _C.IN:
        if av and av[0][0] is _C.NEGATE:
            rest = av[1:]
            for char in _CANDIDATES:
                if not _in_set(rest, char):
                    return char
            raise NoWitness("negated class excludes every candidate")
        first_op, first = av[0]
        if first_op is _C.LITERAL:
            return chr(first)
        if first_op is _C.RANGE:
            return chr(first[0])
        if first_op is _C.CATEGORY and first in _CATEGORY_CHAR:
            return _CATEGORY_CHAR[first]
        raise NoWitness(f"character class item {first_op}")
    if op in (_C.MAX_REPEAT, _C.MIN_REPEAT) or getattr(_C, "POSSESSIVE_REPEAT", None) is op:
        low, _high, sub = av
        return "".join(_sre(sub, groups) for _ in range(low))
    if op is _C.SUBPATTERN:
        group, _add, _del, sub = av
        text = _sre(sub, groups)
        if group is not None:
            groups[group] = text
        return text
    if getattr(_C, "ATOMIC_GROUP", None) is op:
        return _sre(av, groups)
    if op is _C.BRANCH:
        options = [_sre(branch, dict(groups)) for branch in av[1]]
        return min(options, key=len)
    if op is _C.AT or op in (_C.ASSERT, _C.ASSERT_NOT):
        return ""
    if op is _C.GROUPREF:
        return groups.get(av, "")
    raise NoWitness(f"regex construct {op}")
