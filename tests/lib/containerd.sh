# shellcheck shell=bash
# Private containerd instance for Thinbox tests. Source it; needs root.
#
# Interface (kept stable; tests/host/containerd-*.sh and the benchmarks use it):
#   containerd_start WORKDIR [SNAPSHOTTER_SOCKET]
#       Writes WORKDIR/containerd.toml (root, state, sockets and the opt plugin
#       path all under WORKDIR; CRI disabled), starts containerd in the
#       background (log: WORKDIR/containerd.log) and waits until it answers.
#       With SNAPSHOTTER_SOCKET, a proxy snapshotter named "thinbox" is
#       configured at that socket. Exports CONTAINERD_ADDRESS, CONTAINERD_PID
#       and CONTAINERD_WORKDIR; sets the array CTR_RUN_FLAGS (--fifo-dir and
#       --runc-root under WORKDIR, --cgroup "") for `ctr_ run "${CTR_RUN_FLAGS[@]}"`
#       so runc state and IO fifos stay private as well. On failure returns
#       non-zero with the log tail on stderr. WORKDIR must be short (unix
#       socket paths are limited to 107 bytes).
#   containerd_stop
#       Force-deletes tasks and containers left in namespace $CTR_NAMESPACE,
#       stops containerd (SIGTERM, SIGKILL after CONTAINERD_STOP_TIMEOUT s),
#       kills leftover shims of this instance and unmounts anything still
#       mounted under WORKDIR. Safe to call twice or after a failed start.
#   ctr_ ARGS...
#       ctr --address "$CONTAINERD_ADDRESS" -n "$CTR_NAMESPACE" ARGS...
#   ctr_t SECONDS ARGS...
#       ctr_ under `timeout SECONDS` (exit status 124 on timeout).
#   gc_now
#       Runs a garbage collection in containerd now (a synchronous lease
#       delete does); best effort, quiet.
# Tunables (environment): CTR_NAMESPACE (thinbox-test),
#   CONTAINERD_START_TIMEOUT (30 s), CONTAINERD_STOP_TIMEOUT (15 s),
#   CONTAINERD_BIN (containerd), CONTAINERD_LOG_LEVEL (debug),
#   CONTAINERD_EXTRA_CONFIG (TOML appended as-is to the config).
# Also brings scripts/lib/leftovers.sh and scripts/lib/processes.sh
# (terminate) to its caller.

# shellcheck source=scripts/lib/leftovers.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib/leftovers.sh"
# shellcheck source=scripts/lib/processes.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib/processes.sh"

: "${CTR_NAMESPACE:=thinbox-test}"
: "${CONTAINERD_START_TIMEOUT:=30}"
: "${CONTAINERD_STOP_TIMEOUT:=15}"
: "${CONTAINERD_BIN:=containerd}"
: "${CONTAINERD_LOG_LEVEL:=debug}"

ctr_() {
    ctr --address "$CONTAINERD_ADDRESS" -n "$CTR_NAMESPACE" "$@"
}

ctr_t() {
    local secs=$1
    shift
    timeout "$secs" ctr --address "$CONTAINERD_ADDRESS" -n "$CTR_NAMESPACE" "$@"
}

gc_now() {
    local lease
    if lease=$(ctr_ leases create 2>/dev/null); then
        ctr_ leases delete --sync "$lease" >/dev/null 2>&1 || true
    fi
}

# For cleanup paths: bounded, quiet.
_ctr_bounded() { ctr_t 10 "$@" 2>/dev/null; }

_containerd_log_tail() {
    echo "---- last lines of $CONTAINERD_WORKDIR/containerd.log ----" >&2
    tail -n 40 "$CONTAINERD_WORKDIR/containerd.log" >&2 || true
    echo "----" >&2
}

containerd_start() {
    local workdir=${1:?containerd_start WORKDIR [SNAPSHOTTER_SOCKET]} sock=${2:-}
    local i

    if ! command -v "$CONTAINERD_BIN" >/dev/null || ! command -v ctr >/dev/null; then
        echo "containerd_start: containerd/ctr not installed" >&2
        return 1
    fi
    mkdir -p "$workdir"
    workdir=$(cd "$workdir" && pwd)
    export CONTAINERD_WORKDIR=$workdir
    export CONTAINERD_ADDRESS=$workdir/containerd.sock
    # shellcheck disable=SC2034 # used by the caller
    CTR_RUN_FLAGS=(--fifo-dir "$workdir/fifo" --runc-root "$workdir/runc" --cgroup "")
    # sun_path is 108 bytes including the NUL; ".ttrpc" is the longest suffix.
    if (( ${#CONTAINERD_ADDRESS} + 6 > 107 )); then
        echo "containerd_start: WORKDIR too long for a unix socket path: $workdir" >&2
        return 1
    fi

    {
        cat <<EOF
version = 2
root = "$workdir/root"
state = "$workdir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "$CONTAINERD_ADDRESS"

[ttrpc]
  address = "$CONTAINERD_ADDRESS.ttrpc"

[debug]
  level = "$CONTAINERD_LOG_LEVEL"

[plugins."io.containerd.internal.v1.opt"]
  path = "$workdir/opt"
EOF
        if [[ -n $sock ]]; then
            cat <<EOF

[proxy_plugins.thinbox]
  type = "snapshot"
  address = "$sock"
EOF
        fi
        if [[ -n ${CONTAINERD_EXTRA_CONFIG:-} ]]; then
            printf '\n%s\n' "$CONTAINERD_EXTRA_CONFIG"
        fi
    } >"$workdir/containerd.toml"

    "$CONTAINERD_BIN" --config "$workdir/containerd.toml" \
        >>"$workdir/containerd.log" 2>&1 </dev/null &
    export CONTAINERD_PID=$!

    for (( i = 0; i < CONTAINERD_START_TIMEOUT * 10; i++ )); do
        if ! kill -0 "$CONTAINERD_PID" 2>/dev/null; then
            echo "containerd_start: containerd exited during startup" >&2
            _containerd_log_tail
            return 1
        fi
        if [[ -S $CONTAINERD_ADDRESS ]] &&
            timeout 5 ctr --address "$CONTAINERD_ADDRESS" version >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "containerd_start: no answer on $CONTAINERD_ADDRESS after ${CONTAINERD_START_TIMEOUT}s" >&2
    _containerd_log_tail
    return 1
}

containerd_stop() {
    local workdir=${CONTAINERD_WORKDIR:-} pid=${CONTAINERD_PID:-} t shims m

    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        # Shims outlive containerd: end tasks (and drop containers) first.
        for t in $(_ctr_bounded task ls -q); do
            _ctr_bounded task delete -f "$t" >/dev/null || true
        done
        for t in $(_ctr_bounded container ls -q); do
            _ctr_bounded container delete "$t" >/dev/null || true
        done
        terminate "$pid" "$CONTAINERD_STOP_TIMEOUT" containerd || true
        wait "$pid" 2>/dev/null || true
    fi
    # Shims started by this instance carry its unique address on their command line.
    if [[ -n ${CONTAINERD_ADDRESS:-} ]]; then
        mapfile -t shims < <(pgrep -f -- "-address $CONTAINERD_ADDRESS( |$)")
        (( ${#shims[@]} == 0 )) || kill -KILL "${shims[@]}" 2>/dev/null || true
    fi
    if [[ -n $workdir ]]; then
        # Deepest first; lazy unmount as a last resort.
        while read -r m; do
            [[ -n $m ]] || continue
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null ||
                echo "containerd_stop: cannot unmount $m" >&2
        done < <(mounts_under "$workdir" | sort -r)
    fi
    CONTAINERD_PID=
}
