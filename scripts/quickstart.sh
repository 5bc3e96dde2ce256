#!/usr/bin/env bash
# Quickstart: a local three-brick volume `www`, mounted. Installs its packages, builds, makes a
# CA and certificates, starts three bricks on 127.0.0.1:7001-7003, creates the volume and mounts
# it at /srv/www (root, and free) or ./mnt/www. Prometheus metrics: bricks on :9101-9103, the
# mount on :9104. A second run reuses everything that exists.
#   scripts/quickstart.sh        start (or confirm it is running)
#   scripts/quickstart.sh stop   unmount and stop the bricks (data is kept)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

# Overridable so tests can run a quickstart beside a real one.
STATE="${MORTAR_QUICKSTART_DIR:-$PWD/.quickstart}"
IP="${MORTAR_QUICKSTART_IP:-127.0.0.1}"
BRICKS="$IP:7001,$IP:7002,$IP:7003"
PKI="$STATE/pki"

mounted() { grep -qs "^mortar:[^ ]* $1 fuse" /proc/self/mounts; }

# Processes serving a mortar mount at $1 (read from /proc: procps may not be installed).
mount_pids() {
    local d cmd
    for d in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null) || continue
        case "$cmd" in *mortar-mount*" $1 "*) echo "${d#/proc/}" ;; esac
    done
}

stop() {
    if [ -f "$STATE/mountpoint" ]; then
        mnt=$(cat "$STATE/mountpoint")
        if mounted "$mnt"; then
            # The mount commits what it still holds (files closed under a directory
            # delegation) after the unmount and before it exits: wait for that before the
            # bricks stop.
            pids=$(mount_pids "$mnt")
            umount "$mnt" && echo "unmounted $mnt"
            for pid in $pids; do
                for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            done
        fi
    fi
    for i in 1 2 3; do
        pidfile="$STATE/brick$i.pid"
        if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            pid=$(cat "$pidfile")
            kill -TERM "$pid"
            for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            echo "stopped brick$i"
        fi
        rm -f "$pidfile"
    done
}

if [ "${1:-}" = "stop" ]; then
    stop
    exit 0
fi

need_build_packages
need_packages fuse3
echo "== building (target dir $CARGO_TARGET_DIR)"
cargo build --release --workspace --bins
M="$BIN_DIR/mortar"
mkdir -p "$STATE"

[ -f "$PKI/ca.pem" ] || "$M" ca init --dir "$PKI"
for n in brick1 brick2 brick3; do [ -f "$PKI/$n.pem" ] || "$M" cert issue --ca "$PKI" --role brick --name "$n"; done
[ -f "$PKI/admin.pem" ] || "$M" cert issue --ca "$PKI" --role admin --name admin
[ -f "$PKI/client.pem" ] || "$M" cert issue --ca "$PKI" --role client --name client
export MORTAR_CERT="$PKI/admin.pem" MORTAR_KEY="$PKI/admin.key" MORTAR_CA="$PKI/ca.pem" MORTAR_BRICKS="$BRICKS"

for i in 1 2 3; do
    pidfile="$STATE/brick$i.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "brick$i already running (pid $(cat "$pidfile"))"
        continue
    fi
    setsid "$BIN_DIR/mortar-brick" --data "$STATE/brick$i" --listen "$IP:700$i" \
        --cert "$PKI/brick$i.pem" --key "$PKI/brick$i.key" --ca "$PKI/ca.pem" \
        --log-file "$STATE/brick$i.log" --metrics "$IP:910$i" </dev/null >>"$STATE/brick$i.log" 2>&1 &
    echo $! >"$pidfile"
    echo "started brick$i on $IP:700$i (pid $!, log $STATE/brick$i.log)"
done

# Wait until every brick answers (`volume list` fails while any is unreachable).
for _ in $(seq 1 300); do
    "$M" volume list >/dev/null 2>&1 && break
    sleep 0.2
done
"$M" volume list >/dev/null
if "$M" volume info www >/dev/null 2>&1; then
    echo "volume www exists"
else
    "$M" volume create www replica 3 "$IP:7001" "$IP:7002" "$IP:7003"
fi

if [ -n "${MORTAR_QUICKSTART_MNT:-}" ]; then
    MNT="$MORTAR_QUICKSTART_MNT"
elif [ -f "$STATE/mountpoint" ]; then
    MNT=$(cat "$STATE/mountpoint")
elif [ "$(id -u)" -eq 0 ] && ! mountpoint -q /srv/www 2>/dev/null && { [ ! -e /srv/www ] || [ -z "$(ls -A /srv/www 2>/dev/null)" ]; }; then
    MNT=/srv/www
else
    MNT="$PWD/mnt/www"
fi
mkdir -p "$MNT"
echo "$MNT" >"$STATE/mountpoint"
if [ "$(id -u)" -eq 0 ]; then
    ln -sf "$BIN_DIR/mortar-mount" /sbin/mount.mortar
fi
if mounted "$MNT"; then
    echo "www already mounted at $MNT"
else
    "$BIN_DIR/mortar-mount" "$BRICKS:/www" "$MNT" \
        -o "cert=$PKI/client.pem,key=$PKI/client.key,ca=$PKI/ca.pem,log=$STATE/mount.log,metrics=$IP:9104"
    echo "mounted www at $MNT (log $STATE/mount.log)"
fi
cat <<MSG

mortar quickstart is up:
  volume www on bricks $BRICKS (data in $STATE)
  mounted at $MNT
  status:  MORTAR_CERT=$PKI/admin.pem MORTAR_KEY=$PKI/admin.key MORTAR_CA=$PKI/ca.pem \\
           $M volume status www --bricks $BRICKS
  metrics: curl http://$IP:9101/metrics (bricks 9101-9103, the mount 9104)
  stop:    scripts/quickstart.sh stop
MSG
