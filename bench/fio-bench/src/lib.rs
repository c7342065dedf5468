//! `fio-bench`: the same fio job matrix (4k random read/write, 128k
//! sequential read/write, queue depth 1 and 16, direct I/O, libaio, fixed
//! runtime and file size) on the storage a container gets from each
//! runtime:
//!
//! | row | where fio runs | the file sits on |
//! |---|---|---|
//! | runC | host | overlayfs over ext4 |
//! | 9p | guest | the same overlayfs layout over virtio-9p |
//! | virtio-fs | guest | the same overlayfs layout over virtiofsd |
//! | Thinbox rootfs | guest | a snapshotter rootfs snapshot as virtio-blk |
//! | Thinbox emptyDir | guest | a CSI inline `file` volume as virtio-blk |
//!
//! # Lifecycle of a run
//! 1. Every selected row is set up first (images, mounts, daemons, one
//!    guest per row booted through `thinbox-guest-vm`, the test file written
//!    in full). A row that cannot be set up says why instead of numbers.
//! 2. The jobs run interleaved — job 1 on every row, then job 2, ... — so
//!    that background load on a shared machine hits all rows alike. Host and
//!    guest page caches are dropped before every job.
//! 3. Everything is torn down (also after errors and on SIGINT/SIGTERM,
//!    between jobs) and the work directory is checked for leftover mounts and
//!    loop devices.
//! 4. The report — every cell as a ratio to the runC cell of its job, the
//!    headline Thinbox rootfs / 9p ratio for 4k randread qd16, how each guest
//!    ran (KVM or TCG, vCPUs, memory) and the host — goes to stdout and, as
//!    Markdown, JSON and an SVG chart, to `--out`.
//!
//! `--quick` is the CI smoke run: short jobs on small files; the run fails
//! unless every cell produced numbers above zero.

pub mod fio;
pub mod host;
pub mod jobs;
pub mod report;
pub mod rows;
pub mod svg;
pub mod sys;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use thinbox_blockstore::{Bytes, mountinfo};
use thinbox_guest_vm::{AccelChoice, GuestImage};

use crate::fio::Measurement;
use crate::host::HostInfo;
use crate::jobs::{FioParams, Job, JobFilter};
use crate::report::{Cell, Report, RowInfo, RowKind};
use crate::rows::Row;
use crate::rows::guest::GuestConfig;
use crate::rows::shared::{NinePCache, NinePOptions, VirtiofsCache, VirtiofsOptions, Virtiofsd};

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line or an impossible state.
    #[error("{0}")]
    Config(String),
    /// A row cannot run on this machine.
    #[error("{0}")]
    Unavailable(String),
    /// Not root: loop devices, mounts and dropping caches need it.
    #[error("fio-bench needs root (loop devices, mounts, drop_caches)")]
    NotRoot,
    /// A file or kernel operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A block store operation (images, loop devices) failed.
    #[error("{what}")]
    Store {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: thinbox_blockstore::Error,
    },
    /// The in-process snapshotter failed.
    #[error("snapshotter: {op}")]
    Snapshotter {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<thinbox_snapshotter::Error>,
    },
    /// The in-process CSI driver failed.
    #[error("CSI driver: {op}")]
    Csi {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<thinbox_csi::error::Error>,
    },
    /// The guest harness failed.
    #[error("guest: {op}")]
    Guest {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<thinbox_guest_vm::Error>,
    },
    /// An external program failed.
    #[error("{tool}: {reason}")]
    Tool {
        /// The program.
        tool: String,
        /// How it failed.
        reason: String,
    },
    /// fio's output is not the JSON we expect.
    #[error("unreadable fio JSON")]
    FioJson {
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// fio ran but the job has no usable result.
    #[error("{job}: {reason}")]
    FioResult {
        /// Job name.
        job: String,
        /// Why.
        reason: String,
    },
    /// Drawing the chart failed.
    #[error(transparent)]
    Chart(#[from] svg::ChartError),
}

impl Error {
    /// An I/O error while doing `what`, for `map_err`.
    pub fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { what, source }
    }

    /// A block store error while doing `what`, for `map_err`.
    pub fn store(what: String) -> impl FnOnce(thinbox_blockstore::Error) -> Error {
        move |source| Error::Store { what, source }
    }

    /// A guest harness error while doing `op`, for `map_err`.
    pub fn guest(op: &'static str) -> impl FnOnce(thinbox_guest_vm::Error) -> Error {
        move |source| Error::Guest { op, source: Box::new(source) }
    }
}

pub use thinbox_daemon::chain;

/// Which accelerator guests use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelArg {
    /// KVM where a guest boots on it, else TCG.
    Auto,
    /// KVM only.
    Kvm,
    /// TCG (emulation) only.
    Tcg,
}

/// Command line of `fio-bench`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fio-bench",
    version,
    about = "fio on runC overlayfs, 9p, virtio-fs and Thinbox virtio-blk (rootfs snapshot, emptyDir), side by side",
    after_help = "Needs root, fio, qemu-system-x86 and (for virtio-fs) virtiofsd.\nCI smoke run:  cargo run --release -p fio-bench -- --quick\nFull run:      cargo run --release -p fio-bench\nResults: <out>/fio-bench.{md,json,svg}."
)]
pub struct Cli {
    /// CI smoke run: 2 s jobs after 1 s ramp on 64 MiB files; fails unless
    /// every cell has numbers above zero.
    #[arg(long)]
    pub quick: bool,
    /// Rows to run (comma-separated; default all): runc, 9p, virtio-fs,
    /// thinbox-rootfs, thinbox-emptydir. runC is the ratios' baseline.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub rows: Vec<RowKind>,
    /// Jobs to run (comma-separated; default all): a job
    /// (randread-4k-qd16), a pattern (seqwrite-128k) or a depth (qd1).
    #[arg(long, value_delimiter = ',')]
    pub jobs: Vec<JobFilter>,
    /// Measured seconds per job [default: 10, quick 2].
    #[arg(long)]
    pub runtime: Option<u32>,
    /// Ramp seconds before measuring [default: 2, quick 1].
    #[arg(long)]
    pub ramp: Option<u32>,
    /// Rounds of the whole matrix; each cell reports the median of its
    /// rounds (more rounds smooth out a noisy machine).
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Test file size per row, e.g. 1GiB [default: 1GiB, quick 64MiB].
    #[arg(long)]
    pub size: Option<Bytes>,
    /// Where the report goes.
    #[arg(long, default_value = "target/fio-bench")]
    pub out: PathBuf,
    /// Where images, mounts and guest logs live during the run (removed
    /// after) [default: <out>/work].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    pub guest_cpus: u32,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 2048)]
    pub guest_mem_mib: u32,
    /// Guest accelerator.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Guest kernel and initramfs cache [default: thinbox-guest-vm's,
    /// $THINBOX_GUEST_CACHE or /var/cache/thinbox/guest].
    #[arg(long)]
    pub guest_cache_dir: Option<PathBuf>,
    /// 9p `msize` in bytes.
    #[arg(long, default_value_t = 512_000)]
    pub msize: u32,
    /// 9p cache mode.
    #[arg(long = "9p-cache", value_enum, default_value_t = NinePCache::Mmap)]
    pub ninep_cache: NinePCache,
    /// virtiofsd cache mode.
    #[arg(long, value_enum, default_value_t = VirtiofsCache::Auto)]
    pub virtiofs_cache: VirtiofsCache,
    /// Whether virtiofsd keeps the guest's O_DIRECT (allow_direct_io).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub virtiofs_direct_io: bool,
    /// virtiofsd binary [default: /usr/lib/qemu/virtiofsd, else virtiofsd in PATH].
    #[arg(long)]
    pub virtiofsd: Option<PathBuf>,
    /// Run nothing: render the report of an earlier run (its JSON) again,
    /// to stdout and as Markdown, JSON and SVG in --out.
    #[arg(long, value_name = "FILE")]
    pub from_json: Option<PathBuf>,
    /// A remark for the report (repeatable).
    #[arg(long = "note", value_name = "TEXT")]
    pub notes: Vec<String>,
}

/// A run's settings, from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Rows in table order.
    pub rows: Vec<RowKind>,
    /// Jobs in table order.
    pub jobs: Vec<Job>,
    /// fio parameters.
    pub params: FioParams,
    /// Report directory.
    pub out: PathBuf,
    /// Scratch directory.
    pub work: PathBuf,
}

impl Cli {
    /// Resolves defaults and checks values clap cannot.
    pub fn settings(&self) -> Result<Settings, Error> {
        let mut rows: Vec<RowKind> = RowKind::ALL.into_iter().filter(|r| self.rows.is_empty() || self.rows.contains(r)).collect();
        rows.dedup();
        let jobs = jobs::select(&self.jobs);
        let (runtime, ramp, size) = if self.quick { (2, 1, Bytes(64 << 20)) } else { (10, 2, Bytes(1 << 30)) };
        let params = FioParams {
            runtime_secs: self.runtime.unwrap_or(runtime),
            ramp_secs: self.ramp.unwrap_or(ramp),
            file_size: self.size.unwrap_or(size).get(),
            ioengine: "libaio".into(),
        };
        if self.rounds == 0 {
            return Err(Error::Config("--rounds must be at least 1".into()));
        }
        if params.runtime_secs == 0 {
            return Err(Error::Config("--runtime must be at least 1".into()));
        }
        if params.file_size < (16 << 20) || !params.file_size.is_multiple_of(1 << 20) {
            return Err(Error::Config("--size must be whole MiB, at least 16 MiB".into()));
        }
        if self.guest_cpus == 0 || self.guest_mem_mib < 256 {
            return Err(Error::Config("guests need at least 1 vCPU and 256 MiB".into()));
        }
        let work = self.work_dir.clone().unwrap_or_else(|| self.out.join("work"));
        Ok(Settings { rows, jobs, params, out: self.out.clone(), work })
    }
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every cell has numbers and nothing was left behind.
    Complete(Box<Report>),
    /// A report was written, but cells failed or something stayed behind
    /// (each named).
    Partial(Box<Report>, Vec<String>),
    /// Stopped by SIGINT/SIGTERM (after tearing down).
    Interrupted,
}

fn progress(msg: &str) {
    eprintln!("[fio-bench] {msg}");
}

/// Set by SIGINT/SIGTERM: stop after the job in progress.
fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        match rt.block_on(async { thinbox_daemon::shutdown_signal() }) {
            Ok(stop) => rt.block_on(stop),
            Err(e) => return progress(&format!("no signal handlers ({}): SIGINT/SIGTERM will not tear down", chain(&e))),
        }
        f.store(true, Ordering::SeqCst);
        eprintln!("[fio-bench] signal: stopping after the current job, then tearing down");
    });
    if spawned.is_err() {
        progress("no signal thread: SIGINT/SIGTERM will not tear down");
    }
    flag
}

/// UTC `YYYY-MM-DD HH:MM` of a Unix time.
pub fn utc(secs: u64) -> String {
    let days = secs / 86_400;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Civil from days (proleptic Gregorian), after Howard Hinnant's algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}")
}

/// Sets up one row; `Err` carries the reason it has no numbers.
fn setup_row(
    kind: RowKind,
    s: &Settings,
    cli: &Cli,
    guest: &Result<GuestConfig, String>,
    virtiofsd: &Result<Virtiofsd, String>,
) -> Result<Box<dyn Row>, Error> {
    let dir = s.work.join(kind.name());
    let g = || guest.as_ref().map_err(|e| Error::Unavailable(format!("no guest image: {e}")));
    Ok(match kind {
        RowKind::Runc => Box::new(rows::runc::Runc::setup(&dir, &s.params)?),
        RowKind::NineP => Box::new(rows::shared::NineP::setup(&dir, &s.params, g()?, NinePOptions { msize: cli.msize, cache: cli.ninep_cache })?),
        RowKind::VirtioFs => {
            let opts = VirtiofsOptions { daemon: virtiofsd.clone(), cache: cli.virtiofs_cache, direct_io: cli.virtiofs_direct_io };
            Box::new(rows::shared::VirtioFsRow::setup(&dir, &s.params, g()?, &opts)?)
        }
        RowKind::ThinboxRootfs => Box::new(rows::thinbox::Rootfs::setup(&dir, &s.params, g()?)?),
        RowKind::ThinboxEmptyDir => Box::new(rows::thinbox::EmptyDir::setup(&dir, &s.params, g()?)?),
    })
}

/// Mounts and loop devices still under `work`.
fn leftovers(work: &Path) -> Vec<String> {
    let mut left = Vec::new();
    match mountinfo::mounts_under(work) {
        Ok(mounts) => left.extend(mounts.into_iter().map(|mp| format!("still mounted: {}", mp.display()))),
        Err(e) => left.push(format!("cannot read {}: {e}", mountinfo::PATH)),
    }
    match thinbox_blockstore::scan_loops(work) {
        Ok(loops) => left.extend(loops.into_iter().map(|l| format!("loop device {} still bound to {}", l.node.display(), l.backing.display()))),
        Err(e) => left.push(format!("cannot list loop devices: {}", chain(&e))),
    }
    left
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(Error::io(format!("writing {}", path.display())))
}

/// Prints the report and writes `fio-bench.{md,json,svg}` into `out`.
pub fn publish(report: &Report, out: &Path) -> Result<(), Error> {
    print!("{}", report.to_text());
    std::fs::create_dir_all(out).map_err(Error::io(format!("creating {}", out.display())))?;
    let base = out.join("fio-bench");
    write(&base.with_extension("md"), &report.to_markdown())?;
    let json = report.to_json().map_err(|e| Error::Config(format!("serializing the report: {e}")))?;
    write(&base.with_extension("json"), &(json + "\n"))?;
    write(&base.with_extension("svg"), &svg::render(report)?)?;
    progress(&format!("report: {}.{{md,json,svg}}", base.display()));
    Ok(())
}

/// Everything the binary does.
pub fn main_with(cli: Cli) -> Result<Outcome, Error> {
    let started = Instant::now();
    if let Some(path) = &cli.from_json {
        let text = std::fs::read_to_string(path).map_err(Error::io(format!("reading {}", path.display())))?;
        let report: Report = serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: not a fio-bench report: {e}", path.display())))?;
        publish(&report, &cli.out)?;
        return Ok(Outcome::Complete(Box::new(report)));
    }
    let mut s = cli.settings()?;
    if !rustix::process::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    let stop = stop_flag();
    std::fs::create_dir_all(&s.out).map_err(Error::io(format!("creating {}", s.out.display())))?;
    if s.work.exists() {
        let left = leftovers(&s.work.canonicalize().map_err(Error::io(format!("resolving {}", s.work.display())))?);
        if !left.is_empty() {
            return Err(Error::Config(format!("{} holds a previous run's mounts or loops; clean up first: {}", s.work.display(), left.join("; "))));
        }
        std::fs::remove_dir_all(&s.work).map_err(Error::io(format!("removing the old {}", s.work.display())))?;
    }
    std::fs::create_dir_all(&s.work).map_err(Error::io(format!("creating {}", s.work.display())))?;
    s.work = s.work.canonicalize().map_err(Error::io(format!("resolving {}", s.work.display())))?;
    let fio_version = fio::host_version()?;
    let mut host = HostInfo::detect(fio_version);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    progress(&format!("host: {}", host.summary()));

    let needs_guest = s.rows.iter().any(|r| *r != RowKind::Runc);
    let guest = if needs_guest {
        let dir = cli.guest_cache_dir.clone().unwrap_or_else(GuestImage::default_cache_dir);
        progress(&format!("guest image in {} (built on first use)", dir.display()));
        GuestImage::ensure(&dir)
            .map(|image| GuestConfig {
                image,
                cpus: cli.guest_cpus,
                mem_mib: cli.guest_mem_mib,
                accel: match cli.accel {
                    AccelArg::Auto => AccelChoice::Auto,
                    AccelArg::Kvm => AccelChoice::Kvm,
                    AccelArg::Tcg => AccelChoice::Tcg,
                },
            })
            .map_err(|e| chain(&e))
    } else {
        Err("not needed".into())
    };
    let virtiofsd = if s.rows.contains(&RowKind::VirtioFs) { Virtiofsd::find(cli.virtiofsd.as_deref()) } else { Err("not needed".into()) };

    // 1. Set up every row.
    let mut live: Vec<Box<dyn Row>> = Vec::new();
    let mut infos: Vec<RowInfo> = Vec::new();
    for &kind in &s.rows {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        progress(&format!("setting up {}", kind.label()));
        let t = Instant::now();
        match setup_row(kind, &s, &cli, &guest, &virtiofsd) {
            Ok(row) => {
                progress(&format!("{} ready in {:.1} s: {}", kind.label(), t.elapsed().as_secs_f64(), row.info().runs_on()));
                infos.push(row.info().clone());
                live.push(row);
            }
            Err(e) => {
                let why = chain(&e);
                progress(&format!("{} unavailable: {why}", kind.label()));
                infos.push(RowInfo { kind, guest: None, setup: String::new(), unavailable: Some(why) });
            }
        }
    }

    // 2. Jobs, interleaved across rows, the whole matrix once per round.
    let mut cells: Vec<Cell> = live
        .iter()
        .flat_map(|r| {
            s.jobs.iter().map(|j| Cell {
                row: r.info().kind,
                job: *j,
                result: None,
                rounds: Vec::new(),
                error: None,
                iops_vs_runc: None,
                p99_vs_runc: None,
            })
        })
        .collect();
    let mut broken: Vec<(RowKind, String)> = Vec::new();
    'rounds: for round in 1..=cli.rounds {
        for job in &s.jobs {
            for row in &mut live {
                if stop.load(Ordering::SeqCst) {
                    break 'rounds;
                }
                let kind = row.info().kind;
                let Some(cell) = cells.iter_mut().find(|c| c.row == kind && c.job == *job) else { continue };
                if let Some((_, why)) = broken.iter().find(|(k, _)| *k == kind) {
                    cell.error.get_or_insert_with(|| format!("not run: an earlier job failed on this row ({why})"));
                    continue;
                }
                let of = if cli.rounds > 1 { format!(" (round {round}/{})", cli.rounds) } else { String::new() };
                progress(&format!("{} on {}{of}", job.label(), kind.label()));
                match row.run(job, &s.params) {
                    Ok(m) => {
                        progress(&format!("  {:.0} IOPS, {:.1} MiB/s, p99 {:.0} µs", m.iops, m.bw_bytes as f64 / f64::from(1 << 20), m.p99_us));
                        cell.rounds.push(m);
                    }
                    Err(e) => {
                        let why = chain(&e);
                        progress(&format!("  FAILED: {why}"));
                        // A guest whose harness failed (timeout, crash) fails every later job.
                        if matches!(e, Error::Guest { .. }) {
                            broken.push((kind, why.clone()));
                        }
                        cell.error.get_or_insert(why);
                    }
                }
            }
        }
    }
    for c in &mut cells {
        c.result = Measurement::median(&c.rounds);
    }
    let interrupted = stop.load(Ordering::SeqCst);

    // 3. Tear down, newest first.
    let mut problems: Vec<String> = Vec::new();
    while let Some(row) = live.pop() {
        let kind = row.info().kind;
        progress(&format!("tearing down {}", kind.label()));
        if let Err(e) = row.teardown() {
            problems.push(format!("teardown of {}: {}", kind.name(), chain(&e)));
        }
    }
    let left = leftovers(&s.work);
    if left.is_empty() {
        if let Err(e) = std::fs::remove_dir_all(&s.work) {
            problems.push(format!("removing {}: {e}", s.work.display()));
        }
    } else {
        problems.extend(left);
    }
    for p in &problems {
        progress(p);
    }
    if interrupted {
        return Ok(Outcome::Interrupted);
    }

    // 4. Report.
    for info in &infos {
        if info.unavailable.is_some() {
            for job in &s.jobs {
                cells.push(Cell {
                    row: info.kind,
                    job: *job,
                    result: None,
                    rounds: Vec::new(),
                    error: info.unavailable.clone(),
                    iops_vs_runc: None,
                    p99_vs_runc: None,
                });
            }
        }
    }
    cells.sort_by_key(|c| (c.row, c.job));
    host.load_end = host::load_average();
    let mut report = Report {
        mode: if cli.quick { "quick" } else { "full" }.into(),
        started: utc(now),
        host,
        params: s.params.clone(),
        rounds: cli.rounds,
        rows: infos,
        jobs: s.jobs.clone(),
        cells,
        headline: None,
        targets: Vec::new(),
        notes: cli.notes.clone(),
        wall_secs: started.elapsed().as_secs_f64(),
    };
    report.compute();
    publish(&report, &s.out)?;
    progress(&format!("wall time {:.0} s", report.wall_secs));

    let mut failures = report.smoke_failures();
    // The line tests/run.sh sums into its total: one check per cell.
    println!("fio-bench: {} passed, {} failed", report.cells.len() - failures.len(), failures.len());
    failures.extend(problems);
    if failures.is_empty() { Ok(Outcome::Complete(Box::new(report))) } else { Ok(Outcome::Partial(Box::new(report), failures)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_defaults_and_quick_mode() {
        let full = Cli::try_parse_from(["fio-bench"]).expect("parses").settings().expect("valid");
        assert_eq!(full.rows, RowKind::ALL.to_vec());
        assert_eq!(full.jobs.len(), 8);
        assert_eq!((full.params.runtime_secs, full.params.ramp_secs, full.params.file_size), (10, 2, 1 << 30));
        assert_eq!(full.work, PathBuf::from("target/fio-bench/work"));
        let quick = Cli::try_parse_from(["fio-bench", "--quick", "--runtime", "3"]).expect("parses").settings().expect("valid");
        assert_eq!((quick.params.runtime_secs, quick.params.ramp_secs, quick.params.file_size), (3, 1, 64 << 20));
    }

    #[test]
    fn cli_filters_and_checks() {
        let s = Cli::try_parse_from(["fio-bench", "--rows", "thinbox-rootfs,runc,9p", "--jobs", "qd16", "--size", "128MiB"])
            .expect("parses")
            .settings()
            .expect("valid");
        assert_eq!(s.rows, vec![RowKind::Runc, RowKind::NineP, RowKind::ThinboxRootfs], "table order, whatever the order given");
        assert!(s.jobs.iter().all(|j| j.iodepth == 16) && s.jobs.len() == 4);
        assert!(Cli::try_parse_from(["fio-bench", "--rows", "docker"]).is_err());
        assert!(Cli::try_parse_from(["fio-bench", "--jobs", "randread"]).is_err());
        assert!(Cli::try_parse_from(["fio-bench", "--size", "1000"]).expect("parses").settings().is_err());
        assert!(Cli::try_parse_from(["fio-bench", "--runtime", "0"]).expect("parses").settings().is_err());
        let v = Cli::try_parse_from(["fio-bench", "--virtiofs-direct-io", "false", "--9p-cache", "none"]).expect("parses");
        assert!(!v.virtiofs_direct_io && v.ninep_cache == NinePCache::None);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(1_795_459_744), "2026-11-23 18:49");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00");
    }

    #[test]
    fn error_chains_read_as_one_line() {
        let e = Error::Io { what: "mounting /x".into(), source: std::io::Error::from_raw_os_error(2) };
        assert!(chain(&e).starts_with("mounting /x: No such file or directory"), "{}", chain(&e));
    }
}
