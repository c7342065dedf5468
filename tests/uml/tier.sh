#!/usr/bin/env bash
# The uml tier, run on the host: builds the test binaries, boots user-mode Linux
# (a real kernel with dm-thin) and runs inside it the dm-thin backend tests, the
# snapshotter's and the CSI driver's tests (Kata's too) on dm-thin, dir volumes on a
# small state root, the crash-safety test,
# containerd's snapshotter conformance suite against thinboxd on a
# kernel thin pool, and real containerd + runc running containers on thin
# devices. Ends with "uml-conformance: N passed, M failed"; fails if anything
# failed or a dm device was left.
set -euo pipefail
cd "$(dirname "$0")/../.."
# test_binary NAME CARGO-ARGS...: builds integration test NAME and prints the
# path of its executable, as cargo reports it; fails if there is none.
test_binary() {
  local name=$1 path; shift
  path=$(cargo test "$@" --test "$name" --no-run --message-format=json | python3 -c '
import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$name")
  [ -x "$path" ] || { echo "uml: no $name test binary" >&2; return 1; }
  echo "$path"
}

if [ "${1:-}" != --inside ]; then
  bash tests/uml/install.sh
  cargo build -p thinboxd
  dm_test=$(test_binary dm -p thinbox-blockstore)
  snap_test=$(test_binary snapshots -p thinboxd)
  csi_test=$(test_binary volumes -p thinboxd)
  kata_test=$(test_binary kata -p thinboxd)
  pool_test=$(test_binary one_pool -p thinboxd)
  space_test=$(test_binary root_space -p thinboxd)
  # The crash test needs the fault-injection build (own target dir, as in the crash tier).
  crash_test=$(test_binary snapshots_crash --target-dir target/fault -p thinboxd --features fault-injection)
  # The conformance suite is built on the host (Go comes from apt), run in the guest.
  bash tests/conformance/run.sh build
  UML_PASS_ENV="DM_TEST SNAP_TEST CSI_TEST KATA_TEST POOL_TEST SPACE_TEST CRASH_TEST" exec env DM_TEST="$dm_test" SNAP_TEST="$snap_test" CSI_TEST="$csi_test" KATA_TEST="$kata_test" POOL_TEST="$pool_test" SPACE_TEST="$space_test" CRASH_TEST="$crash_test" bash tests/uml/run-in-uml.sh --mem 3G --timeout 1500 -- bash tests/uml/tier.sh --inside
fi

# Inside the guest: the kernel's thin pool first, then ours on top of it.
failed=0
log=$TMPDIR/uml-tier.log
bash tests/uml/smoke.sh || failed=1
"$DM_TEST" --test-threads=1 || failed=1
# The snapshotter's host-tier tests again, on dm-thin (the harness checks the backend).
THINBOX_TEST_BACKEND=dm-thin "$SNAP_TEST" --test-threads=1 || failed=1
# The CSI driver's tests on dm-thin, including online ext4 growth (needs CAP_SYS_RESOURCE).
THINBOX_TEST_BACKEND=dm-thin "$CSI_TEST" --test-threads=1 || failed=1
# Kata-held volumes on dm-thin: the shim's resize and stats, and encrypted
# emptyDirs on thin devices the host never formats.
THINBOX_TEST_BACKEND=dm-thin "$KATA_TEST" --test-threads=1 || failed=1
# One pool for rootfs and volumes on dm-thin: real containerd fills it, CSI sees it, and the reverse.
THINBOX_TEST_BACKEND=dm-thin "$POOL_TEST" --test-threads=1 || failed=1
# Dir volumes on a small state root (XFS project quotas, which the host lacks).
"$SPACE_TEST" --test-threads=1 dir_volumes_ || failed=1
# Abort at every step of Prepare/Commit/Remove on dm-thin; thin ids and dm devices must match the store.
"$CRASH_TEST" --test-threads=1 || failed=1

bash tests/conformance/run.sh test \
  "$PWD/target/debug/thinboxd --root \"\$SNAPSHOTTER_ROOT\" --snapshotter-address \"\$SNAPSHOTTER_SOCKET\" --no-csi --release-on-exit" thinbox \
  > "$log" 2>&1 || failed=1
grep -E '^\s*--- (PASS|FAIL|SKIP)' "$log" || true
grep -q 'backend="dm-thin"' "$log" || { echo "conformance did not run on dm-thin" >&2; failed=1; }
bash tests/conformance/run.sh count uml-conformance "$log" || failed=1

# Real containers on thin devices (runc works here: the guest mounts cgroup2).
bash tests/host/containerd-e2e.sh || failed=1

left=$(dmsetup ls 2>/dev/null | grep thinbox || true)
if [ -n "$left" ]; then echo "dm devices left behind:"; echo "$left"; failed=1; fi
exit $failed
