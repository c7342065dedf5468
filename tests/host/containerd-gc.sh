#!/usr/bin/env bash
# Host test of `thinboxctl gc --containerd`: containerd 1.6 drops a garbage
# collection pass that finds its proxy snapshotter unreachable, so snapshots it
# forgot while thinboxd was down stay in the pool. Reproduces that
# with a private containerd and the real daemon, then checks that
# `thinboxctl gc --containerd` removes exactly the forgotten snapshots (children
# first), never one containerd lists (in either of two namespaces), removes
# nothing with --dry-run or within --min-age, and refuses (exit 2, nothing
# removed) when containerd is down or a listing fails; then that the daemon's
# own sweep ([snapshot.containerd_gc]) removes such a leak by itself. Needs root.
#
#   sudo tests/host/containerd-gc.sh
#
# Environment: THINBOX_DAEMON, THINBOX_CTL (the thinboxd and thinboxctl
# binaries; default target/debug/…, built with cargo if missing),
# THINBOX_E2E_KEEP=1 (keep the temp dir), THINBOX_LOG (daemon log filter), TMPDIR.
# Last line: "containerd-gc: N passed, M failed"; exit status 0 only if M is 0.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/lib/checks.sh
source "$REPO/tests/lib/checks.sh"
# shellcheck source=tests/lib/containerd.sh
source "$REPO/tests/lib/containerd.sh"
# shellcheck source=tests/lib/thinboxd.sh
source "$REPO/tests/lib/thinboxd.sh"

IMAGE=localhost/thinbox-test:3layers
SN=thinbox
# The namespace whose image is removed while the daemon is down ...
CTR_NAMESPACE=thinbox-gc
# ... and one whose image and container stay in use throughout.
NS_KEPT=thinbox-gc-kept
GC_TIMEOUT=30
TMP=

# ctr (bounded) in the namespace that keeps its image.
ctr_kept() { CTR_NAMESPACE=$NS_KEPT ctr_t 120 "$@"; }

# start_daemon LOG [FLAG...]: thinboxd on $ROOT with this test's config, serving $SOCK.
start_daemon() {
    local log=$1
    shift
    thinboxd_start "$ROOT" "$SOCK" "$TMP/$log" --config "$TMP/thinbox.toml" "$@"
}

# Every snapshot key the daemon holds, sorted, one a line.
pool_keys() {
    "$CTL" --address "$SOCK" devices --json |
        python3 -c 'import json, sys; [print(k) for k in sorted(k for d in json.load(sys.stdin)["devices"] for k in d["snapshots"])]'
}
# What containerd lists for thinbox in a namespace: "KEY PARENT KIND" lines, sorted.
ctr_keys() { CTR_NAMESPACE=$1 ctr_ snapshots --snapshotter "$SN" ls | tail -n +2 | sort; }
# Runs containerd's garbage collection until the pool is empty or GC_TIMEOUT
# passes; prints what is left.
collect_all() {
    local deadline=$((SECONDS + GC_TIMEOUT)) left
    while left=$(pool_keys) && [[ -n $left ]] && (( SECONDS < deadline )); do
        gc_now
        sleep 1
    done
    echo "$left"
}
# A daemon key without its "<namespace>/<n>/" prefix.
strip_ns() { sed -E 's#^[^/]+/[0-9]+/##'; }
# thinboxctl gc --containerd with the private containerd and our daemon; "$@" adds flags.
ctl_gc() { "$CTL" --address "$SOCK" gc --containerd "$CONTAINERD_ADDRESS" "$@"; }
# json_get FIELD: from a `gc --containerd --json` document on stdin, the field
# (lists: the keys, space-separated, in order).
json_get() {
    python3 -c 'import json, sys
v = json.load(sys.stdin)[sys.argv[1]]
print(" ".join(e["key"] if isinstance(e, dict) else str(e) for e in v) if isinstance(v, list) else json.dumps(v))' "$1"
}

cleanup() {
    if [[ -n $TMP ]]; then
        if [[ -n $THINBOXD_PID ]] && ! kill -0 "$THINBOXD_PID" 2>/dev/null; then
            not_ok "thinboxd died unexpectedly"
        fi
        (( FAILED == 0 )) || log_tails "$TMP"/thinboxd*.log "$TMP/ctd/containerd.log"
        if [[ -n ${CONTAINERD_PID:-} ]]; then
            CTR_NAMESPACE=$NS_KEPT _ctr_bounded container delete gc-ctr >/dev/null
        fi
        containerd_stop
        thinboxd_stop
        # Last resort (a daemon stopped without --release-on-exit leaves its loops).
        sweep_tmp "$TMP"
    fi
}
finish_with containerd-gc cleanup

[[ $EUID -eq 0 ]] || die "must run as root"

# ---- prerequisites -------------------------------------------------------
# make-oci-image.py packs a static busybox.
install_needed containerd:containerd ctr:containerd mkfs.xfs:xfsprogs mkfs.ext4:e2fsprogs \
    losetup:mount findmnt:util-linux python3:python3 =busybox-static

THINBOXD=$(thinbox_binary "$REPO" thinboxd THINBOX_DAEMON) || die "no thinboxd binary"
CTL=$(thinbox_binary "$REPO" thinboxctl THINBOX_CTL) || die "no thinboxctl binary"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/thinbox-gc.XXXXXX")
ROOT=$TMP/root
SOCK=$TMP/thinbox.sock
thinboxd_small_config "$TMP/thinbox.toml"

# ---- setup: two namespaces use the daemon --------------------------------
# Without --release-on-exit: a stop keeps the pool as it is (like an upgrade).
start_daemon thinboxd-1.log
ok "thinboxd serving snapshots on $SOCK"
containerd_start "$TMP/ctd" "$SOCK" || die "containerd did not start"
must "build OCI image" python3 "$REPO/tests/lib/make-oci-image.py" "$TMP/image.tar" --ref "$IMAGE"
must "ctr image import ($CTR_NAMESPACE)" ctr_t 120 image import --snapshotter "$SN" "$TMP/image.tar"
must "ctr image import ($NS_KEPT)" ctr_kept image import --snapshotter "$SN" "$TMP/image.tar"
# Still in use: a container in the other namespace, and a snapshot of the
# first namespace that is not the image's (ctr labels it a gc root).
must "ctr container create ($NS_KEPT)" ctr_kept container create --snapshotter "$SN" "$IMAGE" gc-ctr
must "ctr snapshots prepare gc-keep" ctr_ snapshots --snapshotter "$SN" prepare gc-keep

layers=$(ctr_keys "$CTR_NAMESPACE" | awk '$NF == "Committed"')
echo "$layers"
check_eq "the image left 3 committed snapshots in $CTR_NAMESPACE" 3 "$(wc -l <<<"$layers")"
# The chain's names from the top down: the order in which they must go.
chain=$(awk '{p[$1] = (NF == 3 ? $2 : "")} END {
    for (k in p) c[p[k]] = 1
    for (k in p) if (!(k in c)) top = k
    for (k = top; k != ""; k = p[k]) print k }' <<<"$layers")
check_eq "the chain has 3 layers" 3 "$(wc -l <<<"$chain")"
before=$(pool_keys)
echo "$before"
check_eq "the pool holds 8 snapshots (3 layers + gc-keep, 3 layers + gc-ctr)" 8 "$(wc -l <<<"$before")"
forgotten=$(grep "^$CTR_NAMESPACE/[0-9]*/sha256:" <<<"$before" || true)
check_eq "3 of them are $CTR_NAMESPACE's layers" 3 "$(wc -l <<<"$forgotten")"

# ---- the issue: containerd collects while the daemon is down -------------
thinboxd_stop
check_eq "thinboxd stopped cleanly (SIGTERM)" 0 "$THINBOXD_STATUS"
check "its loops stay (no --release-on-exit)" test -n "$(loops_under "$ROOT")"
log_mark=$(wc -l <"$CONTAINERD_WORKDIR/containerd.log")
ctr_t 60 image rm --sync "$IMAGE" >/dev/null 2>&1 || true
check_eq "image removed from containerd" "" "$(ctr_ image ls -q | grep -Fx "$IMAGE" || true)"
check "containerd's snapshot collection failed (daemon down)" \
    grep -q 'snapshot garbage collection failed.*snapshotter=thinbox' <(tail -n +"$log_mark" "$CONTAINERD_WORKDIR/containerd.log")
rc=0
out=$(ctl_gc --min-age 0 2>&1) || rc=$?
echo "$out"
check_eq "daemon down: gc --containerd refuses (exit 2)" 2 "$rc"
check_eq "... in one line" 1 "$(wc -l <<<"$out")"
# A crashed daemon leaves its socket behind: containerd's listing through it
# fails (containerd asks the daemon for each snapshot it lists).
python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$SOCK"
rc=0
out=$(ctl_gc --min-age 0 2>&1) || rc=$?
echo "$out"
check_eq "a namespace's listing fails: exit 2" 2 "$rc"
check "... one line: which listing, nothing removed" \
    test "$(wc -l <<<"$out")" -eq 1 -a -n "$(grep -F "list the snapshots of \"$SN\" in namespace" <<<"$out" | grep -F 'nothing removed')"

start_daemon thinboxd-2.log --release-on-exit
ok "thinboxd restarted on the same root"
# containerd's proxy client reconnects after a backoff (at most 3 s in 1.6).
for (( i = 0; i < 100; i++ )); do
    ctr_ snapshots --snapshotter "$SN" ls >/dev/null 2>&1 && break
    sleep 0.1
done
check_eq "containerd lists only gc-keep in $CTR_NAMESPACE" "gc-keep Active" "$(ctr_keys "$CTR_NAMESPACE" | awk '{print $1, $NF}')"
check_eq "containerd still lists 4 snapshots in $NS_KEPT" 4 "$(ctr_keys "$NS_KEPT" | wc -l)"
check_eq "the pool still holds the 3 forgotten layers (the leak)" "$before" "$(pool_keys)"

# ---- refusals: nothing removed -------------------------------------------
rc=0
out=$(ctl_gc --snapshotter nosuch --min-age 0 2>&1) || rc=$?
echo "$out"
check_eq "an unknown --snapshotter: exit 2" 2 "$rc"
check "... one line naming it" test "$(wc -l <<<"$out")" -eq 1 -a -n "$(grep -F '"nosuch" is not loaded' <<<"$out")"
rc=0
out=$("$CTL" --address "$TMP/ctd/containerd.sock" gc --containerd "$CONTAINERD_ADDRESS" --min-age 0 2>&1) || rc=$?
echo "$out"
check_eq "--address not the socket containerd's thinbox uses: exit 2" 2 "$rc"
check_eq "the pool is unchanged after refusals" "$before" "$(pool_keys)"

# ---- --dry-run and --min-age remove nothing -----------------------------
json=$(ctl_gc --dry-run --min-age 0 --json) || not_ok "gc --dry-run failed"
echo "$json"
check_eq "--dry-run would remove the forgotten layers, top first" "$chain" \
    "$(json_get removed <<<"$json" | tr ' ' '\n' | strip_ns)"
check_eq "--dry-run: removed entries are $CTR_NAMESPACE's" "$(sort <<<"$forgotten")" \
    "$(json_get removed <<<"$json" | tr ' ' '\n' | sort)"
check_eq "--dry-run says so" true "$(json_get dry_run <<<"$json")"
check_eq "--dry-run: containerd knows 5" 5 "$(json_get known <<<"$json")"
check_eq "--dry-run saw both namespaces" "$CTR_NAMESPACE $NS_KEPT" "$(json_get namespaces <<<"$json")"
check_eq "--dry-run removed nothing" "$before" "$(pool_keys)"

json=$(ctl_gc --json) || not_ok "gc (default --min-age) failed"
check_eq "default --min-age: nothing removed (the layers are minutes old)" "" "$(json_get removed <<<"$json")"
check_eq "default --min-age: the 3 reported as kept" "$(sort <<<"$forgotten")" "$(json_get kept <<<"$json" | tr ' ' '\n')"
check_eq "the pool is unchanged after --min-age" "$before" "$(pool_keys)"

containerd_stop
rc=0
out=$(ctl_gc --min-age 0 2>&1) || rc=$?
echo "$out"
check_eq "containerd down: exit 2" 2 "$rc"
check "... one line: cannot reach containerd, nothing removed" \
    test "$(wc -l <<<"$out")" -eq 1 -a -n "$(grep -F 'cannot reach containerd at' <<<"$out" | grep -F 'nothing removed')"
check_eq "containerd down: the pool is unchanged" "$before" "$(pool_keys)"
containerd_start "$TMP/ctd" "$SOCK" || die "containerd did not start again"

# ---- the fix -------------------------------------------------------------
out=$(ctl_gc --min-age 0) || not_ok "gc --containerd failed"
echo "$out"
check_eq "gc removed the 3 forgotten layers, children first" "$chain" \
    "$(awk '$1 == "removed" {print $2}' <<<"$out" | strip_ns)"
after=$(pool_keys)
echo "$after"
check_eq "0 snapshots unknown to containerd are left" "$(grep -vxF -f <(echo "$forgotten") <<<"$before")" "$after"
known=$( { ctr_keys "$CTR_NAMESPACE" | awk -v n="$CTR_NAMESPACE" '{print n, $1}'; ctr_keys "$NS_KEPT" | awk -v n="$NS_KEPT" '{print n, $1}'; } | sort)
check_eq "the pool holds exactly what containerd lists" "$known" \
    "$(sed -E 's#^([^/]+)/[0-9]+/#\1 #' <<<"$after" | sort)"
check_eq "a second run finds nothing" "gc: nothing to remove; containerd lists 5 of 5 snapshot(s)" "$(ctl_gc --min-age 0)"

# The kept container's rootfs is intact: mount it read-only and read layer 3.
read -r _ _ mtype msrc _ _ _ < <(ctr_kept snapshots --snapshotter "$SN" mounts /x gc-ctr) || true
mkdir "$TMP/rootfs"
if [[ $mtype == ext4 ]] && mount -t ext4 -o ro,noload "$msrc" "$TMP/rootfs"; then
    check_eq "kept container rootfs reads layer 3" layer3 "$(cat "$TMP/rootfs/data/overwrite.txt" 2>&1)"
    umount "$TMP/rootfs"
else
    not_ok "mount the kept container's rootfs ($mtype $msrc)"
fi

# ---- containerd's own removal still works afterwards ---------------------
must "ctr container rm ($NS_KEPT)" ctr_kept container rm gc-ctr
must "ctr image rm ($NS_KEPT)" ctr_kept image rm "$IMAGE"
must "ctr snapshots rm gc-keep" ctr_ snapshots --snapshotter "$SN" rm gc-keep
left=$(collect_all)
check_eq "containerd's GC then removes the rest: 0 snapshots left" "" "$left"

# ---- the daemon's own sweep ([snapshot.containerd_gc]) --------------------
# The same leak again, then a daemon that sweeps every second: it removes the
# forgotten layers by itself once they are MIN_AGE old, and nothing
# containerd lists.
MIN_AGE=5
must "ctr image import (again)" ctr_t 120 image import --snapshotter "$SN" "$TMP/image.tar"
must "ctr snapshots prepare gc-keep-2" ctr_ snapshots --snapshotter "$SN" prepare gc-keep-2
forgotten=$(pool_keys | grep "^$CTR_NAMESPACE/[0-9]*/sha256:" || true)
check_eq "the image made 3 layers again" 3 "$(wc -l <<<"$forgotten")"
thinboxd_stop
ctr_t 60 image rm --sync "$IMAGE" >/dev/null 2>&1 || true
thinboxd_small_config "$TMP/sweep.toml"
cat >>"$TMP/sweep.toml" <<EOF
[snapshot.containerd_gc]
interval_s = 1
address = "$CONTAINERD_ADDRESS"
min_age_s = $MIN_AGE
EOF
thinboxd_start "$ROOT" "$SOCK" "$TMP/thinboxd-3.log" --config "$TMP/sweep.toml" --release-on-exit
ok "thinboxd restarted, sweeping every second"
before=$(pool_keys)
check_eq "the 3 forgotten layers are back in the pool's listing (the leak)" "$forgotten" "$(grep "^$CTR_NAMESPACE/[0-9]*/sha256:" <<<"$before" || true)"
deadline=$((SECONDS + 60))
while left=$(pool_keys) && grep -q "^$CTR_NAMESPACE/[0-9]*/sha256:" <<<"$left" && (( SECONDS < deadline )); do
    sleep 1
done
check_eq "the daemon's sweep removed the 3 forgotten layers" "" "$(grep "^$CTR_NAMESPACE/[0-9]*/sha256:" <<<"$left" || true)"
check_eq "... and nothing else: gc-keep-2 stays" "$(grep -vxF -f <(echo "$forgotten") <<<"$before")" "$left"
check_eq "its log names each removal" 3 "$(grep -c 'removed a snapshot containerd no longer lists' "$TMP/thinboxd-3.log")"
check_eq "containerd still lists gc-keep-2" "gc-keep-2 Active" "$(ctr_keys "$CTR_NAMESPACE" | awk '{print $1, $NF}')"
# containerd down: the sweeps remove nothing, and say why.
containerd_stop
kept=$(pool_keys)
sleep 2.5
check "with containerd down, the sweep warns that it cannot reach it" \
    grep -q 'WARN.*sweeping snapshots containerd forgot.*cannot reach containerd' "$TMP/thinboxd-3.log"
check_eq "... and removes nothing" "$kept" "$(pool_keys)"
containerd_start "$TMP/ctd" "$SOCK" || die "containerd did not start again"
must "ctr snapshots rm gc-keep-2" ctr_ snapshots --snapshotter "$SN" rm gc-keep-2
left=$(collect_all)
check_eq "containerd's GC still removes the rest beside the sweep: 0 snapshots left" "" "$left"

# ---- shutdown ------------------------------------------------------------
containerd_stop
thinboxd_stop
check_eq "thinboxd exited cleanly" 0 "$THINBOXD_STATUS"
check_eq "no loop device backed by a file under $ROOT" "" "$(loops_under "$ROOT")"
check_eq "nothing mounted under $TMP" "" "$(mounts_under "$TMP")"
