#!/usr/bin/env bash
# Benchmarks, each measured against a local directory (or one brick) in the same run.
#   scripts/bench.sh docroot      a web docroot workload on a mortar mount vs a local directory
#   scripts/bench.sh bricks [N]   the brick write path: replicated vs one brick, no replication
#   scripts/bench.sh heal [F M]   heal info / heal / heal --full over F files, M missed by a brick
#   scripts/bench.sh rebalance [MIB]  add-brick + rebalance of MIB MiB, with a reader's rate
#                                 during it as a share of before
#   scripts/bench.sh snapshot [N]  snapshot create over N entries (100,000) against cp -al of
#                                 the same tree locally; disk use; restore and list times
#   scripts/bench.sh model [N]    the mount's reference-model property test with N sequences
#                                 (20,000 by default; CI runs 2,000); MORTAR_MODEL_SEED replays one
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

bricks() {
    need_build_packages
    cargo build --release --workspace --bins
    "$BIN_DIR/bench-bricks" "${1:-200}"
}

heal() {
    need_build_packages
    cargo build --release --workspace --bins
    "$BIN_DIR/bench-heal" "${1:-5000}" "${2:-1000}"
}

rebalance() {
    need_build_packages
    cargo build --release --workspace --bins
    MORTAR_BIN_DIR="$BIN_DIR" "$BIN_DIR/bench-rebalance" "${1:-512}"
}

snapshot() {
    need_build_packages
    need_packages fuse3
    cargo build --release --workspace --bins
    MORTAR_BIN_DIR="$BIN_DIR" "$BIN_DIR/bench-snapshot" "${1:-100000}"
}

model() {
    need_build_packages
    need_packages fuse3
    cargo build --release --workspace --bins
    MORTAR_BIN_DIR="$BIN_DIR" MORTAR_MODEL_CASES="${1:-20000}" \
        cargo test --release --workspace --test model -- --nocapture
}

now() { date +%s.%N; }
# Seconds taken by a command.
timed() { local t0; t0=$(now); "$@" >/dev/null; echo "$(now) - $t0" | bc -l; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

create_files() { # DIR: create 5,000 4 KiB files in DIR/cd
    python3 - "$1" <<'PY'
import os, sys
d = os.path.join(sys.argv[1], "cd")
os.mkdir(d)
buf = os.urandom(4096)
for i in range(5000):
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(buf)
PY
}

delete_files() { # DIR: delete the 5,000 files create_files made, one unlink each
    python3 - "$1" <<'PY'
import os, sys
d = os.path.join(sys.argv[1], "cd")
for i in range(5000):
    os.unlink(os.path.join(d, f"f{i}"))
os.rmdir(d)
PY
}

# fio random 4 KiB reads of FILE for 10 s by JOBS synchronous readers (JOBS=16: queue depth
# 16); prints IOPS.
random_reads() {
    fio --name=rr --filename="$1" --rw=randread --bs=4k --ioengine=psync --numjobs="$2" \
        --group_reporting --time_based --runtime=10 --size=256M --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["iops"])'
}

# A deploy's update: every tenth file of SRC changed (a line appended), in a copy at DST.
changed_tree() {
    rm -rf "$2"
    cp -a "$1" "$2"
    find "$2" -type f | awk 'NR % 10 == 0' | while IFS= read -r f; do echo "// deploy 2" >>"$f"; done
}

# cp -a SRC into DIR. With "durable", also fsyncdir the copy, so the time counts until every
# copied file is on a quorum (files closed under a directory delegation may still be held in
# the mount's memory when cp exits). The local copy is not synced: a conservative comparison.
copy_in() {
    cp -a "$1" "$2/"
    if [ "${3:-}" = durable ]; then
        # coreutils sync given a directory opens it and fsyncs it: an fsyncdir, without timing
        # an interpreter's start-up too.
        sync "$2/$(basename "$1")"
    fi
}

# nginx on ADDR serving ROOT; prints "requests/s p99" from wrk.
serve_and_load() {
    local root=$1 addr=$2 conf=$3
    cat >"$conf" <<NGX
user root; master_process off; worker_processes 1; pid $conf.pid; error_log $conf.err;
events { worker_connections 256; }
http { access_log off; server { listen $addr; root $root; } }
NGX
    nginx -c "$conf" -g 'daemon off;' &
    local pid=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null "http://$addr/" && break; sleep 0.1; done
    local out
    out=$(wrk -t2 -c16 -d10s --latency "http://$addr/wordpress/readme.html")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    local rps p99
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    echo "$rps $p99"
}

# Convert wrk latency (e.g. 1.23ms, 850.00us, 1.2s) to milliseconds.
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000; printf "%.2f", n }'; }

docroot() {
    local copies=${COPIES:-3}
    if ! [[ $copies =~ ^[1-9][0-9]*$ ]]; then
        echo "bench.sh: COPIES must be a whole number of at least 1, not '$copies'" >&2
        exit 2
    fi
    need_build_packages
    need_packages fuse3 wordpress nginx-light wrk bc curl python3 fio rsync
    local work=/var/tmp/mortar-bench
    local qs="$work/qs"
    if [ -f "$qs/mountpoint" ]; then
        MORTAR_QUICKSTART_DIR="$qs" bash scripts/quickstart.sh stop >/dev/null || true
    fi
    rm -rf "$work"
    mkdir -p "$work/local" "$work/mnt"
    quickstart() {
        MORTAR_QUICKSTART_DIR="$qs" MORTAR_QUICKSTART_IP=127.88.0.1 MORTAR_QUICKSTART_MNT="$work/mnt" \
            bash scripts/quickstart.sh >/dev/null
    }
    quickstart
    # shellcheck disable=SC2064 # expand $qs now: it is local to this function
    trap "MORTAR_QUICKSTART_DIR='$qs' bash scripts/quickstart.sh stop >/dev/null" EXIT
    # Cold: the kernel's caches dropped and, for mortar, the client remounted (its own caches
    # gone); the bricks keep running.
    cold() {
        if [ "$1" = mnt ]; then
            umount "$work/mnt"
            quickstart
        fi
        drop_caches
    }
    # After a step that changed the tree, commit what the mount still holds (an fsyncdir
    # commits everything held under delegations), untimed: each timed step then starts with
    # no earlier step's commits competing for the CPU. The local side gets a sync too.
    settle() { sync "$work/$1"; }
    local src=/usr/share/wordpress files
    files=$(find "$src" -type f | wc -l)
    head -c $((1024 * 1024 * 1024)) /dev/urandom >"$work/big.src"
    tar -C /usr/share -cf "$work/wordpress.tar" wordpress
    changed_tree "$src" "$work/wordpress-v2"

    declare -A T
    # One copy swings by ±15% from run to run on a shared 2-core machine, on both sides: copy
    # COPIES times, local and mortar in turn, and compare the medians. The first copy stays for
    # the workloads after it; the others are removed.
    local i where
    for i in $(seq 1 "$copies"); do
        for where in local mnt; do
            local durable=""
            [ "$where" = mnt ] && durable=durable
            mkdir -p "$work/$where/copy$i"
            drop_caches
            T[$where.copies]+="$(timed copy_in "$src" "$work/$where/copy$i" $durable) "
            settle $where
        done
    done
    for where in local mnt; do
        mv "$work/$where/copy1/wordpress" "$work/$where/wordpress"
        rm -rf "$work/$where"/copy*
        # shellcheck disable=SC2086 # one word per copy
        T[$where.copy]=$(median ${T[$where.copies]})
    done
    for where in local mnt; do
        local d="$work/$where"
        mkdir "$d/untar"
        drop_caches
        T[$where.untar]=$(timed tar -C "$d/untar" -xf "$work/wordpress.tar")
        settle $where
        cold $where
        T[$where.stat_cold]=$(timed find "$d/wordpress" -printf '%s %T@\n')
        T[$where.stat_warm]=$(timed find "$d/wordpress" -printf '%s %T@\n')
        cold $where
        T[$where.read_cold]=$(timed bash -c "find '$d/wordpress' -type f -print0 | xargs -0 cat")
        T[$where.read_warm]=$(timed bash -c "find '$d/wordpress' -type f -print0 | xargs -0 cat")
        T[$where.create]=$(timed create_files "$d")
        settle $where
        T[$where.delete]=$(timed delete_files "$d")
        settle $where
        T[$where.rmrf]=$(timed rm -rf "$d/untar")
        settle $where
        drop_caches
        T[$where.rsync_new]=$(timed rsync -a "$src/" "$d/deploy/")
        settle $where
        T[$where.rsync_update]=$(timed rsync -a "$work/wordpress-v2/" "$d/deploy/")
        settle $where
        drop_caches
        T[$where.write_1g]=$(timed dd if="$work/big.src" of="$d/big" bs=1M conv=fsync status=none)
        cold $where
        T[$where.read_1g]=$(timed dd if="$d/big" of=/dev/null bs=1M status=none)
        head -c $((256 * 1024 * 1024)) "$work/big.src" >"$d/random"
        sync
        cold $where
        T[$where.rr1]=$(random_reads "$d/random" 1)
        cold $where
        T[$where.rr16]=$(random_reads "$d/random" 16)
        rm -f "$d/big" "$d/random"
    done
    read -r l_rps l_p99 < <(serve_and_load "$work/local" 127.88.0.1:18181 "$work/ngx-local.conf")
    read -r m_rps m_p99 < <(serve_and_load "$work/mnt" 127.88.0.1:18182 "$work/ngx-mnt.conf")

    echo "mortar vs local directory, $(date -u +%F), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg) at the end;"
    echo "three bricks and the client on this machine; the release build ($BIN_DIR)"
    printf '%-40s %14s %14s %10s\n' "workload" "local" "mortar" "mortar/local"
    row() { # name unit local_value mortar_value higher_is_better
        local ratio
        if [ "$5" = 1 ]; then ratio=$(echo "$4 / $3" | bc -l); else ratio=$(echo "$3 / $4" | bc -l); fi
        printf '%-40s %14s %14s %10.2f\n' "$1 ($2)" "$(printf '%.1f' "$3")" "$(printf '%.1f' "$4")" "$ratio"
    }
    rate() { echo "$1 / $2" | bc -l; }
    row "untar wordpress ($files files)" "files/s" "$(rate "$files" "${T[local.untar]}")" "$(rate "$files" "${T[mnt.untar]}")" 1
    row "cp -a wordpress*" "files/s" "$(rate "$files" "${T[local.copy]}")" "$(rate "$files" "${T[mnt.copy]}")" 1
    row "stat every entry, cold" "entries/s" "$(rate "$files" "${T[local.stat_cold]}")" "$(rate "$files" "${T[mnt.stat_cold]}")" 1
    row "stat every entry, warm" "entries/s" "$(rate "$files" "${T[local.stat_warm]}")" "$(rate "$files" "${T[mnt.stat_warm]}")" 1
    row "read every file, cold" "files/s" "$(rate "$files" "${T[local.read_cold]}")" "$(rate "$files" "${T[mnt.read_cold]}")" 1
    row "read every file, warm" "files/s" "$(rate "$files" "${T[local.read_warm]}")" "$(rate "$files" "${T[mnt.read_warm]}")" 1
    row "nginx static file" "requests/s" "$l_rps" "$m_rps" 1
    row "nginx static file p99" "ms" "$(to_ms "$l_p99")" "$(to_ms "$m_p99")" 0
    row "create 5,000 4 KiB files" "files/s" "$(rate 5000 "${T[local.create]}")" "$(rate 5000 "${T[mnt.create]}")" 1
    row "delete 5,000 small files" "files/s" "$(rate 5000 "${T[local.delete]}")" "$(rate 5000 "${T[mnt.delete]}")" 1
    row "rm -rf of the tree" "files/s" "$(rate "$files" "${T[local.rmrf]}")" "$(rate "$files" "${T[mnt.rmrf]}")" 1
    row "rsync -a deploy, new tree" "files/s" "$(rate "$files" "${T[local.rsync_new]}")" "$(rate "$files" "${T[mnt.rsync_new]}")" 1
    row "rsync -a deploy, 10% changed" "files/s" "$(rate "$files" "${T[local.rsync_update]}")" "$(rate "$files" "${T[mnt.rsync_update]}")" 1
    row "1 GiB sequential write + fsync" "MiB/s" "$(rate 1024 "${T[local.write_1g]}")" "$(rate 1024 "${T[mnt.write_1g]}")" 1
    row "1 GiB sequential read, cold" "MiB/s" "$(rate 1024 "${T[local.read_1g]}")" "$(rate 1024 "${T[mnt.read_1g]}")" 1
    row "random 4 KiB read QD1, cold" "IOPS" "${T[local.rr1]}" "${T[mnt.rr1]}" 1
    row "random 4 KiB read QD16, cold" "IOPS" "${T[local.rr16]}" "${T[mnt.rr16]}" 1
    echo "* median of $copies copies on each side, taken in turn; mortar's copy time includes an fsyncdir of the copy"
    echo "  (every file on a quorum), the local one is not synced. Seconds per copy:"
    echo "  local: ${T[local.copies]}"
    echo "  mortar: ${T[mnt.copies]}"
}

case "${1:-docroot}" in
    docroot) docroot ;;
    bricks) bricks "${2:-200}" ;;
    heal) heal "${2:-5000}" "${3:-1000}" ;;
    rebalance)
        [[ "${2:-512}" =~ ^[1-9][0-9]*$ ]] || { echo "rebalance: MIB must be a whole number of at least 1" >&2; exit 2; }
        rebalance "${2:-512}"
        ;;
    snapshot)
        [[ "${2:-100000}" =~ ^[1-9][0-9]*$ ]] || { echo "snapshot: N must be a whole number of at least 1" >&2; exit 2; }
        snapshot "${2:-100000}"
        ;;
    model)
        [[ "${2:-20000}" =~ ^[1-9][0-9]*$ ]] || { echo "model: N must be a whole number of at least 1" >&2; exit 2; }
        model "${2:-20000}"
        ;;
    *)
        echo "usage: scripts/bench.sh [docroot | bricks [CHUNKS_PER_SIZE] | heal [FILES MISSED] | rebalance [MIB] | snapshot [ENTRIES] | model [SEQUENCES]]" >&2
        exit 2
        ;;
esac
