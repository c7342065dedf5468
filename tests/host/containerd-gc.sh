#!/usr/bin/env bash
# Host test of `thinboxctl gc --containerd`: containerd 1.6 drops a garbage
# collection pass that finds its proxy snapshotter unreachable, so snapshots it
# forgot while thinbox-snapshotter was down stay in the pool. Reproduces that
# with a private containerd and the real daemon, then checks that
# `thinboxctl gc --containerd` removes exactly the forgotten snapshots (children
# first), never one containerd lists (in either of two namespaces), removes
# nothing with --dry-run or within --min-age, and refuses (exit 2, nothing
# removed) when containerd is down or a listing fails. Needs root.
#
#   sudo tests/host/containerd-gc.sh
#
# Environment: THINBOX_SNAPSHOTTER, THINBOX_CTL (binaries; default
# target/debug/…, built with cargo if missing), THINBOX_E2E_KEEP=1 (keep the
# temp dir), THINBOX_LOG (snapshotter log filter), TMPDIR.
# Last line: "containerd-gc: N passed, M failed"; exit status 0 only if M is 0.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/lib/containerd.sh
source "$REPO/tests/lib/containerd.sh"

IMAGE=localhost/thinbox-test:3layers
SN=thinbox
# The namespace whose image is removed while the daemon is down ...
CTR_NAMESPACE=thinbox-gc
# ... and one whose image and container stay in use throughout.
NS_KEPT=thinbox-gc-kept
GC_TIMEOUT=30
PASSED=0
FAILED=0
TMP=
SNAP_PID=
SNAP_STATUS=
ERR_LINE=
SIGNALLED=

ok() { PASSED=$((PASSED + 1)); echo "ok   - $*"; }
not_ok() { FAILED=$((FAILED + 1)); echo "FAIL - $*" >&2; }
check() { local d=$1; shift; if "$@"; then ok "$d"; else not_ok "$d"; fi; }
check_eq() {
    if [[ $3 == "$2" ]]; then ok "$1"; else not_ok "$1: expected '$2', got '$3'"; fi
}
die() { not_ok "$*"; exit 1; }
must() {
    local d=$1 out; shift
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" >&2
        die "$d"
    fi
    [[ -z $out ]] || printf '%s\n' "$out"
}
# ctr (bounded) in the namespace that keeps its image.
ctr_kept() { CTR_NAMESPACE=$NS_KEPT ctr_t 120 "$@"; }

loops_under() {
    losetup --list --noheadings --raw --output NAME,BACK-FILE 2>/dev/null |
        awk -v p="$1/" 'index($2, p) == 1'
}
mounts_under() { findmnt -rn -o TARGET | awk -v p="$1/" 'index($0, p) == 1 || $0 == substr(p, 1, length(p) - 1)'; }

log_tails() {
    local f
    for f in "$TMP"/snapshotter*.log "$TMP/ctd/containerd.log"; do
        [[ -s $f ]] || continue
        echo "---- last lines of $f ----" >&2
        tail -n 60 "$f" | sed 's/\x1b\[[0-9;]*m//g' >&2
    done
}

# Runs a garbage collection now: a synchronous lease delete does.
gc_now() {
    local lease
    if lease=$(ctr_ leases create 2>/dev/null); then
        ctr_ leases delete --sync "$lease" >/dev/null 2>&1 || true
    fi
}

# start_snapshotter LOG [FLAG...]: starts the daemon on $ROOT and waits until it answers.
start_snapshotter() {
    local log=$1 i
    shift
    THINBOX_LOG=${THINBOX_LOG:-info,thinbox_snapshotter=debug,thinbox_blockstore=debug} "$SNAPSHOTTER" --root "$ROOT" --address "$SOCK" \
        --config "$TMP/thinbox.toml" "$@" >"$TMP/$log" 2>&1 </dev/null &
    SNAP_PID=$!
    for (( i = 0; i < 300; i++ )); do
        kill -0 "$SNAP_PID" 2>/dev/null || die "thinbox-snapshotter exited during startup (see $log)"
        "$CTL" --address "$SOCK" --timeout 5 status >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "thinbox-snapshotter did not answer on $SOCK within 30s"
}

stop_snapshotter() {
    [[ -n $SNAP_PID ]] || return 0
    terminate "$SNAP_PID" 30 thinbox-snapshotter || true
    SNAP_STATUS=0
    wait "$SNAP_PID" 2>/dev/null || SNAP_STATUS=$?
    SNAP_PID=
}

# Every snapshot key the daemon holds, sorted, one a line.
pool_keys() {
    "$CTL" --address "$SOCK" devices --json |
        python3 -c 'import json, sys; [print(k) for k in sorted(k for d in json.load(sys.stdin)["devices"] for k in d["snapshots"])]'
}
# What containerd lists for thinbox in a namespace: "KEY PARENT KIND" lines, sorted.
ctr_keys() { CTR_NAMESPACE=$1 ctr_ snapshots --snapshotter "$SN" ls | tail -n +2 | sort; }
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
    local rc=$? m l
    trap - EXIT
    set +e
    if [[ -n $SIGNALLED ]]; then
        not_ok "interrupted by SIG$SIGNALLED"
    elif (( rc != 0 && FAILED == 0 )); then
        not_ok "aborted (exit $rc) near line ${ERR_LINE:-?}"
    fi
    if [[ -n $TMP ]]; then
        if [[ -n $SNAP_PID ]] && ! kill -0 "$SNAP_PID" 2>/dev/null; then
            not_ok "thinbox-snapshotter died unexpectedly"
        fi
        (( FAILED == 0 )) || log_tails
        if [[ -n ${CONTAINERD_PID:-} ]]; then
            CTR_NAMESPACE=$NS_KEPT _ctr_bounded container delete gc-ctr >/dev/null
        fi
        containerd_stop
        stop_snapshotter
        # Last resort (a daemon stopped without --release-on-exit leaves its
        # loops): alternate unmounting and detaching, as loops live in the pool mount.
        for _ in 1 2 3; do
            while read -r m; do umount "$m" 2>/dev/null; done < <(mounts_under "$TMP" | sort -r)
            while read -r l _; do losetup -d "$l" 2>/dev/null; done < <(loops_under "$TMP")
        done
        while read -r m; do
            echo "lazily unmounting $m" >&2
            umount -l "$m"
        done < <(mounts_under "$TMP" | sort -r)
        if [[ ${THINBOX_E2E_KEEP:-0} == 1 ]]; then
            echo "kept $TMP"
        elif [[ -z $(mounts_under "$TMP") ]]; then
            rm -rf --one-file-system "$TMP"
        else
            echo "left $TMP: still mounted" >&2
        fi
    fi
    echo "containerd-gc: $PASSED passed, $FAILED failed"
    (( FAILED == 0 )) && exit 0 || exit 1
}
trap cleanup EXIT
trap 'ERR_LINE=$LINENO' ERR
trap 'SIGNALLED=INT; exit 130' INT
trap 'SIGNALLED=TERM; exit 143' TERM

[[ $EUID -eq 0 ]] || die "must run as root"

# ---- prerequisites -------------------------------------------------------
need=()
for c in containerd:containerd ctr:containerd mkfs.xfs:xfsprogs mkfs.ext4:e2fsprogs \
         losetup:mount findmnt:util-linux python3:python3; do
    command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
# make-oci-image.py packs a static busybox.
[[ $(dpkg-query -W -f '${Status}' busybox-static 2>/dev/null) == "install ok installed" ]] ||
    need+=(busybox-static)
if (( ${#need[@]} )); then
    echo "installing: ${need[*]}"
    must "apt-get update" apt-get update -qq
    must "apt-get install ${need[*]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq "${need[@]}"
fi

SNAPSHOTTER=${THINBOX_SNAPSHOTTER:-$REPO/target/debug/thinbox-snapshotter}
CTL=${THINBOX_CTL:-$REPO/target/debug/thinboxctl}
for bin in "$SNAPSHOTTER:thinbox-snapshotter:THINBOX_SNAPSHOTTER" "$CTL:thinboxctl:THINBOX_CTL"; do
    IFS=: read -r path pkg var <<<"$bin"
    [[ -x $path ]] && continue
    [[ -z ${!var:-} ]] || die "$var=$path is not executable"
    echo "building $pkg"
    (cd "$REPO" && cargo build -p "$pkg") || die "cargo build -p $pkg failed"
    [[ -x $path ]] || die "cargo build did not produce $path"
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/thinbox-gc.XXXXXX")
ROOT=$TMP/root
SOCK=$TMP/thinbox.sock
cat >"$TMP/thinbox.toml" <<'EOF'
[pool]
embedded_size = "8GiB"
[snapshot]
default_size = "1GiB"
EOF

# ---- setup: two namespaces use the daemon --------------------------------
# Without --release-on-exit: a stop keeps the pool as it is (like an upgrade).
start_snapshotter snapshotter-1.log
ok "thinbox-snapshotter listening on $SOCK"
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
stop_snapshotter
check_eq "thinbox-snapshotter stopped cleanly (SIGTERM)" 0 "$SNAP_STATUS"
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

start_snapshotter snapshotter-2.log --release-on-exit
ok "thinbox-snapshotter restarted on the same root"
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
deadline=$((SECONDS + GC_TIMEOUT))
while left=$(pool_keys) && [[ -n $left ]] && (( SECONDS < deadline )); do
    gc_now
    sleep 1
done
check_eq "containerd's GC then removes the rest: 0 snapshots left" "" "$left"

# ---- shutdown ------------------------------------------------------------
containerd_stop
stop_snapshotter
check_eq "thinbox-snapshotter exited cleanly" 0 "$SNAP_STATUS"
check_eq "no loop device backed by a file under $ROOT" "" "$(loops_under "$ROOT")"
check_eq "nothing mounted under $TMP" "" "$(mounts_under "$TMP")"
