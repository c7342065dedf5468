//! `thinbox-csi-bench`: what one `thinboxd` costs next to the two daemons it
//! replaced (`thinbox-snapshotter` and `thinbox-csi`): resident memory of
//! each daemon holding the same snapshots and volumes, and the latency of the
//! CSI calls of one volume's life against any CSI sockets, targets taking
//! turns. The daemons are started, filled and stopped by
//! `tests/bench/daemons.sh`; each subcommand here does one step:
//!
//! * `fill`: snapshots over snapshots.v1 and block volumes over CSI;
//! * `memory`: after an idle pause, each process's VmRSS, VmHWM, RssAnon and
//!   Pss, appended as JSON lines;
//! * `calls`: the timed rounds, written as JSON; whatever a failed or
//!   interrupted round made is undone;
//! * `report`: one Markdown table from those files;
//! * `groups`: group snapshot latency on one socket, next to as many single
//!   snapshots (`tests/bench/groups.sh` runs it on reflink and on dm-thin).

pub mod calls;
pub mod fill;
pub mod groups;
pub mod memory;
pub mod report;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::calls::{CallTimes, Target, TargetSpec};
use crate::fill::SnapshotPlan;
use crate::memory::{ProcessSpec, Reading};

/// Errors of a benchmark step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line.
    #[error("{0}")]
    Config(String),
    /// Could not connect to a socket.
    #[error("cannot connect to {}: {source}", socket.display())]
    Connect {
        /// Socket path.
        socket: PathBuf,
        /// Transport error.
        source: Box<tonic::transport::Error>,
    },
    /// A gRPC call failed.
    #[error("{what}: {} ({})", status.message(), status.code())]
    Rpc {
        /// Which call, on what.
        what: String,
        /// gRPC status.
        status: Box<tonic::Status>,
    },
    /// Reading or writing a file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being accessed.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A file or answer did not have the expected shape.
    #[error("{0}")]
    Parse(String),
    /// The SIGINT/SIGTERM handlers could not be installed.
    #[error("installing the signal handlers")]
    Signals(#[source] thinbox_daemon::ServeError),
    /// Stopped by SIGINT or SIGTERM (after cleaning up).
    #[error("interrupted")]
    Interrupted,
    /// The calls failed and cleaning up left something behind.
    #[error("{error}; left behind: {}", left.join("; "))]
    LeftBehind {
        /// The first error.
        error: Box<Error>,
        /// What could not be undone.
        left: Vec<String>,
    },
}

/// Command line of `thinbox-csi-bench`.
#[derive(Debug, Parser)]
#[command(
    name = "thinbox-csi-bench",
    version,
    about = "Daemon memory and CSI call latency, old daemons and new side by side (driven by tests/bench/daemons.sh)"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Timeout for connecting and for each request, in seconds.
    #[arg(long, global = true, default_value_t = 120)]
    pub timeout_secs: u64,
}

/// The steps.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create snapshots (snapshots.v1) and block volumes (CSI) that stay.
    Fill(FillArgs),
    /// Wait idle, then append each process's memory figures to a file.
    Memory(MemoryArgs),
    /// Time the CSI calls of one volume's life, targets taking turns.
    Calls(CallsArgs),
    /// Print the table of a run from the memory and calls files.
    Report(ReportArgs),
    /// Time group snapshots of N mounted volumes next to N single snapshots.
    Groups(GroupsArgs),
}

/// `groups`.
#[derive(Debug, Args)]
pub struct GroupsArgs {
    /// NAME=SOCKET,kubelet=DIR of the driver to measure.
    #[arg(long, value_name = "SPEC")]
    pub target: TargetSpec,
    /// Group sizes, comma-separated; each is measured every round.
    #[arg(long, value_delimiter = ',', default_value = "2,8")]
    pub sizes: Vec<usize>,
    /// Measured rounds.
    #[arg(long, default_value_t = 9)]
    pub rounds: usize,
    /// Unmeasured rounds first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Size of each volume, MiB.
    #[arg(long, default_value_t = 64)]
    pub volume_mib: u64,
    /// Idle time before each timed step, ms (the daemon's background
    /// deletions of the step before finish meanwhile).
    #[arg(long, default_value_t = 500)]
    pub pause_ms: u64,
}

/// `fill`.
#[derive(Debug, Args)]
pub struct FillArgs {
    /// snapshots.v1 socket to fill.
    #[arg(long, value_name = "SOCKET")]
    pub snapshots: Option<PathBuf>,
    /// Snapshots alive at the end (committed layers and active ones).
    #[arg(long, default_value_t = 1000)]
    pub snapshot_count: usize,
    /// Images: chains of committed layers under the active snapshots.
    #[arg(long, default_value_t = 10)]
    pub images: usize,
    /// Committed layers per image.
    #[arg(long, default_value_t = 10)]
    pub layers: usize,
    /// CSI socket to fill.
    #[arg(long, value_name = "SOCKET")]
    pub csi: Option<PathBuf>,
    /// Block volumes to create.
    #[arg(long, default_value_t = 100)]
    pub volumes: usize,
    /// Size of each volume, MiB.
    #[arg(long, default_value_t = 1024)]
    pub volume_mib: u64,
    /// Prefix of snapshot keys and volume names.
    #[arg(long, default_value = "fill")]
    pub prefix: String,
}

/// `memory`.
#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// GROUP:NAME=PID, repeatable: GROUP is the side (e.g. before, after).
    #[arg(long = "process", required = true, value_name = "SPEC")]
    pub processes: Vec<ProcessSpec>,
    /// Round number recorded with the readings.
    #[arg(long, default_value_t = 1)]
    pub round: u32,
    /// Seconds to wait, idle, before reading.
    #[arg(long, default_value_t = 5)]
    pub idle_secs: u64,
    /// JSON-lines file to append the readings to.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `calls`.
#[derive(Debug, Args)]
pub struct CallsArgs {
    /// NAME=SOCKET,kubelet=DIR, repeatable; the first is the baseline.
    #[arg(long = "target", required = true, value_name = "SPEC")]
    pub targets: Vec<TargetSpec>,
    /// Measured rounds per target.
    #[arg(long, default_value_t = 30)]
    pub rounds: usize,
    /// Unmeasured rounds per target first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Pause after each target's turn, ms, so that one daemon's background
    /// work (thinboxd's deleter) finishes before the other's turn.
    #[arg(long, default_value_t = 500)]
    pub pause_ms: u64,
    /// Size of each volume, MiB.
    #[arg(long, default_value_t = 1024)]
    pub volume_mib: u64,
    /// JSON file to write the samples to.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// JSON lines written by `memory`.
    #[arg(long, value_name = "FILE")]
    pub memory: Option<PathBuf>,
    /// JSON written by `calls`.
    #[arg(long, value_name = "FILE")]
    pub calls: Option<PathBuf>,
    /// A remark printed under the tables (repeatable).
    #[arg(long = "note", value_name = "TEXT")]
    pub notes: Vec<String>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn mib(v: u64) -> Result<u64, Error> {
    v.checked_mul(1 << 20).filter(|b| i64::try_from(*b).is_ok() && *b > 0).ok_or_else(|| Error::Config(format!("bad size {v} MiB")))
}

/// `fill`.
pub async fn fill(args: &FillArgs, timeout: Duration) -> Result<(), Error> {
    if args.snapshots.is_none() && args.csi.is_none() {
        return Err(Error::Config("nothing to fill: give --snapshots and/or --csi".into()));
    }
    if let Some(sock) = &args.snapshots {
        let plan = SnapshotPlan { total: args.snapshot_count, images: args.images, layers: args.layers };
        fill::snapshots(sock, plan, &args.prefix, timeout).await?;
    }
    if let Some(sock) = &args.csi {
        fill::volumes(sock, args.volumes, mib(args.volume_mib)?, &args.prefix, timeout).await?;
    }
    Ok(())
}

/// `memory`: every process is read at the same moment, after the pause.
pub async fn memory(args: &MemoryArgs) -> Result<Vec<Reading>, Error> {
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let readings = args.processes.iter().map(|p| memory::read_process(p, args.round)).collect::<Result<Vec<_>, _>>()?;
    let mut lines = String::new();
    for r in &readings {
        lines.push_str(&serde_json::to_string(r).map_err(|e| Error::Parse(e.to_string()))?);
        lines.push('\n');
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&args.out).map_err(io(format!("opening {}", args.out.display())))?;
    f.write_all(lines.as_bytes()).map_err(io(format!("writing {}", args.out.display())))?;
    Ok(readings)
}

/// SIGINT or SIGTERM, from the daemons' own handler.
pub(crate) fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, Error> {
    thinbox_daemon::shutdown_signal().map_err(Error::Signals)
}

async fn run_rounds(targets: &mut [Target], args: &CallsArgs, times: &mut CallTimes, run_id: &str) -> Result<(), Error> {
    let bytes = i64::try_from(mib(args.volume_mib)?).map_err(|_| Error::Config("volume too large".into()))?;
    let pause = Duration::from_millis(args.pause_ms);
    for round in 0..args.warmup + args.rounds {
        let measured = round >= args.warmup;
        for i in calls::turn_order(targets.len(), round) {
            let t = &mut targets[i];
            let name = format!("{run_id}-{}-r{round}", t.spec.name);
            let took = t.round(&name, bytes).await?;
            if measured {
                times.push(&t.spec.name, &took);
            }
            tokio::time::sleep(pause).await;
        }
        if measured {
            tracing::info!(round = round - args.warmup + 1, of = args.rounds, "round done");
        }
    }
    Ok(())
}

/// `calls`: connects, runs the rounds, undoes what is left, writes the samples.
pub async fn calls(args: &CallsArgs, timeout: Duration) -> Result<CallTimes, Error> {
    for (i, t) in args.targets.iter().enumerate() {
        if args.targets[..i].iter().any(|o| o.name == t.name) {
            return Err(Error::Config(format!("target name {:?} used twice", t.name)));
        }
    }
    if args.rounds == 0 {
        return Err(Error::Config("--rounds must be at least 1".into()));
    }
    let mut targets = Vec::new();
    for spec in &args.targets {
        targets.push(Target::connect(spec.clone(), timeout).await?);
    }
    let mut times = CallTimes {
        targets: args.targets.clone(),
        rounds: args.rounds,
        warmup: args.warmup,
        pause_ms: args.pause_ms,
        volume_bytes: mib(args.volume_mib)?,
        ..Default::default()
    };
    let run_id = format!("csib{}", std::process::id());
    let stop = shutdown_signal()?;
    let outcome = tokio::select! {
        r = run_rounds(&mut targets, args, &mut times, &run_id) => r,
        _ = stop => Err(Error::Interrupted),
    };
    let mut left = Vec::new();
    for t in &mut targets {
        left.extend(t.cleanup().await.into_iter().map(|l| format!("{}: {l}", t.spec.name)));
    }
    match (outcome, left.is_empty()) {
        (Ok(()), true) => {}
        (Ok(()), false) => return Err(Error::LeftBehind { error: Box::new(Error::Parse("cleanup after the rounds".into())), left }),
        (Err(e), true) => return Err(e),
        (Err(e), false) => return Err(Error::LeftBehind { error: Box::new(e), left }),
    }
    let json = serde_json::to_string_pretty(&times).map_err(|e| Error::Parse(e.to_string()))?;
    std::fs::write(&args.out, json + "\n").map_err(io(format!("writing {}", args.out.display())))?;
    Ok(times)
}

fn read_text(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))
}

/// `report`: the Markdown table of a run.
pub fn report(args: &ReportArgs) -> Result<String, Error> {
    let readings = match &args.memory {
        Some(p) => read_text(p)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<Reading>(l).map_err(|e| Error::Parse(format!("{}: {e}", p.display()))))
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let times = match &args.calls {
        Some(p) => Some(serde_json::from_str::<CallTimes>(&read_text(p)?).map_err(|e| Error::Parse(format!("{}: {e}", p.display())))?),
        None => None,
    };
    Ok(report::render(&readings, times.as_ref(), &args.notes))
}

/// Everything the binary does.
pub async fn main_with(cli: Cli) -> Result<(), Error> {
    let timeout = Duration::from_secs(cli.timeout_secs.max(1));
    match &cli.command {
        Command::Fill(a) => fill(a, timeout).await,
        Command::Memory(a) => {
            for r in memory(a).await? {
                tracing::info!(process = %r.name, pid = r.pid, vm_rss_kib = r.vm_rss_kib, pss_kib = r.pss_kib, "memory");
            }
            Ok(())
        }
        Command::Calls(a) => calls(a, timeout).await.map(|_| ()),
        Command::Report(a) => {
            print!("{}", report(a)?);
            Ok(())
        }
        Command::Groups(a) => {
            let bytes = i64::try_from(mib(a.volume_mib)?).map_err(|_| Error::Config("volume too large".into()))?;
            let plan = groups::Plan {
                sizes: a.sizes.clone(),
                rounds: a.rounds,
                warmup: a.warmup,
                volume_bytes: bytes,
                pause: Duration::from_millis(a.pause_ms),
            };
            print!("{}", groups::run(a.target.clone(), &plan, timeout, &format!("csig{}", std::process::id())).await?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "thinbox-csi-bench",
            "calls",
            "--target",
            "before=/w/old/csi.sock,kubelet=/w/old/kubelet",
            "--target",
            "after=/w/new/csi.sock,kubelet=/w/new/kubelet",
            "--rounds",
            "20",
            "--out",
            "/w/calls.json",
        ])
        .expect("parses");
        let Command::Calls(a) = cli.command else { panic!("calls") };
        assert_eq!(a.targets.len(), 2);
        assert_eq!(a.rounds, 20);
        let cli = Cli::try_parse_from(["x", "memory", "--process", "before:thinbox-csi=12", "--out", "/m.jsonl"]).expect("parses");
        assert!(matches!(cli.command, Command::Memory(ref m) if m.processes[0].pid == 12 && m.idle_secs == 5));
        assert!(Cli::try_parse_from(["x", "memory", "--process", "12", "--out", "/m"]).is_err());
        assert!(Cli::try_parse_from(["x", "calls", "--out", "/c.json"]).is_err());
        let cli = Cli::try_parse_from(["x", "groups", "--target", "t=/w/csi.sock,kubelet=/w/kubelet"]).expect("parses");
        assert!(matches!(cli.command, Command::Groups(ref g) if g.sizes == [2, 8] && g.rounds == 9));
    }

    #[test]
    fn sizes() {
        assert_eq!(mib(1024).expect("ok"), 1 << 30);
        assert!(mib(0).is_err());
        assert!(mib(u64::MAX).is_err());
    }
}
