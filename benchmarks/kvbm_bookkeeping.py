"""What KVBM's bookkeeping costs the event loop, per call, with Prometheus metrics bound as a
worker binds them: `finish` of an empty plan (after every step), `lookup` + `onboard` +
`finish` of a later turn's host hits, and `evicted` + `finish` of an eviction batch into a full
host tier. No engine, no copies: TieredCache alone, min of --rounds timing loops.

    python benchmarks/kvbm_bookkeeping.py [--blocks 28] [--rounds 5]

Run from another tree's root with that tree first on PYTHONPATH to compare trees."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from kvbm.block_pool import EvictedBlock
from kvbm.config import KvbmConfig
from kvbm.metrics import KvbmMetrics
from kvbm.tiered import TieredCache

BLOCK_BYTES = 512 << 10  # a 1.1B Llama's 16-token block, bf16


def cache(host_blocks: int, disk_blocks: int = 0, offload_cost: bool = True) -> TieredCache:
    c = TieredCache(KvbmConfig(host_blocks=host_blocks, disk_blocks=disk_blocks, offload_cost=offload_cost),
                    BLOCK_BYTES, lambda event: None, block_size_tokens=16)
    c.bind_metrics(KvbmMetrics(CollectorRegistry(), "m"))
    return c


def timed_us(body: Callable[[], None], calls: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            body()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=28, help="blocks of a prompt's hits and of an eviction batch")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    n = args.blocks
    out: dict[str, float] = {}

    idle = cache(host_blocks=64, disk_blocks=256)
    idle.cost.observe_step(1024, 0.01)
    for blocks in (1, 4, 2):
        idle.observe_read("host", blocks * BLOCK_BYTES, blocks * 1e-4)
        idle.observe_read("disk", blocks * BLOCK_BYTES, blocks * 1e-3)
    out["finish_empty_plan_us"] = timed_us(lambda: idle.finish(idle.take_plan()), 10 * args.calls, args.rounds)

    hits = cache(host_blocks=2 * n, offload_cost=False)
    hits.evicted([EvictedBlock(100 + h, h, h - 1 if h else None) for h in range(n)])
    hits.finish(hits.take_plan())
    prompt = list(range(n))

    def later_turn() -> None:
        found = hits.lookup(prompt, 0)
        hits.onboard(prompt, 0, found, list(range(len(found))))
        hits.finish(hits.take_plan())

    out[f"lookup_onboard_finish_{n}_host_hits_us"] = timed_us(later_turn, args.calls, args.rounds)

    full = cache(host_blocks=192, offload_cost=False)
    counter = [0]

    def eviction_batch() -> None:
        first = counter[0]
        counter[0] += n
        full.evicted([EvictedBlock(i, first + i, first + i - 1 if i else None) for i in range(n)])
        full.finish(full.take_plan())

    for _ in range(200 // n + 1):  # fill the host tier first
        eviction_batch()
    out[f"evicted_finish_{n}_blocks_full_host_us"] = timed_us(eviction_batch, args.calls, args.rounds)
    print(json.dumps({k: round(v, 1) for k, v in out.items()}))


if __name__ == "__main__":
    main()
