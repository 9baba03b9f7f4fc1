"""Triton kernels of the CUDA path: paged decode and prefill attention, KV-cache writes, and the
fused elementwise ops (residual add + RMSNorm, RoPE with the K/V cache write, SiLU-and-mul) that
keep a decode step at nine kernels a layer. Triton is imported at the first kernel call (CPU-only
torch builds carry none), so a process can choose TRITON_INTERPRET before that;
`triton_available()` says if it can."""

from __future__ import annotations

import functools
import importlib.util
from types import SimpleNamespace

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def _store_kv_kernel(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
        stride_k, stride_v,
        ROW: tl.constexpr, BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t)
        offs = tl.arange(0, BLOCK)
        # Slot -1 marks a padded row of a CUDA-graph bucket: it owns no cache slot. (Broadcast
        # before comparing: Triton's CPU interpreter rejects a scalar bool in a block mask.)
        mask = (offs < ROW) & ((offs * 0 + slot) >= 0)
        dst = slot.to(tl.int64) * ROW + offs
        tl.store(k_cache_ptr + dst, tl.load(k_ptr + t * stride_k + offs, mask=mask), mask=mask)
        tl.store(v_cache_ptr + dst, tl.load(v_ptr + t * stride_v + offs, mask=mask), mask=mask)

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
        scale,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
        stride_cb, stride_ct, stride_ch,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, HEADS_FIRST: tl.constexpr,
    ):
        # One program per (sequence, KV head) computes all GROUP query heads that share that KV
        # head, so each K/V byte is read once; GROUP_PAD >= 16 for tl.dot. HEADS_FIRST: a
        # sequence's KV heads are neighbouring programs (their K/V rows are adjacent in the cache).
        if HEADS_FIRST:
            kvh = tl.program_id(0)
            seq = tl.program_id(1)
        else:
            seq = tl.program_id(0)
            kvh = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + seq)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D_PAD)
        n = tl.arange(0, BLOCK_N)
        gmask = g < GROUP
        dmask = d < HEAD_DIM
        heads = kvh * GROUP + g
        q = tl.load(
            q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
            mask=gmask[:, None] & dmask[None, :], other=0.0,
        )
        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
        for start in range(0, seq_len, BLOCK_N):
            tok = start + n
            tmask = tok < seq_len
            page = tl.load(block_tables_ptr + seq * stride_bt + tok // PAGE, mask=tmask, other=0)
            off = page.to(tl.int64) * stride_cb + (tok % PAGE) * stride_ct + kvh * stride_ch
            kv_mask = tmask[:, None] & dmask[None, :]
            k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        # A padded row (seq_len 0) ran no iteration: it writes zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :],
        )

    # Triton specialises integer arguments on their value (1) and divisibility (by 16); these
    # two change from step to step, so each new class would compile a variant mid-serving.
    @triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
    def _paged_prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_starts_ptr, out_ptr,
        scale_log2, num_seqs,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
        stride_cb, stride_ct, stride_ch,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # A program takes BLOCK_Q query tokens of one sequence times the GROUP query heads that
        # share one KV head (rows = token-major, head-minor), so each K/V tile it reads serves
        # them all. Sequence s owns tiles from query_starts[s] // BLOCK_Q + s on: a grid of
        # T // BLOCK_Q + B tiles covers every sequence's ceil(new / BLOCK_Q) with no host-side
        # tile list, and the binary search below finds a tile's sequence.
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            if tl.load(query_starts_ptr + mid) // BLOCK_Q + mid <= tile:
                lo = mid + 1
            else:
                hi = mid
        seq = lo - 1
        q_begin = tl.load(query_starts_ptr + seq)
        num_new = tl.load(query_starts_ptr + seq + 1) - q_begin
        first = (tile - q_begin // BLOCK_Q - seq) * BLOCK_Q
        if first >= num_new:
            return
        seq_len = tl.load(seq_lens_ptr + seq)
        context = seq_len - num_new
        r = tl.arange(0, BLOCK_Q * GROUP_PAD)
        qi = first + r // GROUP_PAD
        g = r % GROUP_PAD
        d = tl.arange(0, D_PAD)
        n = tl.arange(0, BLOCK_N)
        dmask = d < HEAD_DIM
        rmask = (qi < num_new) & (g < GROUP)
        rows = (q_begin + qi).to(tl.int64)
        heads = kvh * GROUP + g
        q = tl.load(
            q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
            mask=rmask[:, None] & dmask[None, :], other=0.0,
        )
        q_pos = context + qi
        m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_PAD, D_PAD], dtype=tl.float32)
        # Causal: the tile's last query sees keys up to its own position, none beyond. Every
        # row (padded ones too) sees key 0 in the first round, so no row's maximum stays -inf.
        kv_end = tl.minimum(seq_len, context + first + BLOCK_Q)
        for start in range(0, kv_end, BLOCK_N):
            tok = start + n
            tmask = tok < kv_end
            page = tl.load(block_tables_ptr + seq * stride_bt + tok // PAGE, mask=tmask, other=0)
            off = page.to(tl.int64) * stride_cb + (tok % PAGE) * stride_ct + kvh * stride_ch
            kv_mask = tmask[:, None] & dmask[None, :]
            k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            s = tl.where(tmask[None, :] & (tok[None, :] <= q_pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :],
        )

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps,
        stride_x, stride_r, stride_o, N: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RES:
            # Round the sum to the model dtype before normalising, as the eager `h + r` does.
            x = (x + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)).to(x_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * N + offs, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
        normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, qw_ptr, kw_ptr, eps,
        stride_t, stride_pos,
        NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, KV_PAD: tl.constexpr, D_PAD: tl.constexpr,
        QK_NORM: tl.constexpr,
    ):
        # Rotates the q and k heads of one token's qkv row, neox style: q back into the row, k
        # to its cache slot and v with it, all in this one launch. QK_NORM (Qwen3): each q and k
        # head is RMS-normalised with its weights first, rounded to the model dtype where the
        # eager norm rounds.
        t = tl.program_id(0)
        pos = tl.load(pos_ptr + t)
        h = tl.arange(0, HEADS_PAD)
        j = tl.arange(0, HALF_PAD)
        jmask = j < HALF
        c = tl.load(cos_ptr + pos * stride_pos + j, mask=jmask, other=0.0)[None, :]
        s = tl.load(sin_ptr + pos * stride_pos + j, mask=jmask, other=0.0)[None, :]
        mask = (h[:, None] < NUM_Q + NUM_KV) & jmask[None, :]
        row = qkv_ptr + t * stride_t
        base = row + h[:, None] * HEAD_DIM + j[None, :]
        x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
        if QK_NORM:
            dt = qkv_ptr.dtype.element_ty
            rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)
            is_q = h[:, None] < NUM_Q
            qw1 = tl.load(qw_ptr + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
            qw2 = tl.load(qw_ptr + HALF + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
            kw1 = tl.load(kw_ptr + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
            kw2 = tl.load(kw_ptr + HALF + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
            x1 = ((x1 * rstd[:, None]).to(dt).to(tl.float32) * tl.where(is_q, qw1, kw1)).to(dt).to(tl.float32)
            x2 = ((x2 * rstd[:, None]).to(dt).to(tl.float32) * tl.where(is_q, qw2, kw2)).to(dt).to(tl.float32)
        y1 = (x1 * c - x2 * s).to(qkv_ptr.dtype.element_ty)
        y2 = (x2 * c + x1 * s).to(qkv_ptr.dtype.element_ty)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        qmask = (h[:, None] < NUM_Q) & jmask[None, :]
        tl.store(base, y1, mask=qmask)
        tl.store(base + HALF, y2, mask=qmask)
        # (Broadcast the slot before comparing: the CPU interpreter rejects a scalar bool
        # in a block mask.) Slot -1: a padded CUDA-graph row owns no cache slot.
        valid = (h[:, None] * 0 + slot) >= 0
        kmask = (h[:, None] >= NUM_Q) & mask & valid
        dst = slot * (NUM_KV * HEAD_DIM) + (h[:, None] - NUM_Q) * HEAD_DIM + j[None, :]
        tl.store(k_cache_ptr + dst, y1, mask=kmask)
        tl.store(k_cache_ptr + dst + HALF, y2, mask=kmask)
        kv = tl.arange(0, KV_PAD)
        d = tl.arange(0, D_PAD)
        vmask = (kv[:, None] < NUM_KV) & (d[None, :] < HEAD_DIM) & ((kv[:, None] * 0 + slot) >= 0)
        v = tl.load(row + (NUM_Q + NUM_KV + kv[:, None]) * HEAD_DIM + d[None, :], mask=vmask)
        tl.store(v_cache_ptr + slot * (NUM_KV * HEAD_DIM) + kv[:, None] * HEAD_DIM + d[None, :], v, mask=vmask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, N: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + N + offs, mask=mask, other=0.0)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * N + offs, act * up, mask=mask)

    @triton.jit
    def _embed_kernel(ids_ptr, feedback_ptr, weight_ptr, out_ptr, H: tl.constexpr, BLOCK: tl.constexpr):
        # A negative id -(r + 1) is the previous step's token of row r, still on the device.
        t = tl.program_id(0)
        i = tl.load(ids_ptr + t)
        fed = tl.load(feedback_ptr + tl.maximum(-1 - i, 0))
        i = tl.where(i < 0, fed, i).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H
        tl.store(out_ptr + t * H + offs, tl.load(weight_ptr + i * H + offs, mask=mask), mask=mask)

    return SimpleNamespace(
        embed=_embed_kernel, store_kv=_store_kv_kernel, paged_decode=_paged_decode_kernel,
        paged_prefill=_paged_prefill_kernel, add_rms_norm=_add_rms_norm_kernel,
        rope=_rope_kernel, silu_mul=_silu_mul_kernel, cdiv=triton.cdiv,
    )


# The paged decode kernel's tiling (0: Triton's default). Two stages rather than Triton's three:
# on an H100 9.7 against 13.2 us at 1 x 200 tokens, the same at 128 x 200 (issue 21's sweep).
DECODE_BLOCK_N, DECODE_NUM_WARPS, DECODE_NUM_STAGES = 128, 0, 2
DECODE_HEADS_FIRST = False


def embed(input_ids: torch.Tensor, feedback: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight[input_ids], each placeholder id -(r + 1) read as feedback[r] (runner.StepInput):
    one launch for what would be five small ones."""
    tokens = input_ids.shape[0]
    hidden = weight.shape[1]
    out = torch.empty(tokens, hidden, dtype=weight.dtype, device=weight.device)
    block = min(1024, _pow2(hidden))
    k = _kernels()
    k.embed[(tokens, k.cdiv(hidden, block))](input_ids, feedback, weight, out, H=hidden, BLOCK=block)
    return out


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v [T, kv_heads, head_dim] (rows may be strided views) into their cache slots;
    slot -1 is skipped."""
    tokens, kv_heads, head_dim = k.shape
    row = kv_heads * head_dim
    _kernels().store_kv[(tokens,)](k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0), ROW=row, BLOCK=_pow2(row))


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    heads_first: bool | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, heads, head_dim] over the paged cache
    [num_blocks, page, kv_heads, head_dim]; seq_lens count the new token (already stored)."""
    batch, heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    if out is None:
        out = torch.empty(batch, heads, head_dim, dtype=q.dtype, device=q.device)
    # 128 keys a step: a short decode context takes few dependent (block table -> K) rounds.
    block_n = block_n or DECODE_BLOCK_N
    launch: dict[str, int] = {}
    if num_warps or DECODE_NUM_WARPS:
        launch["num_warps"] = num_warps or DECODE_NUM_WARPS
    if num_stages or DECODE_NUM_STAGES:
        launch["num_stages"] = num_stages or DECODE_NUM_STAGES
    if heads_first is None:
        heads_first = DECODE_HEADS_FIRST
    grid = (kv_heads, batch) if heads_first else (batch, kv_heads)
    _kernels().paged_decode[grid](
        q, k_cache, v_cache, block_tables, seq_lens, out, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=max(16, _pow2(group)), HEAD_DIM=head_dim, D_PAD=max(16, _pow2(head_dim)),
        PAGE=page, BLOCK_N=block_n, HEADS_FIRST=heads_first,
        # tf32 would cost an fp32 model its precision; bf16/fp16 operands are exact either way.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **launch,
    )
    return out


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
    _kernels().paged_prefill[(tokens // block_q + num_seqs, kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, query_starts, out,
        scale * 1.4426950408889634, num_seqs,  # exp2 of scores in log2 units
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, D_PAD=max(16, _pow2(head_dim)),
        PAGE=page, BLOCK_Q=block_q, BLOCK_N=block_n or PREFILL_BLOCK_N,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **launch,
    )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x + residual) and the new residual (x + residual; x itself when none)."""
    tokens, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    res = residual if residual is not None else x
    _kernels().add_rms_norm[(tokens,)](
        x, res, weight, out, res_out, eps, x.stride(0), res.stride(0), out.stride(0),
        N=n, BLOCK=_pow2(n), HAS_RES=residual is not None,
    )
    return out, res_out


QkNorm = tuple[torch.Tensor, torch.Tensor, float]  # Qwen3's q and k norm weights, and eps


def rope_store_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  num_heads: int, num_kv_heads: int, head_dim: int,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  qk_norm: QkNorm | None = None) -> None:
    """Rotate the q heads of each row of qkv [T, (heads + 2 * kv_heads) * head_dim] in place;
    the rotated k and the v of each row go to their cache slot (slot -1 skipped) in the same
    launch. cos/sin are the [max_pos, head_dim] fp32 tables (only their first half is read).
    With `qk_norm`, each q and k head is RMS-normalised first (Qwen3)."""
    q_w, k_w, eps = qk_norm if qk_norm is not None else (cos, cos, 0.0)
    _kernels().rope[(qkv.shape[0],)](
        qkv, positions, cos, sin, k_cache, v_cache, slots, q_w, k_w, eps, qkv.stride(0), cos.stride(0),
        NUM_Q=num_heads, NUM_KV=num_kv_heads, HALF=head_dim // 2, HALF_PAD=_pow2(head_dim // 2),
        HEAD_DIM=head_dim, HEADS_PAD=_pow2(num_heads + num_kv_heads), KV_PAD=_pow2(num_kv_heads),
        D_PAD=_pow2(head_dim), QK_NORM=qk_norm is not None,
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    tokens, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty(tokens, n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _pow2(n))
    k = _kernels()
    k.silu_mul[(tokens, k.cdiv(n, block))](gate_up, out, gate_up.stride(0), N=n, BLOCK=block)
    return out
