#!/usr/bin/env bash
# The vm tier: real QEMU guests (KVM where it works, else TCG) booted from the
# cached guest image (Debian's kernel as a PVH ELF + busybox initramfs, built
# on first use under $THINBOX_GUEST_CACHE or /var/cache/thinbox/guest), with
# Thinbox storage hot-plugged into them over QMP: harness/guest-vm/tests/vm.rs.
# Ends with "vm: N passed, M failed"; fails if anything failed or a QEMU
# process, loop device or mount of its own was left. Runs as root.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "the vm tier needs root (loop devices, mounts)" >&2; exit 1; }
bash scripts/install-deps.sh --test
# The tests start the real daemons built beside them, and the example that
# boots a guest (killed to show its guest goes with it).
cargo build -p thinboxd
cargo build -p thinbox-guest-vm --example guest-shell
mkdir -p target
log=target/vm-tier.log
start=$SECONDS
failed=0
# One guest at a time: each is CPU-bound under TCG on a two-core machine.
# cargo's own summary line is renamed on screen: tests/run.sh counts the
# "vm: N passed" line below, and must not count these tests twice.
cargo test -p thinbox-guest-vm --test vm -- --test-threads=1 2>&1 | tee "$log" | sed -u 's/^test result: /vm tests: /' || failed=1
pass=$(sed -nE 's/^test result: [a-zA-Z]+\. ([0-9]+) passed; ([0-9]+) failed.*/\1/p' "$log" | tail -1)
fail=$(sed -nE 's/^test result: [a-zA-Z]+\. ([0-9]+) passed; ([0-9]+) failed.*/\2/p' "$log" | tail -1)
[ -n "$pass" ] || { echo "vm: the tests did not run" >&2; pass=0; fail=${fail:-1}; failed=1; }

# Leftovers of this tier: guests, and loops or mounts under its temp dirs.
left=$( { pgrep -a -f 'qemu-system-x86_64 -name thinbox-guest .*/thinbox-vm-' || true
          losetup -a | grep -E '/thinbox-vm-' || true
          findmnt -rn -o TARGET | grep -E '/thinbox-vm-' || true; } )
if [ -n "$left" ]; then echo "left behind by the vm tier:"; echo "$left"; failed=1; fi
echo "vm tier took $((SECONDS - start)) s"
echo "vm: ${pass} passed, ${fail:-0} failed"
exit $failed
