"""LogitsMasker (the torch executor's part): greedy decoding over random logits with the masks
applied yields valid output for every constraint; unconstrained rows are untouched; padded
vocab rows are masked in constrained rows."""

from __future__ import annotations

import pytest
from structured_cases import ENGINE_VOCAB, TOKENIZER_VOCAB, all_constraints, check_output

from dynamo.wire import OutputConstraint
from workers.structured import GrammarCompiler, GrammarMatcher

torch = pytest.importorskip("torch")
from workers.structured.logits import LogitsMasker  # noqa: E402

MAX_TOKENS = 400


def decode(compiler: GrammarCompiler, matcher: GrammarMatcher) -> str:
    ids = [t for t in matcher.accepted_ids if t not in compiler.vocab.stop_token_ids]
    return compiler.vocab.decode_bytes(ids).decode()


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_decode_over_random_logits_is_valid(compiler: GrammarCompiler, seed: int) -> None:
    """Every constraint decoded side by side in one batch, as the executor would: one masker
    call per step, argmax, accept. Padded ids get the largest logits and must never win.
    (The cases bound their strings and numbers: over random logits an unbounded JSON string
    ends only by chance, so json_object is left out here.)"""
    constraints = [c for c in all_constraints() if c.kind != "json_object"]
    masker = LogitsMasker(ENGINE_VOCAB, max_batch=4)  # grows to the batch
    generator = torch.Generator().manual_seed(seed)
    matchers = [compiler.compile(c).matcher() for c in constraints]
    live = list(range(len(constraints)))
    for _step in range(MAX_TOKENS):
        if not live:
            break
        logits = torch.randn(len(live), ENGINE_VOCAB, generator=generator)
        logits[:, TOKENIZER_VOCAB:] = 100.0
        masker.apply(logits, [(row, matchers[i]) for row, i in enumerate(live)])
        chosen = logits.argmax(dim=-1).tolist()
        for row, i in enumerate(live):
            assert chosen[row] < TOKENIZER_VOCAB
            assert matchers[i].accept(chosen[row]), (constraints[i], chosen[row])
        live = [i for i in live if not matchers[i].is_terminated()]
    assert not live, [constraints[i] for i in live]
    for constraint, matcher in zip(constraints, matchers):
        check_output(constraint, decode(compiler, matcher))


def test_unconstrained_rows_are_untouched(compiler: GrammarCompiler) -> None:
    masker = LogitsMasker(ENGINE_VOCAB)
    matcher = compiler.compile(OutputConstraint("choice", '["yes", "no"]')).matcher()
    logits = torch.randn(3, ENGINE_VOCAB)
    before = logits.clone()
    masker.apply(logits, [(1, matcher)])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(logits[1, t] == before[1, t] for t in allowed)
    spelled = {compiler.vocab.decode_bytes([t]) for t in allowed}
    assert all(b"yes".startswith(s) or b"no".startswith(s) for s in spelled)
    assert not torch.isfinite(logits[1, TOKENIZER_VOCAB:]).any()
    masker.apply(logits, [])  # no constrained rows: nothing at all
    assert torch.equal(logits[0], before[0])


def test_stop_only_after_termination_and_bf16(compiler: GrammarCompiler) -> None:
    masker = LogitsMasker(ENGINE_VOCAB)
    matcher = compiler.compile(OutputConstraint("choice", '["x"]')).matcher()
    assert matcher.accept_many(compiler.vocab.encode("x"))
    logits = torch.zeros(1, ENGINE_VOCAB, dtype=torch.bfloat16)
    masker.apply(logits, [(0, matcher)])
    assert set(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == set(compiler.vocab.stop_token_ids)


def test_shape_checked(compiler: GrammarCompiler) -> None:
    masker = LogitsMasker(ENGINE_VOCAB)
    matcher = compiler.compile(OutputConstraint("json_object")).matcher()
    with pytest.raises(ValueError, match="logits must be"):
        masker.apply(torch.zeros(1, TOKENIZER_VOCAB), [(0, matcher)])
