#!/usr/bin/env bash
# Set up (first time only), then run the whole test suite: unit, integration (real nats-server
# and etcd started by the tests on free loopback ports) and end-to-end over HTTP.
# Extra arguments go to pytest (e.g. -m "not e2e", -k router).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
