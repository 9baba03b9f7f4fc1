#!/usr/bin/env bash
# The one-command local run: set up (first time only), then serve the project's default model
# with frontend, router and a worker in one process on the embedded runtime (no servers).
# Extra flags go to `python -m dynamo.serve` (e.g. --http-port 8080 --engine mocker).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m dynamo.serve "$@"
