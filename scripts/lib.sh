# Shared by the scripts: package installation and the build location.
# shellcheck shell=bash

# One persistent target directory outside the clone, so RocksDB (C++) is compiled once per
# machine and reused by tests, quickstart and benchmarks alike.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/mortar-target}"
BIN_DIR="$CARGO_TARGET_DIR/release"

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

# The POSIX conformance tools from crates.io, built once per machine beside the target dir,
# and the second dummy user pjdfstest switches to (it also uses nobody/nogroup).
TOOLS_DIR="${MORTAR_TOOLS_ROOT:-/var/cache/mortar-tools}"
need_conformance_tools() {
    local spec
    for spec in pjdfstest@0.2.2 fsx@0.3.2; do
        if [ ! -x "$TOOLS_DIR/bin/${spec%@*}" ]; then
            echo "installing $spec into $TOOLS_DIR"
            cargo install --locked --quiet --root "$TOOLS_DIR" "$spec"
        fi
    done
    if ! getent passwd tests >/dev/null; then
        as_root useradd --system --user-group --no-create-home --shell /usr/sbin/nologin tests
    fi
}
