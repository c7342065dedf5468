#!/usr/bin/env bash
# Group snapshot latency on both backends: CreateVolumeGroupSnapshot of 2 and
# 8 mounted block volumes (and its delete), next to as many CreateSnapshot
# calls one after another, on thinboxd over an embedded reflink pool (this
# host) and over an embedded dm-thin pool (inside user-mode Linux, whose
# kernel has dm-thin). Needs root (loop devices, mounts).
#
#   sudo bash tests/bench/groups.sh
#
# Builds release thinboxd and thinbox-csi-bench, then per backend: a private
# root, kubelet directory and socket under a fresh directory in TMPDIR (the
# guest's own tmpfs in UML), thinboxd (CSI door only, --release-on-exit),
# `thinbox-csi-bench groups`, SIGTERM, and a check that nothing of the run is
# mounted or attached. Prints one table per backend (also in
# $BENCH_OUT/groups-<backend>.md).
#
# Environment: BENCH_OUT (default target/groups-bench), BENCH_GROUP_ARGS
# (extra arguments for `thinbox-csi-bench groups`, e.g. "--rounds 15").
# Never touches /var/lib/thinbox, /run/thinbox or a system containerd.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/lib/checks.sh
source "$REPO/tests/lib/checks.sh"
# shellcheck source=scripts/lib/processes.sh
source "$REPO/scripts/lib/processes.sh"
OUT=${BENCH_OUT:-$REPO/target/groups-bench}
BIN=$REPO/target/release
log() { echo "[groups.sh] $*" >&2; }

# run_backend BACKEND: one thinboxd on BACKEND and the bench against it.
run_backend() {
    local backend=$1 work pid status=0
    work=$(mktemp -d "${TMPDIR:-/tmp}/tbg.XXXXXX")
    mkdir -p "$work/kubelet/pods" "$work/kata"
    printf '[pool]\nbackend = "%s"\nembedded_size = "4GiB"\n[csi]\nkubelet_dir = "%s/kubelet"\ndirect_volumes = "%s/kata"\n' \
        "$backend" "$work" "$work" >"$work/thinboxd.toml"
    THINBOX_LOG=info "$BIN/thinboxd" --root "$work/state" --no-snapshotter --csi-endpoint "unix://$work/csi.sock" \
        --node-id bench-node --config "$work/thinboxd.toml" --release-on-exit >"$work/thinboxd.log" 2>&1 </dev/null &
    pid=$!
    await_serving "$pid" "$work/thinboxd.log" 1 60 csi || die "thinboxd on $backend did not start"
    # shellcheck disable=SC2086 # BENCH_GROUP_ARGS is a list of arguments
    "$BIN/thinbox-csi-bench" groups --target "$backend=$work/csi.sock,kubelet=$work/kubelet" ${BENCH_GROUP_ARGS:-} \
        >"$OUT/groups-$backend.md" || status=1
    kill -TERM "$pid"
    wait "$pid" || status=1
    cp "$work/thinboxd.log" "$OUT/thinboxd-$backend.log"
    sweep_tmp "$work" >&2 || true
    if [[ -n $(left_under "$work") ]]; then
        log "left behind under $work"
        status=1
    fi
    rm -rf "$work"
    cat "$OUT/groups-$backend.md"
    return "$status"
}

if [[ ${1:-} == --inside ]]; then
    OUT=$2
    run_backend dm-thin
    exit
fi

[[ $(id -u) == 0 ]] || die "needs root (loop devices, mounts)"
mkdir -p "$OUT"
bash "$REPO/tests/uml/install.sh"
cargo build --release -p thinboxd -p thinbox-csi-bench
log "reflink, on this host ($(uname -r)), load $(cut -d' ' -f1-3 /proc/loadavg)"
run_backend reflink
log "dm-thin, in user-mode Linux"
bash "$REPO/tests/uml/run-in-uml.sh" --mem 3G --timeout 1500 -- bash tests/bench/groups.sh --inside "$OUT"
