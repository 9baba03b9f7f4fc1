"""Offline throughput of `python -m dynamo.serve` (built-in engine) over HTTP: builtin_offline.py's
workload (nano-vllm's benchmark: 256 sequences, prompt and output lengths uniform in 100..1024,
random prompt ids, temperature 0.6, ignore_eos, Qwen3-0.6B's shape with random bf16 weights from
--load-format dummy), every request sent at once as a streaming /v1/completions with the prompt
as token ids. Reports output tokens/s from the first request sent to the last stream's end, TTFT
p50/p99 (send to the first chunk with text), and the serving process' CPU seconds per request:
frontend, router and engine share that one process, so the total is given beside its main
thread's (the event loop: HTTP, preprocessing, detokenizing, SSE, scheduling); the rest is
mostly the engine's model thread. builtin_offline.py runs the same draws in process: the gap
between the two figures is the HTTP path's cost.

The model directory holds config.json and a tokenizer, no weights. The frontend checks prompt
ids against the tokenizer's vocabulary and detokenizes every sampled id, so the tokenizer is
models/dynamo-tiny's byte-level BPE (8,192 ids) with its vocabulary grown to the model's 151,936
ids (each new id the text of two of its tokens): prompt ids up to 10,000 are accepted and every
output id decodes to text, as with a real checkpoint's tokenizer.

With --split-processes the frontend (`dynamo.frontend`) and the engine (`dynamo.worker`) are two
processes over nats-server and etcd, the request plane over TCP; the server's CPU figures are then
the frontend's, with the worker's beside them. --worker-processes splits them the same way inside
`dynamo.serve` itself (the engine in a child process on the parent's hub, no NATS or etcd). With --engine mocker the engine takes no time at
all (the mocker at --speedup-ratio 1e6, on the CPU): what the HTTP path alone sustains.

GPU:  python benchmarks/serve_offline_http.py --out serve_http.json --log-dir .
      python benchmarks/serve_offline_http.py --split-processes --out serve_http_split.json
CPU, the HTTP path alone: python benchmarks/serve_offline_http.py --engine mocker [--split-processes | --worker-processes]
CPU smoke (tiny shape, a few sequences, under a minute): python benchmarks/serve_offline_http.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from builtin_offline import QWEN3_0_6B, SMOKE, workload  # noqa: E402
from frontend_overhead import SERVED_MODEL, Stack, free_port, start_infra  # noqa: E402
from loadgen import percentile  # noqa: E402
from proc_cpu import process_cpu_s, thread_cpu_s  # noqa: E402
from sse_client import RawConnection, RequestResult, one_request  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_DIR = REPO / "models" / "dynamo-tiny"
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# SMOKE's shape with a vocabulary past dynamo-tiny's, so that the smoke run grows the tokenizer
# and sends prompt ids up to 10,000 as the GPU run does.
SMOKE_HTTP: dict[str, Any] = dict(SMOKE, vocab_size=16384)


def grown_tokenizer(vocab_size: int, seed: int = 0) -> dict[str, Any]:
    """dynamo-tiny's tokenizer.json with `vocab_size` ids when that is more than its own: the new
    ids are BPE vocabulary entries that no merge produces (encoding is unchanged) and that
    decode, byte-level, to the text of two random existing tokens."""
    spec: dict[str, Any] = json.loads((TINY_DIR / "tokenizer.json").read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    special = {t["content"] for t in spec["added_tokens"]}
    pieces = [t for t in vocab if t not in special]
    rng = random.Random(seed)
    next_id = max(vocab.values()) + 1
    while next_id < vocab_size:
        token = rng.choice(pieces) + rng.choice(pieces)
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    return spec


def write_model_dir(shape: dict[str, Any], out: Path) -> Path:
    """config.json of `shape` and a tokenizer covering its vocabulary; no weights."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(shape))
    (out / "tokenizer.json").write_text(json.dumps(grown_tokenizer(shape["vocab_size"])))
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_DIR / name, out / name)
    return out


def engine_args(engine: str, model_dir: Path, device: str, max_model_len: int, max_num_batched_tokens: int) -> list[str]:
    """The in-process run's engine settings (builtin: CUDA graphs and the overlap loop are on by
    default on CUDA), or the mocker's with no simulated time at all: the HTTP path alone."""
    common = [
        "--model", str(model_dir), "--served-model-name", SERVED_MODEL, "--max-num-seqs", "256",
        "--max-num-batched-tokens", str(max_num_batched_tokens), "--max-model-len", str(max_model_len),
    ]
    if engine == "mocker":
        return ["--engine", "mocker", *common, "--speedup-ratio", "1e6"]
    return ["--engine", "builtin", *common, "--load-format", "dummy", "--device", device]


def serve_argv(port: int, engine: list[str]) -> list[str]:
    """The embedded default: frontend, round-robin router and one worker in one process."""
    return [sys.executable, "-m", "dynamo.serve", *engine, "--http-host", "127.0.0.1", "--http-port", str(port)]


def start_split(stack: Stack, engine: list[str]) -> int:
    """nats-server, etcd, a `dynamo.frontend` on stack.http_port and a `dynamo.worker` (the
    engine in a process of its own, reached over TCP); returns the worker's pid."""
    env = {**start_infra(stack), "DYN_REQUEST_PLANE": "tcp"}
    stack.spawn("frontend", [sys.executable, "-m", "dynamo.frontend", "--http-host", "127.0.0.1",
                             "--http-port", str(stack.http_port), "--router-mode", "round-robin"], env)
    worker = stack.spawn("worker", [sys.executable, "-m", "dynamo.worker", *engine], env)
    return worker.pid


def request_body(prompt: list[int], max_tokens: int, temperature: float) -> bytes:
    return json.dumps({
        "model": SERVED_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }).encode()


async def send_all(port: int, work: list[tuple[list[int], int]], temperature: float, timeout_s: float,
                   pid: int, worker_pid: int | None = None) -> dict[str, Any]:
    """One warm-up request on the measured path, then every request of `work` at once, each on
    its own connection; the server's CPU (and a separate worker's) is read around the burst."""
    warm = RawConnection("127.0.0.1", port, quickack=True)
    first = await one_request(warm, "/v1/completions", request_body(work[0][0][:64], 8, temperature), False, timeout_s)
    await warm.close()
    if not first.ok:
        raise RuntimeError(f"warm-up request failed: {first.error}")

    conns = [RawConnection("127.0.0.1", port, quickack=True) for _ in work]
    bodies = [request_body(prompt, max_tokens, temperature) for prompt, max_tokens in work]
    cpu0, main0, client0 = process_cpu_s(pid), thread_cpu_s(pid, pid), time.process_time()
    worker0 = process_cpu_s(worker_pid) if worker_pid is not None else 0.0
    start = time.monotonic()
    results = await asyncio.gather(
        *(one_request(conn, "/v1/completions", body, False, timeout_s) for conn, body in zip(conns, bodies, strict=True))
    )
    end = max(r.end_s for r in results)
    cpu_s, main_s = process_cpu_s(pid) - cpu0, thread_cpu_s(pid, pid) - main0
    client_s = time.process_time() - client0
    worker_s = process_cpu_s(worker_pid) - worker0 if worker_pid is not None else None
    await asyncio.gather(*(c.close() for c in conns))
    res = summarize(work, results, end - start, cpu_s, main_s, client_s)
    if worker_s is not None:
        res.update(worker_cpu_s=worker_s, worker_cores_busy=worker_s / (end - start))
    return res


def summarize(work: list[tuple[list[int], int]], results: list[RequestResult], elapsed_s: float,
              cpu_s: float, main_s: float, client_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    ttft = sorted(r.ttft_s for r in ok)
    itl = sorted(gap for r in ok for gap in r.itl_s)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    n = len(results)
    return {
        "requests": n, "ok": len(ok), "errors": errors,
        # ignore_eos: each stream must yield exactly its max_tokens (from its usage block).
        "wrong_token_counts": sum(r.ok and r.output_tokens != m for r, (_, m) in zip(results, work, strict=True)),
        "elapsed_s": elapsed_s, "output_tokens": out_tokens, "output_tok_s": out_tokens / elapsed_s,
        "total_tok_s": (out_tokens + sum(len(p) for p, _ in work)) / elapsed_s,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99),
        "server_cpu_s": cpu_s, "server_cpu_s_per_request": cpu_s / n, "server_cores_busy": cpu_s / elapsed_s,
        "server_main_thread_cpu_s": main_s, "server_main_thread_cpu_s_per_request": main_s / n,
        "server_main_thread_busy": main_s / elapsed_s,
        "client_cpu_s": client_s, "client_cores_busy": client_s / elapsed_s,
    }


def run_client(port: int, work: list[tuple[list[int], int]], temperature: float, timeout_s: float,
               pid: int, worker_pid: int | None = None) -> dict[str, Any]:
    coro = send_all(port, work, temperature, timeout_s, pid, worker_pid)
    try:
        import uvloop  # the client's own CPU per chunk stays small beside the server's

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def device_name(device: str) -> str:
    """The GPU's name from nvidia-smi: the client must not touch CUDA, whose context would take
    memory the server sizes its KV cache from."""
    if device == "cpu" or shutil.which("nvidia-smi") is None:
        return device
    query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)  # nano-vllm's default
    p.add_argument("--ready-timeout-s", type=float, default=300.0, help="model build and CUDA-graph capture")
    p.add_argument("--request-timeout-s", type=float, default=240.0)
    p.add_argument("--log-dir", default=None, help="where the server's log goes (default: a temporary dir)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, a few short sequences")
    p.add_argument("--engine", choices=["builtin", "mocker"], default="builtin",
                   help="mocker: no engine time at all (CPU, the full workload): what the HTTP path alone sustains")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="the worker's --stream-interval: tokens a message after the first")
    p.add_argument("--split-processes", action="store_true",
                   help="dynamo.frontend and dynamo.worker as two processes over nats-server and etcd "
                        "(the server's CPU figures are then the frontend's)")
    p.add_argument("--worker-processes", action="store_true",
                   help="dynamo.serve --worker-processes: the engine in a child process, no NATS or etcd "
                        "(the server's CPU figures are then the parent's, the child's beside them)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    shape: dict[str, Any] = SMOKE_HTTP if args.smoke else QWEN3_0_6B
    if args.smoke:
        args.num_seqs, args.min_len, args.max_len = 8, 4, 24
    device = "cpu" if args.smoke or args.engine == "mocker" else "cuda"
    work = workload(args.num_seqs, args.min_len, args.max_len, min(10000, shape["vocab_size"] - 1))
    res: dict[str, Any] = {"shape": {k: shape[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
                           "num_seqs": args.num_seqs, "lengths": [args.min_len, args.max_len],
                           "prompt_tokens": sum(len(w[0]) for w in work), "max_output_tokens": sum(w[1] for w in work),
                           "device": device_name(device)}
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(args.log_dir) if args.log_dir else Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        model_dir = write_model_dir(shape, Path(tmp) / "model")
        stack = Stack("serve_http", free_port(), log_dir)
        max_model_len = 2 * args.max_len + 16
        worker_pid = None
        engine = [*engine_args(args.engine, model_dir, device, max_model_len, args.max_num_batched_tokens),
                  "--stream-interval", str(args.stream_interval)]
        res.update(engine=args.engine, split_processes=args.split_processes, stream_interval=args.stream_interval,
                   worker_processes=args.worker_processes)
        try:
            t0 = time.monotonic()
            if args.split_processes:
                worker_pid = start_split(stack, engine)
            else:
                argv = serve_argv(stack.http_port, [*engine, "--worker-processes" if args.worker_processes else "--no-worker-processes"])
                res["server_argv"] = argv[1:]
                server = stack.spawn("server", argv)
            stack.wait_ready(args.ready_timeout_s)
            if args.worker_processes:
                # The parent opens its HTTP port only once its worker child serves.
                worker_pid = int(Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()[0])
            res["server_ready_s"] = time.monotonic() - t0
            assert stack.frontend_pid is not None
            res.update(run_client(stack.http_port, work, args.temperature, args.request_timeout_s, stack.frontend_pid,
                                  worker_pid))
        except BaseException:
            for label, _ in stack.procs:
                print(f"--- {label}\n{stack.log_tail(label)}", file=sys.stderr)
            raise
        finally:
            stack.stop()
            if stack.data_dir is not None:
                shutil.rmtree(stack.data_dir, ignore_errors=True)
        res["server_logs"] = [str(log_dir / f"serve_http-{label}.log") for label, _ in stack.procs] if args.log_dir else None
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    if res["ok"] != res["requests"] or res["wrong_token_counts"]:
        raise SystemExit("some requests failed or returned the wrong number of tokens")


if __name__ == "__main__":
    main()
