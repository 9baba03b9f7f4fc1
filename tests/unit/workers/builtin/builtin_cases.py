"""Helpers shared by the built-in engine's feature tests: an engine on CPU in fp64, requests,
collecting a stream. Constrained output is checked with the structured-output tests' checker
(tests/unit/workers/structured/structured_cases.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from dynamo.wire import EngineOutput, OutputConstraint, PreprocessedRequest, SamplingOptions, StopConditions
from workers.builtin.args import BuiltinConfig
from workers.builtin.engine import BuiltinEngine

EOS = 3  # llama-tok's (models/dynamo-tiny's tokenizer)


def engine(model_dir: Path, **overrides: object) -> BuiltinEngine:
    kwargs: dict[str, object] = dict(
        model=str(model_dir), dtype="float64", device="cpu", block_size_tokens=4, num_gpu_blocks=256,
        max_num_batched_tokens=64,
    )
    kwargs.update(overrides)
    return BuiltinEngine(BuiltinConfig(**kwargs))  # type: ignore[arg-type]


def request(
    rid: str, prompt: list[int], max_tokens: int, *, stop: list[int] | None = None,
    constraint: OutputConstraint | None = None, generated_before: int = 0,
    prompt_logprobs: int | None = None, **sampling: Any,
) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=rid, model="m", token_ids=prompt, sampling=SamplingOptions(**sampling),
        stop=StopConditions(max_tokens=max_tokens, stop_token_ids=stop or [], ignore_eos=not stop),
        constraint=constraint, generated_before=generated_before, prompt_logprobs=prompt_logprobs,
    )


async def collect(stream: AsyncIterator[EngineOutput]) -> list[EngineOutput]:
    return [out async for out in stream]


def tokens(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]
