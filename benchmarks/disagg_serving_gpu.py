"""Disaggregated vs aggregated serving on ONE GPU with the built-in engine (issue 21 item 3):
1 prefill + 1 decode worker sharing the GPU (memory split by --gpu-memory-utilization and
--prefill-gpu-memory-utilization, the per-role flags of dynamo.serve) against 1 aggregated
worker with the same share, under benchmarks/disagg_serving.py's mixed load (long and short
prompts, Poisson arrivals, fixed output length). TTFT and ITL p50/p99 per class, throughput.

In process, no HTTP (the device machine has no serving stack): the embedded runtime, the real
Worker handlers (the decode handler's local/remote decision, the KV-aware prefill router, the
prefill handler, the transfer agents: same-process backend) and the request plane's client, as
`dynamo.serve --num-prefill-workers 1` wires them, minus the frontend (requests are token ids).
Model: builtin_gpu.py's 1.1B Llama shape with random bf16 weights.

Each configuration runs in its own process (memory and CUDA graphs released in between):

    python benchmarks/disagg_serving_gpu.py --configs agg disagg disagg-streams --out r.json
    python benchmarks/disagg_serving_gpu.py --smoke      # CPU, tiny shape, a few seconds

`disagg` is what dynamo.serve does today: both engines launch on the device's default stream,
so a prefill's kernels and a decode step's queue behind each other. `disagg-streams` gives each
engine's model thread its own CUDA stream (a benchmark-side patch, not an engine flag), so the
GPU can run decode steps while a prefill runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
SMOKE = dict(LLAMA_1B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


async def one_request(client: Any, iid: int, rid: str, prompt: list[int], max_tokens: int, cls: str,
                      records: list[dict[str, Any]]) -> list[int]:
    from dynamo.wire import OUTPUT_CODEC, PreprocessedRequest, SamplingOptions, StopConditions, encode

    req = PreprocessedRequest(rid, "bench", prompt, stop=StopConditions(max_tokens=max_tokens, ignore_eos=True),
                              sampling=SamplingOptions(temperature=0.0))
    start = time.perf_counter()
    times: list[float] = []
    counts: list[int] = []
    tokens: list[int] = []
    try:
        stream = await client.generate(encode(req), iid, rid)
        async for payload in stream:
            out = OUTPUT_CODEC.decode(payload)
            if out.token_ids:
                times.append(time.perf_counter())
                counts.append(len(out.token_ids))
                tokens.extend(out.token_ids)
    except Exception as exc:  # counted, not fatal
        records.append({"cls": cls, "failed": repr(exc), "start": start})
        return tokens
    itls: list[float] = []
    for i in range(1, len(times)):
        itls += [(times[i] - times[i - 1]) / counts[i]] * counts[i]
    records.append({"cls": cls, "start": start, "ttft": times[0] - start if times else None, "itls": itls,
                    "tokens": len(tokens), "end": times[-1] if times else start})
    return tokens


def own_stream_per_engine() -> None:
    """Each built-in engine's model thread launches on a CUDA stream of its own (torch's current
    stream is per thread; the thread is set up by _build_runner's first call)."""
    import torch

    from workers.builtin import executor

    build = executor.TorchExecutor._build_runner

    def build_on_own_stream(self: Any) -> Any:
        if self.device.type == "cuda":
            torch.cuda.set_stream(torch.cuda.Stream(self.device))
        return build(self)

    executor.TorchExecutor._build_runner = build_on_own_stream  # type: ignore[method-assign]


async def run_config(args: argparse.Namespace, config: str) -> dict[str, Any]:
    import torch

    from dynamo.config import RuntimeConfig
    from dynamo.runtime import Runtime
    from workers.builtin.args import add_builtin_args
    from workers.builtin.engine import BuiltinEngine
    from workers.builtin.args import BuiltinConfig
    from workers.disagg.args import DisaggConfig
    from workers.worker import Worker, WorkerConfig

    if config == "disagg-streams":
        own_stream_per_engine()
    disagg = config.startswith("disagg")
    shape = SMOKE if args.smoke else LLAMA_1B
    tmp = tempfile.mkdtemp()
    (Path(tmp) / "config.json").write_text(json.dumps(shape))
    parser = argparse.ArgumentParser()
    add_builtin_args(parser)
    device = "cpu" if args.smoke else "cuda"
    flags = ["--load-format", "dummy", "--device", device, "--max-num-seqs", str(args.max_num_seqs),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-model-len", "8192"]
    if args.smoke:
        flags += ["--num-gpu-blocks", "512", "--block-size", "16"]
    elif disagg:  # the per-role split of the aggregated worker's share
        flags += ["--gpu-memory-utilization", str(args.decode_util),
                  "--prefill-gpu-memory-utilization", str(args.agg_util - args.decode_util)]
    else:
        flags += ["--gpu-memory-utilization", str(args.agg_util)]
    engine_args = parser.parse_args(flags)
    engine_args.model = tmp
    dcfg = DisaggConfig(min_prefill_tokens=args.min_prefill_tokens, prefill_timeout_s=120.0,
                        kv_transfer_host="127.0.0.1")
    roles = ["decode", "prefill"] if disagg else ["aggregated"]
    result: dict[str, Any] = {"config": config, "flags": flags}
    started = time.perf_counter()
    async with await Runtime.create(RuntimeConfig()) as rt, contextlib.AsyncExitStack() as stack:
        workers = []
        for i, role in enumerate(roles):
            wrt = rt if i == 0 else rt.sibling()
            if i > 0:
                await stack.enter_async_context(wrt)
            engine = BuiltinEngine(BuiltinConfig.from_args(argparse.Namespace(**vars(engine_args), role=role)))
            wcfg = WorkerConfig("bench", str(REPO / "models" / "dynamo-tiny"), "builtin",
                                component=dcfg.prefill_component if role == "prefill" else "backend",
                                role=role, disagg=dcfg)  # type: ignore[arg-type]
            workers.append(await stack.enter_async_context(Worker(wrt, engine, wcfg)))
        front = workers[0]
        if disagg:
            await front.disagg.decode.client.wait_for_instances(30)  # type: ignore[union-attr]
        result["startup_s"] = round(time.perf_counter() - started, 1)
        result["kv_blocks"] = {role: w.engine.pool.num_blocks for role, w in zip(roles, workers)}  # type: ignore[attr-defined]
        client = await rt.endpoint("backend", "generate").client()
        await client.wait_for_instances(30)
        iid = front.instance_id
        vocab = int(shape["vocab_size"])  # type: ignore[call-overload]
        rng = random.Random(0)
        long_n, short_n, out_n = args.long_tokens, args.short_tokens, args.output_tokens

        def prompt(n: int) -> list[int]:
            return [rng.randrange(3, vocab) for _ in range(n)]

        # Warm-up (compilations, allocator growth) and the correctness probe: the greedy tokens
        # of one fixed long prompt, compared across configurations by the driver.
        warm: list[dict[str, Any]] = []
        probe = [random.Random(42).randrange(3, vocab) for _ in range(long_n)]
        result["probe_tokens"] = await one_request(client, iid, "probe", probe, 32, "probe", warm)
        for i in range(args.warmup):
            await asyncio.gather(one_request(client, iid, f"wl{i}", prompt(long_n), out_n, "long", warm),
                                 *(one_request(client, iid, f"ws{i}.{j}", prompt(short_n), out_n, "short", warm)
                                   for j in range(4)))
        if device == "cuda":
            torch.cuda.synchronize()
        records: list[dict[str, Any]] = []
        tasks: list[asyncio.Task[Any]] = []
        load_start = time.perf_counter()

        async def arrivals(cls: str, n_tokens: int, rate: float, seed: int) -> None:
            arr = random.Random(seed)
            prompts = random.Random(seed + 100)
            t = load_start
            i = 0
            while True:
                t += arr.expovariate(rate)
                if t - load_start > args.duration_s:
                    return
                await asyncio.sleep(max(0.0, t - time.perf_counter()))
                p = [prompts.randrange(3, vocab) for _ in range(n_tokens)]
                tasks.append(asyncio.create_task(one_request(client, iid, f"{cls}{i}", p, out_n, cls, records)))
                i += 1

        await asyncio.gather(arrivals("long", long_n, args.long_rate, 1), arrivals("short", short_n, args.short_rate, 2))
        await asyncio.wait_for(asyncio.gather(*tasks), args.duration_s + 120)
        load_end = max((r["end"] for r in records), default=load_start)
        await client.close()
        classes = {}
        for cls in ("long", "short"):
            rs = [r for r in records if r["cls"] == cls]
            ok = [r for r in rs if "failed" not in r]
            itls = [x for r in ok for x in r["itls"]]
            ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
            classes[cls] = {
                "requests": len(rs), "failed": len(rs) - len(ok),
                "req_per_s": round(len(ok) / (load_end - load_start), 2),
                "ttft_ms": {"p50": pct(ttfts, 50) * 1e3, "p99": pct(ttfts, 99) * 1e3,
                            "mean": statistics.fmean(ttfts) * 1e3 if ttfts else float("nan")},
                "itl_ms": {"p50": pct(itls, 50) * 1e3, "p99": pct(itls, 99) * 1e3,
                           "mean": statistics.fmean(itls) * 1e3 if itls else float("nan")},
            }
        done = [r for r in records if "failed" not in r]
        result.update(
            classes=classes, load_s=round(load_end - load_start, 2),
            req_per_s=round(len(done) / (load_end - load_start), 2),
            output_tok_per_s=round(sum(r["tokens"] for r in done) / (load_end - load_start), 1),
            failures=[r["failed"] for r in records if "failed" in r][:5],
        )
        if disagg:
            handler = front.disagg.decode  # type: ignore[union-attr]
            agent = workers[1].disagg.agent  # type: ignore[union-attr]
            assert handler is not None and agent is not None
            result["decode_stats"] = {"remote": handler.stats.remote_prefills, "local": handler.stats.local_prefills,
                                      "fallbacks": handler.stats.fallbacks}
            result["transfers"] = {"by_backend": dict(agent.stats.by_backend), "bytes": agent.stats.sent_bytes}
        if device == "cuda":
            free, total = torch.cuda.mem_get_info()
            result["gpu_mem_used_gb"] = round((total - free) / 1e9, 1)
            result["gpu_mem_total_gb"] = round(total / 1e9, 1)
    return result


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Prompts of {args.long_tokens} tokens at {args.long_rate}/s and {args.short_tokens} tokens at "
        f"{args.short_rate}/s (Poisson), {args.output_tokens} output tokens each (greedy, ignore_eos), "
        f"{args.duration_s:.0f} s of arrivals per configuration, --disagg-min-prefill-tokens {args.min_prefill_tokens}.",
        "",
        "| config | class | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | failed | all req/s | all out tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "classes" not in r:
            lines.append(f"| {r['config']} | failed: {r.get('error', '?')[:80]} | | | | | | | | |")
            continue
        for cls, c in r["classes"].items():
            lines.append(
                f"| {r['config']} | {cls} | {c['req_per_s']} | {c['ttft_ms']['p50']:.1f} | {c['ttft_ms']['p99']:.1f} "
                f"| {c['itl_ms']['p50']:.2f} | {c['itl_ms']['p99']:.2f} | {c['failed']} | {r['req_per_s']} "
                f"| {r['output_tok_per_s']} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", default=["agg", "disagg", "disagg-streams"])
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one configuration here
    p.add_argument("--duration-s", type=float, default=30.0)
    p.add_argument("--long-tokens", type=int, default=4096)
    p.add_argument("--short-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--long-rate", type=float, default=6.0, help="long prompts per second")
    p.add_argument("--short-rate", type=float, default=24.0, help="short prompts per second")
    p.add_argument("--min-prefill-tokens", type=int, default=512)
    p.add_argument("--agg-util", type=float, default=0.5, help="the aggregated worker's share of the GPU")
    p.add_argument("--decode-util", type=float, default=0.3, help="the decode worker's share; prefill: the rest")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=240.0, help="per configuration")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, short load")
    p.add_argument("--out", default="")
    p.add_argument("--log-dir", default="", help="each configuration's stderr goes to LOG_DIR/CONFIG.log")
    args = p.parse_args()
    if args.smoke:
        args.duration_s, args.long_tokens, args.short_tokens, args.output_tokens = 2.0, 600, 32, 8
        args.long_rate, args.short_rate, args.warmup = 2.0, 4.0, 1
    if args.one:
        print("RESULT " + json.dumps(asyncio.run(run_config(args, args.one))), flush=True)
        return
    env = dict(os.environ)
    res: dict[str, Any] = {"args": vars(args)}
    try:
        import torch
        import triton  # type: ignore[import-not-found,unused-ignore]

        res.update(torch=torch.__version__, triton=triton.__version__,
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    except ImportError:
        pass
    rows = []
    argv = list(sys.argv[1:])
    for config in args.configs:
        cmd = [sys.executable, __file__, *argv, "--one", config]
        t0 = time.perf_counter()
        try:
            with open(Path(args.log_dir) / f"{config}.log" if args.log_dir else os.devnull, "w") as log:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=args.timeout_s,
                                      env=env, cwd=REPO)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                row = {"config": config, "error": f"exit {proc.returncode}: {proc.stdout[-1500:]}"}
            else:
                row = json.loads(line[len("RESULT "):])
        except subprocess.TimeoutExpired as exc:
            row = {"config": config, "error": f"timed out after {args.timeout_s} s: {str(exc.stdout)[-1500:]}"}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        brief = {k: v for k, v in row.items() if k not in ("probe_tokens",)}
        print(json.dumps(brief), flush=True)
    probes = {r["config"]: r.get("probe_tokens") for r in rows}
    ref = probes.get("agg")
    res["probe_equal_to_agg"] = {c: (t == ref) for c, t in probes.items() if ref is not None and t is not None}
    res["rows"] = rows
    table = markdown(rows, args)
    print(table)
    print("greedy probe (32 tokens of one long prompt) equal to aggregated:", res["probe_equal_to_agg"], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
