#!/usr/bin/env bash
# The serving stack as wheels for a GPU host that has torch and Triton but no package index
# (the GPU benchmarks and tests run there need no more): downloads them for CPython 3.12 on
# x86-64 Linux into DIR (default .whl). On that host:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=$PWD:/tmp/site
# Names the host already had (torch, numpy, transformers, prometheus-client, ...) are left out.
set -euo pipefail
dir="${1:-.whl}"
mkdir -p "$dir"
platforms=()
for p in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=(--platform "${p}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" \
  msgspec nats-py aetcd fastapi starlette pydantic pydantic-core annotated-types typing-inspection \
  typing-extensions uvicorn httptools "llguidance>=1.7,<2" pytest-asyncio
ls "$dir"
