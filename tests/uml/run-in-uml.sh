#!/usr/bin/env bash
# Runs one command inside a user-mode Linux guest (Debian's linux.uml; kernel.sh says which)
# that has device-mapper and dm-thin loaded — a real thin pool on a host kernel
# without device-mapper.
#
# Usage: tests/uml/run-in-uml.sh [--mem SIZE] [--timeout SECS] [--keep] -- COMMAND [ARGS...]
#   --mem SIZE       guest memory (default 1G; K/M/G suffixes)
#   --timeout SECS   wall-clock limit for the whole run, boot included (default 600)
#   --keep           keep the per-run directory (init script, kernel console log) and print its path
#
# The guest's root is the host's / (hostfs, read-write, as the invoking user), so
# COMMAND sees the host's files: be careful where it writes. Inside the guest:
#   - COMMAND runs as root with cwd = the repository root, stdin = /dev/null;
#   - /tmp, /run and /dev/shm are fresh tmpfs mounts private to the guest (the
#     host's are hidden, except one the repository lives under); TMPDIR is a
#     private tmpfs in the run directory; use /var/tmp or the repository to
#     exchange files;
#   - modules loop, dm-mod, dm-bufio, dm-bio-prison, dm-persistent-data and
#     dm-thin-pool are loaded, /dev/mapper/control exists; there is no udev;
#   - environment (nothing else is inherited): PATH=/usr/local/sbin:/usr/local/bin:
#     /usr/sbin:/usr/bin:/sbin:/bin (plus $CARGO_HOME/bin if CARGO_HOME is set),
#     HOME=/root, TMPDIR=(private tmpfs), DM_DISABLE_UDEV=1, THINBOX_UML=1, CARGO_HOME and
#     RUSTUP_HOME if set, and every variable named in UML_PASS_ENV (space-separated
#     names, copied from the host environment if set there; they override the
#     defaults, e.g. UML_PASS_ENV=PATH passes the host's PATH).
# COMMAND's stdout and stderr (a pipe, not a terminal) are streamed live to this
# script's stdout; kernel messages go to a log that is shown only on failure.
#
# Exit status: COMMAND's own exit status; 124 if the timeout expired (the guest is
# killed, with all its helper processes); 125 if the harness itself failed (UML did
# not boot, the modules did not load, no result came back). Messages on stderr say
# which.
set -euo pipefail

prog='run-in-uml'
usage() { sed -n '6,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; }
full_help() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }
die() { echo "$prog: error: $*" >&2; exit 125; }

mem=1G
timeout=600
keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --mem) [ $# -ge 2 ] || { usage; die "--mem needs a value"; }; mem=$2; shift 2 ;;
    --mem=*) mem=${1#--mem=}; shift ;;
    --timeout) [ $# -ge 2 ] || { usage; die "--timeout needs a value"; }; timeout=$2; shift 2 ;;
    --timeout=*) timeout=${1#--timeout=}; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) full_help; exit 0 ;;
    --) shift; break ;;
    *) usage; die "unexpected argument '$1' (the command goes after --)" ;;
  esac
done
[ $# -gt 0 ] || { usage; die "no command given"; }
[[ $mem =~ ^[1-9][0-9]*[KkMmGg]?$ ]] || die "--mem '$mem' is not a size like 512M or 2G"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout '$timeout' is not a positive number of seconds"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
# shellcheck source=tests/uml/kernel.sh
. "$repo/tests/uml/kernel.sh"
uml=$UML_KERNEL
[ -x "$uml" ] || die "$uml not found: run tests/uml/install.sh (as root)"
kver=$("$uml" --version 2>/dev/null) || die "$uml --version failed"
[ -f "$UML_ROOT/usr/lib/uml/modules/$kver/kernel/drivers/md/dm-thin-pool.ko" ] \
  || die "no dm-thin-pool module for UML kernel $kver under $UML_ROOT/usr/lib/uml/modules: run tests/uml/install.sh"

# --- per-run directory: init script, command, environment, logs, result --------
run=$(mktemp -d /var/tmp/thinbox-uml.XXXXXX) || die "cannot create a run directory under /var/tmp"
chmod 755 "$run"
uml_pid='' uml_exited='' watchdog_pid='' out_pid=''

# PIDs of the guest's live processes: linux.uml forks helpers (one per guest
# address space) into its own process group. Killed ones may linger as zombies
# until the host's init reaps them; those are dead and do not count. Only
# processes named linux.uml count, so that a reused process-group id can never
# make us signal anything else.
guest_processes() {
  ps -e -o pgid=,pid=,stat=,comm= | awk -v g="$uml_pid" '$1 == g && $3 !~ /^Z/ && $4 == "linux.uml" { print $2 }'
}
kill_guest_processes() {
  local -a pids
  mapfile -t pids < <(guest_processes)
  [ ${#pids[@]} -eq 0 ] || kill -KILL "${pids[@]}" 2>/dev/null || true
}

# Stops the guest if it still runs and checks that nothing of it is left: SIGTERM
# to linux.uml first (it then kills and reaps its helpers itself), SIGKILL after
# 3 s and for anything left over.
kill_guest() {
  [ -n "$uml_pid" ] || return 0
  local i
  if [ -z "$uml_exited" ] && kill -0 "$uml_pid" 2>/dev/null; then
    kill -TERM "$uml_pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do kill -0 "$uml_pid" 2>/dev/null || break; sleep 0.1; done
  fi
  kill_guest_processes
  wait "$uml_pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do [ -n "$(guest_processes)" ] || break; sleep 0.1; done
  if [ -n "$(guest_processes)" ]; then
    echo "$prog: error: processes of the UML guest (process group $uml_pid) survived SIGKILL:" >&2
    ps -o pid,stat,args -p "$(guest_processes | paste -sd,)" >&2 || true
    uml_pid=''
    return 1
  fi
  uml_pid=''
}

# shellcheck disable=SC2317  # invoked by trap
cleanup() {
  local st=$? ok=1
  trap - EXIT INT TERM HUP
  if [ -n "$watchdog_pid" ]; then kill -TERM "$watchdog_pid" 2>/dev/null || true; wait "$watchdog_pid" 2>/dev/null || true; fi
  kill_guest || ok=0
  if [ -n "$out_pid" ]; then exec 5>&- || true; wait "$out_pid" 2>/dev/null || true; fi
  if [ "$keep" = 1 ]; then
    echo "$prog: kept run directory $run" >&2
  elif [[ $run == /var/tmp/thinbox-uml.* ]]; then
    rm -rf -- "$run"
  fi
  if [ "$ok" = 0 ] && [ "$st" != 124 ]; then st=125; fi
  exit "$st"
}
trap cleanup EXIT
trap 'echo "$prog: interrupted" >&2; exit 130' INT
trap 'echo "$prog: terminated" >&2; exit 143' TERM
trap 'echo "$prog: hung up" >&2; exit 129' HUP

# The command, its working directory and its environment, as bash source.
guest_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[ -z "${CARGO_HOME:-}" ] || guest_path+=":$CARGO_HOME/bin"
mkdir -p "$run/tmp"
declare -A guest_env=([PATH]=$guest_path [HOME]=/root [TMPDIR]=$run/tmp [DM_DISABLE_UDEV]=1 [THINBOX_UML]=1)
read -ra pass_env <<<"${UML_PASS_ENV:-}"
for name in CARGO_HOME RUSTUP_HOME "${pass_env[@]}"; do
  [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "UML_PASS_ENV: '$name' is not a variable name"
  [ -z "${!name+set}" ] || guest_env[$name]=${!name}
done
{
  printf 'cwd=%q\n' "$repo"
  printf 'moddir=%q\n' "$UML_ROOT/usr/lib/uml/modules/$kver/kernel"
  printf 'cmd=('; printf ' %q' "$@"; printf ' )\n'
  printf 'cmd_env=('
  for name in "${!guest_env[@]}"; do printf ' %q' "$name=${guest_env[$name]}"; done
  printf ' )\n'
} >"$run/command.sh"

# PID 1 of the guest. Markers in its directory tell the host how far it got:
# booted -> (setup-error | started -> result).
cat >"$run/init.sh" <<'EOF'
#!/bin/bash
# shellcheck disable=SC1091,SC2154  # command.sh (generated) defines cwd, moddir, cmd and cmd_env
# Generated by tests/uml/run-in-uml.sh: init (PID 1) of a UML guest. Never exits
# (init exiting panics the kernel): it powers the guest off instead. Every exec
# costs tens of milliseconds under UML, hence the builtins.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin DM_DISABLE_UDEV=1
run=${0%/*}
# Progress on the guest console (console.log), with the guest's uptime.
note() {
  local up='?' _
  read -r up _ </proc/uptime 2>/dev/null
  echo "init: [${up}s] $*"
}
halt_guest() {
  sync
  echo o >/proc/sysrq-trigger
  while :; do sleep 60; done
}
fail() {
  note "error: $*"
  printf '%s\n' "$*" >"$run/setup-error"
  halt_guest
}
is_mounted() {
  local _dev mp _rest
  while read -r _dev mp _rest; do [ "$mp" = "$1" ] && return 0; done </proc/mounts
  return 1
}

: >"$run/booted"
mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
# runc needs a cgroup hierarchy to place containers in.
mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail "cannot mount cgroup2 on /sys/fs/cgroup"
# Loopback, for daemons' local endpoints (the CSI driver's metrics).
ip link set lo up || fail "cannot bring up the loopback interface"
is_mounted /dev || mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs on /dev"
mkdir -p /dev/pts /dev/shm || fail "cannot create /dev/pts, /dev/shm"
mount -t devpts devpts /dev/pts || fail "cannot mount /dev/pts"
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd || fail "cannot create /dev/fd"
. "$run/command.sh" || fail "cannot read $run/command.sh"
# Private tmpfs mounts: the host's /tmp, /run and /dev/shm stay out of reach,
# unless the repository lives under one of them (a CI clone in /tmp). TMPDIR is
# always a private tmpfs in the run directory.
for m in /dev/shm:1777 /tmp:1777 /run:755 "$run/tmp:1777"; do
  case "$cwd/" in
    "${m%:*}"/*) note "keeping the host's ${m%:*}: the repository is under it"; continue ;;
  esac
  mount -t tmpfs -o "mode=${m#*:}" tmpfs "${m%:*}" || fail "cannot mount a tmpfs on ${m%:*}"
done

for m in drivers/block/loop drivers/md/dm-mod drivers/md/dm-bufio drivers/md/dm-bio-prison \
         drivers/md/persistent-data/dm-persistent-data drivers/md/dm-thin-pool; do
  name=${m##*/}
  [ -d "/sys/module/${name//-/_}" ] && continue
  out=$(insmod "$moddir/$m.ko" 2>&1) || fail "insmod $moddir/$m.ko failed: $out"
done
[ -c /dev/mapper/control ] || fail "/dev/mapper/control missing after loading dm-mod"
[ -c /dev/loop-control ] || fail "/dev/loop-control missing after loading loop"
[[ $(dmsetup targets 2>&1) == *thin-pool* ]] || fail "dmsetup targets does not list thin-pool"
note "modules loaded"

cd "$cwd" || fail "cannot cd to $cwd"
# tty1 is connected to the host's stdout; no \n -> \r\n translation on it.
stty -F /dev/tty1 -opost -echo 2>/dev/null
exec 3>/dev/tty1 || fail "cannot open /dev/tty1"
# The command's stdout+stderr: a pipe into tee, which copies to output.log and tty1.
exec 4> >(tee "$run/output.log" >&3) || fail "cannot start tee"
tee_pid=$!
: >"$run/started"
note "starting the command"
env -i "${cmd_env[@]}" "${cmd[@]}" </dev/null >&4 2>&4 3>&- 4>&-
rc=$?
exec 4>&-
# Let tee pass on the last output, but wait at most 2 s: a process the command
# left behind may still hold the pipe.
deadline=$((${EPOCHREALTIME/./} + 2000000))
while kill -0 "$tee_pid" 2>/dev/null && ((${EPOCHREALTIME/./} < deadline)); do sleep 0.05; done
printf '%s\n' "$rc" >"$run/result"
note "command exited $rc; powering off"
halt_guest
EOF
chmod 755 "$run/init.sh"

# --- boot ------------------------------------------------------------------------
# con0 (kernel console, init's own messages) -> console.log; con1 = /dev/tty1 (the
# command's output) -> a pipe into cat -> our stdout. The pipe keeps linux.uml from
# setting O_NONBLOCK on our own stdout, which it does to the fds it is given.
exec 5> >(exec cat)
out_pid=$!
started=$EPOCHREALTIME
setsid "$uml" \
  "mem=$mem" "uml_dir=$run" "umid=${run##*/}" \
  root=/dev/root rootfstype=hostfs rootflags=/ rw \
  con=null ssl=null con0=null,fd:4 con1=null,fd:3 console=tty0 \
  panic=1 noreboot "init=$run/init.sh" \
  </dev/null >"$run/uml.log" 2>&1 3>&5 4>"$run/console.log" &
uml_pid=$!
exec 5>&-

# Watchdog: after $timeout seconds, mark the run timed out and stop the guest
# (SIGTERM, then SIGKILL to its linux.uml processes if they are still there 5 s later).
(
  trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
  sleep "$timeout" &
  sleep_pid=$!
  wait "$sleep_pid" || exit 0
  : >"$run/timed-out"
  kill -TERM "$uml_pid" 2>/dev/null
  sleep 5 &
  sleep_pid=$!
  wait "$sleep_pid" || exit 0
  kill_guest_processes
) &
watchdog_pid=$!

uml_status=0
wait "$uml_pid" 2>/dev/null || uml_status=$? # 2>/dev/null: no "Killed" job notice from bash
uml_exited=1
elapsed_us=$(( ${EPOCHREALTIME/./} - ${started/./} ))
elapsed=$(printf '%d.%01d' $((elapsed_us / 1000000)) $((elapsed_us % 1000000 / 100000)))
kill -TERM "$watchdog_pid" 2>/dev/null || true
wait "$watchdog_pid" 2>/dev/null || true
watchdog_pid=
kill_guest || exit 125
wait "$out_pid" 2>/dev/null || true
out_pid=

# The last lines of a log, ending with a newline even if the log does not.
show_tail() {
  [ -s "$2" ] || { echo "(empty)"; return 0; }
  tail -n "$1" "$2"
  [ -z "$(tail -c 1 "$2")" ] || echo
}
# linux.uml's own output matters only if the guest did not boot.
show_logs() {
  {
    if [ ! -e "$run/booted" ]; then
      echo "$prog: --- linux.uml output (last 20 lines):"
      show_tail 20 "$run/uml.log"
    fi
    echo "$prog: --- guest console (last 40 lines):"
    show_tail 40 "$run/console.log"
    echo "$prog: ---"
  } >&2
}

if [ -e "$run/timed-out" ]; then
  show_logs
  stage="before init ran"
  [ ! -e "$run/booted" ] || stage="while setting up the guest"
  [ ! -e "$run/started" ] || stage="while the command was running"
  echo "$prog: error: timed out after ${timeout}s $stage; the guest was killed" >&2
  exit 124
fi
if [ ! -e "$run/booted" ]; then
  show_logs
  # See kernel.sh: install.sh picks a kernel that can run on this CPU.
  if grep -qs "$UML_XSAVE_REFUSED" "$run/uml.log" "$run/console.log"; then
    die "UML did not boot: this host's CPU has a larger XSAVE state than $uml can save through ptrace (\"ptrace set fp regs failed, errno = 14\"); run tests/uml/install.sh, which fetches a kernel that can"
  fi
  die "UML did not boot: init never ran (linux.uml exit status $uml_status)"
fi
if [ -e "$run/setup-error" ]; then
  show_logs
  die "guest setup failed: $(cat "$run/setup-error")"
fi
if [ ! -e "$run/started" ]; then
  show_logs
  die "the guest stopped before starting the command (linux.uml exit status $uml_status)"
fi
if [ ! -s "$run/result" ]; then
  show_logs
  die "the guest stopped without writing a result: the command did not finish (kernel panic? power-off from inside?)"
fi
rc=$(cat "$run/result")
[[ $rc =~ ^[0-9]+$ ]] || die "malformed result '$rc'"
echo "$prog: command exited $rc (guest ran ${elapsed}s)" >&2
exit "$rc"
