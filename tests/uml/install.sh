#!/usr/bin/env bash
# Installs what the UML test tier needs (Debian packages); idempotent: installs
# only the missing ones, and checks afterwards that the UML kernel and its
# dm-thin modules are really there. Fails loudly otherwise.
#
#   user-mode-linux          /usr/bin/linux.uml and its modules (dm-mod, dm-thin-pool, loop, ...)
#   kmod                     insmod, used by the guest init to load those modules
#   dmsetup                  device-mapper control from userspace
#   thin-provisioning-tools  thin_check, thin_ls, ...
#   e2fsprogs util-linux coreutils procps   mkfs.ext4; losetup, setsid; truncate; pgrep
set -euo pipefail

pkgs=(user-mode-linux kmod dmsetup thin-provisioning-tools e2fsprogs util-linux coreutils procps)

die() { echo "uml/install.sh: error: $*" >&2; exit 1; }

installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }

missing=()
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done

if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]} (run as root to install them)"
  echo "uml/install.sh: installing: ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 -qq update || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq install -y "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
  for p in "${missing[@]}"; do installed "$p" || die "package $p is still not installed"; done
fi

# The pieces run-in-uml.sh relies on.
[ -x /usr/bin/linux.uml ] || die "/usr/bin/linux.uml missing although user-mode-linux is installed"
for t in insmod dmsetup thin_check mkfs.ext4 losetup setsid truncate pgrep; do
  command -v "$t" >/dev/null || die "$t not found on PATH"
done
shopt -s nullglob
mods=(/usr/lib/uml/modules/*/kernel/drivers/md/dm-thin-pool.ko)
[ ${#mods[@]} -gt 0 ] || die "no dm-thin-pool.ko under /usr/lib/uml/modules/*/kernel/drivers/md"
echo "uml/install.sh: ok ($(/usr/bin/linux.uml --version 2>/dev/null | head -n1 || true))"
