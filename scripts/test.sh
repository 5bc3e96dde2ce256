#!/usr/bin/env bash
# Installs what the tests need and runs every test: unit tests and end-to-end tests that start
# real brick processes on loopback. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need_build_packages
need_packages fuse3 attr acl libacl1-dev iproute2 iptables nginx-light wordpress rsync systemd \
    curl python3-prometheus-client
need_conformance_tools

echo "== build (target dir $CARGO_TARGET_DIR)"
cargo build --release --workspace --bins
echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
echo "== tests"
log=$(mktemp)
summary=$(mktemp)
trap 'rm -f "$log" "$summary"' EXIT
set +e
MORTAR_BIN_DIR="$BIN_DIR" MORTAR_TOOLS_DIR="$TOOLS_DIR/bin" MORTAR_CONFORMANCE_SUMMARY="$summary" \
    cargo test --release --workspace "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "== conformance (tests/e2e/conformance.rs; exclusions and reasons in tests/conformance/)"
cat "$summary"
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
