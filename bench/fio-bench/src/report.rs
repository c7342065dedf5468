//! The results of a run: cells (row × job), ratios to the runC cell of the
//! same job, the headline ratio and the KVM targets, rendered as an aligned
//! text table, Markdown and JSON.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use thinbox_bench_stats::ratio;

use crate::fio::Measurement;
use crate::host::HostInfo;
use crate::jobs::{FioParams, Job, Pattern};

/// The rows of the comparison, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
pub enum RowKind {
    /// The host, fio on overlayfs over ext4: what a runC container sees.
    #[value(name = "runc")]
    #[serde(rename = "runc")]
    Runc,
    /// A guest on a host directory over virtio-9p.
    #[value(name = "9p")]
    #[serde(rename = "9p")]
    NineP,
    /// A guest on a host directory over virtio-fs.
    #[value(name = "virtio-fs")]
    #[serde(rename = "virtio-fs")]
    VirtioFs,
    /// A guest on a Thinbox rootfs snapshot as virtio-blk.
    #[value(name = "thinbox-rootfs")]
    #[serde(rename = "thinbox-rootfs")]
    ThinboxRootfs,
    /// A guest on a Thinbox CSI `file` volume (emptyDir) as virtio-blk.
    #[value(name = "thinbox-emptydir")]
    #[serde(rename = "thinbox-emptydir")]
    ThinboxEmptyDir,
}

impl RowKind {
    /// All rows, in table order (the baseline first).
    pub const ALL: [RowKind; 5] = [RowKind::Runc, RowKind::NineP, RowKind::VirtioFs, RowKind::ThinboxRootfs, RowKind::ThinboxEmptyDir];

    /// Short name (the `--rows` word).
    pub fn name(self) -> &'static str {
        match self {
            RowKind::Runc => "runc",
            RowKind::NineP => "9p",
            RowKind::VirtioFs => "virtio-fs",
            RowKind::ThinboxRootfs => "thinbox-rootfs",
            RowKind::ThinboxEmptyDir => "thinbox-emptydir",
        }
    }

    /// Table label.
    pub fn label(self) -> &'static str {
        match self {
            RowKind::Runc => "runC (overlayfs)",
            RowKind::NineP => "9p",
            RowKind::VirtioFs => "virtio-fs",
            RowKind::ThinboxRootfs => "Thinbox virtio-blk rootfs",
            RowKind::ThinboxEmptyDir => "Thinbox virtio-blk emptyDir",
        }
    }
}

/// How a guest ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// `KVM` or `TCG`.
    pub accel: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub mem_mib: u32,
    /// The guest's `uname -r`.
    pub kernel: String,
    /// The guest's `fio --version`.
    pub fio_version: String,
}

/// One row's setup, as run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowInfo {
    /// Which row.
    pub kind: RowKind,
    /// The guest, for guest rows (`None`: fio ran on the host).
    pub guest: Option<GuestInfo>,
    /// What the file under fio sits on, and the options that matter.
    pub setup: String,
    /// Why the row has no numbers, if it could not be set up.
    pub unavailable: Option<String>,
}

impl RowInfo {
    /// `host` or `guest TCG, 2 vCPU, 1024 MiB`.
    pub fn runs_on(&self) -> String {
        match &self.guest {
            None if self.unavailable.is_some() => "not run".into(),
            None if self.kind != RowKind::Runc => "guest".into(),
            None => "host".into(),
            Some(g) => format!("guest {}, {} vCPU, {} MiB", g.accel, g.cpus, g.mem_mib),
        }
    }
}

/// One row × job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Row.
    pub row: RowKind,
    /// Job.
    pub job: Job,
    /// The figures (the median of the rounds that ran), if any ran.
    pub result: Option<Measurement>,
    /// Each round's figures, in order.
    pub rounds: Vec<Measurement>,
    /// Why a round failed or the row did not run, if so.
    pub error: Option<String>,
    /// IOPS over the runC cell's IOPS (bandwidth has the same ratio: same block size).
    pub iops_vs_runc: Option<f64>,
    /// p99 total latency over the runC cell's.
    pub p99_vs_runc: Option<f64>,
}

/// A target for KVM hosts, checked against this run's numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetCheck {
    /// What is compared, e.g. `Thinbox rootfs / 9p, 4k randread qd16 IOPS`.
    pub what: String,
    /// The target ratio (at least).
    pub target: f64,
    /// This run's ratio.
    pub measured: Option<f64>,
    /// Whether the run is one the target is about (every guest on KVM).
    pub assessed: bool,
}

impl TargetCheck {
    /// `met`, `not met`, `n/a`, or why it is not assessed.
    pub fn verdict(&self) -> String {
        match (self.measured, self.assessed) {
            (None, _) => "no measurement".into(),
            (Some(_), false) => "not assessed: guests ran on TCG, the target is for KVM hosts".into(),
            (Some(m), true) if m >= self.target => "met".into(),
            (Some(_), true) => "not met".into(),
        }
    }
}

/// A complete run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `quick` or `full`.
    pub mode: String,
    /// Start, UTC, `YYYY-MM-DD HH:MM`.
    pub started: String,
    /// The machine.
    pub host: HostInfo,
    /// fio parameters shared by every job.
    pub params: FioParams,
    /// Rounds of the whole matrix (each cell reports the median).
    pub rounds: u32,
    /// Rows, in table order.
    pub rows: Vec<RowInfo>,
    /// Jobs, in table order.
    pub jobs: Vec<Job>,
    /// Every row × job, row-major.
    pub cells: Vec<Cell>,
    /// Thinbox rootfs IOPS / 9p IOPS, 4k randread qd16.
    pub headline: Option<f64>,
    /// The targets for KVM hosts.
    pub targets: Vec<TargetCheck>,
    /// Remarks (`--note`).
    pub notes: Vec<String>,
    /// Seconds the whole run took.
    pub wall_secs: f64,
}

/// The headline job: 4k random reads at queue depth 16.
pub const HEADLINE_JOB: Job = Job { pattern: Pattern::RandRead4k, iodepth: 16 };

impl Report {
    /// Fills in the ratio columns, the headline and the target checks from
    /// the cells.
    pub fn compute(&mut self) {
        let base: Vec<(Job, Measurement)> =
            self.cells.iter().filter(|c| c.row == RowKind::Runc).filter_map(|c| c.result.map(|m| (c.job, m))).collect();
        for c in &mut self.cells {
            let b = base.iter().find(|(j, _)| *j == c.job).map(|(_, m)| *m);
            (c.iops_vs_runc, c.p99_vs_runc) = match (c.result, b) {
                (Some(m), Some(b)) => (ratio(m.iops, b.iops), ratio(m.p99_us, b.p99_us)),
                _ => (None, None),
            };
        }
        let iops = |row: RowKind| self.cell(row, &HEADLINE_JOB).and_then(|c| c.result).map(|m| m.iops);
        let rootfs = iops(RowKind::ThinboxRootfs);
        self.headline = rootfs.zip(iops(RowKind::NineP)).and_then(|(a, b)| ratio(a, b));
        let assessed = !self.rows.iter().any(|r| r.guest.as_ref().is_some_and(|g| g.accel != "KVM"));
        self.targets = vec![
            TargetCheck { what: format!("Thinbox rootfs / 9p, {} IOPS", HEADLINE_JOB.label()), target: 3.0, measured: self.headline, assessed },
            TargetCheck {
                what: format!("Thinbox rootfs / runC, {} IOPS", HEADLINE_JOB.label()),
                target: 0.8,
                measured: self.cell(RowKind::ThinboxRootfs, &HEADLINE_JOB).and_then(|c| c.iops_vs_runc),
                assessed,
            },
        ];
    }

    /// The cell of `row` and `job`.
    pub fn cell(&self, row: RowKind, job: &Job) -> Option<&Cell> {
        self.cells.iter().find(|c| c.row == row && c.job == *job)
    }

    /// The row's setup.
    pub fn row(&self, kind: RowKind) -> Option<&RowInfo> {
        self.rows.iter().find(|r| r.kind == kind)
    }

    /// Cells without a usable number (IOPS, bandwidth and p99 all > 0), as
    /// `row / job: reason`.
    pub fn smoke_failures(&self) -> Vec<String> {
        self.cells
            .iter()
            .filter_map(|c| {
                let reason = match (&c.result, &c.error) {
                    (_, Some(e)) => e.clone(),
                    (Some(m), None) if m.iops > 0.0 && m.bw_bytes > 0 && m.p99_us > 0.0 => return None,
                    (Some(m), None) => format!("a zero figure: {m:?}"),
                    (None, None) => "no result".into(),
                };
                Some(format!("{} / {}: {reason}", c.row.name(), c.job.name()))
            })
            .collect()
    }

    /// The table's header and lines: job, row, runs on, IOPS, MiB/s, p99 µs,
    /// IOPS and p99 as ratios to runC.
    fn table(&self) -> (Vec<&'static str>, Vec<Vec<String>>) {
        let header = vec!["job", "row", "runs on", "IOPS", "MiB/s", "p99 lat µs", "IOPS / runC", "p99 / runC"];
        let mut lines = Vec::new();
        for job in &self.jobs {
            for row in &self.rows {
                let Some(c) = self.cell(row.kind, job) else { continue };
                let mut line = vec![job.label(), row.kind.label().to_owned(), row.runs_on()];
                match (&c.result, &c.error) {
                    (Some(m), _) => {
                        line.push(fmt_count(m.iops));
                        line.push(fmt_num(m.bw_bytes as f64 / f64::from(1 << 20)));
                        line.push(fmt_num(m.p99_us));
                        if row.kind == RowKind::Runc {
                            line.extend(["baseline".to_owned(), "baseline".to_owned()]);
                        } else {
                            line.push(fmt_ratio(c.iops_vs_runc));
                            line.push(fmt_ratio(c.p99_vs_runc));
                        }
                    }
                    (None, _) => {
                        line.push(if row.unavailable.is_some() { "n/a: row not set up (see above)" } else { "failed (see below)" }.to_owned());
                        line.extend(std::iter::repeat_n(String::new(), 4));
                    }
                }
                lines.push(line);
            }
        }
        (header, lines)
    }

    /// The ratio matrix: one line per row, IOPS / runC for every job.
    fn ratio_matrix(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let mut header = vec!["row".to_owned()];
        header.extend(self.jobs.iter().map(Job::label));
        let lines = self
            .rows
            .iter()
            .map(|r| {
                let mut line = vec![r.kind.label().to_owned()];
                line.extend(self.jobs.iter().map(|j| match self.cell(r.kind, j) {
                    Some(c) if r.kind == RowKind::Runc && c.result.is_some() => "1.00×".to_owned(),
                    Some(c) => fmt_ratio(c.iops_vs_runc),
                    None => "–".to_owned(),
                }));
                line
            })
            .collect();
        (header, lines)
    }

    fn description(&self) -> Vec<String> {
        let p = &self.params;
        let mut d = vec![
            format!("Host: {}; 1-min load {:.2} at start, {:.2} at end.", self.host.summary(), self.host.load_start, self.host.load_end),
            format!(
                "fio: direct=1, ioengine={}, {} s measured after {} s ramp per job, one {} file per row written in full before the first job, caches dropped (host and guest) before every job, jobs interleaved across rows{}; p99 is the total latency (submission to completion); {} mode, run {} UTC, {:.0} s wall.",
                p.ioengine,
                p.runtime_secs,
                p.ramp_secs,
                fmt_size(p.file_size),
                if self.rounds > 1 { format!(", {} rounds (each cell the median)", self.rounds) } else { String::new() },
                self.mode,
                self.started,
                self.wall_secs
            ),
        ];
        for r in &self.rows {
            if let Some(u) = &r.unavailable {
                d.push(format!("{} — not run: {u}", r.kind.label()));
                continue;
            }
            let mut line = format!("{} — {}: {}", r.kind.label(), r.runs_on(), r.setup);
            if let Some(g) = &r.guest {
                let _ = write!(line, " (guest kernel {}, {})", g.kernel, g.fio_version);
            }
            d.push(line);
        }
        if self.rows.iter().any(|r| r.guest.as_ref().is_some_and(|g| g.accel == "TCG")) {
            d.push("TCG guests are CPU-bound (every guest instruction emulated): only ratios between guest rows mean anything; guest / runC ratios say little about a KVM host.".into());
        }
        d.extend(self.notes.iter().cloned());
        d
    }

    /// Cells of rows that were set up but have no numbers, with the reason.
    fn failure_lines(&self) -> Vec<String> {
        self.cells
            .iter()
            .filter(|c| c.error.is_some() && self.row(c.row).is_some_and(|r| r.unavailable.is_none()))
            .map(|c| format!("Failed: {} / {}: {}", c.row.label(), c.job.label(), c.error.as_deref().unwrap_or("no result")))
            .collect()
    }

    fn headline_line(&self) -> String {
        match self.headline {
            Some(h) => format!("Headline: Thinbox virtio-blk rootfs / 9p, {} IOPS = {}", HEADLINE_JOB.label(), fmt_ratio(Some(h))),
            None => format!("Headline: Thinbox virtio-blk rootfs / 9p, {} IOPS: no measurement", HEADLINE_JOB.label()),
        }
    }

    fn target_lines(&self) -> Vec<String> {
        self.targets
            .iter()
            .map(|t| format!("Target (KVM hosts) {} ≥ {}: measured {} — {}", t.what, fmt_ratio(Some(t.target)), fmt_ratio(t.measured), t.verdict()))
            .collect()
    }

    /// Plain text for a terminal: aligned tables.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for line in self.description() {
            let _ = writeln!(s, "{line}");
        }
        s.push('\n');
        let (h, lines) = self.table();
        s.push_str(&aligned(&h.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>(), &lines));
        s.push('\n');
        for f in self.failure_lines() {
            let _ = writeln!(s, "{f}");
        }
        let (h, lines) = self.ratio_matrix();
        s.push_str("\nIOPS / runC:\n");
        s.push_str(&aligned(&h, &lines));
        s.push('\n');
        let _ = writeln!(s, "{}", self.headline_line());
        for t in self.target_lines() {
            let _ = writeln!(s, "{t}");
        }
        s
    }

    /// A Markdown section.
    pub fn to_markdown(&self) -> String {
        let mut s = String::from("## fio: runC, 9p, virtio-fs, Thinbox virtio-blk\n\n");
        for line in self.description() {
            let _ = writeln!(s, "* {line}");
        }
        s.push('\n');
        let _ = writeln!(s, "**{}**\n", self.headline_line());
        for t in self.target_lines() {
            let _ = writeln!(s, "* {t}");
        }
        s.push('\n');
        let (h, lines) = self.ratio_matrix();
        s.push_str("IOPS as a ratio to runC:\n\n");
        s.push_str(&markdown_table(&h, &lines, 1));
        s.push('\n');
        let (h, lines) = self.table();
        s.push_str(&markdown_table(&h.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>(), &lines, 3));
        let failures = self.failure_lines();
        if !failures.is_empty() {
            s.push('\n');
            for f in failures {
                let _ = writeln!(s, "* {f}");
            }
        }
        s
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }
}

/// Columns from `right_from` on are right-aligned.
fn markdown_table(header: &[String], lines: &[Vec<String>], right_from: usize) -> String {
    let mut s = format!("| {} |\n|", header.join(" | "));
    for i in 0..header.len() {
        s.push_str(if i >= right_from { "---:|" } else { "---|" });
    }
    s.push('\n');
    for l in lines {
        let _ = writeln!(s, "| {} |", l.iter().map(|c| c.replace('|', "\\|")).collect::<Vec<_>>().join(" | "));
    }
    s
}

fn aligned(header: &[String], lines: &[Vec<String>]) -> String {
    let width = |i: usize| {
        std::iter::once(header).chain(lines.iter().map(Vec::as_slice)).filter_map(|l| l.get(i)).map(|c| c.chars().count()).max().unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let mut s = String::new();
    for l in std::iter::once(header).chain(lines.iter().map(Vec::as_slice)) {
        let cells: Vec<String> = l.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        let _ = writeln!(s, "{}", cells.join("  ").trim_end());
    }
    s
}

/// IOPS: whole numbers (one decimal below 100).
pub fn fmt_count(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

/// Three significant digits or whole numbers.
pub fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `0.25×`, `3.1×`, `–` for none.
pub fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        None => "–".into(),
        Some(r) if r < 0.1 => format!("{r:.3}×"),
        Some(r) => format!("{r:.2}×"),
    }
}

/// `1 GiB`, `64 MiB`.
pub fn fmt_size(bytes: u64) -> String {
    let s = thinbox_blockstore::Bytes(bytes).to_string();
    match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => format!("{} {}", &s[..i], &s[i..]),
        None => s,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    pub(crate) fn m(iops: f64, p99_us: f64, bs: u64) -> Measurement {
        Measurement { iops, bw_bytes: (iops * bs as f64) as u64, p99_us, mean_us: p99_us / 2.0, total_ios: (iops * 10.0) as u64, runtime_ms: 10_000 }
    }

    pub(crate) fn guest(accel: &str) -> Option<GuestInfo> {
        Some(GuestInfo { accel: accel.into(), cpus: 2, mem_mib: 1024, kernel: "6.1.0-41-amd64".into(), fio_version: "fio-3.33".into() })
    }

    /// Three rows over two jobs; 9p has no numbers for one job.
    pub(crate) fn sample(accel: &str) -> Report {
        let jobs = vec![HEADLINE_JOB, Job { pattern: Pattern::SeqWrite128k, iodepth: 1 }];
        let rows = vec![
            RowInfo { kind: RowKind::Runc, guest: None, setup: "overlayfs on ext4".into(), unavailable: None },
            RowInfo { kind: RowKind::NineP, guest: guest(accel), setup: "9p msize=512000".into(), unavailable: None },
            RowInfo { kind: RowKind::ThinboxRootfs, guest: guest(accel), setup: "reflink snapshot".into(), unavailable: None },
        ];
        let cell = |row, job: Job, result: Option<Measurement>| Cell {
            row,
            job,
            result,
            rounds: result.into_iter().collect(),
            error: result.is_none().then(|| "fio failed".to_owned()),
            iops_vs_runc: None,
            p99_vs_runc: None,
        };
        let cells = vec![
            cell(RowKind::Runc, jobs[0], Some(m(80_000.0, 400.0, 4096))),
            cell(RowKind::Runc, jobs[1], Some(m(4_000.0, 500.0, 131_072))),
            cell(RowKind::NineP, jobs[0], Some(m(2_000.0, 16_000.0, 4096))),
            cell(RowKind::NineP, jobs[1], None),
            cell(RowKind::ThinboxRootfs, jobs[0], Some(m(8_000.0, 4_000.0, 4096))),
            cell(RowKind::ThinboxRootfs, jobs[1], Some(m(1_000.0, 2_000.0, 131_072))),
        ];
        let host = HostInfo {
            kernel: "6.18".into(),
            cpu_model: "AMD EPYC".into(),
            cpus: 2,
            mem_gib: 24.0,
            fio_version: "fio-3.33".into(),
            qemu_version: Some("QEMU 7.2.19".into()),
            load_start: 0.5,
            load_end: 1.0,
        };
        let params = FioParams { runtime_secs: 10, ramp_secs: 2, file_size: 1 << 30, ioengine: "libaio".into() };
        let mut r = Report {
            mode: "full".into(),
            started: "2026-11-23 18:00".into(),
            host,
            params,
            rounds: 1,
            rows,
            jobs,
            cells,
            headline: None,
            targets: vec![],
            notes: vec![],
            wall_secs: 600.0,
        };
        r.compute();
        r
    }

    #[test]
    fn ratios_are_to_the_runc_cell_of_the_same_job() {
        let r = sample("TCG");
        let c = r.cell(RowKind::ThinboxRootfs, &HEADLINE_JOB).unwrap();
        assert!((c.iops_vs_runc.unwrap() - 0.1).abs() < 1e-12);
        assert!((c.p99_vs_runc.unwrap() - 10.0).abs() < 1e-12);
        let c = r.cell(RowKind::ThinboxRootfs, &r.jobs[1]).unwrap();
        assert!((c.iops_vs_runc.unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(r.cell(RowKind::NineP, &r.jobs[1]).unwrap().iops_vs_runc, None);
        assert!((r.cell(RowKind::Runc, &HEADLINE_JOB).unwrap().iops_vs_runc.unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn headline_and_targets() {
        let r = sample("TCG");
        assert!((r.headline.unwrap() - 4.0).abs() < 1e-12);
        assert_eq!(r.targets.len(), 2);
        assert!(!r.targets[0].assessed);
        assert!(r.targets[0].verdict().contains("TCG"));
        let k = sample("KVM");
        assert_eq!(k.targets[0].verdict(), "met");
        assert_eq!(k.targets[1].verdict(), "not met", "0.1× runC is below 0.8×");
    }

    #[test]
    fn smoke_names_the_cells_without_numbers() {
        let r = sample("TCG");
        assert_eq!(r.smoke_failures(), vec!["9p / seqwrite-128k-qd1: fio failed".to_owned()]);
        let mut z = sample("TCG");
        z.cells[0].result = Some(m(0.0, 0.0, 4096));
        assert_eq!(z.smoke_failures().len(), 2);
    }

    #[test]
    fn tables_label_every_number_with_where_it_ran() {
        let r = sample("TCG");
        let md = r.to_markdown();
        assert!(
            md.contains("| 4k randread qd16 | Thinbox virtio-blk rootfs | guest TCG, 2 vCPU, 1024 MiB | 8000 | 31.2 | 4000 | 0.10× | 10.00× |"),
            "{md}"
        );
        assert!(md.contains("| 4k randread qd16 | runC (overlayfs) | host | 80000 | 312 | 400 | baseline | baseline |"), "{md}");
        assert!(md.contains("failed (see below)") && md.contains("* Failed: 9p / 128k seq write qd1: fio failed"), "{md}");
        assert!(md.contains("= 4.00×"));
        assert!(md.contains("AMD EPYC") && md.contains("fio-3.33") && md.contains("kernel 6.18"));
        let text = r.to_text();
        assert!(text.contains("Thinbox virtio-blk rootfs") && text.contains("guest TCG, 2 vCPU, 1024 MiB"));
        let json: Report = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        assert_eq!(json, r);
        let mut u = sample("TCG");
        u.rows[1] = RowInfo { kind: RowKind::NineP, guest: None, setup: String::new(), unavailable: Some("no guest image".into()) };
        for c in u.cells.iter_mut().filter(|c| c.row == RowKind::NineP) {
            (c.result, c.rounds, c.error) = (None, Vec::new(), Some("no guest image".into()));
        }
        u.compute();
        let md = u.to_markdown();
        assert!(md.contains("* 9p — not run: no guest image\n"), "{md}");
        assert!(md.contains("| 4k randread qd16 | 9p | not run | n/a: row not set up (see above) |"), "{md}");
        assert!(!md.contains("Failed: 9p"), "an unavailable row is explained once, not per cell");
        assert_eq!(u.smoke_failures().len(), 2, "but every cell of it fails the smoke test");
    }

    /// The committed result of the last full run still reads with today's
    /// types, and its ratios and headline are what its cells give.
    #[test]
    fn committed_result_parses_and_recomputes_identically() {
        let r: Report = serde_json::from_str(include_str!("../../../docs/fio-bench/latest.json")).unwrap();
        assert_eq!(r.cells.len(), r.rows.len() * r.jobs.len());
        let mut again = r.clone();
        again.compute();
        // serde_json parses floats to within an ulp, not always exactly.
        let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(b.abs()),
            (a, b) => a.is_none() && b.is_none(),
        };
        for (x, y) in again.cells.iter().zip(&r.cells) {
            assert!(close(x.iops_vs_runc, y.iops_vs_runc) && close(x.p99_vs_runc, y.p99_vs_runc), "{x:?} vs {y:?}");
        }
        assert!(close(again.headline, r.headline) && r.headline.is_some());
        assert_eq!(again.targets.len(), r.targets.len());
    }

    #[test]
    fn numbers_are_formatted_for_reading() {
        assert_eq!(fmt_count(93_012.4), "93012");
        assert_eq!(fmt_count(12.34), "12.3");
        assert_eq!(fmt_num(1234.5), "1234");
        assert_eq!(fmt_num(4.567), "4.57");
        assert_eq!(fmt_ratio(Some(0.0123)), "0.012×");
        assert_eq!(fmt_ratio(Some(2.5)), "2.50×");
        assert_eq!(fmt_size(1 << 30), "1 GiB");
        assert_eq!(fmt_size(64 << 20), "64 MiB");
    }
}
