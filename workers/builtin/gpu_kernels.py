"""The CUDA path's kernels as torch-level calls: paged decode and prefill attention, KV-cache
writes, and the fused elementwise ops (residual add + RMSNorm, RoPE with the K/V cache write,
SiLU-and-mul) that keep a decode step at eight kernels a layer (RoPE and the K/V write inside
decode attention). The Triton code is in triton_kernels.py, imported at the first call (CPU-only
torch builds carry no Triton), so a process can choose TRITON_INTERPRET before that;
`triton_available()` says if it can."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


QkNorm = tuple[torch.Tensor, torch.Tensor, float]  # Qwen3's q and k norm weights, and eps


@functools.cache
def kernels() -> Any:
    """workers/builtin/triton_kernels.py, imported at the first launch."""
    return importlib.import_module("workers.builtin.triton_kernels")


class DecodeTiling(NamedTuple):
    """The paged decode kernel's launch: keys a tile, warps (0: Triton's default), pipeline
    stages (triton_kernels.paged_decode)."""

    block_n: int
    warps: int
    stages: int


# The paged decode kernel's tiling by batch: (largest batch, tiling), in increasing batch order.
# A graph's batch is fixed at capture, its contexts are not, so a tiling is chosen per batch. Up
# to 32 rows, 128 keys (64 keys and two warps made the overlapped step 2.4% / 0-0.5% longer at 1
# / 32 rows); above, 64 keys and two warps (0.3-1.1% shorter at 64 rows, 1.5-1.7% at 128). 32-key
# tiles, 21% faster in the kernel's own sweep at 128 x 133 tokens, did not carry over into the
# model's graphs (builtin_gpu.py --compare-decode-tiles; RESULTS.md, "Decode tiles by batch").
# Stages: with per-half scores two (issue 21's sweep: 9.7 against 13.2 us for three at 1 x 200
# tokens on an H100); with whole-row scores (DECODE_FULL_DOT) three, level with two or four in
# the model's graphs (RESULTS.md, "Whole-row scores").
DECODE_TILES: list[tuple[int, DecodeTiling]] = [(32, DecodeTiling(128, 0, 3)), (1 << 30, DecodeTiling(64, 2, 3))]
DECODE_HEADS_FIRST = False
# Scores as one product over whole key rows (q's rotated halves joined) rather than one per
# RoPE half, where the halves need no padding (a power-of-two head_dim of 32 or more): a key
# tile is one load of whole rows feeding one tl.dot instead of two half-row loads and two dots.
# On an H100 (with three stages, DECODE_TILES) decode graph replays 1.0 / 1.4 / 2.0% shorter at
# batch 1 / 32 / 128; two stages or four do about as well (RESULTS.md, "Whole-row scores").
DECODE_FULL_DOT = True
# Pure-decode steps rotate q and k and write K/V inside the attention kernel (one launch a layer
# fewer); False: rope_store_kv, then paged_decode_attention (benchmarks compare the two).
DECODE_FUSED_ROPE = True
LOG2_E = 1.4426950408889634  # the kernels' softmax runs in exp2 over scores in log2 units


def embed(input_ids: torch.Tensor, feedback: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight[input_ids], each placeholder id -(r + 1) read as feedback[r] (runner.StepInput):
    one launch for what would be five small ones."""
    tokens = input_ids.shape[0]
    hidden = weight.shape[1]
    out = torch.empty(tokens, hidden, dtype=weight.dtype, device=weight.device)
    block = min(1024, _pow2(hidden))
    k = kernels()
    k.embed[(tokens, k.cdiv(hidden, block))](input_ids, feedback, weight, out, H=hidden, BLOCK=block)
    return out


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v [T, kv_heads, head_dim] (rows may be strided views) into their cache slots;
    slot -1 is skipped."""
    tokens, kv_heads, head_dim = k.shape
    row = kv_heads * head_dim
    kernels().store_kv[(tokens,)](k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0), ROW=row, BLOCK=_pow2(row))


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    heads_first: bool | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, heads, head_dim] over the paged cache
    [num_blocks, page, kv_heads, head_dim]; seq_lens count the new token (already stored)."""
    batch, heads, head_dim = q.shape
    if out is None:
        out = torch.empty(batch, heads, head_dim, dtype=q.dtype, device=q.device)
    _launch_decode(q, q.stride(0), q.stride(1), heads, k_cache, v_cache, block_tables, seq_lens, scale, out,
                   None, block_n, num_warps, num_stages, heads_first)
    return out


def rope_decode_attention(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, qk_norm: QkNorm | None = None,
) -> torch.Tensor:
    """A decode step's attention from its qkv rows [B, (heads + 2 * kv_heads) * head_dim]:
    rope_store_kv and paged_decode_attention in one launch (each program rotates its own q and
    k heads and writes its k and v to their slot, -1 skipped). qkv may instead be split-K
    partials [parts, B, ...] (split_k_linear), summed as they are read. Returns [B, heads, head_dim]."""
    parts = qkv.shape[0] if qkv.dim() == 3 else 1
    batch = qkv.shape[-2]
    head_dim = k_cache.shape[3]
    out = torch.empty(batch, num_heads, head_dim, dtype=k_cache.dtype, device=qkv.device)
    _launch_decode(qkv, qkv.stride(-2), head_dim, num_heads, k_cache, v_cache, block_tables, seq_lens, scale, out,
                   (positions, cos, sin, slots, qk_norm), parts=parts, stride_part=qkv.stride(0) if parts > 1 else 0)
    return out


_Entry = TypeVar("_Entry")


def for_rows(table: Sequence[tuple[int, _Entry]], rows: int) -> _Entry | None:
    """The entry of a (largest batch, entry) table, in increasing batch order, for the smallest
    bound that holds `rows`; None past every bound (the decode settings by batch below)."""
    for bound, entry in table:
        if rows <= bound:
            return entry
    return None


def decode_tiling(batch: int) -> DecodeTiling:
    """The paged decode kernel's tiling at `batch` rows: DECODE_TILES' entry for the smallest
    batch bound that holds them (the last entry past every bound)."""
    return for_rows(DECODE_TILES, batch) or DECODE_TILES[-1][1]


def _launch_decode(
    q: torch.Tensor, stride_qt: int, stride_qh: int, heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, out: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, QkNorm | None] | None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    heads_first: bool | None = None, parts: int = 1, stride_part: int = 0,
) -> None:
    batch = out.shape[0]
    _, page, kv_heads, head_dim = k_cache.shape
    group = heads // kv_heads
    tile_n, tile_warps, tile_stages = decode_tiling(batch)
    block_n = block_n or tile_n
    launch: dict[str, int] = {}
    if num_warps or tile_warps:
        launch["num_warps"] = num_warps or tile_warps
    if num_stages or tile_stages:
        launch["num_stages"] = num_stages or tile_stages
    if heads_first is None:
        heads_first = DECODE_HEADS_FIRST
    grid = (kv_heads, batch) if heads_first else (batch, kv_heads)
    if rope is not None:
        positions, cos, sin, slots, qk_norm = rope
        q_w, k_w, eps = qk_norm if qk_norm is not None else (cos, cos, 0.0)
    else:  # unread: ROPE is off
        positions = cos = sin = slots = q_w = k_w = seq_lens
        eps = 0.0
    kernels().paged_decode[grid](
        q, k_cache, v_cache, block_tables, seq_lens, out,
        positions, cos, sin, slots, q_w, k_w, eps, scale * LOG2_E,
        stride_qt, stride_qh, out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cos.stride(0) if rope is not None else 0, stride_part,
        NUM_Q=heads, GROUP=group, GROUP_PAD=max(16, _pow2(group)), HEAD_DIM=head_dim,
        HALF=head_dim // 2, HALF_PAD=max(16, _pow2(head_dim // 2)), D_PAD=max(16, _pow2(head_dim)),
        PAGE=page, BLOCK_N=block_n, HEADS_FIRST=heads_first,
        # tf32 would cost an fp32 model its precision; bf16/fp16 operands are exact either way.
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        ROPE=rope is not None, QK_NORM=rope is not None and rope[4] is not None, PARTS=parts,
        FULL_DOT=DECODE_FULL_DOT and head_dim >= 32 and head_dim == _pow2(head_dim),
        **launch,
    )


# The paged prefill kernel's tiling: rows per program (query tokens x the heads of a KV group),
# keys per round, and Triton's launch settings (0: its default).
PREFILL_ROWS, PREFILL_BLOCK_N, PREFILL_NUM_WARPS, PREFILL_NUM_STAGES = 64, 64, 4, 2


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_starts: torch.Tensor, scale: float, out: torch.Tensor | None = None,
    rows: int | None = None, block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of a mixed step: q [T, heads, head_dim] holds each sequence's new tokens
    back to back (sequence s at query_starts[s]:query_starts[s + 1], B + 1 int32 entries), which
    follow seq_lens[s] - new cached ones; their K/V already in the paged cache. Reads K/V in
    place through the block tables: no gathered copy, no mask tensor, no padded queries."""
    tokens, heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = heads // kv_heads
    group_pad = _pow2(group)
    block_q = max(1, (rows or PREFILL_ROWS) // group_pad)
    if block_q * group_pad < 16:  # tl.dot wants 16 rows at least
        block_q = 16 // group_pad
    if out is None:
        out = torch.empty(tokens, heads, head_dim, dtype=q.dtype, device=q.device)
    launch: dict[str, int] = {}
    if num_warps or PREFILL_NUM_WARPS:
        launch["num_warps"] = num_warps or PREFILL_NUM_WARPS
    if num_stages or PREFILL_NUM_STAGES:
        launch["num_stages"] = num_stages or PREFILL_NUM_STAGES
    kernels().paged_prefill[(tokens // block_q + num_seqs, kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, query_starts, out,
        scale * LOG2_E, num_seqs,  # exp2 of scores in log2 units
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, D_PAD=max(16, _pow2(head_dim)),
        PAGE=page, BLOCK_Q=block_q, BLOCK_N=block_n or PREFILL_BLOCK_N,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **launch,
    )
    return out


# The add + RMSNorm kernel's warps (0: Triton's default, 4): one program a row, latency-bound
# at decode batch sizes, so more threads each loading less finish sooner. On an H100, 8 made
# every decode graph replay 0.5-1.8% shorter at batch 1, 32 and 128 (three runs; 16 level with
# 8, 2 slower; RESULTS.md, "Norm warps").
NORM_NUM_WARPS = 8


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x + residual) and the new residual (x + residual; x itself when none). x may be
    split-K partials [parts, T, N] (split_k_linear; with a residual), summed here."""
    parts = x.shape[0] if x.dim() == 3 else 1
    tokens, n = x.shape[-2:]
    if parts > 1 and residual is None:
        raise ValueError("split-K partials are reduced only with a residual add")
    like = residual if residual is not None else x
    out = torch.empty_like(like)
    res_out = torch.empty_like(like) if residual is not None else x
    res = residual if residual is not None else x
    kernels().add_rms_norm[(tokens,)](
        x, res, weight, out, res_out, eps, x.stride(-2), res.stride(0), out.stride(0), x.stride(0) if parts > 1 else 0,
        N=n, BLOCK=_pow2(n), HAS_RES=residual is not None, PARTS=parts,
        **({"num_warps": NORM_NUM_WARPS} if NORM_NUM_WARPS else {}),
    )
    return out, res_out


def split_k_linear(x: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
    """x [T, K] @ weight [N, K].T as `parts` fp32 partial products over K slices, [parts, T, N]:
    one batched GEMM with `parts` times the programs of the plain one, for projections whose
    few output tiles leave SMs idle at decode batch sizes. The consumer sums the partials
    (rms_norm, rope_decode_attention), so no reduction launch is added."""
    n, k = weight.shape
    tokens = x.shape[0]
    xs = x.view(tokens, parts, k // parts).transpose(0, 1)
    ws = weight.view(n, parts, k // parts).transpose(0, 1).transpose(1, 2)
    if x.is_cuda and x.dtype != torch.float32:
        return torch.bmm(xs, ws, out_dtype=torch.float32)
    return torch.bmm(xs.float(), ws.float())


def decode_split_k(projection: str, rows: int, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """How many K slices a decode step's `projection` ("qkv", "o" or "down") is split into at `rows`
    rows: DECODE_SPLIT_K's entry for the smallest row bound that holds them, 1 where the weight
    has a bias or its K does not divide."""
    by_projection = for_rows(DECODE_SPLIT_K, rows)
    if bias is not None or by_projection is None:
        return 1
    parts = by_projection.get(projection, 1)
    return parts if weight.shape[1] % parts == 0 else 1


# (largest batch, {projection: K slices}), in increasing batch order; measured with
# benchmarks/builtin_gpu.py --compare-split-k (RESULTS.md, "Split-K"): on an H100, halving the
# K of qkv, o and down made an overlapped decode step 2.8-3.1% / 1.9-2.1% / 1.5-1.8% shorter
# at batch 1 / 32 / 128 (more CTAs for cuBLAS-sized skinny GEMMs, and no split-K reduce launch of its
# own: the partials are summed where they are consumed). Larger batches are unmeasured: off.
DECODE_SPLIT_K: list[tuple[int, dict[str, int]]] = [(128, {"qkv": 2, "o": 2, "down": 2})]


def rope_store_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  num_heads: int, num_kv_heads: int, head_dim: int,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  qk_norm: QkNorm | None = None) -> None:
    """Rotate the q heads of each row of qkv [T, (heads + 2 * kv_heads) * head_dim] in place;
    the rotated k and the v of each row go to their cache slot (slot -1 skipped) in the same
    launch. cos/sin are the [max_pos, head_dim] fp32 tables (only their first half is read).
    With `qk_norm`, each q and k head is RMS-normalised first (Qwen3)."""
    q_w, k_w, eps = qk_norm if qk_norm is not None else (cos, cos, 0.0)
    kernels().rope[(qkv.shape[0],)](
        qkv, positions, cos, sin, k_cache, v_cache, slots, q_w, k_w, eps, qkv.stride(0), cos.stride(0),
        NUM_Q=num_heads, NUM_KV=num_kv_heads, HALF=head_dim // 2, HALF_PAD=_pow2(head_dim // 2),
        HEAD_DIM=head_dim, HEADS_PAD=_pow2(num_heads + num_kv_heads), KV_PAD=_pow2(num_kv_heads),
        D_PAD=_pow2(head_dim), QK_NORM=qk_norm is not None,
    )


# SiLU-and-mul: columns a program, and warps (0: Triton's default, 4). On an H100, 4,096 or 256
# columns made decode graph replays 1-2% longer, 8 or 2 warps level or longer (RESULTS.md,
# "Norm warps").
SILU_BLOCK = 1024
SILU_NUM_WARPS = 0


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    tokens, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty(tokens, n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(SILU_BLOCK, _pow2(n))
    k = kernels()
    k.silu_mul[(tokens, k.cdiv(n, block))](gate_up, out, gate_up.stride(0), N=n, BLOCK=block,
                                           **({"num_warps": SILU_NUM_WARPS} if SILU_NUM_WARPS else {}))
    return out


class GemmTiling(NamedTuple):
    """A Triton skinny product's launch (skinny_matmul): output columns and K a tile, warps,
    stages, rows a tile (0: every row up to 128, at least 16), and K slices (0: DECODE_SPLIT_K's
    for the projection; gate_up always one)."""

    block_n: int
    block_k: int
    warps: int
    stages: int
    block_m: int = 0
    parts: int = 0


# Decode-step products through the Triton kernel (skinny_matmul) rather than cuBLAS, by batch:
# (largest batch, {projection: tiling}) in increasing batch order, as DECODE_SPLIT_K; a product
# not named stays on cuBLAS. "qkv", "o" and "down" take DECODE_SPLIT_K's K slices unless the
# tiling names its own (their consumers sum any number); "gate_up" is one product with
# SiLU-and-mul in its epilogue (the silu_mul launch and the [T, 2N] product's
# round trip gone). On an H100 at the 1.1B shape (builtin_gpu.py --skinny-sweep, RESULTS.md
# "Triton skinny products") the gate_up kernel beat cuBLAS + silu_mul at 1, 32 and 128 rows
# (24.3 / 25.5 / 28.5 against 26.7 / 28.2 / 31.8 us), qkv and o only at one row; down never.
DECODE_TRITON: list[tuple[int, dict[str, GemmTiling]]] = [
    (1, {"qkv": GemmTiling(32, 128, 4, 4), "o": GemmTiling(32, 128, 4, 4), "gate_up": GemmTiling(64, 128, 4, 3)}),
    (32, {"gate_up": GemmTiling(64, 128, 4, 3)}),
    (128, {"gate_up": GemmTiling(64, 128, 8, 3)}),
]


# The skinny kernel splits a product only by columns, K slices and row tiles, never further: at
# a shape whose grid leaves more than a tenth of the SMs idle (a smaller model's gate_up: 48
# programs of 64 columns at Qwen3-0.6B's 3,072) cuBLAS, which picks its own split, is kept.
TRITON_MIN_GRID_FRACTION = 0.9


def decode_triton(projection: str, rows: int, weight: torch.Tensor, parts: int = 1) -> GemmTiling | None:
    """The Triton tiling of a decode step's `projection` at `rows` rows (DECODE_TRITON's entry for
    the smallest bound that holds them) with its K slices resolved (its own, else `parts`, the
    projection's DECODE_SPLIT_K slices), or None: cuBLAS (no entry, K / slices not a multiple of
    the tile's K, or a grid too small for the GPU)."""
    entry = (for_rows(DECODE_TRITON, rows) or {}).get(projection)
    if entry is None:
        return None
    tiling = GemmTiling(*entry)  # a plain tuple from a benchmark's --compare-setting
    parts = 1 if projection == "gate_up" else tiling.parts or parts
    tiling = tiling._replace(parts=parts)
    if weight.shape[1] % (parts * tiling.block_k):
        return None
    sms = _sm_count(weight.device)
    columns = weight.shape[0] // 2 if projection == "gate_up" else weight.shape[0]
    programs = -(-columns // tiling.block_n) * parts * -(-rows // _block_m(rows, tiling))
    return tiling if sms is None or programs >= TRITON_MIN_GRID_FRACTION * sms else None


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int | None:
    """The device's SM count; None off CUDA (Triton's interpreter has no grid to fill). Cached:
    asked for each projection of each layer in an eager decode step."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _block_m(rows: int, tiling: GemmTiling) -> int:
    # tl.dot's smallest tile is 16; past 128 rows, more programs.
    return tiling.block_m or max(16, min(128, _pow2(rows)))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, tiling: GemmTiling) -> torch.Tensor:
    """x [T, K] @ weight [N, K].T for small T: with tiling.parts > 1 as fp32 split-K partials
    [parts, T, N] (split_k_linear's contract), else [T, N] in x's dtype."""
    tokens, k = x.shape
    n = weight.shape[0]
    parts = max(1, tiling.parts)
    if parts > 1:
        out = torch.empty(parts, tokens, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    _skinny(x, weight, out, n, parts, tiling, gate_up=False)
    return out


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, tiling: GemmTiling) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for weight [2N, K] = [gate; up], x [T, K], in one launch:
    each program reads its gate and up rows once and writes [T, N] (no [T, 2N] product between
    two launches)."""
    n = weight.shape[0] // 2
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    _skinny(x, weight, out, n, 1, tiling, gate_up=True)
    return out


def _skinny(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, n: int, parts: int, tiling: GemmTiling,
            gate_up: bool) -> None:
    tokens, k = x.shape
    assert k % (parts * tiling.block_k) == 0, (k, parts, tiling)
    assert x.stride(1) == 1 and weight.stride(1) == 1, "rows must be contiguous"
    block_m = _block_m(tokens, tiling)
    ker = kernels()
    ker.skinny_matmul[(ker.cdiv(n, tiling.block_n), parts, ker.cdiv(tokens, block_m))](
        x, weight, out, tokens, x.stride(0), weight.stride(0), out.stride(0) if parts > 1 else 0,
        N=n, K_PART=k // parts, BLOCK_M=block_m, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k, GATE_UP=gate_up,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=tiling.warps, num_stages=tiling.stages,
    )
