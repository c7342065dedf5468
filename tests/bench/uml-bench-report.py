#!/usr/bin/env python3
"""Summary of a tests/bench/uml-devmapper-bench.sh run.

    python3 tests/bench/uml-bench-report.py OUT_DIR

Reads OUT_DIR/snapshot-bench.json, OUT_DIR/fio/*.json, OUT_DIR/env.json,
OUT_DIR/fio/env.json, OUT_DIR/gc.txt and OUT_DIR/deleter.txt (and, when the run
had the third target thinbox-before, OUT_DIR/deleter-before.txt); writes
OUT_DIR/fio.json, fio.md, summary.md (the final tables with the targets; with
thinbox-before also a before/after table: thinbox-before / devmapper and
thinbox / thinbox-before) and uml-bench.md (summary, configuration and the full
snapshot table, for docs/benchmarks.md). Fails if an input is missing or
malformed.
"""

import json
import re
import sys
from pathlib import Path

# Targets of the issue.
SNAPSHOT_TARGET = 0.10  # thinbox latency <= 1/10 of devmapper's
FIO_TARGET = 0.95  # thin IOPS >= 95% of raw
SNAPSHOT_OPS = [("chain", "prepare"), ("chain", "commit"), ("chain", "remove"),
                ("parallel", "prepare"), ("parallel", "remove")]
# The optional third target: the old daemon (thinbox-snapshotter).
BEFORE = "thinbox-before"


def fmt(v):
    """Three significant digits, like thinbox-snapshot-bench."""
    if v is None:
        return "n/a"
    a = abs(v)
    if a >= 100:
        return f"{v:.1f}"
    if a >= 10:
        return f"{v:.2f}"
    return f"{v:.3f}"


def ratio(v):
    return "n/a" if v is None else f"{v:.2f}×"


def go_duration_ms(s):
    """Go's time.Duration.String() -> milliseconds."""
    units = {"h": 3.6e6, "m": 6e4, "s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3, "μs": 1e-3, "ns": 1e-6}
    total = 0.0
    parts = re.findall(r"([0-9.]+)(h|ms|m|s|us|µs|μs|ns)", s)
    if not parts or "".join(n + u for n, u in parts) != s:
        raise ValueError(f"not a Go duration: {s!r}")
    for num, unit in parts:
        total += float(num) * units[unit]
    return total


def div(a, b):
    return a / b if a is not None and b else None


def snapshot_rows(report, before):
    rows = {}
    for r in report["rows"]:
        rows[(r["workload"], r["op"], r["target"])] = r
    out = []
    for workload, op in SNAPSHOT_OPS:
        d = rows.get((workload, op, "devmapper"))
        t = rows.get((workload, op, "thinbox"))
        if d is None or t is None or d["summary"] is None or t["summary"] is None:
            raise SystemExit(f"snapshot-bench.json: no {workload}/{op} numbers for both targets")
        rm, rp = t["ratio_median"], t["ratio_p99"]
        extra = {}
        if before:
            b = rows.get((workload, op, BEFORE))
            if b is None or b["summary"] is None:
                raise SystemExit(f"snapshot-bench.json: no {workload}/{op} numbers for {BEFORE}")
            extra = {
                "before_median_ms": b["summary"]["median"], "before_p99_ms": b["summary"]["p99"],
                "before_n": b["summary"]["n"],
                # ratios against devmapper, as thinbox-snapshot-bench computed them
                "before_ratio_median": b["ratio_median"], "before_ratio_p99": b["ratio_p99"],
                # after / before
                "after_before_median": div(t["summary"]["median"], b["summary"]["median"]),
                "after_before_p99": div(t["summary"]["p99"], b["summary"]["p99"]),
            }
        out.append({**extra,
            "workload": workload, "op": op,
            "devmapper_median_ms": d["summary"]["median"], "devmapper_p99_ms": d["summary"]["p99"],
            "thinbox_median_ms": t["summary"]["median"], "thinbox_p99_ms": t["summary"]["p99"],
            "n": t["summary"]["n"],
            "ratio_median": rm, "ratio_p99": rp,
            "met_median": rm is not None and rm <= SNAPSHOT_TARGET,
            "met_p99": rp is not None and rp <= SNAPSHOT_TARGET,
        })
    return out


def remove_floor(report, workload, before):
    """Medians of `remove missing` (a Remove of a key that never existed) in
    `workload`, per target: the round trip with no work behind it."""
    out = {}
    for r in report["rows"]:
        if r["workload"] == workload and r["op"] == "remove missing" and r["summary"]:
            out[r["target"]] = r["summary"]["median"]
    want = {"devmapper", "thinbox"} | ({BEFORE} if before else set())
    if set(out) != want:
        raise SystemExit(f"snapshot-bench.json: no {workload}/remove missing numbers for {', '.join(sorted(want))}")
    return out


def fio_jobs(path):
    """A cell's fio json+ output -> {job name: (iops, runtime s, {latency ns: count})}."""
    doc = json.loads(path.read_text())
    opts = doc["global options"]
    if opts.get("ioengine") != "libaio" or opts.get("direct") != "1":
        raise SystemExit(f"{path}: expected ioengine=libaio direct=1, got {opts}")
    side = "read" if "read" in opts["rw"] else "write"
    jobs = {}
    for job in doc["jobs"]:
        if job["error"] != 0:
            raise SystemExit(f"{path}: fio job {job['jobname']} error {job['error']}")
        st = job[side]
        bins = {int(k): v for k, v in st["clat_ns"].get("bins", {}).items()}
        if not bins:
            raise SystemExit(f"{path}: no latency histogram (run fio with --output-format=json+)")
        jobs[job["jobname"]] = (st["iops"], st["runtime"] / 1000.0, bins)
    return jobs


def percentile(bins, p):
    """Nearest-rank percentile of a merged {value: count} histogram."""
    total = sum(bins.values())
    rank = max(1, -(-total * p // 100))
    seen = 0
    for value in sorted(bins):
        seen += bins[value]
        if seen >= rank:
            return value
    return max(bins)


def fio_side(jobs, device):
    rounds = sorted((name for name in jobs if name.startswith(device + "-r")), key=lambda n: int(n.split("-r")[1]))
    if not rounds:
        raise SystemExit(f"no fio results for {device}")
    merged, ios, secs, per_round = {}, 0.0, 0.0, []
    for name in rounds:
        iops, runtime, bins = jobs[name]
        per_round.append(iops)
        ios += iops * runtime
        secs += runtime
        for k, v in bins.items():
            merged[k] = merged.get(k, 0) + v
    return {"iops": ios / secs, "seconds": secs, "rounds": per_round,
            "p50_us": percentile(merged, 50) / 1000.0, "p99_us": percentile(merged, 99) / 1000.0}


def fio_cells(fio_dir):
    cells = []
    for rw in ("randread", "randwrite"):
        for qd in (1, 16):
            jobs = fio_jobs(fio_dir / f"{rw}-qd{qd}.json")
            raw = fio_side(jobs, "raw")
            thin = fio_side(jobs, "thin")
            ir = thin["iops"] / raw["iops"] if raw["iops"] > 0 else None
            lr = thin["p99_us"] / raw["p99_us"] if raw["p99_us"] > 0 else None
            per_round = [t / r for t, r in zip(thin["rounds"], raw["rounds"]) if r > 0]
            cells.append({
                "rw": rw, "iodepth": qd, "ioengine": "libaio",
                "raw_iops": raw["iops"], "thin_iops": thin["iops"], "iops_ratio": ir,
                "raw_p99_us": raw["p99_us"], "thin_p99_us": thin["p99_us"], "p99_ratio": lr,
                "raw_p50_us": raw["p50_us"], "thin_p50_us": thin["p50_us"],
                "raw_seconds": raw["seconds"], "thin_seconds": thin["seconds"],
                "raw_round_iops": raw["rounds"], "thin_round_iops": thin["rounds"],
                "round_ratio_min": min(per_round), "round_ratio_max": max(per_round),
                "round_ratio_median": sorted(per_round)[len(per_round) // 2] if len(per_round) % 2
                else sum(sorted(per_round)[len(per_round) // 2 - 1:len(per_round) // 2 + 1]) / 2,
            })
            med = cells[-1]["round_ratio_median"]
            # Host noise (other work preempting the single-CPU guest) hits
            # single rounds: the verdict needs the merged IOPS and the median
            # of the paired rounds to agree.
            if ir is not None and ir >= FIO_TARGET and med >= FIO_TARGET:
                cells[-1]["verdict"] = "yes"
            elif ir is not None and ir < FIO_TARGET and med < FIO_TARGET:
                cells[-1]["verdict"] = "no"
            else:
                cells[-1]["verdict"] = "unclear"
    return cells


def gc_summary(gc_txt):
    ds = []
    for line in gc_txt.splitlines():
        m = re.search(r"\bd=([0-9.]+[a-zµμ]+)", line)
        if m and "snapshot garbage collected" in line:
            ds.append(go_duration_ms(m.group(1)))
    return ds


def deleter_summary(deleter_txt):
    """thinbox's background deletions (milliseconds each), from its deleter's debug lines."""
    ds = []
    for line in deleter_txt.splitlines():
        m = re.search(r"\belapsed_us=([0-9]+)", line)
        if m and "device deleted" in line:
            ds.append(int(m.group(1)) / 1000.0)
    return ds


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    report = json.loads((out / "snapshot-bench.json").read_text())
    env = json.loads((out / "env.json").read_text())
    fio_env = json.loads((out / "fio" / "env.json").read_text())
    gc_txt = (out / "gc.txt").read_text()
    deletions = deleter_summary((out / "deleter.txt").read_text())
    load = (out / "host-load.txt").read_text().split()
    # Line 1: thinbox's commit; with thinbox-before, "thinbox-before: COMMIT".
    source_lines = (out / "source.txt").read_text().strip().splitlines()
    source = source_lines[0].strip()
    targets = [t["name"] for t in report["targets"]]
    if targets not in (["devmapper", "thinbox"], ["devmapper", "thinbox", BEFORE]):
        raise SystemExit(f"snapshot-bench.json: unexpected targets {targets}")
    before = BEFORE in targets
    before_source = None
    if before:
        before_source = next((line.split(":", 1)[1].strip() for line in source_lines[1:]
                              if line.startswith(BEFORE + ":")), None)
        if before_source is None:
            raise SystemExit(f"source.txt: no '{BEFORE}: COMMIT' line for the {BEFORE} target")
        before_deletions = deleter_summary((out / "deleter-before.txt").read_text())

    snaps = snapshot_rows(report, before)
    cells = fio_cells(out / "fio")
    gcs = gc_summary(gc_txt)
    (out / "fio.json").write_text(json.dumps({"env": fio_env, "cells": cells}, indent=2) + "\n")

    params = env["pool_params"].split()
    block_kib = int(params[0]) * 512 // 1024
    features = params[3:3 + int(params[2])]
    pool_desc = (f"thin-pool table `{env['pool_params']}`: {block_kib} KiB blocks, low water mark {params[1]} blocks, "
                 f"{', '.join(features) or 'no features'}, zeroing "
                 f"{'off' if 'skip_block_zeroing' in features else 'on'}")
    s = []
    s.append(f"Thinbox (commit {source}) on dm-thin vs containerd {env['containerd']} devmapper, one user-mode Linux guest "
             f"(kernel {env['guest_kernel']}, {env['guest_cpus']} CPU) on a {env['host_cpus']}-core host "
             f"(kernel {env['host_kernel']}; 1-minute load average {load[0]} at the start, {load[1]} at the end"
             f"{': other work was running' if max(map(float, load)) > 1.2 else ''}), {env['date']}. Identical thin pools ({pool_desc}; "
             f"{env['pool_size']} data, loop devices over sparse files on the host's ext4), {env['snapshot_size']} "
             f"ext4 snapshots on {'all three' if before else 'both'}. Target: thinbox ≤ {SNAPSHOT_TARGET:.2f}× devmapper's latency."
             + (f" Third target, in the same guest and pool setup: {BEFORE} = the old daemon thinbox-snapshotter "
                f"(commit {before_source}), for before/after ratios (table after the first)." if before else ""))
    s.append("")
    s.append("| workload | op | devmapper median ms | thinbox median ms | thinbox / devmapper (median) "
             "| devmapper p99 ms | thinbox p99 ms | thinbox / devmapper (p99) | n | ≤ 0.10× (median / p99) |")
    s.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in snaps:
        met = f"{'yes' if r['met_median'] else '**no**'} / {'yes' if r['met_p99'] else '**no**'}"
        s.append(f"| {r['workload']} | {r['op']} | {fmt(r['devmapper_median_ms'])} | {fmt(r['thinbox_median_ms'])} "
                 f"| {ratio(r['ratio_median'])} | {fmt(r['devmapper_p99_ms'])} | {fmt(r['thinbox_p99_ms'])} "
                 f"| {ratio(r['ratio_p99'])} | {r['n']} | {met} |")
    s.append("")
    if before:
        s.append(f"Before/after: {BEFORE} (thinbox-snapshotter, commit {before_source}) vs thinbox (commit {source}), "
                 f"same run; ratios below 1× on thinbox / {BEFORE} mean thinbox is faster.")
        s.append("")
        s.append(f"| workload | op | {BEFORE} median ms | thinbox median ms | {BEFORE} / devmapper (median) "
                 f"| thinbox / {BEFORE} (median) | {BEFORE} p99 ms | thinbox p99 ms | {BEFORE} / devmapper (p99) "
                 f"| thinbox / {BEFORE} (p99) | n |")
        s.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in snaps:
            s.append(f"| {r['workload']} | {r['op']} | {fmt(r['before_median_ms'])} | {fmt(r['thinbox_median_ms'])} "
                     f"| {ratio(r['before_ratio_median'])} | {ratio(r['after_before_median'])} "
                     f"| {fmt(r['before_p99_ms'])} | {fmt(r['thinbox_p99_ms'])} "
                     f"| {ratio(r['before_ratio_p99'])} | {ratio(r['after_before_p99'])} | {r['before_n']} |")
        s.append("")
    s.append("The floor under a Remove: Removes of keys that never existed (NOT_FOUND, no work behind them; "
             "in a chain one before each layer's Remove, in parallel as many at once before the containers' "
             "Removes), medians:")
    for workload, label in (("chain", "chain"), ("parallel", f"{report['config']['parallel']} at once")):
        floor = remove_floor(report, workload, before)
        real = next(r for r in snaps if (r["workload"], r["op"]) == (workload, "remove"))
        on_before = f", {fmt(floor[BEFORE])} ms on {BEFORE}" if before else ""
        s.append(f"* {label}: {fmt(floor['thinbox'])} ms on thinbox{on_before}, {fmt(floor['devmapper'])} ms on devmapper. "
                 f"Thinbox's no-op alone is {ratio(floor['thinbox'] / real['devmapper_median_ms'])} of "
                 f"devmapper's Remove; thinbox's Remove costs "
                 f"{fmt(real['thinbox_median_ms'] - floor['thinbox'])} ms above it.")
    s.append("")
    cfg = report["config"]
    # Every devmapper snapshot the run made: chains (layers + view), parallel
    # rounds (3-layer image + containers), the warm-up.
    devices = (cfg["chain_repeats"] * (cfg["chain_layers"] + 1)
               + cfg["parallel_repeats"] * (cfg["parallel"] + 3) + 1)
    if gcs:
        per_device = sum(gcs) / devices
        s.append(f"devmapper Remove above is containerd's metadata deletion; its garbage collector then removed "
                 f"the {devices} thin devices in the background (holding the snapshotter's lock, which delays "
                 f"Prepare/Commit/Remove calls arriving meanwhile): {len(gcs)} GC passes, {fmt(sum(gcs) / 1000)} s "
                 f"in total, ≈ {fmt(per_device)} ms per device (median pass {fmt(sorted(gcs)[len(gcs) // 2])} ms, "
                 f"longest {fmt(max(gcs))} ms).")
    else:
        per_device = None
        s.append("devmapper Remove above is containerd's metadata deletion; no GC pass of the devmapper "
                 "snapshotter was logged.")
    if not deletions:
        raise SystemExit("deleter.txt: no background deletion of thinbox logged")
    s.append("")
    ds = sorted(deletions)
    per = f" (≈ {ratio(ds[len(ds) // 2] / per_device)} of devmapper's per-device GC cost)" if per_device else ""
    s.append(f"thinbox's Remove likewise deletes only its record (without a flush) and queues the device; its "
             f"deleter thread removed the {len(ds)} thin devices in the background, one at a time without "
             f"blocking other calls: {fmt(sum(ds) / 1000)} s in total, median {fmt(ds[len(ds) // 2])} ms per "
             f"device{per}, longest {fmt(ds[-1])} ms.")
    s.append("")
    if before:
        if not before_deletions:
            raise SystemExit(f"deleter-before.txt: no background deletion of {BEFORE} logged")
        bs = sorted(before_deletions)
        s.append(f"{BEFORE}'s deleter thread likewise removed its {len(bs)} thin devices in the background: "
                 f"{fmt(sum(bs) / 1000)} s in total, median {fmt(bs[len(bs) // 2])} ms per device "
                 f"(thinbox / {BEFORE}: {ratio(ds[len(ds) // 2] / bs[len(bs) // 2])}), longest {fmt(bs[-1])} ms.")
        s.append("")
    s.append(f"fio, 4k random, direct I/O, {cells[0]['ioengine']}, per cell and device {env['fio_rounds']} rounds of "
             f"{env['fio_runtime']} (after {env['fio_ramp']} ramp each) alternating with the other device, merged "
             f"(IOPS over the whole time, p99 of completion latency over all I/Os; \"paired\" = median and range of "
             f"the per-round thin/raw IOPS ratios), over the first {env['fio_size']} "
             f"of each device, written once beforehand: "
             f"thin = a thin device in a thin pool made like thinbox's (64 KiB blocks, zeroing on); raw = a loop "
             f"device over a {env['fio_pool_size']} sparse file like the pool's data file. Target: thin ≥ "
             f"{FIO_TARGET:.0%} of raw IOPS: \"yes\"/\"no\" when the merged and the paired ratio agree, "
             f"\"unclear\" when host noise leaves them on both sides of it.")
    s.append("")
    s.append("| workload | iodepth | raw IOPS | thin IOPS | thin / raw (IOPS) | paired: median (min–max) | raw p99 µs "
             "| thin p99 µs | thin / raw (p99) | ≥ 95% |")
    s.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for c in cells:
        s.append(f"| {c['rw']} | {c['iodepth']} | {c['raw_iops']:.0f} | {c['thin_iops']:.0f} "
                 f"| {c['iops_ratio']:.1%} | {c['round_ratio_median']:.1%} ({c['round_ratio_min']:.0%}–{c['round_ratio_max']:.0%}) "
                 f"| {fmt(c['raw_p99_us'])} | {fmt(c['thin_p99_us'])} "
                 f"| {ratio(c['p99_ratio'])} | {c['verdict'] if c['verdict'] != 'no' else '**no**'} |")
    s.append("")
    met_snap = [f"{r['workload']} {r['op']}" for r in snaps if r["met_median"]]
    miss_snap = [f"{r['workload']} {r['op']} ({ratio(r['ratio_median'])})" for r in snaps if not r["met_median"]]
    fio_by = {v: [f"{c['rw']} qd{c['iodepth']} ({c['iops_ratio']:.1%} merged, {c['round_ratio_median']:.1%} paired)"
                  for c in cells if c["verdict"] == v] for v in ("yes", "no", "unclear")}
    s.append("Targets: Prepare/Commit/Remove medians thinbox ≤ 0.10× devmapper — "
             + (f"met for {', '.join(met_snap)}" if met_snap else "met for none")
             + (f"; **not met** for {', '.join(miss_snap)}" if miss_snap else "; met for all")
             + ". fio thin ≥ 95% of raw IOPS — "
             + "; ".join(f"{label} for {', '.join(fio_by[v])}" for v, label in
                         (("yes", "met"), ("no", "**not met**"), ("unclear", "unclear")) if fio_by[v])
             + ".")
    summary = "\n".join(s) + "\n"
    (out / "summary.md").write_text(summary)

    f = ["| workload | iodepth | device | IOPS | IOPS per round | p50 µs | p99 µs | seconds |",
         "|---|---:|---|---:|---|---:|---:|---:|"]
    for c in cells:
        for dev in ("raw", "thin"):
            rounds = ", ".join(f"{v:.0f}" for v in c[dev + "_round_iops"])
            f.append(f"| {c['rw']} | {c['iodepth']} | {dev} | {c[dev + '_iops']:.0f} | {rounds} "
                     f"| {fmt(c[dev + '_p50_us'])} | {fmt(c[dev + '_p99_us'])} | {c[dev + '_seconds']:.0f} |")
    (out / "fio.md").write_text("\n".join(f) + "\n")

    full = [summary, (out / "snapshot-bench.md").read_text(), "#### fio, per device\n", "\n".join(f) + "\n"]
    (out / "uml-bench.md").write_text("\n".join(full))


if __name__ == "__main__":
    main()
