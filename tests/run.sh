#!/usr/bin/env bash
# Runs Thinbox's test tiers. Usage: tests/run.sh [tier...]   (default: all)
#
#   unit         formatting, clippy, cargo tests of the pure parts (no root)
#   host         blockstore, and thinboxd's snapshot and CSI doors, thinboxctl, bad starts, bad input on both
#                doors and one pool for both on real loop devices and XFS/btrfs pools (root); QMP virtio-blk
#                hot-plug into a paused QEMU
#   crash        fault-injection build: abort at each step of Prepare/Commit/Remove and of the CSI
#                driver's Create/Publish/Unpublish/Delete, restart, check; and SIGKILL of a daemon serving
#                both doors at once, in rounds, then a CO's cleanup must leave no leak (root)
#   conformance  containerd's own snapshotter suite against thinboxd (root)
#   containerd   real containerd 1.6 + runc running a container on a Thinbox rootfs; scripts/quickstart.sh
#                end to end and --down, every path in the run's temp dir (root)
#   uml          dm-thin backend, snapshotter and CSI tests, conformance and real containers on a kernel thin pool inside user-mode Linux (root)
#   vm           QEMU guests (KVM, else TCG): a snapshotter rootfs and CSI volumes hot-plugged over QMP, 9p, virtio-fs (root)
#   fio          fio-bench --quick: the whole fio matrix on runC, 9p, virtio-fs and Thinbox virtio-blk; every cell must give a number (root)
#   deploy       deploy/ manifests against Kubernetes' schemas, host config files (containerd, Kata, systemd)
#
# Installs what it needs (apt, cargo) and fails loudly: a tier that cannot run fails.
# Ends by checking that no loop device or mount the run made is left.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD
tiers=("$@")
[ ${#tiers[@]} -gt 0 ] || tiers=(unit host crash conformance containerd uml vm fio deploy)

need_root() { [ "$(id -u)" = 0 ] || { echo "tier $1 needs root (loop devices, mounts)" >&2; exit 1; }; }

install_deps() {
  bash scripts/install-deps.sh --test
  command -v cargo >/dev/null || { echo "cargo is required (rustup)" >&2; exit 1; }
}

# Every test makes its roots, sockets and containerd instances under TMPDIR
# (tempfile, mktemp, Go's t.TempDir) or under this repository (target/), so a
# private TMPDIR per run tells what the tests made from what a real
# installation on this node holds (/var/lib/thinbox, /run/thinbox, the
# system's containerd), which the tests neither use nor count. Short, because
# unix socket paths are limited to 107 bytes.
run_tmp=$(mktemp -d /tmp/tbt.XXXXXX)
export TMPDIR=$run_tmp

# shellcheck source=scripts/lib/leftovers.sh
source "$here/scripts/lib/leftovers.sh"

summary=()
run_tier() {
  local t=$1; shift
  echo "=== tier $t"
  local start=$SECONDS
  # Not in an `if`: bash ignores errexit inside a condition, so a tier whose
  # first command failed would pass on its last one's status.
  set +e
  (set -e; "$@") 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" = 0 ]; then summary+=("$t: ok ($((SECONDS - start))s)"); else summary+=("$t: FAILED"); failed=1; fi
}
failed=0

tier_unit() {
  cargo fmt --all --check
  cargo clippy --workspace --all-targets -- -D warnings
  cargo test --workspace --lib --bins
}
tier_host() {
  need_root host
  cargo test -p thinbox-blockstore --test host -- --test-threads=2
  # Online ext4 growth needs CAP_SYS_RESOURCE, which a sandboxed root may lack,
  # and dir volumes need a kernel with XFS project quotas, which this host's
  # lacks: the uml tier runs those tests (its kernel and root have both).
  cargo test -p thinboxd --test snapshots --test admin --test start --test one_pool --test root_space --test bad_input --test kata -- --test-threads=2 \
    --skip dir_volumes_
  cargo test -p thinbox-block-passthrough --test qmp -- --test-threads=2
  cargo test -p thinboxd --test volumes -- --test-threads=2 --skip ext4_volumes_grow_online --skip dir_volume_hard_project_quota
}
tier_crash() {
  need_root crash
  # A separate target dir keeps the fault-injection build away from the real binary.
  cargo test --target-dir target/fault -p thinboxd --features fault-injection --test snapshots_crash --test volumes_crash -- --test-threads=1
  # SIGKILL and a power cut of the pool need no injection point: the real
  # binary, in the normal target dir.
  cargo test -p thinboxd --test together_crash --test power_cut -- --test-threads=1
}
tier_conformance() {
  need_root conformance
  cargo build -p thinboxd
  # The snapshot door only: CSI's default endpoint is the node's kubelet directory.
  bash tests/conformance/run.sh test \
    "$here/target/debug/thinboxd --root \"\$SNAPSHOTTER_ROOT\" --snapshotter-address \"\$SNAPSHOTTER_SOCKET\" --no-csi --release-on-exit" thinbox \
    2>&1 | tee target/conformance.log | grep -E '^\s*--- (PASS|FAIL|SKIP)|^(PASS|FAIL|ok)'
  bash tests/conformance/run.sh count conformance target/conformance.log
}
tier_containerd() { need_root containerd; local rc=0; bash tests/host/containerd-e2e.sh || rc=1; bash tests/host/containerd-gc.sh || rc=1; bash tests/host/quickstart.sh || rc=1; return "$rc"; }
tier_uml() { need_root uml; bash tests/uml/tier.sh; }
tier_vm() { need_root vm; bash tests/vm/tier.sh; }
tier_fio() { need_root fio; cargo run --release -p fio-bench -- --quick --out target/fio-bench-quick; }
tier_deploy() { local rc=0; bash tests/deploy/validate.sh || rc=1; bash tests/deploy/package.sh || rc=1; return "$rc"; }

install_deps
mkdir -p target
log=target/test-run.log
: > "$log"
for t in "${tiers[@]}"; do
  declare -F "tier_$t" >/dev/null || { echo "unknown tier $t" >&2; exit 2; }
  run_tier "$t" "tier_$t"
done

left=$(left_under "$run_tmp" "$here")
if [ -n "$left" ]; then
  echo "left behind after the tests:"; echo "$left"; summary+=("leftovers: FAILED"); failed=1
else
  summary+=("leftovers: none")
  rm -rf "$run_tmp"
fi
printf '%s\n' "=== summary" "${summary[@]}"
# One total over every tier: cargo's "test result" lines and the scripts' "N passed, M failed".
read -r passed failures < <(sed -nE \
  -e 's/^test result: [a-zA-Z]+\. ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/p' \
  -e 's/^[a-z0-9-]+: ([0-9]+) passed, ([0-9]+) failed$/\1 \2/p' "$log" |
  awk '{p += $1; f += $2} END {print p + 0, f + 0}')
[ "$failures" = 0 ] || failed=1
[ "$failed" = 0 ] || [ "$failures" -gt 0 ] || failures=1
echo "total: $passed passed, $failures failed"
exit $failed
