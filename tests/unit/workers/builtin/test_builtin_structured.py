"""Output constraints on the built-in engine with a random-weight model (llama-tok: the tiny
tokenizer, random weights): greedy json_schema / regex / choice output parses and validates,
and ends with EOS once the grammar is complete; a migrated request (prompt + tokens so far,
generated_before) continues to the unmigrated output exactly; constrained rows batched with
unconstrained ones leave those rows' tokens unchanged; bad constraints are InvalidRequests
naming the request field they come from."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from builtin_cases import EOS, collect, engine, request, tokens
from tokenizers import Tokenizer

from dynamo import errors
from dynamo.wire import OutputConstraint
from tests.unit.workers.structured.structured_cases import check_output
from workers.structured.grammar import default_field

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "role": {"enum": ["reader", "writer", "owner"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "admin", "role", "tags"],
    "additionalProperties": False,
}
CONSTRAINTS = [
    OutputConstraint("json_schema", json.dumps(SCHEMA)),
    OutputConstraint("regex", r"[a-z]{2,6}-\d{2,4}"),
    OutputConstraint("choice", json.dumps(["alpha", "beta gamma", "delta"])),
]
PROMPT = [300, 301, 302, 1000, 2000, 57, 58, 59]
MAX_TOKENS = 80


@pytest.fixture(scope="module")
def tokenizer(model_dirs: Callable[[str], Path]) -> Tokenizer:
    return Tokenizer.from_file(str(model_dirs("llama-tok") / "tokenizer.json"))


def text(tokenizer: Tokenizer, ids: list[int]) -> str:
    assert ids and ids[-1] == EOS, "the grammar completed and only EOS was allowed"
    return tokenizer.decode(ids[:-1], skip_special_tokens=False)


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=lambda c: c.kind)
async def test_constrained_greedy_output_validates(
    constraint: OutputConstraint, model_dirs: Callable[[str], Path], tokenizer: Tokenizer
) -> None:
    async with engine(model_dirs("llama-tok")) as eng:
        outs = await collect(eng.generate(request("c", PROMPT, MAX_TOKENS, stop=[EOS], constraint=constraint,
                                                  logprobs=True)))
        sampled = await collect(eng.generate(request("s", PROMPT, MAX_TOKENS, stop=[EOS], constraint=constraint,
                                                     temperature=1.0, seed=3)))
    assert outs[-1].finish_reason == "stop"
    check_output(constraint, text(tokenizer, tokens(outs)))
    check_output(constraint, text(tokenizer, tokens(sampled)))
    assert all(o.logprobs is not None and o.logprobs[0] <= 0 for o in outs)


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=lambda c: c.kind)
async def test_migrated_constrained_request_continues_exactly(
    constraint: OutputConstraint, model_dirs: Callable[[str], Path], tokenizer: Tokenizer
) -> None:
    async with engine(model_dirs("llama-tok")) as eng:
        whole = tokens(await collect(eng.generate(request("w", PROMPT, MAX_TOKENS, stop=[EOS], constraint=constraint))))
    cut = max(1, len(whole) // 2)
    # A fresh engine, as a second worker would be.
    async with engine(model_dirs("llama-tok")) as other:
        resumed = tokens(await collect(other.generate(request(
            "m", PROMPT + whole[:cut], MAX_TOKENS, stop=[EOS], constraint=constraint, generated_before=cut,
        ))))
    assert whole[:cut] + resumed == whole
    check_output(constraint, text(tokenizer, whole))


async def test_constrained_rows_leave_unconstrained_rows_unchanged(
    model_dirs: Callable[[str], Path], tokenizer: Tokenizer
) -> None:
    plain_prompts = [[10, 20, 30, 40], list(range(500, 530)), [7]]
    async with engine(model_dirs("llama-tok")) as eng:
        alone = [tokens(await collect(eng.generate(request(f"a{i}", p, 12)))) for i, p in enumerate(plain_prompts)]
        constrained_alone = [
            tokens(await collect(eng.generate(request(f"ca{i}", PROMPT, MAX_TOKENS, stop=[EOS], constraint=c))))
            for i, c in enumerate(CONSTRAINTS)
        ]
        mixed = await asyncio.gather(
            *(collect(eng.generate(request(f"c{i}", PROMPT, MAX_TOKENS, stop=[EOS], constraint=c)))
              for i, c in enumerate(CONSTRAINTS)),
            *(collect(eng.generate(request(f"p{i}", p, 12))) for i, p in enumerate(plain_prompts)),
        )
    assert [tokens(m) for m in mixed[len(CONSTRAINTS):]] == alone
    assert [tokens(m) for m in mixed[: len(CONSTRAINTS)]] == constrained_alone
    for constraint, ids in zip(CONSTRAINTS, constrained_alone):
        check_output(constraint, text(tokenizer, ids))


async def test_bad_constraints_are_invalid_requests_naming_response_format(model_dirs: Callable[[str], Path]) -> None:
    async with engine(model_dirs("llama-tok")) as eng:
        for bad in (OutputConstraint("json_schema", "{not json"), OutputConstraint("regex", "(unclosed"),
                    OutputConstraint("json_schema", json.dumps({"type": "object", "properties": {"x": {"type": "nope"}}}))):
            with pytest.raises(errors.InvalidRequest) as info:
                await collect(eng.generate(request("bad", PROMPT, 4, stop=[EOS], constraint=bad)))
            assert info.value.param == default_field(bad.kind)  # response_format, structured_outputs.regex
        # Tokens "generated before a migration" that the grammar does not allow.
        with pytest.raises(errors.InvalidRequest) as info:
            await collect(eng.generate(request("m", PROMPT + [3000, 3001], 8, stop=[EOS],
                                               constraint=CONSTRAINTS[0], generated_before=2)))
        assert info.value.param == "response_format"
    # A model directory without a tokenizer cannot constrain: refused, not ignored.
    async with engine(model_dirs("llama-gqa")) as eng:
        with pytest.raises(errors.InvalidRequest, match="tokenizer") as info:
            await collect(eng.generate(request("t", [5, 6], 4, constraint=CONSTRAINTS[1])))
        assert info.value.param == "response_format"
