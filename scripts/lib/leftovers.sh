# shellcheck shell=bash
# What is left attached or mounted under a directory: the one definition of
# "ours" for the quickstart, the test runs and the benchmarks. Each makes
# everything under a directory of its own, so a real installation elsewhere on
# the node (/var/lib/thinbox, /run/thinbox) is neither counted nor touched.
# Source it. A listing that fails counts as nothing listed.
#
#   loops_under DIR...   loop devices whose backing file lies under a DIR, as
#                        "NODE BACKING" lines
#   mounts_under DIR...  mount points at or under a DIR
#   left_under DIR...    both
#   clear_or_keep DIR    removes DIR if nothing under it is attached or
#                        mounted; otherwise keeps it, says what is left on
#                        stderr and returns 1

loops_under() {
    local d
    for d in "$@"; do
        { losetup --list --noheadings --raw --output NAME,BACK-FILE 2>/dev/null |
            awk -v p="$d/" 'index($2, p) == 1'; } || true
    done
}

mounts_under() {
    local d
    for d in "$@"; do
        { findmnt -rn -o TARGET 2>/dev/null |
            awk -v p="$d/" 'index($0, p) == 1 || $0 == substr(p, 1, length(p) - 1)'; } || true
    done
}

left_under() { loops_under "$@"; mounts_under "$@"; }

clear_or_keep() {
    local left
    left=$(left_under "$1")
    if [[ -n $left ]]; then
        printf 'left behind (keeping %s):\n%s\n' "$1" "$left" >&2
        return 1
    fi
    rm -rf --one-file-system "$1"
}
