#!/usr/bin/env bash
# Thinbox's main job, end to end, on one machine: builds thinboxd (release),
# starts it on the embedded default pool (a sparse image under the state
# root), starts a private containerd with the Thinbox proxy snapshotter,
# imports a small 3-layer image built here (no registry), runs a container on
# a Thinbox rootfs and prints the proof: the container's / is a block device,
# the layers are merged, and how long each step took. thinboxd, the private
# containerd and the container keep running.
#
#   sudo bash scripts/quickstart.sh                      all of the above
#   sudo bash scripts/quickstart.sh --system-containerd  use the system's containerd instead of a
#                                                        private one (edits nothing: without the thinbox
#                                                        plugin it prints the snippet to add, and stops)
#   sudo bash scripts/quickstart.sh --down               stop what it started (the container, the private
#                                                        containerd, thinboxd) and release the pool
#
# Like a node's thinboxd (deploy/systemd/thinboxd.service) the daemon keeps
# its devices when it stops, so running containers keep their root
# filesystems across a restart. --down therefore deletes the quickstart's
# container, stops the private containerd, stops thinboxd (SIGTERM), then
# runs thinboxd once more on the same root with --release-on-exit, on a
# private snapshot socket and without CSI, and stops that at once: its exit
# detaches the loop devices and unmounts the embedded pool (a device still in
# use goes when its user lets go). The state under the roots stays (image,
# snapshots); the next start adopts it.
#
# Every path can be set from the environment (a test runs it all in a temp dir):
#   THINBOX_ROOT               thinboxd's state    (default /var/lib/thinbox)
#   THINBOX_SOCKET             snapshot socket     (default /run/thinbox/snapshotter.sock)
#   THINBOX_CSI_ENDPOINT       CSI endpoint        (default unix:///var/lib/kubelet/plugins/csi.thinbox.io/csi.sock)
#   THINBOX_LOG_FILE           thinboxd's log      (default /var/log/thinboxd.log; THINBOX_LOG is its filter)
#   THINBOX_PID_FILE           thinboxd's pid      (default /run/thinbox/thinboxd.pid)
#   THINBOX_QUICKSTART_DIR     the image tar, the private containerd's config, root and log
#                                                  (default /var/lib/thinbox-quickstart)
#   THINBOX_CONTAINERD_RUN_DIR the private containerd's socket (containerd.sock), state, pid,
#                              fifos and runc root (default /run/thinbox/containerd)
#   THINBOX_SYSTEM_CONTAINERD  the system containerd's socket, --system-containerd only
#                                                  (default /run/containerd/containerd.sock)
#   THINBOX_SYSTEM_CONTAINERD_CONFIG  read only: a private containerd is refused if it names
#                              THINBOX_SOCKET      (default /etc/containerd/config.toml)
#   CARGO_TARGET_DIR           where cargo builds  (default ./target; binaries in its release/)
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,41p' "$0" | sed 's/^# \{0,1\}//'; }
action=up
mode=private
for arg in "$@"; do
  case $arg in
    --down) action=down ;;
    --system-containerd) mode=system ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root: thinboxd attaches loop devices and mounts its pool" >&2; exit 1; }

root=${THINBOX_ROOT:-/var/lib/thinbox}
socket=${THINBOX_SOCKET:-/run/thinbox/snapshotter.sock}
csi=${THINBOX_CSI_ENDPOINT:-unix:///var/lib/kubelet/plugins/csi.thinbox.io/csi.sock}
logfile=${THINBOX_LOG_FILE:-/var/log/thinboxd.log}
pidfile=${THINBOX_PID_FILE:-/run/thinbox/thinboxd.pid}
qsdir=${THINBOX_QUICKSTART_DIR:-/var/lib/thinbox-quickstart}
ctd_run=${THINBOX_CONTAINERD_RUN_DIR:-/run/thinbox/containerd}
system_address=${THINBOX_SYSTEM_CONTAINERD:-/run/containerd/containerd.sock}
target=${CARGO_TARGET_DIR:-$PWD/target}
bin=$target/release/thinboxd
ctl=$target/release/thinboxctl

# The private containerd: persistent parts under $qsdir/containerd, runtime
# parts (socket, task state with the rootfs mounts, fifos, runc's state) under
# $ctd_run. CRI is off: ctr needs none of it.
ctd_dir=$qsdir/containerd
ctd_conf=$ctd_dir/config.toml
ctd_log=$ctd_dir/containerd.log
ctd_sock=$ctd_run/containerd.sock
ctd_pidfile=$ctd_run/containerd.pid
# Which containerd holds the quickstart's container ("private" or "system"),
# so --down finds it.
usedfile=$qsdir/containerd-used

# The quickstart's containerd namespace: its own in each containerd, so
# snapshot names (containerd names them NAMESPACE/N/KEY in the snapshotter)
# never collide with what the other one left in the pool.
ns_private=thinbox-quickstart
ns_system=thinbox-quickstart-system
ns=$ns_private
[ "$mode" = system ] && ns=$ns_system
# Set when --system-containerd ran: the system containerd's garbage collection
# removes the snapshots the private one left in the pool, so the private one
# starts afresh next time.
systemfile=$qsdir/system-containerd-used
system_config=${THINBOX_SYSTEM_CONTAINERD_CONFIG:-/etc/containerd/config.toml}
cid=thinbox-quickstart
image=localhost/thinbox-quickstart:3layers

# ---- helpers ---------------------------------------------------------------

# pid_of FILE COMM: the pid in FILE if that process runs and is COMM.
pid_of() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  echo "$pid"
}
running() { pid_of "$pidfile" thinboxd; }
ctd_running() { pid_of "$ctd_pidfile" containerd; }

# shellcheck source=scripts/lib/processes.sh
source scripts/lib/processes.sh
# shellcheck source=scripts/lib/leftovers.sh
source scripts/lib/leftovers.sh
# What of thinboxd's root is still attached or mounted.
held() { left_under "$root"; }

# ctr against the containerd that holds the quickstart's container.
qctr() { ctr --address "$ctr_address" -n "$ns" "$@"; }

# Seconds since the microsecond timestamp $1, one decimal.
since() {
  local now=${EPOCHREALTIME/[.,]/}
  printf '%d.%d' $(( (now - $1) / 1000000 )) $(( (now - $1) % 1000000 / 100000 ))
}
now_us() { echo "${EPOCHREALTIME/[.,]/}"; }
timings=()
step() { step_name=$1; step_t=$(now_us); echo "==> $1"; }
step_done() { timings+=("$(printf '  %-44s %6s s' "$step_name" "$(since "$step_t")")"); }

die() { echo "quickstart: $*" >&2; exit 1; }

snippet() {
  cat <<CONF
[proxy_plugins]
  [proxy_plugins.thinbox]
    type = "snapshot"
    address = "$socket"
CONF
}

# ---- --down ----------------------------------------------------------------

# The quickstart's container in the containerd at $ctr_address: gone, with its task.
delete_container() {
  local i st
  if timeout 20 ctr --address "$ctr_address" -n "$ns" task ls -q 2>/dev/null | grep -qx "$cid"; then
    echo "stopping the container's task ($cid)"
    # SIGTERM ends its shell (exit 0); delete -f kills whatever did not end in 5 s.
    timeout 10 ctr --address "$ctr_address" -n "$ns" task kill "$cid" 2>/dev/null || true
    for (( i = 0; i < 50; i++ )); do
      st=$(timeout 10 ctr --address "$ctr_address" -n "$ns" task ls 2>/dev/null | awk -v c="$cid" '$1 == c {print $3}')
      [ "$st" = RUNNING ] || break
      sleep 0.1
    done
    timeout 30 ctr --address "$ctr_address" -n "$ns" task delete -f "$cid" >/dev/null ||
      echo "could not delete task $cid" >&2
  fi
  if timeout 20 ctr --address "$ctr_address" -n "$ns" container ls -q 2>/dev/null | grep -qx "$cid"; then
    echo "deleting the container ($cid)"
    timeout 30 ctr --address "$ctr_address" -n "$ns" container delete "$cid" ||
      echo "could not delete container $cid" >&2
  fi
}

down_private_containerd() {
  local pid shims m shim_sock dir id
  ctr_address=$ctd_sock
  if pid=$(ctd_running); then
    delete_container
    echo "stopping the private containerd ($pid)"
    terminate "$pid" 15 containerd || true
  fi
  rm -f "$ctd_pidfile"
  # Shims of this instance carry its socket on their command line; a task that
  # outlived its containerd (killed) goes with them.
  mapfile -t shims < <(pgrep -f -- "-address $ctd_sock( |$)" || true)
  if (( ${#shims[@]} )); then
    echo "killing leftover shims of the private containerd: ${shims[*]}"
    for pid in "${shims[@]}"; do
      # A killed shim leaves its socket: containerd 1.6 names it
      # /run/containerd/s/sha256(ADDRESS/NAMESPACE/ID), whatever its config says.
      shim_sock=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | awk '
        prev == "-namespace" {n = $0} prev == "-id" {i = $0} prev == "-address" {a = $0} {prev = $0}
        END {if (n != "" && i != "") printf "%s/%s/%s", a, n, i}' | sha256sum | cut -d' ' -f1)
      kill -KILL "$pid" 2>/dev/null || true
      rm -f "/run/containerd/s/$shim_sock"
    done
  fi
  # Containers whose shim is gone keep running: runc's own state (its root
  # per namespace under $ctd_run/runc) finds them, delete -f kills them.
  for dir in "$ctd_run"/runc/*/; do
    [ -d "$dir" ] || continue
    for id in $(runc --root "$dir" list -q 2>/dev/null); do
      echo "killing container $id (runc root $dir)"
      runc --root "$dir" delete -f "$id" || echo "runc delete -f $id failed" >&2
    done
  done
  # A rootfs still mounted in the task state (after a kill): deepest first.
  while read -r m; do
    [ -n "$m" ] || continue
    umount "$m" 2>/dev/null || umount -l "$m" || echo "cannot unmount $m" >&2
  done < <({ mounts_under "$ctd_run"; mounts_under "$ctd_dir"; } | sort -r)
  # Runtime state only (the socket, task bundles, fifos); its root stays.
  [ -z "$(mounts_under "$ctd_run")" ] && rm -rf --one-file-system "$ctd_run"
}

down_system_containerd() {
  local ns=$ns_system
  ctr_address=$system_address
  if ! timeout 10 ctr --address "$ctr_address" version >/dev/null 2>&1; then
    echo "the system containerd ($system_address) does not answer: its namespace $ns is left as it is" >&2
    return 0
  fi
  delete_container
  # The image's snapshots live in thinboxd: remove the image while thinboxd
  # still runs, so the system containerd keeps no reference to them.
  if timeout 20 ctr --address "$ctr_address" -n "$ns" image ls -q 2>/dev/null | grep -qx "$image"; then
    echo "removing $image from the system containerd (namespace $ns)"
    timeout 60 ctr --address "$ctr_address" -n "$ns" image rm --sync "$image" >/dev/null || true
  fi
  timeout 20 ctr --address "$ctr_address" namespaces rm "$ns" >/dev/null 2>&1 || true
}

down() {
  local pid tmp rel from
  case $(cat "$usedfile" 2>/dev/null) in
    system) down_system_containerd ;;
  esac
  down_private_containerd
  rm -f "$usedfile"
  if pid=$(running); then
    echo "stopping thinboxd ($pid)"
    terminate "$pid" 30 thinboxd
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
  if ! await_serving "$rel" "$logfile" "$from" 60 snapshots; then
    kill -TERM "$rel" 2>/dev/null || true
    wait "$rel" 2>/dev/null || true
    rm -rf "$tmp"
    echo "thinboxd could not open $root to release it" >&2
    return 1
  fi
  terminate "$rel" 30 thinboxd
  wait "$rel" 2>/dev/null || true
  rm -rf "$tmp"
  if [ -n "$(held)" ]; then
    echo "still attached or mounted (in use; released when its user lets go):"
    held
  else
    echo "released: nothing of $root is attached or mounted"
  fi
}

if [ "$action" = down ]; then
  down
  exit
fi

# ---- up --------------------------------------------------------------------

t0=$(now_us)

# One thinboxd serves one containerd: containerd's garbage collection removes
# every snapshot of its snapshotter that it did not make itself.
if [ "$mode" = private ] && [ -r "$system_config" ] && grep -qF "\"$socket\"" "$system_config"; then
  die "$system_config points the system containerd at $socket; a private containerd on the same thinboxd would have each one's garbage collection remove the other's snapshots: use --system-containerd"
fi

# Packages: the build's (install-deps.sh), and what runs the container: runc,
# a static busybox for the image, python3 for the image builder, and with a
# private containerd Debian's containerd 1.6 (its package also enables the
# system's containerd service; the private instance shares nothing with it).
step "dependencies (apt)"
bash scripts/install-deps.sh
pkgs=(runc busybox-static python3)
[ "$mode" = private ] && pkgs+=(containerd)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if (( ${#missing[@]} )); then
  echo "installing: ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 -qq update
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq install -y "${missing[@]}" >/dev/null
fi
command -v ctr >/dev/null || die "ctr is missing (Debian package containerd)"
command -v cargo >/dev/null || die "cargo is missing: install Rust (https://rustup.rs) for root"
step_done

step "build thinboxd, thinboxctl (cargo, release)"
cargo build --release -p thinboxd -p thinboxctl
[ -x "$bin" ] || die "cargo did not produce $bin"
step_done

step "start thinboxd"
if pid=$(running); then
  echo "thinboxd is already running (pid $pid)"
else
  mkdir -p "$(dirname "$logfile")" "$(dirname "$pidfile")"
  from=$(( $( { wc -l <"$logfile"; } 2>/dev/null || echo 0) + 1 ))
  # Its own session: it outlives this script and the terminal.
  setsid "$bin" --root "$root" --snapshotter-address "$socket" --csi-endpoint "$csi" \
    >>"$logfile" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$pidfile"
  if ! await_serving "$pid" "$logfile" "$from" 60 snapshots csi; then
    kill -TERM "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    echo "thinboxd did not start" >&2
    exit 1
  fi
  echo "thinboxd running (pid $pid) on $root"
fi
thinboxd_pid=$pid
step_done

# The containerd config of the private instance.
private_config() {
  cat <<EOF
# The quickstart's private containerd (scripts/quickstart.sh); CRI is off.
version = 2
root = "$ctd_dir/root"
state = "$ctd_run/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "$ctd_sock"

[ttrpc]
  address = "$ctd_sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "$ctd_dir/opt"

$(snippet)
EOF
}

# thinbox_plugin ADDRESS: the status containerd at ADDRESS gives its thinbox
# snapshotter ("ok"), empty if it has none.
thinbox_plugin() {
  timeout 20 ctr --address "$1" plugins ls 2>/dev/null |
    awk '$1 == "io.containerd.snapshotter.v1" && $2 == "thinbox" {print $NF}'
}

if [ "$mode" = private ]; then
  step "start the private containerd"
  ctr_address=$ctd_sock
  run_flags=(--runc-root "$ctd_run/runc" --cgroup "")
  exec_flags=(--fifo-dir "$ctd_run/fifo")
  # sun_path holds 107 bytes; ".ttrpc" is the longest suffix.
  (( ${#ctd_sock} + 6 <= 107 )) || die "THINBOX_CONTAINERD_RUN_DIR is too long for a unix socket path: $ctd_run"
  if pid=$(ctd_running); then
    [ "$(private_config)" = "$(cat "$ctd_conf" 2>/dev/null)" ] ||
      die "the private containerd (pid $pid) runs with another config than $ctd_conf would get now: $0 --down first"
    echo "the private containerd is already running (pid $pid)"
  else
    if [ -e "$systemfile" ]; then
      # Its image's snapshots went with the system containerd's garbage collection.
      echo "--system-containerd ran since: the private containerd starts afresh (its root $ctd_dir/root goes)"
      rm -rf --one-file-system "$ctd_dir/root"
      rm -f "$systemfile"
    fi
    mkdir -p "$ctd_dir" "$ctd_run"
    private_config >"$ctd_conf"
    setsid containerd --config "$ctd_conf" >>"$ctd_log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$ctd_pidfile"
    ok=
    for (( i = 0; i < 300; i++ )); do
      kill -0 "$pid" 2>/dev/null || break
      if [ -S "$ctd_sock" ] && timeout 5 ctr --address "$ctd_sock" version >/dev/null 2>&1; then ok=1; break; fi
      sleep 0.1
    done
    if [ -z "$ok" ]; then
      kill -TERM "$pid" 2>/dev/null || true
      rm -f "$ctd_pidfile"
      echo "containerd did not start; last lines of $ctd_log:" >&2
      tail -n 20 "$ctd_log" >&2
      exit 1
    fi
    echo "private containerd running (pid $pid) on $ctd_sock"
  fi
  containerd_pid=$pid
  echo private >"$usedfile"
  step_done
else
  step "use the system containerd"
  ctr_address=$system_address
  run_flags=()
  exec_flags=()
  timeout 10 ctr --address "$ctr_address" version >/dev/null 2>&1 ||
    die "no containerd answers on $system_address (set THINBOX_SYSTEM_CONTAINERD, or drop --system-containerd for a private one)"
  if pid=$(ctd_running); then
    die "the quickstart's private containerd (pid $pid) uses this thinboxd; one thinboxd serves one containerd (containerd's garbage collection removes every snapshot it did not make): $0 --down first"
  fi
  if [ "$(thinbox_plugin "$ctr_address")" != ok ]; then
    cat <<EOF

The system containerd ($system_address) has no thinbox snapshotter, and this
script edits no system file. thinboxd is running (pid $thinboxd_pid); to use it:
1. merge into /etc/containerd/config.toml (version 2; add to an existing
   [proxy_plugins] table if there is one):

$(snippet | sed 's/^/     /')

2. systemctl restart containerd   (running containers keep running: their shims
   outlive containerd)
3. sudo bash $0 --system-containerd   (again)

Or run without --system-containerd: a private containerd, nothing of the
system's touched. $0 --down stops thinboxd.
EOF
    exit 0
  fi
  echo "the system containerd has the thinbox snapshotter"
  containerd_pid=
  mkdir -p "$qsdir"
  echo system >"$usedfile"
  : >"$systemfile"
  step_done
fi
[ "$(thinbox_plugin "$ctr_address")" = ok ] || die "containerd at $ctr_address did not load the thinbox snapshotter (see $ctd_log)"

step "build the image (3 layers, local)"
mkdir -p "$qsdir"
python3 tests/lib/make-oci-image.py "$qsdir/image.tar" --ref "$image" >/dev/null
step_done

step "import and unpack it into Thinbox"
timeout 300 ctr --address "$ctr_address" -n "$ns" image import --snapshotter thinbox "$qsdir/image.tar" ||
  die "ctr image import failed; if a parent snapshot is 'not found', another containerd's garbage collection removed this one's snapshots from the pool: $0 --down, then rm -rf $ctd_dir/root starts the private containerd afresh"
step_done

step "run a container on a Thinbox rootfs"
delete_container
# busybox sh as pid 1: ends on SIGTERM (ctr task kill), else sleeps.
timeout 120 ctr --address "$ctr_address" -n "$ns" run -d --null-io "${run_flags[@]}" --snapshotter thinbox \
  "$image" "$cid" sh -c 'trap "exit 0" TERM INT; sleep 2147483647 & wait' >/dev/null
task_pid=
for (( i = 0; i < 300; i++ )); do
  read -r task_pid task_status < <(qctr task ls 2>/dev/null | awk -v c="$cid" '$1 == c {print $2, $3}') || true
  [ "${task_status:-}" = RUNNING ] && break
  sleep 0.1
done
[ "${task_status:-}" = RUNNING ] || die "task $cid is not running (status: ${task_status:-none})"
step_done
first_container=$(since "$t0")

# ---- proof -------------------------------------------------------------------

step "proof"
# Inside the container: the mountinfo line of / and the merged layers' files.
# shellcheck disable=SC2016 # expanded inside the container
inside=$(timeout 60 ctr --address "$ctr_address" -n "$ns" task exec "${exec_flags[@]}" --exec-id "proof-$$" "$cid" sh -c '
awk "\$5 == \"/\" {for (i = 7; i <= NF; i++) if (\$i == \"-\") {print \"root=\" \$3, \$(i + 1), \$(i + 2); exit}}" /proc/self/mountinfo
echo "layer1=$(cat /etc/layer1)"
echo "keep=$(cat /data/keep.txt)"
echo "overwrite=$(cat /data/overwrite.txt)"
[ -e /data/remove.txt ] && echo remove=present || echo remove=absent
[ -e /data/gone ] && echo gone=present || echo gone=absent
') || die "ctr task exec in $cid failed"
fact() { sed -n "s/^$1=//p" <<<"$inside"; }
read -r in_devno in_fstype in_source <<<"$(fact root)" || true
[ -n "${in_source:-}" ] || die "no mountinfo line for / inside the container: $inside"
case $in_source in
  /dev/loop[0-9]* | /dev/dm-[0-9]*) ;;
  *) die "the container's / is $in_fstype on $in_source, not a Thinbox block device" ;;
esac
[ -b "$in_source" ] || die "$in_source is not a block device on the host"
host_devno=$(stat -c '%t %T' "$in_source" | { read -r a b; printf '%d:%d' "0x$a" "0x$b"; })
[ "$host_devno" = "$in_devno" ] || die "the container's / is device $in_devno, the host's $in_source is $host_devno"
# Outside: the host's mount of that device (the task's bundle rootfs) and what backs it.
host_mount=$(findmnt -rn -o TARGET,FSTYPE -S "$in_source" | grep "/$cid/rootfs " | head -n 1) ||
  die "the host has no rootfs mount of $in_source for task $cid"
# The task's own view, read from the host through /proc/PID.
task_root=$(awk '$5 == "/" {for (i = 7; i <= NF; i++) if ($i == "-") {print $3, $(i + 2); exit}}' "/proc/$task_pid/mountinfo")
[ "$task_root" = "$in_devno $in_source" ] || die "task $cid (pid $task_pid) has / on '$task_root', not $in_devno $in_source"
case $in_source in
  /dev/loop*)
    backing=$(losetup -n -O BACK-FILE "$in_source" | sed 's/[[:space:]]*$//')
    case $backing in "$root"/*) ;; *) die "$in_source is backed by '$backing', not a file under $root" ;; esac
    backed_by="a loop device on $backing" ;;
  /dev/dm-*)
    dm_name=$(cat "/sys/block/${in_source#/dev/}/dm/name")
    dmsetup table "$dm_name" | grep -q ' thin ' || die "$in_source ($dm_name) is not a thin device"
    backed_by="thin device $dm_name" ;;
esac
[ "$(fact layer1)" = layer1 ] || die "/etc/layer1 (layer 1) reads '$(fact layer1)'"
[ "$(fact keep)" = layer2-keep ] || die "/data/keep.txt (layer 2) reads '$(fact keep)'"
[ "$(fact overwrite)" = layer3 ] || die "/data/overwrite.txt reads '$(fact overwrite)', not layer 3's 'layer3'"
[ "$(fact remove)" = absent ] || die "/data/remove.txt, whited out by layer 3, is present"
[ "$(fact gone)" = absent ] || die "/data/gone/, whited out by layer 3, is present"
step_done

backend=$(grep -o 'backend="[a-z-]*"' "$logfile" | tail -n 1 | cut -d'"' -f2 || true)
cat <<EOF

== proof: container $cid runs on a Thinbox block device
  task:            $cid RUNNING, pid $task_pid (containerd $ctr_address, namespace $ns)
  rootfs inside:   $in_fstype $in_source $in_devno   (the container's /proc/self/mountinfo, line for /)
  rootfs outside:  $in_source is a block device $host_devno, $backed_by
  host mount:      $host_mount
  pool:            ${backend:-?} backend, root $root, thinboxd pid $thinboxd_pid
== proof: the image's 3 layers are merged (read inside the container)
  layer1 file:     /etc/layer1 = $(fact layer1)   (from layer 1)
  layer2 file:     /data/keep.txt = $(fact keep)   (from layer 2)
  overwritten:     /data/overwrite.txt = $(fact overwrite)   (layer 2 wrote "layer2", layer 3 overwrote it)
  whited out:      /data/remove.txt $(fact remove)   (added by layer 2, whiteout in layer 3)
  whited-out dir:  /data/gone $(fact gone)   (added by layer 2, whiteout in layer 3)
== timings ($(nproc) CPUs)
$(printf '%s\n' "${timings[@]}")
$(printf '  %-44s %6s s' 'time to first container' "$first_container")   (from the start of this script to the task running)

EOF

if [ "$mode" = private ]; then
  cat <<EOF
== running now (they outlive this script; stop all: sudo bash $0 --down)
  thinboxd          pid $thinboxd_pid, snapshots $socket, CSI $csi, log $logfile
  containerd        pid $containerd_pid, private: socket $ctd_sock, config $ctd_conf,
                    root $ctd_dir/root, state $ctd_run/state, log $ctd_log
  container         $cid (namespace $ns), on image $image

  Into the container:
    ctr --address $ctd_sock -n $ns task exec --fifo-dir $ctd_run/fifo -t --exec-id sh1 $cid sh
  Another container on a Thinbox rootfs:
    ctr --address $ctd_sock -n $ns run --rm -t --runc-root $ctd_run/runc --fifo-dir $ctd_run/fifo --cgroup "" \\
      --snapshotter thinbox $image demo sh
  The pool:
    $ctl --address $socket status
EOF
else
  cat <<EOF
== running now (stop all and remove the image from the system containerd: sudo bash $0 --down)
  thinboxd          pid $thinboxd_pid, snapshots $socket, CSI $csi, log $logfile
  container         $cid in the system containerd ($system_address), namespace $ns
  The pool:         $ctl --address $socket status
EOF
fi
cat <<EOF

== with the system's containerd
  Merge into /etc/containerd/config.toml (version 2), restart containerd, then
  ctr image pull --snapshotter thinbox ... / ctr run --snapshotter thinbox ...
  (or snapshotter = "thinbox" in the CRI plugin's containerd section):
$(snippet | sed 's/^/    /')
  Or: sudo bash $0 --system-containerd (uses it once it has the plugin; edits nothing).
== with Kubernetes
  docs/deploy.md: thinboxd under systemd, containerd's CRI on snapshotter "thinbox",
  Kata's drop-in, and the CSI DaemonSet (kubectl apply -k deploy/kubernetes).
EOF
