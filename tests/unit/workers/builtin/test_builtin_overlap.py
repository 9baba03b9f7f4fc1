"""The overlap loop (PagedEngine._overlap_loop with TorchExecutor.launch) gives the plain loop's
tokens: greedy, seeded sampling, penalties, logit bias, min_tokens and a stop token seen one
step late, with chunked prefill, staggered joins and (greedy) preemption. On CPU the device
work is synchronous, but the planning past the step in flight and the placeholders that read
its tokens on the device are the GPU's code paths."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynamo.wire import EngineOutput, PreprocessedRequest, SamplingOptions, StopConditions
from workers.builtin.args import BuiltinConfig
from workers.builtin.engine import BuiltinEngine
from workers.builtin.executor import TorchExecutor, TorchLaunch

PROMPTS = [
    [5, 17, 99, 3, 200, 45, 7, 8, 9, 10, 11, 12, 13],
    [100, 200, 300],
    list(range(40, 77)),
    [9],
    [7, 7, 7, 7, 7],
]
SAMPLING: list[dict[str, Any]] = [
    {},
    {"temperature": 0.9, "top_p": 0.9, "seed": 11},
    {"temperature": 0.7, "top_k": 20, "frequency_penalty": 0.8, "repetition_penalty": 1.3, "seed": 3},
    {"logit_bias": {4: 5.0, 6: -100.0}, "presence_penalty": 1.0},
    {"temperature": 1.2, "min_p": 0.05, "seed": 99},
]


def request(rid: str, prompt: list[int], max_tokens: int, stop_ids: list[int] | None = None,
            min_tokens: int = 0, **sampling: Any) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=rid, model="m", token_ids=prompt, sampling=SamplingOptions(**sampling),
        stop=StopConditions(max_tokens=max_tokens, ignore_eos=True, stop_token_ids=stop_ids or [],
                            min_tokens=min_tokens),
    )


def make_engine(model_dir: Path, overlap: bool, **overrides: Any) -> BuiltinEngine:
    kwargs: dict[str, Any] = dict(
        model=str(model_dir), dtype="float64", device="cpu", block_size_tokens=4, num_gpu_blocks=128,
        max_num_batched_tokens=24, overlap_schedule=overlap,
    )
    kwargs.update(overrides)
    return BuiltinEngine(BuiltinConfig(**kwargs))


async def serve(eng: BuiltinEngine, requests: list[PreprocessedRequest]) -> list[list[EngineOutput]]:
    """The first request decodes before the others join, as staggered as the loop allows."""
    async def one(req: PreprocessedRequest) -> list[EngineOutput]:
        return [out async for out in eng.generate(req)]

    first = eng.generate(requests[0])
    head = [await anext(first)]
    rest = [asyncio.create_task(one(r)) for r in requests[1:]]
    head.extend([out async for out in first])
    return [head, *await asyncio.gather(*rest)]


def tokens(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def track_outstanding(eng: BuiltinEngine) -> list[int]:
    """Counts launched-but-unread steps at each launch: 1 means a step was launched while the
    previous one's tokens were still unread (the overlap happened)."""
    executor = eng.executor
    assert isinstance(executor, TorchExecutor)
    seen: list[int] = []
    outstanding = [0]
    launch, result = executor.launch, TorchLaunch.result

    async def counted_launch(batch: Any) -> TorchLaunch:
        seen.append(outstanding[0])
        outstanding[0] += 1
        return await launch(batch)

    async def counted_result(self: TorchLaunch) -> Any:
        out = await result(self)
        outstanding[0] -= 1
        return out

    executor.launch = counted_launch  # type: ignore[method-assign]
    TorchLaunch.result = counted_result  # type: ignore[method-assign]
    seen.append(-1)  # marker: restore in the caller
    return seen


async def run_both(model_dir: Path, requests: Callable[[], list[PreprocessedRequest]], **overrides: Any) -> tuple[list[list[int]], list[list[int]], list[int]]:
    async with make_engine(model_dir, False, **overrides) as eng:
        plain = [tokens(o) for o in await serve(eng, requests())]
    result = TorchLaunch.result
    try:
        async with make_engine(model_dir, True, **overrides) as eng:
            seen = track_outstanding(eng)
            overlapped = [tokens(o) for o in await serve(eng, requests())]
    finally:
        TorchLaunch.result = result  # type: ignore[method-assign]
    return plain, overlapped, seen


async def test_overlap_gives_the_plain_loops_tokens(model_dirs: Callable[[str], Path]) -> None:
    model = model_dirs("llama-gqa")
    lengths = [8, 7, 5, 7, 6]

    def requests(stop: list[int] | None = None) -> list[PreprocessedRequest]:
        reqs = [request(f"r{i}", p, lengths[i], **SAMPLING[i]) for i, p in enumerate(PROMPTS)]
        if stop is not None:  # a stop token that request 1 meets mid-way; min_tokens on request 3
            reqs[1] = request("r1", PROMPTS[1], lengths[1], stop_ids=stop, **SAMPLING[1])
            reqs[3] = request("r3", PROMPTS[3], lengths[3], stop_ids=stop, min_tokens=5, **SAMPLING[3])
        return reqs

    plain, overlapped, seen = await run_both(model, requests)
    assert overlapped == plain
    assert [len(t) for t in plain] == lengths
    assert 1 in seen, "no step was launched before the previous one was read"
    # Again with the stop token, and 12 blocks of 4 tokens: not every request's context fits
    # at once, so requests are preempted (and, sampled ones, redrawn: greedy ones only then).
    stop = [plain[1][3]]  # sampled, so it first appears at the 4th token or earlier
    plain, overlapped, seen = await run_both(model, lambda: requests(stop), num_gpu_blocks=12)
    assert overlapped[1] == plain[1] and plain[1][-1] == stop[0] and len(plain[1]) <= 4
    assert overlapped[0] == plain[0]  # greedy
    assert 1 in seen
