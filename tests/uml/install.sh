#!/usr/bin/env bash
# Installs what the UML test tier needs (Debian packages); idempotent: installs
# only the missing ones, and checks afterwards that a UML kernel boots on this
# host and that its dm-thin modules are really there. Fails loudly otherwise.
#
#   user-mode-linux          /usr/bin/linux.uml and its modules (dm-mod, dm-thin-pool, loop, ...)
#   kmod                     insmod, used by the guest init to load those modules
#   dmsetup                  device-mapper control from userspace
#   thin-provisioning-tools  thin_check, thin_ls, ...
#   e2fsprogs util-linux coreutils procps   mkfs.ext4; losetup, setsid; truncate; pgrep
#   curl gpgv debian-archive-keyring xz-utils patchelf
#                            a newer UML kernel from Debian unstable where 6.1 cannot
#                            boot (see kernel.sh): fetched, verified, pointed at its libc
set -euo pipefail

pkgs=(user-mode-linux kmod dmsetup thin-provisioning-tools e2fsprogs util-linux coreutils procps
      curl gpgv debian-archive-keyring xz-utils patchelf)
mirror=http://deb.debian.org/debian
suite=unstable

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
for t in insmod dmsetup thin_check mkfs.ext4 losetup setsid truncate pgrep; do
  command -v "$t" >/dev/null || die "$t not found on PATH"
done

# boots KERNEL: true if KERNEL runs an init on this host. The init writes a
# marker through hostfs and powers off; a kernel that cannot run user space
# panics instead. Its output goes to $probe/log.
boots() {
  rm -f "$probe/ok" "$probe/log"
  printf '#!/bin/sh\nmount -t proc proc /proc\n: >%s/ok\necho o >/proc/sysrq-trigger\nsleep 60\n' "$probe" >"$probe/init.sh"
  chmod 755 "$probe/init.sh"
  timeout 60 setsid "$1" mem=256M "uml_dir=$probe" umid=probe root=/dev/root rootfstype=hostfs rootflags=/ rw \
    con=null ssl=null con0=null,fd:1 panic=1 noreboot "init=$probe/init.sh" </dev/null >"$probe/log" 2>&1 &
  wait "$!" 2>/dev/null || true # 2>/dev/null: no "Aborted" notice from bash for a kernel that panics
  [ -e "$probe/ok" ]
}

# release_sha256 NAME RELEASE: NAME's SHA-256 in a Release file's SHA256 list.
# field FIELD PACKAGE: FIELD of PACKAGE's (first) stanza in the Packages index.
release_sha256() { awk -v n="$1" '/^SHA256:/ { s = 1; next } /^[^ ]/ { s = 0 } s && $3 == n { print $1; exit }' "$2"; }
field() { awk -v p="$2" -v f="$1:" '$1 == "Package:" { m = ($2 == p) } m && $1 == f { print $2; exit }' "$fetch/Packages"; }
# get URL-PATH SHA256 FILE: downloads and checks against the signed checksum.
get() {
  curl -fsS --retry 3 -o "$3" "$mirror/$1" || die "cannot download $mirror/$1"
  [ "$(sha256sum <"$3" | cut -d' ' -f1)" = "$2" ] || die "$mirror/$1: SHA-256 does not match the signed index"
}

# Unpacks Debian unstable's user-mode-linux and libc6 under $uml_cache/root and
# points the kernel at that libc (it needs a newer one than Debian 12's): the
# archive's signature is checked with Debian's keyring, each file with its SHA-256.
fetch_unstable() {
  local root=$uml_cache/root.new pkg file sum rel
  fetch=$uml_cache/fetch
  rm -rf "$root" "$fetch" && mkdir -p "$root" "$fetch"
  curl -fsS --retry 3 -o "$fetch/InRelease" "$mirror/dists/$suite/InRelease" || die "cannot download $mirror/dists/$suite/InRelease"
  gpgv --quiet --keyring /usr/share/keyrings/debian-archive-keyring.gpg --output "$fetch/Release" "$fetch/InRelease" 2>"$fetch/gpgv.log" \
    || die "$suite's InRelease: bad signature: $(cat "$fetch/gpgv.log")"
  rel=main/binary-amd64/Packages.xz
  sum=$(release_sha256 "$rel" "$fetch/Release")
  [ -n "$sum" ] || die "$suite's Release lists no $rel"
  get "dists/$suite/$rel" "$sum" "$fetch/Packages.xz"
  xz -dc "$fetch/Packages.xz" >"$fetch/Packages" || die "cannot unpack $rel"
  for pkg in user-mode-linux libc6; do
    file=$(field Filename "$pkg") sum=$(field SHA256 "$pkg")
    [ -n "$file" ] && [ -n "$sum" ] || die "$suite has no $pkg"
    echo "uml/install.sh: fetching $file"
    get "$file" "$sum" "$fetch/$pkg.deb"
    dpkg-deb -x "$fetch/$pkg.deb" "$root" || die "cannot unpack $file"
  done
  # The paths it will have once in place.
  local lib=$uml_cache/root/usr/lib/x86_64-linux-gnu
  [ -x "$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ] || die "libc6 from $suite has no ld-linux-x86-64.so.2"
  patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --set-rpath "$lib" "$root/usr/bin/linux.uml" \
    || die "patchelf on $root/usr/bin/linux.uml failed"
  rm -rf "$uml_cache/root" "$fetch" && mv "$root" "$uml_cache/root"
}

# shellcheck source=tests/uml/kernel.sh
. "$(dirname "$0")/kernel.sh"
mkdir -p "$uml_cache"
probe=$(mktemp -d /var/tmp/thinbox-uml-probe.XXXXXX)
trap 'rm -rf "$probe"' EXIT
[ -x /usr/bin/linux.uml ] || die "/usr/bin/linux.uml missing although user-mode-linux is installed"
if boots /usr/bin/linux.uml; then
  rm -rf "$uml_cache/root"  # the host's own kernel is enough here
elif grep -q "$UML_XSAVE_REFUSED" "$probe/log"; then
  echo "uml/install.sh: Debian 12's UML kernel cannot run on this CPU (its XSAVE state is too large); using $suite's"
  if [ -z "$UML_ROOT" ] || ! boots "$UML_KERNEL"; then
    fetch_unstable
    boots "$uml_cache/root/usr/bin/linux.uml" || die "$suite's UML kernel does not boot either: $(tail -n 5 "$probe/log")"
  fi
else
  die "/usr/bin/linux.uml does not boot: $(tail -n 5 "$probe/log")"
fi
. "$(dirname "$0")/kernel.sh"  # again: the choice above may have changed it
kver=$("$UML_KERNEL" --version 2>/dev/null) || die "$UML_KERNEL --version failed"
[ -f "$UML_ROOT/usr/lib/uml/modules/$kver/kernel/drivers/md/dm-thin-pool.ko" ] \
  || die "no dm-thin-pool.ko under $UML_ROOT/usr/lib/uml/modules/$kver/kernel/drivers/md"
echo "uml/install.sh: ok ($UML_KERNEL, kernel $kver)"
