"""Grammar-constrained decoding: what one decode step's token mask costs with xgrammar, with
llguidance, and through workers/structured (llguidance + our apply), for one realistic JSON
schema over two vocabularies (issue 14, item 3).

Sides ("--libs"):
- xgrammar: GrammarCompiler (its cache) + GrammarMatcher, BatchGrammarMatcher for the batch
  fill, its apply_token_bitmask_inplace (a C++ kernel on CPU, Triton on CUDA);
- llguidance: LLMatcher (no compiled-grammar object: one fresh matcher per grammar is kept and
  deep-copied), LLExecutor for the batch fill, our apply (its own is a torch.compile kernel:
  --compiled-apply times it too);
- ours: workers.structured's GrammarCompiler / GrammarMatcher / MaskFiller / LogitsMasker, the
  wrapper's overhead included, and check_constraint's cost per constraint kind.

Per side and vocabulary:
- tokenizer setup (once per model); compile cold (a schema not seen before: a fresh variant
  each time) and cached (the same schema again, plus a new matcher);
- per decode step, batch 1: fill the request's bitmask row, apply it to (1, vocab) float32
  logits, then (timed apart) accept the token;
- per decode step, batch 32: 32 requests at staggered positions of the same document, one
  parallel batch fill + one apply over the (32, vocab) logits;
- the apply alone by each implementation on the same bitmask, and an argmax over the same
  logits (what an unconstrained greedy sampler pays anyway).
The tokens walked are the BPE tokenization of a valid instance of the schema (strings, numbers,
keys, an enum value, nested objects and arrays), so every step is a state of a real decode.

Vocabularies: `models/dynamo-tiny` (8,192 tokens, byte-level BPE) and a 150k-token byte-level
BPE trained here with `tokenizers` on the Python sources on disk (no model hub is reachable;
cached under --work-dir, ~35 s to build on the 2-core box).

    python benchmarks/grammar_mask_cost.py --json-out benchmarks/results/grammar_mask_cost_cpu.json
    python benchmarks/grammar_mask_cost.py --device cuda --compiled-apply   # logits on a GPU

xgrammar is not a dependency of the project; to run its side:
`pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi` (it also declares torch, triton,
transformers and pydantic; torch, transformers and pydantic are already installed).

Each side runs in its own subprocess (so no thread pool or allocator state is shared), the
sides alternating for --rounds rounds; figures are medians over rounds of per-round statistics.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "history": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"year": {"type": "integer"}, "event": {"type": "string"}},
                "required": ["year", "event"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "score", "active", "role", "tags", "address", "history"],
    "additionalProperties": False,
}

INSTANCE: dict[str, Any] = {
    "name": "Ada Lovelace, Countess of Lovelace",
    "age": 36,
    "score": 98.25,
    "active": True,
    "role": "editor",
    "tags": ["mathematics", "analytical engine", "poetry of science"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "01234"},
    "history": [
        {"year": 1833, "event": "met Charles Babbage at a party"},
        {"year": 1843, "event": "published the notes on the Analytical Engine, with Note G"},
    ],
}


def build_large_tokenizer(path: Path, vocab_size: int) -> float:
    """Train a byte-level BPE of `vocab_size` tokens on Python sources found on disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = sysconfig.get_paths()["stdlib"]
    purelib = sysconfig.get_paths()["purelib"]
    files: list[str] = []
    for root in (stdlib, f"{purelib}/transformers", f"{purelib}/torch", f"{purelib}/sympy"):
        files += sorted(glob.glob(f"{root}/**/*.py", recursive=True))
    started = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    tok.train(files, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return time.perf_counter() - started


# --- one library, one vocabulary, in a subprocess ---------------------------------------------


def _stats_ms(samples_s: list[float]) -> dict[str, float]:
    s = sorted(samples_s)
    return {
        "mean_ms": 1e3 * statistics.fmean(s),
        "p50_ms": 1e3 * s[len(s) // 2],
        "p99_ms": 1e3 * s[min(len(s) - 1, int(len(s) * 0.99))],
        "max_ms": 1e3 * s[-1],
    }


class _Xgrammar:
    name = "xgrammar"
    compiled_apply = False

    def __init__(self, tokenizer_json: str, vocab_size: int, stop_ids: list[int], threads: int) -> None:
        import xgrammar as xgr
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgr
        hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json))
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)
        self.vocab_size = vocab_size

    def compile(self, schema: str) -> Any:
        return self.compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))

    def clear_cache(self) -> None:
        self.compiler.clear_cache()

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def allocate(self, batch: int) -> Any:
        return self.xgr.allocate_token_bitmask(batch, self.vocab_size)

    def fill_one(self, matcher: Any, bitmask: Any) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)

    def fill_batch(self, matchers: list[Any], bitmask: Any) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def apply(self, logits: Any, bitmask: Any) -> None:
        # CPU: its C++ kernel; CUDA: its Triton kernel, on the bitmask copied over.
        self.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def reset(self, matcher: Any) -> None:
        matcher.reset()


class _Llguidance:
    name = "llguidance"
    compiled_apply = False

    def __init__(self, tokenizer_json: str, vocab_size: int, stop_ids: list[int], threads: int) -> None:
        import llguidance
        import llguidance.torch  # noqa: F401  (fill helpers)

        self.llg = llguidance
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=stop_ids)
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.vocab_size = vocab_size
        self.grammars: dict[str, str] = {}
        self.templates: dict[str, Any] = {}

    def compile(self, schema: str) -> Any:
        # llguidance has no compiled-grammar object: the grammar text is built from the schema
        # (cached here by schema) and the lexer/parser when a matcher is made.
        grammar = self.grammars.get(schema)
        if grammar is None:
            grammar = self.llg.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False}
            )
            self.grammars[schema] = grammar
        return grammar

    def clear_cache(self) -> None:
        self.grammars.clear()
        self.templates.clear()

    def matcher(self, compiled: Any) -> Any:
        # A fresh LLMatcher rebuilds the lexer and parser (~1 ms); a deep copy of a fresh one
        # kept per grammar is what workers/structured caches.
        template = self.templates.get(compiled)
        if template is None:
            template = self.llg.LLMatcher(self.tokenizer, compiled, log_level=0)
            assert not template.is_error(), template.get_error()
            self.templates[compiled] = template
        return template.deep_copy()

    def allocate(self, batch: int) -> Any:
        return self.llg.torch.allocate_token_bitmask(batch, self.vocab_size)

    def fill_one(self, matcher: Any, bitmask: Any) -> None:
        self.llg.torch.fill_next_token_bitmask(matcher, bitmask, 0)

    def fill_batch(self, matchers: list[Any], bitmask: Any) -> None:
        self.llg.torch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def apply(self, logits: Any, bitmask: Any) -> None:
        if self.compiled_apply:  # its own apply: a torch.compile kernel (Triton on a GPU)
            self.llg.torch.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))
        else:
            _Ours.apply_to(logits, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def reset(self, matcher: Any) -> None:
        matcher.reset()


class _Ours:
    """What workers/structured ships: llguidance through GrammarCompiler / GrammarMatcher /
    MaskFiller, our apply (numpy unpack + masked_fill_). Counts our wrapper's overhead too."""

    name = "ours"
    compiled_apply = False

    def __init__(self, tokenizer_json: str, vocab_size: int, stop_ids: list[int], threads: int) -> None:
        from tokenizers import Tokenizer

        from workers.structured import GrammarCompiler, MaskFiller
        from workers.structured.vocab import vocab_from_tokenizer

        self.vocab_size = vocab_size
        self.compiler = GrammarCompiler(vocab_from_tokenizer(Tokenizer.from_str(tokenizer_json), vocab_size, stop_ids))
        self.filler = MaskFiller(threads)

    def compile(self, schema: str) -> Any:
        from dynamo.wire import OutputConstraint

        return self.compiler.compile(OutputConstraint(kind="json_schema", spec=schema))

    def clear_cache(self) -> None:
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        return compiled.matcher()

    def allocate(self, batch: int) -> Any:
        from workers.structured import allocate_bitmask

        return allocate_bitmask(batch, self.vocab_size)

    def fill_one(self, matcher: Any, bitmask: Any) -> None:
        matcher.fill_mask(bitmask, 0)

    def fill_batch(self, matchers: list[Any], bitmask: Any) -> None:
        self.filler.fill(bitmask, list(enumerate(matchers)))

    def apply(self, logits: Any, bitmask: Any) -> None:
        _Ours.apply_to(logits, bitmask)

    _maskers: dict[int, Any] = {}

    @staticmethod
    def apply_to(logits: Any, bitmask: Any) -> None:
        """workers/structured/logits.py's apply of a filled bitmask to every row."""
        import numpy as np

        from workers.structured.logits import LogitsMasker

        vocab = logits.shape[-1]
        masker = _Ours._maskers.get(vocab)
        if masker is None:
            masker = _Ours._maskers[vocab] = LogitsMasker(vocab, num_threads=1)
        words = bitmask if isinstance(bitmask, np.ndarray) else bitmask.numpy()
        masker.apply_bitmask(logits, words, range(logits.shape[0]))

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept(token)

    def reset(self, matcher: Any) -> None:
        matcher.reset()


def _apply_torch_shift(logits: Any, bitmask: Any) -> None:
    """Pure-torch apply (shift and and), for comparison."""
    import numpy as np
    import torch

    if isinstance(bitmask, np.ndarray):
        bitmask = torch.from_numpy(bitmask)
    bitmask = bitmask.to(logits.device, non_blocking=True)
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    logits.masked_fill_(bits.view(bitmask.shape[0], -1)[:, :vocab] == 0, float("-inf"))


def _check_costs(schema: str) -> dict[str, Any]:
    """workers.structured.check_constraint (the frontend's pre-routing check), per kind."""
    from dynamo.wire import OutputConstraint
    from workers.structured import check_constraint

    cases = {
        "json_schema": OutputConstraint(kind="json_schema", spec=schema),
        "json_object": OutputConstraint(kind="json_object"),
        "regex": OutputConstraint(kind="regex", spec=r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)"),
        "choice": OutputConstraint(kind="choice", spec=json.dumps(["red", "green", "blue"])),
        "grammar": OutputConstraint(kind="grammar", spec='root ::= item ("," item)*\nitem ::= [a-z]+ "=" [0-9]+'),
    }
    out = {}
    for name, constraint in cases.items():
        check_constraint(constraint)
        samples = []
        for _ in range(50):
            t0 = time.perf_counter()
            check_constraint(constraint)
            samples.append(time.perf_counter() - t0)
        out[name] = _stats_ms(samples)
    return out


def run_side(lib: str, tokenizer_path: str, vocab_size: int, stop_ids: list[int], steps_b32: int, threads: int,
             compiled_apply: bool = False, device: str = "cpu") -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer

    torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tokenizer_json = Path(tokenizer_path).read_text()
    tok = Tokenizer.from_str(tokenizer_json)
    doc_ids = tok.encode(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False).ids
    schema = json.dumps(SCHEMA)
    out: dict[str, Any] = {"lib": lib, "vocab_size": vocab_size, "doc_tokens": len(doc_ids)}

    started = time.perf_counter()
    sides: dict[str, Any] = {"xgrammar": _Xgrammar, "llguidance": _Llguidance, "ours": _Ours}
    side = sides[lib](tokenizer_json, vocab_size, stop_ids, threads)
    side.compiled_apply = compiled_apply
    out["tokenizer_setup_ms"] = 1e3 * (time.perf_counter() - started)

    # Compile: cold (a schema the compiler has not seen; a fresh variant each time so no cache
    # helps), cached (the same schema again), each followed by creating one matcher.
    cold, cold_matcher, hit = [], [], []
    for i in range(5):
        variant = dict(SCHEMA, description=f"variant {i}")  # new text, same language
        s = json.dumps(variant)
        t0 = time.perf_counter()
        compiled = side.compile(s)
        t1 = time.perf_counter()
        side.matcher(compiled)
        t2 = time.perf_counter()
        cold.append(t1 - t0)
        cold_matcher.append(t2 - t0)
        t0 = time.perf_counter()
        side.matcher(side.compile(s))
        hit.append(time.perf_counter() - t0)
    out["compile_cold"] = _stats_ms(cold)
    out["compile_cold_plus_matcher"] = _stats_ms(cold_matcher)
    out["cached_compile_plus_matcher"] = _stats_ms(hit)

    if lib == "ours":
        out["check_constraint"] = _check_costs(schema)

    compiled = side.compile(schema)
    # Batch 1: walk the document.
    matcher = side.matcher(compiled)
    bitmask = side.allocate(1)
    logits = torch.randn(1, vocab_size, device=dev)
    fill, apply, accept = [], [], []
    for _ in range(3):
        side.reset(matcher)
        for token in doc_ids:
            t0 = time.perf_counter()
            side.fill_one(matcher, bitmask)
            t1 = time.perf_counter()
            side.apply(logits, bitmask)
            sync()
            t2 = time.perf_counter()
            ok = side.accept(matcher, token)
            t3 = time.perf_counter()
            assert ok, f"{lib} rejected a token of the valid instance"
            fill.append(t1 - t0)
            apply.append(t2 - t1)
            accept.append(t3 - t2)
    out["b1"] = {"fill": _stats_ms(fill), "apply": _stats_ms(apply), "accept": _stats_ms(accept),
                 "fill_plus_apply": _stats_ms([a + b for a, b in zip(fill, apply)])}

    # Batch 32: staggered positions; a matcher that reaches the end starts over.
    batch = 32
    matchers = [side.matcher(compiled) for _ in range(batch)]
    positions = [(i * len(doc_ids)) // batch for i in range(batch)]
    for m, p in zip(matchers, positions):
        for token in doc_ids[:p]:
            assert side.accept(m, token)
    bitmask = side.allocate(batch)
    logits = torch.randn(batch, vocab_size, device=dev)
    fill, apply, accept = [], [], []
    for step in range(-5, steps_b32):  # 5 warm-up steps
        t0 = time.perf_counter()
        side.fill_batch(matchers, bitmask)
        t1 = time.perf_counter()
        side.apply(logits, bitmask)
        sync()
        t2 = time.perf_counter()
        for i, m in enumerate(matchers):
            assert side.accept(m, doc_ids[positions[i]])
            positions[i] += 1
            if positions[i] == len(doc_ids):
                side.reset(m)
                positions[i] = 0
        t3 = time.perf_counter()
        if step >= 0:
            fill.append(t1 - t0)
            apply.append(t2 - t1)
            accept.append(t3 - t2)
    out["b32"] = {"fill": _stats_ms(fill), "apply": _stats_ms(apply), "accept_all": _stats_ms(accept),
                  "fill_plus_apply": _stats_ms([a + b for a, b in zip(fill, apply)])}

    # The apply variants on the same bitmask (the library's own where it has one).
    variants: dict[str, Any] = {"ours": _Ours.apply_to, "torch_shift": _apply_torch_shift}
    if lib == "xgrammar":
        variants["xgrammar_kernel"] = side.apply
    if lib == "llguidance" and compiled_apply:
        variants["llguidance_compiled"] = side.apply
    for name, fn in variants.items():
        fn(logits, bitmask)
        samples = []
        for _ in range(30):
            t0 = time.perf_counter()
            fn(logits, bitmask)
            sync()
            samples.append(time.perf_counter() - t0)
        out.setdefault("apply_b32_variants", {})[name] = _stats_ms(samples)
    # The floor an unconstrained greedy sampler pays anyway: argmax over the same logits.
    samples = []
    for _ in range(30):
        t0 = time.perf_counter()
        logits.argmax(dim=-1).tolist()
        samples.append(time.perf_counter() - t0)
    out["argmax_b32"] = _stats_ms(samples)
    return out


# --- driver ------------------------------------------------------------------------------------


def _stop_ids(tokenizer_path: Path) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    for name in ("<|im_end|>", "<|endoftext|>"):
        token = tok.token_to_id(name)
        if token is not None:
            return [token]
    raise SystemExit(f"no stop token in {tokenizer_path}")


def _vocab_size(tokenizer_path: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_path)).get_vocab_size(with_added_tokens=True)


def _merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds of every numeric leaf."""

    def walk(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            return {k: walk([v[k] for v in values]) for k in first}
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            return statistics.median(values)
        return first

    return walk(rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--libs", default="xgrammar,llguidance,ours", help="ours: workers/structured (llguidance + our apply)")
    ap.add_argument("--device", default="cpu", help="where the logits live (cuda: the apply runs there)")
    ap.add_argument("--compiled-apply", action="store_true", help="also time llguidance's torch.compile apply (slow to compile)")
    ap.add_argument("--work-dir", default="/tmp/grammar_mask_cost")
    ap.add_argument("--large-vocab", type=int, default=150_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps-b32", type=int, default=200)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json-out")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: lib,tokenizer,vocab,stop_ids
    args = ap.parse_args()

    if args.side:
        lib, path, vocab, stops = args.side.split(",", 3)
        result = run_side(lib, path, int(vocab), json.loads(stops), args.steps_b32, args.threads, args.compiled_apply, args.device)
        print(json.dumps(result))
        return

    large = Path(args.work_dir) / f"bpe{args.large_vocab}.json"
    if not large.is_file():
        print(f"training a {args.large_vocab}-token byte-level BPE into {large} ...", file=sys.stderr)
        print(f"  {build_large_tokenizer(large, args.large_vocab):.1f} s", file=sys.stderr)
    vocabs = {
        "dynamo-tiny (8,192)": (REPO / "models/dynamo-tiny/tokenizer.json", 8192),
        f"bpe-{args.large_vocab // 1000}k": (large, _vocab_size(large)),
    }
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rnd in range(args.rounds):
        for vocab_name, (path, vocab_size) in vocabs.items():
            for lib in args.libs.split(","):
                side = f"{lib},{path},{vocab_size},{json.dumps(_stop_ids(path))}"
                proc = subprocess.run(
                    [sys.executable, __file__, "--side", side, "--steps-b32", str(args.steps_b32), "--threads", str(args.threads)]
                    + (["--compiled-apply"] if args.compiled_apply else []) + ["--device", args.device],
                    capture_output=True, text=True, check=False, cwd=REPO,
                    env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
                )
                if proc.returncode != 0:
                    raise SystemExit(f"{lib} on {vocab_name} failed:\n{proc.stderr}")
                results.setdefault(vocab_name, {}).setdefault(lib, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"round {rnd} {vocab_name} {lib} done", file=sys.stderr)

    import llguidance

    try:
        xgrammar_version: str | None = version("xgrammar")
    except PackageNotFoundError:
        xgrammar_version = None
    merged = {v: {lib: _merge(runs) for lib, runs in by_lib.items()} for v, by_lib in results.items()}
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_end": os.getloadavg()},
        "versions": {"xgrammar": xgrammar_version, "llguidance": llguidance.__version__},
        "threads": args.threads,
        "device": args.device,
        "rounds": args.rounds,
        "results": merged,
    }
    for vocab_name, by_lib in merged.items():
        print(f"\n{vocab_name}")
        print("| lib | setup s | compile cold ms | +matcher | cached+matcher ms | b1 fill ms | b1 fill+apply ms (p99) | b1 accept ms "
              "| b32 fill ms (p99) | b32 apply | b32 fill+apply (p99) | b32 apply p50: ours / torch shift / lib kernel | argmax b32 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for lib, r in by_lib.items():
            v = r["apply_b32_variants"]
            kernel = f"{v['xgrammar_kernel']['p50_ms']:.2f}" if "xgrammar_kernel" in v else "-"
            if "llguidance_compiled" in v:
                kernel = f"{v['llguidance_compiled']['p50_ms']:.2f} (llguidance compiled)"
            print(
                f"| {lib} | {r['tokenizer_setup_ms'] / 1e3:.2f} | {r['compile_cold']['p50_ms']:.2f} | {r['compile_cold_plus_matcher']['p50_ms']:.2f} "
                f"| {r['cached_compile_plus_matcher']['p50_ms']:.3f} | {r['b1']['fill']['mean_ms']:.3f} "
                f"| {r['b1']['fill_plus_apply']['mean_ms']:.3f} ({r['b1']['fill_plus_apply']['p99_ms']:.3f}) "
                f"| {r['b1']['accept']['mean_ms']:.4f} "
                f"| {r['b32']['fill']['mean_ms']:.2f} ({r['b32']['fill']['p99_ms']:.2f}) | {r['b32']['apply']['mean_ms']:.2f} "
                f"| {r['b32']['fill_plus_apply']['mean_ms']:.2f} ({r['b32']['fill_plus_apply']['p99_ms']:.2f}) "
                f"| {v['ours']['p50_ms']:.2f} / {v['torch_shift']['p50_ms']:.2f} / {kernel} | {r['argmax_b32']['p50_ms']:.2f} |"
            )
        ours = by_lib.get("ours")
        if ours and "check_constraint" in ours:
            costs = ", ".join(f"{k} {v['p50_ms']:.3f} ms" for k, v in ours["check_constraint"].items())
            print(f"check_constraint p50: {costs}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
