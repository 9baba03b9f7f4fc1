"""logit_bias and penalties on the built-in engine, against a per-row reference over
transformers' fp64 logits: greedy with +100 forces a token and -100 bans the argmax; repetition
(vLLM's, prompt and output), frequency and presence (OpenAI's, output only) penalties give
exactly the tokens the reference decode loop gives; a migrated request counts the tokens
generated before it as output; penalty rows are given back."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from builtin_cases import collect, engine, request, tokens

from dynamo import errors

HfLogits = Callable[[str, list[int]], torch.Tensor]
HfGreedy = Callable[[str, list[int], int], list[int]]

PROMPT = [5, 17, 99, 3, 200, 45, 7, 8, 9, 10, 11, 12, 13]


def reference_decode(
    hf_logits: HfLogits, prompt: list[int], max_tokens: int, *, repetition: float = 1.0,
    frequency: float = 0.0, presence: float = 0.0, bias: dict[int, float] | None = None,
    generated_before: int = 0,
) -> list[int]:
    """Greedy decoding, one row and one token at a time: logits from transformers, then bias
    and penalties applied per token in plain Python."""
    seq = list(prompt)
    output = list(prompt[len(prompt) - generated_before :])
    out: list[int] = []
    for _ in range(max_tokens):
        logits = hf_logits("llama-gqa", seq)[-1].float().tolist()
        for token, value in (bias or {}).items():
            logits[token] += value
        for token in set(seq):
            value = logits[token]
            logits[token] = value / repetition if value > 0 else value * repetition
        for token, count in Counter(output).items():
            logits[token] -= frequency * count + presence
        token = max(range(len(logits)), key=logits.__getitem__)
        seq.append(token)
        output.append(token)
        out.append(token)
    return out


async def test_logit_bias_forces_a_token_and_bans_the_argmax(
    model_dirs: Callable[[str], Path], hf_greedy: HfGreedy, hf_logits: HfLogits
) -> None:
    free = hf_greedy("llama-gqa", PROMPT, 6)
    async with engine(model_dirs("llama-gqa")) as eng:
        forced, banned = await asyncio.gather(
            collect(eng.generate(request("f", PROMPT, 6, logit_bias={42: 100.0}, logprobs=True, top_logprobs=2))),
            collect(eng.generate(request("b", PROMPT, 6, logit_bias={free[0]: -100.0}))),
        )
    assert tokens(forced) == [42] * 6
    # The logprob stays the raw model's: 42 is not what the model itself prefers.
    assert forced[0].logprobs is not None and forced[0].top_logprobs is not None
    assert forced[0].logprobs[0] < forced[0].top_logprobs[0][0][1]
    assert tokens(banned)[0] != free[0]
    assert tokens(banned) == reference_decode(hf_logits, PROMPT, 6, bias={free[0]: -100.0})


@pytest.mark.parametrize(
    "penalties",
    [
        {"repetition_penalty": 1.6},
        {"repetition_penalty": 0.6},
        {"frequency_penalty": 1.2},
        {"presence_penalty": 1.5},
        {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": -0.4},
    ],
)
async def test_penalties_equal_the_per_row_reference(
    penalties: dict[str, float], model_dirs: Callable[[str], Path], hf_greedy: HfGreedy, hf_logits: HfLogits
) -> None:
    max_tokens = 12
    expected = reference_decode(
        hf_logits, PROMPT, max_tokens, repetition=penalties.get("repetition_penalty", 1.0),
        frequency=penalties.get("frequency_penalty", 0.0), presence=penalties.get("presence_penalty", 0.0),
    )
    async with engine(model_dirs("llama-gqa")) as eng:
        penalised, plain = await asyncio.gather(
            collect(eng.generate(request("p", PROMPT, max_tokens, **penalties))),
            collect(eng.generate(request("q", PROMPT, max_tokens))),
        )
        assert eng.executor._penalty_slots.in_use == 0  # given back when the streams ended
    assert tokens(penalised) == expected
    assert tokens(plain) == hf_greedy("llama-gqa", PROMPT, max_tokens)  # its batch-mate is untouched


async def test_penalties_count_tokens_generated_before_a_migration(
    model_dirs: Callable[[str], Path], hf_logits: HfLogits
) -> None:
    async with engine(model_dirs("llama-gqa")) as eng:
        whole = tokens(await collect(eng.generate(request("w", PROMPT, 12, frequency_penalty=1.0, presence_penalty=0.5))))
        cut = 5
        resumed = tokens(await collect(eng.generate(request(
            "m", PROMPT + whole[:cut], 12, generated_before=cut, frequency_penalty=1.0, presence_penalty=0.5,
        ))))
    assert resumed == whole[cut:]
    assert whole == reference_decode(hf_logits, PROMPT, 12, frequency=1.0, presence=0.5)


async def test_out_of_range_parameters_are_invalid_requests_naming_them(model_dirs: Callable[[str], Path]) -> None:
    cases = {
        "logit_bias": {"logit_bias": {10**6: 1.0}},
        "min_p": {"min_p": 1.5},
        "repetition_penalty": {"repetition_penalty": 0.0},
        "frequency_penalty": {"frequency_penalty": 3.0},
        "presence_penalty": {"presence_penalty": -2.5},
        "top_logprobs": {"top_logprobs": -1},
    }
    async with engine(model_dirs("llama-gqa")) as eng:
        for param, sampling in cases.items():
            with pytest.raises(errors.InvalidRequest) as info:
                await collect(eng.generate(request(param, PROMPT, 2, **sampling)))
            assert info.value.param == param
        with pytest.raises(errors.InvalidRequest) as info:
            await collect(eng.generate(request("pl", PROMPT, 2, prompt_logprobs=-1)))
        assert info.value.param == "prompt_logprobs"
