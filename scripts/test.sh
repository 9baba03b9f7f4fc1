#!/usr/bin/env bash
# Set up (first time only), then run the whole test suite: unit, integration (real nats-server
# and etcd started by the tests on free loopback ports) and end-to-end over HTTP; then, once that
# passes, the vLLM worker's suite on vLLM for CPUs, in its own virtualenv (.venv-vllm, made by
# scripts/install_vllm.sh while the main suite runs: about 3.5 minutes and 3.5 GB the first
# time, then a stamp check).
#
# Extra arguments go to the main pytest run (e.g. -m "not e2e", -k router) and skip the vLLM
# phase. DYN_SKIP_VLLM=1 skips the vLLM phase too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

run_vllm=1
if [ "$#" -gt 0 ]; then
  run_vllm=0; why="extra pytest arguments were given"
elif [ "${DYN_SKIP_VLLM:-0}" = "1" ]; then
  run_vllm=0; why="DYN_SKIP_VLLM=1"
fi

# The vLLM install (minutes of download and unpacking the first time, a stamp check after) runs
# beside the main suite rather than after it: it waits on the network and the disk, the suite
# mostly on its own processes, and CI's wall time is the sum otherwise.
VLLM_VENV="${DYN_VLLM_VENV:-.venv-vllm}"
log="$(mktemp)"
install_pid=""
if [ "$run_vllm" = "1" ]; then
  echo "test.sh: installing vLLM into $VLLM_VENV in the background (log: $log)"
  bash scripts/install_vllm.sh "$VLLM_VENV" >"$log" 2>&1 &
  install_pid=$!
  # A failing suite ends the script: take the install (and pip under it) down with it.
  trap 'if [ -n "$install_pid" ]; then pkill -P "$install_pid" 2>/dev/null; kill "$install_pid" 2>/dev/null; fi; true' EXIT
fi

# The main venv has no vLLM: its vLLM tests skip there (DYN_TEST_VLLM is set only below).
env -u DYN_TEST_VLLM .venv/bin/python -m pytest -q "$@"

if [ "$run_vllm" = "0" ]; then
  echo "test.sh: vLLM suite not run ($why)"
  exit 0
fi

echo "test.sh: waiting for the vLLM install"
if ! wait "$install_pid"; then
  install_pid=""
  grep -v "^WARNING: Location 'file:" "$log" | tail -40
  echo "test.sh: scripts/install_vllm.sh failed; DYN_SKIP_VLLM=1 skips the vLLM suite" >&2
  exit 1
fi
install_pid=""
rm -f "$log"

# DYN_TEST_VLLM=1 (with CI=true) turns "vLLM not importable" from a skip into a failure. The
# SGLang/TensorRT-LLM unit tests run here again for the ZMQ test that needs pyzmq (vLLM brings it),
# and the structured-output tests on the llguidance vLLM pins (the project allows it). First, the
# Triton kernels of the CUDA path in Triton's CPU interpreter (vLLM brings Triton; the main venv's
# CPU torch has none, so they skip there).
# A pytest process of its own: vLLM imports Triton before the interpreter could be chosen.
DYN_TEST_TRITON=1 "$VLLM_VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/unit/workers/builtin/test_builtin_gpu_kernels.py tests/unit/kvbm/transfer/test_copy_kernel.py
DYN_TEST_VLLM=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" \
  exec "$VLLM_VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/integration/test_vllm_worker.py tests/unit/workers/sglang tests/unit/workers/trtllm \
  tests/unit/workers/structured tests/integration/test_vllm_kvbm.py tests/unit/workers/vllm_connectors \
  tests/integration/test_vllm_disagg.py
