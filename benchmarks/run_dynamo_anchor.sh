#!/usr/bin/env bash
# Runs NVIDIA Dynamo 1.6.1 (its Rust frontend + its mocker engine) as the anchor we compare our
# frontend with: file discovery, TCP request plane, ZMQ events, so no etcd and no NATS.
#
#   benchmarks/run_dynamo_anchor.sh [--http-port 8000] [--speedup-ratio 1000000]
#                                   [--model-path models/dynamo-tiny] [--model-name tiny]
#                                   [--router-mode round-robin] [--workers 1]
#
# It creates its own virtual environment at $DYN_VENV (default /tmp/dyn) when missing: Dynamo's
# Python package is named `dynamo`, as ours is, so it cannot share the project's venv.
# Runs in the foreground until interrupted (SIGINT/SIGTERM stop the frontend and the mocker(s)).
# The frontend is the process listening on --http-port (benchmarks/proc_cpu.py finds it).
set -euo pipefail
cd "$(dirname "$0")/.."

HTTP_PORT=8000
SPEEDUP=1000000
MODEL_PATH=models/dynamo-tiny
MODEL_NAME=tiny
ROUTER_MODE=round-robin
WORKERS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --http-port) HTTP_PORT="$2"; shift 2 ;;
    --speedup-ratio) SPEEDUP="$2"; shift 2 ;;
    --model-path) MODEL_PATH="$2"; shift 2 ;;
    --model-name) MODEL_NAME="$2"; shift 2 ;;
    --router-mode) ROUTER_MODE="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

DYN_VENV="${DYN_VENV:-/tmp/dyn}"
# From / so that the check imports Dynamo's `dynamo`, not this repository's.
if ! (cd / && "$DYN_VENV/bin/python" -c 'import dynamo.llm, dynamo.mocker' 2>/dev/null); then
  echo "installing NVIDIA Dynamo 1.6.1 into $DYN_VENV" >&2
  python3 -m venv "$DYN_VENV"
  "$DYN_VENV/bin/pip" install -q ai-dynamo-runtime==1.6.1
  # ai-dynamo's aisimulate dependency cannot be fetched here; the mocker runs without it.
  "$DYN_VENV/bin/pip" install -q --no-deps ai-dynamo==1.6.1
  "$DYN_VENV/bin/pip" install -q aiohttp certifi 'kubernetes<33' msgspec prometheus-client pyzmq \
    'redis<9' tqdm transformers typing-extensions 'zstandard<1'
fi

MODEL_PATH="$(cd "$MODEL_PATH" && pwd)"
RUN_DIR="$(mktemp -d /tmp/dyn-anchor.XXXXXX)"
export DYN_DISCOVERY_BACKEND=file DYN_FILE_KV="$RUN_DIR/kv" DYN_REQUEST_PLANE=tcp DYN_EVENT_PLANE=zmq
# Quiet logs: per-request logging would cost the frontend CPU we are measuring.
export DYN_LOG="${DYN_LOG:-warn}"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

# Run from the temp dir so that `python -m dynamo...` imports Dynamo's package, not ours.
cd "$RUN_DIR"
for _ in $(seq "$WORKERS"); do
  "$DYN_VENV/bin/python" -m dynamo.mocker --model-path "$MODEL_PATH" --model-name "$MODEL_NAME" \
    --speedup-ratio "$SPEEDUP" &
  pids+=($!)
done
"$DYN_VENV/bin/python" -m dynamo.frontend --http-port "$HTTP_PORT" --router-mode "$ROUTER_MODE" &
pids+=($!)
wait -n
echo "a Dynamo process exited" >&2
exit 1
