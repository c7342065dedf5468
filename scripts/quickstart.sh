#!/usr/bin/env bash
# Builds thinboxd (release) and starts it in the background on the embedded
# default pool (a sparse image under the state root), serving both doors:
# containerd's snapshotter socket and the CSI socket. Prints the containerd
# config that uses it.
#
#   sudo bash scripts/quickstart.sh           build, start, print the config
#   sudo bash scripts/quickstart.sh --down    stop it and release its devices
#
# Like a node's thinboxd (deploy/systemd/thinboxd.service) the daemon keeps
# its devices when it stops, so running containers keep their root
# filesystems across a restart. --down therefore stops it (SIGTERM), then
# runs thinboxd once more on the same root with --release-on-exit, on a
# private snapshot socket and without CSI, and stops that at once: its exit
# detaches the loop devices and unmounts the embedded pool (a device still in
# use goes when its user lets go). The state under the root stays; the next
# start adopts it.
#
#   THINBOX_ROOT          state directory    (default /var/lib/thinbox)
#   THINBOX_SOCKET        snapshot socket    (default /run/thinbox/snapshotter.sock)
#   THINBOX_CSI_ENDPOINT  CSI endpoint       (default unix:///var/lib/kubelet/plugins/csi.thinbox.io/csi.sock)
#   THINBOX_LOG_FILE      the daemon's log   (default /var/log/thinboxd.log; THINBOX_LOG is its filter)
#   THINBOX_PID_FILE      its pid            (default /run/thinbox/thinboxd.pid)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: thinboxd attaches loop devices and mounts its pool" >&2; exit 1; }
root=${THINBOX_ROOT:-/var/lib/thinbox}
socket=${THINBOX_SOCKET:-/run/thinbox/snapshotter.sock}
csi=${THINBOX_CSI_ENDPOINT:-unix:///var/lib/kubelet/plugins/csi.thinbox.io/csi.sock}
logfile=${THINBOX_LOG_FILE:-/var/log/thinboxd.log}
pidfile=${THINBOX_PID_FILE:-/run/thinbox/thinboxd.pid}
bin=$PWD/target/release/thinboxd

# The pid of the thinboxd this script started, if it still runs.
running() {
  local pid
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = thinboxd ] || return 1
  echo "$pid"
}

# wait_serving PID LOG FROM DOOR...: until LOG, past line FROM, says every DOOR
# is served ("snapshots", "csi"); fails if PID exits first or after 60 s.
wait_serving() {
  local pid=$1 log=$2 from=$3 door i ok
  shift 3
  for (( i = 0; i < 600; i++ )); do
    kill -0 "$pid" 2>/dev/null || return 1
    ok=1
    for door in "$@"; do
      case $door in
        snapshots) tail -n +"$from" "$log" | grep -q 'serving containerd.services.snapshots.v1' || ok= ;;
        csi) tail -n +"$from" "$log" | grep -q 'serving csi.v1' || ok= ;;
      esac
    done
    [ -n "$ok" ] && return 0
    sleep 0.1
  done
  return 1
}

# stop PID: SIGTERM, then wait (thinboxd gives connections 2 s and finishes
# the operations in flight).
stop() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for (( i = 0; i < 300; i++ )); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  echo "thinboxd ($pid) did not stop within 30 s" >&2
  return 1
}

# What of the root is still attached or mounted.
held() {
  { losetup --list --noheadings --raw --output NAME,BACK-FILE 2>/dev/null | awk -v p="$root/" 'index($2, p) == 1' || true; }
  { findmnt -rn -o TARGET 2>/dev/null | awk -v p="$root/" 'index($0, p) == 1 || $0 == substr(p, 1, length(p) - 1)' || true; }
}

down() {
  local pid tmp rel from
  if pid=$(running); then
    echo "stopping thinboxd ($pid)"
    stop "$pid"
  else
    echo "no thinboxd started by this script is running"
  fi
  rm -f "$pidfile"
  [ -d "$root" ] || return 0
  [ -n "$(held)" ] || { echo "nothing of $root is attached or mounted"; return 0; }
  [ -x "$bin" ] || { echo "$bin is missing: build it (cargo build --release -p thinboxd) to release $root" >&2; return 1; }
  # One more run, only to release on exit: a private snapshot socket (not
  # containerd's), no CSI door.
  tmp=$(mktemp -d /tmp/thinboxd-down.XXXXXX)
  from=$(( $( { wc -l <"$logfile"; } 2>/dev/null || echo 0) + 1 ))
  echo "releasing $root (loop devices, embedded pool mount)"
  "$bin" --root "$root" --snapshotter-address "$tmp/release.sock" --no-csi --release-on-exit \
    >>"$logfile" 2>&1 </dev/null &
  rel=$!
  if ! wait_serving "$rel" "$logfile" "$from" snapshots; then
    kill -TERM "$rel" 2>/dev/null || true
    wait "$rel" 2>/dev/null || true
    rm -rf "$tmp"
    echo "thinboxd could not open $root to release it; last lines of $logfile:" >&2
    tail -n 20 "$logfile" >&2
    return 1
  fi
  stop "$rel"
  wait "$rel" 2>/dev/null || true
  rm -rf "$tmp"
  if [ -n "$(held)" ]; then
    echo "still attached or mounted (in use; released when its user lets go):"
    held
  else
    echo "released: nothing of $root is attached or mounted"
  fi
}

snippet() {
  cat <<CONF
# thinboxd serves containerd on $socket and CSI on $csi
# (log: $logfile, pid file: $pidfile; stop and release: $0 --down).
# Check it: $PWD/target/release/thinboxctl --address $socket status
# Add to /etc/containerd/config.toml, restart containerd, then e.g.
#   ctr image pull --snapshotter thinbox docker.io/library/alpine:latest
[proxy_plugins]
  [proxy_plugins.thinbox]
    type = "snapshot"
    address = "$socket"
CONF
}

case ${1:-} in
  --down) down; exit ;;
  "") ;;
  *) sed -n '2,23p' "$0" >&2; exit 2 ;;
esac

if pid=$(running); then
  echo "thinboxd is already running (pid $pid); $0 --down stops it"
  snippet
  exit 0
fi
bash scripts/install-deps.sh
cargo build --release -p thinboxd -p thinboxctl
mkdir -p "$(dirname "$logfile")" "$(dirname "$pidfile")"
from=$(( $( { wc -l <"$logfile"; } 2>/dev/null || echo 0) + 1 ))
# Its own session: it outlives this script and the terminal.
setsid "$bin" --root "$root" --snapshotter-address "$socket" --csi-endpoint "$csi" \
  >>"$logfile" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pidfile"
if ! wait_serving "$pid" "$logfile" "$from" snapshots csi; then
  kill -TERM "$pid" 2>/dev/null || true
  rm -f "$pidfile"
  echo "thinboxd did not start; last lines of $logfile:" >&2
  tail -n +"$from" "$logfile" | tail -n 20 >&2
  exit 1
fi
echo "thinboxd running (pid $pid) on $root"
snippet
