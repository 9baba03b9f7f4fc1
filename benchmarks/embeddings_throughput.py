"""Embeddings throughput of the built-in engine against a plain transformers forward on the same
model with the same pooling (last token, normalised), side by side in one process: inputs/s and
tokens/s with 1 input per request (sequential requests) and 64 inputs per request.

The model is random-weight and Qwen3-shaped (Qwen3-0.6B's width, fewer layers by default, so a
CPU run takes a minute); both sides run it in fp32 (CPU) or bf16 (CUDA) on the same torch
threads. Ours is timed through the engine's embed path (batcher, paged forward on the model
thread, pooling, normalisation, the wire encoding); transformers' is tokenized ids in, a padded
batch forward (no padding: inputs have equal lengths), the last hidden state pooled and
normalised. The two sides' vectors are compared before timing.

    python benchmarks/embeddings_throughput.py [--layers 4] [--input-tokens 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamo.wire import EmbeddingRequest  # noqa: E402
from workers.builtin.args import BuiltinConfig  # noqa: E402
from workers.builtin.engine import BuiltinEngine  # noqa: E402
from workers.builtin.testing_models import TinyModelSpec, build_random_model  # noqa: E402
from workers.embedding import EmbeddingConfig, finish  # noqa: E402


def model_spec(layers: int) -> TinyModelSpec:
    # Qwen3-0.6B / Qwen3-Embedding-0.6B's width; its vocabulary cut to 32k (only the embedding
    # table's size changes: pooling never runs the LM head).
    return TinyModelSpec(
        architecture="Qwen3ForCausalLM", vocab_size=32768, hidden_size=1024, intermediate_size=3072,
        num_layers=layers, num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True,
        max_position_embeddings=4096, initializer_range=0.02, seed=0,
    )


def inputs_for(n: int, tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 32768) for _ in range(tokens)] for _ in range(n)]


async def ours(model_dir: Path, args: argparse.Namespace) -> dict[str, object]:
    engine = BuiltinEngine(BuiltinConfig(
        model=str(model_dir), dtype="auto", device=args.device, max_num_seqs=64,
        max_num_batched_tokens=max(2048, 64 * args.input_tokens), kv_cache_memory_gb=1.0,
    ))
    config = EmbeddingConfig(pooling="last", normalize=True)
    engine.enable_embeddings(config)
    await engine.start()

    async def embed(inputs: list[list[int]]) -> np.ndarray:
        request = EmbeddingRequest(request_id="b", model="m", inputs=inputs)
        out = finish(await engine.embed(request, "last"), request, config)
        return np.frombuffer(out.data, dtype="<f4").reshape(len(inputs), out.dim)

    try:
        return await measure(embed, args)
    finally:
        await engine.stop()


def hf(model_dir: Path, args: argparse.Namespace) -> dict[str, object]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = transformers.AutoModel.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()

    async def embed(inputs: list[list[int]]) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.tensor(inputs, device=device)
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, -1]
            pooled = torch.nn.functional.normalize(hidden.float(), dim=-1)
            return pooled.cpu().numpy()

    return asyncio.run(measure(embed, args))


async def measure(
    embed: Callable[[list[list[int]]], Awaitable[np.ndarray]], args: argparse.Namespace
) -> dict[str, object]:
    results: dict[str, object] = {}
    probe = inputs_for(64, args.input_tokens, seed=1)
    results["probe"] = await embed(probe)
    for batch in (1, 64):
        requests = args.requests_b1 if batch == 1 else args.requests_b64
        work = [inputs_for(batch, args.input_tokens, seed=100 + i) for i in range(requests)]
        await embed(work[0])  # warm-up
        started = time.perf_counter()
        for inputs in work:
            await embed(inputs)
        elapsed = time.perf_counter() - started
        n_inputs = batch * requests
        results[f"batch{batch}"] = {
            "inputs_per_s": n_inputs / elapsed,
            "tokens_per_s": n_inputs * args.input_tokens / elapsed,
            "ms_per_request": 1000 * elapsed / requests,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--input-tokens", type=int, default=32)
    parser.add_argument("--requests-b1", type=int, default=64)
    parser.add_argument("--requests-b64", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random_model(model_spec(args.layers), Path(tmp) / "model")
        mine = asyncio.run(ours(model_dir, args))
        theirs = hf(model_dir, args)
    diff = float(np.abs(mine.pop("probe") - theirs.pop("probe")).max())  # type: ignore[operator]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {args.device}",
        "model": f"random Qwen3-shaped: hidden 1024, {args.layers} layers, 16/8 heads of 128",
        "input_tokens": args.input_tokens,
        "max_abs_diff_vs_transformers": diff,
        "builtin": mine,
        "transformers": theirs,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['model']}; inputs of {args.input_tokens} tokens; {report['machine']}")
    print(f"max |ours - transformers| over 64 normalised vectors: {diff:.2e}")
    print(f"{'':14}{'batch':>6}{'inputs/s':>12}{'tokens/s':>12}{'ms/request':>12}")
    for name, side in (("builtin", mine), ("transformers", theirs)):
        for batch in (1, 64):
            r = side[f"batch{batch}"]
            assert isinstance(r, dict)
            print(f"{name:14}{batch:>6}{r['inputs_per_s']:>12.1f}{r['tokens_per_s']:>12.0f}{r['ms_per_request']:>12.1f}")


if __name__ == "__main__":
    main()
