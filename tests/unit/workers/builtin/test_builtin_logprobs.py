"""Logprobs on the built-in engine against transformers' fp64 forward: each greedy token's logprob
is the largest of its top_logprobs and the log-softmax of the reference logits there; prompt
logprobs equal the reference at every prompt position, over chunked prefill and with the prompt
already in the prefix cache; asking for them leaves other requests' tokens unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from builtin_cases import collect, engine, request, tokens

HfLogits = Callable[[str, list[int]], torch.Tensor]
HfGreedy = Callable[[str, list[int], int], list[int]]

PROMPT = [5, 17, 99, 3, 200, 45, 7, 8, 9, 10, 11, 12, 13, 301, 302, 77, 1, 2]
TOL = 1e-4  # the engine's logprobs are float32 log-softmax of its fp64 logits


async def test_greedy_logprobs_are_the_max_of_top_logprobs_and_match_the_reference(
    model_dirs: Callable[[str], Path], hf_logits: HfLogits, hf_greedy: HfGreedy
) -> None:
    async with engine(model_dirs("llama-gqa")) as eng:
        outs = await collect(eng.generate(request("lp", PROMPT, 8, logprobs=True, top_logprobs=5)))
    generated = tokens(outs)
    assert generated == hf_greedy("llama-gqa", PROMPT, 8)
    reference = torch.log_softmax(hf_logits("llama-gqa", PROMPT + generated), dim=-1)
    for i, out in enumerate(outs):
        assert out.logprobs is not None and out.top_logprobs is not None
        (logprob,), (top,) = out.logprobs, out.top_logprobs
        assert len(top) == 5 and top[0][0] == out.token_ids[0]
        assert logprob == max(lp for _, lp in top)
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        row = reference[len(PROMPT) - 1 + i]
        assert abs(logprob - float(row[out.token_ids[0]])) < TOL
        values, ids = row.topk(5)
        assert [t for t, _ in top] == ids.tolist()
        assert all(abs(a - b) < TOL for (_, a), b in zip(top, values.tolist()))


async def test_logprobs_without_top_logprobs_sends_none_of_them(model_dirs: Callable[[str], Path]) -> None:
    async with engine(model_dirs("llama-gqa")) as eng:
        plain, with_lp = await asyncio.gather(
            collect(eng.generate(request("a", PROMPT, 4))),
            collect(eng.generate(request("b", PROMPT, 4, logprobs=True))),
        )
    assert all(o.logprobs is None and o.top_logprobs is None for o in plain)
    assert all(o.logprobs is not None and o.top_logprobs is None for o in with_lp)
    assert tokens(plain) == tokens(with_lp)


@pytest.mark.parametrize("budget", [64, 5])  # one step, or a prefill chunked into four
async def test_prompt_logprobs_match_the_reference(
    budget: int, model_dirs: Callable[[str], Path], hf_logits: HfLogits
) -> None:
    reference = torch.log_softmax(hf_logits("llama-gqa", PROMPT), dim=-1)
    async with engine(model_dirs("llama-gqa"), max_num_batched_tokens=budget) as eng:
        first = await collect(eng.generate(request("p1", PROMPT, 3, prompt_logprobs=3)))
        # The same prompt again: its blocks are cached now, but every position is recomputed.
        again = await collect(eng.generate(request("p2", PROMPT, 3, prompt_logprobs=0)))
        warm = await collect(eng.generate(request("p3", PROMPT, 3)))
    assert warm[0].cached_tokens and warm[0].cached_tokens > 0
    for outs, k in ((first, 3), (again, 0)):
        entries = outs[0].prompt_logprobs
        assert entries is not None and len(entries) == len(PROMPT)
        assert all(o.prompt_logprobs is None for o in outs[1:])
        assert outs[0].cached_tokens == 0
        assert entries[0] is None
        for j in range(1, len(PROMPT)):
            entry = entries[j]
            assert entry is not None
            assert abs(entry.logprob - float(reference[j - 1, PROMPT[j]])) < TOL, j
            assert len(entry.top) == k
            if k:
                values, ids = reference[j - 1].topk(k)
                assert [t for t, _ in entry.top] == ids.tolist()
                assert all(abs(a - b) < TOL for (_, a), b in zip(entry.top, values.tolist()))
    assert tokens(first) == tokens(again) == tokens(warm)


async def test_prompt_logprobs_leave_other_requests_unchanged(
    model_dirs: Callable[[str], Path], hf_greedy: HfGreedy
) -> None:
    others = [[100, 200, 300], list(range(40, 60))]
    async with engine(model_dirs("llama-gqa"), max_num_batched_tokens=16) as eng:
        outs = await asyncio.gather(
            collect(eng.generate(request("p", PROMPT, 6, prompt_logprobs=2, logprobs=True))),
            *(collect(eng.generate(request(f"o{i}", p, 6))) for i, p in enumerate(others)),
        )
    assert outs[0][0].prompt_logprobs is not None
    assert tokens(outs[0]) == hf_greedy("llama-gqa", PROMPT, 6)
    for i, prompt in enumerate(others):
        assert tokens(outs[i + 1]) == hf_greedy("llama-gqa", prompt, 6)
        assert all(o.prompt_logprobs is None and o.logprobs is None for o in outs[i + 1])
