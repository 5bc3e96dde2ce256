#!/usr/bin/env bash
# The failover drill: kill, freeze and cut off each brick in turn under a live workload on a
# mount (writer + nginx/wrk) and print, per fault, the longest stall, failed operations and
# whether every acknowledged write survived.
#   scripts/failover-drill.sh [HOLD_SECS]    (default 60: each fault is held a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_build_packages
need_packages fuse3 iptables nginx-light wrk curl
cargo build --release --workspace --bins
"$BIN_DIR/failover-drill" "${1:-60}"
