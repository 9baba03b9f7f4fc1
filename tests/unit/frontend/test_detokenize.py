"""Incremental detokenization: multi-byte characters split over byte-level tokens are never
emitted broken; stop strings are found across token boundaries and held back while partial."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from frontend.detokenize import IncrementalDetokenizer, StopStringMatcher
from frontend.tokenizer import ModelTokenizer

MULTIBYTE = "héllo 😀 世界 ok"


def test_emoji_and_cjk_split_over_tokens_are_never_broken(tokenizer: ModelTokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    # The premise: some character spans several byte-level tokens.
    assert len(ids) > len(MULTIBYTE.split())
    assert any(tokenizer.decode([t]) == "\ufffd" or "\ufffd" in tokenizer.decode([t]) for t in ids)
    detok = IncrementalDetokenizer(tokenizer.tokenizer)
    pieces = [detok.step([t]) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == MULTIBYTE
    assert "😀" in pieces  # released whole, once its last byte arrived


def test_several_tokens_per_step(tokenizer: ModelTokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer.tokenizer)
    out = "".join(detok.step(ids[i : i + 3]) for i in range(0, len(ids), 3))
    assert out == MULTIBYTE


def test_special_tokens_are_skipped(tokenizer: ModelTokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer.tokenizer)
    assert "".join(detok.step([t]) for t in ids) == "hi"


def test_stop_string_across_token_boundaries(tokenizer: ModelTokenizer) -> None:
    text = "The answer is 42. END of story"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer.tokenizer, stop=["END"])
    emitted = []
    for t in ids:
        emitted.append(detok.step([t]))
        if detok.stopped:
            break
    assert detok.stopped
    assert "".join(emitted) == "The answer is 42. "


def test_partial_match_is_held_then_released() -> None:
    m = StopStringMatcher(["</stop>"])
    assert m.feed("abc</s") == "abc"
    assert m.feed("t") == ""
    assert m.feed("x more") == "</stx more"
    assert m.flush() == ""
    assert m.feed("tail </") == "tail "
    assert m.flush() == "</"


def test_earliest_stop_wins() -> None:
    m = StopStringMatcher(["world", "lo w"])
    assert m.feed("hello world") == "hel"
    assert m.matched == "lo w" and m.stopped
    assert m.feed("more") == ""


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc<>/ ", max_size=40),
    stops=st.lists(st.text(alphabet="abc<>/", min_size=1, max_size=4), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_matcher_equals_whole_text_reference(text: str, stops: list[str], cuts: list[int]) -> None:
    """Streaming semantics (vLLM's): generation stops as soon as a stop string is complete, so
    the output is the text seen so far cut at the earliest stop in it. A longer stop string that
    started earlier but would only complete later does not win."""
    m = StopStringMatcher(stops)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    positions: list[int] = []
    for b in bounds[1:]:
        positions = [i for i in (text[:b].find(s) for s in stops) if i != -1]
        if positions:
            break
    expected = text[: min(positions)] if positions else text
    out = "".join(m.feed(text[a:b]) for a, b in zip(bounds, bounds[1:]))
    out += m.flush()
    assert out == expected
    assert m.stopped == bool(positions)
