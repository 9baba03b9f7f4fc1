"""How much of an eager prefill step is the host's: per shape, the wall time of one step, the
time the host takes to launch it (the forward pass's ~80 Triton and ~65 cuBLAS launches, its
metadata, the sampling), and the GPU's time to reach the end of the launches (CUDA events). When
the launch time nears the GPU time, a slower or busier host makes prefill host-bound.
Optionally a cProfile of the launches. The built-in engine's 1.1B Llama shape with random bf16
weights (benchmarks/builtin_gpu.py builds it).

    python3 benchmarks/prefill_host_gpu.py [--shapes 4x512 16x512] [--profile] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.builtin.attention import SeqSlice  # noqa: E402
from workers.builtin.kv_cache import KVCache  # noqa: E402
from workers.builtin.runner import ModelRunner, StepInput  # noqa: E402


def _builtin_gpu() -> Any:
    spec = importlib.util.spec_from_file_location("builtin_gpu", ROOT / "benchmarks" / "builtin_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_input(bg: Any, num_seqs: int, length: int, vocab: int) -> StepInput:
    seqs = bg.Sequences(num_seqs, length, length + 1, vocab)
    ids = [t for j in range(num_seqs) for t in seqs.tokens[j]]
    positions = [p for _ in range(num_seqs) for p in range(length)]
    slices = [SeqSlice(0, length, seqs.tables[j]) for j in range(num_seqs)]
    ends = [(j + 1) * length - 1 for j in range(num_seqs)]
    return StepInput(ids, positions, slices, ends, [bg.GREEDY] * num_seqs)


def time_steps(runner: ModelRunner, step: StepInput, reps: int = 12, warm: int = 2) -> dict[str, float]:
    rows = []
    for rep in range(reps):
        torch.cuda.synchronize()
        start, launched_at = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        launched = runner.launch(step)
        t1 = time.perf_counter()
        launched_at.record()
        runner.collect(launched)
        t2 = time.perf_counter()
        if rep >= warm:
            rows.append({"wall_ms": 1e3 * (t2 - t0), "launch_ms": 1e3 * (t1 - t0),
                         "gpu_to_last_launch_ms": start.elapsed_time(launched_at)})
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["launch_over_gpu"] = out["launch_ms"] / out["gpu_to_last_launch_ms"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["4x512", "16x512"], help="SEQSxTOKENS")
    p.add_argument("--profile", action="store_true", help="also cProfile 20 launches of the first shape")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    bg = _builtin_gpu()
    device = torch.device("cuda")
    hf, mc = bg.random_llama(device)
    model = bg.ours_from_hf(hf, mc, device)
    del hf
    kv = KVCache.allocate(mc, 4096, bg.BLOCK, torch.bfloat16, device)
    runner = ModelRunner(model, kv, device, enforce_eager=True)
    res: dict[str, object] = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    for shape in args.shapes:
        n, length = (int(x) for x in shape.split("x"))
        res[shape] = time_steps(runner, step_input(bg, n, length, mc.vocab_size))
        print(shape, res[shape], flush=True)
    if args.profile:
        n, length = (int(x) for x in args.shapes[0].split("x"))
        step = step_input(bg, n, length, mc.vocab_size)
        runner.collect(runner.launch(step))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            runner.collect(runner.launch(step))
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        res["profile_tottime"] = text.getvalue()
        print(text.getvalue())
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
