#!/usr/bin/env bash
# Install an etcd binary without root: extract it from Debian's etcd-server package into
# the given bin directory (default .venv/bin). Idempotent: does nothing if etcd is there.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR="${1:-.venv/bin}"
mkdir -p "$BIN_DIR"
if [ -x "$BIN_DIR/etcd" ] && "$BIN_DIR/etcd" --version >/dev/null 2>&1; then
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(
  cd "$work"
  # A fresh machine may have no package lists yet: refresh them once and retry.
  apt-get download etcd-server >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null
    apt-get download etcd-server >/dev/null
  }
  dpkg -x etcd-server_*.deb extracted
)
install -m 0755 "$work/extracted/usr/bin/etcd" "$BIN_DIR/etcd"
# sed reads everything (head would close the pipe early and, under pipefail, fail the script).
"$BIN_DIR/etcd" --version | sed -n 1p
