"""The built-in engine's model runner on one GPU (or CPU): decode tokens/s at several batch sizes
and prefill tokens/s, beside transformers' `generate` on the same weights and the HBM floor.

GPU: python benchmarks/builtin_gpu.py --out results.json   (random ~1B Llama, bf16, no download)
CPU: python benchmarks/builtin_gpu.py --device cpu --model models/dynamo-tiny --batches 1 16
Imports only torch-level modules (no asyncio engine, no msgspec), so it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.builtin.attention import SdpaPagedAttention, SeqSlice, TritonPagedAttention  # noqa: E402
from workers.builtin.config import ModelConfig, load_model_config  # noqa: E402
from workers.builtin.kv_cache import KVCache  # noqa: E402
from workers.builtin.loader import load_model  # noqa: E402
from workers.builtin.model import LlamaForCausalLM  # noqa: E402
from workers.builtin.runner import ModelRunner, StepInput  # noqa: E402
from workers.builtin.sampling import SampleRow, SamplingParams  # noqa: E402

GREEDY = SampleRow(SamplingParams(), None)
BLOCK = 16
SHAPE: dict[str, Any] = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int = 4 << 30) -> float:
    """Device-to-device copy, bytes read plus written per second (median of 10)."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def random_llama(device: torch.device) -> tuple[Any, ModelConfig]:
    """transformers' Llama with random bf16 weights, and our config of the same shape."""
    import transformers

    # rope_theta: the config's typed fields lack it, but its __init__ takes it (transformers 5
    # moves it into rope_parameters).
    cfg = transformers.LlamaConfig(  # type: ignore[call-arg]
        **SHAPE, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        # PreTrainedModel.to is typed through functools.wraps(Module.to), as if unbound.
        hf = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()  # type: ignore[arg-type]
    assert cfg.num_key_value_heads is not None  # filled in from num_attention_heads when not given
    mc = ModelConfig(
        model_dir=Path("."), architecture="LlamaForCausalLM", vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads, head_dim=SHAPE["head_dim"],
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=500000.0,  # transformers 5 keeps it under rope_parameters
    )
    return hf, mc


def ours_from_hf(hf: Any, mc: ModelConfig, device: torch.device) -> LlamaForCausalLM:
    backend = TritonPagedAttention() if device.type == "cuda" else SdpaPagedAttention()
    with torch.device("meta"):
        model = LlamaForCausalLM(mc, backend)
    model = model.to_empty(device=device).to(torch.bfloat16)
    model.rotary.build(device)
    src = hf.state_dict()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if ".qkv_proj." in name:
                pre = name.replace("qkv_proj", "{}")
                p.copy_(torch.cat([src[pre.format(x)] for x in ("q_proj", "k_proj", "v_proj")]))
            elif ".gate_up_proj." in name:
                pre = name.replace("gate_up_proj", "{}")
                p.copy_(torch.cat([src[pre.format(x)] for x in ("gate_proj", "up_proj")]))
            else:
                p.copy_(src[name])
    return model.eval()


def weight_bytes_per_step(model: LlamaForCausalLM) -> int:
    """Bytes a decode step must read: every weight but the embedding (only gathered rows)."""
    embed = model.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


class Sequences:
    """Prompts with fixed block tables, driven step by step through a runner."""

    def __init__(self, batch: int, prompt_len: int, max_len: int, vocab: int, first_block: int = 0) -> None:
        g = torch.Generator().manual_seed(batch)
        self.tokens = [torch.randint(2, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
        per_seq = -(-max_len // BLOCK)
        self.tables = [list(range(first_block + i * per_seq, first_block + (i + 1) * per_seq)) for i in range(batch)]

    def prefill(self, runner: ModelRunner, budget: int = 8192) -> None:
        i = 0
        while i < len(self.tokens):
            group: list[int] = []
            while i < len(self.tokens) and (not group or (len(group) + 1) * len(self.tokens[i]) <= budget):
                group.append(i)
                i += 1
            ids = [t for j in group for t in self.tokens[j]]
            pos = [p for j in group for p in range(len(self.tokens[j]))]
            slices = [SeqSlice(0, len(self.tokens[j]), self.tables[j]) for j in group]
            ends, n = [], 0
            for j in group:
                n += len(self.tokens[j])
                ends.append(n - 1)
            out = runner.execute(StepInput(ids, pos, slices, ends, [GREEDY] * len(group)))
            for j, t in zip(group, out.token_ids):
                self.tokens[j].append(t)

    def decode_overlapped(self, runner: ModelRunner, steps: int) -> None:
        """`steps` decode steps, each launched before the previous one's tokens are read: its
        inputs are placeholders for them (StepInput), read on the device, as the engine's
        overlap loop does."""
        seqs = self.tokens
        n = len(seqs)
        rows, indices = [GREEDY] * n, list(range(n))
        placeholders = [-1 - i for i in range(n)]
        launched = None
        for _ in range(steps):
            if launched is None:
                ids, pos = [s[-1] for s in seqs], [len(s) - 1 for s in seqs]
            else:  # the token in flight sits at position len(s)
                ids, pos = placeholders, [len(s) for s in seqs]
            slices = [SeqSlice(p, 1, t) for p, t in zip(pos, self.tables)]
            nxt = runner.launch(StepInput(ids, pos, slices, indices, rows))
            if launched is not None:
                for s, t in zip(seqs, runner.collect(launched).token_ids):
                    s.append(t)
            launched = nxt
        assert launched is not None
        for s, t in zip(seqs, runner.collect(launched).token_ids):
            s.append(t)

    def decode(self, runner: ModelRunner) -> None:
        seqs = self.tokens
        slices = [SeqSlice(len(s) - 1, 1, t) for s, t in zip(seqs, self.tables)]
        out = runner.execute(StepInput(
            [s[-1] for s in seqs], [len(s) - 1 for s in seqs], slices, list(range(len(seqs))), [GREEDY] * len(seqs),
        ))
        for s, t in zip(seqs, out.token_ids):
            s.append(t)


def bench_decode(runner: ModelRunner, batch: int, prompt_len: int, steps: int, vocab: int, device: torch.device) -> dict[str, float]:
    seqs = Sequences(batch, prompt_len, prompt_len + steps + 8, vocab)
    seqs.prefill(runner)
    for _ in range(3):
        seqs.decode(runner)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        seqs.decode(runner)
    elapsed = time.perf_counter() - start
    return {"tok_s": batch * steps / elapsed, "step_ms": 1e3 * elapsed / steps}


def bench_decode_overlapped(runner: ModelRunner, batch: int, prompt_len: int, steps: int, vocab: int, device: torch.device) -> dict[str, float]:
    seqs = Sequences(batch, prompt_len, prompt_len + steps + 8, vocab)
    seqs.prefill(runner)
    for _ in range(3):
        seqs.decode(runner)
    sync(device)
    start = time.perf_counter()
    seqs.decode_overlapped(runner, steps)
    elapsed = time.perf_counter() - start
    return {"tok_s": batch * steps / elapsed, "step_ms": 1e3 * elapsed / steps}


def replay_ms(runner: ModelRunner, batch: int) -> float:
    """GPU time of one decode graph replay, back to back (no host work between): the step time
    less what the host adds (input prep, sampling, the per-step sync)."""
    graphs = runner.graphs
    if graphs is None or graphs.bucket(batch) is None or not graphs.use_graphs:
        return float("nan")
    graph, _ = graphs._graphs[graphs.bucket(batch) or 0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 50


def bench_prefill(runner: ModelRunner, num_seqs: int, prompt_len: int, vocab: int, device: torch.device) -> dict[str, float]:
    times = []
    for rep in range(6):
        seqs = Sequences(num_seqs, prompt_len, prompt_len + 1, vocab)
        sync(device)
        start = time.perf_counter()
        seqs.prefill(runner, budget=num_seqs * prompt_len)
        sync(device)
        if rep:
            times.append(time.perf_counter() - start)
    t = statistics.median(times)
    return {"tok_s": num_seqs * prompt_len / t, "step_ms": 1e3 * t}


def bench_hf(hf: Any, batch: int, prompt_len: int, steps: int, vocab: int, device: torch.device) -> dict[str, float]:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(2, vocab, (batch, prompt_len), generator=g).to(device)

    def gen(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - start

    gen(4)
    # generate(steps + 1) minus generate(1): the prefill and first token cancel out.
    t = min(gen(steps + 1) for _ in range(2)) - min(gen(1) for _ in range(2))
    return {"tok_s": batch * steps / t, "step_ms": 1e3 * t / steps}


def bench_hf_prefill(hf: Any, num_seqs: int, prompt_len: int, vocab: int, device: torch.device) -> dict[str, float]:
    ids = torch.randint(2, vocab, (num_seqs, prompt_len)).to(device)
    times = []
    with torch.no_grad():
        for rep in range(6):
            sync(device)
            start = time.perf_counter()
            hf(ids, use_cache=False, logits_to_keep=1)
            sync(device)
            if rep:
                times.append(time.perf_counter() - start)
    t = statistics.median(times)
    return {"tok_s": num_seqs * prompt_len / t, "step_ms": 1e3 * t}


def check_logits(hf: Any, runner: ModelRunner, vocab: int, device: torch.device) -> dict[str, float]:
    """Our last-token logits (prefill 63 tokens, then one decode step through the runner's graph
    path) against transformers' over all 64: ‖ours − hf‖ / ‖hf‖, and greedy agreement. The
    prefill's logits too, with the reference's top-2 margin over its logits' spread: with random
    weights the top logits can be near-tied, and then a greedy mismatch says nothing."""
    seqs = Sequences(1, 63, 72, vocab, first_block=0)
    prompt = list(seqs.tokens[0])
    with torch.inference_mode():
        # The prompt through the eager model first: it writes the same KV the runner's prefill then rewrites.
        meta = runner.backend.build_metadata([SeqSlice(0, 63, seqs.tables[0])], BLOCK, device)
        h = runner.model(torch.tensor(prompt, device=device), torch.arange(63, device=device), runner.kv, meta)
        ours_prefill = runner.model.compute_logits(h[-1:])[0].float()
    seqs.prefill(runner)  # appends token 64 (ours)
    tokens = seqs.tokens[0]
    graphs = runner.graphs
    slices = [SeqSlice(63, 1, seqs.tables[0])]
    with torch.inference_mode():
        if graphs is not None:
            ours = graphs.run([tokens[63]], slices, graphs.bucket(1) or 1)[0].float()
        else:
            meta = runner.backend.build_metadata(slices, BLOCK, device)
            h = runner.model(torch.tensor([tokens[63]], device=device), torch.tensor([63], device=device), runner.kv, meta)
            ours = runner.model.compute_logits(h)[0].float()
        ref = hf(torch.tensor([prompt + [tokens[63]]], device=device)).logits[0, -1].float()
        ref_prefill = hf(torch.tensor([prompt], device=device)).logits[0, -1].float()
    top2 = ref_prefill.topk(2).values
    return {
        "decode_logits_rel_err": float((ours - ref).norm() / ref.norm()),
        "prefill_logits_rel_err": float((ours_prefill - ref_prefill).norm() / ref_prefill.norm()),
        "prefill_hf_top2_margin_over_std": float((top2[0] - top2[1]) / ref_prefill.std()),
        "prefill_greedy_matches_hf": float(int(ref_prefill.argmax()) == tokens[63]),
        "decode_greedy_matches_hf": float(int(ours.argmax()) == int(ref.argmax())),
    }


def check_overlapped(runner: ModelRunner, vocab: int, batch: int = 8, steps: int = 16) -> float:
    """Greedy tokens of the overlapped decode loop (placeholders read on the device) equal the
    plain loop's."""
    runs = []
    for overlapped in (False, True):
        seqs = Sequences(batch, 40, 40 + steps + 8, vocab)
        seqs.prefill(runner)
        if overlapped:
            seqs.decode_overlapped(runner, steps)
        else:
            for _ in range(steps):
                seqs.decode(runner)
        runs.append(seqs.tokens)
    return float(runs[0] == runs[1])


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    if args.smoke:  # the GPU run's code path on CPU, tiny shape, for checking the script itself
        device = torch.device("cpu")
        SHAPE.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        res: dict[str, Any] = {"device": "cpu (smoke)", "copy_bw_GBs": 10.0}
    else:
        device = torch.device("cuda")
        res = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
        res["copy_bw_GBs"] = measure_bandwidth(device) / 1e9
    import transformers

    res["transformers"] = transformers.__version__
    hf, mc = random_llama(device)
    model = ours_from_hf(hf, mc, device)
    wbytes = weight_bytes_per_step(model)
    res["params"] = sum(p.numel() for p in model.parameters())
    res["weight_bytes_per_step"] = wbytes
    res["floor_ms_measured_bw"] = 1e3 * wbytes / (res["copy_bw_GBs"] * 1e9)
    res["floor_ms_spec_3350"] = 1e3 * wbytes / 3.35e12
    max_len = 4096
    kv = KVCache.allocate(mc, args.num_blocks, BLOCK, torch.bfloat16, device)
    started = time.perf_counter()
    graphed = ModelRunner(model, kv, device, enforce_eager=False, max_num_seqs=max(args.batches), max_model_len=max_len)
    res["graph_capture_s"] = time.perf_counter() - started
    eager = ModelRunner(model, kv, device, enforce_eager=True)
    from workers.builtin import gpu_kernels

    # Variants of the decode graphs, each captured by a runner of its own in this process
    # (a module setting read at capture time, restored after).
    variant_errors: dict[str, str] = {}
    res["variant_errors"] = variant_errors

    def variant(name: str, value: Any, *more: tuple[str, Any]) -> ModelRunner | None:
        settings = [(name, value), *more]
        saved = [(n, getattr(gpu_kernels, n)) for n, _ in settings]
        label = ";".join(f"{n}={v!r}" for n, v in settings)
        for n, v in settings:
            setattr(gpu_kernels, n, v)
        try:
            return ModelRunner(model, kv, device, enforce_eager=False, max_num_seqs=max(args.batches), max_model_len=max_len)
        except Exception as exc:  # a variant that does not compile must not lose the others' figures
            variant_errors[label] = f"{type(exc).__name__}: ...{str(exc)[-1500:]}"  # Triton's cause is last
            print("variant failed", label, variant_errors[label], flush=True)
            return None
        finally:
            for n, v in saved:
                setattr(gpu_kernels, n, v)

    variants: dict[str, ModelRunner | None] = {}
    if args.compare_unfused:  # RoPE and the K/V write in a kernel of their own
        variants["unfused"] = variant("DECODE_FUSED_ROPE", False)
    for spec in args.compare_setting:  # "NAME=VALUE[;NAME=VALUE...]": gpu_kernels settings, Python literals
        settings = [(n, ast.literal_eval(v)) for n, _, v in (part.partition("=") for part in spec.split(";"))]
        variants[spec] = variant(*settings[0], *settings[1:])
    for spec in args.compare_split_k:  # "QKV,O[,DOWN]": K slices of the projections, every batch
        parts = [int(p) for p in spec.split(",")]
        split = dict(zip(("qkv", "o", "down"), parts))
        variants["split_k_" + "_".join(map(str, parts))] = variant("DECODE_SPLIT_K", [(1 << 20, split)])
    for spec in args.compare_decode_tiles:  # "BLOCK_N,WARPS,STAGES": the decode kernel's tiling, every batch
        block_n, warps, stages = (int(p) for p in spec.split(","))
        tiling = gpu_kernels.DecodeTiling(block_n, warps, stages)
        variants[f"tiles_{block_n}_{warps}_{stages}"] = variant("DECODE_TILES", [(1 << 30, tiling)])
    if args.skinny_sweep and device.type == "cuda":
        try:
            res["skinny_sweep"], table = sweep_skinny(mc, device, args.batches)
        except Exception as exc:  # the sweep's failure must not lose the run's other figures
            variant_errors["skinny_sweep"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
            table = []
        res["skinny_table"] = repr(table)
        print("skinny table", table, flush=True)
        if any(chosen for _, chosen in table):
            variants["triton_products"] = variant("DECODE_TRITON", table)
            gate_up_only = [(m, {p: t for p, t in chosen.items() if p == "gate_up"}) for m, chosen in table]
            if any(chosen for _, chosen in gate_up_only) and gate_up_only != table:
                variants["triton_gate_up_only"] = variant("DECODE_TRITON", gate_up_only)
    res["decode_split_k"] = repr(gpu_kernels.DECODE_SPLIT_K)
    res["decode_tiles"] = repr(gpu_kernels.DECODE_TILES)
    res["check"] = check_logits(hf, graphed, mc.vocab_size, device)
    res["check"]["overlapped_tokens_equal_plain"] = check_overlapped(graphed, mc.vocab_size, min(8, max(args.batches)))
    print("check", res["check"], flush=True)
    res["decode"] = {}
    for b in args.batches:
        row: dict[str, Any] = {}
        row["ours_graphs"] = bench_decode(graphed, b, args.prompt_len, args.steps, mc.vocab_size, device)
        row["ours_graphs_overlapped"] = bench_decode_overlapped(graphed, b, args.prompt_len, args.steps, mc.vocab_size, device)
        # Replays the last step's inputs again: rewrites the same slots, harmless.
        row["ours_graph_replay_ms"] = replay_ms(graphed, b) if device.type == "cuda" else float("nan")
        if variants:
            # Each replay right after its runner's own timed steps: the static inputs then hold
            # a real step (a fresh runner's hold padding, which reads no KV).
            row["variants"] = {}
            for label, runner in variants.items():
                if runner is None:
                    continue
                step = bench_decode_overlapped(runner, b, args.prompt_len, args.steps, mc.vocab_size, device)["step_ms"]
                row["variants"][label] = {"overlapped_step_ms": step, "replay_ms": replay_ms(runner, b)}
            row["ours_graphs_overlapped_again"] = bench_decode_overlapped(graphed, b, args.prompt_len, args.steps, mc.vocab_size, device)
            row["ours_graph_replay_ms_again"] = replay_ms(graphed, b)
        if not args.no_reference:
            row["ours_eager"] = bench_decode(eager, b, args.prompt_len, args.steps, mc.vocab_size, device)
            try:
                row["hf_generate"] = bench_hf(hf, b, args.prompt_len, args.steps, mc.vocab_size, device)
            except Exception as exc:  # a reference failing must not lose our numbers
                row["hf_generate"] = {"error": repr(exc)}
        row["roofline_pct"] = 100 * res["floor_ms_measured_bw"] / row["ours_graphs"]["step_ms"]
        # The goal's floor: weights plus the KV bytes a step reads, at the timed steps' mean
        # context (prompt, first token, 3 warm-up steps, half the timed ones).
        ctx = args.prompt_len + 4 + args.steps / 2
        row["floor_ms_with_kv"] = 1e3 * (wbytes + b * ctx * kv_bytes_per_token(mc)) / (res["copy_bw_GBs"] * 1e9)
        for key in ("ours_graphs", "ours_graphs_overlapped", "ours_graphs_overlapped_again"):
            if key in row:
                row[f"pct_of_floor_with_kv_{key}"] = 100 * row["floor_ms_with_kv"] / row[key]["step_ms"]
        for v in row.get("variants", {}).values():
            v["pct_of_floor"] = 100 * row["floor_ms_with_kv"] / v["overlapped_step_ms"]
        res["decode"][str(b)] = row
        print(b, row, flush=True)
    res["matmul_bf16_TFLOPs"] = matmul_peak(device) / 1e12 if device.type == "cuda" else float("nan")
    res["prefill"] = {}

    def timed_prefill(runner: ModelRunner, n: int, length: int) -> dict[str, float]:
        r = bench_prefill(runner, n, length, mc.vocab_size, device)
        r["pct_of_matmul_peak"] = 100 * prefill_flops(mc, wbytes, n, length) / (r["step_ms"] / 1e3) / (res["matmul_bf16_TFLOPs"] * 1e12)
        return r

    for n, length in ((args.prefill_seqs, args.prefill_len), (16, 512)):
        res["prefill"][f"ours_{n}x{length}"] = timed_prefill(eager, n, length)
    if args.compare_prefill_graphs and device.type == "cuda":
        # The same shapes through prefill CUDA graphs (workers/builtin/prefill_graphs.py), a runner of their own.
        shapes = ((args.prefill_seqs, args.prefill_len), (16, 512))
        started = time.perf_counter()
        graphed_prefill = ModelRunner(model, kv, device, enforce_eager=False,
                                      max_num_seqs=max(*args.batches, *(n for n, _ in shapes)),
                                      max_model_len=max_len, prefill_graph_tokens=max(n * m for n, m in shapes))
        assert graphed_prefill.prefill_graphs is not None
        res["prefill_graph_capture_s"] = time.perf_counter() - started
        for n, length in shapes:
            res["prefill"][f"graphs_{n}x{length}"] = timed_prefill(graphed_prefill, n, length)
        for n, length in shapes:  # eager again, after: both sides of the comparison see the same machine
            res["prefill"][f"ours_{n}x{length}_again"] = timed_prefill(eager, n, length)
    if not args.no_reference:
        res["prefill"]["hf_forward"] = bench_hf_prefill(hf, args.prefill_seqs, args.prefill_len, mc.vocab_size, device)
    print("prefill", res["prefill"], flush=True)
    return res


def matmul_peak(device: torch.device, n: int = 8192) -> float:
    """bf16 dense peak on random data: an n x n x n product, median of 10 (FLOP/s)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times)


def kv_bytes_per_token(mc: ModelConfig) -> int:
    return 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 2  # K and V, bf16


def profile_step(runner: ModelRunner, batch: int, prompt_len: int, vocab: int, device: torch.device) -> dict[str, Any]:
    """Where a graphed decode step's time goes: per-kernel GPU time of the same step run
    eagerly over the static buffers, the graph replay alone, and the host stages of execute."""
    graphs = runner.graphs
    assert graphs is not None
    seqs = Sequences(batch, prompt_len, prompt_len + 64, vocab)
    seqs.prefill(runner)
    for _ in range(4):
        seqs.decode(runner)
    bucket = graphs.bucket(batch) or batch
    out: dict[str, Any] = {"replay_ms": replay_ms(runner, batch)}
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(3):
            graphs._forward(bucket)
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graphs._forward(bucket)
            sync(device)
    kernels = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if dev_us and ev.count:
            kernels.append((dev_us / 5, ev.count / 5, ev.key[:70]))
    kernels.sort(reverse=True)
    out["kernel_us_per_step"] = sum(k[0] for k in kernels)
    out["kernels"] = [{"us": round(k[0], 1), "n": k[1], "name": k[2]} for k in kernels[:14]]
    # Host stages of one step (nothing queued before each, so host time is what is timed).
    rows = [GREEDY] * batch
    slices = [SeqSlice(len(s) - 1, 1, t) for s, t in zip(seqs.tokens, seqs.tables)]
    ids = [s[-1] for s in seqs.tokens]
    stages: dict[str, list[float]] = {"fill": [], "replay_launch": [], "sample_host": [], "tolist_wait": []}
    with torch.inference_mode():
        for _ in range(20):
            sync(device)
            t0 = time.perf_counter()
            graphs.inputs.fill(ids, slices, bucket, BLOCK)
            t1 = time.perf_counter()
            graph, logits = graphs._graphs[bucket]
            graph.replay()
            t2 = time.perf_counter()
            sync(device)
            t3 = time.perf_counter()
            res = runner.sampler.sample(logits[:batch], rows)
            t4 = time.perf_counter()
            stages["fill"].append(t1 - t0)
            stages["replay_launch"].append(t2 - t1)
            stages["sample_host"].append(t4 - t3)
            del res
    out["host_us"] = {k: round(1e6 * statistics.median(v), 1) for k, v in stages.items() if v}
    return out


def ncu_step(args: argparse.Namespace, batch: int) -> None:
    """One decode step of `batch` rows run eagerly over the graphs' static buffers, between
    cudaProfilerStart and Stop, for Nsight Compute: `ncu --profile-from-start off --kernel-name
    regex:paged_decode --launch-count 1 --set full python3 benchmarks/builtin_gpu.py --ncu-step 128`."""
    device = torch.device("cuda")
    hf, mc = random_llama(device)
    model = ours_from_hf(hf, mc, device)
    del hf
    kv = KVCache.allocate(mc, args.num_blocks, BLOCK, torch.bfloat16, device)
    runner = ModelRunner(model, kv, device, enforce_eager=False, max_num_seqs=batch, max_model_len=4096)
    graphs = runner.graphs
    assert graphs is not None
    seqs = Sequences(batch, args.prompt_len, args.prompt_len + 64, mc.vocab_size)
    seqs.prefill(runner)
    for _ in range(4):
        seqs.decode(runner)
    bucket = graphs.bucket(batch) or batch
    with torch.inference_mode():
        graphs._forward(bucket)
        sync(device)
        torch.cuda.cudart().cudaProfilerStart()
        graphs._forward(bucket)
        sync(device)
        torch.cuda.cudart().cudaProfilerStop()


def sweep_attention(mc: ModelConfig, device: torch.device, batch: int, ctx: int) -> list[dict[str, Any]]:
    """The paged decode kernel's time per tiling, at `batch` sequences of `ctx` tokens with
    scattered blocks; GB/s counts the K/V bytes read."""
    import triton
    from workers.builtin import gpu_kernels

    per_seq = -(-ctx // BLOCK)
    num_blocks = batch * per_seq + 1
    k = torch.randn(num_blocks, BLOCK, mc.num_kv_heads, mc.head_dim, dtype=torch.bfloat16, device=device)
    v = torch.randn_like(k)
    tables = torch.randperm(num_blocks - 1, device=device)[: batch * per_seq].view(batch, per_seq).int()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, mc.num_heads, mc.head_dim, dtype=torch.bfloat16, device=device)
    ref = gpu_kernels.paged_decode_attention(q, k, v, tables, lens, 0.125)
    nbytes = 2 * batch * ctx * mc.num_kv_heads * mc.head_dim * 2
    out = []
    for heads_first in (False, True):
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3):
                    tiling = {"block_n": block_n, "warps": warps, "stages": stages, "heads_first": heads_first}
                    try:
                        f = lambda: gpu_kernels.paged_decode_attention(  # noqa: E731
                            q, k, v, tables, lens, 0.125, None, block_n, warps, stages, heads_first)
                        err = float((f().float() - ref.float()).norm() / ref.float().norm())
                        ms = triton.testing.do_bench(f, warmup=5, rep=20, return_mode="median")
                        out.append({**tiling, "us": round(1e3 * ms, 2), "GBs": round(nbytes / ms / 1e6), "err": err})
                    except Exception as exc:  # a tiling that does not compile
                        out.append({**tiling, "error": repr(exc)[:80]})
    out.sort(key=lambda r: r.get("us", 1e9))
    return out


def sweep_gemv(mc: ModelConfig, device: torch.device) -> list[dict[str, Any]]:
    """cuBLAS (torch's F.linear) at M = 1 on the decode step's weight shapes: GB/s of weights."""
    import triton

    shapes = {"qkv": ((mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim, mc.hidden_size),
              "o": (mc.hidden_size, mc.num_heads * mc.head_dim), "gate_up": (2 * mc.intermediate_size, mc.hidden_size),
              "down": (mc.hidden_size, mc.intermediate_size), "lm_head": (mc.vocab_size, mc.hidden_size)}
    out = []
    for name, (n, k) in shapes.items():
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device=device) for _ in range(4)]  # rotate: no L2 reuse
        for m in (1, 128):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            i = [0]

            def f() -> torch.Tensor:
                i[0] = (i[0] + 1) % 4
                return torch.nn.functional.linear(x, ws[i[0]])

            ms = triton.testing.do_bench(f, warmup=5, rep=30, return_mode="median")
            out.append({"shape": name, "m": m, "us": round(1e3 * ms, 2), "GBs": round(n * k * 2 / ms / 1e6)})
    return out


def sweep_skinny(mc: ModelConfig, device: torch.device, batches: list[int], budget_s: float = 150.0
                 ) -> tuple[list[dict[str, Any]], list[tuple[int, dict[str, Any]]]]:
    """The decode products (qkv, o, down with DECODE_SPLIT_K's K slices, or twice as many; gate_up
    with SiLU) through gpu_kernels' Triton skinny kernel, per tiling, against their cuBLAS path
    (DECODE_SPLIT_K's slices), at each batch's rows. Each is timed as a CUDA graph over 4 weights in turn (no L2 reuse between calls).
    Returns the rows and a DECODE_TRITON table: per batch, each product's fastest tiling where
    it beats cuBLAS by 2%. Tilings past `budget_s` are not tried (the rows say so)."""
    import itertools

    import triton

    from workers.builtin import gpu_kernels

    started = time.perf_counter()
    q = mc.num_heads * mc.head_dim
    shapes = {"qkv": (q + 2 * mc.num_kv_heads * mc.head_dim, mc.hidden_size), "o": (mc.hidden_size, q),
              "down": (mc.hidden_size, mc.intermediate_size), "gate_up": (2 * mc.intermediate_size, mc.hidden_size)}
    tilings = [gpu_kernels.GemmTiling(bn, bk, w, st, bm) for bn, bk, (w, st), bm
               in itertools.product((32, 64, 128), (64, 128), ((4, 3), (4, 4), (8, 3)), (0, 64))]
    rows: list[dict[str, Any]] = []
    table: list[tuple[int, dict[str, Any]]] = []
    for m in sorted(batches, reverse=True):  # the largest batch first: the budget cuts the smallest
        chosen: dict[str, Any] = {}
        for name, (n, k) in shapes.items():
            ws = [torch.randn(n, k, dtype=torch.bfloat16, device=device) / k**0.5 for _ in range(4)]
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            parts = 1 if name == "gate_up" else gpu_kernels.decode_split_k(name, m, ws[0], None)

            def cublas(w: torch.Tensor, name: str = name, parts: int = parts, x: torch.Tensor = x) -> torch.Tensor:
                if name == "gate_up":
                    return gpu_kernels.silu_mul(torch.nn.functional.linear(x, w))
                return gpu_kernels.split_k_linear(x, w, parts) if parts > 1 else torch.nn.functional.linear(x, w)

            def triton_path(w: torch.Tensor, t: Any, name: str = name, x: torch.Tensor = x) -> torch.Tensor:
                if name == "gate_up":
                    return gpu_kernels.gate_up_silu(x, w, t)
                return gpu_kernels.skinny_linear(x, w, t)

            def total(out: torch.Tensor) -> torch.Tensor:  # partials summed: slices may differ
                return out.float().sum(0) if out.dim() == 3 else out.float()

            ref = total(cublas(ws[0]))
            base = triton.testing.do_bench_cudagraph(lambda: [cublas(w) for w in ws], rep=30,
                                                     return_mode="median") * 1e3 / len(ws)
            rows.append({"m": m, "proj": name, "parts": parts, "tiling": "cublas", "us": round(base, 2),
                         "GBs": round(n * k * 2 / base / 1e3)})
            best: tuple[float, Any] = (base / 1.02, None)
            # The projection's own K slices and twice as many (the consumers sum any number).
            slices = (1,) if name == "gate_up" else (parts, 2 * parts)
            for t in (t._replace(parts=p) for t in tilings for p in slices):
                if time.perf_counter() - started > budget_s:
                    rows.append({"m": m, "proj": name, "tiling": tuple(t), "error": "sweep budget spent"})
                    continue
                if k % (t.parts * t.block_k) or (t.block_m and t.block_m >= m):
                    continue
                try:
                    err = float((total(triton_path(ws[0], t)) - ref).norm() / ref.norm())
                    us = triton.testing.do_bench_cudagraph(lambda t=t: [triton_path(w, t) for w in ws], rep=30,
                                                           return_mode="median") * 1e3 / len(ws)
                except Exception as exc:  # a tiling that does not compile or fit
                    rows.append({"m": m, "proj": name, "tiling": tuple(t), "error": f"{type(exc).__name__}: {str(exc)[-300:]}"})
                    continue
                rows.append({"m": m, "proj": name, "parts": t.parts, "tiling": tuple(t), "us": round(us, 2),
                             "GBs": round(n * k * 2 / us / 1e3), "rel_err": err})
                if us < best[0] and err < 2e-2:
                    best = (us, t)
            print("skinny", m, name, "cublas", round(base, 2), "best", best, flush=True)
            if best[1] is not None:
                chosen[name] = best[1]
        table.append((m, chosen))
    return rows, sorted(table, key=lambda entry: entry[0])


def run_profile(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda")
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    import triton

    res["triton"] = triton.__version__
    res["copy_bw_GBs"] = measure_bandwidth(device) / 1e9
    res["matmul_bf16_TFLOPs"] = matmul_peak(device) / 1e12
    print({k: res[k] for k in ("copy_bw_GBs", "matmul_bf16_TFLOPs")}, flush=True)
    hf, mc = random_llama(device)
    model = ours_from_hf(hf, mc, device)
    del hf
    wbytes = weight_bytes_per_step(model)
    res["gemv"] = sweep_gemv(mc, device)
    print("gemv", res["gemv"], flush=True)
    res["attention"] = {}
    for b, ctx in ((128, 200), (1, 200), (128, 1024)):
        sw = sweep_attention(mc, device, b, ctx)
        res["attention"][f"{b}x{ctx}"] = sw
        print("attention", b, ctx, sw[:4], "default", [r for r in sw if r.get("block_n") == 128 and r.get("warps") == 4 and r.get("stages") == 3], flush=True)
    kv = KVCache.allocate(mc, args.num_blocks, BLOCK, torch.bfloat16, device)
    graphed = ModelRunner(model, kv, device, enforce_eager=False, max_num_seqs=max(args.batches), max_model_len=4096)
    res["profile"] = {}
    for b in args.batches:
        p = profile_step(graphed, b, args.prompt_len, mc.vocab_size, device)
        ctx = args.prompt_len + 5
        p["floor_ms"] = 1e3 * (wbytes + b * ctx * kv_bytes_per_token(mc)) / (res["copy_bw_GBs"] * 1e9)
        res["profile"][str(b)] = p
        print(b, json.dumps(p, indent=None), flush=True)
    eager = ModelRunner(model, kv, device, enforce_eager=True)
    res["prefill"] = {}
    for n, length in ((4, 512), (16, 512), (4, 2048)):
        r = bench_prefill(eager, n, length, mc.vocab_size, device)
        flops = prefill_flops(mc, wbytes, n, length)
        r["pct_of_matmul_peak"] = 100 * flops / (r["step_ms"] / 1e3) / (res["matmul_bf16_TFLOPs"] * 1e12)
        res["prefill"][f"{n}x{length}"] = r
        print("prefill", n, length, r, flush=True)
    return res


def prefill_flops(mc: ModelConfig, weight_bytes: int, num_seqs: int, length: int) -> float:
    """Matmul FLOPs of a prefill: 2 per weight per token (weights bf16, LM head over each
    sequence's last token only), plus causal attention's QK^T and PV."""
    lm_head = mc.vocab_size * mc.hidden_size
    body = weight_bytes // 2 - lm_head
    attn = 2 * 2 * mc.num_layers * mc.num_heads * mc.head_dim * num_seqs * length * (length + 1) / 2
    return 2 * body * num_seqs * length + 2 * lm_head * num_seqs + attn


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu")
    mc = load_model_config(args.model)
    model = load_model(mc, torch.float32, device)
    kv = KVCache.allocate(mc, args.num_blocks, BLOCK, torch.float32, device)
    runner = ModelRunner(model, kv, device)
    res: dict[str, Any] = {
        "device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "loadavg_before": os.getloadavg(), "model": args.model, "torch": torch.__version__, "decode": {},
    }
    for b in args.batches:
        res["decode"][str(b)] = {"ours": bench_decode(runner, b, args.prompt_len, args.steps, mc.vocab_size, device)}
        print(b, res["decode"][str(b)], flush=True)
    res["loadavg_after"] = os.getloadavg()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default="models/dynamo-tiny", help="CPU only; the GPU run builds its own")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prefill-seqs", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--num-blocks", type=int, default=4096)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="run the GPU code path on CPU with a tiny model")
    p.add_argument("--no-reference", action="store_true", help="skip eager and transformers' figures")
    p.add_argument("--profile", action="store_true", help="GPU: where a decode step's time goes (kernels, host stages)")
    p.add_argument("--compare-split-k", nargs="*", default=[], metavar="QKV,O[,DOWN]",
                   help="also time graphs whose qkv, o (and down) projections are split into QKV, O (and DOWN) K "
                        "slices at every batch (gpu_kernels.DECODE_SPLIT_K), e.g. 2,2 4,4 1,4 2,2,2")
    p.add_argument("--compare-decode-tiles", nargs="*", default=[], metavar="BLOCK_N,WARPS,STAGES",
                   help="also time graphs whose decode attention kernel takes BLOCK_N keys a tile with WARPS warps "
                        "(0: Triton's default) and STAGES stages at every batch (gpu_kernels.DECODE_TILES), e.g. 32,4,2")
    p.add_argument("--compare-unfused", action="store_true",
                   help="also time graphs with RoPE and the K/V write apart from decode attention (gpu_kernels.DECODE_FUSED_ROPE off)")
    p.add_argument("--compare-setting", nargs="*", default=[], metavar="NAME=VALUE",
                   help="also time graphs captured with gpu_kernels.NAME set to VALUE (a Python literal; several "
                        "joined by ';') at every batch, e.g. DECODE_HEADS_FIRST=True "
                        "'DECODE_FULL_DOT=True;DECODE_TILES=[(1073741824, (64, 2, 3))]'")
    p.add_argument("--compare-prefill-graphs", action="store_true",
                   help="also time the prefill shapes through prefill CUDA graphs (workers/builtin/prefill_graphs.py)")
    p.add_argument("--skinny-sweep", action="store_true",
                   help="GPU: time the decode products through gpu_kernels' Triton skinny kernel per tiling against "
                        "cuBLAS at each batch, then the decode graphs with the winners (gpu_kernels.DECODE_TRITON)")
    p.add_argument("--attention-sweep", action="store_true",
                   help="GPU: only the paged decode kernel's tilings at a few batch x context shapes")
    p.add_argument("--ncu-step", type=int, default=None, metavar="BATCH",
                   help="GPU: one eager decode step of BATCH rows inside cudaProfilerStart/Stop, for ncu")
    args = p.parse_args()
    if args.ncu_step is not None:
        ncu_step(args, args.ncu_step)
        return
    if args.attention_sweep:
        _, mc = random_llama(torch.device("meta"))
        sweeps = {f"{b}x{ctx}": sweep_attention(mc, torch.device("cuda"), b, ctx)
                  for b, ctx in ((128, 133), (128, 200), (32, 200), (1, 200), (128, 1024))}
        for shape, sw in sweeps.items():
            print("attention", shape, "best", sw[:3], "default", [
                r for r in sw if (r.get("block_n"), r.get("warps"), r.get("stages")) == (128, 4, 2)], flush=True)
        if args.out:
            Path(args.out).with_suffix(".attention_sweep.json").write_text(json.dumps(sweeps, indent=1))
        return
    if args.profile:
        res = run_profile(args)
    else:
        res = run_gpu(args) if args.device == "cuda" or args.smoke else run_cpu(args)
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
