#!/usr/bin/env bash
# Snapshot benchmark: the same snapshots.v1 operation sequences against
# containerd's built-in overlayfs snapshotter (baseline) and thinboxd, both
# through ONE private containerd's main socket (snapshotter=overlayfs vs
# snapshotter=thinbox, the latter containerd's proxy plugin for thinboxd), so
# containerd's metadata store and gRPC hop are on both sides alike; targets
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
#   THINBOXD_BIN=PATH     thinboxd to measure (not built; default
#                         target/release/thinboxd, built unless BENCH_SKIP_BUILD)
#   THINBOXD_BEFORE_BIN=PATH  also measure this second thinboxd (e.g. built
#                         from an older commit) as target "thinbox-before":
#                         its own root, a second proxy plugin of the same
#                         containerd, interleaved with the others. A binary
#                         named thinbox-snapshotter (the daemon before
#                         thinboxd, e.g. 65005f8) is started with its own flags
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
BUILD_THINBOXD=1
[[ -z ${THINBOXD_BIN:-} ]] || BUILD_THINBOXD=0
THINBOXD_BIN=${THINBOXD_BIN:-$REPO/target/release/thinboxd}
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
    (( want_thinbox && BUILD_THINBOXD )) && pkgs+=(-p thinboxd)
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
BEFORE_PID=
BENCH_PID=
CLEANED=

# ---- cleanup -----------------------------------------------------------------
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local status=$?
    [[ -z $CLEANED ]] || return 0
    CLEANED=1
    trap - EXIT INT TERM
    # The benchmark first: it removes what it created while the daemons still run.
    stop_client "$BENCH_PID"
    containerd_stop || status=1
    for pid in $THINBOX_PID $BEFORE_PID; do
        if kill -0 "$pid" 2>/dev/null; then
            terminate "$pid" 30 thinboxd || status=1
            wait "$pid" 2>/dev/null || true
        fi
    done
    [[ -f $WORK/thinbox.log ]] && cp "$WORK/thinbox.log" "$OUT/thinbox.log"
    [[ -f $WORK/before.log ]] && cp "$WORK/before.log" "$OUT/thinbox-before.log"
    [[ -f $WORK/ctrd/containerd.log ]] && cp "$WORK/ctrd/containerd.log" "$OUT/containerd.log"
    clear_or_keep "$WORK" || status=1
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

args=()
notes=()

# ---- thinboxd ----------------------------------------------------------------------
# The snapshot door only (the CSI door's default endpoint is the node's kubelet
# directory). thinboxd binds its socket before it opens the pool: wait for it
# to say it serves, so that no measured call waits for the pool.
# start_thinboxd BIN ROOT SOCKET LOG: starts it, sets STARTED_PID.
start_thinboxd() {
    local bin=$1 root=$2 sock=$3 logf=$4 args
    : >"$logf"
    if [[ ${bin##*/} == thinbox-snapshotter ]]; then
        args=(--root "$root" --address "$sock" --release-on-exit)
    else
        args=(--root "$root" --snapshotter-address "$sock" --no-csi --release-on-exit)
    fi
    THINBOX_LOG=${THINBOX_LOG:-info} "$bin" "${args[@]}" >"$logf" 2>&1 </dev/null &
    STARTED_PID=$!
    await_serving "$STARTED_PID" "$logf" 1 30 snapshots || die "$bin did not start"
    log "thinboxd ($bin) pid $STARTED_PID on $sock"
}
if (( want_thinbox )); then
    start_thinboxd "$THINBOXD_BIN" "$WORK/thinbox" "$WORK/thinbox.sock" "$WORK/thinbox.log"
    THINBOX_PID=$STARTED_PID
    notes+=(--note "thinboxd: release build, snapshot socket only (--no-csi), default config (embedded XFS reflink pool on a loop device, ext4 snapshots, loop devices with direct I/O), THINBOX_LOG=${THINBOX_LOG:-info}")
    if [[ -n ${THINBOXD_BEFORE_BIN:-} ]]; then
        start_thinboxd "$THINBOXD_BEFORE_BIN" "$WORK/before" "$WORK/before.sock" "$WORK/before.log"
        BEFORE_PID=$STARTED_PID
        CONTAINERD_EXTRA_CONFIG=$(printf '[proxy_plugins.thinbox-before]\n  type = "snapshot"\n  address = "%s"\n' "$WORK/before.sock")
        export CONTAINERD_EXTRA_CONFIG
    fi
fi

# ---- containerd: overlayfs built in, thinbox as its proxy plugin ---------------
proxy=()
(( want_thinbox == 0 )) || proxy=("$WORK/thinbox.sock")
containerd_start "$WORK/ctrd" "${proxy[@]}" || die "containerd did not start"
fs=$(findmnt -n -o FSTYPE -T "$WORK/ctrd")
log "containerd pid $CONTAINERD_PID on $CONTAINERD_ADDRESS"
if (( want_thinbox )); then
    [[ $(ctr --address "$CONTAINERD_ADDRESS" plugins ls | awk '$1 == "io.containerd.snapshotter.v1" && $2 == "thinbox" {print $NF}') == ok ]] ||
        die "containerd did not load the thinbox proxy plugin"
fi
if (( want_overlayfs )); then
    args+=(--target "overlayfs=$CONTAINERD_ADDRESS,snapshotter=overlayfs,namespace=$NAMESPACE,pid=$CONTAINERD_PID")
    notes+=(--note "overlayfs: $(containerd --version | awk '{print $1, $3}') (private instance, debug log level), its built-in snapshotter through its main socket, root on $fs; its Remove deletes the metadata record and leaves deleting the directories to containerd's background GC, which may overlap later operations")
fi
if (( want_thinbox )); then
    args+=(--target "thinbox=$CONTAINERD_ADDRESS,snapshotter=thinbox,namespace=$NAMESPACE,pid=$THINBOX_PID")
    notes+=(--note "thinbox: the same containerd's main socket, snapshotter=thinbox (proxy plugin to thinboxd); as for overlayfs, containerd's Remove deletes its record and its GC calls the snapshotter's Remove later. RSS is thinboxd's")
    if [[ -n $BEFORE_PID ]]; then
        args+=(--target "thinbox-before=$CONTAINERD_ADDRESS,snapshotter=thinbox-before,namespace=$NAMESPACE,pid=$BEFORE_PID")
        notes+=(--note "thinbox-before: $THINBOXD_BEFORE_BIN, same default config, its own root, the same containerd's second proxy plugin")
    fi
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
