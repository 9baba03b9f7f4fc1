"""The CUDA path's Triton kernels compiled for an H100 (sm_90) on this CPU machine: Triton's
NVIDIA backend and its ptxas need no GPU. Catches what the CPU interpreter lets through (a
loop-carried value that changes type or shape, a constexpr branch that does not type-check):
twice a kernel that passed every interpreter test failed its first GPU compile. Runs in a
pytest process of its own (scripts/test_vllm.sh): the interpreter, once chosen, replaces
@triton.jit for the process. Skips where Triton is absent (the main venv's CPU torch)."""

from __future__ import annotations

import os
from typing import Any

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("Triton's interpreter is on in this process: nothing compiles", allow_module_level=True)
triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
# Arguments that are not bf16 tensors; the rest are bf16 pointers (names ending in _ptr) or
# int32 scalars.
TYPES = {
    "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_starts_ptr": "*i32", "slot_ptr": "*i64",
    "pos_ptr": "*i64", "ids_ptr": "*i64", "feedback_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
    "qw_ptr": "*bf16", "kw_ptr": "*bf16", "eps": "fp32", "scale_log2": "fp32",
}
DECODE = dict(NUM_Q=32, GROUP=4, GROUP_PAD=16, HEAD_DIM=64, HALF=32, HALF_PAD=32, D_PAD=64, PAGE=16,
              BLOCK_N=128, PRECISION="tf32", HEADS_FIRST=False)


def _compile(name: str, constexprs: dict[str, Any], types: dict[str, str] | None = None) -> None:
    from workers.builtin import triton_kernels

    fn = getattr(triton_kernels, name)
    types = {**TYPES, **(types or {})}
    signature = {
        arg: "constexpr" if arg in constexprs else types.get(arg, "*bf16" if arg.endswith("_ptr") else "i32")
        for arg in fn.arg_names
    }
    missing = set(fn.arg_names) - set(signature)
    assert not missing, missing
    src = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=H100)
    assert "cubin" in compiled.asm


@pytest.mark.parametrize("rope, qk_norm, parts, block_n, full_dot",
                         [(False, False, 1, 128, False), (True, False, 1, 128, False), (True, True, 1, 128, False),
                          (True, False, 3, 128, False), (True, False, 2, 32, False), (False, False, 1, 128, True),
                          (True, True, 2, 64, True)])
def test_paged_decode_compiles(rope: bool, qk_norm: bool, parts: int, block_n: int, full_dot: bool) -> None:
    # Split-K partials are fp32; with ROPE off q is a bf16 [B, heads, dim] tensor. 32 keys: a
    # tile of two pages. The decode graphs' seq_lens are int64. full_dot: whole-row scores.
    _compile("paged_decode", {**DECODE, "ROPE": rope, "QK_NORM": qk_norm, "PARTS": parts, "BLOCK_N": block_n,
                              "FULL_DOT": full_dot},
             {"q_ptr": "*fp32", "seq_lens_ptr": "*i64"} if parts > 1 else {"seq_lens_ptr": "*i64"})


def test_paged_prefill_compiles() -> None:
    _compile("paged_prefill", dict(GROUP=4, GROUP_PAD=4, HEAD_DIM=64, D_PAD=64, PAGE=16, BLOCK_Q=16, BLOCK_N=64,
                                   PRECISION="tf32"))


@pytest.mark.parametrize("has_res, parts", [(False, 1), (True, 1), (True, 2)])
def test_add_rms_norm_compiles(has_res: bool, parts: int) -> None:
    _compile("add_rms_norm", dict(N=2048, BLOCK=2048, HAS_RES=has_res, PARTS=parts),
             {"x_ptr": "*fp32"} if parts > 1 else None)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_and_small_kernels_compile(qk_norm: bool) -> None:
    _compile("rope", dict(NUM_Q=32, NUM_KV=8, HALF=32, HALF_PAD=32, HEAD_DIM=64, HEADS_PAD=64, KV_PAD=8, D_PAD=64,
                          QK_NORM=qk_norm))
    _compile("store_kv", dict(ROW=512, BLOCK=512))
    _compile("silu_mul", dict(N=5632, BLOCK=1024))
    _compile("embed", dict(H=2048, BLOCK=1024), {"weight_ptr": "*bf16"})


@pytest.mark.parametrize("block_m, gate_up, partials", [(16, True, False), (128, True, False), (128, False, True),
                                                         (16, False, False)])
def test_skinny_matmul_compiles(block_m: int, gate_up: bool, partials: bool) -> None:
    _compile("skinny_matmul", dict(N=8192, K_PART=1024, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, GATE_UP=gate_up,
                                   PRECISION="tf32"), {"out_ptr": "*fp32"} if partials else None)
