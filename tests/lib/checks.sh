# shellcheck shell=bash
# Assertions and leftover sweeping shared by the host scripts
# (tests/host/*.sh, tests/deploy/package.sh). Source it; it
# sets PASSED=0 and FAILED=0, which the scripts report on their last line.
#
#   ok DESCRIPTION               a passed assertion ("ok   - ..." on stdout)
#   not_ok DESCRIPTION           a failed one ("FAIL - ..." on stderr)
#   check DESCRIPTION CMD...     one assertion: CMD's exit status
#   check_eq DESCRIPTION EXPECTED ACTUAL
#   die DESCRIPTION              a failed assertion that ends the script (exit 1;
#                                the caller's EXIT trap cleans up and reports)
#   must DESCRIPTION CMD...      a setup step: on failure, its output and die
#   loops_under, mounts_under    from scripts/lib/leftovers.sh (sourced here)
#   log_tails FILE...            the last 60 lines of each non-empty FILE, on stderr
#   sweep_tmp DIR                last resort of a cleanup: unmount and detach
#                                whatever is left under DIR, then remove DIR
#                                (kept if THINBOX_E2E_KEEP=1 or still mounted)
#   finish_with NAME CLEANUP     sets the script's traps: however it ends, an
#                                interruption (INT, TERM) or a command failing
#                                outside an assertion counts as a failure
#                                (with the line), then CLEANUP runs (no
#                                errexit), "NAME: P passed, F failed" is
#                                printed, and the exit status is 0 only if
#                                nothing failed

# shellcheck source=scripts/lib/leftovers.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib/leftovers.sh"

PASSED=0
FAILED=0
ERR_LINE=
SIGNALLED=

ok() { PASSED=$((PASSED + 1)); echo "ok   - $*"; }
not_ok() { FAILED=$((FAILED + 1)); echo "FAIL - $*" >&2; }
check() { local d=$1; shift; if "$@"; then ok "$d"; else not_ok "$d"; fi; }
check_eq() {
    if [[ $3 == "$2" ]]; then ok "$1"; else not_ok "$1: expected '$2', got '$3'"; fi
}
die() { not_ok "$*"; exit 1; }
must() {
    local d=$1 out; shift
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" >&2
        die "$d"
    fi
    [[ -z $out ]] || printf '%s\n' "$out"
}

# install_needed ITEM...: installs, in one apt-get run, the packages of the
# tools not on PATH (ITEM = TOOL:PACKAGE) and the packages dpkg lacks
# (ITEM = =PACKAGE); nothing when all are there.
install_needed() {
    local need=() i
    for i in "$@"; do
        case $i in
            =*) [[ $(dpkg-query -W -f '${Status}' "${i#=}" 2>/dev/null) == "install ok installed" ]] || need+=("${i#=}") ;;
            *) command -v "${i%%:*}" >/dev/null || need+=("${i#*:}") ;;
        esac
    done
    (( ${#need[@]} )) || return 0
    echo "installing: ${need[*]}"
    must "apt-get update" apt-get -o DPkg::Lock::Timeout=600 update -qq
    must "apt-get install ${need[*]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${need[@]}"
}

log_tails() {
    local f
    for f in "$@"; do
        [[ -s $f ]] || continue
        echo "---- last lines of $f ----" >&2
        tail -n 60 "$f" | sed 's/\x1b\[[0-9;]*m//g' >&2
    done
}

sweep_tmp() {
    local dir=$1 m l
    # Loop files live inside the embedded pool's mount, so alternate
    # unmounting and detaching (a busy loop is marked to detach on last close).
    for _ in 1 2 3; do
        while read -r m; do umount "$m" 2>/dev/null; done < <(mounts_under "$dir" | sort -r)
        while read -r l _; do losetup -d "$l" 2>/dev/null; done < <(loops_under "$dir")
    done
    while read -r m; do
        echo "lazily unmounting $m" >&2
        umount -l "$m"
    done < <(mounts_under "$dir" | sort -r)
    if [[ ${THINBOX_E2E_KEEP:-0} == 1 ]]; then
        echo "kept $dir"
    elif [[ -z $(mounts_under "$dir") ]]; then
        rm -rf --one-file-system "$dir"
    else
        echo "left $dir: still mounted" >&2
    fi
}

finish_with() {
    FINISH_NAME=$1 FINISH_CLEANUP=$2
    trap _finish EXIT
    trap 'ERR_LINE=$LINENO' ERR
    trap 'SIGNALLED=INT; exit 130' INT
    trap 'SIGNALLED=TERM; exit 143' TERM
}
_finish() {
    local rc=$?
    trap - EXIT
    set +e
    if [[ -n $SIGNALLED ]]; then
        not_ok "interrupted by SIG$SIGNALLED"
    elif (( rc != 0 && FAILED == 0 )); then
        not_ok "aborted (exit $rc) near line ${ERR_LINE:-?}"
    fi
    "$FINISH_CLEANUP"
    echo "$FINISH_NAME: $PASSED passed, $FAILED failed"
    (( FAILED == 0 )) && exit 0 || exit 1
}
