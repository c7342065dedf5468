#!/usr/bin/env bash
# Image unpack and container start as a user feels them: one private
# containerd 1.6 configured with its built-in overlayfs snapshotter AND the
# thinbox proxy plugin (a private thinboxd, default config), the same
# locally built image (tests/lib/make-oci-image.py --profile bench: 4
# uncompressed layers, ~208 MiB, 20,000 small files, overwrites, whiteouts),
# the same ctr commands, only --snapshotter differs. Needs root.
#
#   sudo tests/bench/unpack-start.sh [ROUNDS]      # default 5 rounds per side
#
# Every round starts from FRESH state: a new thinboxd root (its embedded pool
# made anew) and a new containerd root, both started before the round and
# stopped after it (not measured). Rounds alternate sides, and which side goes
# first alternates too (o t t o o t ...; with THINBOXD_BEFORE_BIN, three sides
# in each of the six orders in turn: use a multiple of 6 rounds), so slow
# phases of a noisy machine hit all alike. In a round, not measured: `ctr images import --no-unpack` (the
# content store only), then `sync`. Measured (wall time of the ctr command):
#   unpack      ctr images import --snapshotter S   (content already there:
#               containerd reads the tar, finds every blob present, and
#               unpacks the 4 layers into snapshots: Prepare, mount, apply
#               the tar, unmount, Commit per layer)
#   run 1       ctr run --rm --snapshotter S IMAGE c1 /bin/true   (Prepare of
#               the rootfs, mount, runc start, exit, unmount, Remove)
#   run 2       the same again, container c2 (the layers exist: a second start),
#               BENCH_STARTS times (c2, c3, ...); the run 2 median is over
#               all of them (starts.tsv; rounds.tsv keeps c2's)
# and prints medians per side and the thinbox / overlayfs ratio, side by side.
#
# Environment:
#   BENCH_SKIP_BUILD=1    use the existing target/release/thinboxd (no cargo)
#   THINBOXD_BIN=PATH     thinboxd to measure (no build; default
#                         target/release/thinboxd, built first)
#   THINBOXD_BEFORE_BIN=PATH  a third side, "thinbox-before": the same rounds
#                         with this thinboxd (e.g. built from an older commit),
#                         interleaved with the others (the order rotates)
#   BENCH_STARTS=K        second starts per round (default 1); a second start
#                         varies by tens of ms, so more of them resolve
#                         smaller differences
#   BENCH_OUT=DIR         output (default target/unpack-start/): rounds.tsv
#                         (every measurement), starts.tsv (every second
#                         start), summary.txt, per-round daemon
#                         logs of the last round of each side
#   BENCH_STRACE=1        also record `strace -f -T -tt` of thinboxd (all
#                         calls) and of containerd and its shims (mounts,
#                         unmounts, syncs), as thinboxd.strace and
#                         containerd-SIDE.strace (the figures then mean
#                         little; this is for finding where the time goes)
#   THINBOX_LOG           thinboxd's log filter (default info)
#   CONTAINERD_LOG_LEVEL  containerd's (default info)
#   TMPDIR                where all state goes (default /tmp; keep it short)
# Leaves nothing behind: daemons, shims, mounts and loops go after each round;
# a leftover loop or mount under the run's directory fails the run.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROUNDS=${1:-5}
STARTS=${BENCH_STARTS:-1}
OUT=${BENCH_OUT:-$REPO/target/unpack-start}
BUILD=1
[[ -z ${THINBOXD_BIN:-} && ${BENCH_SKIP_BUILD:-0} != 1 ]] || BUILD=0
THINBOXD_BIN=${THINBOXD_BIN:-$REPO/target/release/thinboxd}
IMAGE=localhost/thinbox-bench:4layers
export CTR_NAMESPACE=bench
export CONTAINERD_LOG_LEVEL=${CONTAINERD_LOG_LEVEL:-info}

log() { echo "[unpack-start] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive number (got $ROUNDS)"
[[ $STARTS =~ ^[1-9][0-9]*$ ]] || die "BENCH_STARTS must be a positive number (got $STARTS)"
[[ $(id -u) == 0 ]] || die "needs root (loop devices, mounts, containerd)"
for tool in containerd ctr runc python3 strace; do
    [[ $tool == strace && ${BENCH_STRACE:-0} != 1 ]] && continue
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
[[ -x /bin/busybox ]] || die "/bin/busybox missing (apt-get install -y busybox-static)"

if (( BUILD )); then
    log "building thinboxd (release)"
    (cd "$REPO" && cargo build --release -p thinboxd)
fi
[[ -x $THINBOXD_BIN ]] || die "missing $THINBOXD_BIN"

# shellcheck source=tests/lib/containerd.sh
source "$REPO/tests/lib/containerd.sh"

mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tb-us.XXXXXX")
TB_PID=
STRACE_PID=
CSTRACE_PID=
CLEANED=

stop_round() {
    local st=0
    containerd_stop || st=1
    if [[ -n $CSTRACE_PID ]]; then
        wait "$CSTRACE_PID" 2>/dev/null || true
        CSTRACE_PID=
    fi
    if [[ -n $TB_PID ]] && kill -0 "$TB_PID" 2>/dev/null; then
        terminate "$TB_PID" 30 thinboxd || st=1
        wait "$TB_PID" 2>/dev/null || true
    fi
    if [[ -n $STRACE_PID ]]; then
        wait "$STRACE_PID" 2>/dev/null || true
        STRACE_PID=
    fi
    TB_PID=
    return $st
}

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local status=$?
    [[ -z $CLEANED ]] || return 0
    CLEANED=1
    trap - EXIT INT TERM
    stop_round || status=1
    clear_or_keep "$WORK" || status=1
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "building the image"
python3 "$REPO/tests/lib/make-oci-image.py" "$WORK/image.tar" --profile bench --ref "$IMAGE" >/dev/null

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000 )) | awk '{printf "%.1f", $1 / 1000}'; }

# One round of side $1 (overlayfs|thinbox|thinbox-before) in directory $2;
# appends to rounds.tsv. containerd's proxy plugin is "thinbox" on every side;
# thinbox-before only runs another thinboxd behind it.
round() {
    local side=$1 dir=$2 n=$3 t unpack run1 run2 k ms sn=$1 bin=$THINBOXD_BIN
    [[ $side != thinbox-before ]] || { sn=thinbox; bin=$THINBOXD_BEFORE_BIN; }
    mkdir -p "$dir"
    : >"$dir/thinboxd.log"
    THINBOX_LOG=${THINBOX_LOG:-info} "$bin" --root "$dir/tb" \
        --snapshotter-address "$dir/tb.sock" --no-csi --release-on-exit \
        >"$dir/thinboxd.log" 2>&1 </dev/null &
    TB_PID=$!
    await_serving "$TB_PID" "$dir/thinboxd.log" 1 30 snapshots || die "thinboxd did not start"
    if [[ ${BENCH_STRACE:-0} == 1 && $sn == thinbox ]]; then
        strace -f -T -tt -qq -o "$dir/thinboxd.strace" -p "$TB_PID" &
        STRACE_PID=$!
        sleep 0.5
    fi
    containerd_start "$dir/ctd" "$dir/tb.sock" || die "containerd did not start"
    if [[ ${BENCH_STRACE:-0} == 1 ]]; then
        strace -f -T -tt -qq -e trace=mount,umount2,fsync,fdatasync,sync,syncfs,ioctl \
            -o "$dir/containerd.strace" -p "$CONTAINERD_PID" &
        CSTRACE_PID=$!
        sleep 0.5
    fi
    [[ $(ctr_ plugins ls | awk '$1 == "io.containerd.snapshotter.v1" && $2 == "thinbox" {print $NF}') == ok ]] ||
        die "containerd did not load the thinbox proxy plugin"
    ctr_ images import --no-unpack "$WORK/image.tar" >/dev/null
    sync

    t=$(date +%s%N)
    ctr_ images import --snapshotter "$sn" "$WORK/image.tar" >/dev/null
    unpack=$(ms_since "$t")
    t=$(date +%s%N)
    ctr_ run "${CTR_RUN_FLAGS[@]}" --rm --null-io --snapshotter "$sn" "$IMAGE" c1 /bin/true
    run1=$(ms_since "$t")
    run2=
    for (( k = 2; k <= STARTS + 1; k++ )); do
        t=$(date +%s%N)
        ctr_ run "${CTR_RUN_FLAGS[@]}" --rm --null-io --snapshotter "$sn" "$IMAGE" "c$k" /bin/true
        ms=$(ms_since "$t")
        run2=${run2:-$ms}
        printf '%s\t%s\t%s\t%s\n' "$n" "$side" "$k" "$ms" >>"$OUT/starts.tsv"
    done

    [[ $(ctr_ snapshots --snapshotter "$sn" ls | awk 'NR > 1 && $NF == "Committed"' | wc -l) == 4 ]] ||
        die "$side: expected 4 committed layers after unpack"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$side" "$unpack" "$run1" "$run2" "$(cut -d' ' -f1 /proc/loadavg)" >>"$OUT/rounds.tsv"
    log "round $n $side: unpack $unpack ms, run 1 $run1 ms, run 2 $run2 ms (load $(cut -d' ' -f1 /proc/loadavg))"
    stop_round || die "$side: stopping the daemons failed"
    [[ -z $(left_under "$WORK") ]] || die "$side: round $n left loops or mounts behind"
    cp "$dir/thinboxd.log" "$OUT/thinboxd-$side.log"
    cp "$dir/ctd/containerd.log" "$OUT/containerd-$side.log"
    [[ ! -f $dir/thinboxd.strace ]] || cp "$dir/thinboxd.strace" "$OUT/thinboxd.strace"
    [[ ! -f $dir/containerd.strace ]] || cp "$dir/containerd.strace" "$OUT/containerd-$side.strace"
    rm -rf "$dir"
}

SIDES=(overlayfs thinbox)
if [[ -n ${THINBOXD_BEFORE_BIN:-} ]]; then
    [[ -x $THINBOXD_BEFORE_BIN ]] || die "missing $THINBOXD_BEFORE_BIN"
    SIDES+=(thinbox-before)
fi
printf 'round\tside\tunpack_ms\trun1_ms\trun2_ms\tload1\n' >"$OUT/rounds.tsv"
printf 'round\tside\tcontainer\tms\n' >"$OUT/starts.tsv"
start_load=$(cut -d' ' -f1-3 /proc/loadavg)
for (( r = 1; r <= ROUNDS; r++ )); do
    # Two sides: o t, t o, o t, ...; three: the six orders in turn (o t b,
    # o b t, t o b, t b o, b o t, b t o, ...), so over 6 rounds every side
    # follows every other side equally often (a rotation would put one side
    # after overlayfs, whose unpack leaves the host the most to write, more
    # often than the other).
    if (( ${#SIDES[@]} == 2 )); then
        order=("${SIDES[(r + 1) % 2]}" "${SIDES[r % 2]}")
    else
        perm=("012" "021" "102" "120" "201" "210")
        p=${perm[(r - 1) % 6]}
        order=("${SIDES[${p:0:1}]}" "${SIDES[${p:1:1}]}" "${SIDES[${p:2:1}]}")
    fi
    for side in "${order[@]}"; do
        round "$side" "$WORK/r$r-$side" "$r"
    done
done
end_load=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- summary -------------------------------------------------------------
summary() {
    echo "unpack + container start, $ROUNDS fresh rounds per side ($STARTS second starts in each), medians (ms)"
    echo "image: $IMAGE (make-oci-image.py --profile bench), $(containerd --version | awk '{print $1, $3}'), $(runc --version | head -n 1)"
    echo "machine: $(nproc) CPUs, $(uname -r), load average at start $start_load, at end $end_load"
    echo "thinboxd: $THINBOXD_BIN"
    [[ -z ${THINBOXD_BEFORE_BIN:-} ]] || echo "thinbox-before: $THINBOXD_BEFORE_BIN"
    # Steps 1-3 from rounds.tsv; run 2 (step 4) from starts.tsv: every second start.
    awk -F'\t' -v before="${THINBOXD_BEFORE_BIN:+1}" '
        function add(side, step, x) { val[side, step, ++cnt[side, step]] = x }
        function median(side, step,    n, i, j, tmp, v) {
            n = cnt[side, step]
            for (i = 1; i <= n; i++) v[i] = val[side, step, i]
            for (i = 2; i <= n; i++) { tmp = v[i]; for (j = i - 1; j >= 1 && v[j] > tmp; j--) v[j + 1] = v[j]; v[j + 1] = tmp }
            return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
        }
        FNR == 1 { next }
        FILENAME ~ /starts.tsv$/ { add($2, 4, $4); next }
        { add($2, 1, $3); add($2, 2, $4); add($2, 3, $3 + $4) }
        END {
            split("unpack|run 1 (first start)|unpack + run 1|run 2 (second start)", name, "|")
            printf "| %-22s | %12s | %10s | %19s |", "step", "overlayfs ms", "thinbox ms", "thinbox / overlayfs"
            if (before) printf " %17s | %26s |", "thinbox-before ms", "thinbox-before / overlayfs"
            printf "\n|%s|%s|%s|%s|", "------------------------", "-------------:", "-----------:", "--------------------:"
            if (before) printf "%s|%s|", "------------------:", "---------------------------:"
            printf "\n"
            for (k = 1; k <= 4; k++) {
                o = median("overlayfs", k); t = median("thinbox", k)
                printf "| %-22s | %12.1f | %10.1f | %18.2f× |", name[k], o, t, (o > 0 ? t / o : 0)
                if (before) { b = median("thinbox-before", k); printf " %17.1f | %25.2f× |", b, (o > 0 ? b / o : 0) }
                printf "\n"
            }
        }' "$OUT/rounds.tsv" "$OUT/starts.tsv"
}
summary | tee "$OUT/summary.txt"
log "every round in $OUT/rounds.tsv"
