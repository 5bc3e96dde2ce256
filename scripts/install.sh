#!/usr/bin/env bash
# Installs mortar: the release build of mortar, mortar-brick and mortar-mount under
# /usr/local/bin, the mount helper /sbin/mount.mortar, the systemd units, example
# configuration under /etc/mortar and a logrotate snippet. Every file it writes is listed in
# /usr/local/share/mortar/installed-files, which `--uninstall` removes (configuration the
# administrator wrote, such as /etc/mortar/brick-*.toml and certificates, stays).
#
# Usage: scripts/install.sh [--bin-dir DIR] [--uninstall]
#   --bin-dir DIR  install the binaries already built in DIR instead of building them
#   DESTDIR=/path  stage the whole tree under /path (for packaging); paths inside stay as above
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

DESTDIR="${DESTDIR:-}"
PREFIX=/usr/local
MANIFEST="$PREFIX/share/mortar/installed-files"
bin_dir=""
uninstall=0
while [ $# -gt 0 ]; do
    case "$1" in
    --bin-dir)
        [ $# -ge 2 ] || { echo "install.sh: --bin-dir needs a directory" >&2; exit 2; }
        bin_dir="$2"
        shift 2
        ;;
    --uninstall) uninstall=1; shift ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

if [ "$uninstall" = 1 ]; then
    if [ ! -f "$DESTDIR$MANIFEST" ]; then
        echo "install.sh: mortar is not installed here (no $DESTDIR$MANIFEST)" >&2
        exit 1
    fi
    # Files first, then the directories they leave empty (deepest first).
    while IFS= read -r f; do
        if [ -L "$DESTDIR$f" ] || [ -f "$DESTDIR$f" ]; then
            rm -f "$DESTDIR$f"
            echo "removed $f"
        fi
    done <"$DESTDIR$MANIFEST"
    rm -f "$DESTDIR$MANIFEST"
    for d in "$PREFIX/share/mortar" "$PREFIX/share/doc/mortar/examples" "$PREFIX/share/doc/mortar" /etc/mortar; do
        rmdir "$DESTDIR$d" 2>/dev/null || true
    done
    if [ -d "$DESTDIR/etc/mortar" ]; then
        echo "kept /etc/mortar (configuration and certificates written after the install)"
    fi
    echo "mortar uninstalled"
    exit 0
fi

if [ -z "$bin_dir" ]; then
    need_build_packages
    echo "== building the release binaries (target dir $CARGO_TARGET_DIR)"
    cargo build --release --workspace --bins
    bin_dir="$BIN_DIR"
fi
for b in mortar mortar-brick mortar-mount; do
    [ -x "$bin_dir/$b" ] || { echo "install.sh: $bin_dir/$b is missing (build first)" >&2; exit 1; }
done

installed=()
# put MODE SOURCE TARGET: copy SOURCE to TARGET (a path in the installed system).
put() {
    install -D -m "$1" "$2" "$DESTDIR$3"
    installed+=("$3")
}
# put_new MODE SOURCE TARGET: as put, but an existing file (the administrator's) is kept.
put_new() {
    if [ -e "$DESTDIR$3" ]; then
        echo "kept $3 (exists)"
    else
        put "$@"
    fi
}

for b in mortar mortar-brick mortar-mount; do
    put 0755 "$bin_dir/$b" "$PREFIX/bin/$b"
done
# mount -t mortar runs /sbin/mount.mortar (on Debian /sbin is /usr/sbin).
mkdir -p "$DESTDIR/sbin"
ln -sfn "$PREFIX/bin/mortar-mount" "$DESTDIR/sbin/mount.mortar"
installed+=(/sbin/mount.mortar)
for u in mortar-brick@.service mortar-heal@.service mortar-heal@.timer \
    mortar-snapshot@.service mortar-snapshot@.timer; do
    put 0644 "scripts/systemd/$u" "/etc/systemd/system/$u"
done
put 0644 scripts/systemd/srv-www.mount "$PREFIX/share/doc/mortar/examples/srv-www.mount"
put 0644 scripts/mortar-heal.cron "$PREFIX/share/doc/mortar/examples/mortar-heal.cron"
put 0644 scripts/mortar-snapshot.cron "$PREFIX/share/doc/mortar/examples/mortar-snapshot.cron"
put_new 0644 scripts/brick.toml.example /etc/mortar/brick.toml.example
put_new 0644 scripts/heal.env.example /etc/mortar/heal.env.example
put 0644 scripts/logrotate/mortar /etc/logrotate.d/mortar
mkdir -p "$DESTDIR/var/log/mortar"

mkdir -p "$(dirname "$DESTDIR$MANIFEST")"
printf '%s\n' "${installed[@]}" >"$DESTDIR$MANIFEST"
echo "installed mortar ($("$DESTDIR$PREFIX/bin/mortar" --version)) from $bin_dir:"
printf '  %s\n' "${installed[@]}"
cat <<MSG
Next: a brick per data disk, configured in /etc/mortar/brick-NAME.toml (see
/etc/mortar/brick.toml.example), started by: systemctl enable --now mortar-brick@NAME
Mount with an /etc/fstab line such as:  h1,h2,h3:/www  /srv/www  mortar  _netdev,defaults  0  0
MSG
