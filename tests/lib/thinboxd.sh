# shellcheck shell=bash
# thinboxd for the host scripts: the real daemon on a private root, serving
# its snapshot socket only (--no-csi: CSI's default endpoint lies in the
# node's kubelet directory, which no test touches). Source it after
# tests/lib/checks.sh (uses die).
#
#   thinbox_binary REPO PACKAGE VAR
#       Prints the path of PACKAGE's binary: $VAR if set (it must be
#       executable), else REPO/target/debug/PACKAGE, built with cargo if
#       missing. Fails with the reason on stderr.
#   thinboxd_start ROOT SOCKET LOG [FLAG...]
#       Starts $THINBOXD --root ROOT --snapshotter-address SOCKET --no-csi
#       FLAG... in the background (stderr to LOG; THINBOX_LOG, default
#       info,thinbox_snapshotter=debug,thinbox_blockstore=debug), sets
#       THINBOXD_PID and returns once the daemon says it serves SOCKET. The
#       socket alone says nothing: thinboxd binds its doors before it opens
#       the pool. Dies if the daemon exits or is not serving within 30 s
#       (a THINBOX_LOG must keep thinboxd's info lines).
#   thinboxd_stop
#       SIGTERM (SIGKILL after 30 s), reaps it, sets THINBOXD_STATUS to its
#       exit status. Does nothing if none was started.
#   thinboxd_small_config FILE
#       Writes a config for --config to FILE: an 8 GiB embedded pool and
#       1 GiB snapshots, so that the sparse files stay modest. Append
#       further tables to it.

# shellcheck source=scripts/lib/processes.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib/processes.sh"

[[ -z ${THINBOX_SNAPSHOTTER:-} ]] || die "THINBOX_SNAPSHOTTER is gone with thinbox-snapshotter: set THINBOX_DAEMON"

THINBOXD_PID=
# shellcheck disable=SC2034 # read by the caller
THINBOXD_STATUS=

thinbox_binary() {
    local repo=$1 pkg=$2 var=$3 path
    if [[ -n ${!var:-} ]]; then
        [[ -x ${!var} ]] || { echo "$var=${!var} is not executable" >&2; return 1; }
        echo "${!var}"
        return 0
    fi
    path=$repo/target/debug/$pkg
    if [[ ! -x $path ]]; then
        echo "building $pkg" >&2
        (cd "$repo" && cargo build -p "$pkg" >&2) || { echo "cargo build -p $pkg failed" >&2; return 1; }
        [[ -x $path ]] || { echo "cargo build did not produce $path" >&2; return 1; }
    fi
    echo "$path"
}

thinboxd_start() {
    local root=$1 sock=$2 log=$3
    shift 3
    THINBOX_LOG=${THINBOX_LOG:-info,thinbox_snapshotter=debug,thinbox_blockstore=debug} \
        "$THINBOXD" --root "$root" --snapshotter-address "$sock" --no-csi "$@" >"$log" 2>&1 </dev/null &
    THINBOXD_PID=$!
    await_serving "$THINBOXD_PID" "$log" 1 30 snapshots || die "thinboxd did not start on $sock"
}

thinboxd_stop() {
    [[ -n $THINBOXD_PID ]] || return 0
    local st=0
    terminate "$THINBOXD_PID" 30 thinboxd || true
    wait "$THINBOXD_PID" 2>/dev/null || st=$?
    # shellcheck disable=SC2034 # read by the caller
    THINBOXD_STATUS=$st
    THINBOXD_PID=
}

thinboxd_small_config() {
    printf '[pool]\nembedded_size = "8GiB"\n[snapshot]\ndefault_size = "1GiB"\n' >"$1"
}
