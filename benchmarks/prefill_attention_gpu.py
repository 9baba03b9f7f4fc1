"""Prefill attention of the built-in engine, one layer, on one GPU: the varlen paged Triton kernel
(K/V read in place through the block tables) against the gather-then-SDPA path it replaced, on
the step shapes serving produces: whole prompts, a turn's new tokens after a cached conversation,
and a prefill chunk sharing its step with decodes. Each figure includes the K/V cache write; the
metadata each backend builds once a step (shared by every layer) is timed on its own.

GPU:  python benchmarks/prefill_attention_gpu.py --out results.json
CPU:  TRITON_INTERPRET=1 python benchmarks/prefill_attention_gpu.py --smoke   (checks the script)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TypedDict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.builtin import gpu_kernels  # noqa: E402
from workers.builtin.attention import SdpaPagedAttention, SeqSlice, TritonPagedAttention  # noqa: E402

BLOCK = 16
# The ~1.1B Llama shape of builtin_gpu.py: 32 query heads over 8 KV heads of 64.
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 64


class Tiling(TypedDict, total=False):
    """Keyword overrides of gpu_kernels.paged_prefill_attention's launch; absent: its default."""

    rows: int
    block_n: int
    num_warps: int
    num_stages: int


# (name, [(cached, new)] per sequence)
SHAPES: list[tuple[str, list[tuple[int, int]]]] = [
    ("4 prompts x 512", [(0, 512)] * 4),
    ("16 prompts x 512", [(0, 512)] * 16),
    ("1 prompt x 2048", [(0, 2048)]),
    ("turn: 448 new after 2048 cached", [(2048, 448)]),
    ("3 turns: 448 new after 1024-3072 cached", [(1024, 448), (2048, 448), (3072, 448)]),
    ("chunk 512 after 1024 + 15 decodes at 1500", [(1024, 512)] + [(1500, 1)] * 15),
]
SMOKE_SHAPES: list[tuple[str, list[tuple[int, int]]]] = [
    ("smoke: 2 prompts x 20", [(0, 20)] * 2),
    ("smoke: chunk 9 after 30 + 2 decodes", [(30, 9), (17, 1), (40, 1)]),
]


def flops(seqs: list[tuple[int, int]]) -> float:
    """QK^T and PV of causal attention with cached prefixes (2 FLOPs a multiply-add)."""
    pairs = sum(new * cached + new * (new + 1) / 2 for cached, new in seqs)
    return 2 * 2 * HEADS * HEAD_DIM * pairs


def bench(fn: Any, device: torch.device, reps: int) -> float:
    """Median ms of `fn` (CUDA events on a GPU, wall clock otherwise)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def host_ms(build: Any, device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        build()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run_shape(name: str, shape: list[tuple[int, int]], device: torch.device, dtype: torch.dtype,
              tilings: list[Tiling], reps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    per_seq = [-(-(c + n) // BLOCK) for c, n in shape]
    num_blocks = sum(per_seq) + 1
    order = torch.randperm(num_blocks - 1, generator=g).tolist()  # scattered blocks
    seqs, at = [], 0
    for (cached, new), nb in zip(shape, per_seq):
        seqs.append(SeqSlice(cached, new, order[at : at + nb]))
        at += nb
    tokens = sum(n for _, n in shape)
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
    q = torch.randn(tokens, HEADS, HEAD_DIM, generator=g).to(device, dtype)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
    v = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
    scale = HEAD_DIM**-0.5
    sdpa, triton_backend = SdpaPagedAttention(), TritonPagedAttention()
    with torch.inference_mode():
        sdpa_meta = sdpa.build_metadata(seqs, BLOCK, device)
        meta = triton_backend.build_metadata(seqs, BLOCK, device)
        assert meta.seq_lens is not None and meta.query_starts is not None
        # Bound here: the assert's narrowing of meta's attributes does not reach step() below.
        seq_lens, query_starts = meta.seq_lens, meta.query_starts
        ref = sdpa.forward(q, k, v, k_cache, v_cache, sdpa_meta, scale).float()
        out: dict[str, Any] = {"shape": name, "tokens": tokens, "GFLOP": round(flops(shape) / 1e9, 2)}
        out["sdpa_ms"] = bench(lambda: sdpa.forward(q, k, v, k_cache, v_cache, sdpa_meta, scale), device, reps)
        out["metadata_host_ms"] = {
            "sdpa": host_ms(lambda: sdpa.build_metadata(seqs, BLOCK, device), device, reps),
            "triton": host_ms(lambda: triton_backend.build_metadata(seqs, BLOCK, device), device, reps),
        }
        runs: list[dict[str, Any]] = []
        for t in tilings:
            def step() -> torch.Tensor:
                gpu_kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
                return gpu_kernels.paged_prefill_attention(
                    q, k_cache, v_cache, meta.block_tables, seq_lens, query_starts, scale, **t
                )
            try:
                err = float((step().float() - ref).norm() / ref.norm())
                ms = bench(step, device, reps)
                runs.append({**t, "ms": round(ms, 4), "TFLOPs": round(flops(shape) / ms / 1e9, 1), "rel_err": err})
            except Exception as exc:  # a tiling that does not compile
                runs.append({**t, "error": repr(exc)[:120]})
        runs.sort(key=lambda r: r.get("ms", 1e9))
        out["triton"] = runs
        default = next(r for r in runs if r.get("rows") is None and "ms" in r)
        out["triton_default_ms"] = default["ms"]
        out["sdpa_over_triton_default"] = round(out["sdpa_ms"] / default["ms"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton's interpreter)")
    p.add_argument("--no-sweep", action="store_true", help="only the default tiling")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    tilings: list[Tiling] = [{}]  # the kernel's defaults
    if not (args.smoke or args.no_sweep):
        tilings += [
            {"rows": rows, "block_n": bn, "num_warps": w, "num_stages": st}
            for rows in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)
        ]
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "shapes": []}
    if device.type == "cuda":
        import triton

        res["triton"] = triton.__version__
    for name, shape in SMOKE_SHAPES if args.smoke else SHAPES:
        r = run_shape(name, shape, device, dtype, tilings, 3 if args.smoke else 20)
        res["shapes"].append(r)
        print(json.dumps({k: r[k] for k in ("shape", "sdpa_ms", "triton_default_ms", "sdpa_over_triton_default",
                                            "metadata_host_ms")}), r["triton"][:2], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
