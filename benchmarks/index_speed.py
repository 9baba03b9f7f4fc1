"""KV index speed, side by side: our KvIndex (router/indexer.py) against NVIDIA Dynamo's Rust
RadixTree through its Python binding (ai-dynamo-runtime, `dynamo._core.RadixTree`).

One workload, generated from a seed identically in each side's process: W workers storing
chained blocks in events of 64 blocks until the index holds N (worker, block) entries, with
shared prefixes across workers (P system prompts of S blocks, then unique tails); then churn
(the newest 64 blocks of a sequence removed, 64 new ones stored); then prefix matches of
128-block requests that follow a stored sequence for a random depth and then diverge.

Timed regions (time.perf_counter_ns), the same for both sides as far as their APIs allow:
- apply: from the event's wire bytes to the index updated. Ours: msgspec-decode the msgpack
  `KvCacheEvent` the workers publish + `KvIndex.apply_event`. Dynamo: `RadixTree.apply_event
  (worker, json_bytes)`, which parses the JSON `KvCacheEvent` its workers publish. Encoding
  the events is outside.
- match: one call from the request's block hashes to a per-worker score dict. Ours:
  `KvIndex.find_matches(chained_hashes)`. Dynamo: `RadixTree.find_matches(local_hashes)
  .scores`. Computing the hashes from tokens is outside (both do it before matching).

    python benchmarks/index_speed.py --json-out benchmarks/results/index_speed.json

Each side runs in its own subprocess (ours in this venv, Dynamo's in --dynamo-python), the
sides alternating for --rounds rounds. A side whose interpreter is missing is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
MASK = (1 << 63) - 1
EVENT_BLOCKS = 64


def chain(parent: int, local: int) -> int:
    # Deterministic in any interpreter (no hash randomisation), distinct enough for a benchmark.
    return (parent * 0x9E3779B97F4A7C15 + local + 1) & MASK


class Workload:
    """Events and queries, as (local hash, chained hash) pairs so each side takes its own."""

    def __init__(self, seed: int, workers: int, entries: int, prefixes: int, prefix_blocks: int,
                 seq_blocks: int, churn_events: int, queries: int, query_blocks: int) -> None:
        rng = random.Random(seed)
        self.workers = workers
        prompts = [[rng.getrandbits(63) for _ in range(prefix_blocks)] for _ in range(prefixes)]
        # Zipf-like popularity: a few system prompts are used by most requests.
        weights = [1.0 / (i + 1) for i in range(prefixes)]
        held: list[set[int]] = [set() for _ in range(workers)]
        self.sequences: list[list[list[tuple[int, int]]]] = [[] for _ in range(workers)]
        # events: (worker, kind, [(local, chained)...], parent_chained or None)
        self.build: list[tuple[int, str, list[tuple[int, int]], int | None]] = []
        total = 0
        w = 0
        while total < entries:
            seq = self._sequence(rng, prompts, weights, seq_blocks)
            self.sequences[w].append(seq)
            new = [(i, b) for i, b in enumerate(seq) if b[1] not in held[w]]
            for start in range(0, len(new), EVENT_BLOCKS):
                chunk = new[start:start + EVENT_BLOCKS]
                first = chunk[0][0]
                parent = seq[first - 1][1] if first > 0 else None
                self.build.append((w, "stored", [b for _, b in chunk], parent))
                held[w].update(b[1] for _, b in chunk)
                total += len(chunk)
            w = (w + 1) % workers
        self.entries = total
        # Churn: engines evict leaves first, so remove a sequence's newest 64 blocks; store a new
        # sequence's tail in their place.
        self.churn: list[tuple[int, str, list[tuple[int, int]], int | None]] = []
        for _ in range(churn_events // 2):
            w = rng.randrange(workers)
            seqs = self.sequences[w]
            seq = seqs[rng.randrange(len(seqs))]
            if len(seq) > prefix_blocks + EVENT_BLOCKS:
                tail = seq[-EVENT_BLOCKS:]
                del seq[-EVENT_BLOCKS:]
                self.churn.append((w, "removed", tail, None))
            # The new sequence shares a system prompt this worker already holds, as a new
            # conversation would, so its event's parent is known to both indexes.
            fresh = list(seq[:prefix_blocks])
            parent = fresh[-1][1]
            for _ in range(EVENT_BLOCKS):
                local = rng.getrandbits(63)
                parent = chain(parent, local)
                fresh.append((local, parent))
            seqs.append(fresh)
            self.churn.append((w, "stored", fresh[prefix_blocks:], fresh[prefix_blocks - 1][1]))
        # Queries: follow one worker's stored sequence for a random depth, then diverge.
        self.queries: list[list[tuple[int, int]]] = []
        for _ in range(queries):
            w = rng.randrange(workers)
            seq = self.sequences[w][rng.randrange(len(self.sequences[w]))]
            depth = rng.randint(1, len(seq))
            q = list(seq[:depth])
            parent = q[-1][1]
            while len(q) < query_blocks:
                local = rng.getrandbits(63)
                parent = chain(parent, local)
                q.append((local, parent))
            self.queries.append(q[:query_blocks])

    @staticmethod
    def _sequence(rng: random.Random, prompts: list[list[int]], weights: list[float], blocks: int) -> list[tuple[int, int]]:
        prompt = rng.choices(prompts, weights)[0]
        locals_ = prompt + [rng.getrandbits(63) for _ in range(blocks - len(prompt))]
        out, parent = [], 0
        for local in locals_:
            parent = chain(parent, local)
            out.append((local, parent))
        return out


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_ours(wl: Workload) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    import msgspec

    from dynamo.wire import BlockRemoved, BlockStored, KvCacheEvent
    from router.indexer import KvIndex

    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder(KvCacheEvent)
    next_id = [0] * wl.workers

    def wire(events: list[tuple[int, str, list[tuple[int, int]], int | None]]) -> list[bytes]:
        out = []
        for w, kind, blocks, parent in events:
            hashes = [c for _, c in blocks]
            data = BlockStored(hashes, parent) if kind == "stored" else BlockRemoved(hashes)
            out.append(enc.encode(KvCacheEvent(w, next_id[w], data)))
            next_id[w] += 1
        return out

    index = KvIndex()
    return _measure(
        wl, wire,
        lambda payload: index.apply_event(dec.decode(payload)),
        [[c for _, c in q] for q in wl.queries],
        index.find_matches,
        lambda: index.num_entries(),
    )


def run_dynamo(wl: Workload) -> dict[str, Any]:
    from dynamo._core import RadixTree  # type: ignore[import-not-found]

    next_id = [0] * wl.workers
    tree = RadixTree()

    def wire(events: list[tuple[int, str, list[tuple[int, int]], int | None]]) -> list[tuple[int, bytes]]:
        out = []
        for w, kind, blocks, parent in events:
            next_id[w] += 1
            data: dict[str, Any]
            if kind == "stored":
                data = {"stored": {"parent_hash": parent, "blocks": [{"block_hash": c, "tokens_hash": l} for l, c in blocks]}}
            else:
                data = {"removed": {"block_hashes": [c for _, c in blocks]}}
            out.append((w, json.dumps({"event_id": next_id[w], "data": data}).encode()))
        return out

    return _measure(
        wl, wire,
        lambda item: tree.apply_event(item[0], item[1]),
        [[l for l, _ in q] for q in wl.queries],
        lambda seq: tree.find_matches(seq).scores,
        lambda: None,
    )


# What one side's wire() encodes an event into and its apply() takes: bytes for ours, a
# (worker, JSON) pair for Dynamo's RadixTree.
_Payload = TypeVar("_Payload")


def _measure(
    wl: Workload,
    wire: Callable[[list[tuple[int, str, list[tuple[int, int]], int | None]]], list[_Payload]],
    apply: Callable[[_Payload], object],
    queries: list[list[int]],
    match: Callable[[list[int]], Mapping[int, int]],
    entries: Callable[[], int | None],
) -> dict[str, Any]:
    import gc

    build = wire(wl.build)
    churn = wire(wl.churn)
    gc.collect()
    gc.disable()  # a collection pass over a million objects mid-loop would land on one side only
    try:
        t0 = time.perf_counter_ns()
        for payload in build:
            apply(payload)
        t1 = time.perf_counter_ns()
        for payload in churn:
            apply(payload)
        t2 = time.perf_counter_ns()
        lat: list[float] = []
        matched = 0
        for q in queries:
            s = time.perf_counter_ns()
            scores = match(q)
            lat.append((time.perf_counter_ns() - s) / 1000)
            matched += max(scores.values(), default=0)
    finally:
        gc.enable()
    build_blocks = sum(len(e[2]) for e in wl.build)
    churn_blocks = sum(len(e[2]) for e in wl.churn)
    return {
        "entries": entries(),
        "build_events": len(build), "build_blocks": build_blocks,
        "build_blocks_per_s": build_blocks / ((t1 - t0) / 1e9),
        "churn_events": len(churn), "churn_blocks": churn_blocks,
        "churn_blocks_per_s": churn_blocks / ((t2 - t1) / 1e9),
        "match_p50_us": percentile(lat, 0.5), "match_p99_us": percentile(lat, 0.99),
        "match_mean_us": sum(lat) / len(lat),
        "mean_best_match_blocks": matched / len(queries),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--entries", type=int, default=1_000_000, help="(worker, block) entries to build")
    p.add_argument("--prefixes", type=int, default=64, help="shared system prompts")
    p.add_argument("--prefix-blocks", type=int, default=32)
    p.add_argument("--seq-blocks", type=int, default=160, help="blocks per stored sequence")
    p.add_argument("--churn-events", type=int, default=4000)
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--query-blocks", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dynamo-python", default="/tmp/dyn/bin/python")
    p.add_argument("--side", choices=["ours", "dynamo"], help=argparse.SUPPRESS)
    p.add_argument("--json-out")
    args = p.parse_args()
    knobs = dict(seed=args.seed, workers=args.workers, entries=args.entries, prefixes=args.prefixes,
                 prefix_blocks=args.prefix_blocks, seq_blocks=args.seq_blocks,
                 churn_events=args.churn_events, queries=args.queries, query_blocks=args.query_blocks)
    if args.side:
        wl = Workload(**knobs)
        result = run_ours(wl) if args.side == "ours" else run_dynamo(wl)
        print(json.dumps(result))
        return

    argv = [a for a in sys.argv[1:] if not a.startswith("--json-out")]
    if "--json-out" in sys.argv:
        i = sys.argv.index("--json-out")
        argv = sys.argv[1:i] + sys.argv[i + 2:]
    sides = {"ours": sys.executable, "dynamo": args.dynamo_python}
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for side, python in sides.items():
            if not os.path.exists(python):
                print(f"skipping {side}: {python} not found", file=sys.stderr)
                continue
            # Dynamo's side runs outside the repository so `dynamo` is its package, not ours.
            out = subprocess.run([python, str(Path(__file__).resolve()), *argv, "--side", side],
                                 cwd="/tmp", capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res.update(side=side, round=r)
            runs.append(res)
            print(f"{side:7s} round {r}: build {res['build_blocks_per_s'] / 1e6:.2f}M blocks/s, "
                  f"churn {res['churn_blocks_per_s'] / 1e6:.2f}M blocks/s, match p50 {res['match_p50_us']:.1f} us "
                  f"p99 {res['match_p99_us']:.1f} us (mean best match {res['mean_best_match_blocks']:.1f} blocks, "
                  f"{res['build_events']} build events, {res['build_blocks']} blocks)", flush=True)
    summary: dict[str, dict[str, float]] = {}
    for side in sides:
        mine = [r for r in runs if r["side"] == side]
        if mine:
            summary[side] = {k: statistics.median(r[k] for r in mine) for k in
                             ("build_blocks_per_s", "churn_blocks_per_s", "match_p50_us", "match_p99_us")}
            print(f"{side:7s} median of {len(mine)}: " + ", ".join(f"{k} {v:,.1f}" for k, v in summary[side].items()))
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "workload": knobs, "summary": summary, "runs": runs,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
