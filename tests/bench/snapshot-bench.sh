#!/usr/bin/env bash
# Snapshot benchmark: the same snapshots.v1 operation sequences against
# containerd's built-in overlayfs snapshotter (baseline, through a private
# containerd's main socket) and thinboxd (its own snapshot socket), targets
# interleaved within each workload. Needs root.
#
#   sudo tests/bench/snapshot-bench.sh [thinbox-snapshot-bench options...]
#   e.g. tests/bench/snapshot-bench.sh --chain-repeats 10 --workloads chain,parallel
#
# Writes to $BENCH_OUT (default target/snapshot-bench/):
#   snapshot-bench.md    Markdown section ready for docs/benchmarks.md
#   snapshot-bench.json  every statistic, machine-readable
#   snapshot-bench.txt   the table as printed
#   thinbox.log, containerd.log  daemon logs of the run
#
# Environment:
#   BENCH_TARGETS=both|overlayfs|thinbox   which daemons to run (default both)
#   BENCH_SKIP_BUILD=1    use the existing target/release binaries
#   BENCH_OUT=DIR         output directory
#   THINBOX_LOG           thinboxd log filter (default info; must keep its info lines)
#   TMPDIR                where the daemons' state goes (default /tmp; keep it
#                         short, unix socket paths are limited to 107 bytes)
# Exit status: the benchmark's (0 all measured, 1 a workload failed or a
# snapshot was left behind, 2 bad usage), or 1 if a daemon or cleanup failed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${BENCH_OUT:-$REPO/target/snapshot-bench}
TARGETS=${BENCH_TARGETS:-both}
NAMESPACE=bench
THINBOXD_BIN=$REPO/target/release/thinboxd
BENCH_BIN=$REPO/target/release/thinbox-snapshot-bench

log() { echo "[snapshot-bench.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

case $TARGETS in
    both) want_thinbox=1 want_overlayfs=1 ;;
    overlayfs) want_thinbox=0 want_overlayfs=1 ;;
    thinbox) want_thinbox=1 want_overlayfs=0 ;;
    *) die "BENCH_TARGETS must be both, overlayfs or thinbox (got $TARGETS)" ;;
esac
[[ $(id -u) == 0 ]] || die "needs root (loop devices, mounts, containerd)"

# ---- build -------------------------------------------------------------------
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    pkgs=(-p thinbox-snapshot-bench)
    (( want_thinbox )) && pkgs+=(-p thinboxd)
    log "building release binaries: ${pkgs[*]}"
    (cd "$REPO" && cargo build --release "${pkgs[@]}")
fi
[[ -x $BENCH_BIN ]] || die "missing $BENCH_BIN"
(( want_thinbox == 0 )) || [[ -x $THINBOXD_BIN ]] || die "missing $THINBOXD_BIN"

# shellcheck source=tests/lib/containerd.sh
source "$REPO/tests/lib/containerd.sh"

mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/thinbox-bench.XXXXXX")
THINBOX_PID=
BENCH_PID=
CLEANED=

# ---- cleanup -----------------------------------------------------------------
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local status=$? leaks
    [[ -z $CLEANED ]] || return 0
    CLEANED=1
    trap - EXIT INT TERM
    # The benchmark first: it removes what it created while the daemons still run.
    if [[ -n $BENCH_PID ]] && kill -0 "$BENCH_PID" 2>/dev/null; then
        kill -TERM "$BENCH_PID" 2>/dev/null || true
        wait "$BENCH_PID" 2>/dev/null || true
    fi
    if [[ -n $THINBOX_PID ]] && kill -0 "$THINBOX_PID" 2>/dev/null; then
        terminate "$THINBOX_PID" 30 thinboxd || status=1
        wait "$THINBOX_PID" 2>/dev/null || true
    fi
    if (( want_overlayfs )); then
        containerd_stop || status=1
    fi
    [[ -f $WORK/thinbox.log ]] && cp "$WORK/thinbox.log" "$OUT/thinbox.log"
    [[ -f $WORK/ctrd/containerd.log ]] && cp "$WORK/ctrd/containerd.log" "$OUT/containerd.log"
    leaks=$( { losetup -a 2>/dev/null | grep -F "$WORK/" || true; }
             { findmnt -rn -o TARGET 2>/dev/null | grep -F "$WORK/" || true; } )
    if [[ -n $leaks ]]; then
        log "LEFT BEHIND (not removing $WORK):"
        echo "$leaks" >&2
        status=1
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

args=()
notes=()

# ---- containerd (baseline) -----------------------------------------------------
if (( want_overlayfs )); then
    containerd_start "$WORK/ctrd" || die "containerd did not start"
    fs=$(findmnt -n -o FSTYPE -T "$WORK/ctrd")
    log "containerd pid $CONTAINERD_PID on $CONTAINERD_ADDRESS"
    args+=(--target "overlayfs=$CONTAINERD_ADDRESS,snapshotter=overlayfs,namespace=$NAMESPACE,pid=$CONTAINERD_PID")
    notes+=(--note "overlayfs: $(containerd --version | awk '{print $1, $3}') (private instance, debug log level), snapshot service on its main socket, root on $fs; its Remove deletes the metadata record and leaves deleting the directories to containerd's background GC, which may overlap later operations")
fi

# ---- thinboxd ----------------------------------------------------------------------
# The snapshot door only (the CSI door's default endpoint is the node's kubelet
# directory). thinboxd binds its socket before it opens the pool: wait for it
# to say it serves, so that no measured call waits for the pool.
if (( want_thinbox )); then
    THINBOX_LOG=${THINBOX_LOG:-info} "$THINBOXD_BIN" --root "$WORK/thinbox" \
        --snapshotter-address "$WORK/thinbox.sock" --no-csi --release-on-exit \
        >"$WORK/thinbox.log" 2>&1 </dev/null &
    THINBOX_PID=$!
    for (( i = 0; i < 300; i++ )); do
        kill -0 "$THINBOX_PID" 2>/dev/null || { tail -n 30 "$WORK/thinbox.log" >&2; die "thinboxd exited during startup"; }
        grep -q 'serving containerd.services.snapshots.v1' "$WORK/thinbox.log" && break
        sleep 0.1
    done
    grep -q 'serving containerd.services.snapshots.v1' "$WORK/thinbox.log" || die "thinboxd did not serve $WORK/thinbox.sock in 30 s"
    log "thinboxd pid $THINBOX_PID on $WORK/thinbox.sock"
    args+=(--target "thinbox=$WORK/thinbox.sock,pid=$THINBOX_PID")
    notes+=(--note "thinbox: thinboxd release build, snapshot socket only (--no-csi), default config (embedded XFS reflink pool on a loop device, ext4 snapshots, loop devices with direct I/O), THINBOX_LOG=${THINBOX_LOG:-info}")
fi

# ---- run -------------------------------------------------------------------------
"$BENCH_BIN" "${args[@]}" "${notes[@]}" \
    --markdown "$OUT/snapshot-bench.md" --json "$OUT/snapshot-bench.json" \
    "$@" >"$OUT/snapshot-bench.txt" &
BENCH_PID=$!
set +e
wait "$BENCH_PID"
bench_status=$?
set -e
BENCH_PID=
cat "$OUT/snapshot-bench.txt"
log "results in $OUT/snapshot-bench.{md,json,txt}"
exit "$bench_status"
