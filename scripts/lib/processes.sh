# shellcheck shell=bash
# Stopping a process we started: the one definition for the quickstart, the
# test runs and the benchmarks. Source it.
#
#   terminate PID SECS NAME   SIGTERM, then waits up to SECS for PID to exit
#                             (thinboxd finishes the operations in flight and
#                             gives connections 2 s); SIGKILL after that.
#                             Returns 1 if it had to be killed. Does not reap
#                             it: its parent's `wait` does.

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
