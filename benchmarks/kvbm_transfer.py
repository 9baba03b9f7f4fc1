"""KVBM offload/onboard throughput on a GPU: 2 MiB blocks (and other sizes) moved between a
layer-split paged KV cache and pinned host slots by kvbm.copy_engine.BlockCopier, against the
pinned-host copy ceiling measured in the same run. Imports only torch (and kvbm's torch-only
modules). Each case runs both ways: "before" is the per-layer path (2 x layers index kernels
per batch, every batch's device-to-host copy queued at once), "after" the fused path (one
gather or scatter launch over every layer, through device staging). The "steps" rows offload a
few blocks per step, as an engine does, with device-to-host copies coalesced until
`flush_blocks` wait or the next step (after) or queued per step (before).
Usage: python benchmarks/kvbm_transfer.py [--json out.json]"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvbm.copy_engine import BlockCopier  # noqa: E402

MiB = 1 << 20


def timed(fn: Callable[[], object], repeat: int = 5) -> float:
    """Best wall time of `fn` over `repeat` runs, synchronised."""
    best = float("inf")
    fn()
    torch.cuda.synchronize()
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def ceiling(nbytes: int) -> tuple[float, float]:
    """Plain pinned<->device copies of one contiguous buffer: (h2d, d2h) GB/s."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d = timed(lambda: dev.copy_(host, non_blocking=True))
    d2h = timed(lambda: host.copy_(dev, non_blocking=True))
    return nbytes / h2d / 1e9, nbytes / d2h / 1e9


def measure(block_mib: float, num_layers: int, batch_blocks: int, pool_blocks: int, fused: bool = False,
            steps: int = 1, flush_blocks: int = 1) -> dict[str, Any]:
    # bf16, 8 KV heads x 128 dims: tokens per block chosen to make the block `block_mib`.
    heads, dim = 8, 128
    tokens = max(1, int(block_mib * MiB) // (2 * num_layers * heads * dim * 2))
    shape = (pool_blocks, tokens, heads, dim)
    k = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(num_layers)]
    v = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(num_layers)]
    elements = tokens * heads * dim
    total = batch_blocks * steps
    host = torch.empty((total, 2 * num_layers, elements), dtype=torch.bfloat16, pin_memory=True)
    copier = BlockCopier(k, v, host, flush_blocks=flush_blocks, fused=fused)
    block_bytes = 2 * num_layers * elements * 2
    ids = list(range(1, 2 * total, 2))[:total]  # scattered device blocks
    slots = list(range(total))
    dest = list(range(2 * total, 3 * total))

    def offload() -> None:
        for step in range(steps):  # the blocks one step evicts, then the next step's
            part = slice(step * batch_blocks, (step + 1) * batch_blocks)
            copier.begin()
            copier.offload_to_host(ids[part], slots[part])
            copier.end()
        copier.drain()

    def onboard() -> None:
        copier.begin()
        copier.onboard_from_host(slots, dest)
        copier.end()

    t_off = timed(offload)
    t_on = timed(onboard)
    torch.cuda.synchronize()
    ok = all(torch.equal(k[layer][dest[i]], k[layer][ids[i]]) and torch.equal(v[layer][dest[i]], v[layer][ids[i]])
             for i in range(total) for layer in range(num_layers))
    nbytes = total * block_bytes
    return {"block_mib": block_bytes / MiB, "layers": num_layers, "batch_blocks": batch_blocks, "steps": steps,
            "path": "fused" if copier.fused else "per-layer", "flush_blocks": flush_blocks,
            "offload_gbps": nbytes / t_off / 1e9, "onboard_gbps": nbytes / t_on / 1e9, "correct": float(ok)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    h2d, d2h = ceiling(512 * MiB)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton_version}: "
          f"pinned ceiling h2d {h2d:.1f} GB/s, d2h {d2h:.1f} GB/s")
    rows = []
    cases = [(2, 32, 16, 1, 1), (2, 32, 64, 1, 1), (2, 32, 256, 1, 1), (0.5, 32, 16, 1, 1), (0.5, 32, 256, 1, 1),
             (8, 32, 64, 1, 1), (2, 1, 256, 1, 1),
             # An engine's evictions: 2 blocks a step over 64 steps; 8 a step over 16.
             (2, 32, 2, 64, 16), (2, 32, 8, 16, 16)]
    for block_mib, layers, batch, steps, flush in cases:
        for fused in (False, True):
            row = measure(block_mib, layers, batch, pool_blocks=3 * batch * steps + 1, fused=fused, steps=steps,
                          flush_blocks=flush if fused else 1)
            row["offload_pct_of_d2h"] = 100 * row["offload_gbps"] / d2h
            row["onboard_pct_of_h2d"] = 100 * row["onboard_gbps"] / h2d
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'block':>6} {'batch':>5} {'steps':>5} {'path':>9} {'offload GB/s (%)':>18} {'onboard GB/s (%)':>18} ok")
    for r in rows:
        print(f"{r['block_mib']:6.2f} {r['batch_blocks']:5d} {r['steps']:5d} {r['path']:>9} "
              f"{r['offload_gbps']:7.1f} ({r['offload_pct_of_d2h']:4.0f}%)   {r['onboard_gbps']:7.1f} "
              f"({r['onboard_pct_of_h2d']:4.0f}%)   {int(r['correct'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "triton": triton_version, "h2d_gbps": h2d, "d2h_gbps": d2h,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
