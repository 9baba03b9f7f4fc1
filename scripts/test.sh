#!/usr/bin/env bash
# Set up (first time only), then run the whole test suite: unit, integration (real nats-server
# and etcd started by the tests on free loopback ports) and end-to-end over HTTP; and beside it
# the vLLM worker's suite on vLLM for CPUs, in its own virtualenv (scripts/test_vllm.sh: .venv-vllm,
# made by scripts/install_vllm.sh, about 3.5 minutes and 3.5 GB the first time, then a stamp
# check), whose output is printed once the main suite has passed.
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

# The vLLM half (scripts/test_vllm.sh: the install, then its tests) runs beside the main suite, not
# after it: the main suite keeps about one of two cores busy (it mostly waits on the processes its
# tests start), so run one after the other, the machine idles half the time and CI's wall time is
# the sum. Its output is printed once it ends. Job control puts it in a process group of its own,
# so that a failing main suite can end it whole (pip, pytest and the engines they start).
VLLM_VENV="${DYN_VLLM_VENV:-.venv-vllm}"
vllm_pid=""
if [ "$run_vllm" = "1" ]; then
  vlog="$(mktemp)"
  echo "test.sh: installing vLLM into $VLLM_VENV and running its suite in the background (log: $vlog)"
  set -m
  bash scripts/test_vllm.sh "$VLLM_VENV" >"$vlog" 2>&1 &
  vllm_pid=$!
  set +m
  trap 'if [ -n "$vllm_pid" ]; then kill -- "-$vllm_pid" 2>/dev/null; fi; true' EXIT
fi

# The main venv has no vLLM: its vLLM tests skip there (DYN_TEST_VLLM is set only in test_vllm.sh).
env -u DYN_TEST_VLLM .venv/bin/python -m pytest -q "$@"

if [ "$run_vllm" = "0" ]; then
  echo "test.sh: vLLM suite not run ($why)"
  exit 0
fi

echo "test.sh: main suite passed; waiting for the vLLM suite"
rc=0
wait "$vllm_pid" || rc=$?
vllm_pid=""
echo "test.sh: the vLLM suite (scripts/test_vllm.sh), rc $rc:"
cat "$vlog"
rm -f "$vlog"
exit "$rc"
