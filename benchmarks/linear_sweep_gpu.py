"""The decode step's projections on a GPU: cuBLAS (F.linear) against gpu_kernels.linear's
tilings, for the built-in 1.1B shape at decode batch sizes.

Each figure is one op over 16 distinct weight copies (a model's 16 layers, so the weights come
from HBM, not L2) captured in one CUDA graph, replayed; microseconds per op and the weight
stream's GB/s. Issue 21 item 1: at batch 128 cuBLAS picks tiles that leave SMs idle (gate_up:
88 CTAs of 128 x 128 on 132 SMs, 1.7 TB/s in the profile).

    python benchmarks/linear_sweep_gpu.py --out sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from workers.builtin import gpu_kernels

# (name, out features N, in features K) of builtin_gpu.py's 1.1B Llama shape.
SHAPES = [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 11264, 2048), ("down", 2048, 5632),
          ("lm_head", 32000, 2048), ("gate_up+silu", 11264, 2048)]
LAYERS = 16


def graph_us(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
             weights: list[torch.Tensor], reps: int) -> float:
    for w in weights[:2]:
        fn(x, w)  # compile / pick the algorithm outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights:
            fn(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * len(weights))


def tiled(cfg: dict[str, int], gated: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return gpu_kernels.linear(x, w, gated, **cfg)
    return fn


def configs(m: int) -> list[dict[str, int]]:
    block_ms = sorted({min(128, max(16, 1 << (m - 1).bit_length())), *([64] if m > 64 else [])})
    out = []
    for bm, bn, bk, warps, stages in itertools.product(block_ms, (32, 64, 128), (64, 128, 256), (4, 8), (3, 4)):
        smem = stages * (bm + bn) * bk * 2
        if smem > 200 * 1024:
            continue
        out.append({"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": warps, "num_stages": stages})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--shapes", nargs="+", default=[name for name, _, _ in SHAPES])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "layers": LAYERS, "rows": [],
    }
    import triton
    result["triton"] = triton.__version__
    for name, n, k in SHAPES:
        if name not in args.shapes:
            continue
        weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5 for _ in range(LAYERS)]
        for m in args.batches:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            gated = name.endswith("+silu")  # cuBLAS + silu_mul against the gated kernel
            def plain(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return gpu_kernels.silu_mul(F.linear(a, w)) if gated else F.linear(a, w)
            cublas = graph_us(plain, x, weights, args.reps)
            ref = plain(x, weights[0]).float()
            best: tuple[float, dict[str, int]] | None = None
            tried = failed = 0
            for cfg in configs(m):
                try:
                    got = tiled(cfg, gated)(x, weights[0]).float()
                    if not torch.allclose(got, ref, atol=3e-2, rtol=3e-2):
                        raise AssertionError(f"wrong result: max diff {(got - ref).abs().max().item()}")
                    us = graph_us(tiled(cfg, gated), x, weights, args.reps)
                except Exception as exc:  # noqa: BLE001 - a tiling out of shared memory or registers
                    failed += 1
                    if failed <= 2:
                        print(f"  {name} m={m} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                tried += 1
                if best is None or us < best[0]:
                    best = (us, cfg)
            gbs = n * k * 2 / 1e3
            row = {"shape": name, "n": n, "k": k, "m": m, "cublas_us": round(cublas, 2),
                   "cublas_GBs": round(gbs / cublas, 1), "configs_tried": tried, "configs_failed": failed}
            if best is not None:
                row.update(triton_us=round(best[0], 2), triton_GBs=round(gbs / best[0], 1), triton_config=best[1],
                           cublas_over_triton=round(cublas / best[0], 3))
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        del weights
        torch.cuda.empty_cache()
    for m in args.batches:
        rows = [r for r in result["rows"] if r["m"] == m and "triton_us" in r and r["shape"] != "gate_up"]
        c, t = sum(r["cublas_us"] for r in rows), sum(min(r["cublas_us"], r["triton_us"]) for r in rows)
        print(f"m={m}: the projections (gate_up with its SiLU), one layer and the head: cuBLAS {c:.1f} us, best of both {t:.1f} us", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
