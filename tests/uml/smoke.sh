#!/usr/bin/env bash
# Proves that the kernel's dm-thin works, end to end. Runs INSIDE the UML guest:
#   tests/uml/run-in-uml.sh -- bash tests/uml/smoke.sh
# Pool on two loop devices over sparse files in the guest's /tmp (tmpfs); a thin
# device with ext4 and a file; a snapshot of the *inactive* origin (create_snap);
# the file read back from the snapshot; everything torn down, thin_check clean.
# One line per check, then exactly "uml-smoke: N passed, M failed". The first
# failing check stops the sequence (the rest are listed as skipped), and whatever
# was set up is removed. Exit status 0 only if every check passed.
set -uo pipefail # no -e: each check reports its own failure

export DM_DISABLE_UDEV=1 # no udev in the guest: dmsetup makes the /dev/mapper nodes itself
passed=0 failed=0 n=0 stopped=0
pool=smoke-pool thin0=smoke-thin0 snap1=smoke-snap1
meta_loop='' data_loop='' pool_mm='' content=''

if [ ! -c /dev/mapper/control ]; then
  echo "FAIL - /dev/mapper/control exists (not in the UML guest? run: tests/uml/run-in-uml.sh -- bash tests/uml/smoke.sh)"
  echo "uml-smoke: 0 passed, 1 failed"
  exit 1
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/uml-smoke.XXXXXX") || { echo "uml-smoke: 0 passed, 1 failed"; exit 1; }

# check DESCRIPTION COMMAND...: runs COMMAND in this shell (so it may set variables),
# prints one line, and on failure its output.
check() {
  local desc=$1 st=0 t0=$EPOCHREALTIME
  shift
  if [ "$stopped" = 1 ]; then
    echo "skip    - $desc"
    return 0
  fi
  n=$((n + 1))
  "$@" >"$work/out" 2>&1 || st=$?
  local us=$((${EPOCHREALTIME/./} - ${t0/./}))
  local took
  took=$(printf '%d.%02ds' $((us / 1000000)) $((us % 1000000 / 10000)))
  if [ "$st" = 0 ]; then
    passed=$((passed + 1))
    printf 'ok   %2d - %s (%s)\n' "$n" "$desc" "$took"
  else
    failed=$((failed + 1))
    stopped=1
    printf 'FAIL %2d - %s (exit %s)\n' "$n" "$desc" "$st"
    sed 's/^/       | /' "$work/out"
  fi
}

# major:minor of a block device node, or of a dm device by name. Tables name the
# devices they use this way: without udev, /dev/mapper paths of other dm devices
# cannot be relied on.
majmin_of_node() { cat "/sys/class/block/$(basename "$(readlink -f "$1")")/dev"; }
majmin_of_dm() { dmsetup info -c --noheadings -o major,minor --separator : "$1"; }

make_files() {
  truncate -s 64M "$work/meta.img" && truncate -s 1G "$work/data.img" &&
    [ "$(stat -c %b "$work/data.img")" = 0 ] # sparse: no blocks allocated yet
}
attach_loops() {
  meta_loop=$(losetup -f --show "$work/meta.img") && data_loop=$(losetup -f --show "$work/data.img") &&
    [ -b "$meta_loop" ] && [ -b "$data_loop" ] && echo "meta $meta_loop, data $data_loop"
}
zero_meta() { dd if=/dev/zero of="$meta_loop" bs=4096 count=1 conv=fsync status=none; }
create_pool() {
  local meta_mm data_mm sectors
  meta_mm=$(majmin_of_node "$meta_loop") && data_mm=$(majmin_of_node "$data_loop") &&
    sectors=$(blockdev --getsz "$data_loop") || return 1
  # 64 KiB data blocks (128 sectors), low-water mark 1024 blocks, no feature args.
  dmsetup create "$pool" --table "0 $sectors thin-pool $meta_mm $data_mm 128 1024 0" &&
    pool_mm=$(majmin_of_dm "$pool") && echo "pool $pool_mm"
}
pool_healthy() {
  local st
  st=$(dmsetup status "$pool") && echo "$st" && [[ $st == *" thin-pool "* && $st == *" rw "* ]]
}
message() { dmsetup message "$pool" 0 "$1"; }
activate_thin() { # NAME THIN_ID: 2 GiB virtual size, more than the 1 GiB pool (thin provisioning)
  dmsetup create "$1" --table "0 4194304 thin $pool_mm $2" && [ -b "/dev/mapper/$1" ]
}
write_file() {
  mkdir -p "$work/mnt" && mount "/dev/mapper/$thin0" "$work/mnt" &&
    content="written by uml-smoke $$ at $EPOCHREALTIME" &&
    echo "$content" >"$work/mnt/hello" && dd if=/dev/urandom of="$work/mnt/random" bs=1M count=8 status=none &&
    sha256sum "$work/mnt/random" >"$work/random.sha256" && sync
}
data_allocated() { # used data blocks in the pool's status: "<used>/<total>" in field 6
  local used
  used=$(dmsetup status "$pool" | awk '{ split($6, d, "/"); print d[1] }') &&
    echo "data blocks used: $used" && [ "$used" -gt 0 ]
}
snapshot_has_file() {
  mount -o ro "/dev/mapper/$snap1" "$work/mnt" || return 1
  local ok=0
  [ "$(cat "$work/mnt/hello")" = "$content" ] || { echo "hello differs: $(cat "$work/mnt/hello")"; ok=1; }
  (cd "$work/mnt" && sha256sum -c "$work/random.sha256") || ok=1
  umount "$work/mnt" || ok=1
  return "$ok"
}
detach_loops() { losetup -d "$meta_loop" && losetup -d "$data_loop" && meta_loop='' data_loop=''; }
no_loops_left() { ! losetup -a | grep -F "$work/"; }
no_dm_devices() {
  local ls
  ls=$(dmsetup ls) && echo "$ls" && [ "$ls" = "No devices found" ]
}

# Whatever is left after a failure: best effort, quiet.
cleanup() {
  umount "$work/mnt" 2>/dev/null
  for d in "$snap1" "$thin0" "$pool"; do dmsetup remove "$d" 2>/dev/null; done
  for l in "$meta_loop" "$data_loop"; do [ -z "$l" ] || losetup -d "$l" 2>/dev/null; done
  rm -rf -- "$work"
}
trap cleanup EXIT

check "sparse metadata (64M) and data (1G) files in $work" make_files
check "loop devices attached" attach_loops
check "first 4K of metadata zeroed" zero_meta
check "thin-pool created (tables by major:minor)" create_pool
check "pool status is thin-pool, rw" pool_healthy
check "create_thin 0" message "create_thin 0"
check "thin 0 activated (2 GiB virtual)" activate_thin "$thin0" 0
check "mkfs.ext4 on thin 0" mkfs.ext4 -q -F "/dev/mapper/$thin0"
check "thin 0 mounted, file written" write_file
check "thin 0 unmounted" umount "$work/mnt"
check "pool has data blocks allocated" data_allocated
check "thin 0 deactivated" dmsetup remove "$thin0"
check "create_snap 1 0 (origin inactive)" message "create_snap 1 0"
check "snapshot 1 activated" activate_thin "$snap1" 1
check "e2fsck -fn on snapshot 1 is clean" e2fsck -fn "/dev/mapper/$snap1"
check "snapshot 1 has the file, same content" snapshot_has_file
check "snapshot 1 deactivated" dmsetup remove "$snap1"
check "delete thin 1" message "delete 1"
check "delete thin 0" message "delete 0"
check "pool removed" dmsetup remove "$pool"
check "thin_check on the metadata is clean" thin_check "$meta_loop"
check "loop devices detached" detach_loops
check "no loop device left on our files" no_loops_left
check "dmsetup ls reports no devices" no_dm_devices

echo "uml-smoke: $passed passed, $failed failed"
[ "$failed" = 0 ] && [ "$stopped" = 0 ]
