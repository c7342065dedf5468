#!/usr/bin/env bash
# Installs the Debian packages Thinbox needs; idempotent.
#   scripts/install-deps.sh          build + run (xfsprogs, e2fsprogs, libclang for bindgen)
#   scripts/install-deps.sh --test   also what the test tiers use (containerd, runc, btrfs, Go for the suite,
#                                    QEMU, busybox, fio, kmod and xz for the vm tier's guest)
set -euo pipefail
pkgs=(xfsprogs e2fsprogs util-linux libclang-dev clang libdevmapper-dev pkg-config)
[ "${1:-}" = --test ] && pkgs+=(btrfs-progs containerd runc busybox-static golang-go golang-github-containerd-containerd-dev qemu-system-x86 qemu-system-common fio kmod xz-utils)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
[ "$(id -u)" = 0 ] || { echo "missing packages: ${missing[*]} (run as root to install them)" >&2; exit 1; }
echo "installing: ${missing[*]}"
apt-get -o DPkg::Lock::Timeout=600 -qq update
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq install -y "${missing[@]}" >/dev/null
