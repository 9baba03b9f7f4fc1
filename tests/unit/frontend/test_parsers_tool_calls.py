"""Tool-call parsers: each family's spellings, malformed calls as content, and the property
that streamed deltas concatenate to the non-streamed result for any split of the text."""

from __future__ import annotations

import json
import keyword
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontend.parsers import TOOL_CALL_PARSERS, ParsedDelta, ToolSpec, tool_call_parser


@dataclass
class Result:
    content: str
    calls: list[tuple[str, str]]  # (name, arguments text)
    has_tool_calls: bool


def collect(deltas: list[ParsedDelta], has_tool_calls: bool) -> Result:
    """Joins a stream's deltas the way an OpenAI client does, checking the fragment shape."""
    content = []
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        content.append(delta.content)
        for frag in delta.tool_calls:
            if frag.index not in calls:
                assert frag.index == len(calls), "calls are numbered 0, 1, ... in order"
                assert frag.id and frag.id.startswith("call_") and frag.name, "first fragment carries id and name"
                calls[frag.index] = [frag.name, frag.arguments]
            else:
                assert frag.id is None and frag.name is None, "only the first fragment has id and name"
                calls[frag.index][1] += frag.arguments
    out = [(name, args) for name, args in (calls[i] for i in range(len(calls)))]
    for _, args in out:
        assert isinstance(json.loads(args), dict), "arguments are a JSON object"
    return Result("".join(content), out, has_tool_calls)


def parse(name: str, text: str, tools: list[ToolSpec] | None = None, cuts: list[int] | None = None) -> Result:
    """Feeds text split at `cuts` (None: in one piece), then finish()."""
    parser = tool_call_parser(name, tools)
    bounds = [0, *sorted(set(c for c in (cuts or []) if 0 < c < len(text))), len(text)]
    deltas = [parser.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])]
    deltas.append(parser.finish())
    return collect(deltas, parser.has_tool_calls)


def assert_split_invariant(name: str, text: str, tools: list[ToolSpec] | None, cuts: list[int]) -> Result:
    whole = parse(name, text, tools)
    assert parse(name, text, tools, list(range(len(text)))) == whole  # one character at a time
    assert parse(name, text, tools, cuts) == whole
    return whole


# -- generators ------------------------------------------------------------------------------

identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(lambda s: not keyword.iskeyword(s) and s != "__debug__")
# Unicode, quotes, backslashes, control characters and the characters markers are made of.
texts = st.text(st.sampled_from(list("<>[]{}()/|_=;:,\"'\\\n\t ")) | st.characters(), max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8)
arguments = st.dictionaries(identifiers, values, max_size=4)
calls = st.lists(st.tuples(identifiers, arguments), min_size=1, max_size=3)
cut_points = st.lists(st.integers(0, 2000), max_size=12)

PLAIN_ALPHABET = st.sampled_from(list("<>[]{}/|_=;tool_call\n é😀")) | st.characters()


def plain(*forbidden: str, max_size: int = 20) -> st.SearchStrategy[str]:
    return st.text(PLAIN_ALPHABET, max_size=max_size).filter(lambda s: not any(f in s for f in forbidden))


def expected_calls(generated: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, str]]:
    return [(n, json.dumps(a, ensure_ascii=False)) for n, a in generated]


# -- properties, one per family -------------------------------------------------------------

@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=plain("<tool_call>"),
    generated=calls,
    gaps=st.lists(plain("<tool_call>", max_size=6), min_size=3, max_size=3),
    ascii_json=st.booleans(),
    cuts=cut_points,
)
def test_hermes_property(before, generated, gaps, ascii_json, cuts):
    parts = [before]
    for (name, args), gap in zip(generated, gaps):
        body = json.dumps({"name": name, "arguments": args}, ensure_ascii=ascii_json)
        parts.append(f"<tool_call>\n{body}\n</tool_call>{gap}")
    text = "".join(parts)
    result = assert_split_invariant("hermes", text, None, cuts)
    assert result.calls == expected_calls(generated)
    assert result.content == before + "".join(g.lstrip() for g in gaps[: len(generated)])
    assert result.has_tool_calls


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.sampled_from(["", " ", "\n", "<|python_tag|>", "\n<|python_tag|>"]),
    generated=calls,
    seps=st.lists(st.sampled_from(["; ", ";", "\n", " ; ", ";\n"]), min_size=3, max_size=3),
    key=st.sampled_from(["parameters", "arguments"]),
    after=plain("<|python_tag|>").filter(lambda s: not s.lstrip().startswith((";", "{"))),
    cuts=cut_points,
)
def test_llama3_json_property(lead, generated, seps, key, after, cuts):
    objects = [json.dumps({"name": n, key: a}, ensure_ascii=False) for n, a in generated]
    text = lead + "".join(o + s for o, s in zip(objects[:-1], seps)) + objects[-1] + after
    result = assert_split_invariant("llama3_json", text, None, cuts)
    assert result.calls == expected_calls(generated)
    assert result.content == after.lstrip()


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=plain("[TOOL_CALLS]"),
    generated=calls,
    form=st.sampled_from(["list", "list_space", "args", "bare", "call_id"]),
    after=plain("[TOOL_CALLS]"),
    cuts=cut_points,
)
def test_mistral_property(before, generated, form, after, cuts):
    if form.startswith("list"):
        body = json.dumps([{"name": n, "arguments": a} for n, a in generated], ensure_ascii=False)
        text = before + "[TOOL_CALLS]" + (" " if form == "list_space" else "") + body + after
    else:
        tag = {"args": "[ARGS]", "bare": "", "call_id": "[CALL_ID]a1B2c3D4e[ARGS]"}[form]
        text = before + "".join(f"[TOOL_CALLS]{n}{tag}{json.dumps(a, ensure_ascii=False)}" for n, a in generated) + after
    result = assert_split_invariant("mistral", text, None, cuts)
    assert result.calls == expected_calls(generated)
    assert result.content == before + after.lstrip()


def _py_call(name: str, args: dict[str, Any]) -> str:
    return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.sampled_from(["", " ", "\n"]),
    tagged=st.booleans(),
    generated=calls,
    sep=st.sampled_from([", ", ",", ",\n "]),
    after=plain().filter(lambda s: not s.lstrip().startswith("<")),
    cuts=cut_points,
)
def test_pythonic_property(lead, tagged, generated, sep, after, cuts):
    listing = "[" + sep.join(_py_call(n, a) for n, a in generated) + "]"
    text = lead + ("<|python_start|>" + listing + "<|python_end|>" if tagged else listing) + after
    result = assert_split_invariant("pythonic", text, None, cuts)
    assert result.calls == expected_calls(generated)
    assert result.content == after.lstrip()


_JSON_TYPES = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
# A value holding one of these tags is ambiguous in this format (a value without </parameter>
# ends at the next tag, as in vLLM's parser), so generated values leave them out.
XML_TAGS = ("</parameter>", "<parameter=", "</function>")
xml_values = values.filter(lambda v: not any(t in (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)) for t in XML_TAGS))
# Names unique per output, so that each call has its own schema in the request's tools.
xml_calls = st.lists(
    st.tuples(identifiers, st.dictionaries(identifiers, xml_values, max_size=4)), min_size=1, max_size=3, unique_by=lambda c: c[0]
)


def _xml_call(name: str, args: dict[str, Any]) -> str:
    params = "".join(
        f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}\n</parameter>\n"
        for k, v in args.items()
    )
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def _xml_tools(generated: list[tuple[str, dict[str, Any]]]) -> list[ToolSpec]:
    return [
        ToolSpec(n, {"type": "object", "properties": {k: {"type": _JSON_TYPES[type(v)]} for k, v in a.items()}})
        for n, a in generated
    ]


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=plain("<tool_call>", "<function="),
    generated=xml_calls,
    gaps=st.lists(plain("<tool_call>", "<function=", max_size=6), min_size=3, max_size=3),
    cuts=cut_points,
)
def test_qwen3_coder_property(before, generated, gaps, cuts):
    text = before + "".join(_xml_call(n, a) + g for (n, a), g in zip(generated, gaps))
    result = assert_split_invariant("qwen3_coder", text, _xml_tools(generated), cuts)
    assert result.calls == expected_calls(generated)
    assert result.content == before + "".join(g.lstrip() for g in gaps[: len(generated)])


@settings(max_examples=100)
@given(text=plain(max_size=60), cuts=cut_points, family=st.sampled_from(TOOL_CALL_PARSERS))
def test_any_text_is_split_invariant(text, cuts, family):
    """Whatever the model writes (markers, halves of markers, broken JSON), no exception and
    the same result for every split."""
    assert_split_invariant(family, text, None, cuts)


@settings(max_examples=100)
@given(
    family=st.sampled_from(TOOL_CALL_PARSERS),
    text=st.text(st.sampled_from(list('<tool_call>[TOOL_CALLS]{"name": }()=,;|python_tag</function=parameter>\n')), max_size=80),
    cuts=cut_points,
)
def test_marker_soup_is_split_invariant(family, text, cuts):
    assert_split_invariant(family, text, None, cuts)


# -- hermes ----------------------------------------------------------------------------------

def test_hermes_qwen_output():
    text = (
        "I'll check both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        "</tool_call>\n<tool_call>\n"
        '{"arguments": {"city": "東京"}, "name": "get_weather"}\n'
        "</tool_call>"
    )
    r = parse("hermes", text, [ToolSpec("get_weather")])
    assert r.content == "I'll check both.\n"
    assert r.calls == [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("get_weather", '{"city": "東京"}')]
    assert r.has_tool_calls


@pytest.mark.parametrize(
    "inner",
    ["{not json}", '{"arguments": {}}', '["get_weather"]', '{"name": "f", "arguments": [1]}', '{"name": "f", "arguments": NaN}'],
)
def test_hermes_malformed_call_is_content(inner):
    text = f"a <tool_call>{inner}</tool_call> b"
    r = parse("hermes", text)
    assert r == Result(text, [], False)


def test_hermes_unclosed_call_at_the_end():
    assert parse("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n').calls == [("f", '{"a": 1}')]
    assert parse("hermes", "<tool_call>\n{\"name\": \"f\", ").content == '<tool_call>\n{"name": "f", '


def test_hermes_string_arguments_are_decoded():
    r = parse("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert r.calls == [("f", '{"a": 1}')]


def test_hermes_holds_only_what_may_be_a_marker():
    p = tool_call_parser("hermes", None)
    assert p.feed("Hello <").content == "Hello "
    assert p.feed("b").content == "<b"
    assert p.feed(" x <tool_").content == " x "
    assert p.feed("cal").content == ""
    assert p.feed("x").content == "<tool_calx"
    assert p.finish() == ParsedDelta()


def test_unknown_tool_name_is_returned_and_noted(caplog):
    p = tool_call_parser("hermes", [ToolSpec("get_weather")])
    p.feed('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>')
    p.finish()
    assert p.has_tool_calls
    assert p.unknown_tool_names == ["rm_rf"]  # type: ignore[attr-defined]
    assert "rm_rf" in caplog.text


def test_plain_text_passes_straight_through():
    for family in TOOL_CALL_PARSERS:
        p = tool_call_parser(family, None)
        assert p.feed("Hello, ").content == "Hello, "
        assert p.feed("world.").content == "world."
        assert p.finish() == ParsedDelta()
        assert not p.has_tool_calls


def test_unknown_parser_name():
    with pytest.raises(ValueError, match="hermes.*llama3_json.*mistral.*pythonic.*qwen3_coder"):
        tool_call_parser("nope", None)


# -- llama3_json -----------------------------------------------------------------------------

def test_llama3_python_tag_and_semicolons():
    text = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    assert parse("llama3_json", text).calls == [("a", '{"x": 1}'), ("b", "{}")]


def test_llama3_json_answer_is_content():
    for text in ('{"answer": 42}', "{ not json at all", '  {"name": 1}', "{'name': 'f'}"):
        assert parse("llama3_json", text) == Result(text, [], False)


def test_llama3_reply_starting_with_brace_is_not_held():
    p = tool_call_parser("llama3_json", None)
    assert p.feed("{x").content == "{x"  # a call's first key is a string


def test_llama3_calls_only_at_the_start():
    text = 'Here: {"name": "f", "parameters": {}}'
    assert parse("llama3_json", text) == Result(text, [], False)


# -- mistral ---------------------------------------------------------------------------------

def test_mistral_pre_v11_list():
    text = '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 3.5, "b": 4}}, {"name": "neg", "arguments": {"x": 1}}]'
    assert parse("mistral", text).calls == [("add", '{"a": 3.5, "b": 4}'), ("neg", '{"x": 1}')]


def test_mistral_v11_forms():
    text = 'Sure.[TOOL_CALLS]add[ARGS]{"a": 3.5, "b": 4}[TOOL_CALLS]neg{"x": 1}'
    r = parse("mistral", text)
    assert r.content == "Sure."
    assert r.calls == [("add", '{"a": 3.5, "b": 4}'), ("neg", '{"x": 1}')]


@pytest.mark.parametrize("text", ["[TOOL_CALLS] hello there", "[TOOL_CALLS]f{bad}", "[TOOL_CALLS][1, 2]", "x [TOOL_CALLS]"])
def test_mistral_malformed_is_content(text):
    assert parse("mistral", text) == Result(text, [], False)


# -- pythonic --------------------------------------------------------------------------------

def test_pythonic_literals_become_json():
    text = '[get_weather(city="Paris", days=3, hourly=True, extra=None, ids=(1, 2), opts={\'a\': -1.5})]'
    assert parse("pythonic", text).calls == [
        ("get_weather", '{"city": "Paris", "days": 3, "hourly": true, "extra": null, "ids": [1, 2], "opts": {"a": -1.5}}')
    ]


def test_pythonic_llama4_tags_and_text_after():
    r = parse("pythonic", '<|python_start|>[f(x=1)]<|python_end|>\n\nDone.')
    assert r.calls == [("f", '{"x": 1}')]
    assert r.content == "Done."


@pytest.mark.parametrize(
    "text", ["[1, 2, 3]", "[Note: it's fine]", "[f(1)]", "[f(x=g())]", "[f(x={1, 2})]", "[f(x=1]", "[f(x=", "Call [f(x=1)]", "[]"]
)
def test_pythonic_non_calls_are_content(text):
    assert parse("pythonic", text) == Result(text, [], False)


def test_pythonic_unfinished_list_keeps_its_complete_calls():
    # Generation cut short (max_tokens): a call already handed out stays a call.
    assert parse("pythonic", "[f(x=1), g(y=").calls == [("f", '{"x": 1}')]
    assert parse("pythonic", "[f(x=1), g(y=").content == ", g(y="


def test_pythonic_calls_stream_one_by_one():
    p = tool_call_parser("pythonic", None)
    first = p.feed("[f(a=1), g(")
    assert [(c.index, c.name, c.arguments) for c in first.tool_calls] == [(0, "f", '{"a": 1}')]
    assert [(c.index, c.name) for c in p.feed("b='x)')]").tool_calls] == [(1, "g")]


# -- qwen3_coder -----------------------------------------------------------------------------

WEATHER = ToolSpec(
    "get_weather",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "temp": {"type": "number"},
            "hourly": {"type": "boolean"},
            "opts": {"type": "object"},
            "tags": {"type": "array"},
            "note": {"type": ["string", "null"]},
        },
    },
)


def test_qwen3_coder_converts_with_the_schema():
    text = (
        "<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\n123\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n"
        "<parameter=temp>\n21.5\n</parameter>\n"
        "<parameter=hourly>\nTrue\n</parameter>\n"
        "<parameter=opts>\n{'unit': 'C'}\n</parameter>\n"
        "<parameter=tags>\n[\"a\"]\n</parameter>\n"
        "<parameter=note>\nnull\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    args = json.loads(parse("qwen3_coder", text, [WEATHER]).calls[0][1])
    assert args == {"city": "123", "days": 3, "temp": 21.5, "hourly": True, "opts": {"unit": "C"}, "tags": ["a"], "note": None}


def test_qwen3_coder_without_schema_keeps_json_else_strings():
    text = "<tool_call>\n<function=f>\n<parameter=a>\n42\n</parameter>\n<parameter=b>\nhello world\n</parameter>\n</function>\n</tool_call>"
    assert parse("qwen3_coder", text).calls == [("f", '{"a": 42, "b": "hello world"}')]


def test_qwen3_coder_value_not_fitting_the_schema_stays_text():
    text = "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n</function>\n</tool_call>"
    assert parse("qwen3_coder", text, [WEATHER]).calls == [("get_weather", '{"days": "three"}')]


def test_qwen3_coder_string_parameter_streams():
    p = tool_call_parser("qwen3_coder", [WEATHER])
    head = p.feed("<tool_call>\n<function=get_weather>\n<parameter=city>\nNew ")
    assert [(c.name, c.arguments) for c in head.tool_calls] == [("get_weather", '{"city": "New ')]
    assert [c.arguments for c in p.feed('Yo"rk\n').tool_calls] == ['Yo\\"rk']  # the newline may be the last
    assert [c.arguments for c in p.feed("</parameter>\n</function>\n</tool_call>").tool_calls] == ['"}']


def test_qwen3_coder_lenient_endings():
    # No </parameter>, no </function>, no </tool_call>: values end at the next tag or the end.
    text = "<tool_call>\n<function=f>\n<parameter=a>\n1\n<parameter=b>\nx\n"
    assert parse("qwen3_coder", text).calls == [("f", '{"a": 1, "b": "x"}')]
    bare = "<function=f>\n<parameter=a>\n1\n</parameter>\n</function>"
    assert parse("qwen3_coder", bare).calls == [("f", '{"a": 1}')]


@pytest.mark.parametrize("text", ['<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', "<tool_call>\n<function=bad\nname>"])
def test_qwen3_coder_malformed_is_content(text):
    assert parse("qwen3_coder", text) == Result(text, [], False)


def test_qwen3_coder_duplicate_parameter_keeps_the_first():
    text = "<function=f><parameter=a>1</parameter><parameter=a>2</parameter></function>"
    assert parse("qwen3_coder", text).calls == [("f", '{"a": 1}')]
