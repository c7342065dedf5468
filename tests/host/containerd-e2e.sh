#!/usr/bin/env bash
# End-to-end test: a real containerd using thinboxd as a proxy snapshotter
# imports a 3-layer image, runs containers on it, and everything (snapshots,
# loop devices or thin devices, mounts) is gone afterwards. Needs root. Runs on
# whichever backend the daemon picks: reflink on the host, dm-thin where the
# kernel has device-mapper (the uml tier runs it there).
#
#   sudo tests/host/containerd-e2e.sh
#
# Environment: THINBOX_DAEMON (the thinboxd binary; default
# target/debug/thinboxd, built with cargo if missing), THINBOX_E2E_KEEP=1
# (keep the temp dir), THINBOX_LOG (daemon log filter, default
# info,thinbox_snapshotter=debug,thinbox_blockstore=debug), TMPDIR.
# Last line: "containerd-e2e: N passed, M failed"; exit status 0 only if M is 0.
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
GC_TIMEOUT=30
TMP=
RUN_PID=

cleanup() {
    if [[ -n $RUN_PID ]]; then kill "$RUN_PID" 2>/dev/null; wait "$RUN_PID" 2>/dev/null; fi
    if [[ -n $TMP ]]; then
        if [[ -n $THINBOXD_PID ]] && ! kill -0 "$THINBOXD_PID" 2>/dev/null; then
            not_ok "thinboxd died unexpectedly"
        fi
        (( FAILED == 0 )) || log_tails "$TMP/thinboxd.log" "$TMP/ctd/containerd.log"
        containerd_stop
        thinboxd_stop
        # Last resort, so a failed run leaves nothing behind on the host.
        sweep_tmp "$TMP"
    fi
}
finish_with containerd-e2e cleanup

[[ $EUID -eq 0 ]] || die "must run as root"

# ---- prerequisites -------------------------------------------------------
# The plain busybox package also ships /bin/busybox, but dynamically linked:
# make-oci-image.py packs busybox-static's.
install_needed containerd:containerd ctr:containerd runc:runc mkfs.xfs:xfsprogs mkfs.ext4:e2fsprogs \
    losetup:mount findmnt:util-linux python3:python3 =busybox-static

THINBOXD=$(thinbox_binary "$REPO" thinboxd THINBOX_DAEMON) || die "no thinboxd binary"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/thinbox-e2e.XXXXXX")
ROOT=$TMP/root
SOCK=$TMP/thinbox.sock

# ---- thinboxd ------------------------------------------------------------
# Small sizes keep the sparse files modest; exercises --config as well.
thinboxd_small_config "$TMP/thinbox.toml"
thinboxd_start "$ROOT" "$SOCK" "$TMP/thinboxd.log" --config "$TMP/thinbox.toml" --release-on-exit
ok "thinboxd serving snapshots on $SOCK"
BACKEND=$(grep -o 'backend="[a-z-]*"' "$TMP/thinboxd.log" | head -n 1 | cut -d'"' -f2)
case $BACKEND in
    reflink | dm-thin) ok "pool backend: $BACKEND" ;;
    *) die "cannot tell the pool backend from the thinboxd log" ;;
esac

# Active devices of the pool: loops on its images, or its thin dm devices.
pool_devices() {
    if [[ $BACKEND == reflink ]]; then loops_under "$ROOT/pool"; return; fi
    dmsetup ls 2>/dev/null | awk -v p="$DM_PREFIX-" 'index($1, p) == 1 && $1 !~ /-(meta|data|pool)$/'
}
# Thin ids the pool holds (read from a metadata snapshot of the live pool).
thin_ids() {
    dmsetup message "$DM_PREFIX-pool" 0 reserve_metadata_snap
    thin_ls --metadata-snap --no-headers -o DEV "/dev/mapper/$DM_PREFIX-meta"
    dmsetup message "$DM_PREFIX-pool" 0 release_metadata_snap
}
if [[ $BACKEND == dm-thin ]]; then
    DM_PREFIX=$(dmsetup ls | awk '$1 ~ /^thinbox-[0-9a-f]+-pool$/ {sub(/-pool$/, "", $1); print $1}')
    [[ $(wc -w <<<"$DM_PREFIX") == 1 ]] || die "expected one thinbox thin pool, found: $DM_PREFIX"
    check_eq "fresh thin pool holds no thin ids" "" "$(thin_ids)"
fi

# ---- containerd ----------------------------------------------------------
containerd_start "$TMP/ctd" "$SOCK" || die "containerd did not start"
plugins=$(ctr_ plugins ls) || die "ctr plugins ls failed"
check_eq "containerd loaded the thinbox proxy plugin" ok \
    "$(awk '$1 == "io.containerd.snapshotter.v1" && $2 == "thinbox" {print $NF}' <<<"$plugins")"

# ---- image import --------------------------------------------------------
must "build OCI image" python3 "$REPO/tests/lib/make-oci-image.py" "$TMP/image.tar" --ref "$IMAGE"
must "ctr image import --snapshotter $SN" ctr_t 120 image import --snapshotter "$SN" "$TMP/image.tar"
snaps=$(ctr_ snapshots --snapshotter "$SN" ls | tail -n +2)
echo "$snaps"
check_eq "import left 3 committed snapshots" 3 "$(awk '$NF == "Committed"' <<<"$snaps" | wc -l)"
check_eq "snapshots form one parent chain" 2 "$(awk 'NF == 3 {print $2}' <<<"$snaps" | wc -l)"
top=$(awk 'NR == FNR {if (NF == 3) p[$2] = 1; next} !($1 in p) {print $1}' <(echo "$snaps") <(echo "$snaps"))
[[ $(wc -w <<<"$top") -eq 1 ]] || die "cannot find the top of the snapshot chain"

# A read-only view of the image, mounted on the host. ctr makes it without a
# lease, so a collection still running after the import may take it: let that
# finish first, and make the view again if it went all the same.
for attempt in 1 2 3; do
    gc_now
    must "ctr snapshots view" ctr_ snapshots --snapshotter "$SN" view e2e-view "$top"
    vtype=
    read -r _ _ vtype vsrc _ _ vopts < <(ctr_ snapshots --snapshotter "$SN" mounts /x e2e-view) || true
    [[ -n $vtype ]] && break
    echo "view collected by containerd's GC (attempt $attempt); making it again"
done
check_eq "view mount type" ext4 "$vtype"
check "view source $vsrc is a block device" test -b "$vsrc"
check "view mount options include ro" grep -qw ro <<<"${vopts//,/ }"
mkdir "$TMP/view"
if mount -t ext4 -o ro "$vsrc" "$TMP/view"; then
    check_eq "view shows layer 3's overwrite" layer3 "$(cat "$TMP/view/data/overwrite.txt" 2>&1)"
    check "view has no whited-out file" test ! -e "$TMP/view/data/remove.txt"
    umount "$TMP/view"
else
    not_ok "mount -o ro $vsrc"
fi
# ctr holds no lease on the view: containerd's GC may collect it first (both are fine).
if ! out=$(ctr_ snapshots --snapshotter "$SN" rm e2e-view 2>&1) && ! grep -q "not found" <<<"$out"; then
    printf '%s\n' "$out" >&2
    die "ctr snapshots rm view"
fi
check "view gone" test -z "$(ctr_ snapshots --snapshotter "$SN" ls | awk '$1 == "e2e-view"')"

# ---- a container ---------------------------------------------------------
ID=e2e-$$
# Prints facts for the host to check, then waits (bounded) for /release.
# shellcheck disable=SC2016 # expanded inside the container
script='
echo "overwrite=$(cat /data/overwrite.txt)"
echo "keep=$(cat /data/keep.txt)"
echo "layer1=$(cat /etc/layer1)"
echo "layer3=$(cat /etc/layer3)"
[ -e /data/remove.txt ] && echo remove=present || echo remove=absent
[ -e /data/gone ] && echo gone=present || echo gone=absent
echo "opaque=$(ls /data/opaque | tr "\n" " ")"
echo "owned=$(stat -c %u:%g:%a /data/owned)"
echo "hardlink=$(stat -c %h /data/keep.txt):$(cat /data/hardlink)"
echo "symlink=$(readlink /data/symlink):$(cat /data/symlink)"
echo thinbox-e2e >/written.txt && sync && echo "written=$(cat /written.txt)"
echo "mountinfo=$(awk "\$5 == \"/\"" /proc/self/mountinfo)"
echo "mounts=$(grep " / " /proc/mounts)"
echo READY
i=0
while [ ! -e /release ] && [ $i -lt 1200 ]; do usleep 100000; i=$((i + 1)); done
[ -e /release ] && echo released
'
ctr_t 300 run --rm "${CTR_RUN_FLAGS[@]}" --snapshotter "$SN" "$IMAGE" "$ID" sh -c "$script" \
    >"$TMP/run1.out" 2>&1 </dev/null &
RUN_PID=$!
for (( i = 0; i < 600; i++ )); do
    grep -q '^READY$' "$TMP/run1.out" && break
    kill -0 "$RUN_PID" 2>/dev/null || break
    sleep 0.1
done
if ! grep -q '^READY$' "$TMP/run1.out"; then
    cat "$TMP/run1.out" >&2
    die "container $ID did not start (output above)"
fi
cat "$TMP/run1.out"
fact() { sed -n "s/^$1=//p" "$TMP/run1.out"; }

check_eq "overwritten file shows layer 3" layer3 "$(fact overwrite)"
check_eq "layer 2 file present" layer2-keep "$(fact keep)"
check_eq "layer 1 file present" layer1 "$(fact layer1)"
check_eq "layer 3 file present" layer3 "$(fact layer3)"
check_eq "whited-out file absent" absent "$(fact remove)"
check_eq "whited-out directory absent" absent "$(fact gone)"
check_eq "opaque directory holds only layer 3's entry" "c " "$(fact opaque)"
check_eq "owner and mode kept" 1000:1000:640 "$(fact owned)"
check_eq "hard link kept" 2:layer2-keep "$(fact hardlink)"
check_eq "symlink kept" keep.txt:layer2-keep "$(fact symlink)"
check_eq "container can write its rootfs" thinbox-e2e "$(fact written)"

# mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER
read -r c_devno c_fstype c_source < <(fact mountinfo |
    awk '{for (i = 7; i <= NF; i++) if ($i == "-") {print $3, $(i + 1), $(i + 2); exit}}') || true
check_eq "container root fstype (mountinfo)" ext4 "$c_fstype"
if [[ $BACKEND == reflink ]]; then
    check "container root source $c_source is /dev/loopN" grep -Eq '^/dev/loop[0-9]+$' <<<"$c_source"
else
    check "container root source $c_source is /dev/dm-N" grep -Eq '^/dev/dm-[0-9]+$' <<<"$c_source"
fi
read -r m_src m_type m_opts _ < <(fact mounts | awk '{print $1, $3, $4}') || true
check_eq "container root in /proc/mounts" "$c_source ext4" "$m_src $m_type"
check "container root mounted rw" grep -qw rw <<<"${m_opts//,/ }"
check "container root mounted noatime" grep -qw noatime <<<"${m_opts//,/ }"

# The host side of the same mount.
read -r _ _ h_type h_src _ _ h_opts < <(ctr_ snapshots --snapshotter "$SN" mounts /x "$ID") || true
check_eq "snapshot mount type" ext4 "$h_type"
check "snapshot source $h_src is a block device on the host" test -b "$h_src"
check "snapshot mount options include rw" grep -qw rw <<<"${h_opts//,/ }"
check_eq "container root is the snapshot's device" "$h_src" "$c_source"
if [[ -b $h_src ]]; then
    h_devno=$(stat -c '%t %T' "$h_src" | { read -r a b; printf '%d:%d' "0x$a" "0x$b"; })
    check_eq "container root device number matches $h_src" "$h_devno" "$c_devno"
fi
if [[ $BACKEND == reflink ]]; then
    check "$h_src is a loop device backed by a file under the daemon's root" \
        grep -q "^$h_src $ROOT/" <<<"$(loops_under "$ROOT")"
else
    dm_name=$(cat "/sys/block/${h_src#/dev/}/dm/name" 2>/dev/null || true)
    check "$h_src ($dm_name) is a thin device of the daemon's pool" \
        grep -Eq "^0 [0-9]+ thin " <<<"$(dmsetup table "$dm_name" 2>/dev/null)"
fi
bundle=$CONTAINERD_WORKDIR/state/io.containerd.runtime.v2.task/$CTR_NAMESPACE/$ID/rootfs
check_eq "bundle rootfs mounted from the snapshot device" "$h_src ext4" \
    "$(findmnt -n -o SOURCE,FSTYPE --mountpoint "$bundle" | tr -s ' ')"
check_eq "container's write visible on the host" thinbox-e2e "$(cat "$bundle/written.txt" 2>&1)"

touch "$bundle/release"
wait "$RUN_PID" && rc=0 || rc=$?
RUN_PID=
check_eq "container exited cleanly" 0 "$rc"
check "container saw the release" grep -q '^released$' "$TMP/run1.out"

# A second container gets a fresh writable layer.
out=$(ctr_t 120 run --rm "${CTR_RUN_FLAGS[@]}" --snapshotter "$SN" "$IMAGE" "$ID-2" \
    sh -c '[ -e /written.txt ] && echo leaked || echo fresh; cat /data/overwrite.txt' </dev/null 2>&1) ||
    { echo "$out" >&2; die "second container failed"; }
check_eq "second container starts from the image, not the first's writes" "fresh layer3" "$(paste -sd " " <<<"$out")"
check_eq "container snapshots removed with the containers" 3 \
    "$(ctr_ snapshots --snapshotter "$SN" ls | tail -n +2 | wc -l)"

# ---- removal and garbage collection --------------------------------------
must "ctr image rm" ctr_ image rm "$IMAGE"
gc_start=$SECONDS
deadline=$((SECONDS + GC_TIMEOUT))
while :; do
    left=$(ctr_ snapshots --snapshotter "$SN" ls | tail -n +2)
    devs=$(pool_devices)
    if [[ $BACKEND == reflink ]]; then imgs=$(find "$ROOT/pool/devices" -xdev -type f -name '*.img'); else imgs=$(thin_ids); fi
    [[ -z $left && -z $devs && -z $imgs ]] && break
    (( SECONDS < deadline )) || break
    gc_now
    sleep 1
done
check_eq "containerd GC removed every thinbox snapshot (waited $((SECONDS - gc_start))s)" "" "$left"
check_eq "no $BACKEND device left active" "" "$devs"
check_eq "thinboxd deleted its device storage (images or thin ids)" "" "$imgs"

# ---- shutdown ------------------------------------------------------------
check "thinboxd still running" kill -0 "$THINBOXD_PID"
containerd_stop
check "containerd stopped" test -z "$CONTAINERD_PID"
thinboxd_stop
check_eq "thinboxd exited cleanly on SIGTERM" 0 "$THINBOXD_STATUS"
check_eq "no loop device backed by a file under $ROOT" "" "$(loops_under "$ROOT")"
check_eq "nothing mounted under $TMP" "" "$(mounts_under "$TMP")"
if [[ $BACKEND == dm-thin ]]; then
    check_eq "no dm device of the pool left (released on exit)" "" "$(dmsetup ls 2>/dev/null | grep -F "$DM_PREFIX-" || true)"
fi
