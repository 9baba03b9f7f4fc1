"""Disaggregated vLLM on CPUs (issue 16 items 1-2): TTFT of a long prompt served by one prefill
and one decode vLLM worker (the KV moving through our transfer connector, host backend) against
one aggregated vLLM worker, through the frontend.

Run it with the vLLM venv's interpreter (scripts/install_vllm.sh):

    .venv-vllm/bin/python benchmarks/vllm_disagg.py [--prompt-tokens 256,1536] [--requests 5] \
        [--out-dir benchmarks/results]

Each setup is `python -m dynamo.serve --engine vllm` (embedded runtime, one process, frontend
included): aggregated `--num-workers 1`, disaggregated `--num-workers 1 --num-prefill-workers 1
--disagg-min-prefill-tokens 64`, started one after the other (never both at once: they would
share the CPU). The model is a random-weight Llama big enough for prefill to cost something
(that of benchmarks/vllm_kvbm.py: 4 layers, hidden 1024, 16 heads, 4 KV heads of 64, float32).
Per prompt length, requests are sequential streaming completions of distinct token prompts (no
prefix hits), one warm-up first; TTFT is the time from sending the request to the first streamed
token, total the time to the last of `--max-tokens`. Also reported: the decode worker's remote
prefills (dynamo_worker_prefills_total) and the cached_tokens each answer carried (the whole
prompt when its KV arrived from the prefill worker), and whether both setups answered alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_kvbm import BLOCK, build_model, prompt  # noqa: E402  (benchmarks/ is sys.path[0])
from tests.e2e.procs import Stack, base_env, free_port, http_ok, wait_until  # noqa: E402

MODEL = "bench"


def start(kind: str, model: Path, log_dir: Path, port: int, system_port: int) -> Stack:
    stack = Stack(log_dir, base_env(VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE") or "2"))
    extra = ["--num-prefill-workers", "1", "--disagg-min-prefill-tokens", "64"] if kind == "disagg" else []
    proc = stack.start(
        kind, "dynamo.serve", "--engine", "vllm", "--model", str(model), "--served-model-name", MODEL,
        "--http-port", str(port), "--system-port", str(system_port), "--num-workers", "1", *extra, "--dtype", "float32", "--max-model-len", "4096",
        "--block-size", str(BLOCK), "--enforce-eager",
    )  # fmt: skip
    expected = 2 if kind == "disagg" else 1
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/ready") or proc.popen.poll() is not None, 900, "ready")
        wait_until(lambda: proc.log_path.read_text(errors="replace").count(f" serves {MODEL} ") >= expected
                   or proc.popen.poll() is not None, 900, "every worker up")
    except TimeoutError:
        stack.stop_all()
        raise
    if proc.popen.poll() is not None:
        raise SystemExit(f"{kind} stack exited:\n{proc.log()}")
    return stack


def one(base: str, tokens: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": tokens, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    usage: dict[str, Any] = {}
    text = ""
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", ()):
                if choice.get("text") and ttft is None:
                    ttft = time.perf_counter() - t0
                text += choice.get("text") or ""
    total = time.perf_counter() - t0
    cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
    return {"ttft_s": ttft, "total_s": total, "cached_tokens": cached, "text": text}


def remote_prefills(system: str) -> float:
    metrics = httpx.get(f"{system}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("dynamo_worker_prefills_total") and 'where="remote"' in line)


def run(kind: str, model: Path, log_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    port, system_port = free_port(), free_port()
    base, system = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{system_port}"
    t0 = time.perf_counter()
    stack = start(kind, model, log_dir, port, system_port)
    startup = time.perf_counter() - t0
    out = []
    try:
        one(base, prompt(999, 256), args.max_tokens)  # warm-up
        for n in args.prompt_tokens:
            before = remote_prefills(system)
            rows = [one(base, prompt(seed + 100 * n, n), args.max_tokens) for seed in range(args.requests)]
            ttfts = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
            out.append({
                "kind": kind, "prompt_tokens": n, "startup_s": round(startup, 1),
                "ttft_median_s": statistics.median(ttfts), "ttft_min_s": min(ttfts), "ttft_max_s": max(ttfts),
                "total_median_s": statistics.median(r["total_s"] for r in rows),
                "cached_tokens": [r["cached_tokens"] for r in rows], "remote_prefills": remote_prefills(system) - before,
                "texts": [r["text"] for r in rows],
            })
    finally:
        stack.stop_all()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=lambda v: [int(x) for x in v.split(",")], default=[256, 1536])
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vllm-disagg-bench-") as tmp:
        model = build_model(Path(tmp) / "model")
        agg = run("aggregated", model, Path(tmp), args)
        dis = run("disagg", model, Path(tmp), args)
    results = agg + dis
    same = [a["texts"] == d["texts"] for a, d in zip(agg, dis)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.requests} requests per prompt length, "
          f"max_tokens {args.max_tokens}")
    print("| setup | prompt tokens | TTFT median (min-max) | total median | cached_tokens | remote prefills | startup |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['kind']} | {r['prompt_tokens']} | {r['ttft_median_s'] * 1000:.0f} ms ({r['ttft_min_s'] * 1000:.0f}-"
              f"{r['ttft_max_s'] * 1000:.0f}) | {r['total_median_s'] * 1000:.0f} ms | {r['cached_tokens']} | "
              f"{r['remote_prefills']:.0f} | {r['startup_s']} s |")
    print(f"greedy output identical (per prompt length): {same}")
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = args.out_dir / "vllm_disagg.json"
        out.write_text(json.dumps({"args": vars(args) | {"out_dir": str(args.out_dir)}, "results": results,
                                   "identical": same}, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
