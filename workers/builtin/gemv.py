"""Matrix products for the few rows of a small decode step (at most MAX_ROWS tokens), with the
elementwise op before each projection fused into the product's load: residual add + RMSNorm
before qkv and gate/up, SiLU-and-mul before down.

Why not cuBLAS: at one to a few rows a projection is a weight stream, and a 1.1B layer's qkv
and o weights (8-13 MB) are too small for cuBLAS to stream at more than ~1.6 TB/s on an H100;
its down projection adds a split-K reduction kernel, and the norms and SiLU are launches of
their own (about a fifth of a batch-1 step). Here each program owns BLOCK_N output columns over
the whole K, so no reduction pass is needed, and recomputes the prologue for the rows it reads
(a few KB from L2) instead of waiting on another kernel. Where the rows outgrow it, the model
uses cuBLAS and gpu_kernels' separate norm and SiLU kernels (same rounding points as these)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

# Above this many rows the step is a matrix product, not a weight stream: cuBLAS. The env
# override exists for benchmarks' on/off comparisons (0 turns these kernels off).
MAX_ROWS = int(os.environ.get("DYN_BUILTIN_GEMV_MAX_ROWS", "8"))

NO_PROLOGUE, NORM, SILU = 0, 1, 2


@dataclass(frozen=True)
class Tiling:
    """One launch configuration. dot: rows padded to 16 and multiplied on tensor cores (any
    row count up to 16); otherwise a broadcast multiply-and-sum in registers, which allows the
    narrow BLOCK_N (4-8 columns) that gives a small projection enough programs to fill the
    GPU without splitting K."""

    block_n: int
    block_k: int
    dot: bool
    num_warps: int = 4
    num_stages: int = 3


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_tiling(rows: int, n: int, k: int) -> Tiling:
    """Enough programs for every SM (>= 256 where n allows) with the widest block that keeps
    the broadcast product's registers bounded (rows x BLOCK_N x BLOCK_K <= 4096 a warp group)."""
    if rows > 4:
        return Tiling(block_n=16, block_k=256, dot=True)
    rows_pad = _pow2(rows)
    block_n = 16
    while block_n > 4 and n // block_n < 256:
        block_n //= 2
    block_k = max(64, min(512, 4096 // (rows_pad * block_n)))
    return Tiling(block_n=block_n, block_k=min(block_k, _pow2(k)), dot=False)


def fits(x: torch.Tensor) -> bool:
    """Whether a step of x's rows takes these kernels (the model's switch)."""
    return 0 < x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(
        x_ptr, r_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, eps,
        M, stride_x, stride_r, stride_o,
        N: tl.constexpr, K: tl.constexpr, M_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # out[m, n] = sum_k a[m, k] * w[n, k], a = x, RMSNorm(x + r) * nw, or silu(x[:, :K]) *
        # x[:, K:], with the same rounding points as gpu_kernels' separate kernels.
        pid = tl.program_id(0)
        dt = w_ptr.dtype.element_ty
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        m = tl.arange(0, M_PAD)
        mmask = m < M
        kk = tl.arange(0, BLOCK_K)
        rstd = tl.zeros([M_PAD], dtype=tl.float32)
        if PROLOGUE == 1:
            # The norm needs each row's whole sum of squares before any column: one pass over
            # the rows (L2-resident), the first program also writing the new residual.
            ss = tl.zeros([M_PAD], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + kk
                xm = mmask[:, None] & (k < K)[None, :]
                xv = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=xm, other=0.0)
                if HAS_RES:
                    xv = (xv + tl.load(r_ptr + m[:, None] * stride_r + k[None, :], mask=xm, other=0.0)).to(dt)
                    # (Broadcast pid before comparing: the CPU interpreter rejects a scalar
                    # bool in a block mask.)
                    tl.store(res_out_ptr + m[:, None] * K + k[None, :], xv, mask=xm & ((m[:, None] * 0 + pid) == 0))
                xf = xv.to(tl.float32)
                ss += tl.sum(xf * xf, 1)
            rstd = 1.0 / tl.sqrt(ss / K + eps)
        acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            kmask = k < K
            w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            xm = mmask[:, None] & kmask[None, :]
            if PROLOGUE == 2:
                g = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=xm, other=0.0).to(tl.float32)
                u = tl.load(x_ptr + m[:, None] * stride_x + K + k[None, :], mask=xm, other=0.0)
                a = (g / (1.0 + tl.exp(-g))).to(dt) * u
            else:
                a = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=xm, other=0.0)
                if PROLOGUE == 1:
                    if HAS_RES:
                        a = (a + tl.load(r_ptr + m[:, None] * stride_r + k[None, :], mask=xm, other=0.0)).to(dt)
                    nw = tl.load(nw_ptr + k, mask=kmask, other=0.0).to(tl.float32)
                    a = ((a.to(tl.float32) * rstd[:, None]).to(dt).to(tl.float32) * nw[None, :]).to(dt)
            if DOT:
                acc += tl.dot(a.to(dt), tl.trans(w), input_precision=PRECISION)
            else:
                acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], 2)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m[:, None] * stride_o + n[None, :], acc.to(dt), mask=mmask[:, None] & nmask[None, :])

    return SimpleNamespace(gemv=_gemv_kernel, cdiv=triton.cdiv)


def _launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prologue: int,
    residual: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float, tiling: Tiling | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = x.shape[0]
    n, k = weight.shape
    if rows > 16:
        raise ValueError(f"gemv takes at most 16 rows, got {rows}")
    if not weight.is_contiguous():
        raise ValueError("gemv needs a contiguous [N, K] weight")
    t = tiling or default_tiling(rows, n, k)
    out = torch.empty(rows, n, dtype=weight.dtype, device=weight.device)
    res_out = torch.empty(rows, k, dtype=x.dtype, device=x.device) if residual is not None else None
    m_pad = 16 if t.dot else _pow2(rows)
    kern = _kernels()
    kern.gemv[(kern.cdiv(n, t.block_n),)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else weight,
        weight, bias if bias is not None else weight, out, res_out if res_out is not None else out, eps,
        rows, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        N=n, K=k, M_PAD=m_pad, BLOCK_N=t.block_n, BLOCK_K=min(t.block_k, _pow2(k)),
        PROLOGUE=prologue, HAS_RES=residual is not None, HAS_BIAS=bias is not None, DOT=t.dot,
        # tf32 would cost an fp32 model its precision; bf16/fp16 operands are exact either way.
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out, res_out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tiling: Tiling | None = None) -> torch.Tensor:
    """x [rows, K] @ weight[N, K].T (+ bias)."""
    return _launch(x, weight, bias, NO_PROLOGUE, None, None, 0.0, tiling)[0]


def norm_linear(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None = None, tiling: Tiling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x + residual) @ weight.T and the new residual (x + residual; x when none):
    gpu_kernels.rms_norm followed by the projection, in one launch."""
    out, res_out = _launch(x, weight, bias, NORM, residual, norm_weight, eps, tiling)
    return out, res_out if res_out is not None else x


def silu_linear(gate_up: torch.Tensor, weight: torch.Tensor, tiling: Tiling | None = None) -> torch.Tensor:
    """(silu(gate) * up) @ weight.T for gate_up = [gate | up] rows: gpu_kernels.silu_mul
    followed by the down projection, in one launch."""
    if gate_up.shape[1] != 2 * weight.shape[1]:
        raise ValueError(f"gate_up has {gate_up.shape[1]} columns; the weight takes {weight.shape[1]} x 2")
    return _launch(gate_up, weight, None, SILU, None, None, 0.0, tiling)[0]
