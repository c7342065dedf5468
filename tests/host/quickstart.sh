#!/usr/bin/env bash
# The quickstart, run as a user runs it (scripts/quickstart.sh: release build,
# thinboxd on its embedded pool, a private containerd, a local 3-layer image,
# a container on a Thinbox rootfs), with every path it uses in a private temp
# directory. Checks its proof (the container's / is a Thinbox block device,
# the layers are merged) against what the host sees itself, that the
# container really runs, that a second run reuses the running daemons, and
# that --down leaves nothing it started: no thinboxd, containerd, shim or
# container process, no loop device or mount under the temp dir. Then once
# more up (the state left by --down is adopted) and down. First, that it
# refuses a private containerd when the system containerd's config names the
# same thinboxd socket. The node's own
# paths (/var/lib/thinbox, /run/thinbox, /var/log/thinboxd.log,
# /var/lib/thinbox-quickstart, the CSI socket under /var/lib/kubelet, the
# system containerd's socket and runc state) must be as they were.
#
#   sudo tests/host/quickstart.sh
#
# Environment: THINBOX_E2E_KEEP=1 (keep the temp dir), TMPDIR.
# Last line: "quickstart: N passed, M failed"; exit status 0 only if M is 0.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/lib/checks.sh
source "$REPO/tests/lib/checks.sh"
# shellcheck source=tests/lib/containerd.sh
source "$REPO/tests/lib/containerd.sh"

QS=$REPO/scripts/quickstart.sh
CID=thinbox-quickstart
export CTR_NAMESPACE=thinbox-quickstart
TMP=
UP=
TASK_PIDS=()
CTD_RUN=
SHIM_SOCK=/nonexistent
# The container's command (scripts/quickstart.sh).
CONTAINER_CMD='trap "exit 0" TERM INT; sleep 2147483647 & wait'
# The node's own paths, which the quickstart uses by default and this test must not.
NODE_PATHS=(/var/lib/thinbox /run/thinbox /var/log/thinboxd.log /var/lib/thinbox-quickstart
    /var/lib/kubelet/plugins/csi.thinbox.io /run/containerd/containerd.sock
    /run/containerd/runc/thinbox-quickstart /run/containerd/fifo)

# What each node path is now: absent, or its type and inode (made, removed
# or replaced shows; a real installation's daemon writing its log or state
# meanwhile must not, so size and time are left out).
node_paths_state() {
    local p
    for p in "${NODE_PATHS[@]}"; do
        if [[ -e $p || -L $p ]]; then stat -c '%n %F %i' "$p"; else echo "$p absent"; fi
    done
}

# Processes whose command line names a path under the temp dir: what the
# quickstart started there (thinboxd, containerd, shims) and nothing else.
own_procs() { pgrep -f -- "$TMP/" | grep -vx "$$" || true; }

qs() { timeout 1800 bash "$QS" "$@"; }

cleanup() {
    local p
    if [[ -n $TMP ]]; then
        (( FAILED == 0 )) || log_tails "$TMP/thinboxd.log" "$TMP/qs/containerd/containerd.log"
        if [[ -n $UP ]]; then
            echo "cleanup: $QS --down"
            qs --down >"$TMP/down-cleanup.out" 2>&1 || cat "$TMP/down-cleanup.out" >&2
        fi
        # What --down did not end: the private containerd's tasks first (their
        # processes outlive containerd and its shims, and hold their rootfs),
        # then its shims and itself (tests/lib/containerd.sh), then the rest.
        CONTAINERD_PID=$(cat "$CTD_RUN/containerd.pid" 2>/dev/null)
        CONTAINERD_WORKDIR=$CTD_RUN
        [[ -z $CONTAINERD_PID ]] || containerd_stop
        for p in "${TASK_PIDS[@]}"; do
            # A container's init: killing it ends its whole pid namespace.
            [[ $(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline") == "sh -c $CONTAINER_CMD "* ]] || continue
            echo "cleanup: killing container init $p" >&2
            kill -KILL "$p"
        done
        for p in $(own_procs); do
            echo "cleanup: killing $(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline")" >&2
            kill -KILL "$p" 2>/dev/null
        done
        # A killed shim leaves its socket behind.
        rm -f "$SHIM_SOCK"
        # Last resort, so a failed run leaves nothing behind on the host.
        sweep_tmp "$TMP"
    fi
}
finish_with quickstart cleanup

[[ $EUID -eq 0 ]] || die "must run as root"
# The quickstart installs its own dependencies; these are the test's.
install_needed ctr:containerd losetup:mount findmnt:util-linux

node_before=$(node_paths_state)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/qs.XXXXXX")
export THINBOX_ROOT=$TMP/root
export THINBOX_SOCKET=$TMP/run/thinbox.sock
export THINBOX_CSI_ENDPOINT=unix://$TMP/run/csi.sock
export THINBOX_LOG_FILE=$TMP/thinboxd.log
export THINBOX_PID_FILE=$TMP/run/thinboxd.pid
export THINBOX_QUICKSTART_DIR=$TMP/qs
export THINBOX_CONTAINERD_RUN_DIR=$TMP/run/ctd
# Never used without --system-containerd; named here so it could not reach the node's.
export THINBOX_SYSTEM_CONTAINERD=$TMP/no-system-containerd.sock
# Read only, by a private-mode start: a system containerd config naming the socket refuses it.
export THINBOX_SYSTEM_CONTAINERD_CONFIG=$TMP/system-containerd.toml
CTD_RUN=$THINBOX_CONTAINERD_RUN_DIR
export CONTAINERD_ADDRESS=$CTD_RUN/containerd.sock
# containerd 1.6 puts every shim's socket in /run/containerd/s, named by the
# sha256 of containerd's address, the namespace and the container id.
SHIM_SOCK=/run/containerd/s/$(printf '%s' "$CONTAINERD_ADDRESS/$CTR_NAMESPACE/$CID" | sha256sum | cut -d' ' -f1)

# field OUT LABEL: the value after "  LABEL:" in the quickstart's output OUT.
field() { sed -n "s/^  $2: *//p" "$1" | head -n 1; }

# check_up OUT: the checks of one successful run whose output is in OUT.
# Sets THINBOXD_PID, CTD_PID, TASK_PID.
check_up() {
    local out=$1 inside devno fstype src outside hmount task tpid tstatus
    # ---- the proof it prints ------------------------------------------------
    inside=$(field "$out" "rootfs inside")
    read -r fstype src devno _ <<<"$inside" || true
    check_eq "proof: the container's / is ext4" ext4 "${fstype:-}"
    check "proof: the container's / is on a loop or dm device ($src)" grep -Eq '^/dev/(loop|dm-)[0-9]+$' <<<"${src:-}"
    check "$src is a block device on the host" test -b "${src:-/nonexistent}"
    if [[ -b ${src:-/nonexistent} ]]; then
        check_eq "proof: device number of / is the host's $src" \
            "$(stat -c '%t %T' "$src" | { read -r a b; printf '%d:%d' "0x$a" "0x$b"; })" "$devno"
        if [[ $src == /dev/loop* ]]; then
            check "$src is backed by a file under the temp root" \
                grep -q "^$src $THINBOX_ROOT/" <<<"$(loops_under "$THINBOX_ROOT")"
        else
            check "$src is a thin device" grep -q ' thin ' <<<"$(dmsetup table "$(cat "/sys/block/${src#/dev/}/dm/name")")"
        fi
    fi
    outside=$(field "$out" "rootfs outside")
    check "proof: the host side names $src a block device" grep -q "^$src is a block device $devno" <<<"$outside"
    hmount=$(field "$out" "host mount")
    check_eq "proof: the host mounts $src as the task's rootfs under the temp dir" \
        "$CTD_RUN/state/io.containerd.runtime.v2.task/$CTR_NAMESPACE/$CID/rootfs ext4" "$hmount"
    check_eq "host's mount table agrees" "$src ext4" \
        "$(findmnt -n -o SOURCE,FSTYPE --mountpoint "${hmount% *}" | tr -s ' ')"
    check_eq "proof: layer 1's file" "/etc/layer1 = layer1   (from layer 1)" "$(field "$out" "layer1 file")"
    check_eq "proof: layer 2's file" "/data/keep.txt = layer2-keep   (from layer 2)" "$(field "$out" "layer2 file")"
    check "proof: the overwritten file shows layer 3" grep -q '^/data/overwrite.txt = layer3 ' <<<"$(field "$out" overwritten)"
    check "proof: the whited-out file is absent" grep -q '^/data/remove.txt absent ' <<<"$(field "$out" "whited out")"
    check "proof: the whited-out directory is absent" grep -q '^/data/gone absent ' <<<"$(field "$out" "whited-out dir")"
    check "timings: time to first container in seconds" \
        grep -Eq '^  time to first container +[0-9]+\.[0-9] s ' "$out"
    check_eq "timings: one line per step" 8 \
        "$(sed -n '/^== timings/,/time to first container/p' "$out" | grep -Ec ' [0-9]+\.[0-9] s$')"

    # ---- what the host sees itself --------------------------------------------
    THINBOXD_PID=$(cat "$THINBOX_PID_FILE" 2>/dev/null || true)
    check "thinboxd (pid ${THINBOXD_PID:-none}) runs on the temp root" \
        grep -qF -- "--root $THINBOX_ROOT " <<<"$(tr '\0' ' ' 2>/dev/null <"/proc/${THINBOXD_PID:-0}/cmdline")"
    CTD_PID=$(cat "$CTD_RUN/containerd.pid" 2>/dev/null || true)
    check "containerd (pid ${CTD_PID:-none}) runs on the temp config" \
        grep -qF -- "--config $TMP/qs/containerd/config.toml" <<<"$(tr '\0' ' ' 2>/dev/null <"/proc/${CTD_PID:-0}/cmdline")"
    check "its config points the thinbox proxy plugin at the temp socket" \
        grep -qF "address = \"$THINBOX_SOCKET\"" "$TMP/qs/containerd/config.toml"
    check_eq "containerd loaded the thinbox snapshotter" ok \
        "$(ctr_ plugins ls | awk '$1 == "io.containerd.snapshotter.v1" && $2 == "thinbox" {print $NF}')"
    task=$(ctr_ task ls | awk -v c="$CID" '$1 == c')
    read -r _ tpid tstatus <<<"$task" || true
    check_eq "task $CID is running" RUNNING "${tstatus:-}"
    TASK_PID=${tpid:-0}
    TASK_PIDS+=("$TASK_PID")
    check_eq "proof names the task's pid" "$CID RUNNING, pid $TASK_PID (containerd $CONTAINERD_ADDRESS, namespace $CTR_NAMESPACE)" \
        "$(field "$out" task)"
    # The task's / and files, read from the host through /proc/PID.
    check_eq "the task's / is $src (its mountinfo, read from the host)" "$devno ext4 $src" \
        "$(awk '$5 == "/" {for (i = 7; i <= NF; i++) if ($i == "-") {print $3, $(i + 1), $(i + 2); exit}}' "/proc/$TASK_PID/mountinfo" 2>&1)"
    check_eq "the task sees layer 3's overwrite" layer3 "$(cat "/proc/$TASK_PID/root/data/overwrite.txt" 2>&1)"
    check_eq "the task sees layer 1's file" layer1 "$(cat "/proc/$TASK_PID/root/etc/layer1" 2>&1)"
    check "the task does not see the whited-out file" test ! -e "/proc/$TASK_PID/root/data/remove.txt"
    check "the task's shim has its socket ($SHIM_SOCK)" test -S "$SHIM_SOCK"
    # Every run starts a new container: no earlier container's write in it.
    check "the container starts from the image (no /written yet)" test ! -e "/proc/$TASK_PID/root/written"
    check_eq "a command runs in the container and writes its rootfs" "written" \
        "$(ctr_t 60 task exec --fifo-dir "$CTD_RUN/fifo" --exec-id "test-$RANDOM" "$CID" \
            sh -c 'echo written >/written && sync && cat /written' 2>&1)"
    check_eq "the write is on the device the host mounts" written "$(cat "${hmount% *}/written" 2>&1)"
    check_eq "snapshots: 3 committed layers and the container's active one" "3 1" \
        "$(ctr_ snapshots --snapshotter thinbox ls | awk 'NR > 1 {n[$NF]++} END {print n["Committed"] + 0, n["Active"] + 0}')"
}

# check_down OUT NAME=PID...: --down (output in OUT) ended every process and left nothing.
check_down() {
    local out=$1 p
    shift
    check "--down released the pool" grep -q "^released: nothing of $THINBOX_ROOT is attached or mounted$" "$out"
    for p in "$@"; do
        check "${p%%=*} (pid ${p#*=}) is gone" test ! -e "/proc/${p#*=}"
    done
    check_eq "no process of the quickstart's is left (command line naming $TMP)" "" "$(own_procs)"
    check_eq "no loop device backed by a file under $TMP" "" "$(loops_under "$TMP")"
    check_eq "nothing mounted under $TMP" "" "$(mounts_under "$TMP")"
    check "the shim's socket is gone" test ! -e "$SHIM_SOCK"
    check "thinboxd's pid file is gone" test ! -e "$THINBOX_PID_FILE"
    check "the private containerd's runtime dir is gone" test ! -e "$CTD_RUN"
}

# ---- refused: the system containerd already uses this thinboxd -----------------
# A second containerd on one thinboxd: each one's garbage collection would
# remove the other's snapshots.
printf '[proxy_plugins.thinbox]\n  type = "snapshot"\n  address = "%s"\n' "$THINBOX_SOCKET" >"$THINBOX_SYSTEM_CONTAINERD_CONFIG"
qs >"$TMP/refused.out" 2>&1 && rc=0 || rc=$?
check_eq "refused while the system containerd's config names the socket (exit 1)" 1 "$rc"
check "it says why" grep -q "points the system containerd at $THINBOX_SOCKET" "$TMP/refused.out"
check_eq "it started nothing" "" "$(own_procs)"
check "it wrote no pid file" test ! -e "$THINBOX_PID_FILE"
rm "$THINBOX_SYSTEM_CONTAINERD_CONFIG"

# ---- first run: a fresh pool, a fresh containerd ------------------------------
echo "running $QS (output: $TMP/up1.out)"
UP=1
start=$SECONDS
if ! qs >"$TMP/up1.out" 2>&1; then
    tail -n 40 "$TMP/up1.out" >&2
    die "quickstart failed (output above)"
fi
ok "quickstart ran ($((SECONDS - start)) s, build included)"
sed -n '/^== proof/,/time to first container/p' "$TMP/up1.out"
check_up "$TMP/up1.out"
pids1=("thinboxd=$THINBOXD_PID" "containerd=$CTD_PID" "the first container=$TASK_PID")

# ---- second run: the same daemons, a new container ------------------------------
qs >"$TMP/up2.out" 2>&1 || { tail -n 40 "$TMP/up2.out" >&2; die "second quickstart failed (output above)"; }
ok "quickstart ran again"
check "it reused thinboxd" grep -q "^thinboxd is already running (pid ${pids1[0]#*=})$" "$TMP/up2.out"
check "it reused the private containerd" grep -q "^the private containerd is already running (pid ${pids1[1]#*=})$" "$TMP/up2.out"
check "it replaced the first container" grep -q "^stopping the container's task ($CID)$" "$TMP/up2.out"
check "the first container's process is gone" test ! -e "/proc/${pids1[2]#*=}"
check_up "$TMP/up2.out"

# ---- --down ---------------------------------------------------------------------
qs --down >"$TMP/down1.out" 2>&1 || { cat "$TMP/down1.out" >&2; die "quickstart --down failed (output above)"; }
UP=
cat "$TMP/down1.out"
check_down "$TMP/down1.out" "${pids1[0]}" "${pids1[1]}" "the second container=$TASK_PID"

# ---- up again on what --down left, and down ---------------------------------------
UP=1
qs >"$TMP/up3.out" 2>&1 || { tail -n 40 "$TMP/up3.out" >&2; die "quickstart after --down failed (output above)"; }
ok "quickstart ran on the state --down left"
check_up "$TMP/up3.out"
pids3=("thinboxd=$THINBOXD_PID" "containerd=$CTD_PID" "the container=$TASK_PID")
qs --down >"$TMP/down2.out" 2>&1 || { cat "$TMP/down2.out" >&2; die "second quickstart --down failed (output above)"; }
UP=
check_down "$TMP/down2.out" "${pids3[@]}"

check_eq "--down again finds nothing to stop" \
    "no thinboxd started by this script is running|nothing of $THINBOX_ROOT is attached or mounted" \
    "$(qs --down 2>&1 | paste -sd '|')"
check_eq "the node's own paths are as they were (${NODE_PATHS[*]})" "$node_before" "$(node_paths_state)"
