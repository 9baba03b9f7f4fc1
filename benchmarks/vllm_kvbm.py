"""KVBM tiers below vLLM (issue 16 item 1c): TTFT of a long prompt onboarded from our host or
disk tier (workers/vllm/connector/offload.py) against recomputing it, on vLLM for CPUs.

Run it with the vLLM venv's interpreter (scripts/install_vllm.sh):

    .venv-vllm/bin/python benchmarks/vllm_kvbm.py [--prompt-tokens 2048] [--rounds 3] \
        [--tiers host,disk] [--disk-load auto|sync|async] [--out-dir benchmarks/results]

One VllmEngine in this process per tier (`--kvbm-host-gb 1`, or `--kvbm-disk-dir` alone: every
offload goes to disk), over a random-weight Llama big enough for prefill to cost something
(4 layers, hidden 1024, 16 heads, 4 KV heads of 64, float32), vLLM's KV cache cut to
`--device-blocks` so that three other prompts push a prompt out of it. Per round and tier:
- cold: a prompt never seen (vLLM computes all of it), measured for each of the four prompts;
- tier: the first prompt again after the three others pushed it out of vLLM's cache: onboarded
  from the tier (its cached_tokens are checked to cover the prompt);
- device: the same prompt once more: vLLM's own prefix cache, for scale.
TTFT is the time from submitting the request to the engine to its first output token
(max_tokens 1), in-process: no HTTP, no frontend.

With `--stream`, another request decodes beside each onboarded one (started just before it,
aborted once it has its first token): the gaps between that stream's tokens while the prompt is
onboarded show what the onboard costs the requests already running (a disk read on the model
thread lengthens their steps; one off it does not), against the stream's median gap.

`--disk-load` is KvbmConfig.disk_load: how a request with disk hits loads (auto: the connector
chooses per request; sync or async: always so). The requests that loaded each way are counted
(`disk_loads` in the counters, and the table).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.builtin.testing_models import TinyModelSpec, build_random_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BLOCK = 32
SPEC = TinyModelSpec(
    vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=16, num_kv_heads=4,
    head_dim=64, max_position_embeddings=4096, eos_token_id=3, seed=7,
)


def build_model(out: Path) -> Path:
    path = build_random_model(SPEC, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = REPO / "models" / "dynamo-tiny" / name
        if src.exists():
            shutil.copy(src, path / name)
    return path


def prompt(seed: int, n: int) -> list[int]:
    return [(i * 7 + seed * 1009) % 8000 + 10 for i in range(n)]


async def ttft(engine: Any, tokens: list[int], request_id: str) -> tuple[float, int]:
    from dynamo.wire import PreprocessedRequest, SamplingOptions, StopConditions

    req = PreprocessedRequest(request_id=request_id, model="m", token_ids=tokens, sampling=SamplingOptions(),
                              stop=StopConditions(max_tokens=1))
    started = time.perf_counter()
    first: float | None = None
    cached = 0
    async for out in engine.generate(req):
        if first is None:
            first = time.perf_counter() - started
            cached = out.cached_tokens or 0
    assert first is not None
    return first, cached


class Stream:
    """A request decoding beside the measured ones: when each of its tokens arrived."""

    def __init__(self, engine: Any, request_id: str, max_tokens: int) -> None:
        self.times: list[float] = []
        self.started = asyncio.Event()
        self.task = asyncio.create_task(self._run(engine, request_id, max_tokens))

    async def _run(self, engine: Any, request_id: str, max_tokens: int) -> None:
        from dynamo.wire import PreprocessedRequest, SamplingOptions, StopConditions

        req = PreprocessedRequest(request_id=request_id, model="m", token_ids=prompt(99_999, 64),
                                  sampling=SamplingOptions(), stop=StopConditions(max_tokens=max_tokens, ignore_eos=True))
        async for out in engine.generate(req):
            self.times.extend([time.perf_counter()] * len(out.token_ids))
            if len(self.times) >= 8:  # decoding steadily
                self.started.set()
        self.started.set()

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass

    def gaps(self, start: float, end: float) -> tuple[float, float]:
        """(the longest gap between tokens that overlaps [start, end], the median gap)."""
        pairs = list(zip(self.times, self.times[1:]))
        inside = [b - a for a, b in pairs if b >= start and a <= end]
        return max(inside, default=0.0), statistics.median(b - a for a, b in pairs)


async def run_tier(model: Path, tier: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from kvbm.config import KvbmConfig
    from workers.vllm.args import VllmConfig
    from workers.vllm.engine import VllmEngine

    config = VllmConfig.for_model(
        str(model), dtype="float32", max_model_len=args.prompt_tokens + 256, block_size=BLOCK, enforce_eager=True,
        num_gpu_blocks_override=args.device_blocks,
    )
    kvbm = (KvbmConfig(host_gb=1.0) if tier == "host"
            else KvbmConfig(disk_dir=str(scratch / "disk"), disk_gb=4.0, disk_load=args.disk_load))
    engine = VllmEngine(dataclasses.replace(config, kvbm=kvbm))
    await engine.start()
    samples: dict[str, list[float]] = {"cold": [], "tier": [], "device": [], "stream_gap_max": [],
                                       "stream_gap_median": []}
    onboarded: list[int] = []
    try:
        await ttft(engine, prompt(10_000, 64), "warmup")
        for r in range(args.rounds):
            seeds = [4 * r + k + 1 for k in range(4)]  # the first, then three that push it out
            for k, seed in enumerate(seeds):
                t, cached = await ttft(engine, prompt(seed, args.prompt_tokens), f"{tier}-{r}-cold-{k}")
                assert cached == 0, cached
                samples["cold"].append(t)
            stream = None
            if args.stream:
                stream = Stream(engine, f"{tier}-{r}-stream", args.prompt_tokens)
                await asyncio.wait_for(stream.started.wait(), 120)
            submitted = time.perf_counter()
            t, cached = await ttft(engine, prompt(seeds[0], args.prompt_tokens), f"{tier}-{r}-tier")
            if stream is not None:
                await stream.stop()
                longest, median = stream.gaps(submitted, submitted + t)
                samples["stream_gap_max"].append(longest)
                samples["stream_gap_median"].append(median)
            assert cached >= args.prompt_tokens - BLOCK, f"expected an onboarded prompt, cached {cached}"
            onboarded.append(cached)
            samples["tier"].append(t)
            t, cached = await ttft(engine, prompt(seeds[0], args.prompt_tokens), f"{tier}-{r}-device")
            samples["device"].append(t)
        await asyncio.sleep(0.5)  # the last step's connector stats
        assert engine.kvbm is not None
        stats = engine.kvbm.cache.stats
        counters = {"hits": dict(stats.hits), "onboard_blocks": dict(stats.onboard_blocks),
                    "offload_blocks": dict(stats.offload_blocks), "tier_request_cached_tokens": onboarded,
                    # The onboard cost model's choices (tier/onboard or tier/recompute, in blocks).
                    "decisions": {f"{tier}/{decision}": n for (tier, decision), n in stats.decisions.items()},
                    # Requests with a disk hit, by how they loaded ("sync", "async").
                    "disk_loads": dict(engine.kvbm.disk_loads)}
    finally:
        await engine.stop()
    return {"samples": samples, "counters": counters}


def main() -> None:
    from kvbm.config import DISK_LOADS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--device-blocks", type=int, default=140, help="vLLM's KV cache in blocks of 32 tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiers", default="host,disk")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--stream", action="store_true",
                        help="a request decoding beside each onboarded one: its longest token gap meanwhile")
    parser.add_argument("--disk-load", choices=DISK_LOADS, default="auto",
                        help="how a request with disk hits loads: chosen per request (auto), or always sync or async")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    results: dict[str, Any] = {"args": vars(args), "model": dataclasses.asdict(SPEC), "tiers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = build_model(scratch / "model")
        for tier in args.tiers.split(","):
            load = os.getloadavg()[0]
            results["tiers"][tier] = asyncio.run(run_tier(model, tier, args, scratch))
            results["tiers"][tier]["load_before_after"] = [load, os.getloadavg()[0]]
    lines = ["| tier | cold TTFT p50 ms | onboarded TTFT p50 ms | vLLM prefix hit TTFT p50 ms | cold/onboarded | "
             "samples (cold, tier) | disk loads sync, async |",
             "|---|---|---|---|---|---|---|"]
    for tier, res in results["tiers"].items():
        s = res["samples"]
        cold, hit, dev = (statistics.median(s[k]) * 1e3 for k in ("cold", "tier", "device"))
        loads = res["counters"]["disk_loads"]
        lines.append(f"| {tier} | {cold:.0f} | {hit:.0f} | {dev:.0f} | {cold / hit:.1f}x | {len(s['cold'])}, {len(s['tier'])} "
                     f"| {loads.get('sync', 0)}, {loads.get('async', 0)} |")
    if args.stream:
        lines += ["", "| tier | stream's longest gap while onboarding, ms (per round) | its median gap ms |", "|---|---|---|"]
        for tier, res in results["tiers"].items():
            s = res["samples"]
            longest = ", ".join(f"{v * 1e3:.0f}" for v in s["stream_gap_max"])
            lines.append(f"| {tier} | {longest} | {statistics.median(s['stream_gap_median']) * 1e3:.0f} |")
    table = "\n".join(lines)
    print(table)
    for tier, res in results["tiers"].items():
        print(tier, "counters", res["counters"], "load", res["load_before_after"])
        print(tier, "samples ms", {k: [round(v * 1e3) for v in vs] for k, vs in res["samples"].items()})
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"vllm_kvbm-{stamp}.json").write_text(json.dumps(results, indent=1))
    (out / f"vllm_kvbm-{stamp}.md").write_text(table + "\n")
    print("wrote", out / f"vllm_kvbm-{stamp}.json")


if __name__ == "__main__":
    main()
