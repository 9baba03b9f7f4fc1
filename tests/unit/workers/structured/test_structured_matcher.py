"""GrammarMatcher and GrammarCompiler: masks allow exactly the grammar's continuations (checked
against a brute force over every vocabulary id; where the grammar forces bytes, exactly their
canonical first token), stop tokens exactly where the grammar can end, padded ids never; replay,
rollback and the compile cache."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import regex
from structured_cases import ENGINE_VOCAB, MODEL_DIR, PERSON, TOKENIZER_VOCAB, schema_constraint

from dynamo.errors import DynamoError
from dynamo.wire import OutputConstraint
from workers.structured import GrammarCompiler, GrammarMatcher, allocate_bitmask, allowed_token_ids
from workers.structured.witness import witness_text

STOPS = {3, 1}  # generation_config.json's eos_token_id: [3, 1]


def mask_of(matcher: GrammarMatcher) -> set[int]:
    bitmask = allocate_bitmask(1, ENGINE_VOCAB)
    matcher.fill_mask(bitmask, 0)
    return set(allowed_token_ids(bitmask, 0, ENGINE_VOCAB).tolist())


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the byte-level BPE's token strings to bytes,
    computed here so the brute force does not use llguidance's view of the vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTES = _byte_level_decoder()


def token_bytes(compiler: GrammarCompiler, token: int) -> bytes:
    return bytes(_BYTES[ch] for ch in compiler.vocab.tokenizer.id_to_token(token))


def brute_force(compiler: GrammarCompiler, prefix: bytes, is_prefix, is_complete) -> set[int]:
    """Every id whose bytes keep `prefix` inside the language, plus the stops if it is complete."""
    allowed = set()
    for token in range(5, TOKENIZER_VOCAB):  # 0-4 are the special tokens: never text
        if is_prefix(prefix + token_bytes(compiler, token)):
            allowed.add(token)
    if is_complete(prefix):
        allowed |= STOPS
    return allowed


def regex_oracle(pattern: str):
    compiled = regex.compile(pattern.encode())
    return (lambda b: compiled.fullmatch(b, partial=True) is not None), (lambda b: compiled.fullmatch(b) is not None)


def choice_oracle(choices: list[str]):
    encoded = [c.encode() for c in choices]
    return (lambda b: any(c.startswith(b) for c in encoded)), (lambda b: b in encoded)


CASES = [
    (OutputConstraint("regex", "(ab|cd)+e?"), regex_oracle("(ab|cd)+e?")),
    (OutputConstraint("regex", "[a-c]{2,3}x"), regex_oracle("[a-c]{2,3}x")),
    (OutputConstraint("regex", "(yes|no)!?"), regex_oracle("(yes|no)!?")),
    (OutputConstraint("choice", json.dumps(["red", "reddish", "Tōkyō", "a b"])), choice_oracle(["red", "reddish", "Tōkyō", "a b"])),
]


@pytest.mark.parametrize(("constraint", "oracle"), CASES, ids=[c.spec for c, _ in CASES])
def test_mask_is_exactly_the_brute_force_continuations(constraint, oracle, compiler: GrammarCompiler) -> None:
    is_prefix, is_complete = oracle
    rng = random.Random(7)
    for _walk in range(3):
        matcher = compiler.compile(constraint).matcher()
        prefix = b""
        for _step in range(12):
            expected = brute_force(compiler, prefix, is_prefix, is_complete)
            allowed = mask_of(matcher)
            forced = matcher.ll_matcher.compute_ff_bytes()
            if forced:
                # Bytes the grammar forces are offered in the tokenizer's own tokenization (the
                # model sees canonical tokens): a subset, each token consistent with them.
                assert allowed and allowed <= expected, prefix
                for token in allowed:
                    spelled = token_bytes(compiler, token)
                    assert spelled.startswith(forced) or forced.startswith(spelled)
                expected = allowed
            assert allowed == expected, prefix
            text_tokens = sorted(expected - STOPS)
            if not text_tokens or (is_complete(prefix) and rng.random() < 0.3):
                assert matcher.accept(3)
                assert matcher.is_terminated()
                break
            token = rng.choice(text_tokens)
            assert matcher.accept(token)
            prefix += token_bytes(compiler, token)


def test_json_mask_agrees_with_token_checks_along_a_document(compiler: GrammarCompiler) -> None:
    """For a JSON schema: at every state of a valid document, bit t of the mask is set exactly
    when the matcher would accept t (stops by is_accepting, padded ids never), except where the
    grammar forces bytes: then the mask keeps only their canonical tokens."""
    constraint = schema_constraint(PERSON)
    matcher = compiler.compile(constraint).matcher()
    doc = compiler.vocab.encode(witness_text(constraint, seed=3))
    for i, token in enumerate(doc + [3]):
        allowed = mask_of(matcher)
        if i % 4 == 0 or i >= len(doc) - 2:  # every id is checked at a sample of states (slow-ish)
            valid = {t for t in range(ENGINE_VOCAB) if matcher.is_allowed(t)}
            assert allowed <= valid
            if not matcher.ll_matcher.compute_ff_bytes():
                assert allowed == valid
        assert token in allowed or matcher.ll_matcher.compute_ff_bytes()
        assert (STOPS <= allowed) == (i == len(doc))
        assert not allowed & set(range(TOKENIZER_VOCAB, ENGINE_VOCAB))
        assert matcher.accept(token)
    assert matcher.is_terminated()
    assert mask_of(matcher) == STOPS  # nothing follows a stop; the row stays samplable
    assert not matcher.accept(5)


def test_padded_and_special_ids_are_never_allowed(compiler: GrammarCompiler) -> None:
    matcher = compiler.compile(OutputConstraint("json_object")).matcher()
    bitmask = allocate_bitmask(2, ENGINE_VOCAB)
    matcher.fill_mask(bitmask, 1)
    assert (bitmask[0] == -1).all()  # other rows untouched
    allowed = set(allowed_token_ids(bitmask, 1, ENGINE_VOCAB).tolist())
    assert allowed and not allowed & {0, 1, 2, 3, 4}
    assert not allowed & set(range(TOKENIZER_VOCAB, ENGINE_VOCAB))
    for token in range(TOKENIZER_VOCAB, ENGINE_VOCAB):
        assert not matcher.accept(token)
    # The bits past the vocab in the last word stay 0.
    words = (ENGINE_VOCAB + 31) // 32
    tail = np.unpackbits(bitmask[1].view(np.uint8), bitorder="little")[ENGINE_VOCAB : words * 32]
    assert not tail.any()


def test_rejected_token_leaves_state_unchanged(compiler: GrammarCompiler) -> None:
    matcher = compiler.compile(OutputConstraint("regex", "(ab|cd)+")).matcher()
    ab = compiler.vocab.encode("ab")
    assert matcher.accept_many(ab)
    before = mask_of(matcher)
    for bad in compiler.vocab.encode("zz") + [4, 0, ENGINE_VOCAB + 5, -1]:
        assert not matcher.accept(bad)
    assert mask_of(matcher) == before
    assert matcher.error is None
    assert matcher.accepted_ids == ab


def test_replay_equals_decoding(compiler: GrammarCompiler) -> None:
    """A migrated request: replaying the generated ids gives the state that decoding them gave."""
    constraint = schema_constraint(PERSON)
    doc = compiler.vocab.encode(witness_text(constraint, seed=5))
    for cut in (0, 1, len(doc) // 2, len(doc) - 1, len(doc)):
        stepped = compiler.compile(constraint).matcher()
        for token in doc[:cut]:
            assert stepped.accept(token)
        replayed = compiler.compile(constraint).matcher()
        assert replayed.accept_many(doc[:cut])
        assert replayed.accepted_ids == stepped.accepted_ids
        assert mask_of(replayed) == mask_of(stepped)
        assert replayed.is_accepting() == stepped.is_accepting()
        for token in doc[cut:]:  # and both go on alike
            assert replayed.accept(token) and stepped.accept(token)
        assert replayed.accept(3) and replayed.is_terminated()


def test_replay_is_all_or_nothing(compiler: GrammarCompiler) -> None:
    constraint = OutputConstraint("choice", json.dumps(["alpha", "beta"]))
    matcher = compiler.compile(constraint).matcher()
    good = compiler.vocab.encode("alpha")
    bad = compiler.vocab.encode("alpine")
    assert not matcher.accept_many(bad)
    assert matcher.accepted_ids == [] and mask_of(matcher) == mask_of(compiler.compile(constraint).matcher())
    assert not matcher.accept_many(good[:1] + [3])  # a stop before the grammar can end
    assert matcher.accepted_ids == []
    assert not matcher.accept_many([3] + good)  # nothing after a stop
    assert matcher.accept_many(good + [3])
    assert matcher.is_terminated()


def test_rollback(compiler: GrammarCompiler) -> None:
    constraint = OutputConstraint("regex", "(ab|cd)+e?")
    matcher = compiler.compile(constraint).matcher()
    ids = compiler.vocab.encode("abcde")
    states = [mask_of(matcher)]
    for token in ids:
        assert matcher.accept(token)
        states.append(mask_of(matcher))
    assert matcher.accept(3) and matcher.is_terminated()
    matcher.rollback(1)
    assert not matcher.is_terminated() and mask_of(matcher) == states[-1]
    matcher.rollback(len(ids) - 1)
    assert mask_of(matcher) == states[1]
    with pytest.raises(ValueError):
        matcher.rollback(5)
    matcher.reset()
    assert mask_of(matcher) == states[0] and matcher.accepted_ids == []


def test_forced_tokens(compiler: GrammarCompiler) -> None:
    matcher = compiler.compile(OutputConstraint("regex", "hello world|hello there")).matcher()
    forced = matcher.forced_token_ids()
    assert compiler.vocab.decode_bytes(forced).startswith(b"hello")


def test_compile_cache_is_a_bounded_lru() -> None:
    compiler = GrammarCompiler.from_model_dir(MODEL_DIR, ENGINE_VOCAB, cache_size=2)
    a, b, c = (OutputConstraint("regex", p) for p in ("a+", "b+", "c+"))
    first = compiler.compile(a)
    assert compiler.compile(a) is first
    compiler.compile(b)
    compiler.compile(a)  # a is now the most recent
    compiler.compile(c)  # evicts b
    assert compiler.cached() == 2
    assert compiler.compile(a) is first
    assert compiler.compile(OutputConstraint("regex", "a+")) is first  # keyed by (kind, spec)
    # Matchers of one compiled grammar are independent.
    m1, m2 = first.matcher(), first.matcher()
    assert m1.accept(compiler.vocab.encode("a")[0])
    assert m2.accepted_ids == []


def test_vocab_defaults_and_limits() -> None:
    compiler = GrammarCompiler.from_model_dir(MODEL_DIR)
    assert compiler.vocab.vocab_size == TOKENIZER_VOCAB
    assert set(compiler.vocab.stop_token_ids) == STOPS
    custom = GrammarCompiler.from_model_dir(MODEL_DIR, ENGINE_VOCAB, stop_token_ids=[3])
    matcher = custom.compile(OutputConstraint("choice", '["x"]')).matcher()
    assert matcher.accept_many(custom.vocab.encode("x"))
    assert not matcher.is_allowed(1) and matcher.is_allowed(3)
    with pytest.raises(DynamoError, match="smaller than the tokenizer"):
        GrammarCompiler.from_model_dir(MODEL_DIR, 100)
    with pytest.raises(DynamoError, match="no tokenizer.json"):
        GrammarCompiler.from_model_dir(MODEL_DIR / "nope")
