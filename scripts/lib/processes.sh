# shellcheck shell=bash
# Waiting for a daemon we started to serve, and stopping it: the one
# definition for the quickstart, the test runs and the benchmarks. Source it.
#
#   await_serving PID LOG FROM SECS DOOR...
#                             Waits until LOG, from line FROM on, says the
#                             daemon serves every DOOR: `snapshots`
#                             (containerd.services.snapshots.v1) or `csi`
#                             (csi.v1). thinboxd binds its sockets before it
#                             opens the pool, so a socket alone says nothing.
#                             Returns 1 if PID exits first or SECS pass,
#                             saying why and what LOG says since FROM (its
#                             last 30 lines) on stderr.
#   terminate PID SECS NAME   SIGTERM, then waits up to SECS for PID to exit
#                             (thinboxd finishes the operations in flight and
#                             gives connections 2 s); SIGKILL after that.
#                             Returns 1 if it had to be killed. Does not reap
#                             it: its parent's `wait` does.
#   stop_client PID           SIGTERM to a client this shell started in the
#                             background (a benchmark, which removes what it
#                             made when told to stop), and waits for it as
#                             long as it takes: before the daemons it talks
#                             to are stopped. Nothing to do for an empty PID.

await_serving() {
    local pid=$1 log=$2 from=$3 secs=$4 door i services=() missing
    shift 4
    for door in "$@"; do
        case $door in
            snapshots) services+=(containerd.services.snapshots.v1) ;;
            csi) services+=(csi.v1) ;;
            *) echo "await_serving: unknown door $door" >&2; return 1 ;;
        esac
    done
    for (( i = 0; ; i++ )); do
        missing=()
        for door in "${services[@]}"; do
            tail -n +"$from" "$log" 2>/dev/null | grep -qF "serving $door" || missing+=("$door")
        done
        (( ${#missing[@]} )) || return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$pid exited before it served ${missing[*]}; the end of $log:" >&2
            break
        fi
        if (( i >= secs * 10 )); then
            echo "$pid did not serve ${missing[*]} within ${secs}s; the end of $log:" >&2
            break
        fi
        sleep 0.1
    done
    tail -n +"$from" "$log" 2>/dev/null | tail -n 30 >&2
    return 1
}

terminate() {
    local pid=$1 secs=$2 name=$3 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for (( i = 0; i < secs * 10; i++ )); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    echo "$name ($pid) ignored SIGTERM for ${secs}s, killing" >&2
    kill -KILL "$pid" 2>/dev/null || true
    return 1
}

stop_client() {
    local pid=$1
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
