//! Turning results into a table (text, Markdown) and JSON.

use std::fmt::Write as _;

use serde::Serialize;
use thinbox_bench_stats::{Summary, format_ratio, format_value, ratio, summarize};

use crate::results::{Cell, Failure, Results, Unit};
use crate::spec::{TargetSpec, Workload};
use crate::workloads::RssMix;

/// Parameters of a run, echoed into the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunConfig {
    /// Workloads in the order run.
    pub workloads: Vec<Workload>,
    /// Layers per chain.
    pub chain_layers: usize,
    /// Chains per target.
    pub chain_repeats: usize,
    /// Containers in the parallel workload.
    pub parallel: usize,
    /// Maximum parallel requests in flight.
    pub parallel_concurrency: usize,
    /// Parallel rounds per target.
    pub parallel_repeats: usize,
    /// Snapshots alive in the rss workload.
    pub rss_count: usize,
    /// Kinds of snapshot in the rss workload.
    pub rss_mix: RssMix,
    /// Per-request timeout.
    pub timeout_secs: u64,
    /// Shell command run after each target's turn, unmeasured (`--settle`).
    pub settle: Option<String>,
}

/// Where the run happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Host {
    /// `uname -r`.
    pub kernel: String,
    /// Online CPUs.
    pub cpus: usize,
}

impl Host {
    /// Describes this machine (best effort).
    pub fn detect() -> Self {
        Host {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "unknown".to_owned()),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        }
    }
}

/// One table row: a metric for one target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportRow {
    /// Workload.
    pub workload: Workload,
    /// Operation or quantity.
    pub op: String,
    /// Unit of the numbers.
    pub unit: Unit,
    /// Target name.
    pub target: String,
    /// Statistics, when there are samples.
    pub summary: Option<Summary>,
    /// Why there are no numbers (`n/a (no --pid)`, `failed`), if so.
    pub note: Option<String>,
    /// `target / baseline`, e.g. `thinbox / overlayfs`; `None` on baseline rows.
    pub ratio_label: Option<String>,
    /// Median of this target over the baseline's median.
    pub ratio_median: Option<f64>,
    /// p99 of this target over the baseline's p99.
    pub ratio_p99: Option<f64>,
}

/// Snapshot keys that could not be removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leftover {
    /// Target name.
    pub target: String,
    /// Key.
    pub key: String,
    /// Last error.
    pub error: String,
}

/// A complete run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Unique prefix of every key the run created.
    pub run_id: String,
    /// Host description.
    pub host: Host,
    /// Parameters.
    pub config: RunConfig,
    /// Targets, baseline first.
    pub targets: Vec<TargetSpec>,
    /// Name of the baseline target (the first one).
    pub baseline: String,
    /// Table rows.
    pub rows: Vec<ReportRow>,
    /// Failed workload runs.
    pub failures: Vec<Failure>,
    /// Keys left behind after cleanup.
    pub leftovers: Vec<Leftover>,
    /// Free-form remarks (`--note`), printed under the run description.
    pub notes: Vec<String>,
}

impl Report {
    /// Builds the rows from raw results.
    pub fn build(
        run_id: String,
        host: Host,
        config: RunConfig,
        targets: Vec<TargetSpec>,
        results: &Results,
        leftovers: Vec<Leftover>,
        notes: Vec<String>,
    ) -> Self {
        let baseline = targets.first().map(|t| t.name.clone()).unwrap_or_default();
        let mut rows = Vec::new();
        for metric in &results.rows {
            let summaries: Vec<Option<Summary>> = metric
                .cells
                .iter()
                .map(|c| match c {
                    Cell::Samples(s) => summarize(s),
                    Cell::NotAvailable(_) => None,
                })
                .collect();
            let base = summaries.first().copied().flatten();
            for (i, (cell, summary)) in metric.cells.iter().zip(&summaries).enumerate() {
                let name = results.targets.get(i).cloned().unwrap_or_default();
                let note = match cell {
                    Cell::NotAvailable(why) => Some(why.clone()),
                    Cell::Samples(s) if s.is_empty() => {
                        Some(if results.failed(metric.id.workload, &name) { "failed".to_owned() } else { "-".to_owned() })
                    }
                    Cell::Samples(_) => None,
                };
                let (ratio_label, ratio_median, ratio_p99) = if i == 0 {
                    (None, None, None)
                } else {
                    let label = Some(format!("{name} / {baseline}"));
                    match (summary, base) {
                        (Some(s), Some(b)) => (label, ratio(s.median, b.median), ratio(s.p99, b.p99)),
                        _ => (label, None, None),
                    }
                };
                rows.push(ReportRow {
                    workload: metric.id.workload,
                    op: metric.id.op.clone(),
                    unit: metric.id.unit,
                    target: name,
                    summary: *summary,
                    note,
                    ratio_label,
                    ratio_median,
                    ratio_p99,
                });
            }
        }
        Report { run_id, host, config, baseline, targets, rows, failures: results.failures.clone(), leftovers, notes }
    }

    /// `thinbox / overlayfs` when there are exactly two targets, otherwise
    /// `target / overlayfs`.
    pub fn ratio_header(&self) -> String {
        match self.targets.as_slice() {
            [_, other] => format!("{} / {}", other.name, self.baseline),
            _ => format!("target / {}", self.baseline),
        }
    }

    fn header(&self) -> Vec<String> {
        let mut h: Vec<String> = ["workload", "op", "target", "unit", "median", "p99", "n"].into_iter().map(String::from).collect();
        if self.has_ratios() {
            let r = self.ratio_header();
            h.push(format!("{r} (median)"));
            h.push(format!("{r} (p99)"));
        }
        h
    }

    /// Ratio columns appear only with two or more targets.
    pub fn has_ratios(&self) -> bool {
        self.targets.len() > 1
    }

    fn cells(&self) -> Vec<Vec<String>> {
        let multi = self.targets.len() > 2;
        self.rows
            .iter()
            .map(|row| {
                let (median, p99, n) = match (&row.summary, &row.note) {
                    (Some(s), _) => (format_value(s.median), format_value(s.p99), s.n.to_string()),
                    (None, Some(note)) => (note.clone(), note.clone(), "0".into()),
                    (None, None) => ("-".into(), "-".into(), "0".into()),
                };
                let fmt = |v: Option<f64>| match (&row.ratio_label, v) {
                    (None, _) => "baseline".to_owned(),
                    (Some(_), None) => "n/a".to_owned(),
                    (Some(label), Some(v)) => {
                        let s = format_ratio(v, 1.0);
                        if multi { format!("{s} ({label})") } else { s }
                    }
                };
                let mut cells = vec![row.workload.to_string(), row.op.clone(), row.target.clone(), row.unit.as_str().to_owned(), median, p99, n];
                if self.has_ratios() {
                    cells.push(fmt(row.ratio_median));
                    cells.push(fmt(row.ratio_p99));
                }
                cells
            })
            .collect()
    }

    /// Run description; `local` adds what only matters on this machine
    /// (run id, socket paths, pids), left out of the Markdown for the docs.
    fn describe(&self, local: bool) -> Vec<String> {
        let c = &self.config;
        let mut lines = Vec::new();
        lines.push(if local {
            format!("run {} on Linux {}, {} CPUs", self.run_id, self.host.kernel, self.host.cpus)
        } else {
            format!("Linux {}, {} CPUs", self.host.kernel, self.host.cpus)
        });
        for (i, t) in self.targets.iter().enumerate() {
            let mut s = if local { format!("target {} = {}", t.name, t.socket.display()) } else { format!("target {}", t.name) };
            if !t.snapshotter.is_empty() {
                let _ = write!(s, ", snapshotter={}", t.snapshotter);
            }
            if let Some(ns) = &t.namespace {
                let _ = write!(s, ", namespace={ns}");
            }
            match t.pid {
                Some(pid) if local => {
                    let _ = write!(s, ", pid={pid}");
                }
                Some(_) => s.push_str(", RSS of its process"),
                None => s.push_str(", no pid (no RSS)"),
            }
            if i == 0 {
                s.push_str(" (baseline)");
            }
            lines.push(s);
        }
        for w in &c.workloads {
            lines.push(match w {
                Workload::Chain => format!(
                    "chain: {} layers (Prepare+Commit each), View of the top, Remove all top-down (each layer's after a Remove of a key that never existed: remove missing); {} repeats per target",
                    c.chain_layers, c.chain_repeats
                ),
                Workload::Parallel => format!(
                    "parallel: 3-layer image, {} containers Prepared from its top with up to {} in flight, then as many Removes of keys that never existed (remove missing), then the containers Removed, the same way; {} round(s) per target",
                    c.parallel, c.parallel_concurrency, c.parallel_repeats
                ),
                Workload::Rss => format!(
                    "rss: {} snapshots alive (1 committed base + {} {}), VmRSS of the target's pid",
                    c.rss_count,
                    c.rss_count.saturating_sub(1),
                    match c.rss_mix {
                        RssMix::Active => "active",
                        RssMix::Mixed => "alternately active / committed",
                    }
                ),
            });
        }
        if let Some(cmd) = &c.settle {
            lines.push(format!("after each target's turn (unmeasured, before the next target starts): `{cmd}`"));
        }
        if self.has_ratios() {
            lines.push(format!(
                "ratios are {} of the median and of the p99: below 1.00× means lower latency / less memory than {}",
                self.ratio_header(),
                self.baseline
            ));
        }
        lines.extend(self.notes.iter().cloned());
        lines
    }

    fn trailer(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for f in &self.failures {
            lines.push(format!("FAILED: {} on {} (repeat {}): {}", f.workload, f.target, f.repeat, f.error));
        }
        for l in &self.leftovers {
            lines.push(format!("LEFT BEHIND: {} key {}: {}", l.target, l.key, l.error));
        }
        lines
    }

    /// Plain-text table for a terminal.
    pub fn to_text(&self) -> String {
        let header = self.header();
        let body = self.cells();
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = header.iter().map(|h| width(h)).collect();
        for row in &body {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(c));
            }
        }
        let numeric = |i: usize| (4..=8).contains(&i);
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                let pad = w.saturating_sub(width(c));
                if i > 0 {
                    s.push_str("  ");
                }
                if numeric(i) {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                }
            }
            s.trim_end().to_owned()
        };
        let mut out = String::new();
        for l in self.describe(true) {
            let _ = writeln!(out, "# {l}");
        }
        let _ = writeln!(out, "{}", line(&header));
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        let _ = writeln!(out, "{}", line(&rule));
        let mut last: Option<(Workload, &str)> = None;
        for (row, cells) in self.rows.iter().zip(&body) {
            let key = (row.workload, row.op.as_str());
            if last.is_some_and(|(w, _)| w != row.workload) {
                out.push('\n');
            }
            last = Some(key);
            let _ = writeln!(out, "{}", line(cells));
        }
        for l in self.trailer() {
            let _ = writeln!(out, "{l}");
        }
        out
    }

    /// Markdown section (for `docs/benchmarks.md`).
    pub fn to_markdown(&self) -> String {
        let esc = |s: &str| s.replace('|', "\\|");
        let mut out = String::new();
        if self.has_ratios() {
            let _ = writeln!(out, "### Snapshot operations: {}\n", self.ratio_header());
        } else {
            let _ = writeln!(out, "### Snapshot operations: {}\n", self.baseline);
        }
        for l in self.describe(false) {
            let _ = writeln!(out, "- {}", esc(&l));
        }
        out.push('\n');
        let header = self.header();
        let _ = writeln!(out, "| {} |", header.iter().map(|h| esc(h)).collect::<Vec<_>>().join(" | "));
        let align: Vec<&str> = (0..header.len()).map(|i| if (4..=8).contains(&i) { "---:" } else { "---" }).collect();
        let _ = writeln!(out, "|{}|", align.join("|"));
        for cells in self.cells() {
            let _ = writeln!(out, "| {} |", cells.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | "));
        }
        let trailer = self.trailer();
        if !trailer.is_empty() {
            out.push('\n');
            for l in trailer {
                let _ = writeln!(out, "- **{}**", esc(&l));
            }
        }
        out
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Batch;

    fn spec(name: &str) -> TargetSpec {
        format!("{name}=/tmp/{name}.sock").parse().expect("spec")
    }

    fn config() -> RunConfig {
        RunConfig {
            workloads: vec![Workload::Chain, Workload::Rss],
            chain_layers: 16,
            chain_repeats: 1,
            parallel: 100,
            parallel_concurrency: 100,
            parallel_repeats: 1,
            rss_count: 1000,
            rss_mix: RssMix::Active,
            timeout_secs: 60,
            settle: Some("wait-for-gc".into()),
        }
    }

    fn sample_report() -> Report {
        let mut r = Results::new(vec!["overlayfs".into(), "thinbox".into()]);
        let mut a = Batch::default();
        a.push("prepare", Unit::Ms, 2.0);
        a.push("prepare", Unit::Ms, 4.0);
        r.merge(Workload::Chain, 0, a);
        let mut b = Batch::default();
        b.push("prepare", Unit::Ms, 1.0);
        b.push("prepare", Unit::Ms, 2.0);
        r.merge(Workload::Chain, 1, b);
        for target in 0..2 {
            let mut c = Batch::default();
            c.not_available("rss before", Unit::MiB, "n/a (no --pid)");
            r.merge(Workload::Rss, target, c);
        }
        Report::build(
            "run".into(),
            Host { kernel: "6.1".into(), cpus: 2 },
            config(),
            vec![spec("overlayfs"), spec("thinbox")],
            &r,
            Vec::new(),
            vec!["a remark".into()],
        )
    }

    #[test]
    fn ratios_against_first_target() {
        let rep = sample_report();
        assert_eq!(rep.ratio_header(), "thinbox / overlayfs");
        let thin = rep.rows.iter().find(|r| r.target == "thinbox" && r.op == "prepare").expect("row");
        assert_eq!(thin.ratio_median, Some(0.5));
        assert_eq!(thin.ratio_p99, Some(0.5));
        assert_eq!(thin.ratio_label.as_deref(), Some("thinbox / overlayfs"));
        let base = rep.rows.iter().find(|r| r.target == "overlayfs" && r.op == "prepare").expect("row");
        assert_eq!(base.ratio_median, None);
    }

    #[test]
    fn text_and_markdown_tables() {
        let rep = sample_report();
        let text = rep.to_text();
        assert!(text.contains("thinbox / overlayfs (median)"), "{text}");
        assert!(text.contains("0.50×"), "{text}");
        assert!(text.contains("n/a (no --pid)"), "{text}");
        assert!(text.contains("# a remark"), "{text}");
        assert!(text.contains("after each target's turn (unmeasured, before the next target starts): `wait-for-gc`"), "{text}");
        let md = rep.to_markdown();
        assert!(md.contains("| workload | op | target |"), "{md}");
        assert!(md.contains("|---|---|---|---|---:|"), "{md}");
        assert!(md.contains("| chain | prepare | thinbox | ms | 1.500 | 2.000 | 2 | 0.50× | 0.50× |"), "{md}");
        let json = rep.to_json().expect("json");
        let mut single = rep.clone();
        single.targets.truncate(1);
        assert!(!single.to_text().contains("(median)"));
        assert!(json.contains("\"ratio_median\": 0.5"), "{json}");
    }
}
