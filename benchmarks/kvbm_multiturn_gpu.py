"""Multi-turn conversations over the built-in engine on a real GPU whose total KV is several
times the device pool (G1): TTFT p50/p99 with KVBM's host (G2) and disk (G3) tiers against G1
only. The workload is kvbm_multiturn.py's (conversations of turns behind a concurrency gate,
the whole history resent each turn); the engine is BuiltinEngine over a random-weight Llama
written to a temporary directory in Hugging Face layout (no download). TTFT is wall time from
submitting a turn to its first token, over the turns after each conversation's first.

Per config it reports TTFT p50/p99, blocks offloaded (host; disk = writes completed), blocks not
kept by tier and reason, disk hits onboarded or recomputed, and the model thread's time in KVBM
plans (KvBlockManager.execute: copy launches, disk writes queued) per engine step and at most.

GPU (~1.1B bf16 Llama, as builtin_gpu.py's):
    python benchmarks/kvbm_multiturn_gpu.py --json-out results.json
    python benchmarks/kvbm_multiturn_gpu.py --configs g1_only g1_g2small_g3 --rounds 3  # ratios per round
CPU (tiny model, for checking the script):
    python benchmarks/kvbm_multiturn_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamo.entry import freeze_startup_objects  # noqa: E402
from dynamo.wire import PreprocessedRequest, SamplingOptions, StopConditions  # noqa: E402
from kvbm.config import KvbmConfig  # noqa: E402
from workers.builtin.args import BuiltinConfig  # noqa: E402
from workers.builtin.engine import BuiltinEngine  # noqa: E402
from workers.builtin.testing_models import TinyModelSpec, build_random_model  # noqa: E402

BLOCK = 16
# builtin_gpu.py's shape (~1.1B parameters); HF's initializer range keeps bf16 activations tame.
MODEL_SIZES: dict[str, TinyModelSpec] = {
    "1b": TinyModelSpec(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_layers=16,
                        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                        initializer_range=0.02),
    "tiny": TinyModelSpec(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def build_model_dir(args: argparse.Namespace, out_dir: str, max_len: int) -> TinyModelSpec:
    spec = MODEL_SIZES[args.model_size]
    overrides = {k: getattr(args, k) for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                                "num_kv_heads", "head_dim", "vocab_size")
                 if getattr(args, k) is not None}
    spec = replace(spec, max_position_embeddings=max_len, dtype="bfloat16" if args.device == "cuda" else "float32",
                   **overrides)
    started = time.perf_counter()
    # Initialised on the target device (fast on a GPU), then written in HF layout.
    with torch.device(args.device):
        build_random_model(spec, out_dir)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    print(f"model written to {out_dir} in {time.perf_counter() - started:.1f}s", flush=True)
    return spec


def request(rid: str, tokens: list[int], max_tokens: int) -> PreprocessedRequest:
    return PreprocessedRequest(rid, "m", list(tokens), sampling=SamplingOptions(),
                               stop=StopConditions(max_tokens=max_tokens, ignore_eos=True))


async def warm_up(engine: BuiltinEngine, args: argparse.Namespace, vocab: int, max_prompt: int) -> None:
    """Prompts unrelated to the conversations, at several lengths and at once: Triton compiles
    its kernels and the allocator grows before anything is timed."""
    rng = random.Random(12345)
    lengths = sorted({min(n, max_prompt) for n in (17, args.user_tokens, 3 * args.user_tokens, max_prompt)})

    async def one(i: int, n: int) -> None:
        req = request(f"warm{i}", [rng.randrange(2, vocab) for _ in range(n)], 8)
        async for _ in engine.generate(req):
            pass

    for rnd in range(2):
        await asyncio.gather(*(one(10 * rnd + i, n) for i, n in enumerate(lengths)))


async def run_config(args: argparse.Namespace, name: str, model_dir: str, vocab: int, g1_blocks: int,
                     max_len: int, kvbm: KvbmConfig) -> dict[str, Any]:
    config = BuiltinConfig(
        model=model_dir, device=args.device, block_size_tokens=BLOCK, num_gpu_blocks=g1_blocks,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max_len, enforce_eager=args.enforce_eager, kvbm=kvbm,
    )
    engine = BuiltinEngine(config)
    rng = random.Random(0)  # the same conversations for every config
    gate = asyncio.Semaphore(args.concurrency)
    ttfts: list[float] = []  # later turns
    first_ttfts: list[float] = []
    first_queued: list[float] = []  # first turns' wait for admission
    # Later turns' TTFT split at admission: waiting (for the scheduler, blocks, disk reads)
    # and admission to first token (prefill steps, and the steps they share).
    queued: list[float] = []
    prefilled: list[float] = []
    admitted_at = record_admissions()
    cached: list[int] = []
    by_turn: dict[int, list[float]] = {}
    built = time.perf_counter()

    async def conversation(cid: int) -> None:
        history: list[int] = []
        for turn in range(args.turns):
            history += [rng.randrange(2, vocab) for _ in range(args.user_tokens)]
            async with gate:
                req = request(f"c{cid}t{turn}", history, args.output_tokens)
                start = time.perf_counter()
                first = True
                async for out in engine.generate(req):
                    if first:
                        now = time.perf_counter()
                        ttft = now - start
                        admitted = admitted_at.pop(req.request_id, now)
                        if turn:
                            ttfts.append(ttft)
                            queued.append(admitted - start)
                            prefilled.append(now - admitted)
                            cached.append(out.cached_tokens or 0)
                            by_turn.setdefault(turn, []).append(ttft)
                        else:
                            first_ttfts.append(ttft)
                            first_queued.append(admitted - start)
                        first = False
                    history += out.token_ids

    async with engine:
        started = time.perf_counter()
        startup_s = started - built
        # The cost model's estimates before anything ran: the disk's is the probe's (or the config's).
        estimates_at_start = engine.kvbm.cache.cost.snapshot() if engine.kvbm is not None else {}
        await warm_up(engine, args, vocab, args.turns * (args.user_tokens + args.output_tokens))
        warm_s = time.perf_counter() - started
        # As a serving process does once up (serve/cli.py): a full collection would otherwise
        # walk torch's and transformers' objects mid-run (the suspect of a 227 ms KVBM plan on an
        # H100). Unfrozen after the run, so that the next config's collections free this engine.
        freeze_startup_objects()
        stats = engine.kvbm.cache.stats if engine.kvbm is not None else None
        tallies = ("hits", "onboard_blocks", "offload_blocks", "skipped_by", "decisions")
        before = {k: dict(getattr(stats, k)) for k in tallies} if stats else {}
        plans_before = (stats.plan_seconds, stats.plans) if stats else (0.0, 0)
        if stats is not None:
            stats.plan_max_seconds = 0.0  # the warm-up's first plans pay one-off allocations
        steps_before = engine.num_steps
        if args.disk_write_delay_ms and engine.kvbm is not None and engine.kvbm.disk is not None:
            delay_s = args.disk_write_delay_ms / 1e3
            # A slower disk, emulated on the disk thread (DiskStore's before_write hook).
            engine.kvbm.disk.before_write = lambda _h: time.sleep(delay_s)
        profile = instrument(engine) if args.profile_kvbm else None
        timeline = gpu_timeline(engine) if args.profile_kvbm and args.device == "cuda" else None
        started = time.perf_counter()
        await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
        measured_s = time.perf_counter() - started
        gc.unfreeze()
        steps = engine.num_steps - steps_before
        gpu_steps = timeline() if timeline is not None else None

    def delta(field: str, tier: Any) -> float:
        if stats is None:
            return 0.0
        return float(getattr(stats, field)[tier] - before[field].get(tier, 0))

    plan_s = (stats.plan_seconds - plans_before[0]) if stats else 0.0
    plans = (stats.plans - plans_before[1]) if stats else 0

    ideal_cached = statistics.fmean(
        t * (args.user_tokens + args.output_tokens) // BLOCK * BLOCK
        for _ in range(args.conversations) for t in range(1, args.turns)
    )
    row = {
        "config": name,
        "g1_blocks": g1_blocks,
        "host_blocks": kvbm.host_blocks or 0,
        "disk_blocks": (kvbm.disk_blocks or 0) if kvbm.disk_dir else 0,
        "ttft_p50_ms": 1e3 * percentile(ttfts, 0.5),
        "ttft_p99_ms": 1e3 * percentile(ttfts, 0.99),
        "ttft_mean_ms": 1e3 * statistics.fmean(ttfts),
        "first_turn_ttft_p50_ms": 1e3 * percentile(first_ttfts, 0.5),
        "first_turn_queue_p50_ms": 1e3 * percentile(first_queued, 0.5),
        "queue_p50_ms": 1e3 * percentile(queued, 0.5),
        "queue_p99_ms": 1e3 * percentile(queued, 0.99),
        "admit_to_first_token_p50_ms": 1e3 * percentile(prefilled, 0.5),
        "admit_to_first_token_p99_ms": 1e3 * percentile(prefilled, 0.99),
        "ttft_p50_ms_by_turn": {str(t): 1e3 * percentile(v, 0.5) for t, v in sorted(by_turn.items())},
        "later_turn_cached_tokens_mean": statistics.fmean(cached) if cached else 0.0,
        "later_turn_cached_tokens_ideal": ideal_cached,  # every earlier full block reused
        "onboard_host_blocks": delta("onboard_blocks", "host"),
        "onboard_disk_blocks": delta("onboard_blocks", "disk"),
        "offload_host_blocks": delta("offload_blocks", "host"),
        # Disk: writes completed (to host-tier slots written ahead, or straight from the device).
        "offload_disk_blocks": delta("offload_blocks", "disk"),
        # Blocks not kept, by tier and reason (policy, slots_busy, queue_full, write_failed).
        "skipped_blocks": {f"{t}/{r}": delta("skipped_by", (t, r)) for t, r in sorted(stats.skipped_by)} if stats else {},
        "skipped_offloads": float(sum(delta("skipped_by", key) for key in stats.skipped_by)) if stats else 0.0,
        "onboard_cost_model": kvbm.onboard_cost,
        # Hits of admitted requests onboarded or left to recompute (cost model), measured turns.
        "onboard_decisions": {f"{t}_{d}": delta("decisions", (t, d)) for t, d in sorted(stats.decisions)} if stats else {},
        "disk_hits_onboarded": delta("decisions", ("disk", "onboard")),
        "disk_hits_recomputed": delta("decisions", ("disk", "recompute")),
        # The model thread's time in KVBM plans over the measured turns: per engine step (every
        # step, with a plan or not), per plan, and the longest plan.
        "kvbm_plan_ms_per_step": 1e3 * plan_s / max(1, steps),
        "kvbm_plan_ms_mean": 1e3 * plan_s / max(1, plans),
        "kvbm_plan_ms_max": 1e3 * stats.plan_max_seconds if stats else 0.0,
        "kvbm_plans": plans,
        "kvbm_plan_s_total": plan_s,
        "disk_writes_in_flight_at_end": len(engine.kvbm.cache.writing) if engine.kvbm is not None else 0,
        "disk_write_delay_ms": args.disk_write_delay_ms if kvbm.disk_dir else 0.0,
        "disk_probe": kvbm.disk_probe if kvbm.disk_dir else None,
        "cost_estimates_at_start": estimates_at_start,
        "cost_estimates": engine.kvbm.cache.cost.snapshot() if engine.kvbm is not None else {},
        # Offload or not (kvbm/offload_value.py): hits per offloaded block, an offload's cost.
        "offload_value": engine.kvbm.cache.offload_value.snapshot() if engine.kvbm is not None else {},
        "disk_dropped_writes": float(engine.kvbm.disk.dropped_writes) if engine.kvbm and engine.kvbm.disk else 0.0,
        "disk_staging_pool": ({"rows": pool.rows, "takes": pool.takes, "misses": pool.misses}
                              if (pool := getattr(getattr(engine.kvbm, "reader", None), "pool", None)) else None),
        "requests_timed": len(ttfts),
        "engine_steps": steps,
        "measured_s": measured_s,
        "warmup_s": warm_s,
        "engine_start_s": startup_s,
    }
    if profile is not None:
        row["model_thread_profile"] = {k: {"s": v[0], "calls": int(v[1])} for k, v in profile.items()}
    if gpu_steps is not None:
        row["gpu_steps"] = gpu_steps
    return row


def record_admissions() -> dict[str, float]:
    """request id -> perf_counter() at its first admission (Sequence.admit, patched once per
    process; the dict is the latest config's)."""
    from workers.paged.sequence import Sequence

    admitted: dict[str, float] = {}
    admit = getattr(Sequence.admit, "_plain", Sequence.admit)

    def timed_admit(self: Any, *a: Any, **k: Any) -> None:
        if self.cached_tokens is None:
            admitted[self.request_id] = time.perf_counter()
        admit(self, *a, **k)

    timed_admit._plain = admit  # type: ignore[attr-defined]
    Sequence.admit = timed_admit  # type: ignore[method-assign]
    return admitted


def gpu_timeline(engine: BuiltinEngine) -> Callable[[], dict[str, Any]]:
    """CUDA events on the compute stream around each step's launch and each KVBM plan:
    returns a function that, after the run, sums the steps' GPU spans (first to last kernel
    of a launch, gaps where the host fell behind included), the gaps between steps (the GPU
    idle or waiting) and the plans' spans (their launches, and the forward pass's wait for
    the side stream's gathers and onboards)."""
    assert engine.runner is not None
    marks: list[tuple[str, torch.cuda.Event]] = []

    def mark(kind: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((kind, event))

    def around(obj: Any, method: str, kind: str) -> None:
        fn = getattr(obj, method)

        def timed(*a: Any, **k: Any) -> Any:
            mark(kind + "_start")
            try:
                return fn(*a, **k)
            finally:
                mark(kind + "_end")

        setattr(obj, method, timed)

    around(engine.runner, "launch", "step")
    if engine.kvbm is not None:
        around(engine.kvbm, "execute", "plan")

    def summarize() -> dict[str, Any]:
        torch.cuda.synchronize()
        spans: dict[str, list[float]] = {"step": [], "plan": [], "gap_before_step": [], "gap_before_plan": []}
        opened: dict[str, torch.cuda.Event] = {}
        last_end: torch.cuda.Event | None = None
        for kind, event in marks:
            what, edge = kind.rsplit("_", 1)
            if edge == "start":
                if last_end is not None:
                    spans[f"gap_before_{what}"].append(last_end.elapsed_time(event))
                opened[what] = event
            else:
                spans[what].append(opened.pop(what).elapsed_time(event))
                last_end = event
        return {name: {"n": len(v), "total_ms": sum(v), "p50_ms": percentile(v, 0.5) if v else 0.0,
                       "p99_ms": percentile(v, 0.99) if v else 0.0} for name, v in spans.items()}

    return summarize


def instrument(engine: BuiltinEngine) -> dict[str, list[float]]:
    """Wall time and calls of the model thread's work (forward passes, KVBM plan execution and
    its parts), by wrapping the instances' methods: [seconds, calls] per name. CUDA copies that
    do not block count only their launch."""
    tally: dict[str, list[float]] = {}

    def wrap(obj: Any, method: str, key: str) -> None:
        fn = getattr(obj, method)
        tally[key] = [0.0, 0.0]

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                tally[key][0] += time.perf_counter() - t
                tally[key][1] += 1

        setattr(obj, method, timed)

    assert engine.runner is not None
    for method in ("launch", "collect"):  # the overlap loop's halves of a step
        wrap(engine.runner, method, f"runner_{method}")
    kvbm = engine.kvbm
    if kvbm is not None:
        wrap(kvbm, "execute", "kvbm_execute")
        for method in ("onboard_many", "onboard_from_host", "onboard_from_cpu", "gather_for_host", "land_in_host",
                       "gather", "download", "begin", "end"):
            wrap(kvbm.copier, method, f"copier_{method}")
        if kvbm.disk is not None:
            # Reads run on the DiskReader's threads (off the model thread) unless an onboard
            # was not read beforehand; their time here is summed over those threads.
            wrap(kvbm.disk, "read", "disk_read_reader_threads")
            wrap(kvbm.disk, "write_batch", "disk_write_enqueue")
        if kvbm.reader is not None:
            # On reader threads: the request's staging buffer (pinned on CUDA) and queueing its reads.
            wrap(kvbm.reader, "_begin", "reader_alloc_staging_reader_threads")
            instrument_held(kvbm, tally)
    if engine.scheduler is not None:
        wrap(engine.scheduler, "schedule", "schedule_event_loop")
    return tally


def instrument_held(kvbm: Any, tally: dict[str, list[float]]) -> None:
    """Held-back requests: seconds from the start of their reads to the last read done
    (`held_reading`), and from then to their admission (`held_done_to_admit`, the step
    boundary they wait for)."""
    from kvbm import disk_tier

    for key in ("held_reading", "held_done_to_admit", "held_blocks"):
        tally[key] = [0.0, 0.0]
    tally["held_reading_max"] = [0.0, 0.0]
    tally["held_done_to_admit_max"] = [0.0, 0.0]
    # Any, as wrap()'s obj: its methods are replaced and a marker attribute added at run time.
    cls: Any = disk_tier.BlockReads
    if not getattr(cls, "_profiled", False):
        init, finish = cls.__init__, cls._finish

        def __init__(self: Any, *a: Any, **k: Any) -> None:
            self._t_start = time.perf_counter()
            self._t_done = None
            init(self, *a, **k)

        def _finish(self: Any) -> None:
            self._t_done = time.perf_counter()
            finish(self)

        cls.__init__, cls._finish, cls._profiled = __init__, _finish, True
    start = kvbm.reader.start

    def timed_start(hashes: Any) -> Any:
        tally["held_blocks"][0] += len(hashes)
        tally["held_blocks"][1] += 1
        return start(hashes)

    kvbm.reader.start = timed_start
    lookup_staged = kvbm.cache.lookup_staged

    def timed_lookup_staged(block_hashes: Any, device_blocks: int, reads: Any) -> Any:
        now = time.perf_counter()
        if getattr(reads, "_t_done", None) is not None and not getattr(reads, "_t_counted", False):
            reads._t_counted = True
            for key, v in (("held_reading", reads._t_done - reads._t_start), ("held_done_to_admit", now - reads._t_done)):
                tally[key][0] += v
                tally[key][1] += 1
                tally[key + "_max"][0] = max(tally[key + "_max"][0], v)
                tally[key + "_max"][1] += 1
        return lookup_staged(block_hashes, device_blocks, reads)

    kvbm.cache.lookup_staged = timed_lookup_staged


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cpus": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    import transformers

    info["transformers"] = transformers.__version__
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model-size", default=None, choices=sorted(MODEL_SIZES),
                   help="1b on cuda, tiny on cpu by default; the flags below override its fields")
    for name in ("hidden-size", "intermediate-size", "num-layers", "num-heads", "num-kv-heads", "head-dim", "vocab-size"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--user-tokens", type=int, default=448)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--kv-ratio", type=float, default=4.0, help="total KV of all conversations over G1")
    p.add_argument("--g1-blocks", type=int, default=None, help="default: total KV blocks / --kv-ratio")
    p.add_argument("--host-blocks", type=int, default=None, help="config (b) G2: default 1.25x total KV")
    p.add_argument("--small-host-blocks", type=int, default=None, help="config (c) G2: default G1 / 4")
    p.add_argument("--disk-blocks", type=int, default=None, help="config (c) G3: default 1.25x total KV")
    p.add_argument("--disk-root", default="/tmp")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--configs", nargs="+", default=["g1_only", "g1_g2", "g1_g2small_g3"],
                   choices=["g1_only", "g1_g2", "g1_g2small", "g1_g2small_g3", "g1_g2small_g3_nocost", "g1_g2_nocost",
                            "g1_g2small_g3_always", "g1_g2small_always"],
                   help="_nocost: the onboard cost model off (every hit onboarded, as before it); _always: "
                        "every evicted block offloaded (--kvbm-offload-cost off)")
    p.add_argument("--profile-kvbm", action="store_true",
                   help="time the model thread's forward passes and KVBM copies (method wrappers)")
    p.add_argument("--disk-write-delay-ms", type=float, default=0.0,
                   help="G3 configs: sleep this long on the disk thread before each block's write (a slower disk)")
    p.add_argument("--disk-probe", default="on", choices=("on", "off"),
                   help="G3 configs: measure disk reads when the tier opens (KvbmConfig.disk_probe, "
                        "--kvbm-disk-probe), or start from the configured bandwidth")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the configs this many times, in turn (g1_only, G3, g1_only, G3, ...), and report "
                        "each round's ratios to its own g1_only run and their medians: one machine's run-to-run "
                        "drift (G1 only alone moved 20-39 ms p50 between runs on one H100) then falls on both sides")
    p.add_argument("--smoke", action="store_true",
                   help="check the script on CPU: tiny model, 4 conversations x 3 turns of 48 + 8 tokens")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    if args.smoke:
        args.device, args.model_size = "cpu", "tiny"
        args.conversations, args.turns, args.user_tokens, args.output_tokens = 4, 3, 48, 8
    if args.model_size is None:
        args.model_size = "1b" if args.device == "cuda" else "tiny"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu)")

    per_turn = args.user_tokens + args.output_tokens
    final_tokens = args.turns * per_turn
    final_blocks = -(-final_tokens // BLOCK)
    total_blocks = args.conversations * final_blocks
    g1 = args.g1_blocks or int(total_blocks / args.kv_ratio)
    in_flight = args.concurrency * final_blocks
    host = args.host_blocks if args.host_blocks is not None else int(1.25 * total_blocks)
    small_host = args.small_host_blocks if args.small_host_blocks is not None else max(1, g1 // 4)
    disk = args.disk_blocks if args.disk_blocks is not None else int(1.25 * total_blocks)
    max_len = max(512, -(-(final_tokens + 2 * BLOCK) // 256) * 256)
    workload = {
        "conversations": args.conversations, "turns": args.turns, "user_tokens": args.user_tokens,
        "output_tokens": args.output_tokens, "concurrency": args.concurrency,
        "final_history_tokens": final_tokens, "total_kv_blocks": total_blocks, "g1_blocks": g1,
        "total_kv_over_g1": total_blocks / g1, "in_flight_blocks_at_last_turn": in_flight,
        "block_size_tokens": BLOCK, "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs, "model_size": args.model_size, "device": args.device,
    }
    print("machine", json.dumps(machine()), flush=True)
    print("workload", json.dumps(workload), flush=True)
    if in_flight > g1:
        print(f"warning: {args.concurrency} last-turn histories ({in_flight} blocks) exceed G1 ({g1}); "
              "expect preemption", flush=True)

    model_dir = tempfile.mkdtemp(prefix="kvbm_mt_model_")
    results: dict[str, Any] = {"benchmark": "kvbm_multiturn_gpu", "machine": machine(), "workload": workload,
                               "configs": {}}
    try:
        spec = build_model_dir(args, model_dir, max_len)
        results["model"] = {k: getattr(spec, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                          "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                                          "dtype")}
        layers, kv_heads, head_dim = spec.num_layers, spec.num_kv_heads, spec.head_dim
        elem = 2 if args.device == "cuda" else 4
        results["model"]["kv_block_bytes"] = 2 * layers * BLOCK * kv_heads * head_dim * elem
        for round_no, name in ((r, n) for r in range(max(1, args.rounds)) for n in args.configs):
            disk_dir = None
            if name == "g1_only":
                kvbm = KvbmConfig()
            elif name in ("g1_g2", "g1_g2_nocost"):
                kvbm = KvbmConfig(host_blocks=host)
            elif name.startswith("g1_g2small") and "g3" not in name:  # G3's host tier alone
                kvbm = KvbmConfig(host_blocks=small_host)
            else:
                disk_dir = tempfile.mkdtemp(prefix="kvbm_mt_disk_", dir=args.disk_root)
                kvbm = KvbmConfig(host_blocks=small_host, disk_dir=disk_dir, disk_blocks=disk)
            if name.endswith("_nocost"):
                kvbm = replace(kvbm, onboard_cost=False)
            if name.endswith("_always"):
                kvbm = replace(kvbm, offload_cost=False)
            kvbm = replace(kvbm, disk_probe=args.disk_probe == "on")
            try:
                row = asyncio.run(run_config(args, name, model_dir, spec.vocab_size, g1, max_len, kvbm))
            except Exception:  # keep the other configs' figures; the traceback is the finding
                results.setdefault("errors", {})[f"{name}#{round_no}"] = traceback.format_exc()
                print(f"config {name} (round {round_no}) failed:\n{traceback.format_exc()}", flush=True)
                continue
            finally:
                if disk_dir is not None:
                    shutil.rmtree(disk_dir, ignore_errors=True)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            results["configs"].setdefault(name, row)  # the first round's, as with one round
            while len(results.setdefault("rounds", [])) <= round_no:
                results["rounds"].append({})
            results["rounds"][round_no][name] = row
            print(json.dumps(row), flush=True)
            write(args.json_out, results)  # partial results survive a timeout
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    base = results["configs"].get("g1_only")
    if base:
        results["ratios_vs_g1_only"] = ratios(results["configs"])
        results["goal"] = "TTFT p50 with KVBM tiers <= 0.5x G1 only"
        print("ratios", json.dumps(results["ratios_vs_g1_only"]), flush=True)
    if len(results.get("rounds", [])) > 1:
        by_round = [ratios(r) for r in results["rounds"]]
        results["ratios_by_round"] = by_round
        names = sorted({name for r in by_round for name in r})
        results["ratio_medians"] = {
            name: {key: statistics.median(r[name][key] for r in by_round if name in r) for key in ("ttft_p50", "ttft_p99")}
            for name in names
        }
        print("ratios by round", json.dumps(by_round), "medians", json.dumps(results["ratio_medians"]), flush=True)
    write(args.json_out, results)
    summary(results)


def ratios(configs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each config's TTFT p50 and p99 over g1_only's of the same round (none without it)."""
    base = configs.get("g1_only")
    if not base:
        return {}
    return {name: {"ttft_p50": row["ttft_p50_ms"] / base["ttft_p50_ms"], "ttft_p99": row["ttft_p99_ms"] / base["ttft_p99_ms"]}
            for name, row in configs.items() if name != "g1_only"}


def summary(results: dict[str, Any]) -> None:
    """One line per config: what the GPU run is read for."""
    print(f"{'config':<24} {'p50 ms':>8} {'p99 ms':>8} {'off host':>8} {'off disk':>8} {'skipped':>8} "
          f"{'disk on/re':>11} {'kvbm ms/step':>12} {'plan max ms':>11}", flush=True)
    for name, row in results["configs"].items():
        disk = f"{row['disk_hits_onboarded']:.0f}/{row['disk_hits_recomputed']:.0f}"
        print(f"{name:<24} {row['ttft_p50_ms']:>8.1f} {row['ttft_p99_ms']:>8.1f} {row['offload_host_blocks']:>8.0f} "
              f"{row['offload_disk_blocks']:>8.0f} {row['skipped_offloads']:>8.0f} {disk:>11} "
              f"{row['kvbm_plan_ms_per_step']:>12.3f} {row['kvbm_plan_ms_max']:>11.2f}", flush=True)
        if row["skipped_blocks"]:
            print(f"{'':<24} skipped: {json.dumps(row['skipped_blocks'])}", flush=True)


def write(path: str | None, results: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
