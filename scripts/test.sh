#!/usr/bin/env bash
# Installs what the tests need and runs every test: unit tests and end-to-end tests that start
# real brick processes on loopback. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need_build_packages
need_packages fuse3 attr iproute2

echo "== build (target dir $CARGO_TARGET_DIR)"
cargo build --workspace --bins
echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
echo "== tests"
MORTAR_BIN_DIR="$BIN_DIR" cargo test --workspace "$@"
