"""The mocker's request surface (workers/mocker/sampling.py and its executor): synthetic but
consistent logprobs (the stream's token is the most likely), prompt logprobs, logit_bias that
forces and bans, penalties that change the choice deterministically, seeds, and output
constraints through the grammar chooser (valid JSON / regex / choice, continued exactly after a
migration); a constraint without a tokenizer is refused. Tests wait on tokens, never on time."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from tokenizers import Tokenizer

from dynamo import errors
from dynamo.wire import EngineOutput, OutputConstraint, PreprocessedRequest, SamplingOptions, StopConditions
from workers.mocker.args import MockerConfig
from workers.mocker.engine import MockerEngine
from workers.mocker.sampling import CANDIDATES, MockSampling, SyntheticVocab, choose
from workers.mocker.timing import TimingModel

MODEL_DIR = Path(__file__).resolve().parents[4] / "models" / "dynamo-tiny"
EOS = 3
FAST = 1e9


def config(**overrides: object) -> MockerConfig:
    base: dict[str, object] = dict(num_gpu_blocks=256, max_model_len=1024, speedup_ratio=FAST, vocab_size=1000)
    base.update(overrides)
    return MockerConfig(**base)  # type: ignore[arg-type]


def request(prompt: list[int], max_tokens: int = 12, *, constraint: OutputConstraint | None = None,
            generated_before: int = 0, prompt_logprobs: int | None = None, stop: list[int] | None = None,
            **sampling: Any) -> PreprocessedRequest:
    return PreprocessedRequest("r", "m", prompt, sampling=SamplingOptions(**sampling),
                               stop=StopConditions(max_tokens=max_tokens, stop_token_ids=stop or []),
                               constraint=constraint, generated_before=generated_before,
                               prompt_logprobs=prompt_logprobs)


async def collect(engine: MockerEngine, req: PreprocessedRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(req)]


def tokens(outputs: list[EngineOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


PROMPT = list(range(100, 140))


async def test_logprobs_are_consistent_and_do_not_change_the_tokens() -> None:
    async with MockerEngine(config()) as engine:
        plain = await collect(engine, request(PROMPT))
        outs = await collect(engine, request(PROMPT, logprobs=True, top_logprobs=5, prompt_logprobs=2))
        again = await collect(engine, request(PROMPT, logprobs=True, top_logprobs=5))
    assert tokens(outs) == tokens(plain) == tokens(again)
    for out in outs:
        assert out.logprobs is not None and out.top_logprobs is not None
        (logprob,), (top,) = out.logprobs, out.top_logprobs
        assert len(top) == 5 and top[0] == (out.token_ids[0], logprob)  # greedy: the most likely
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert logprob < 0
    assert [o.logprobs for o in outs] == [o.logprobs for o in again]
    entries = outs[0].prompt_logprobs
    assert entries is not None and len(entries) == len(PROMPT) and entries[0] is None
    assert all(e is not None and e.logprob < 0 and len(e.top) == 2 for e in entries[1:])
    assert all(o.prompt_logprobs is None for o in outs[1:])


def test_synthetic_distribution_sums_to_one() -> None:
    for vocab in (SyntheticVocab(1000, frozenset({0, 1})), SyntheticVocab(30, frozenset())):
        cands = vocab.candidates(5, 7)
        assert len(set(cands)) == len(cands) == min(CANDIDATES, 30)
        total = sum(math.exp(vocab.logit(t, cands) - vocab.log_total) for t in range(vocab.vocab_size)
                    if t not in vocab.exclude)
        assert abs(total - 1) < 1e-9


async def test_logit_bias_forces_and_bans() -> None:
    async with MockerEngine(config()) as engine:
        free = tokens(await collect(engine, request(PROMPT)))
        forced = await collect(engine, request(PROMPT, logit_bias={42: 100.0}, logprobs=True, top_logprobs=1))
        banned = tokens(await collect(engine, request(PROMPT, logit_bias={free[0]: -100.0})))
    assert tokens(forced) == [42] * 12
    assert forced[0].logprobs is not None and forced[0].top_logprobs is not None
    assert forced[0].logprobs[0] < forced[0].top_logprobs[0][0][1]  # raw: 42 is not the model's best
    assert banned[0] != free[0] and free[0] not in banned


async def test_penalties_change_the_choice_deterministically() -> None:
    # A vocabulary of 30 repeats tokens within 60.
    async with MockerEngine(config(vocab_size=30)) as engine:
        free = tokens(await collect(engine, request([1, 2, 3], 60)))
        penalised = tokens(await collect(engine, request([1, 2, 3], 60, presence_penalty=2.0, frequency_penalty=1.0)))
        again = tokens(await collect(engine, request([1, 2, 3], 60, presence_penalty=2.0, frequency_penalty=1.0)))
        repeated = tokens(await collect(engine, request([1, 2, 3], 60, repetition_penalty=2.0)))
    assert penalised == again and penalised != free
    assert max(Counter(penalised).values()) < max(Counter(free).values())
    assert repeated != free


async def test_seeds_give_reproducible_distinct_choices() -> None:
    async with MockerEngine(config()) as engine:
        a = tokens(await collect(engine, request(PROMPT, temperature=1.0, seed=1)))
        b = tokens(await collect(engine, request(PROMPT, temperature=1.0, seed=2)))
        a2 = tokens(await collect(engine, request(PROMPT, temperature=1.0, seed=1)))
    assert a == a2 and a != b


async def test_a_migrated_request_goes_on_as_if_it_had_not_moved() -> None:
    async with MockerEngine(config(vocab_size=30)) as engine:
        for sampling in ({}, {"seed": 4}, {"frequency_penalty": 1.5}):
            whole = tokens(await collect(engine, request(PROMPT, 20, **sampling)))
            resumed = tokens(await collect(engine, request(PROMPT + whole[:8], 20, generated_before=8, **sampling)))
            assert whole[:8] + resumed == whole, sampling


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "ok": {"type": "boolean"},
    },
    "required": ["city", "days", "unit", "ok"],
    "additionalProperties": False,
}
CONSTRAINTS = [
    OutputConstraint("json_schema", json.dumps(SCHEMA)),
    OutputConstraint("regex", r"\d{3}-[a-z]{2,5}"),
    OutputConstraint("choice", json.dumps(["north", "south east"])),
]


def check(constraint: OutputConstraint, text: str) -> None:
    if constraint.kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(constraint.spec))
    elif constraint.kind == "regex":
        assert re.fullmatch(constraint.spec, text), text
    else:
        assert text in json.loads(constraint.spec)


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=lambda c: c.kind)
async def test_constrained_output_validates_and_migrates(constraint: OutputConstraint) -> None:
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    cfg = config(vocab_size=8192, model_dir=str(MODEL_DIR), exclude_token_ids=frozenset({0, 1, 2, 3, 4}))
    async with MockerEngine(cfg) as engine:
        outs = await collect(engine, request(PROMPT, 60, constraint=constraint, stop=[EOS], logprobs=True))
        ids = tokens(outs)
        assert outs[-1].finish_reason == "stop" and ids[-1] == EOS
        check(constraint, tok.decode(ids[:-1], skip_special_tokens=False))
        cut = len(ids) // 2
        resumed = tokens(await collect(engine, request(
            PROMPT + ids[:cut], 60, constraint=constraint, stop=[EOS], generated_before=cut)))
    assert ids[:cut] + resumed == ids
    assert all(o.logprobs is not None for o in outs)


async def test_disaggregated_constrained_request_equals_the_aggregated_one() -> None:
    """Prefill on one engine (first token, its logprobs and the prompt's), decode on another from
    the first token: the decode side's grammar takes that token, and the output is the same."""
    cfg = config(vocab_size=8192, model_dir=str(MODEL_DIR), exclude_token_ids=frozenset({0, 1, 2, 3, 4}))
    req = request(PROMPT, 60, constraint=CONSTRAINTS[0], stop=[EOS], logprobs=True, top_logprobs=2,
                  prompt_logprobs=1, presence_penalty=0.5)
    async with MockerEngine(cfg) as engine:
        aggregated = await collect(engine, req)
        held = await engine.prefill_held(req)
        engine.release(held)
    async with MockerEngine(cfg) as decode:
        reservation = decode.reserve(PROMPT)
        assert reservation is not None
        outs = [o async for o in decode.generate_from_kv(req, held.first, reservation)]
    assert tokens(outs) == tokens(aggregated)
    assert outs[0].prompt_logprobs == aggregated[0].prompt_logprobs is not None
    assert [o.top_logprobs for o in outs] == [o.top_logprobs for o in aggregated]


async def test_constraints_need_a_tokenizer_and_a_valid_spec() -> None:
    async with MockerEngine(config()) as engine:
        with pytest.raises(errors.InvalidRequest, match="--model") as info:
            await collect(engine, request(PROMPT, constraint=CONSTRAINTS[0]))
        assert info.value.param == "response_format"
    async with MockerEngine(config(vocab_size=8192, model_dir=str(MODEL_DIR))) as engine:
        with pytest.raises(errors.InvalidRequest) as info:
            await collect(engine, request(PROMPT, constraint=OutputConstraint("json_schema", "{bad")))
        assert info.value.param == "response_format"
        with pytest.raises(errors.InvalidRequest) as info:
            await collect(engine, request(PROMPT + [5000], constraint=CONSTRAINTS[1], generated_before=1))
        assert info.value.param == "response_format"
    async with MockerEngine(config()) as engine:
        with pytest.raises(errors.InvalidRequest) as info:
            await collect(engine, request(PROMPT, logit_bias={5000: 1.0}))
        assert info.value.param == "logit_bias"


def test_constrained_rows_cost_a_little_time() -> None:
    timing = TimingModel()
    assert timing.grammar_time_s(0, 5e-3) == 0.0
    assert timing.grammar_time_s(32, 5e-3) == timing.mask_apply_s  # the fill hides under the forward pass
    assert timing.grammar_time_s(10_000, 1e-3) > timing.mask_apply_s


def test_choose_applies_top_k_top_p_and_min_p_among_the_candidates() -> None:
    vocab = SyntheticVocab(1000, frozenset())
    cands = vocab.candidates(5, 1)
    bias = ((cands[0], 0.1),)  # a modification, so the options are consulted
    picks = {
        name: {choose(vocab, MockSampling(temperature=5.0, logit_bias=bias, **kw), cands, random.Random(s), (), None)
               for s in range(200)}
        for name, kw in {"free": {}, "top_k": {"top_k": 2}, "top_p": {"top_p": 0.01}, "min_p": {"min_p": 0.99}}.items()
    }
    assert len(picks["free"]) > 2
    assert picks["top_k"] <= set(cands[:2]) and len(picks["top_k"]) == 2
    assert picks["top_p"] == picks["min_p"] == {cands[0]}
