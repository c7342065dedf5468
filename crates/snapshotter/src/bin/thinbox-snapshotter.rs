//! `thinbox-snapshotter --root DIR --address SOCKET [--config FILE]
//! [--metrics-address ADDR]`: serves containerd's snapshot API with
//! block-device snapshots.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use thinbox_metrics::Metrics;
use thinbox_snapshotter::error::chain;
use thinbox_snapshotter::{Config, Snapshots, server};

/// containerd proxy snapshotter: every snapshot is a copy-on-write block device.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// State directory (metadata, embedded pool image).
    #[arg(long)]
    root: PathBuf,
    /// Unix socket to serve on.
    #[arg(long)]
    address: PathBuf,
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDRESS/metrics (e.g. 127.0.0.1:9821).
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
    /// Detach loop devices and unmount the embedded pool on exit.
    #[arg(long)]
    release_on_exit: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("THINBOX_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %chain(e.as_ref()), "thinbox-snapshotter failed");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    cfg.release_on_exit |= args.release_on_exit;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // Bound before the state is opened, so a bad or busy address fails the
    // start before any device is attached.
    let exporter = match args.metrics_address {
        Some(addr) => Some(rt.block_on(thinbox_metrics::bind(addr))?),
        None => None,
    };
    let start = std::time::Instant::now();
    let (snapshots, _report) = Snapshots::open(&args.root, cfg)?;
    tracing::info!(root = %args.root.display(), elapsed_ms = start.elapsed().as_millis() as u64, "state opened");
    let snapshots = Arc::new(snapshots);
    let metrics = Arc::new(Metrics::new());
    let exporter = exporter.map(|listener| rt.spawn(thinbox_metrics::serve(listener, metrics.clone())));
    let served = rt.block_on(server::serve(snapshots.clone(), &args.address, metrics));
    if let Some(task) = exporter {
        task.abort();
    }
    served?;
    snapshots.shutdown()?;
    tracing::info!("stopped");
    Ok(())
}
