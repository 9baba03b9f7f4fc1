"""The paged engine core's own cost on the CPU, in process (no frontend, no request plane): the
mocker at a speedup where steps never sleep, so what is measured is scheduling, the step loop and
the request streams; and the built-in engine on models/dynamo-tiny (fp32), where the forward
pass dominates. Reports output tokens/s (wall) and CPU per output token (process time, which a
busy machine inflates less than wall time), best of the repeats. Used to check that restructuring
the core costs nothing (RESULTS.md, "One paged engine core").

    python benchmarks/paged_engine_cpu.py mocker     # ~5 s
    python benchmarks/paged_engine_cpu.py builtin    # ~1 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamo.wire import PreprocessedRequest, SamplingOptions, StopConditions  # noqa: E402
from workers.engine import Engine  # noqa: E402


def request(i: int, prompt_tokens: int, output_tokens: int, vocab: int) -> PreprocessedRequest:
    prompt = [(7 * i + 13 * k + 1) % (vocab - 2) + 1 for k in range(prompt_tokens)]  # distinct per i
    return PreprocessedRequest(f"r{i}", "m", prompt, sampling=SamplingOptions(),
                               stop=StopConditions(max_tokens=output_tokens, ignore_eos=True))


async def drive(engine: Engine, concurrency: int, total: int, prompt_tokens: int, output_tokens: int,
                vocab: int) -> tuple[float, float]:
    """Tokens/s and CPU microseconds per token of `total` requests, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)
    count = 0

    async def one(i: int) -> None:
        nonlocal count
        async with gate:
            async for out in engine.generate(request(i, prompt_tokens, output_tokens, vocab)):
                count += len(out.token_ids)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(total)))
    return count / (time.perf_counter() - wall), 1e6 * (time.process_time() - cpu) / count


async def mocker(repeats: int) -> dict[str, float]:
    from workers.mocker.args import MockerConfig
    from workers.mocker.engine import MockerEngine

    out: dict[str, float] = {}
    for concurrency, total in ((1, 64), (64, 1024)):
        best, cpu = 0.0, float("inf")
        for _ in range(repeats):
            async with MockerEngine(MockerConfig(speedup_ratio=1e9, vocab_size=32000)) as engine:
                tok_s, us = await drive(engine, concurrency, total, 100, 32, 32000)
            best, cpu = max(best, tok_s), min(cpu, us)
        out[f"mocker_c{concurrency}_tok_s"] = round(best)
        out[f"mocker_c{concurrency}_cpu_us_per_tok"] = round(cpu, 1)
    return out


async def builtin(repeats: int) -> dict[str, float]:
    from workers.builtin.args import BuiltinConfig
    from workers.builtin.engine import BuiltinEngine

    out: dict[str, float] = {}
    async with BuiltinEngine(BuiltinConfig(model="models/dynamo-tiny", dtype="float32", device="cpu")) as engine:
        await drive(engine, 4, 4, 128, 4, 8000)  # warm-up
        for concurrency, total in ((1, 2), (16, 16)):
            best, cpu = 0.0, float("inf")
            for _ in range(repeats):
                tok_s, us = await drive(engine, concurrency, total, 128, 16, 8000)
                best, cpu = max(best, tok_s), min(cpu, us)
            out[f"builtin_c{concurrency}_tok_s"] = round(best, 1)
            out[f"builtin_c{concurrency}_cpu_ms_per_tok"] = round(cpu / 1e3, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=["mocker", "builtin"])
    p.add_argument("--repeats", type=int, default=None, help="default: 3 for the mocker, 2 for builtin")
    args = p.parse_args()
    if args.engine == "mocker":
        result = asyncio.run(mocker(args.repeats or 3))
    else:
        result = asyncio.run(builtin(args.repeats or 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
