//! `thinbox-snapshot-bench`: the same snapshots.v1 operation sequences against
//! any snapshot service reachable on a unix socket — Thinbox's own socket, or
//! containerd's main socket with `snapshotter = "overlayfs"` and a
//! `containerd-namespace` header — with per-operation latency statistics,
//! the daemon's resident memory, and ratios against the first target.
//!
//! Targets are interleaved inside each workload (repeat 1 on every target,
//! then repeat 2, ...) so that background noise on a shared machine hits all
//! of them alike. Every key carries a per-run prefix; everything a run creates
//! is removed, also after errors and on SIGINT/SIGTERM (best effort).

pub mod client;
pub mod report;
pub mod results;
pub mod spec;
pub mod workloads;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;

use crate::client::Target;
use crate::report::{Host, Leftover, Report, RunConfig};
use crate::results::{Failure, Results, Unit};
use crate::spec::{TargetSpec, Workload};
use crate::workloads::RssMix;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line.
    #[error("{0}")]
    Config(String),
    /// Could not connect to a target's socket.
    #[error("target {target}: cannot connect to {}: {source}", socket.display())]
    Connect {
        /// Target name.
        target: String,
        /// Socket path.
        socket: PathBuf,
        /// Transport error.
        source: Box<tonic::transport::Error>,
    },
    /// The `--settle` command failed.
    #[error("target {target}: the --settle command failed ({status})")]
    Settle {
        /// Target name.
        target: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// A snapshots.v1 call failed.
    #[error("target {target}: {op} {key:?}: {} ({})", status.message(), status.code())]
    Rpc {
        /// Target name.
        target: String,
        /// Operation.
        op: &'static str,
        /// Snapshot key (the new name for Commit).
        key: String,
        /// gRPC status.
        status: Box<tonic::Status>,
    },
    /// Reading `/proc` or writing an output file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being accessed.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The SIGINT/SIGTERM handlers could not be installed.
    #[error("installing the signal handlers")]
    Signals(#[source] thinbox_daemon::ServeError),
    /// Should not happen (a task panicked, ...).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Command line of `thinbox-snapshot-bench`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "thinbox-snapshot-bench",
    version,
    about = "Benchmark containerd snapshots.v1 services (Thinbox, containerd overlayfs, ...) side by side",
    after_help = "Example:\n  thinbox-snapshot-bench \\\n    --target overlayfs=/run/containerd/containerd.sock,snapshotter=overlayfs,namespace=bench,pid=$(pidof containerd) \\\n    --target thinbox=/run/thinbox/thinbox.sock,pid=$(pidof thinboxd)\n\nThe first --target is the baseline: ratio columns read <target> / <first target>."
)]
pub struct Cli {
    /// NAME=SOCKET[,snapshotter=NAME][,namespace=NS][,pid=PID]; repeatable,
    /// the first is the baseline. containerd needs snapshotter= and namespace=.
    #[arg(long = "target", required = true, value_name = "SPEC")]
    pub targets: Vec<TargetSpec>,
    /// Comma-separated workloads: chain, parallel, rss.
    #[arg(long, value_delimiter = ',', default_value = "chain,parallel,rss")]
    pub workloads: Vec<Workload>,
    /// Layers in each chain.
    #[arg(long, default_value_t = 16)]
    pub chain_layers: usize,
    /// Chains per target.
    #[arg(long, default_value_t = 5)]
    pub chain_repeats: usize,
    /// Containers prepared at once in the parallel workload.
    #[arg(long, default_value_t = 100)]
    pub parallel: usize,
    /// Maximum requests in flight in the parallel workload (0 = all).
    #[arg(long, default_value_t = 0)]
    pub concurrency: usize,
    /// Parallel rounds per target.
    #[arg(long, default_value_t = 1)]
    pub parallel_repeats: usize,
    /// Snapshots alive at once in the rss workload (one committed base included).
    #[arg(long, default_value_t = 1000)]
    pub rss_count: usize,
    /// Kinds of snapshot in the rss workload.
    #[arg(long, value_enum, default_value_t = RssMix::Active)]
    pub rss_mix: RssMix,
    /// Pause before each RSS reading, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub rss_settle_ms: u64,
    /// Timeout for connecting and for each request, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Shell command (`sh -c`) run after each target's turn in a workload,
    /// not measured, before the next target starts: e.g. one that waits until
    /// every target's background cleanup has finished, so that one target's
    /// garbage collection does not run during another's measurements. It
    /// gets TBB_TARGET and TBB_WORKLOAD; failing fails that target's workload.
    #[arg(long, value_name = "CMD")]
    pub settle: Option<String>,
    /// A remark to print under the run description (repeatable), e.g. how
    /// the daemons were set up.
    #[arg(long = "note", value_name = "TEXT")]
    pub notes: Vec<String>,
    /// Also write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also write the report as a Markdown section here.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
}

impl Cli {
    /// The workloads flag arrives as one parsed list per occurrence; flatten
    /// and de-duplicate.
    fn workload_list(&self) -> Vec<Workload> {
        let mut out = Vec::new();
        for w in &self.workloads {
            if !out.contains(w) {
                out.push(*w);
            }
        }
        out
    }

    /// Checks values clap cannot.
    pub fn validate(&self) -> Result<RunConfig, Error> {
        for (i, t) in self.targets.iter().enumerate() {
            if self.targets[..i].iter().any(|o| o.name == t.name) {
                return Err(Error::Config(format!("target name {:?} used twice", t.name)));
            }
        }
        let workloads = self.workload_list();
        let positive = |name: &str, v: usize| {
            if v == 0 { Err(Error::Config(format!("--{name} must be at least 1"))) } else { Ok(()) }
        };
        positive("chain-layers", self.chain_layers)?;
        positive("chain-repeats", self.chain_repeats)?;
        positive("parallel", self.parallel)?;
        positive("parallel-repeats", self.parallel_repeats)?;
        if self.rss_count < 2 {
            return Err(Error::Config("--rss-count must be at least 2".into()));
        }
        positive("timeout-secs", self.timeout_secs as usize)?;
        Ok(RunConfig {
            workloads,
            chain_layers: self.chain_layers,
            chain_repeats: self.chain_repeats,
            parallel: self.parallel,
            parallel_concurrency: if self.concurrency == 0 { self.parallel } else { self.concurrency.min(self.parallel) },
            parallel_repeats: self.parallel_repeats,
            rss_count: self.rss_count,
            rss_mix: self.rss_mix,
            timeout_secs: self.timeout_secs,
            settle: self.settle.clone(),
        })
    }
}

/// A per-run key prefix: `tbb-<pid>-<unix ms>`.
pub fn new_run_id() -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or_default();
    format!("tbb-{}-{ms}", std::process::id())
}

/// Connects to every target, in order.
pub async fn connect_all(specs: &[TargetSpec], timeout: Duration) -> Result<Vec<Target>, Error> {
    let mut targets = Vec::with_capacity(specs.len());
    for spec in specs {
        targets.push(Target::connect(spec.clone(), timeout).await?);
    }
    Ok(targets)
}

fn progress(msg: &str) {
    eprintln!("[snapshot-bench] {msg}");
}

/// Runs the workloads, interleaving targets within each. Failures are
/// recorded (after cleaning up the failed target) and the run goes on.
pub async fn run_workloads(targets: &[Target], cfg: &RunConfig, run_id: &str, rss_settle: Duration) -> Results {
    let mut results = Results::new(targets.iter().map(|t| t.name().to_owned()).collect());
    for (i, t) in targets.iter().enumerate() {
        if let Err(e) = workloads::warm_up(t, &format!("{run_id}-t{i}")).await {
            progress(&format!("warm-up failed on {}: {e}", t.name()));
            t.cleanup().await;
        }
    }
    if let Some(cmd) = &cfg.settle
        && let Err(e) = settle(cmd, "all", "warm-up").await
    {
        progress(&format!("after the warm-up: {e}"));
    }
    for &workload in &cfg.workloads {
        let repeats = match workload {
            Workload::Chain => cfg.chain_repeats,
            Workload::Parallel => cfg.parallel_repeats,
            Workload::Rss => 1,
        };
        if workload == Workload::Rss {
            results.declare(workload, "prepare", Unit::Ms);
            if cfg.rss_mix == RssMix::Mixed {
                results.declare(workload, "commit", Unit::Ms);
            }
            results.declare(workload, "remove", Unit::Ms);
            for op in workloads::rss_ops(cfg.rss_count) {
                results.declare(workload, &op, Unit::MiB);
            }
        }
        for repeat in 0..repeats {
            for (i, t) in targets.iter().enumerate() {
                if results.failed(workload, t.name()) {
                    continue;
                }
                progress(&format!("{workload} {}/{repeats} on {}", repeat + 1, t.name()));
                let prefix = format!("{run_id}-t{i}-{workload}-r{repeat}");
                let outcome = match workload {
                    Workload::Chain => workloads::chain(t, &prefix, cfg.chain_layers).await,
                    Workload::Parallel => workloads::parallel(t, &prefix, cfg.parallel, cfg.parallel_concurrency).await,
                    Workload::Rss => workloads::rss(t, &prefix, cfg.rss_count, cfg.rss_mix, rss_settle).await,
                };
                let outcome = match (outcome, &cfg.settle) {
                    (Ok(batch), Some(cmd)) => settle(cmd, t.name(), &workload.to_string()).await.map(|()| batch),
                    (outcome, _) => outcome,
                };
                match outcome {
                    Ok(batch) => results.merge(workload, i, batch),
                    Err(e) => {
                        progress(&format!("FAILED {workload} on {}: {e}", t.name()));
                        results.failures.push(Failure { workload, target: t.name().to_owned(), repeat, error: e.to_string() });
                        t.cleanup().await;
                    }
                }
            }
        }
    }
    results
}

/// Runs the `--settle` command after `target`'s turn in `workload` (and once
/// after the warm-up).
async fn settle(cmd: &str, target: &str, workload: &str) -> Result<(), Error> {
    let start = std::time::Instant::now();
    let status = tokio::process::Command::new("sh")
        .args(["-c", cmd])
        .env("TBB_TARGET", target)
        .env("TBB_WORKLOAD", workload)
        .stdin(std::process::Stdio::null())
        .status()
        .await
        .map_err(|source| Error::Io { what: format!("running --settle command {cmd:?}"), source })?;
    progress(&format!("settled after {workload} on {target} in {:.1} s", start.elapsed().as_secs_f64()));
    if status.success() { Ok(()) } else { Err(Error::Settle { target: target.to_owned(), status }) }
}

/// Removes whatever every target still holds; returns what stayed.
pub async fn cleanup_all(targets: &[Target]) -> Vec<Leftover> {
    let mut left = Vec::new();
    for t in targets {
        for (key, error) in t.cleanup().await {
            left.push(Leftover { target: t.name().to_owned(), key, error });
        }
    }
    left
}

fn write_file(path: &PathBuf, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|source| Error::Io { what: format!("writing {}", path.display()), source })
}

/// How the run ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every workload ran on every target and nothing was left behind.
    Complete(Box<Report>),
    /// A report was produced but something failed or stayed behind.
    Partial(Box<Report>),
    /// Stopped by SIGINT/SIGTERM (after cleanup).
    Interrupted,
}

/// Everything the binary does: validate, connect, run, clean up, print the
/// table to stdout and write the requested files.
pub async fn main_with(cli: Cli) -> Result<Outcome, Error> {
    let cfg = cli.validate()?;
    let timeout = Duration::from_secs(cli.timeout_secs);
    let targets = connect_all(&cli.targets, timeout).await?;
    let run_id = new_run_id();
    progress(&format!("run id {run_id}"));

    let run = run_workloads(&targets, &cfg, &run_id, Duration::from_millis(cli.rss_settle_ms));
    let stop = thinbox_daemon::shutdown_signal().map_err(Error::Signals)?;
    let results = tokio::select! {
        r = run => Some(r),
        _ = stop => None,
    };
    let leftovers = cleanup_all(&targets).await;
    for l in &leftovers {
        progress(&format!("could not remove {} on {}: {}", l.key, l.target, l.error));
    }
    let Some(results) = results else {
        progress("interrupted; created snapshots removed");
        return Ok(Outcome::Interrupted);
    };

    let report = Report::build(run_id, Host::detect(), cfg, cli.targets.clone(), &results, leftovers, cli.notes.clone());
    print!("{}", report.to_text());
    if let Some(path) = &cli.markdown {
        write_file(path, &report.to_markdown())?;
    }
    if let Some(path) = &cli.json {
        let json = report.to_json().map_err(|e| Error::Internal(format!("serializing report: {e}")))?;
        write_file(path, &(json + "\n"))?;
    }
    if report.failures.is_empty() && report.leftovers.is_empty() {
        Ok(Outcome::Complete(Box::new(report)))
    } else {
        Ok(Outcome::Partial(Box::new(report)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_and_validates() {
        let cli = Cli::try_parse_from([
            "thinbox-snapshot-bench",
            "--target",
            "overlayfs=/c.sock,snapshotter=overlayfs,namespace=bench",
            "--target",
            "thinbox=/t.sock",
            "--workloads",
            "rss,chain",
            "--concurrency",
            "500",
        ])
        .expect("parses");
        let cfg = cli.validate().expect("valid");
        assert_eq!(cfg.workloads, vec![Workload::Rss, Workload::Chain]);
        assert_eq!(cfg.parallel_concurrency, 100);
        assert_eq!(cli.targets[0].namespace.as_deref(), Some("bench"));
    }

    #[test]
    fn cli_rejects_duplicate_names_and_bad_specs() {
        let cli = Cli::try_parse_from(["x", "--target", "a=/1.sock", "--target", "a=/2.sock"]).expect("parses");
        assert!(cli.validate().is_err());
        assert!(Cli::try_parse_from(["x", "--target", "nope"]).is_err());
        assert!(Cli::try_parse_from(["x"]).is_err());
    }
}
