"""Constrained vs unconstrained decode throughput on the built-in engine (issue 14's goal:
constrained within 10% of unconstrained tokens/s at batch 32), and where a constrained step's
extra time goes.

The whole engine runs (scheduler, torch executor, Sampler): B requests with distinct prompts
decode `--tokens` tokens each, greedy, ignore_eos. Constrained requests carry a JSON schema whose
output cannot end within that many tokens (an array of at least 12 small objects: keys, enums,
bounded integers, short strings and booleans, so the masks cover every kind of JSON position),
so every step masks every row. Decode tokens/s counts the tokens after each request's first one,
over the time from the last first token to the end (median of --repeats runs); the two modes
alternate, and the ratio is the median of each constrained run over the unconstrained run
just before it.

Attribution: the grammar work on a step's critical path is timed by wrapping its calls
(GrammarMasks.masks: wait for the masks filled ahead, fill the rows that were not;
GrammarMasks.apply: unpack and mask the logits; GrammarMatcher.accept: advance each matcher by its
token), summed per step; `fill_ahead` is the helper thread's fill (off the critical path when it
overlaps the step). The sampler fills ahead on CPUs only; `--fill-in-step` turns that off and
`--fill-ahead` turns it on for a GPU, for the comparison.

    python benchmarks/constrained_decoding.py --device cpu --batch 1 32 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from dynamo.wire import OutputConstraint, PreprocessedRequest, SamplingOptions, StopConditions  # noqa: E402
from workers.builtin.args import DEFAULT_MODEL, BuiltinConfig  # noqa: E402
from workers.builtin.engine import BuiltinEngine  # noqa: E402
from workers.builtin.grammar_masks import GrammarMasks  # noqa: E402
from workers.builtin.penalties import PenaltyCounts  # noqa: E402
from workers.builtin.testing_models import TinyModelSpec, build_random_model  # noqa: E402
from workers.structured.masks import MaskFiller  # noqa: E402
from workers.structured.matcher import GrammarMatcher  # noqa: E402

ITEM: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "kind": {"enum": ["alpha", "beta", "gamma", "delta"]},
        "label": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "kind", "label", "ok"],
    "additionalProperties": False,
}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 12, "maxItems": 64}
CONSTRAINT = OutputConstraint("json_schema", json.dumps(SCHEMA))


class Timers:
    """Seconds spent in the grammar calls, by name, while installed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"masks": 0.0, "apply": 0.0, "accept": 0.0, "fill_ahead": 0.0}
        self._undo: list[tuple[type, str, Callable[..., Any]]] = []

    def wrap(self, cls: type, method: str, name: str) -> None:
        original = getattr(cls, method)
        seconds = self.seconds

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start

        setattr(cls, method, timed)
        self._undo.append((cls, method, original))

    def __enter__(self) -> Timers:
        self.wrap(GrammarMasks, "masks", "masks")
        self.wrap(GrammarMasks, "apply", "apply")
        self.wrap(GrammarMatcher, "accept", "accept")
        original_fill = MaskFiller.fill
        seconds = self.seconds

        def fill(self: MaskFiller, bitmask: np.ndarray, rows: Sequence[tuple[int, GrammarMatcher]]) -> None:
            start = time.perf_counter()
            original_fill(self, bitmask, rows)
            if threading.current_thread().name.startswith("grammar-fill"):
                seconds["fill_ahead"] += time.perf_counter() - start

        MaskFiller.fill = fill  # type: ignore[method-assign]
        self._undo.append((MaskFiller, "fill", original_fill))
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, method, original in reversed(self._undo):
            setattr(cls, method, original)


def prompts(batch: int) -> list[list[int]]:
    return [[(17 * i + 3 * j + 100) % 8000 + 10 for j in range(32)] for i in range(batch)]


async def run_once(engine: BuiltinEngine, batch: int, tokens: int, constrained: bool) -> dict[str, float]:
    first_at: list[float] = []
    counts = [0] * batch

    async def one(i: int, prompt: list[int]) -> None:
        request = PreprocessedRequest(
            request_id=f"r{i}", model="m", token_ids=prompt, sampling=SamplingOptions(),
            stop=StopConditions(max_tokens=tokens, ignore_eos=True),
            constraint=CONSTRAINT if constrained else None,
        )
        async for out in engine.generate(request):
            if counts[i] == 0:
                first_at.append(time.perf_counter())
            counts[i] += len(out.token_ids)

    steps_before = engine.num_steps
    tasks = [one(i, p) for i, p in enumerate(prompts(batch))]
    await asyncio.gather(*tasks)
    end = time.perf_counter()
    decode_tokens = sum(counts) - batch
    decode_s = end - max(first_at)
    assert all(c == tokens for c in counts), counts
    return {"decode_tok_s": decode_tokens / decode_s, "decode_s": decode_s,
            "steps": engine.num_steps - steps_before}


async def check_outputs(engine: BuiltinEngine, batch: int) -> int:
    """The constrained path gives valid JSON on this device: a schema that can end, to EOS."""
    schema = {**SCHEMA, "minItems": 1, "maxItems": 2}
    constraint = OutputConstraint("json_schema", json.dumps(schema))
    vocab = Tokenizer.from_file(str(Path(engine.model_config.model_dir) / "tokenizer.json"))
    eos = list(engine.model_config.eos_token_ids)

    async def one(i: int, prompt: list[int]) -> int:
        request = PreprocessedRequest(
            request_id=f"c{i}", model="m", token_ids=prompt, sampling=SamplingOptions(temperature=1.0, seed=i),
            stop=StopConditions(max_tokens=400, stop_token_ids=eos), constraint=constraint,
        )
        ids = [t async for out in engine.generate(request) for t in out.token_ids]
        assert ids[-1] in eos, "the grammar ended: EOS"
        items = json.loads(vocab.decode(ids[:-1]))
        assert 1 <= len(items) <= 2 and all(set(item) == set(ITEM["required"]) for item in items), items
        return len(ids)

    return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts(batch)))))


async def measure(args: argparse.Namespace, batch: int) -> dict[str, Any]:
    config = BuiltinConfig(model=args.model, device=args.device, dtype=args.dtype, num_gpu_blocks=args.blocks,
                           max_num_seqs=max(batch, 1), enforce_eager=args.enforce_eager)
    out: dict[str, Any] = {"batch": batch}
    # Bound before `async with`: Engine.__aenter__ is typed as returning the base Engine.
    engine = BuiltinEngine(config)
    async with engine:
        await run_once(engine, batch, 8, False)  # warm-up: graphs, allocator, compile cache
        await run_once(engine, batch, 8, True)
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        grammar: list[dict[str, float]] = []
        for _ in range(args.repeats):  # the two modes alternate, so drift hits both alike
            for constrained in (False, True):
                with Timers() as timers:
                    result = await run_once(engine, batch, args.tokens, constrained)
                runs[constrained].append(result)
                if constrained:
                    grammar.append({k: v / max(result["steps"], 1) * 1e3 for k, v in timers.seconds.items()})
        out["valid_json_tokens"] = await check_outputs(engine, batch)
        for constrained, mode in runs.items():
            median = sorted(mode, key=lambda r: r["decode_tok_s"])[len(mode) // 2]
            out["constrained" if constrained else "unconstrained"] = {
                "decode_tok_s": median["decode_tok_s"],
                "step_ms": median["decode_s"] / (args.tokens - 1) * 1e3,
                "runs_tok_s": [r["decode_tok_s"] for r in mode],
            }
        out["constrained"]["grammar_ms_per_step"] = {k: statistics.median(g[k] for g in grammar) for k in grammar[0]}
        # Per repeat, constrained over the unconstrained run just before it.
        out["paired_ratios"] = [c["decode_tok_s"] / u["decode_tok_s"] for u, c in zip(runs[False], runs[True])]
    out["ratio"] = statistics.median(out["paired_ratios"])
    return out


def penalty_counts(device: torch.device, vocab: int, batch: int, lengths: list[int], steps: int = 20) -> list[dict[str, float]]:
    """Per decode step, the penalised rows' [batch, vocab] output counts two ways: kept on the
    device and bumped by one index_put_ a step (workers/builtin/penalties.py), or rebuilt from
    each sequence's output ids with one scatter_add_ (the host builds the index lists)."""
    out = []
    for length in lengths:
        counts = PenaltyCounts(vocab, device)
        outputs = [[(7 * i + 13 * j) % vocab for j in range(length)] for i in range(batch)]
        for slot, ids in enumerate(outputs):
            counts.init_slot(slot, [], ids)
        slots = list(range(batch))

        def incremental(step: int) -> torch.Tensor:
            got, _ = counts.gather(slots)
            counts.add(slots, torch.full((batch,), step % vocab, device=device))
            return got

        def rebuild(step: int) -> torch.Tensor:
            for ids in outputs:
                ids.append(step % vocab)
            rows = [i for i, ids in enumerate(outputs) for _ in ids]
            flat = [t for ids in outputs for t in ids]
            index = torch.tensor(rows, dtype=torch.long).to(device) * vocab + torch.tensor(flat, dtype=torch.long).to(device)
            got = torch.zeros(batch * vocab, device=device)
            got.scatter_add_(0, index, torch.ones(len(flat), device=device))
            return got.view(batch, vocab)

        row: dict[str, float] = {"vocab": vocab, "batch": batch, "output_tokens": length}
        for name, fn in (("incremental_ms", incremental), ("rebuild_ms", rebuild)):
            fn(0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for step in range(steps):
                fn(step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            row[name] = (time.perf_counter() - start) / steps * 1e3
        out.append(row)
    return out


def random_1b(out: Path) -> Path:
    """builtin_gpu.py's 1.1B shape with the tiny model's 8,192-token vocabulary and tokenizer."""
    if not (out / "model.safetensors").is_file():
        spec = TinyModelSpec(
            vocab_size=8192, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
            num_kv_heads=8, head_dim=64, max_position_embeddings=4096, initializer_range=0.02,
            eos_token_id=3, dtype="bfloat16",
        )
        build_random_model(spec, out)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(Path(DEFAULT_MODEL) / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=1024)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--fill-in-step", action="store_true", help="no fill-ahead: every mask filled in its step")
    parser.add_argument("--fill-ahead", action="store_true", help="fill ahead on a GPU too (the sampler does on CPUs)")
    parser.add_argument("--random-1b", type=Path, metavar="DIR",
                        help="build (once) and run a random-weight 1.1B Llama shape (bf16) with dynamo-tiny's "
                        "tokenizer in DIR: a forward pass of a realistic length beside the masks")
    parser.add_argument("--penalty-counts", action="store_true",
                        help="only time the two ways of keeping penalty counts (batch 32, vocab 8k and 128k)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.random_1b is not None:
        args.model = str(random_1b(args.random_1b))
    if args.fill_in_step:
        GrammarMasks.fill_ahead = lambda self, matchers: None  # type: ignore[method-assign]
    if args.fill_ahead:
        original_init = GrammarMasks.__init__

        def init_ahead(self: GrammarMasks, *a: Any, **kw: Any) -> None:
            original_init(self, *a, **{**kw, "ahead": True})

        GrammarMasks.__init__ = init_ahead  # type: ignore[method-assign]
    env = {
        "torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "fill_ahead": not args.fill_in_step and (args.fill_ahead or args.device == "cpu"),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    print(json.dumps(env))
    if args.penalty_counts:
        rows = [r for vocab in (8192, 128_256)
                for r in penalty_counts(torch.device(args.device), vocab, 32, [128, 1024, 4096])]
        for r in rows:
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
        if args.json:
            args.json.write_text(json.dumps({"env": env, "penalty_counts": rows}, indent=1) + "\n")
        return
    results = []
    for batch in args.batch:
        result = asyncio.run(measure(args, batch))
        results.append(result)
        u, c = result["unconstrained"], result["constrained"]
        g = c["grammar_ms_per_step"]
        print(
            f"batch {batch:3d}: unconstrained {u['decode_tok_s']:9.1f} tok/s ({u['step_ms']:.2f} ms/step)  "
            f"constrained {c['decode_tok_s']:9.1f} tok/s ({c['step_ms']:.2f} ms/step)  ratio {result['ratio']:.3f}  "
            f"grammar ms/step: masks {g['masks']:.3f} apply {g['apply']:.3f} accept {g['accept']:.3f} "
            f"(fill ahead {g['fill_ahead']:.3f})",
            flush=True,
        )
    env["load_avg_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
