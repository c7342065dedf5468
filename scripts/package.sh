#!/usr/bin/env bash
# Builds Thinbox's Debian packages with dpkg-deb (no cargo-deb, no debhelper):
#
#   target/debian/thinbox_<version>_amd64.deb
#       /usr/bin/thinboxd, /usr/bin/thinboxctl (stripped), the systemd unit
#       (deploy/systemd/thinboxd.service), /etc/thinbox/config.toml (a
#       conffile: deploy/host/thinboxd.toml, every key with its default), the
#       containerd proxy-plugin snippet, README, copyright, man pages made from
#       --help, and maintainer scripts (packaging/debian/).
#   target/debian/thinbox-dbgsym_<version>_amd64.deb
#       the binaries' debug info, /usr/lib/debug/.build-id/xx/yyyy.debug, as
#       debhelper's dh_strip splits it (gdb and Rust backtraces find it by the
#       binary's build id).
#
#   bash scripts/package.sh
#
# <version> is the workspace Cargo.toml's version plus a Debian revision
# (THINBOX_DEB_REVISION, default 1): 0.1.0-1. Maintainer: DEBFULLNAME and
# DEBEMAIL if set. Prints the two package paths on its last lines. Installs
# missing build tools with apt when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD

die() { echo "package.sh: $*" >&2; exit 1; }

need=()
for c in dpkg-deb:dpkg objcopy:binutils readelf:binutils dpkg-shlibdeps:dpkg-dev gzip:gzip; do
  command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
if (( ${#need[@]} )); then
  [ "$(id -u)" = 0 ] || die "missing ${need[*]} (apt-get install them, or run as root)"
  echo "installing: ${need[*]}"
  apt-get -o DPkg::Lock::Timeout=600 -qq update
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq install -y "${need[@]}" >/dev/null
fi
arch=$(dpkg --print-architecture)
[ "$arch" = amd64 ] || die "builds for this host's architecture; amd64 expected, this is $arch"

upstream=$(awk '/^\[/ {s = ($0 == "[workspace.package]")} s && /^version *=/ {gsub(/.*= *"|".*/, ""); print; exit}' Cargo.toml)
[ -n "$upstream" ] || die "no version in [workspace.package] of Cargo.toml"
version=$upstream-${THINBOX_DEB_REVISION:-1}
maintainer="${DEBFULLNAME:-Thinbox maintainers} <${DEBEMAIL:-maintainers@users.noreply.r-seed-280abb6f.example}>"

# Only these two packages: building the workspace would unify features and
# pull the QMP client (fio-bench, the VM harness) into them.
cargo build --release -p thinboxd -p thinboxctl --locked

out=$here/target/debian
work=$out/build
pkg=$work/debian/thinbox
dbg=$work/debian/thinbox-dbgsym
rm -rf "$work"
mkdir -p "$pkg/DEBIAN" "$dbg/DEBIAN"

# ---- binaries: stripped; debug info into the dbgsym package ---------------
build_ids=()
for b in thinboxd thinboxctl; do
  install -D -m 0755 "target/release/$b" "$pkg/usr/bin/$b"
  id=$(readelf -n "$pkg/usr/bin/$b" | awk '/Build ID:/ {print $3; exit}')
  [[ $id =~ ^[0-9a-f]{8,}$ ]] || die "$b has no GNU build id"
  debug=$dbg/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug
  mkdir -p "$(dirname "$debug")"
  objcopy --only-keep-debug --compress-debug-sections "$pkg/usr/bin/$b" "$debug"
  chmod 0644 "$debug"
  # As dh_strip: no symbol table or debug sections left (the debug file has
  # both), no .comment; the build id stays and a debuglink names the file.
  objcopy --strip-all --remove-section=.comment --add-gnu-debuglink="$debug" "$pkg/usr/bin/$b"
  build_ids+=("$id")
done

# ---- files ---------------------------------------------------------------
install -D -m 0644 deploy/systemd/thinboxd.service "$pkg/lib/systemd/system/thinboxd.service"
install -D -m 0644 deploy/host/thinboxd.toml "$pkg/etc/thinbox/config.toml"
install -D -m 0644 packaging/containerd-proxy-plugin.toml "$pkg/usr/share/thinbox/containerd-proxy-plugin.toml"
install -D -m 0644 packaging/README "$pkg/usr/share/doc/thinbox/README"
# The source's years and commit, from git where this is a checkout.
if git rev-parse --git-dir >/dev/null 2>&1; then
  years=$(git log --format=%cd --date=format:%Y | sort -u | sed -n '1p;$p' | uniq | paste -sd-)
  commit=$(git describe --always --dirty)
  when=$(date -R -u -d "@$(git log -1 --format=%ct)")
else
  years=$(date -u +%Y) commit=unknown when=$(date -R -u)
fi
sed "s/@YEARS@/$years/" packaging/copyright >"$pkg/usr/share/doc/thinbox/copyright"
chmod 0644 "$pkg/usr/share/doc/thinbox/copyright"
printf '%s\n' "thinbox ($version) unstable; urgency=medium" "" \
  "  * Built by scripts/package.sh from the Thinbox source at $commit." "" \
  " -- $maintainer  $when" | gzip -9n >"$pkg/usr/share/doc/thinbox/changelog.Debian.gz"
mkdir -p "$dbg/usr/share/doc"
ln -s thinbox "$dbg/usr/share/doc/thinbox-dbgsym"
mkdir -p "$pkg/usr/share/man/man8"
for b in thinboxd thinboxctl; do
  "$pkg/usr/bin/$b" --help | bash packaging/man-from-help.sh "$b" 8 "$version" "packaging/man/$b.8.extra" |
    gzip -9n >"$pkg/usr/share/man/man8/$b.8.gz"
done

# ---- control -------------------------------------------------------------
# Shared libraries, as ${shlibs:Depends} (libc6, libgcc-s1).
mkdir -p "$work/debian"
printf 'Source: thinbox\n\nPackage: thinbox\nArchitecture: amd64\n' >"$work/debian/control"
shlibs=$(cd "$work" && dpkg-shlibdeps -O -e"$pkg/usr/bin/thinboxd" -e"$pkg/usr/bin/thinboxctl" |
  sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no shared library dependencies"
# What thinboxd runs: mkfs.ext4, resize2fs (e2fsprogs); mkfs.xfs, xfs_growfs,
# xfs_quota (xfsprogs); thin_ls, thin_delta (thin-provisioning-tools, the
# dm-thin backend). Loops, device-mapper, mounts and filesystem freezes are
# ioctls and syscalls; losetup and umount (mount) serve postrm's purge.
depends="$shlibs, e2fsprogs, xfsprogs, thin-provisioning-tools, mount"
installed_size() { du -sk --exclude=DEBIAN "$1" | cut -f1; }

cat >"$pkg/DEBIAN/control" <<EOF
Package: thinbox
Version: $version
Architecture: amd64
Maintainer: $maintainer
Installed-Size: $(installed_size "$pkg")
Depends: $depends
Recommends: containerd, kmod
Suggests: dmsetup
Section: admin
Priority: optional
Description: block storage for VM-sandboxed containers (containerd, CSI)
 thinboxd keeps one pool of copy-on-write block devices (thin devices in a
 kernel dm-thin pool, or reflinked sparse images on loop devices) and serves
 it to containerd as the proxy snapshotter "thinbox" and to Kubernetes as the
 CSI driver csi.thinbox.io. Container root filesystems, image layers and
 volumes reach Kata Containers and other VM sandboxes as virtio-blk disks
 instead of shared filesystems.
 .
 This package holds thinboxd with its systemd unit and configuration, and
 thinboxctl, the operator's view of the pool.
EOF
echo /etc/thinbox/config.toml >"$pkg/DEBIAN/conffiles"
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$pkg/DEBIAN/"

cat >"$dbg/DEBIAN/control" <<EOF
Package: thinbox-dbgsym
Source: thinbox
Version: $version
Architecture: amd64
Maintainer: $maintainer
Installed-Size: $(installed_size "$dbg")
Depends: thinbox (= $version)
Section: debug
Priority: optional
Description: debug symbols for thinbox
Build-Ids: ${build_ids[*]}
Auto-Built-Package: debug-symbols
EOF

for p in "$pkg" "$dbg"; do
  (cd "$p" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' | sort -z |
    xargs -0r md5sum >DEBIAN/md5sums)
done

# ---- build ---------------------------------------------------------------
deb=$out/thinbox_${version}_amd64.deb
dbgdeb=$out/thinbox-dbgsym_${version}_amd64.deb
rm -f "$out"/thinbox_*_amd64.deb "$out"/thinbox-dbgsym_*_amd64.deb
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
dpkg-deb --root-owner-group -Zxz --build "$dbg" "$dbgdeb" >/dev/null
echo "$deb"
echo "$dbgdeb"
