#!/usr/bin/env bash
# The vLLM half of the test command (scripts/test.sh starts it beside the main suite): installs
# vLLM for CPUs into its own virtualenv (scripts/install_vllm.sh: about 3.5 minutes and 3.5 GB the
# first time, then a stamp check), then runs the tests that need it there.
#
#   bash scripts/test_vllm.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.venv-vllm}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! bash scripts/install_vllm.sh "$VENV" >"$log" 2>&1; then
  grep -v "^WARNING: Location 'file:" "$log" | tail -40
  echo "test_vllm.sh: scripts/install_vllm.sh failed; DYN_SKIP_VLLM=1 skips the vLLM suite" >&2
  exit 1
fi

# The Triton kernels of the CUDA path in Triton's CPU interpreter (vLLM brings Triton; the main
# venv's CPU torch has none, so they skip there), in a pytest process of their own: vLLM imports
# Triton before the interpreter could be chosen. DYN_TEST_TRITON=1 makes a missing Triton a failure.
DYN_TEST_TRITON=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/unit/workers/builtin/test_builtin_gpu_kernels.py tests/unit/kvbm/transfer/test_copy_kernel.py
# The same kernels compiled for an H100 (Triton's NVIDIA backend needs no GPU): what the
# interpreter lets through. Its own process, without the interpreter.
TRITON_DEFAULT_FP_FUSION=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/unit/workers/builtin/test_triton_compile.py

# DYN_TEST_VLLM=1 (with CI=true) turns "vLLM not importable" from a skip into a failure. The
# SGLang/TensorRT-LLM unit tests run here again for the ZMQ test that needs pyzmq (vLLM brings it),
# and the structured-output tests on the llguidance vLLM pins (the project allows it).
DYN_TEST_VLLM=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" \
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/integration/test_vllm_worker.py tests/unit/workers/sglang tests/unit/workers/trtllm \
  tests/unit/workers/structured tests/integration/test_vllm_kvbm.py tests/unit/workers/vllm_connectors \
  tests/integration/test_vllm_disagg.py
