"""Reasoning parsers: `<think>` splitting for deepseek_r1 and qwen3, and the property that the
streamed (reasoning, content) deltas concatenate to the non-streamed split for any chunking."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontend.parsers import REASONING_PARSERS, reasoning_parser


def split(name: str, text: str, cuts: list[int] | None = None, thinking: bool = True) -> tuple[str, str]:
    parser = reasoning_parser(name, thinking=thinking)
    bounds = [0, *sorted(set(c for c in (cuts or []) if 0 < c < len(text))), len(text)]
    reasoning, content = [], []
    for a, b in zip(bounds, bounds[1:]):
        r, c = parser.feed(text[a:b])
        reasoning.append(r)
        content.append(c)
    r, c = parser.finish()
    return "".join(reasoning) + r, "".join(content) + c


def split_invariant(name: str, text: str, cuts: list[int]) -> tuple[str, str]:
    whole = split(name, text)
    assert split(name, text, list(range(len(text)))) == whole
    assert split(name, text, cuts) == whole
    return whole


ALPHABET = st.sampled_from(list("<>/think \n\té😀")) | st.characters()
free = st.text(ALPHABET, max_size=30).filter(lambda s: "<think>" not in s and "</think>" not in s)
cuts = st.lists(st.integers(0, 200), max_size=10)


@settings(max_examples=200)
@given(opened=st.booleans(), lead=st.sampled_from(["", "\n", " \n"]), thought=free, answer=st.text(ALPHABET, max_size=30), cut=cuts)
def test_deepseek_r1_property(opened, lead, thought, answer, cut):
    # The template opens <think> in the prompt; older ones leave it to the model.
    text = lead + ("<think>" if opened else "") + thought + "</think>" + answer
    assert split_invariant("deepseek_r1", text, cut) == (thought.lstrip(), answer.lstrip())


@settings(max_examples=200)
@given(lead=st.sampled_from(["", "\n", " "]), thought=free, answer=st.text(ALPHABET, max_size=30), cut=cuts)
def test_qwen3_property(lead, thought, answer, cut):
    text = lead + "<think>" + thought + "</think>" + answer
    assert split_invariant("qwen3", text, cut) == (thought.lstrip(), answer.lstrip())


@settings(max_examples=200)
@given(name=st.sampled_from(REASONING_PARSERS), text=st.text(ALPHABET, max_size=60), cut=cuts)
def test_any_text_is_split_invariant(name, text, cut):
    reasoning, content = split_invariant(name, text, cut)
    assert len(reasoning) + len(content) <= len(text)


def test_deepseek_r1_without_end_tag_is_all_reasoning():
    assert split("deepseek_r1", "still thinking <thi") == ("still thinking <thi", "")


def test_qwen3_without_think_is_all_content():
    # enable_thinking=False: the template closes the block itself, the output is the answer.
    assert split("qwen3", "Paris is the capital. <think>x</think>") == ("", "Paris is the capital. <think>x</think>")


def test_qwen3_empty_think_block():
    assert split("qwen3", "<think>\n\n</think>\n\nParis.") == ("", "Paris.")


def test_only_one_block():
    assert split("qwen3", "<think>a</think>b</think><think>c") == ("a", "b</think><think>c")


def test_thinking_off_passes_through():
    assert split("deepseek_r1", "<think>a</think>b", thinking=False) == ("", "<think>a</think>b")


def test_streaming_holds_only_a_possible_tag():
    p = reasoning_parser("deepseek_r1")
    assert p.feed("I think <") == ("I think ", "")
    assert p.feed("b") == ("<b", "")
    assert p.feed(" </thi") == (" ", "")
    assert p.feed("nk>\n\nAns") == ("", "Ans")
    assert p.feed("wer") == ("", "wer")
    assert p.finish() == ("", "")


def test_qwen3_waits_for_the_opening_tag():
    p = reasoning_parser("qwen3")
    assert p.feed("<thi") == ("", "")
    assert p.feed("nk>hm") == ("hm", "")
    q = reasoning_parser("qwen3")
    assert q.feed("<b") == ("", "<b")


def test_unknown_name():
    with pytest.raises(ValueError, match="deepseek_r1.*qwen3"):
        reasoning_parser("nope")
