"""Offline throughput of the built-in engine on nano-vllm's published benchmark shape: 256
sequences, prompt and output lengths uniform in 100..1024, random prompt ids, temperature 0.6,
ignore_eos, Qwen3-0.6B's shape (28 layers, hidden 1024, 16 heads, 8 KV heads, head_dim 128,
q/k norms, tied 151,936-token vocabulary) with random bf16 weights. Every request is submitted
at once to the engine's full scheduler (BuiltinEngine: continuous batching, chunked prefill,
CUDA graphs, the overlap loop or not), output tokens/s over the whole run.

Beside it: the floor of the same work (every decode step reads the weights and each running
sequence's KV, at the measured copy bandwidth; prefill at the measured bf16 matmul peak), and
the model runner alone decoding 256 sequences at the run's mean context (no scheduler).

GPU:  python benchmarks/builtin_offline.py --out offline.json
CPU smoke (tiny shape, a few sequences): python benchmarks/builtin_offline.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dynamo.wire import PreprocessedRequest, SamplingOptions, StopConditions  # noqa: E402
from workers.builtin import executor as executor_module  # noqa: E402
from workers.builtin.args import BuiltinConfig  # noqa: E402
from workers.builtin.config import ModelConfig  # noqa: E402
from workers.builtin.engine import BuiltinEngine  # noqa: E402

QWEN3_0_6B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
    "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "torch_dtype": "bfloat16",
}
SMOKE = dict(QWEN3_0_6B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=0, eos_token_id=1)


def workload(num_seqs: int, lo: int, hi: int, max_id: int = 10000, seed: int = 0) -> list[tuple[list[int], int]]:
    """nano-vllm bench.py's: prompt ids uniform in [0, 10000], both lengths uniform in [lo, hi]."""
    rng = random.Random(seed)
    return [([rng.randint(0, max_id) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi)) for _ in range(num_seqs)]


async def run_engine(config: BuiltinConfig, work: list[tuple[list[int], int]], temperature: float) -> dict[str, Any]:
    # Bound before `async with`: Engine.__aenter__ is typed as returning the base Engine.
    eng = BuiltinEngine(config)
    async with eng:
        # Warm-up: one short request (first-call compilations, allocator growth).
        warm = PreprocessedRequest(request_id="warm", model="m", token_ids=work[0][0][:64],
                                   sampling=SamplingOptions(temperature=temperature),
                                   stop=StopConditions(max_tokens=8, ignore_eos=True))
        async for _ in eng.generate(warm):
            pass
        steps0 = eng.num_steps

        async def one(i: int, prompt: list[int], max_tokens: int) -> int:
            req = PreprocessedRequest(request_id=f"r{i}", model="m", token_ids=prompt,
                                      sampling=SamplingOptions(temperature=temperature),
                                      stop=StopConditions(max_tokens=max_tokens, ignore_eos=True))
            n = 0
            async for out in eng.generate(req):
                n += len(out.token_ids)
            return n

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p, m) for i, (p, m) in enumerate(work)))
        elapsed = time.perf_counter() - start
        sched = eng.scheduler
        return {
            "elapsed_s": elapsed, "output_tokens": sum(counts), "output_tok_s": sum(counts) / elapsed,
            "total_tok_s": (sum(counts) + sum(len(p) for p, _ in work)) / elapsed,
            "steps": eng.num_steps - steps0, "preemptions": sched.num_preemptions,
            "overlap": eng.executor.overlap, "kv_blocks": eng.pool.num_blocks,
        }


def runner_only(eng_config: BuiltinConfig, batch: int, ctx: int, steps: int) -> dict[str, float]:
    """The model runner alone: `batch` sequences at `ctx` tokens, greedy decode steps (graphs),
    overlapped as the engine's loop does; no scheduler."""
    import builtin_gpu

    ex = executor_module.TorchExecutor(eng_config)
    runner = ex._build_runner()
    vocab = runner.model.config.vocab_size
    builtin_gpu.BLOCK = eng_config.block_size_tokens
    seqs = builtin_gpu.Sequences(batch, ctx, ctx + steps + 8, vocab)
    seqs.prefill(runner, budget=eng_config.max_num_batched_tokens)
    for _ in range(3):
        seqs.decode(runner)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    seqs.decode_overlapped(runner, steps)
    elapsed = time.perf_counter() - start
    del runner, ex
    return {"batch": batch, "ctx": ctx, "tok_s": batch * steps / elapsed, "step_ms": 1e3 * elapsed / steps}


def floor(mc: ModelConfig, work: list[tuple[list[int], int]], steps: int, bw: float, peak: float) -> dict[str, float]:
    """A lower bound on the run's time: each step reads every weight once (embedding rows aside,
    the tied LM head included), each decode reads its sequence's KV so far; prefill at peak."""
    weights = 2 * (mc.num_layers * (mc.hidden_size * (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim
                                   + mc.num_heads * mc.head_dim * mc.hidden_size
                                   + 3 * mc.hidden_size * mc.intermediate_size)
                   + mc.vocab_size * mc.hidden_size)
    kv_tok = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 2
    kv_read = sum(sum(len(p) + t for t in range(out)) for p, out in work) * kv_tok
    prompt_tokens = sum(len(p) for p, _ in work)
    flops = 2 * (weights / 2 - mc.vocab_size * mc.hidden_size) * prompt_tokens + 2 * sum(
        2 * mc.num_layers * mc.num_heads * mc.head_dim * len(p) * (len(p) + 1) / 2 for p, _ in work)
    t = (steps * weights + kv_read) / bw + flops / peak
    out_tokens = sum(out for _, out in work)
    return {"floor_s": t, "floor_output_tok_s": out_tokens / t, "weight_bytes": weights,
            "kv_read_bytes": kv_read, "prefill_flops": flops, "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)  # nano-vllm's default
    p.add_argument("--modes", nargs="+", default=["overlap", "plain"])
    p.add_argument("--runner-steps", type=int, default=32)
    p.add_argument("--compare-prefill-graphs", action="store_true",
                   help="run the first mode again with --no-prefill-cuda-graphs (eager prefill steps)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, a few short sequences")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    shape = SMOKE if args.smoke else QWEN3_0_6B
    if args.smoke:
        args.num_seqs, args.min_len, args.max_len, args.runner_steps = 6, 4, 24, 4
    device = "cpu" if args.smoke else "cuda"
    work = workload(args.num_seqs, args.min_len, args.max_len, min(10000, shape["vocab_size"] - 1))
    res: dict[str, Any] = {"shape": {k: shape[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
                           "num_seqs": args.num_seqs, "lengths": [args.min_len, args.max_len],
                           "prompt_tokens": sum(len(w[0]) for w in work), "max_output_tokens": sum(w[1] for w in work)}
    if device == "cuda":
        import builtin_gpu
        import triton

        res.update(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
        res["copy_bw_GBs"] = builtin_gpu.measure_bandwidth(torch.device("cuda")) / 1e9
        res["matmul_bf16_TFLOPs"] = builtin_gpu.matmul_peak(torch.device("cuda")) / 1e12
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(shape))
        # No checkpoint: random weights of the shape (--load-format dummy).
        base = dict(model=tmp, load_format="dummy", device=device, max_num_seqs=256,
                    max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=2 * args.max_len + 16)
        runs = [(mode, True) for mode in args.modes]
        if args.compare_prefill_graphs:
            runs.append((args.modes[0], False))
        for mode, prefill_graphs in runs:
            config = BuiltinConfig(**base, overlap_schedule=mode == "overlap", prefill_cuda_graphs=prefill_graphs)
            r = asyncio.run(run_engine(config, work, args.temperature))
            key = mode if prefill_graphs else f"{mode}_eager_prefill"
            res[f"engine_{key}"] = r
            print(key, r, flush=True)
            # This engine's cache goes before the next engine (or the runner) sizes its own from
            # what is free: on an H100 a second engine found 8,393 blocks free against 33,024.
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        mean_ctx = int(statistics.mean(len(p_) + out / 2 for p_, out in work))
        if args.runner_steps:
            res["runner_only"] = runner_only(BuiltinConfig(**base), min(256, args.num_seqs), mean_ctx, args.runner_steps)
            print("runner only", res["runner_only"], flush=True)
    if device == "cuda":
        from workers.builtin.config import load_model_config

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(shape))
            mc = load_model_config(tmp)
        key = f"engine_{args.modes[0]}"
        res["floor"] = floor(mc, work, res[key]["steps"], res["copy_bw_GBs"] * 1e9, res["matmul_bf16_TFLOPs"] * 1e12)
        for key in (k for k in res if k.startswith("engine_")):
            res[key]["pct_of_floor"] = 100 * res[key]["output_tok_s"] / res["floor"]["floor_output_tok_s"]
        print("floor", res["floor"], flush=True)
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
