"""Disaggregated vs aggregated serving under a mixed load of long (4k-token) and short prompts
(issue 4's serving comparison), with the mocker engine on CPU: N aggregated workers against
N/2 prefill + N/2 decode workers, the same Poisson arrivals for both, side by side in one run.

    python benchmarks/disagg_serving.py [--pairs 1 2] [--duration-s 60] [--kv-link-gbs 350]

Each configuration is one `python -m dynamo.serve --engine mocker` process (frontend, KV router
and workers, embedded runtime, real time: --speedup-ratio 1) loaded by two `loadgen.py`
processes at once: long prompts at --long-rate and short ones at --short-rate per worker pair.
TTFT and ITL are reported per class (the short requests' ITL is what a long prefill stalls),
throughput for both together. The mocker's decode worker receives the prompt's KV over a
simulated link of --kv-link-gbs (350: the cuda-ipc kernel measured on two H200s). Results go
to benchmarks/results/disagg_serving-STAMP.{json,md}; with --lock PATH each configuration's
measurement holds that flock (the shared-CPU rule of this repository).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from frontend_overhead import REPO, SERVED_MODEL, Stack, free_port  # noqa: E402
from proc_cpu import CpuWindow  # noqa: E402

MODEL_DIR = REPO / "models" / "dynamo-tiny"


def serve_argv(args: argparse.Namespace, port: int, workers: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "dynamo.serve", "--engine", "mocker", "--model", str(MODEL_DIR),
        "--served-model-name", SERVED_MODEL, "--http-port", str(port), "--router-mode", "kv",
        "--speedup-ratio", "1", "--max-model-len", "8192", "--kv-link-gbs", str(args.kv_link_gbs),
        "--disagg-min-prefill-tokens", str(args.min_prefill_tokens), "--log-level", "warning", *workers,
    ]


def configurations(pairs: int) -> list[tuple[str, list[str]]]:
    n = 2 * pairs
    return [
        (f"{n} aggregated", ["--num-workers", str(n)]),
        (f"{pairs}P+{pairs}D", ["--num-workers", str(pairs), "--num-prefill-workers", str(pairs)]),
    ]


def loadgen_argv(args: argparse.Namespace, url: str, input_tokens: int, rate: float, seed: int, out: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "benchmarks" / "loadgen.py"), "--url", url, "--model", SERVED_MODEL,
        "--input-tokens", str(input_tokens), "--output-tokens", str(args.output_tokens),
        # Lengths from words x tokens per word (measured 1.51 for this tokenizer and loadgen's
        # words): loadgen's exact-length path re-encodes the prompt per 8 words, minutes at 4k.
        "--tokens-per-word", "1.51", "--request-rate", str(rate), "--duration-s", str(args.duration_s),
        "--warmup-requests", "2", "--seed", str(seed), "--timeout-s", "120", "--json-out", str(out),
    ]


@contextlib.contextmanager
def held(lock_path: str) -> Iterator[None]:
    if not lock_path:
        yield
        return
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_config(args: argparse.Namespace, name: str, workers: list[str], pairs: int, log_dir: Path) -> dict[str, object]:
    port = free_port()
    stack = Stack(name.replace(" ", "_").replace("+", "_"), port, log_dir)
    with held(args.lock):
        serve = stack.spawn("serve", serve_argv(args, port, workers))
        cpu = CpuWindow(serve.pid, include_children=True)
        try:
            stack.wait_ready(120)
            cpu.start()
            outs = {"long": log_dir / f"{stack.name}-long.json", "short": log_dir / f"{stack.name}-short.json"}
            procs = [
                subprocess.Popen(loadgen_argv(args, stack.base_url, args.long_tokens, args.long_rate * pairs, 1,
                                              outs["long"]), cwd=REPO),
                subprocess.Popen(loadgen_argv(args, stack.base_url, args.short_tokens, args.short_rate * pairs, 2,
                                              outs["short"]), cwd=REPO),
            ]
            for p in procs:
                p.wait(timeout=args.duration_s + 300)
            cpu.stop()
            dead = stack.dead()
            if dead:
                raise RuntimeError(dead)
        finally:
            stack.stop()
    classes = {label: json.loads(path.read_text()) for label, path in outs.items()}
    # On a 2-core box a serve process near 1.0 core is CPU-bound and its latencies say so.
    return {"config": name, "pairs": pairs, "classes": classes, "serve_cpu_cores": round(cpu.cores, 2),
            "req_per_s": round(sum(float(c["req_per_s"]) for c in classes.values()), 2),
            "output_tok_per_s": round(sum(float(c["output_tok_per_s"]) for c in classes.values()), 1)}


def markdown(rows: list[dict[str, object]], args: argparse.Namespace) -> str:
    lines = [
        f"Mocker (8B Llama roofline on an H100, real time), prompts of {args.long_tokens} tokens at "
        f"{args.long_rate}/s and {args.short_tokens} tokens at {args.short_rate}/s per worker pair, "
        f"{args.output_tokens} output tokens each, {args.duration_s:.0f} s per configuration, "
        f"KV link {args.kv_link_gbs} GB/s, --disagg-min-prefill-tokens {args.min_prefill_tokens}.",
        "",
        "| config | class | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | failed | "
        "total req/s | total out tok/s | serve CPU cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        classes = r["classes"]
        assert isinstance(classes, dict)
        for label, c in classes.items():
            lines.append(
                f"| {r['config']} | {label} | {c['req_per_s']} | {c['ttft_ms']['p50']:.0f} | {c['ttft_ms']['p99']:.0f} "
                f"| {c['itl_ms']['p50']:.1f} | {c['itl_ms']['p99']:.1f} | {c['requests_failed']} "
                f"| {r['req_per_s']} | {r['output_tok_per_s']} | {r['serve_cpu_cores']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="*", default=[1, 2], help="worker pairs: 1 = 2 agg vs 1P+1D")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--long-tokens", type=int, default=4096)
    parser.add_argument("--short-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--long-rate", type=float, default=2.0, help="long prompts per second per worker pair")
    parser.add_argument("--short-rate", type=float, default=8.0, help="short prompts per second per worker pair")
    parser.add_argument("--kv-link-gbs", type=float, default=350.0)
    parser.add_argument("--min-prefill-tokens", type=int, default=512)
    parser.add_argument("--lock", default="", help="flock this file around each configuration's run")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="disagg_serving-"))
    print(f"logs: {log_dir}", flush=True)
    rows = []
    for pairs in args.pairs:
        for name, workers in configurations(pairs):
            row = run_config(args, name, workers, pairs, log_dir)
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = markdown(rows, args)
    print(table)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"disagg_serving-{stamp}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / f"disagg_serving-{stamp}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
