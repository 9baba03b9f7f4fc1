"""Measure one worker's performance model through a running frontend and save it as the JSON
the planner loads (`python -m dynamo.planner --perf-model FILE`, planner/perf_model.py).

Works for any engine, the mocker included (its timing model answers like any engine): start a
frontend and ONE worker of the engine and configuration to profile, then

    python benchmarks/profile_worker.py --url http://127.0.0.1:8000 --out perf.json \
        --max-batch 256 --kv-capacity-tokens 393216

- prefill: for each prompt length, prompts of fresh random token ids (no prefix-cache hit) are
  sent one at a time with max_tokens=1; the median time to first token is the prefill time;
- decode: for each context length and batch size, `batch` streams of `--decode-tokens` tokens
  run at once; the median over streams of (last token - first token) / (tokens - 1) is the ITL.

--max-batch and --kv-capacity-tokens are the engine's own limits (e.g. the mocker's
--max-num-seqs, and --num-gpu-blocks x --block-size); the planner never plans past them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for planner/

from planner.perf_model import DecodePoint, PerfModel, PrefillPoint, save_perf_model  # noqa: E402
from sse_client import HttpxConnection, RequestResult, one_request  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def body(model: str, prompt: list[int], max_tokens: int) -> bytes:
    return json.dumps({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True,
    }).encode()


class Profiler:
    def __init__(self, url: str, model: str, vocab: int, timeout_s: float, seed: int) -> None:
        self.client = httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=httpx.Limits(max_connections=1024))
        self.conn = HttpxConnection(self.client)
        self.model = model
        self.vocab = vocab
        self.timeout_s = timeout_s
        self.rng = random.Random(seed)

    def prompt(self, tokens: int) -> list[int]:
        # Ids from 10 up: clear of the tiny model's special tokens; fresh each time (no cache hit).
        return [self.rng.randrange(10, self.vocab) for _ in range(tokens)]

    async def send(self, prompt_tokens: int, max_tokens: int) -> RequestResult:
        result = await one_request(self.conn, "/v1/completions", body(self.model, self.prompt(prompt_tokens), max_tokens),
                                   chat=False, timeout_s=self.timeout_s)
        if not result.ok:
            raise SystemExit(f"request failed: {result.error}")
        return result

    async def prefill(self, isl: int, repeats: int) -> PrefillPoint:
        await self.send(isl, 1)  # warm-up
        ttfts = [(await self.send(isl, 1)).ttft_s for _ in range(repeats)]
        return PrefillPoint(isl, statistics.median(ttfts))

    async def decode(self, batch: int, context: int, tokens: int) -> DecodePoint:
        results = await asyncio.gather(*(self.send(context, tokens) for _ in range(batch)))
        itls = []
        for r in results:
            if r.output_tokens > 1 and r.itl_s:
                # Chunks may carry several tokens: the time over the tokens after the first.
                itls.append(sum(r.itl_s) / (r.output_tokens - 1))
        return DecodePoint(batch, context, statistics.median(itls))

    async def aclose(self) -> None:
        await self.client.aclose()


async def profile(args: argparse.Namespace) -> PerfModel:
    p = Profiler(args.url, args.model, args.vocab_size, args.timeout_s, args.seed)
    try:
        if not args.model:
            models = (await p.client.get("/v1/models")).json()["data"]
            p.model = models[0]["id"]
        prefill = []
        for isl in _ints(args.isl):
            point = await p.prefill(isl, args.repeats)
            prefill.append(point)
            print(f"prefill {isl:6d} tokens: {point.prefill_s * 1000:8.2f} ms", flush=True)
        decode = []
        for context in _ints(args.context):
            for batch in _ints(args.batch):
                decode_point = await p.decode(batch, context, args.decode_tokens)
                decode.append(decode_point)
                print(f"decode batch {batch:4d} context {context:6d}: itl {decode_point.itl_s * 1000:7.2f} ms", flush=True)
    finally:
        await p.aclose()
    return PerfModel(
        engine=args.engine, prefill=prefill, decode=decode, max_batch=args.max_batch,
        kv_capacity_tokens=args.kv_capacity_tokens,
        notes=args.notes or f"benchmarks/profile_worker.py via {args.url}, {time.strftime('%Y-%m-%d')}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the frontend in front of the one worker")
    parser.add_argument("--model", default="", help="served model name (default: the first the frontend lists)")
    parser.add_argument("--engine", default="unknown", help="recorded in the file")
    parser.add_argument("--out", required=True, help="where to write the performance model (JSON)")
    parser.add_argument("--isl", default="64,256,1024,1536", help="prompt lengths to prefill")
    parser.add_argument("--batch", default="1,2,4,8,16", help="decode batch sizes")
    parser.add_argument("--context", default="128,1024", help="prompt lengths the decode streams attend over")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens each decode stream generates")
    parser.add_argument("--repeats", type=int, default=5, help="prefill samples per length (median)")
    parser.add_argument("--max-batch", type=int, required=True, help="the engine's most concurrent streams")
    parser.add_argument("--kv-capacity-tokens", type=int, required=True, help="KV tokens one worker holds")
    parser.add_argument("--vocab-size", type=int, default=8192, help="token ids are drawn below this")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--notes", default="")
    args = parser.parse_args()
    model = asyncio.run(profile(args))
    save_perf_model(model, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
