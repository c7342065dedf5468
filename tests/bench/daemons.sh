#!/usr/bin/env bash
# One daemon vs two: thinboxd (this tree) against the two daemons it replaced,
# thinbox-snapshotter and thinbox-csi as of commit 65005f8 (each over its own
# pool), side by side in one run. Needs root (loop devices, mounts).
#
#   sudo tests/bench/daemons.sh
#
# 1. Builds release binaries: thinbox-csi-bench from this tree; thinboxd
#    from a clean git worktree of HEAD and the two old daemons from one of the
#    old commit, each under the run's private directory (removed at the end)
#    with a cargo target directory of its own, so that uncommitted edits in
#    this tree are never measured.
# 2. Memory, BENCH_MEM_ROUNDS rounds: starts both sides on fresh roots under
#    TMPDIR (the side that starts and fills first alternates), fills each with
#    the same BENCH_SNAPSHOTS snapshots (10 images of 10 committed layers,
#    the rest active snapshots on their tops) over snapshots.v1 and the same
#    BENCH_VOLUMES block volumes (1 GiB, ext4) over CSI, waits BENCH_IDLE_SECS
#    with everything idle and reads VmRSS, VmHWM, RssAnon and Pss of all three
#    processes at once.
# 3. CSI calls, on the last round's (still filled) daemons: BENCH_ROUNDS
#    rounds of CreateVolume, NodePublishVolume (host mount), CreateSnapshot,
#    NodeUnpublishVolume, DeleteSnapshot, DeleteVolume (block, ext4) against
#    thinbox-csi and thinboxd, the two taking turns, order reversed every round.
# 4. Stops everything (every daemon with --release-on-exit), sweeps what is left
#    under the private directory, fails if a loop device or mount remains, and
#    prints one table (also in $BENCH_OUT/daemons-bench.md).
#
# Environment:
#   BENCH_OLD_REV=65005f8     the two-daemon commit
#   BENCH_OLD_BIN_DIR=DIR     use its prebuilt release binaries from DIR (no worktree)
#   BENCH_OLD_TARGET=DIR      cargo target dir of the old build (default target/bench-old)
#   BENCH_NEW_REV=HEAD        the one-daemon commit
#   BENCH_NEW_BIN_DIR=DIR     use its prebuilt release thinboxd from DIR (no worktree)
#   BENCH_NEW_TARGET=DIR      cargo target dir of its build (default target/bench-new)
#   BENCH_SKIP_BUILD=1        use this tree's existing target/release/thinbox-csi-bench
#   BENCH_ROUNDS=30           measured CSI rounds per daemon (BENCH_WARMUP=2 before)
#   BENCH_MEM_ROUNDS=3        fill-and-measure rounds
#   BENCH_SNAPSHOTS=1000 BENCH_VOLUMES=100 BENCH_IDLE_SECS=5
#   BENCH_OUT=DIR             output directory (default target/daemons-bench)
#   TMPDIR                    where the daemons' roots go (default /tmp; keep it
#                             short: unix socket paths are limited to 107 bytes)
# Never touches /var/lib/thinbox, /run/thinbox or a system containerd: every
# root, socket, kubelet and Kata directory is under the private directory.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/lib/checks.sh
source "$REPO/tests/lib/checks.sh"
# shellcheck source=scripts/lib/processes.sh
source "$REPO/scripts/lib/processes.sh"

OLD_REV=${BENCH_OLD_REV:-65005f8}
ROUNDS=${BENCH_ROUNDS:-30}
WARMUP=${BENCH_WARMUP:-2}
MEM_ROUNDS=${BENCH_MEM_ROUNDS:-3}
SNAPSHOTS=${BENCH_SNAPSHOTS:-1000}
VOLUMES=${BENCH_VOLUMES:-100}
IDLE=${BENCH_IDLE_SECS:-5}
OUT=${BENCH_OUT:-$REPO/target/daemons-bench}
OLD_TARGET=${BENCH_OLD_TARGET:-$REPO/target/bench-old}
NEW_REV=${BENCH_NEW_REV:-HEAD}
NEW_TARGET=${BENCH_NEW_TARGET:-$REPO/target/bench-new}
BENCH=$REPO/target/release/thinbox-csi-bench
export THINBOX_LOG=info

log() { echo "[daemons.sh] $*" >&2; }
[[ $(id -u) == 0 ]] || die "needs root (loop devices, mounts)"

mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tbd.XXXXXX")
OLD_TREE=
NEW_TREE=
PIDS=()   # every daemon started, for the cleanup
BENCH_PID=
CLEANED=

# ---- cleanup -----------------------------------------------------------------
stop_daemons() {
    local pid st=0
    for pid in "${PIDS[@]}"; do
        terminate "$pid" 60 daemon || st=1
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    return "$st"
}

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local status=$? leaks
    [[ -z $CLEANED ]] || return 0
    CLEANED=1
    trap - EXIT INT TERM
    # The client first: it undoes what it made while the daemons still run.
    stop_client "$BENCH_PID"
    stop_daemons || status=1
    cp "$WORK"/*.log "$OUT/" 2>/dev/null || true
    for tree in "$OLD_TREE" "$NEW_TREE"; do
        [[ -n $tree ]] || continue
        git -C "$REPO" worktree remove --force "$tree" || status=1
    done
    git -C "$REPO" worktree prune || true
    # Whatever a daemon that died did not release.
    sweep_tmp "$WORK" >&2 || true
    leaks=$(left_under "$WORK")
    if [[ -n $leaks ]]; then
        log "LEFT BEHIND:"
        echo "$leaks" >&2
        status=1
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- build -------------------------------------------------------------------
OLD_SHA=$(git -C "$REPO" rev-parse --short "$OLD_REV^{commit}")
NEW_SHA=$(git -C "$REPO" rev-parse --short "$NEW_REV^{commit}")
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building thinbox-csi-bench (release)"
    (cd "$REPO" && cargo build --release -p thinbox-csi-bench)
fi
# build_rev SHA DIR TARGET PACKAGE...: a release build of SHA in a new
# worktree DIR with cargo target directory TARGET.
build_rev() {
    local sha=$1 dir=$2 target=$3 pkg args=()
    shift 3
    for pkg in "$@"; do args+=(-p "$pkg"); done
    log "building $* at $sha in a worktree ($dir, target $target)"
    git -C "$REPO" worktree add --detach "$dir" "$sha" >&2
    (cd "$dir" && CARGO_TARGET_DIR=$target cargo build --release "${args[@]}")
}
if [[ -n ${BENCH_OLD_BIN_DIR:-} ]]; then
    OLD_BIN=$BENCH_OLD_BIN_DIR
else
    OLD_TREE=$WORK/old-src
    build_rev "$OLD_SHA" "$OLD_TREE" "$OLD_TARGET" thinbox-snapshotter thinbox-csi
    OLD_BIN=$OLD_TARGET/release
fi
if [[ -n ${BENCH_NEW_BIN_DIR:-} ]]; then
    THINBOXD=$BENCH_NEW_BIN_DIR/thinboxd
else
    NEW_TREE=$WORK/new-src
    build_rev "$NEW_SHA" "$NEW_TREE" "$NEW_TARGET" thinboxd
    THINBOXD=$NEW_TARGET/release/thinboxd
fi
for b in "$THINBOXD" "$BENCH" "$OLD_BIN/thinbox-snapshotter" "$OLD_BIN/thinbox-csi"; do
    [[ -x $b ]] || die "missing $b"
done

# ---- daemons -------------------------------------------------------------------
# await_doors PID LOG DOOR...: until the daemon's log says it serves every DOOR
# (the daemons open their pool before they say so).
await_doors() {
    local pid=$1 file=$2
    shift 2
    await_serving "$pid" "$file" 1 60 "$@" || die "daemon $pid did not start"
}

# start_old DIR: thinbox-snapshotter and thinbox-csi, each on its own root
# and pool; sets OLD_SNAP_PID, OLD_CSI_PID.
start_old() {
    local d=$1
    mkdir -p "$d/kubelet/pods" "$d/kata"
    printf '[pool]\nbackend = "reflink"\n' >"$d/snap.toml"
    printf 'kubelet_dir = "%s/kubelet"\ndirect_volumes = "%s/kata"\n[pool]\nbackend = "reflink"\n' "$d" "$d" >"$d/csi.toml"
    "$OLD_BIN/thinbox-snapshotter" --root "$d/snap" --address "$d/snap.sock" --config "$d/snap.toml" \
        --release-on-exit >"$d.snapshotter.log" 2>&1 </dev/null &
    OLD_SNAP_PID=$!
    PIDS+=("$OLD_SNAP_PID")
    "$OLD_BIN/thinbox-csi" --endpoint "unix://$d/csi.sock" --node-id bench-node --root "$d/csi" \
        --config "$d/csi.toml" --release-on-exit >"$d.csi.log" 2>&1 </dev/null &
    OLD_CSI_PID=$!
    PIDS+=("$OLD_CSI_PID")
    await_doors "$OLD_SNAP_PID" "$d.snapshotter.log" snapshots
    await_doors "$OLD_CSI_PID" "$d.csi.log" csi
}

# start_new DIR: thinboxd serving both doors over one pool; sets NEW_PID.
start_new() {
    local d=$1
    mkdir -p "$d/kubelet/pods" "$d/kata"
    printf '[pool]\nbackend = "reflink"\n[csi]\nkubelet_dir = "%s/kubelet"\ndirect_volumes = "%s/kata"\n' "$d" "$d" >"$d/thinboxd.toml"
    "$THINBOXD" --root "$d/state" --snapshotter-address "$d/snap.sock" --csi-endpoint "unix://$d/csi.sock" \
        --node-id bench-node --config "$d/thinboxd.toml" --release-on-exit >"$d.thinboxd.log" 2>&1 </dev/null &
    NEW_PID=$!
    PIDS+=("$NEW_PID")
    await_doors "$NEW_PID" "$d.thinboxd.log" snapshots csi
}

fill() {
    local d=$1
    "$BENCH" fill --snapshots "$d/snap.sock" --snapshot-count "$SNAPSHOTS" --csi "$d/csi.sock" --volumes "$VOLUMES" >&2
}

# ---- memory ------------------------------------------------------------------------
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
MEM=$WORK/memory.jsonl
for (( r = 1; r <= MEM_ROUNDS; r++ )); do
    OLD=$WORK/o$r NEW=$WORK/n$r
    if (( r % 2 == 1 )); then
        log "memory round $r/$MEM_ROUNDS: two daemons, then thinboxd"
        start_old "$OLD"; fill "$OLD"; start_new "$NEW"; fill "$NEW"
    else
        log "memory round $r/$MEM_ROUNDS: thinboxd, then two daemons"
        start_new "$NEW"; fill "$NEW"; start_old "$OLD"; fill "$OLD"
    fi
    "$BENCH" memory --round "$r" --idle-secs "$IDLE" --out "$MEM" \
        --process "before:thinbox-snapshotter=$OLD_SNAP_PID" --process "before:thinbox-csi=$OLD_CSI_PID" \
        --process "after:thinboxd=$NEW_PID" >&2
    if (( r < MEM_ROUNDS )); then
        stop_daemons || die "a daemon did not stop on SIGTERM"
    fi
done

# ---- CSI calls -----------------------------------------------------------------------
log "CSI calls: $ROUNDS rounds (after $WARMUP unmeasured) on each of the filled daemons"
"$BENCH" calls --rounds "$ROUNDS" --warmup "$WARMUP" --out "$WORK/calls.json" \
    --target "before=$OLD/csi.sock,kubelet=$OLD/kubelet" --target "after=$NEW/csi.sock,kubelet=$NEW/kubelet" >&2 &
BENCH_PID=$!
wait "$BENCH_PID" || die "thinbox-csi-bench calls failed"
BENCH_PID=
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
stop_daemons || die "a daemon did not stop on SIGTERM"
cp "$MEM" "$WORK/calls.json" "$OUT/"

# ---- report ------------------------------------------------------------------------
if [[ -n ${BENCH_OLD_BIN_DIR:-} ]]; then old_from="prebuilt in $BENCH_OLD_BIN_DIR"; else old_from="built from a clean worktree"; fi
if [[ -n ${BENCH_NEW_BIN_DIR:-} ]]; then new_from="prebuilt in $BENCH_NEW_BIN_DIR"; else new_from="built from a clean worktree"; fi
"$BENCH" report --memory "$MEM" --calls "$WORK/calls.json" \
    --note "before: thinbox-snapshotter + thinbox-csi at $OLD_SHA ($old_from), each on its own root and embedded reflink pool; after: thinboxd at $NEW_SHA ($new_from), one root, one pool, both doors; release builds, THINBOX_LOG=info, --release-on-exit" \
    --note "fill: $SNAPSHOTS snapshots (10 images x 10 committed layers, $((SNAPSHOTS - 100)) active snapshots on their tops) and $VOLUMES block volumes (1 GiB, ext4, not published) per side; memory read after ${IDLE} s idle, all processes at once" \
    --note "CSI calls run on the memory run's last, still filled, daemons; thinboxd's DeleteVolume and DeleteSnapshot return once the record is gone and its background deleter destroys the device afterwards, while thinbox-csi at $OLD_SHA destroyed it before answering" \
    --note "host: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), kernel $(uname -r); load average $LOAD_START at the start, $LOAD_END at the end" \
    | tee "$OUT/daemons-bench.md"
log "results in $OUT (daemons-bench.md, memory.jsonl, calls.json, daemon logs)"
