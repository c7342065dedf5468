#!/usr/bin/env bash
# Thinbox on dm-thin vs containerd's built-in devmapper snapshotter, side by
# side in ONE user-mode Linux guest (a real kernel with dm-thin), plus fio on a
# thin device vs the raw loop device under a pool. Run on the host, as root:
#
#   sudo bash tests/bench/uml-devmapper-bench.sh
#
# What it does:
#   host   installs what it needs (tests/uml/install.sh, fio, containerd, runc),
#          builds release binaries (cargo build --release -p thinboxd
#          -p thinbox-snapshot-bench) unless BENCH_BIN_DIR is set, copies them
#          into a work directory under /var/tmp (which the guest sees through
#          hostfs; the binaries cannot change under the run; with
#          BENCH_BEFORE_BIN_DIR also the old thinbox-snapshotter), boots UML once
#          (tests/uml/run-in-uml.sh) running this script with --inside, then
#          checks that nothing of the run is attached or mounted and removes the
#          work directory.
#   guest  1. thinboxd (snapshot socket only, --release-on-exit) on dm-thin: its embedded
#             pool = sparse meta/data files on loop devices -> dm-linear ->
#             thin-pool (128-sector blocks, low water mark 10% of the data
#             blocks, error_if_no_space, block zeroing on).
#          1b. Only with BENCH_BEFORE_BIN_DIR: the old daemon, thinbox-snapshotter
#             (before thinboxd existed; target "thinbox-before"), the same way
#             (--release-on-exit, the same [pool] and [snapshot] settings) on
#             its own root and socket, hence its own embedded pool (dm names
#             derive from the root: distinct, checked).
#          2. An identical pool made with dmsetup (files of the same sizes next
#             to thinbox's, loops, dm-linear, the same thin-pool parameters; the
#             two tables, three with thinbox-before's, are compared and must
#             match), and a private containerd 1.6 whose devmapper snapshotter
#             uses it (`ctr plugins ls` must show it ok).
#          3. thinbox-snapshot-bench: workloads chain and parallel, devmapper
#             first (the baseline: ratios read thinbox / devmapper), targets
#             taking turns (thinbox-before last, when there); after each turn,
#             unmeasured, it waits until every pool is empty again (--settle),
#             so that no daemon's background cleanup runs during another's
#             measurements.
#          4. fio: 4k randread / randwrite at iodepth 1 and 16 (libaio, direct;
#             rounds alternating between the two devices, merged)
#             on a thin device of a fresh pool made like thinbox's, and on a
#             loop device over a file of the same size as that pool's data file
#             (the kind of device the pool's data sits on), both in the same
#             host directory; the tested region is written once on both first.
#          5. Teardown (also on failure): thinboxd (and thinbox-snapshotter),
#             containerd, dm devices, loops, mounts; then `dmsetup ls`,
#             `losetup -a` and findmnt must show nothing, or the run fails.
#
# Output in $BENCH_OUT (default target/uml-bench/):
#   snapshot-bench.{md,json,txt}   thinbox-snapshot-bench's report
#   fio.{md,json} fio/*.json       fio results per cell, and the raw fio output
#   summary.md                     the final tables (ratios, targets met or not)
#   uml-bench.md                   summary + configuration, for docs/benchmarks.md
#   pools.txt, gc.txt              pool tables, page cache before fio, containerd GC passes
#   settle.txt                     how long each pause between turns waited for the pools to empty
#   deleter.txt                    thinbox's background deletions (one line each, with its time)
#   deleter-before.txt             the same for thinbox-before (only with BENCH_BEFORE_BIN_DIR)
#   host-load.txt                  the host's 1-minute load average before and after
#   source.txt                     the commit the binaries were built from; with
#                                  BENCH_BEFORE_BIN_DIR a second line
#                                  "thinbox-before: COMMIT" (the old binary's)
#   thinbox.log containerd.log run.log   logs (thinbox-before.log: the old daemon's)
#
# Environment (all optional):
#   BENCH_BIN_DIR=DIR        use thinboxd and thinbox-snapshot-bench
#                            from DIR instead of building (e.g. a worktree's
#                            target/release)
#   BENCH_BEFORE_BIN_DIR=DIR add a third target, "thinbox-before": the old daemon
#                            DIR/thinbox-snapshotter (a release build of a commit
#                            before thinboxd, e.g. 65005f8; its commit is read
#                            from the git tree around DIR), on its own embedded
#                            dm-thin pool identical to thinbox's; unset: two targets
#   BENCH_OUT=DIR            output directory (a host path; default target/uml-bench)
#   BENCH_CHAIN_REPEATS=5    chains of 16 layers per target
#   BENCH_PARALLEL=100       containers prepared at once in the parallel workload
#   BENCH_PARALLEL_REPEATS=1 parallel rounds per target
#   BENCH_POOL_SIZE=64GiB    thinbox's pool.embedded_size (= size of both data files)
#   BENCH_SNAPSHOT_SIZE=10GiB  thinbox snapshot.default_size = devmapper base_image_size
#   BENCH_FIO_ROUNDS=20 BENCH_FIO_RUNTIME=1s BENCH_FIO_RAMP=500ms   fio: rounds per
#                            cell and device (alternating which device goes first),
#                            time measured per round (+ ramp), in fio's time syntax
#   BENCH_FIO_SIZE=1G        region fio reads/writes on each device
#   BENCH_FIO_POOL_SIZE=4G   data file of the fio pool = size of the raw loop's file
#   BENCH_GC_WAIT=180        seconds to wait for containerd's GC to remove the
#                            devmapper thin devices of removed snapshots (and
#                            for thinbox's deleter to remove its own)
#   BENCH_UML_MEM=4G BENCH_UML_TIMEOUT=1800   guest memory, wall-clock limit
# Exit status: 0 all measured and clean; 1 anything failed or was left behind.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PROG=uml-devmapper-bench
# shellcheck source=scripts/lib/leftovers.sh
source "$REPO/scripts/lib/leftovers.sh"

log() { echo "[$PROG] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# to_bytes SIZE: "10GiB", "64GiB", "1G", "512M" (binary units, as thinbox, containerd
# and fio read them) -> bytes.
to_bytes() {
    [[ $1 =~ ^([0-9]+)([KMGT]?)(iB)?$ ]] || die "bad size '$1' (want e.g. 10GiB, 1G, 512M)"
    local n=${BASH_REMATCH[1]}
    case ${BASH_REMATCH[2]} in
        K) n=$((n << 10)) ;; M) n=$((n << 20)) ;; G) n=$((n << 30)) ;; T) n=$((n << 40)) ;;
    esac
    echo "$n"
}

: "${BENCH_OUT:=$REPO/target/uml-bench}"
: "${BENCH_CHAIN_REPEATS:=5}"
: "${BENCH_PARALLEL:=100}"
: "${BENCH_PARALLEL_REPEATS:=1}"
: "${BENCH_POOL_SIZE:=64GiB}"
: "${BENCH_SNAPSHOT_SIZE:=10GiB}"
: "${BENCH_FIO_ROUNDS:=20}"
: "${BENCH_FIO_RUNTIME:=1s}"
: "${BENCH_FIO_RAMP:=500ms}"
: "${BENCH_FIO_SIZE:=1G}"
: "${BENCH_FIO_POOL_SIZE:=4G}"
: "${BENCH_GC_WAIT:=180}"
: "${BENCH_UML_MEM:=4G}"
: "${BENCH_UML_TIMEOUT:=1800}"
export BENCH_OUT BENCH_CHAIN_REPEATS BENCH_PARALLEL BENCH_PARALLEL_REPEATS BENCH_POOL_SIZE \
    BENCH_SNAPSHOT_SIZE BENCH_FIO_ROUNDS BENCH_FIO_RUNTIME BENCH_FIO_RAMP BENCH_FIO_SIZE BENCH_FIO_POOL_SIZE \
    BENCH_GC_WAIT
PASS_ENV="BENCH_WORK BENCH_OUT BENCH_CHAIN_REPEATS BENCH_PARALLEL BENCH_PARALLEL_REPEATS \
BENCH_POOL_SIZE BENCH_SNAPSHOT_SIZE BENCH_FIO_ROUNDS BENCH_FIO_RUNTIME BENCH_FIO_RAMP BENCH_FIO_SIZE \
BENCH_FIO_POOL_SIZE BENCH_GC_WAIT BENCH_HOST_KERNEL BENCH_HOST_CPUS BENCH_DATE BENCH_BEFORE"

# ============================================================================
# Host side
# ============================================================================
host_main() {
    [[ $(id -u) == 0 ]] || die "needs root"
    local v
    for v in BENCH_POOL_SIZE BENCH_SNAPSHOT_SIZE BENCH_FIO_SIZE BENCH_FIO_POOL_SIZE; do
        to_bytes "${!v}" >/dev/null
    done
    [[ $BENCH_OUT == /* ]] || BENCH_OUT=$PWD/$BENCH_OUT
    case $BENCH_OUT in
        /tmp/*|/run/*|/dev/shm/*) die "BENCH_OUT=$BENCH_OUT: the guest has private /tmp, /run and /dev/shm; use a path under the repository or /var/tmp" ;;
    esac

    log "installing what is missing (uml, fio, containerd, runc)"
    bash "$REPO/tests/uml/install.sh"
    local need=() p
    for p in fio containerd runc python3; do
        command -v "$p" >/dev/null || need+=("$p")
    done
    if (( ${#need[@]} )); then
        apt-get -o DPkg::Lock::Timeout=600 -qq update
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq install -y "${need[@]}" >/dev/null
        for p in "${need[@]}"; do command -v "$p" >/dev/null || die "$p still missing after apt-get install"; done
    fi
    containerd --version | grep -q ' v\?1\.6\.' || die "containerd 1.6 expected, got: $(containerd --version)"

    local bin_dir
    if [[ -n ${BENCH_BIN_DIR:-} ]]; then
        bin_dir=$BENCH_BIN_DIR
        log "using prebuilt binaries from $bin_dir"
    else
        log "building release binaries"
        (cd "$REPO" && cargo build --release -p thinboxd -p thinbox-snapshot-bench)
        bin_dir=$REPO/target/release
    fi
    for p in thinboxd thinbox-snapshot-bench; do
        [[ -x $bin_dir/$p ]] || die "missing $bin_dir/$p"
    done
    # Which source the binaries come from (best effort: the git tree around them).
    local commit dirty
    commit=$(git -C "$bin_dir" rev-parse --short HEAD 2>/dev/null || echo unknown)
    dirty=$(git -C "$bin_dir" status --porcelain -- :/crates :/bench/snapshot-bench :/Cargo.lock 2>/dev/null || true)
    [[ -z $dirty ]] || commit+=" with uncommitted changes"
    # The old daemon, if asked for; BENCH_BEFORE (passed to the guest) = its
    # commit, empty = no thinbox-before target.
    BENCH_BEFORE=
    if [[ -n ${BENCH_BEFORE_BIN_DIR:-} ]]; then
        [[ -x $BENCH_BEFORE_BIN_DIR/thinbox-snapshotter ]] || die "missing $BENCH_BEFORE_BIN_DIR/thinbox-snapshotter"
        log "thinbox-before: $BENCH_BEFORE_BIN_DIR/thinbox-snapshotter"
        BENCH_BEFORE=$(git -C "$BENCH_BEFORE_BIN_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)
        dirty=$(git -C "$BENCH_BEFORE_BIN_DIR" status --porcelain --untracked-files=no 2>/dev/null || true)
        [[ -z $dirty ]] || BENCH_BEFORE+=" with uncommitted changes"
    fi
    export BENCH_BEFORE

    # Short: unix socket paths live in here (containerd's and thinbox's).
    BENCH_WORK=$(mktemp -d /var/tmp/tbub.XXXXXX)
    export BENCH_WORK
    chmod 755 "$BENCH_WORK"
    trap host_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    mkdir -p "$BENCH_WORK/bin"
    cp "$bin_dir/thinboxd" "$bin_dir/thinbox-snapshot-bench" "$BENCH_WORK/bin/"
    [[ -z $BENCH_BEFORE ]] || cp "$BENCH_BEFORE_BIN_DIR/thinbox-snapshotter" "$BENCH_WORK/bin/"

    mkdir -p "$BENCH_OUT"
    rm -rf "$BENCH_OUT/fio"
    rm -f "$BENCH_OUT"/{snapshot-bench.md,snapshot-bench.json,snapshot-bench.txt,settle.txt,fio.md,fio.json,summary.md,uml-bench.md,pools.txt,gc.txt,deleter.txt,deleter-before.txt,thinbox.log,thinbox-before.log,containerd.log,run.log,env.json,host-load.txt,source.txt}

    BENCH_HOST_KERNEL=$(uname -r)
    BENCH_HOST_CPUS=$(nproc)
    BENCH_DATE=$(date -u +%Y-%m-%d)
    export BENCH_HOST_KERNEL BENCH_HOST_CPUS BENCH_DATE

    log "booting user-mode Linux (mem $BENCH_UML_MEM, timeout ${BENCH_UML_TIMEOUT}s); work dir $BENCH_WORK"
    local st=0 load0
    load0=$(cut -d' ' -f1 /proc/loadavg)
    UML_PASS_ENV=$PASS_ENV bash "$REPO/tests/uml/run-in-uml.sh" --mem "$BENCH_UML_MEM" \
        --timeout "$BENCH_UML_TIMEOUT" -- bash tests/bench/uml-devmapper-bench.sh --inside \
        2>&1 | tee "$BENCH_OUT/run.log" || st=$?
    (( st == 0 )) || die "the run inside UML failed (status $st); see $BENCH_OUT/run.log"
    echo "$load0 $(cut -d' ' -f1 /proc/loadavg)" >"$BENCH_OUT/host-load.txt"
    echo "$commit" >"$BENCH_OUT/source.txt"
    [[ -z $BENCH_BEFORE ]] || echo "thinbox-before: $BENCH_BEFORE" >>"$BENCH_OUT/source.txt"

    python3 "$HERE/uml-bench-report.py" "$BENCH_OUT"
    log "results: $BENCH_OUT/summary.md, uml-bench.md, snapshot-bench.*, fio.*"
    cat "$BENCH_OUT/summary.md"
}

# shellcheck disable=SC2317 # invoked by the EXIT trap
host_cleanup() {
    local st=$?
    trap - EXIT INT TERM
    [[ -n ${BENCH_WORK:-} && -d $BENCH_WORK ]] || exit "$st"
    # The guest's loops and mounts die with it; the host must hold none of ours.
    clear_or_keep "$BENCH_WORK" || exit 1
    [[ ! -e $BENCH_WORK ]] || { log "ERROR: could not remove $BENCH_WORK"; exit 1; }
    exit "$st"
}

# ============================================================================
# Guest side (inside UML; cwd = repository; DM_DISABLE_UDEV=1 so dmsetup makes
# the /dev/mapper nodes itself)
# ============================================================================
W='' OUT='' BIN=''
THINBOX_PID='' BENCH_PID='' CLEANED='' CTRD_STARTED='' THINBOX_POOL='' POOL_PARAMS=''
BEFORE_PID='' BEFORE_POOL=''   # thinbox-before (BENCH_BEFORE set)
DMPOOL=tbub-devmapper          # the devmapper snapshotter's pool
FIOPOOL=tbub-fio               # the fio pool
declare -a OUR_LOOPS=()

# size in bytes of a file or block device
bytes_of() {
    if [[ -b $1 ]]; then blockdev --getsize64 "$1"; else stat -c %s "$1"; fi
}
# major:minor of a dm device
dm_devno() { dmsetup info -c --noheadings -o major,minor --separator : "$1"; }
# size in bytes of a dm device, by name (thinbox makes no /dev/mapper nodes)
dm_bytes() { echo $(( $(cat "/sys/dev/block/$(dm_devno "$1")/size") * 512 )); }
# thin-pool table without the device numbers: start length target blocksize lwm features...
pool_params() { dmsetup table "$1" | awk '{ $4 = ""; $5 = ""; print }' | tr -s ' '; }

# pool_of_root ROOT: the thin pool whose metadata linear sits on the loop over
# ROOT/thin/meta.img (thinboxd's and thinbox-snapshotter's embedded pool).
pool_of_root() {
    local want=$1/thin/meta.img p devno
    for p in $(dmsetup ls --target thin-pool | awk '$1 != "No" { print $1 }'); do
        devno=$(dmsetup table "${p%-pool}-meta" 2>/dev/null | awk '$3 == "linear" { print $4 }') || continue
        [[ -n $devno && -r /sys/dev/block/$devno/loop/backing_file ]] || continue
        if [[ $(cat "/sys/dev/block/$devno/loop/backing_file") == "$want" ]]; then echo "$p"; return 0; fi
    done
    return 1
}

# make_pool NAME META_FILE DATA_FILE [PARAMS]: loops -> dm-linear NAME-meta and
# NAME-data -> thin-pool NAME. PARAMS = the thin-pool table after the two
# devices (block size, low water mark, features); default: thinbox's embedded
# pool's (128-sector blocks, low water mark 10% of the data blocks,
# error_if_no_space, zeroing on).
make_pool() {
    local name=$1 meta=$2 data=$3 params=${4:-} ml dl sz
    ml=$(losetup -f --show "$meta"); OUR_LOOPS+=("$ml")
    dl=$(losetup -f --show "$data"); OUR_LOOPS+=("$dl")
    dmsetup create "$name-meta" --table "0 $(blockdev --getsz "$ml") linear $(cat "/sys/block/${ml#/dev/}/dev") 0"
    dmsetup create "$name-data" --table "0 $(blockdev --getsz "$dl") linear $(cat "/sys/block/${dl#/dev/}/dev") 0"
    sz=$(blockdev --getsz "/dev/mapper/$name-data")
    [[ -n $params ]] || params="128 $((sz / 128 / 10)) 1 error_if_no_space"
    dmsetup create "$name" --table "0 $sz thin-pool $(dm_devno "$name-meta") $(dm_devno "$name-data") $params"
}

# remove_pool NAME: thin devices named NAME-*, the pool, its linears.
remove_pool() {
    local name=$1 d
    for d in $(dmsetup ls --target thin 2>/dev/null | awk -v p="$name-" 'index($1, p) == 1 { print $1 }'); do
        dmsetup remove --retry "$d" || true
    done
    for d in "$name" "$name-meta" "$name-data"; do
        if dmsetup info "$d" >/dev/null 2>&1; then dmsetup remove --retry "$d" || true; fi
    done
}

start_thinbox() {
    cat >"$W/thinbox.toml" <<EOF
[pool]
backend = "dm-thin"
embedded_size = "$BENCH_POOL_SIZE"
[snapshot]
default_size = "$BENCH_SNAPSHOT_SIZE"
filesystem = "ext4"
EOF
    # The deleter's debug lines time each background deletion (deleter.txt);
    # the deleter is the block engine's (blockstore), under both front ends.
    # The snapshot door only; thinboxd binds its socket before it opens the
    # pool, so wait for it to say it serves.
    THINBOX_LOG=info,thinbox_blockstore::deleter=debug "$BIN/thinboxd" --root "$W/thinbox" --snapshotter-address "$W/thinbox.sock" \
        --no-csi --config "$W/thinbox.toml" --release-on-exit >"$W/thinbox.log" 2>&1 </dev/null &
    THINBOX_PID=$!
    await_thin "$THINBOX_PID" "$W/thinbox.log" thinboxd
    THINBOX_POOL=$(pool_of_root "$W/thinbox") || die "no thin pool over $W/thinbox/thin/meta.img"
    log "thinboxd pid $THINBOX_PID (dm-thin, pool $THINBOX_POOL)"
}

# await_thin PID LOG NAME: until the daemon says it serves its socket (it
# opens its pool first), on dm-thin.
await_thin() {
    local pid=$1 logf=$2 name=$3
    await_serving "$pid" "$logf" 1 60 snapshots || die "$name did not start"
    grep -q 'backend="dm-thin"' "$logf" || { cat "$logf" >&2; die "$name is not on the dm-thin backend"; }
}

# thinbox-before: the old daemon, thinbox-snapshotter, configured as thinboxd
# above, on a root of its own: its dm names (PREFIX-pool, -meta, -data,
# PREFIX-<thin id>, PREFIX = thinbox-<hash of the root>) differ from thinbox's.
start_before() {
    # thinboxd's configuration file: the old daemon reads its [pool] and
    # [snapshot] keys alike. Its deleter was the snapshotter's
    # (thinbox_snapshotter::deleter).
    THINBOX_LOG=info,thinbox_snapshotter::deleter=debug "$BIN/thinbox-snapshotter" --root "$W/before" --address "$W/before.sock" \
        --config "$W/thinbox.toml" --release-on-exit >"$W/thinbox-before.log" 2>&1 </dev/null &
    BEFORE_PID=$!
    local tp bp
    await_thin "$BEFORE_PID" "$W/thinbox-before.log" thinbox-snapshotter
    BEFORE_POOL=$(pool_of_root "$W/before") || die "no thin pool over $W/before/thin/meta.img"
    # Neither prefix may match the other's devices (settle and remove_pool
    # select thin devices by "PREFIX-").
    tp=${THINBOX_POOL%-pool}- bp=${BEFORE_POOL%-pool}-
    [[ $tp != "$bp"* && $bp != "$tp"* ]] || die "thinbox's and thinbox-before's dm names collide: ${tp}* vs ${bp}*"
    log "thinbox-snapshotter (thinbox-before, commit $BENCH_BEFORE) pid $BEFORE_PID (dm-thin, pool $BEFORE_POOL)"
}

stop_before() {
    [[ -n $BEFORE_PID ]] || return 0
    local st=0
    if kill -0 "$BEFORE_PID" 2>/dev/null; then
        terminate "$BEFORE_PID" 60 thinbox-snapshotter || st=1
    fi
    wait "$BEFORE_PID" 2>/dev/null || true
    BEFORE_PID=
    return "$st"
}

stop_thinbox() {
    [[ -n $THINBOX_PID ]] || return 0
    local st=0
    if kill -0 "$THINBOX_PID" 2>/dev/null; then
        terminate "$THINBOX_PID" 60 thinboxd || st=1
    fi
    wait "$THINBOX_PID" 2>/dev/null || true
    THINBOX_PID=
    return "$st"
}

# The devmapper snapshotter's pool: same file sizes as thinbox's, same table
# (and thinbox-before's pool, when there, must be identical too).
make_devmapper_pool() {
    local tpool=$THINBOX_POOL tmeta tdata a b c pools want
    pools=$(dmsetup ls --target thin-pool | awk '$1 != "No" { print $1 }' | sort)
    want=$(printf '%s\n' "$THINBOX_POOL" ${BEFORE_POOL:+"$BEFORE_POOL"} | sort)
    [[ $pools == "$want" ]] || die "expected exactly these thin pools: ${want//$'\n'/ } (thinbox's, thinbox-before's when there); found: ${pools//$'\n'/ }"
    tmeta=$W/thinbox/thin/meta.img
    tdata=$W/thinbox/thin/data.img
    [[ -f $tmeta && -f $tdata ]] || die "thinbox's pool files are not at $tmeta, $tdata"
    mkdir -p "$W/devmapper"
    truncate -s "$(bytes_of "$tmeta")" "$W/devmapper/meta.img"
    truncate -s "$(bytes_of "$tdata")" "$W/devmapper/data.img"
    # thinbox's thin-pool table after its two devices, as is.
    make_pool "$DMPOOL" "$W/devmapper/meta.img" "$W/devmapper/data.img" \
        "$(dmsetup table "$tpool" | awk '{ for (i = 6; i <= NF; i++) printf "%s%s", $i, (i < NF ? " " : "") }')"
    {
        echo "# thinbox's embedded pool ($tpool)"
        dmsetup table | grep -F "${tpool%-pool}-" | sort
        ls -ls "$tmeta" "$tdata"
        echo
        if [[ -n $BEFORE_POOL ]]; then
            echo "# thinbox-before's embedded pool ($BEFORE_POOL; thinbox-snapshotter $BENCH_BEFORE)"
            dmsetup table | grep -F "${BEFORE_POOL%-pool}-" | sort
            ls -ls "$W/before/thin/meta.img" "$W/before/thin/data.img"
            echo
        fi
        echo "# containerd devmapper's pool ($DMPOOL), made by this script"
        dmsetup table | grep -F "$DMPOOL" | sort
        ls -ls "$W/devmapper/meta.img" "$W/devmapper/data.img"
    } >"$OUT/pools.txt"
    a=$(pool_params "$tpool")
    b=$(pool_params "$DMPOOL")
    [[ $a == "$b" ]] || die "the pools differ: thinbox '$a' vs devmapper '$b'"
    if [[ -n $BEFORE_POOL ]]; then
        c=$(pool_params "$BEFORE_POOL")
        [[ $a == "$c" ]] || die "the pools differ: thinbox '$a' vs thinbox-before '$c'"
    fi
    a="$(dm_bytes "${tpool%-pool}-meta") $(dm_bytes "${tpool%-pool}-data")"
    b="$(dm_bytes "$DMPOOL-meta") $(dm_bytes "$DMPOOL-data")"
    [[ $a == "$b" ]] || die "pool devices differ in size: thinbox $a vs devmapper $b"
    if [[ -n $BEFORE_POOL ]]; then
        c="$(dm_bytes "${BEFORE_POOL%-pool}-meta") $(dm_bytes "${BEFORE_POOL%-pool}-data")"
        [[ $a == "$c" ]] || die "pool devices differ in size: thinbox $a vs thinbox-before $c"
    fi
    log "pools identical${BEFORE_POOL:+ (thinbox, thinbox-before, devmapper)}: $(pool_params "$DMPOOL") (thin-pool table without devices; meta+data bytes $b)"
    POOL_PARAMS=$(dmsetup table "$DMPOOL" | awk '{ for (i = 6; i <= NF; i++) printf "%s%s", $i, (i < NF ? " " : "") }')
}

start_containerd() {
    CONTAINERD_EXTRA_CONFIG=$(cat <<EOF
[plugins."io.containerd.snapshotter.v1.devmapper"]
  pool_name = "$DMPOOL"
  root_path = "$W/devmapper/state"
  base_image_size = "$BENCH_SNAPSHOT_SIZE"
  fs_type = "ext4"
  async_remove = false
  discard_blocks = false
EOF
)
    export CONTAINERD_EXTRA_CONFIG
    CTR_NAMESPACE=bench
    CTRD_STARTED=1
    containerd_start "$W/ctrd" || die "containerd did not start"
    local row
    row=$(ctr --address "$CONTAINERD_ADDRESS" plugins ls | awk '$1 == "io.containerd.snapshotter.v1" && $2 == "devmapper"')
    log "ctr plugins ls: $row"
    [[ $(awk '{ print $NF }' <<<"$row") == ok ]] || { tail -n 40 "$W/ctrd/containerd.log" >&2; die "containerd's devmapper snapshotter did not load"; }
    log "containerd pid $CONTAINERD_PID, devmapper snapshotter on $DMPOOL"
}

run_snapshot_bench() {
    local ctrd_version notes=() targets=() st=0 daemons=both
    ctrd_version=$(containerd --version | awk '{ print $3 }')
    [[ -z $BEFORE_POOL ]] || daemons="all three"
    notes+=(--note "machine: user-mode Linux guest (kernel $(uname -r), 1 CPU, $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)) on a ${BENCH_HOST_CPUS}-core host (kernel $BENCH_HOST_KERNEL); $daemons daemons and the benchmark client in that one guest")
    notes+=(--note "pools: identical, made the same way: sparse meta and data files ($(bytes_of "$W/devmapper/meta.img") and $(bytes_of "$W/devmapper/data.img") bytes) in one host ext4 directory seen through hostfs, loop devices (buffered, no direct I/O), dm-linear, thin-pool; thinbox's thin-pool table copied: block size (sectors), low water mark (blocks), features = $POOL_PARAMS (block zeroing on unless skip_block_zeroing is listed)")
    notes+=(--note "thinbox: thinboxd release build, snapshot socket only (--no-csi), pool.backend = dm-thin, pool.embedded_size = $BENCH_POOL_SIZE, snapshot.default_size = $BENCH_SNAPSHOT_SIZE, ext4 (mkfs with lazy inode table/journal init), state root on the same host directory, THINBOX_LOG=info,thinbox_blockstore::deleter=debug")
    notes+=(--note "devmapper: containerd $ctrd_version built-in devmapper snapshotter through containerd's main socket (namespace bench, debug log level, root on the same host directory): base_image_size = $BENCH_SNAPSHOT_SIZE, fs_type = ext4 (its mkfs: nodiscard, lazy_itable_init=0, lazy_journal_init=0), async_remove = false, discard_blocks = false; it runs dmsetup and mkfs as processes")
    notes+=(--note "devmapper Remove as measured is containerd's metadata deletion: containerd's garbage collector removes the thin device afterwards, in the background (async_remove = false only makes that removal synchronous within the collector); see the GC line below the table")
    notes+=(--note "thinbox Remove as measured deletes the snapshot's record (unflushed) and queues its device: thinbox's deleter thread removes the thin device afterwards, in the background; see the deleter line below the table")
    targets+=(--target "devmapper=$CONTAINERD_ADDRESS,snapshotter=devmapper,namespace=bench,pid=$CONTAINERD_PID")
    targets+=(--target "thinbox=$W/thinbox.sock,pid=$THINBOX_PID")
    if [[ -n $BEFORE_POOL ]]; then
        notes+=(--note "thinbox-before: the old daemon, thinbox-snapshotter (commit $BENCH_BEFORE, before thinboxd existed), release build, --release-on-exit, pool.backend = dm-thin, pool.embedded_size = $BENCH_POOL_SIZE, snapshot.default_size = $BENCH_SNAPSHOT_SIZE, ext4, state root and embedded pool of its own (pool $BEFORE_POOL, thin-pool table identical to thinbox's) on the same host directory, THINBOX_LOG=info,thinbox_snapshotter::deleter=debug; it takes its turn after thinbox's, and every pool is empty before each turn")
        notes+=(--note "thinbox-before Remove likewise deletes the record (unflushed) and queues the device for its deleter thread (then the snapshotter's, not the block engine's); see deleter-before.txt")
        targets+=(--target "thinbox-before=$W/before.sock,pid=$BEFORE_PID")
    fi
    "$BIN/thinbox-snapshot-bench" \
        "${targets[@]}" \
        --workloads chain,parallel \
        --chain-repeats "$BENCH_CHAIN_REPEATS" \
        --parallel "$BENCH_PARALLEL" --parallel-repeats "$BENCH_PARALLEL_REPEATS" \
        --timeout-secs 600 \
        --settle "bash $REPO/tests/bench/uml-devmapper-bench.sh --settle $DMPOOL $THINBOX_POOL${BEFORE_POOL:+ $BEFORE_POOL}" \
        "${notes[@]}" \
        --markdown "$OUT/snapshot-bench.md" --json "$OUT/snapshot-bench.json" \
        >"$OUT/snapshot-bench.txt" &
    BENCH_PID=$!
    wait "$BENCH_PID" || st=$?
    BENCH_PID=
    cat "$OUT/snapshot-bench.txt"
    (( st == 0 )) || die "thinbox-snapshot-bench failed (status $st)"
}

# containerd removes devmapper thin devices in its background GC: wait for it.
wait_devmapper_gc() {
    local i left
    for (( i = 0; i < BENCH_GC_WAIT * 2; i++ )); do
        left=$(dmsetup ls --target thin | awk -v p="$DMPOOL-snap-" 'index($1, p) == 1' | wc -l)
        (( left == 0 )) && break
        sleep 0.5
    done
    {
        echo "devmapper thin devices left after waiting $((i / 2)) s (at most $BENCH_GC_WAIT s) for containerd's GC once the benchmark ended: $left"
        echo "containerd GC passes that cleaned the devmapper snapshotter (from containerd.log, debug level):"
        grep -F 'snapshot garbage collected' "$W/ctrd/containerd.log" | grep -F 'snapshotter=devmapper' || true
    } >"$OUT/gc.txt"
    (( left == 0 )) || die "containerd's GC left $left devmapper thin devices after ${BENCH_GC_WAIT}s"
    log "devmapper: containerd's GC removed every thin device ($((i / 2)) s after the benchmark ended)"
}

# Thin ids in a live pool (from a metadata snapshot): wait_thinbox_deletions.
thin_ids_of() {
    local pool=$1 meta
    meta=/dev/$(awk -F= '$1 == "DEVNAME" { print $2 }' "/sys/dev/block/$(dm_devno "${pool%-pool}-meta")/uevent")
    local out st=0
    dmsetup message "$pool" 0 reserve_metadata_snap
    out=$(thin_ls --metadata-snap --no-headers -o DEV "$meta") || st=$?
    dmsetup message "$pool" 0 release_metadata_snap
    (( st == 0 )) || die "thin_ls on $meta (pool $pool) failed"
    [[ -z $out ]] || echo "$out"
}

# thinbox deletes removed snapshots' devices in its background deleter; the
# benchmark removes every snapshot it made, so its pool must end up empty.
# wait_thinbox_deletions TARGET POOL LOG OUT_FILE (thinbox-before's alike).
wait_thinbox_deletions() {
    local name=$1 pool=$2 logf=$3 outf=$4 i left
    for (( i = 0; i < BENCH_GC_WAIT * 2; i++ )); do
        left=$(thin_ids_of "$pool") || exit 1
        left=$(grep -c . <<<"$left" || true)
        (( left == 0 )) && break
        sleep 0.5
    done
    {
        echo "$name thin ids left after waiting $((i / 2)) s (at most $BENCH_GC_WAIT s) for its deleter once the benchmark ended: $left"
        echo "$name deleter: devices deleted in the background (from ${logf##*/}, debug level for the deleter):"
        grep -F 'device deleted' "$logf" || true
    } >"$OUT/$outf"
    (( left == 0 )) || die "$name's deleter left $left thin ids after ${BENCH_GC_WAIT}s"
    log "$name: its deleter removed every thin device ($((i / 2)) s after the benchmark ended)"
}

# fio_cell RW QD RAW THIN: one fio process runs BENCH_FIO_ROUNDS rounds on each
# device, one job after the other (stonewall), alternating which device goes
# first, each after a sync; json+ keeps every job's latency histogram so that
# the report can merge the rounds. -> $OUT/fio/RW-qdQD.{fio,json}
fio_cell() {
    local rw=$1 qd=$2 raw=$3 thin=$4 r jobs
    jobs=$OUT/fio/$rw-qd$qd.fio
    {
        cat <<EOF
[global]
direct=1
ioengine=libaio
bs=4k
rw=$rw
iodepth=$qd
size=$(to_bytes "$BENCH_FIO_SIZE")
time_based
runtime=$BENCH_FIO_RUNTIME
ramp_time=$BENCH_FIO_RAMP
randrepeat=0
norandommap
exec_prerun=sync
stonewall
EOF
        for (( r = 1; r <= BENCH_FIO_ROUNDS; r++ )); do
            if (( r % 2 )); then
                printf '[raw-r%d]\nfilename=%s\n[thin-r%d]\nfilename=%s\n' "$r" "$raw" "$r" "$thin"
            else
                printf '[thin-r%d]\nfilename=%s\n[raw-r%d]\nfilename=%s\n' "$r" "$thin" "$r" "$raw"
            fi
        done
    } >"$jobs"
    log "fio $rw qd$qd: $BENCH_FIO_ROUNDS rounds of $BENCH_FIO_RAMP ramp + $BENCH_FIO_RUNTIME on each device"
    # exec_prerun leaves JOB.prerun.txt files in the working directory.
    (cd "$W/fio" && fio --output-format=json+ --output="$OUT/fio/$rw-qd$qd.json" "$jobs")
    grep -q '"error" : 0' "$OUT/fio/$rw-qd$qd.json" || die "fio $rw qd$qd: no result"
    if grep -q '"error" : [1-9]' "$OUT/fio/$rw-qd$qd.json"; then die "fio $rw qd$qd: a job failed"; fi
}

thin_used_blocks() { dmsetup status "$FIOPOOL" | awk '{ split($6, a, "/"); print a[1] }'; }

run_fio() {
    local d=$W/fio thin raw used0 used1 rw qd size
    size=$(to_bytes "$BENCH_FIO_SIZE")
    mkdir -p "$d" "$OUT/fio"
    # The fio pool: meta size as thinbox sizes it (data/1000, at least 64 MiB).
    local data_bytes meta_bytes
    truncate -s "$(to_bytes "$BENCH_FIO_POOL_SIZE")" "$d/data.img"
    data_bytes=$(bytes_of "$d/data.img")
    meta_bytes=$(( data_bytes / 1000 )); (( meta_bytes >= 64 << 20 )) || meta_bytes=$((64 << 20))
    meta_bytes=$(( (meta_bytes + (1 << 20) - 1) / (1 << 20) * (1 << 20) ))
    truncate -s "$meta_bytes" "$d/meta.img"
    truncate -s "$data_bytes" "$d/raw.img"
    make_pool "$FIOPOOL" "$d/meta.img" "$d/data.img"
    dmsetup message "$FIOPOOL" 0 "create_thin 0"
    dmsetup create "$FIOPOOL-thin" --table "0 $(( $(to_bytes "$BENCH_SNAPSHOT_SIZE") / 512 )) thin $(dm_devno "$FIOPOOL") 0"
    thin=/dev/mapper/$FIOPOOL-thin
    raw=$(losetup -f --show "$d/raw.img"); OUR_LOOPS+=("$raw")
    {
        echo "# fio pool ($FIOPOOL) and thin device"
        dmsetup table | grep -F "$FIOPOOL" | sort
        echo "# raw: $raw over $d/raw.img ($(bytes_of "$d/raw.img") bytes), dio=$(cat "/sys/block/${raw#/dev/}/loop/dio")"
    } >>"$OUT/pools.txt"

    # Provision / fill the region once on both (zeroing on: a first write to an
    # unprovisioned block costs more; full-block sequential writes skip it).
    log "fio: writing the ${BENCH_FIO_SIZE} region of both devices once"
    fio --name=fill-raw --filename="$raw" --direct=1 --ioengine=libaio --iodepth=4 --rw=write --bs=1M --size="$size" --output-format=json --output="$OUT/fio/fill-raw.json"
    fio --name=fill-thin --filename="$thin" --direct=1 --ioengine=libaio --iodepth=4 --rw=write --bs=1M --size="$size" --output-format=json --output="$OUT/fio/fill-thin.json"
    used0=$(thin_used_blocks)

    # Loops without direct I/O (as thinbox's pool loops) read their files
    # through the guest's page cache: start both devices from the same state,
    # their regions read once into a cache emptied of everything else.
    sync
    echo 3 >/proc/sys/vm/drop_caches
    fio --name=warm-raw --filename="$raw" --direct=1 --ioengine=libaio --iodepth=4 --rw=read --bs=1M --size="$size" --output-format=json --output="$OUT/fio/warm-raw.json"
    fio --name=warm-thin --filename="$thin" --direct=1 --ioengine=libaio --iodepth=4 --rw=read --bs=1M --size="$size" --output-format=json --output="$OUT/fio/warm-thin.json"
    {
        echo "# page cache of the backing files before the measurements (fincore):"
        fincore "$d/raw.img" "$d/data.img" "$d/meta.img"
        grep -E '^(MemTotal|MemFree|Cached|Dirty):' /proc/meminfo
    } >>"$OUT/pools.txt"

    for rw in randread randwrite; do
        for qd in 1 16; do
            fio_cell "$rw" "$qd" "$raw" "$thin"
        done
    done
    used1=$(thin_used_blocks)
    echo "# fio pool data blocks used after the fill: $used0; after the measurements: $used1" >>"$OUT/pools.txt"
    [[ $used0 == "$used1" ]] || log "WARNING: the fio pool provisioned blocks during the measurements ($used0 -> $used1)"
    python3 - "$OUT/fio/env.json" "$raw" "$thin" "$data_bytes" "$meta_bytes" "$used0" "$used1" <<'PY'
import json, sys
out, raw, thin, data, meta, u0, u1 = sys.argv[1:]
json.dump({"raw_device": raw, "thin_device": thin, "data_bytes": int(data), "meta_bytes": int(meta),
           "used_blocks_after_fill": int(u0), "used_blocks_after_run": int(u1)}, open(out, "w"), indent=2)
PY

    dmsetup remove --retry "$FIOPOOL-thin"
    dmsetup message "$FIOPOOL" 0 "delete 0"
    remove_pool "$FIOPOOL"
    losetup -d "$raw"
}

# Everything we attached or created, gone? Prints what is left.
leftovers() {
    local l
    l=$(dmsetup ls 2>/dev/null | grep -v '^No devices found' || true)
    [[ -z $l ]] || printf 'dm devices:\n%s\n' "$l"
    l=$(losetup -a 2>/dev/null || true)
    [[ -z $l ]] || printf 'loop devices:\n%s\n' "$l"
    l=$(findmnt -rn -o SOURCE,TARGET 2>/dev/null | grep -E "$W|/dev/mapper/|/dev/dm-|/dev/loop" || true)
    [[ -z $l ]] || printf 'mounts:\n%s\n' "$l"
}

# shellcheck disable=SC2317 # invoked by the EXIT trap
guest_cleanup() {
    local st=$? left l
    [[ -z $CLEANED ]] || return 0
    CLEANED=1
    trap - EXIT INT TERM
    stop_client "$BENCH_PID"
    stop_thinbox || { log "ERROR: thinboxd had to be killed"; st=1; }
    stop_before || { log "ERROR: thinbox-snapshotter had to be killed"; st=1; }
    # thinbox releases its pool on exit (--release-on-exit): nothing of it may stay.
    if [[ -n ${THINBOX_POOL:-} ]] && dmsetup info "$THINBOX_POOL" >/dev/null 2>&1; then
        log "ERROR: thinbox left its pool $THINBOX_POOL after exiting"
        st=1
        remove_pool "${THINBOX_POOL%-pool}"
    fi
    if [[ -n ${BEFORE_POOL:-} ]] && dmsetup info "$BEFORE_POOL" >/dev/null 2>&1; then
        log "ERROR: thinbox-before left its pool $BEFORE_POOL after exiting"
        st=1
        remove_pool "${BEFORE_POOL%-pool}"
    fi
    if [[ -n $CTRD_STARTED ]]; then
        containerd_stop || st=1
    fi
    [[ -f $W/thinbox.log ]] && cp "$W/thinbox.log" "$OUT/thinbox.log"
    [[ -f $W/thinbox-before.log ]] && cp "$W/thinbox-before.log" "$OUT/thinbox-before.log"
    [[ -f $W/ctrd/containerd.log ]] && cp "$W/ctrd/containerd.log" "$OUT/containerd.log"
    # Ours to tear down: containerd does not remove its pool (an admin's).
    remove_pool "$DMPOOL"
    if dmsetup info "$FIOPOOL-thin" >/dev/null 2>&1; then dmsetup remove --retry "$FIOPOOL-thin" || true; fi
    remove_pool "$FIOPOOL"
    for l in "${OUR_LOOPS[@]}"; do
        if losetup "$l" 2>/dev/null | grep -qF "$W/"; then losetup -d "$l" || true; fi
    done
    left=$(leftovers)
    if [[ -n $left ]]; then
        log "ERROR: left behind in the guest:"
        echo "$left" >&2
        st=1
    else
        log "teardown clean: no dm devices, no loop devices, no mounts"
    fi
    exit "$st"
}

guest_main() {
    [[ -n ${THINBOX_UML:-} ]] || die "--inside runs only inside UML (tests/uml/run-in-uml.sh)"
    W=${BENCH_WORK:?} OUT=${BENCH_OUT:?} BIN=$BENCH_WORK/bin
    # shellcheck source=tests/lib/containerd.sh
    source "$REPO/tests/lib/containerd.sh"
    trap guest_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    local left l
    left=$(leftovers)
    [[ -z $left ]] || die "the guest is not clean before the run: $left"
    mkdir -p "$OUT"

    start_thinbox
    [[ -z ${BENCH_BEFORE:-} ]] || start_before
    make_devmapper_pool
    start_containerd
    run_snapshot_bench
    wait_thinbox_deletions thinbox "$THINBOX_POOL" "$W/thinbox.log" deleter.txt
    [[ -z $BEFORE_POOL ]] || wait_thinbox_deletions thinbox-before "$BEFORE_POOL" "$W/thinbox-before.log" deleter-before.txt
    wait_devmapper_gc

    # Done with the daemons: the fio part runs on a quiet guest.
    stop_thinbox || die "thinboxd had to be killed"
    if dmsetup info "$THINBOX_POOL" >/dev/null 2>&1; then die "thinbox left its pool $THINBOX_POOL after exiting"; fi
    if [[ -n $BEFORE_POOL ]]; then
        stop_before || die "thinbox-snapshotter had to be killed"
        if dmsetup info "$BEFORE_POOL" >/dev/null 2>&1; then die "thinbox-before left its pool $BEFORE_POOL after exiting"; fi
    fi
    containerd_stop || die "containerd did not stop cleanly"
    CTRD_STARTED=
    remove_pool "$DMPOOL"
    for l in "${OUR_LOOPS[@]}"; do
        if losetup "$l" 2>/dev/null | grep -qF "$W/devmapper/"; then losetup -d "$l"; fi
    done
    OUR_LOOPS=()
    left=$(leftovers)
    [[ -z $left ]] || die "left behind after stopping the daemons: $left"
    cp "$W/thinbox.log" "$OUT/thinbox.log"
    [[ -z $BEFORE_POOL ]] || cp "$W/thinbox-before.log" "$OUT/thinbox-before.log"
    cp "$W/ctrd/containerd.log" "$OUT/containerd.log"
    # The pools' files (and their page cache) are not needed any more.
    rm -f "$W/thinbox/thin/meta.img" "$W/thinbox/thin/data.img" "$W/devmapper/meta.img" "$W/devmapper/data.img" \
        "$W/before/thin/meta.img" "$W/before/thin/data.img"

    run_fio
    python3 - "$OUT/env.json" <<PY
import json, sys
json.dump({"date": "$BENCH_DATE", "host_kernel": "$BENCH_HOST_KERNEL", "host_cpus": int("$BENCH_HOST_CPUS"),
           "guest_kernel": "$(uname -r)", "guest_cpus": $(nproc),
           "guest_mem_kib": $(awk '/MemTotal/ { print $2 }' /proc/meminfo),
           "containerd": "$(containerd --version | awk '{ print $3 }')", "fio": "$(fio --version)",
           "pool_size": "$BENCH_POOL_SIZE", "snapshot_size": "$BENCH_SNAPSHOT_SIZE", "pool_params": "$POOL_PARAMS",
           "fio_rounds": int("$BENCH_FIO_ROUNDS"), "fio_runtime": "$BENCH_FIO_RUNTIME", "fio_ramp": "$BENCH_FIO_RAMP",
           "fio_size": "$BENCH_FIO_SIZE", "fio_pool_size": "$BENCH_FIO_POOL_SIZE"},
          open(sys.argv[1], "w"), indent=2)
PY
}

# --settle DMPOOL THINBOX_POOL [BEFORE_POOL], run by thinbox-snapshot-bench
# after each target's turn (unmeasured): waits until no pool holds a thin
# device, so that one daemon's background cleanup (containerd's GC, thinbox's
# deleter) never runs during another's measurements on the guest's one CPU.
# Each turn removes everything it made, so every pool ends it empty.
settle_main() {
    local dmpool=$1 tpool=$2 bpool=${3:-} t0 i ids dm tb bb=0 left
    t0=$(date +%s.%N)
    for (( i = 0; i < BENCH_GC_WAIT * 4; i++ )); do
        ids=$(thin_ids_of "$dmpool") || exit 1
        dm=$(grep -c . <<<"$ids" || true)
        ids=$(thin_ids_of "$tpool") || exit 1
        tb=$(grep -c . <<<"$ids" || true)
        if [[ -n $bpool ]]; then
            ids=$(thin_ids_of "$bpool") || exit 1
            bb=$(grep -c . <<<"$ids" || true)
        fi
        (( dm == 0 && tb == 0 && bb == 0 )) && break
        sleep 0.25
    done
    left="devmapper $dm, thinbox $tb${bpool:+, thinbox-before $bb}"
    echo "after ${TBB_WORKLOAD:-?} on ${TBB_TARGET:-?}: pools empty after $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s (left: $left)" >>"$BENCH_OUT/settle.txt"
    (( dm == 0 && tb == 0 && bb == 0 )) || die "thin devices left ${BENCH_GC_WAIT}s after ${TBB_TARGET:-?}'s turn: $left"
}

if [[ ${1:-} == --inside ]]; then
    guest_main
elif [[ ${1:-} == --settle ]]; then
    settle_main "$2" "$3" "${4:-}"
else
    [[ $# == 0 ]] || die "no arguments (see the header for the environment variables)"
    host_main
fi
