#!/usr/bin/env bash
# The one-command local run: set up (first time only), then serve the project's default model
# with frontend, router and a worker in one process on the embedded runtime (no servers), on
# http://127.0.0.1:8000 only (loopback; DYN_HTTP_HOST or --http-host 0.0.0.0 opens it wider).
# Extra flags go to `python -m dynamo.serve` (e.g. --http-port 8080 --engine mocker).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DYN_HTTP_HOST="${DYN_HTTP_HOST:-127.0.0.1}"
exec .venv/bin/python -m dynamo.serve "$@"
