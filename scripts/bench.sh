#!/usr/bin/env bash
# Benchmarks. `scripts/bench.sh bricks [N]`: the brick write path, replicated vs one brick with
# replication off, in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_build_packages
what="${1:-bricks}"
case "$what" in
    bricks)
        cargo build --workspace --bins
        "$BIN_DIR/bench-bricks" "${2:-200}"
        ;;
    *)
        echo "usage: scripts/bench.sh bricks [CHUNKS_PER_SIZE]" >&2
        exit 2
        ;;
esac
