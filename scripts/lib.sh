# Shared by the scripts: package installation and the build location.
# shellcheck shell=bash

# One persistent target directory outside the clone, so RocksDB (C++) is compiled once per
# machine and reused by tests, quickstart and benchmarks alike.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/mortar-target}"
BIN_DIR="$CARGO_TARGET_DIR/debug"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Install Debian packages that are not installed yet.
need_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# What building mortar needs: a C++ toolchain and libclang for RocksDB's bindings.
need_build_packages() {
    need_packages build-essential libclang-dev pkg-config
    as_root mkdir -p "$CARGO_TARGET_DIR"
}
