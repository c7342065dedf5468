#!/usr/bin/env bash
# The Debian package end to end (deploy tier): builds it with
# scripts/package.sh and checks the payload, verifies the packaged unit,
# installs it with dpkg, runs the installed daemon as the unit's ExecStart
# does (installed binary, installed config) but with every state path under a
# temporary directory, serves one snapshot round trip (a private containerd
# configured with the packaged proxy-plugin snippet imports an image; removing
# it brings the pool back to 0 devices) and one CSI volume round trip
# (crates/thinboxd/tests/installed.rs), runs the packaged postrm's purge on a
# pool of its own, then removes and purges the package.
#
#   sudo bash tests/deploy/package.sh
#
# dpkg installs, removes and purges the package in a root of its own under
# TMPDIR (`dpkg --root`, maintainer scripts run with DPKG_ROOT set), so a real
# installation on this machine (the package, /var/lib/thinbox, /run/thinbox, a
# quickstart daemon) neither blocks the test nor is touched by it; the test
# checks that those paths are as they were. postinst enables the unit in that
# root and starts nothing; the daemon is started by hand, and the package's
# prerm must find and stop it (by its executable) on `dpkg -r`. Needs root. Environment: THINBOX_E2E_KEEP=1 keeps the temp
# dir, TMPDIR. Last line: "package: N passed, M failed"; exit status 0 only if
# M is 0.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/lib/checks.sh
source "$REPO/tests/lib/checks.sh"
# shellcheck source=tests/lib/containerd.sh
source "$REPO/tests/lib/containerd.sh"

IMAGE=localhost/thinbox-test:3layers
# Set once TMP exists: the package's root, and the installed paths in it.
SYSROOT= BIN= CTL= UNIT=
TMP=
INSTALLED=
DAEMON_PID=
PURGE_PID=

# stop_pid PID: SIGTERM, wait (30 s, then SIGKILL), reap; sets STOP_STATUS
# to its exit status. (Not in a $(...): only this shell can reap its child.)
STOP_STATUS=
stop_pid() {
    STOP_STATUS=0
    terminate "$1" 30 thinboxd >&2 || true
    wait "$1" 2>/dev/null || STOP_STATUS=$?
}

cleanup() {
    if [[ -n $TMP ]]; then
        (( FAILED == 0 )) || log_tails "$TMP/thinboxd.log" "$TMP/purge-thinboxd.log" "$TMP/ctd/containerd.log"
        containerd_stop
        [[ -z $DAEMON_PID ]] || stop_pid "$DAEMON_PID"
        [[ -z $PURGE_PID ]] || stop_pid "$PURGE_PID"
    fi
    # Only what this script installed.
    if [[ -n $INSTALLED ]]; then
        echo "purging the test installation"
        sysdpkg --purge thinbox-dbgsym thinbox >/dev/null 2>&1 || not_ok "dpkg --purge in cleanup failed"
    fi
    [[ -z $TMP ]] || sweep_tmp "$TMP"
}
finish_with package cleanup

[[ $EUID -eq 0 ]] || die "must run as root (dpkg -i, loop devices, mounts)"

# ---- a real installation is never touched --------------------------------
# What a real installation would hold; compared at the end.
real_paths() {
    local p
    for p in /usr/bin/thinboxd /usr/bin/thinboxctl /etc/thinbox /var/lib/thinbox /run/thinbox/snapshotter.sock \
        /lib/systemd/system/thinboxd.service /etc/systemd/system/multi-user.target.wants/thinboxd.service; do
        echo "$p $(stat -c '%d:%i %Y' "$p" 2>/dev/null || echo absent)"
    done
    dpkg-query -W -f '${Status}\n' thinbox 2>/dev/null || echo "thinbox: not known to dpkg"
}
REAL_BEFORE=$(real_paths)

# ---- prerequisites -------------------------------------------------------
install_needed containerd:containerd ctr:containerd runc:runc python3:python3 file:file readelf:binutils \
    groff:groff-base systemd-analyze:systemd losetup:mount mkfs.xfs:xfsprogs mkfs.ext4:e2fsprogs =busybox-static

TMP=$(mktemp -d "${TMPDIR:-/tmp}/tbpkg.XXXXXX")
SYSROOT=$TMP/sysroot
BIN=$SYSROOT/usr/bin/thinboxd
CTL=$SYSROOT/usr/bin/thinboxctl
UNIT=$SYSROOT/lib/systemd/system/thinboxd.service
mkdir -p "$SYSROOT/var/lib/dpkg/info" "$SYSROOT/var/lib/dpkg/updates" "$SYSROOT/var/lib/dpkg/triggers"
: >"$SYSROOT/var/lib/dpkg/status"
# dpkg on the package's root; the scripts run outside a chroot, with DPKG_ROOT.
sysdpkg() { dpkg --root="$SYSROOT" --force-script-chrootless "$@"; }
sysquery() { dpkg-query --admindir="$SYSROOT/var/lib/dpkg" "$@"; }

# ---- build ---------------------------------------------------------------
out=$(bash "$REPO/scripts/package.sh" 2>&1) || { printf '%s\n' "$out" >&2; die "scripts/package.sh failed"; }
DEB=$(tail -n 2 <<<"$out" | head -n 1)
DBG=$(tail -n 1 <<<"$out")
[[ -f $DEB && -f $DBG ]] || { printf '%s\n' "$out" >&2; die "scripts/package.sh did not name two packages"; }
ok "built $(basename "$DEB") and $(basename "$DBG")"
# The CSI client, built now so that a compile error shows before anything is installed.
must "cargo test --no-run (installed)" cargo test --manifest-path "$REPO/Cargo.toml" -p thinboxd --test installed --no-run -q

# ---- payload -------------------------------------------------------------
field() { dpkg-deb -f "$1" "$2"; }
version=$(field "$DEB" Version)
check_eq "package name" thinbox "$(field "$DEB" Package)"
check_eq "architecture" amd64 "$(field "$DEB" Architecture)"
check_eq "file name matches the version" "thinbox_${version}_amd64.deb" "$(basename "$DEB")"
upstream=$(awk '/^\[/ {s = ($0 == "[workspace.package]")} s && /^version *=/ {gsub(/.*= *"|".*/, ""); print; exit}' "$REPO/Cargo.toml")
check "version $version is the workspace's $upstream plus a revision" grep -Eq "^${upstream//./\\.}-[0-9]+$" <<<"$version"
depends=$(field "$DEB" Depends)
for d in 'libc6 (>= ' e2fsprogs xfsprogs thin-provisioning-tools; do
    check "Depends has ${d% (>= }" grep -qF "$d" <<<"$depends"
done
check "Recommends containerd" grep -qw containerd <<<"$(field "$DEB" Recommends)"
check "Maintainer set" grep -Eq '^.+ <.+@.+>$' <<<"$(field "$DEB" Maintainer)"
check "Description set" test -n "$(field "$DEB" Description)"

payload=$(dpkg-deb -c "$DEB" | awk '$1 !~ /^d/ {print $1, $2, $6}' | sort)
want=$(sort <<'EOF'
-rw-r--r-- root/root ./etc/thinbox/config.toml
-rw-r--r-- root/root ./lib/systemd/system/thinboxd.service
-rwxr-xr-x root/root ./usr/bin/thinboxctl
-rwxr-xr-x root/root ./usr/bin/thinboxd
-rw-r--r-- root/root ./usr/share/doc/thinbox/README
-rw-r--r-- root/root ./usr/share/doc/thinbox/changelog.Debian.gz
-rw-r--r-- root/root ./usr/share/doc/thinbox/copyright
-rw-r--r-- root/root ./usr/share/man/man8/thinboxctl.8.gz
-rw-r--r-- root/root ./usr/share/man/man8/thinboxd.8.gz
-rw-r--r-- root/root ./usr/share/thinbox/containerd-proxy-plugin.toml
EOF
)
check_eq "payload: these files, these modes, owned by root" "$want" "$payload"

dpkg-deb -e "$DEB" "$TMP/control"
dpkg-deb -x "$DEB" "$TMP/deb"
dpkg-deb -x "$DBG" "$TMP/dbg"
check_eq "conffiles" /etc/thinbox/config.toml "$(cat "$TMP/control/conffiles")"
for s in postinst prerm postrm; do
    check "$s is an executable sh script" test -x "$TMP/control/$s"
    check "$s parses (sh -n)" sh -n "$TMP/control/$s"
done
check_eq "dbgsym depends on this version" "thinbox (= $version)" "$(field "$DBG" Depends)"

for b in thinboxd thinboxctl; do
    f=$TMP/deb/usr/bin/$b
    check "$b: file(1) says stripped" grep -q ', stripped' <<<"$(file -b "$f")"
    check_eq "$b: no .debug_info or .symtab left" "" "$(readelf -SW "$f" | grep -Eo '\.debug_info|\.symtab' || true)"
    id=$(readelf -n "$f" | awk '/Build ID:/ {print $3; exit}')
    debug=$TMP/dbg/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug
    if [[ -n $id && -f $debug ]]; then
        ok "$b: debug file /usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug in thinbox-dbgsym"
        check "$b: the debug file has .debug_info and .symtab" test "$(readelf -SW "$debug" 2>/dev/null | grep -Ec '\.debug_info|\.symtab')" = 2
        check_eq "$b: the debug file has the binary's build id" "$id" "$(readelf -n "$debug" 2>/dev/null | awk '/Build ID:/ {print $3; exit}')"
        check_eq "$b: its .gnu_debuglink names the debug file" "${id:2}.debug" \
            "$(readelf -p .gnu_debuglink "$f" | awk '/\]/ {print $NF; exit}')"
    else
        not_ok "$b: no debug file for build id '$id' in thinbox-dbgsym"
    fi
    check_eq "$b --version" "$b $upstream" "$("$f" --version)"
    man=$TMP/deb/usr/share/man/man8/$b.8.gz
    check "$b.8: a man page (.TH, .SH OPTIONS)" bash -c "zcat '$man' | grep -q '^\.TH ${b^^} 8' && zcat '$man' | grep -q '^\.SH OPTIONS'"
    check_eq "$b.8: groff renders it without warnings" "" "$(zcat "$man" | groff -man -Tutf8 -ww -z 2>&1)"
done
check "the unit is deploy/systemd/thinboxd.service" cmp -s "$REPO/deploy/systemd/thinboxd.service" "$TMP/deb/lib/systemd/system/thinboxd.service"
check "the config is deploy/host/thinboxd.toml" cmp -s "$REPO/deploy/host/thinboxd.toml" "$TMP/deb/etc/thinbox/config.toml"
check "the containerd snippet: [proxy_plugins.thinbox], a snapshot at /run/thinbox/snapshotter.sock" python3 -c '
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["proxy_plugins"]["thinbox"]
sys.exit(p != {"type": "snapshot", "address": "/run/thinbox/snapshotter.sock"})' "$TMP/deb/usr/share/thinbox/containerd-proxy-plugin.toml"

# systemd-analyze verify on the packaged unit, in a scratch root holding the
# system's units, the packaged binary and stubs for other commands (as
# tests/deploy/validate.py does for deploy/systemd).
sd=$TMP/systemd-root
mkdir -p "$sd/etc/systemd/system" "$sd/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$sd/usr/lib/systemd/"
cp "$TMP/deb/lib/systemd/system/thinboxd.service" "$sd/etc/systemd/system/"
while read -r cmd; do
    [[ $cmd == -* ]] && continue
    exe=${cmd#[@:+!]}; exe=${exe%% *}
    [[ $exe == /* && ! -e $sd$exe ]] || continue
    mkdir -p "$(dirname "$sd$exe")"
    if [[ -f $TMP/deb$exe ]]; then cp "$TMP/deb$exe" "$sd$exe"; else printf '#!/bin/sh\n' >"$sd$exe"; chmod 755 "$sd$exe"; fi
done < <(sed -nE 's/^Exec[A-Za-z]*=//p' "$sd/etc/systemd/system/thinboxd.service")
verify=$(systemd-analyze verify --root="$sd" thinboxd.service 2>&1) && rc=0 || rc=$?
check_eq "systemd-analyze verify: exit 0, nothing said" "0:" "$rc:$verify"

# ---- install -------------------------------------------------------------
# What the binaries run: the Depends, installed on this system (the package's
# own root has no packages; dpkg --root cannot see this system's).
mapfile -t deps < <(tr ',' '\n' <<<"$depends" | sed -E 's/^ *//; s/ .*//' | grep -v '^$')
install_needed "${deps[@]/#/=}"
INSTALLED=1
if sysdpkg --force-depends -i "$DEB" "$DBG" >"$TMP/dpkg-i.log" 2>&1; then
    grep -E '^(Unpacking|Setting up)' "$TMP/dpkg-i.log" || true
else
    cat "$TMP/dpkg-i.log"
    die "dpkg -i failed"
fi
check_eq "dpkg: thinbox installed" "install ok installed" "$(sysquery -W -f '${Status}' thinbox 2>&1)"
check_eq "dpkg: thinbox-dbgsym installed" "install ok installed" "$(sysquery -W -f '${Status}' thinbox-dbgsym 2>&1)"
for p in "$BIN" "$CTL" "$UNIT" "$SYSROOT/etc/thinbox/config.toml" "$SYSROOT/usr/share/thinbox/containerd-proxy-plugin.toml"; do
    check "installed $p" test -e "$p"
done
if command -v deb-systemd-helper >/dev/null; then
    check "postinst enabled the unit in its root (multi-user.target.wants)" test -L "$SYSROOT/etc/systemd/system/multi-user.target.wants/thinboxd.service"
fi
# Not PID 1 here: nothing may have started.
# PIDs running the installed binary (or what is left of it after dpkg -r).
our_daemons() {
    local exe t
    for exe in /proc/[0-9]*/exe; do
        t=$(readlink "$exe" 2>/dev/null) || continue
        [[ $t == "$BIN" || $t == "$BIN (deleted)" ]] || continue
        exe=${exe#/proc/}
        echo "${exe%/exe}"
    done
}
check_eq "postinst started no thinboxd (systemd is not PID 1)" "" "$(our_daemons)"
check "postinst made no /var/lib/thinbox" test ! -e "$SYSROOT/var/lib/thinbox"

# ---- the installed daemon, as its unit starts it -------------------------
mapfile -t exec_start < <(sed -n 's/^ExecStart=//p' "$UNIT")
[[ ${#exec_start[@]} == 1 ]] || die "$UNIT: expected one ExecStart=, found ${#exec_start[@]}"
read -r -a argv <<<"${exec_start[0]}"
check_eq "ExecStart runs /usr/bin/thinboxd" /usr/bin/thinboxd "${argv[0]}"
config=
rest=()
for (( i = 1; i < ${#argv[@]}; i++ )); do
    case ${argv[i]} in
        --config) config=${argv[i + 1]:-}; i=$((i + 1)) ;;
        --config=*) config=${argv[i]#--config=} ;;
        *) rest+=("${argv[i]}") ;;
    esac
done
check_eq "ExecStart reads the installed config" /etc/thinbox/config.toml "$config"
config=$SYSROOT$config
[[ -f $config ]] || die "no installed config at '$config'"
unit_env=()
while read -r kv; do unit_env+=("$kv"); done < <(sed -n 's/^Environment=//p' "$UNIT" | tr ' ' '\n')

# The installed config with its kubelet and Kata paths under TMP: kubelet_dir
# is where CSI targets must lie (the default /var/lib/kubelet is the node's).
(( $(grep -c '^\[csi\]$' "$config") <= 1 )) || die "$config has more than one [csi] table"
kubelet=$TMP/kubelet kata=$TMP/kata
mkdir -p "$kubelet/pods" "$kata"
awk -v k="$kubelet" -v d="$kata" '
    {print} $0 == "[csi]" {print "kubelet_dir = \"" k "\""; print "direct_volumes = \"" d "\""; done = 1}
    END {if (!done) {print "[csi]"; print "kubelet_dir = \"" k "\""; print "direct_volumes = \"" d "\""}}' \
    "$config" >"$TMP/config.toml"

# start_daemon LOG PIDVAR ARGS...: the installed binary with the unit's
# environment; returns once every door in $WANT_DOORS is served.
start_daemon() {
    local log=$1 var=$2 pid
    shift 2
    env "${unit_env[@]}" "$BIN" "$@" >"$log" 2>&1 </dev/null &
    pid=$!
    printf -v "$var" %s "$pid"
    await_serving "$pid" "$log" 1 60 "${WANT_DOORS[@]}" || die "the installed thinboxd did not start"
}
WANT_DOORS=(snapshots csi)
start_daemon "$TMP/thinboxd.log" DAEMON_PID --config "$TMP/config.toml" "${rest[@]}" \
    --root "$TMP/root" --snapshotter-address "$TMP/snap.sock" --csi-endpoint "unix://$TMP/csi.sock" \
    --node-id test --release-on-exit
ok "installed thinboxd serving snapshots and CSI (pid $DAEMON_PID, root $TMP/root)"

devices() {
    "$CTL" --address "$1" devices --json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["devices"]))'
}
# until_devices SOCK N: waits (30 s) for the pool to hold N devices (the
# deleter works in the background); prints the last count.
until_devices() {
    local n i
    for (( i = 0; i < 30; i++ )); do
        n=$(devices "$1") || n=error
        [[ $n == "$2" ]] && break
        gc_now 2>/dev/null || true
        sleep 1
    done
    echo "$n"
}

# ---- snapshots: thinboxctl, and containerd through the packaged snippet ----
must "thinboxctl status" "$CTL" --address "$TMP/snap.sock" status
ok "thinboxctl status answers"
snippet=$(sed "s#\"/run/thinbox/snapshotter.sock\"#\"$TMP/snap.sock\"#" "$SYSROOT/usr/share/thinbox/containerd-proxy-plugin.toml")
# A second pool (no --release-on-exit) for the purge test below.
WANT_DOORS=(snapshots)
# Its root is where postrm looks under DPKG_ROOT=$TMP/pfake.
PROOT=$TMP/pfake/var/lib/thinbox PETC=$TMP/pfake/etc/thinbox
start_daemon "$TMP/purge-thinboxd.log" PURGE_PID --config "$TMP/config.toml" --root "$PROOT" \
    --snapshotter-address "$TMP/p.sock" --no-csi
CONTAINERD_EXTRA_CONFIG="$snippet
[proxy_plugins.thinbox-purge]
  type = \"snapshot\"
  address = \"$TMP/p.sock\"" containerd_start "$TMP/ctd" || die "containerd did not start"
plugins=$(ctr_ plugins ls) || die "ctr plugins ls failed"
check_eq "containerd loaded the packaged proxy plugin thinbox" ok \
    "$(awk '$1 == "io.containerd.snapshotter.v1" && $2 == "thinbox" {print $NF}' <<<"$plugins")"
must "build OCI image" python3 "$REPO/tests/lib/make-oci-image.py" "$TMP/image.tar" --ref "$IMAGE"
must "ctr image import --snapshotter thinbox" ctr_t 120 image import --snapshotter thinbox "$TMP/image.tar"
check_eq "import: 3 committed snapshots (Prepare and Commit each)" 3 \
    "$(ctr_ snapshots --snapshotter thinbox ls | awk '$NF == "Committed"' | wc -l)"
n=$(devices "$TMP/snap.sock") || n=error
check "thinboxctl devices lists the layers' devices ($n)" test "$n" -gt 0
must "ctr image rm" ctr_ image rm "$IMAGE"
check_eq "after ctr image rm and containerd's GC (Remove), thinboxctl devices says 0" 0 "$(until_devices "$TMP/snap.sock" 0)"

# ---- CSI: one volume round trip from the Rust client ---------------------
if THINBOX_CSI_SOCKET=$TMP/csi.sock THINBOX_CONFIG=$TMP/config.toml \
    cargo test --manifest-path "$REPO/Cargo.toml" -q -p thinboxd --test installed -- --test-threads=1; then
    ok "CSI: CreateVolume, NodePublish, write/read, NodeUnpublish, DeleteVolume (cargo test --test installed)"
else
    not_ok "CSI round trip (cargo test -p thinboxd --test installed)"
fi
check_eq "after DeleteVolume, thinboxctl devices says 0" 0 "$(until_devices "$TMP/snap.sock" 0)"
check_eq "nothing mounted under the kubelet dir" "" "$(mounts_under "$kubelet")"

# ---- postrm purge, on a pool of its own ----------------------------------
# The packaged postrm under DPKG_ROOT=$TMP/pfake: it must refuse while a
# daemon holds the pool, then detach and delete it.
must "ctr image import --snapshotter thinbox-purge" ctr_t 120 image import --snapshotter thinbox-purge "$TMP/image.tar"
containerd_stop
purge() { DPKG_ROOT=$TMP/pfake sh "$TMP/control/postrm" purge; }
mkdir -p "$PETC"
sed 's#^\[csi\]$#[csi]\ndir_path = "/srv/elsewhere"#' "$TMP/deb/etc/thinbox/config.toml" >"$PETC/config.toml"
out=$(purge 2>&1) && rc=0 || rc=$?
printf '%s\n' "$out"
check "postrm purge refuses while thinboxd holds the pool" \
    grep -Eq "^thinbox: $PROOT is in use by pid ([0-9]+ )*${PURGE_PID}[ )]" <<<"$out"
check "... and exits non-zero" test "$rc" != 0
check "... and changes nothing" test -f "$PETC/config.toml" -a -f "$PROOT/pool.img"
stop_pid "$PURGE_PID"; PURGE_PID=
check_eq "the second thinboxd exited on SIGTERM, keeping its devices" 0 "$STOP_STATUS"
check "its pool stays mounted" test -n "$(mounts_under "$PROOT")"
want_devs=$(find "$PROOT/pool/devices" -name '*.img' | wc -l)
out=$(purge 2>&1) && rc=0 || rc=$?
printf '%s\n' "$out"
check_eq "postrm purge exits 0" 0 "$rc"
check "it says what it removes ($want_devs devices)" \
    grep -Eq "^thinbox: removing $PETC and the pool under $PROOT: $want_devs devices, [1-9][0-9]* bytes$" <<<"$out"
check "it names what it leaves outside" grep -qF "not touched (outside $PROOT): dir_path = \"/srv/elsewhere\"" <<<"$out"
check_eq "no mount left under the pool" "" "$(mounts_under "$PROOT")"
check_eq "no loop left on the pool's files" "" "$(loops_under "$PROOT")"
check "the pool and the config directory are gone" test ! -e "$PROOT" -a ! -e "$PETC"

# ---- remove: prerm stops the daemon, the config stays --------------------
out=$(sysdpkg -r thinbox-dbgsym thinbox 2>&1) && rc=0 || rc=$?
printf '%s\n' "$out"
check_eq "dpkg -r exits 0" 0 "$rc"
check "prerm stopped the thinboxd started by hand (by its executable)" grep -q "stopping thinboxd (pid $DAEMON_PID)" <<<"$out"
check_eq "no thinboxd from $BIN left running" "" "$(our_daemons)"
# Already gone (prerm waited for it): this only reaps it and reads its status.
stop_pid "$DAEMON_PID"; DAEMON_PID=
check_eq "that thinboxd exited cleanly on prerm's SIGTERM" 0 "$STOP_STATUS"
check_eq "dpkg: thinbox removed, conffiles kept" "deinstall ok config-files" "$(sysquery -W -f '${Status}' thinbox 2>&1)"
check "binaries gone" test ! -e "$BIN" -a ! -e "$CTL"
check "/etc/thinbox/config.toml kept after remove" test -f "$SYSROOT/etc/thinbox/config.toml"
check_eq "the daemon released its root: no loop on its files" "" "$(loops_under "$TMP/root")"
check_eq "... and no mount under it" "" "$(mounts_under "$TMP/root")"

# ---- purge ---------------------------------------------------------------
out=$(sysdpkg --purge thinbox 2>&1) && rc=0 || rc=$?
printf '%s\n' "$out"
check_eq "dpkg --purge exits 0" 0 "$rc"
check "postrm says what it removes" grep -qF "thinbox: removing $SYSROOT/etc/thinbox (no pool: $SYSROOT/var/lib/thinbox does not exist)" <<<"$out"
check "/etc/thinbox removed" test ! -e "$SYSROOT/etc/thinbox"
st=$(sysquery -W -f '${Status}' thinbox 2>/dev/null || true)
check "dpkg: thinbox purged (dpkg-query: ${st:-unknown package})" test -z "$st" -o "$st" = "unknown ok not-installed"
INSTALLED=
check "no enable or mask link left" bash -c \
    '! compgen -G "$0/etc/systemd/system/*.wants/thinboxd.service" >/dev/null && test ! -L "$0/etc/systemd/system/thinboxd.service"' "$SYSROOT"
check "/var/lib/thinbox never made" test ! -e "$SYSROOT/var/lib/thinbox"
check_eq "a real installation's paths are as they were" "$REAL_BEFORE" "$(real_paths)"
check_eq "nothing of ours mounted under $TMP" "" "$(mounts_under "$TMP")"
check_eq "no loop on a file under $TMP" "" "$(loops_under "$TMP")"
