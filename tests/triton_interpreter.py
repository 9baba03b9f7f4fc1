"""Triton kernels' tests without a GPU: Triton's CPU interpreter, chosen before Triton is first
imported (it reads TRITON_INTERPRET when @triton.jit runs, its own library included). Where
Triton is absent (CI's main venv: CPU torch brings none) the module skips; under
DYN_TEST_TRITON=1 (scripts/test.sh's run in the vLLM venv, which has Triton) it must not."""

from __future__ import annotations

import os
import sys

import pytest
import torch


def use_interpreter_unless_cuda() -> bool:
    """Call at the top of a test module, before importing what imports Triton. True on CUDA."""
    required = os.environ.get("DYN_TEST_TRITON") == "1"
    if torch.cuda.is_available():
        cuda = True
    else:
        cuda = False
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            why = "Triton was imported before its interpreter could be chosen"
            if required:
                pytest.fail(why + " (run these tests in a pytest process of their own)", pytrace=False)
            pytest.skip(why, allow_module_level=True)
        os.environ["TRITON_INTERPRET"] = "1"
    if required:
        import triton  # noqa: F401  (a skip here would hide the kernels' tests)
    else:
        pytest.importorskip("triton")
    return cuda
