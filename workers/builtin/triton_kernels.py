"""The Triton kernels of the CUDA path (workers/builtin/gpu_kernels.py launches them). Imported
at the first kernel call: CPU-only torch builds carry no Triton, and a test process chooses
TRITON_INTERPRET before this import (the interpreter reads it when @triton.jit runs). Helpers
shared by several kernels are @triton.jit functions of this module, which the interpreter
resolves as module globals."""

# ruff: noqa: N803 (Triton's constexpr parameters are upper case)

from __future__ import annotations

import triton
import triton.language as tl

cdiv = triton.cdiv


@triton.jit
def _softmax_round(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One online-softmax round over a tile of keys: scores `s` [rows, keys] in log2 units
    (masked keys -inf), their values `v` [keys, dim]; returns the running max, sum and output."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _key_tile(block_tables_ptr, seq, stride_bt, start, n, end, kvh, stride_cb, stride_ct, stride_ch,
              PAGE: tl.constexpr):
    """The keys start + n (those before `end` valid) of one sequence's paged cache: their
    positions, validity and element offsets of their KV head's row (block table -> page)."""
    tok = start + n
    tmask = tok < end
    page = tl.load(block_tables_ptr + seq * stride_bt + tok // PAGE, mask=tmask, other=0)
    off = page.to(tl.int64) * stride_cb + (tok % PAGE) * stride_ct + kvh * stride_ch
    return tok, tmask, off


@triton.jit
def _kv_tile(k_cache_ptr, v_cache_ptr, off, tmask, j, jmask, d, dmask, HALF: tl.constexpr):
    """A key tile's K (as its two RoPE halves) and V rows at `off` (_key_tile)."""
    kmask = tmask[:, None] & jmask[None, :]
    k1 = tl.load(k_cache_ptr + off[:, None] + j[None, :], mask=kmask, other=0.0)
    k2 = tl.load(k_cache_ptr + off[:, None] + HALF + j[None, :], mask=kmask, other=0.0)
    v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
    return k1, k2, v


@triton.jit
def _kv_rows(k_cache_ptr, v_cache_ptr, off, tmask, d, dmask):
    """A key tile's whole K and V rows at `off` (_key_tile)."""
    mask = tmask[:, None] & dmask[None, :]
    k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit
def _sum_parts(ptrs, mask, stride_part, PARTS: tl.constexpr):
    """The fp32 sum of PARTS split-K partial products (gpu_kernels.split_k_linear) at `ptrs`."""
    acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    for p in tl.static_range(1, PARTS):
        acc += tl.load(ptrs + p * stride_part, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _norm_weights(w_ptr, j, jmask, HALF: tl.constexpr):
    """A per-head RMSNorm weight's two halves, fp32, as [1, HALF_PAD] rows."""
    w1 = tl.load(w_ptr + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
    return w1, w2


@triton.jit
def _head_norm(x1, x2, w1, w2, eps, HEAD_DIM: tl.constexpr, dt: tl.constexpr):
    """Qwen3's per-head RMSNorm of heads given as halves [heads, HALF_PAD] (fp32), rounded to
    the model dtype where the eager norm rounds."""
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)
    x1 = ((x1 * rstd[:, None]).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
    x2 = ((x2 * rstd[:, None]).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
    return x1, x2


@triton.jit
def _rotate(x1, x2, c, s, dt: tl.constexpr):
    """Neox-style RoPE of heads given as halves (fp32), in the model dtype."""
    return (x1 * c - x2 * s).to(dt), (x2 * c + x1 * s).to(dt)


@triton.jit
def store_kv(
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
def paged_decode(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
    pos_ptr, cos_ptr, sin_ptr, slot_ptr, qw_ptr, kw_ptr, eps, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_ct, stride_ch, stride_pos, stride_part,
    NUM_Q: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, HEADS_FIRST: tl.constexpr,
    ROPE: tl.constexpr, QK_NORM: tl.constexpr, PARTS: tl.constexpr, FULL_DOT: tl.constexpr = False,
):
    # One program per (sequence, KV head) computes all GROUP query heads that share that KV
    # head, so each K/V byte is read once; GROUP_PAD >= 16 for tl.dot. Heads are handled as
    # their two RoPE halves, so that with ROPE the program rotates its new q and k itself: q_ptr
    # is then the step's qkv rows, the new k and v go to their cache slot from here, and the new
    # token's score comes from registers after the cached context (no read back of what this
    # program just stored). Without ROPE, q_ptr is q [B, heads, head_dim] and the new K/V are
    # already in the cache. A key tile's scores are two dots of HALF, or with FULL_DOT (halves
    # unpadded) one of HEAD_DIM over q's halves joined, fed by one load of whole key rows.
    # HEADS_FIRST: a sequence's KV heads are neighbouring programs (their K/V rows are adjacent
    # in the cache).
    if HEADS_FIRST:
        kvh = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
    dt = k_cache_ptr.dtype.element_ty
    seq_len = tl.load(seq_lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    j = tl.arange(0, HALF_PAD)
    d = tl.arange(0, D_PAD)
    n = tl.arange(0, BLOCK_N)
    gmask = g < GROUP
    jmask = j < HALF
    dmask = d < HEAD_DIM
    heads = kvh * GROUP + g
    qmask = gmask[:, None] & jmask[None, :]
    q_at = q_ptr + seq * stride_qt + heads[:, None] * stride_qh + j[None, :]
    # With ROPE the new token is not read from the cache: this program writes it.
    context = seq_len - 1 if ROPE else seq_len
    if ROPE:
        # The qkv row, or PARTS fp32 split-K partials of it, rounded as the projection would.
        row = q_ptr + seq * stride_qt
        k_at = row + (NUM_Q + kvh) * HEAD_DIM + j[None, :]
        q1 = _sum_parts(q_at, qmask, stride_part, PARTS).to(dt).to(tl.float32)
        q2 = _sum_parts(q_at + HALF, qmask, stride_part, PARTS).to(dt).to(tl.float32)
        k1 = _sum_parts(k_at, jmask[None, :], stride_part, PARTS).to(dt).to(tl.float32)
        k2 = _sum_parts(k_at + HALF, jmask[None, :], stride_part, PARTS).to(dt).to(tl.float32)
        pos = tl.load(pos_ptr + seq)
        c = tl.load(cos_ptr + pos * stride_pos + j, mask=jmask, other=0.0)[None, :]
        sn = tl.load(sin_ptr + pos * stride_pos + j, mask=jmask, other=0.0)[None, :]
        if QK_NORM:
            qw1, qw2 = _norm_weights(qw_ptr, j, jmask, HALF)
            kw1, kw2 = _norm_weights(kw_ptr, j, jmask, HALF)
            q1, q2 = _head_norm(q1, q2, qw1, qw2, eps, HEAD_DIM, dt)
            k1, k2 = _head_norm(k1, k2, kw1, kw2, eps, HEAD_DIM, dt)
        q1, q2 = _rotate(q1, q2, c, sn, dt)
        k1, k2 = _rotate(k1, k2, c, sn, dt)
        v_new = _sum_parts(row + (NUM_Q + NUM_Q // GROUP + kvh) * HEAD_DIM + d[None, :], dmask[None, :], stride_part,
                           PARTS).to(dt)
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        # Slot -1: a padded CUDA-graph row owns no cache slot. (Broadcast before comparing:
        # the CPU interpreter rejects a scalar bool in a block mask.)
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_ct + kvh * stride_ch
        new_mask = jmask[None, :] & ((j[None, :] * 0 + slot) >= 0)
        tl.store(k_cache_ptr + dst + j[None, :], k1, mask=new_mask)
        tl.store(k_cache_ptr + dst + HALF + j[None, :], k2, mask=new_mask)
        tl.store(v_cache_ptr + dst + d[None, :], v_new, mask=dmask[None, :] & ((d[None, :] * 0 + slot) >= 0))
    else:
        q1 = tl.load(q_at, mask=qmask, other=0.0)
        q2 = tl.load(q_at + HALF, mask=qmask, other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
    if FULL_DOT:
        # The halves side by side: one product over whole key rows (HALF == HALF_PAD).
        q_full = tl.reshape(tl.permute(tl.join(q1.to(dt), q2.to(dt)), (0, 2, 1)), (GROUP_PAD, 2 * HALF_PAD))
    for start in range(0, context, BLOCK_N):
        _, tmask, off = _key_tile(block_tables_ptr, seq, stride_bt, start, n, context, kvh,
                                  stride_cb, stride_ct, stride_ch, PAGE)
        if FULL_DOT:
            kt, v = _kv_rows(k_cache_ptr, v_cache_ptr, off, tmask, d, dmask)
            s = tl.dot(q_full, tl.trans(kt), input_precision=PRECISION) * scale_log2
        else:
            k1t, k2t, v = _kv_tile(k_cache_ptr, v_cache_ptr, off, tmask, j, jmask, d, dmask, HALF)
            s = tl.dot(q1.to(dt), tl.trans(k1t), input_precision=PRECISION)
            s = tl.dot(q2.to(dt), tl.trans(k2t), s, input_precision=PRECISION) * scale_log2
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_i, l_i, acc = _softmax_round(s, v, m_i, l_i, acc, PRECISION)
    if ROPE:
        if seq_len > 0:  # the new token, from registers
            s_new = (tl.sum(q1.to(tl.float32) * k1.to(tl.float32), 1)
                     + tl.sum(q2.to(tl.float32) * k2.to(tl.float32), 1)) * scale_log2
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p.to(dt).to(tl.float32)[:, None] * v_new.to(tl.float32)
    # A padded row (seq_len 0) ran no round: it writes zeros, not NaN.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :],
    )


# Triton specialises integer arguments on their value (1) and divisibility (by 16); these
# two change from step to step, so each new class would compile a variant mid-serving.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def paged_prefill(
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
        tok, tmask, off = _key_tile(block_tables_ptr, seq, stride_bt, start, n, kv_end, kvh,
                                    stride_cb, stride_ct, stride_ch, PAGE)
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(tmask[None, :] & (tok[None, :] <= q_pos[:, None]), s, float("-inf"))
        v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _softmax_round(s, v, m_i, l_i, acc, PRECISION)
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :],
    )


@triton.jit
def add_rms_norm(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps,
    stride_x, stride_r, stride_o, stride_part, N: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr,
    PARTS: tl.constexpr,
):
    # PARTS > 1: x is that many fp32 split-K partials of a projection, summed and rounded here
    # as the projection's own output would have been.
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    dt = out_ptr.dtype.element_ty
    if PARTS == 1:
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    else:
        x = _sum_parts(x_ptr + row * stride_x + offs, mask, stride_part, PARTS).to(dt)
    if HAS_RES:
        # Round the sum to the model dtype before normalising, as the eager `h + r` does.
        x = (x + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)).to(dt)
        tl.store(res_out_ptr + row * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    normed = (xf * rstd).to(dt).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope(
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
        is_q = h[:, None] < NUM_Q
        qw1, qw2 = _norm_weights(qw_ptr, j, jmask, HALF)
        kw1, kw2 = _norm_weights(kw_ptr, j, jmask, HALF)
        x1, x2 = _head_norm(x1, x2, tl.where(is_q, qw1, kw1), tl.where(is_q, qw2, kw2), eps, HEAD_DIM,
                            qkv_ptr.dtype.element_ty)
    y1, y2 = _rotate(x1, x2, c, s, qkv_ptr.dtype.element_ty)
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
def silu_mul(x_ptr, out_ptr, stride_x, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + N + offs, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * N + offs, act * up, mask=mask)


@triton.jit
def skinny_matmul(x_ptr, w_ptr, out_ptr, M, stride_x, stride_w, stride_op, N: tl.constexpr, K_PART: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATE_UP: tl.constexpr,
                  PRECISION: tl.constexpr):
    # Program (column tile, K slice, row tile): x[:, slice] @ w[cols, slice].T into out[slice]
    # (split-K partials, or the product itself with one slice). GATE_UP (one slice): w is
    # [gate; up], N rows each, and the program also reads up's rows N + cols and writes
    # silu(gate) * up from its fp32 accumulators. K_PART is a multiple of BLOCK_K.
    part = tl.program_id(1)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = part * K_PART + tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_ptrs = x_ptr + rm[:, None] * stride_x + rk[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_w + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K_PART, BLOCK_K):
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)), acc, input_precision=PRECISION)
        if GATE_UP:
            up = tl.load(w_ptrs + N * stride_w, mask=n_mask[:, None], other=0.0)
            acc_up = tl.dot(x, tl.trans(up), acc_up, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if GATE_UP:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    out = out_ptr + part * stride_op + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def embed(ids_ptr, feedback_ptr, weight_ptr, out_ptr, H: tl.constexpr, BLOCK: tl.constexpr):
    # A negative id -(r + 1) is the previous step's token of row r, still on the device.
    t = tl.program_id(0)
    i = tl.load(ids_ptr + t)
    fed = tl.load(feedback_ptr + tl.maximum(-1 - i, 0))
    i = tl.where(i < 0, fed, i).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    tl.store(out_ptr + t * H + offs, tl.load(weight_ptr + i * H + offs, mask=mask), mask=mask)
