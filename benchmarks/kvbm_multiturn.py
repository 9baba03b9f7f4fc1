"""Multi-turn conversations over the mocker engine whose total KV is several times the device
pool (G1): TTFT p50/p99 with KVBM's host (G2) and disk (G3) tiers against G1 only. Time is the
mocker's simulated H100 time (its engine clock, which advances by each step's modelled
duration, onboard copies included), so the figures do not depend on this machine's load. Usage:
python benchmarks/kvbm_multiturn.py [--conversations 16 --turns 8 --concurrency 4 ...]"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
from typing import Any

from dynamo.wire import PreprocessedRequest, SamplingOptions, StopConditions
from kvbm.config import KvbmConfig
from workers.mocker.args import MockerConfig
from workers.mocker.engine import MockerEngine


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace, kvbm: KvbmConfig) -> dict[str, Any]:
    config = MockerConfig(
        block_size_tokens=16, num_gpu_blocks=args.g1_blocks, max_model_len=32768,
        speedup_ratio=args.speedup, vocab_size=32000, kvbm=kvbm,
    )
    engine = MockerEngine(config)
    rng = random.Random(0)
    gate = asyncio.Semaphore(args.concurrency)
    ttfts: list[float] = []
    cached: list[int] = []

    async def conversation(cid: int) -> None:
        history: list[int] = []
        for turn in range(args.turns):
            history += [rng.randrange(1, 32000) for _ in range(args.user_tokens)]
            async with gate:
                req = PreprocessedRequest(f"c{cid}t{turn}", "m", list(history), sampling=SamplingOptions(seed=cid),
                                          stop=StopConditions(max_tokens=args.output_tokens))
                start = engine.engine_time_s
                first = True
                async for out in engine.generate(req):
                    if first:
                        # The engine is never idle while a request waits (all clients busy).
                        ttfts.append((engine.engine_time_s - start) * args.speedup)
                        if turn:
                            cached.append(out.cached_tokens or 0)
                        first = False
                    history += out.token_ids

    async with engine:
        await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
    stats = engine.kvbm.cache.stats if engine.kvbm is not None else None
    return {
        "ttft_p50_ms": 1e3 * percentile(ttfts, 0.5),
        "ttft_p99_ms": 1e3 * percentile(ttfts, 0.99),
        "ttft_mean_ms": 1e3 * statistics.fmean(ttfts),
        "later_turn_cached_tokens_mean": statistics.fmean(cached) if cached else 0.0,
        "onboard_host_blocks": float(stats.onboard_blocks["host"]) if stats else 0.0,
        "onboard_disk_blocks": float(stats.onboard_blocks["disk"]) if stats else 0.0,
        "onboard_time_s": engine.kvbm.onboard_time_s if engine.kvbm else 0.0,
        "offload_host_blocks": float(stats.offload_blocks["host"]) if stats else 0.0,
        "offload_disk_blocks": float(stats.offload_blocks["disk"]) if stats else 0.0,  # writes completed
        # Blocks not kept, by tier and reason (a tier's upkeep is skipped, never waited for).
        "skipped_blocks": {f"{t}/{r}": n for (t, r), n in sorted(stats.skipped_by.items())} if stats else {},
        "disk_write_time_s": engine.kvbm.writer.write_time_s if engine.kvbm and engine.kvbm.writer else 0.0,
        # Hits of admitted requests onboarded or recomputed (KVBM's onboard cost model).
        "onboard_decisions": {f"{t}_{d}": n for (t, d), n in sorted(stats.decisions.items())} if stats else {},
        "requests": float(len(ttfts)),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--user-tokens", type=int, default=448)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--g1-blocks", type=int, default=1024)
    p.add_argument("--host-blocks", type=int, default=4096)
    p.add_argument("--disk-blocks", type=int, default=8192)
    p.add_argument("--speedup", type=float, default=1e9)
    p.add_argument("--disk-gbps", type=float, default=KvbmConfig().disk_gbps, help="simulated disk read bandwidth")
    p.add_argument("--disk-write-gbps", type=float, default=None,
                   help="simulated disk write bandwidth (one block at a time, off the steps); default: writes take "
                        "no simulated time")
    p.add_argument("--onboard-cost", choices=("on", "off"), default="on",
                   help="off: onboard every hit (as before the cost model)")
    p.add_argument("--json")
    args = p.parse_args()
    total_kv_blocks = args.conversations * args.turns * (args.user_tokens + args.output_tokens) // 16
    print(f"total KV {total_kv_blocks} blocks = {total_kv_blocks / args.g1_blocks:.1f}x G1 ({args.g1_blocks} blocks)")
    results = {
        "g1_only": asyncio.run(run(args, KvbmConfig())),
        "g1_g2_g3": asyncio.run(run(args, KvbmConfig(host_blocks=args.host_blocks, disk_blocks=args.disk_blocks,
                                                     disk_gbps=args.disk_gbps, disk_write_gbps=args.disk_write_gbps,
                                                     onboard_cost=args.onboard_cost == "on"))),
    }
    results["p50_ratio"] = results["g1_g2_g3"]["ttft_p50_ms"] / results["g1_only"]["ttft_p50_ms"]
    results["p99_ratio"] = results["g1_g2_g3"]["ttft_p99_ms"] / results["g1_only"]["ttft_p99_ms"]
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
