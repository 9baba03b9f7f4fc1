#!/usr/bin/env bash
# Issue 21's GPU figures in one go, for a GPU host with torch and Triton (see offline_wheels.sh
# for the rest): run from the repository root as
#   OUT=/some/dir bash benchmarks/gpu_suite.sh [stage ...]
# Stages (all by default, in this order): tests (the GPU tests, which skip in CI), decode
# (builtin_gpu.py: decode % of the HBM floor at batch 1/32/128, prefill % of the matmul peak),
# offline (nano-vllm's workload in process), http (the same through dynamo.serve
# --worker-processes), kvbm (the multi-turn workload, G1 only against small host + disk, with
# the admission probe). With BASE=<dir of an older tree> the kvbm stage runs there too,
# alternating, for a side-by-side ratio. Each stage is bounded; JSON lands in $OUT.
set -uo pipefail
out="${OUT:-/tmp/gpu_suite}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
root="$PWD"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests decode offline http kvbm)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
kvbm() {  # $1: tree root, $2: tag
  (cd "$1" && PYTHONPATH="$1:${PYTHONPATH:-}" timeout 200 python3 "$root/benchmarks/kvbm_admission_probe.py" \
    --configs g1_only g1_g2small_g3 --json-out "$out/kvbm_$2.json" 2>&1 | grep -E "QPROBE|^ratios|^g1|^config|failed|Error")
}
for stage in "${stages[@]}"; do
  echo "== $stage"
  case "$stage" in
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/unit/workers/builtin/test_builtin_gpu_kernels.py \
             tests/unit/workers/builtin/test_builtin_gpu_graphs.py tests/unit/workers/builtin/test_builtin_kvbm.py \
             tests/unit/kvbm/test_plan_executor.py tests/unit/kvbm/test_tier_upkeep.py 2>&1 | tail -4 ;;
    decode) timeout 200 python3 benchmarks/builtin_gpu.py --no-reference --batches 1 32 128 --out "$out/builtin_gpu.json" 2>&1 | tail -20 ;;
    offline) timeout 150 python3 benchmarks/builtin_offline.py --modes overlap --runner-steps 0 --out "$out/offline.json" 2>&1 | tail -6 ;;
    http) timeout 200 python3 benchmarks/serve_offline_http.py --worker-processes --out "$out/http.json" 2>&1 | tail -8 ;;
    kvbm) for round in 1 2; do
            [ -n "${BASE:-}" ] && kvbm "$BASE" "base_$round"
            kvbm "$root" "new_$round"
          done ;;
    *) echo "unknown stage $stage" ;;
  esac
done
