//! The one table of a run: each daemon's memory (medians over the rounds,
//! each side's sum) and each CSI call's latency per target, with ratios
//! against the first side and the first target.

use std::fmt::Write as _;

use thinbox_bench_stats::{format_ratio, format_value, summarize};

use crate::calls::{CallTimes, OPS};
use crate::memory::Reading;

const KIB_PER_MIB: f64 = 1024.0;

/// The figures of a reading: VmRSS, VmHWM, RssAnon, Pss (MiB), threads.
fn figures(r: &Reading) -> [f64; 5] {
    let m = |k: u64| k as f64 / KIB_PER_MIB;
    [m(r.vm_rss_kib), m(r.vm_hwm_kib), m(r.rss_anon_kib), m(r.pss_kib), r.threads as f64]
}

fn unique<'a>(items: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// Median of each figure over `rows` (one per round).
fn medians(rows: &[[f64; 5]]) -> [f64; 5] {
    std::array::from_fn(|i| summarize(&rows.iter().map(|r| r[i]).collect::<Vec<_>>()).map_or(f64::NAN, |s| s.median))
}

/// The memory table. Groups (sides) in order of appearance, the first the
/// baseline; a group of several processes gets a row with their sum (summed
/// per round, then the median taken).
pub fn memory_table(readings: &[Reading]) -> String {
    let mut out = String::new();
    let groups = unique(readings.iter().map(|r| r.group.as_str()));
    out.push_str("| side | process | VmRSS MiB | VmHWM MiB | RssAnon MiB | Pss MiB | threads | rounds |\n|---|---|---:|---:|---:|---:|---:|---:|\n");
    let mut totals: Vec<(&str, [f64; 5])> = Vec::new();
    for group in &groups {
        let mine: Vec<&Reading> = readings.iter().filter(|r| r.group == *group).collect();
        let names = unique(mine.iter().map(|r| r.name.as_str()));
        for name in &names {
            let rows: Vec<[f64; 5]> = mine.iter().filter(|r| r.name == *name).map(|r| figures(r)).collect();
            let m = medians(&rows);
            let _ = writeln!(
                out,
                "| {group} | {name} | {} | {} | {} | {} | {} | {} |",
                format_value(m[0]),
                format_value(m[1]),
                format_value(m[2]),
                format_value(m[3]),
                m[4],
                rows.len()
            );
        }
        let round_ids = unique_rounds(&mine);
        let sums: Vec<[f64; 5]> = round_ids
            .iter()
            .map(|round| {
                mine.iter().filter(|r| r.round == *round).map(|r| figures(r)).fold([0.0; 5], |acc, f| std::array::from_fn(|i| acc[i] + f[i]))
            })
            .collect();
        let m = medians(&sums);
        if names.len() > 1 {
            let _ = writeln!(
                out,
                "| {group} | **sum of {}** | **{}** | **{}** | **{}** | **{}** | **{}** | {} |",
                names.len(),
                format_value(m[0]),
                format_value(m[1]),
                format_value(m[2]),
                format_value(m[3]),
                m[4],
                sums.len()
            );
        }
        totals.push((group, m));
    }
    if let Some((base_name, base)) = totals.first().copied() {
        for (group, m) in totals.iter().skip(1) {
            let _ = writeln!(
                out,
                "| {group} / {base_name} | | {} | {} | {} | {} | {} | |",
                format_ratio(m[0], base[0]),
                format_ratio(m[1], base[1]),
                format_ratio(m[2], base[2]),
                format_ratio(m[3], base[3]),
                format_ratio(m[4], base[4])
            );
        }
    }
    out
}

fn unique_rounds(readings: &[&Reading]) -> Vec<u32> {
    let mut out: Vec<u32> = readings.iter().map(|r| r.round).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The call table: per call, each target's median and p90 (ms) and its
/// ratio to the first target.
pub fn calls_table(times: &CallTimes) -> String {
    let mut out = String::new();
    out.push_str(
        "| call | target | median ms | p90 ms | min ms | max ms | n | median ratio | p90 ratio |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let empty = Default::default();
    for op in OPS {
        let mut base = None;
        for t in &times.targets {
            let samples = times.samples.get(&t.name).and_then(|per| per.get(op)).unwrap_or(&empty);
            let Some(s) = summarize(samples) else {
                let _ = writeln!(out, "| {op} | {} | n/a | n/a | n/a | n/a | 0 | | |", t.name);
                continue;
            };
            let (rm, rp) = match base {
                None => {
                    base = Some(s);
                    ("baseline".to_owned(), "baseline".to_owned())
                }
                Some(b) => (format_ratio(s.median, b.median), format_ratio(s.p90, b.p90)),
            };
            let _ = writeln!(
                out,
                "| {op} | {} | {} | {} | {} | {} | {} | {rm} | {rp} |",
                t.name,
                format_value(s.median),
                format_value(s.p90),
                format_value(s.min),
                format_value(s.max),
                s.n
            );
        }
    }
    out
}

/// The whole report, Markdown.
pub fn render(readings: &[Reading], times: Option<&CallTimes>, notes: &[String]) -> String {
    let mut out = String::new();
    if !readings.is_empty() {
        out.push_str("Daemon memory, idle, medians over the rounds:\n\n");
        out.push_str(&memory_table(readings));
        out.push('\n');
    }
    if let Some(times) = times {
        let _ = writeln!(
            out,
            "CSI calls, {} rounds per target after {} unmeasured, targets taking turns (order reversed every round), {} ms pause after each turn, {} MiB block volumes (ext4):\n",
            times.rounds,
            times.warmup,
            times.pause_ms,
            times.volume_bytes >> 20
        );
        out.push_str(&calls_table(times));
        out.push('\n');
    }
    for n in notes {
        let _ = writeln!(out, "* {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calls::TargetSpec;

    fn reading(round: u32, group: &str, name: &str, rss_mib: u64) -> Reading {
        let k = rss_mib * 1024;
        Reading { round, group: group.into(), name: name.into(), pid: 1, vm_rss_kib: k, vm_hwm_kib: k, rss_anon_kib: k / 2, pss_kib: k, threads: 5 }
    }

    #[test]
    fn memory_sums_per_round_then_median() {
        let rs = vec![
            reading(1, "before", "a", 10),
            reading(1, "before", "b", 20),
            reading(1, "after", "d", 18),
            reading(2, "before", "a", 12),
            reading(2, "before", "b", 20),
            reading(2, "after", "d", 20),
            reading(3, "before", "a", 11),
            reading(3, "before", "b", 30),
            reading(3, "after", "d", 19),
        ];
        let t = memory_table(&rs);
        // Sums 30, 32, 41: median 32; after: 19 -> 0.59×.
        assert!(t.contains("| before | **sum of 2** | **32.00** |"), "{t}");
        assert!(t.contains("| before | a | 11.00 |"), "{t}");
        assert!(t.contains("| **10** | 3 |"), "{t}");
        assert!(t.contains("| after | d | 19.00 |"), "{t}");
        assert!(t.contains("| after / before | | 0.59× |"), "{t}");
    }

    #[test]
    fn calls_with_ratio() {
        let spec = |n: &str| TargetSpec { name: n.into(), socket: "/s".into(), kubelet: "/k".into() };
        let mut c =
            CallTimes { targets: vec![spec("old"), spec("new")], rounds: 2, warmup: 1, pause_ms: 500, volume_bytes: 1 << 30, ..Default::default() };
        c.push("old", &[10.0, 20.0, 30.0, 40.0, 50.0, 60.0]);
        c.push("old", &[10.0, 20.0, 30.0, 40.0, 50.0, 60.0]);
        c.push("new", &[5.0, 20.0, 30.0, 40.0, 50.0, 6.0]);
        c.push("new", &[5.0, 20.0, 30.0, 40.0, 50.0, 6.0]);
        let t = calls_table(&c);
        assert!(t.contains("| CreateVolume | old | 10.00 | 10.00 | 10.00 | 10.00 | 2 | baseline | baseline |"), "{t}");
        assert!(t.contains("| CreateVolume | new | 5.000 | 5.000 | 5.000 | 5.000 | 2 | 0.50× | 0.50× |"), "{t}");
        assert!(t.contains("| DeleteVolume | new | 6.000 | 6.000 | 6.000 | 6.000 | 2 | 0.10× | 0.10× |"), "{t}");
        let r = render(&[], Some(&c), &["a note".into()]);
        assert!(r.contains("2 rounds per target after 1 unmeasured") && r.ends_with("* a note\n"), "{r}");
    }
}
