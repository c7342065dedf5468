//! `thinbox-csi --endpoint unix:///csi/csi.sock --node-id NODE --root DIR
//! [--config FILE]`: the CSI driver (Identity, Controller, Node).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use thinbox_csi::error::chain;
use thinbox_csi::{Config, Driver, server};

/// CSI driver for node-local block and file volumes, passed into Kata as virtio-blk.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// CSI endpoint: unix:///path/to/csi.sock.
    #[arg(long)]
    endpoint: String,
    /// This node's name (Kubernetes node name).
    #[arg(long)]
    node_id: String,
    /// State directory (volume records, pool, file volume images).
    #[arg(long)]
    root: PathBuf,
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDRESS/metrics (e.g. 0.0.0.0:9822).
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
    /// Detach devices and unmount the embedded pool on exit (tests).
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
            tracing::error!(error = %chain(e.as_ref()), "thinbox-csi failed");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if args.node_id.is_empty() {
        return Err("--node-id must not be empty".into());
    }
    let socket = server::endpoint_path(&args.endpoint)?;
    let start = std::time::Instant::now();
    let driver = Arc::new(Driver::open(&args.root, &args.node_id, cfg)?);
    tracing::info!(root = %args.root.display(), node = %args.node_id, elapsed_ms = start.elapsed().as_millis() as u64, "state opened");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(server::serve(driver.clone(), &socket, args.metrics_address))?;
    driver.shutdown(args.release_on_exit)?;
    tracing::info!("stopped");
    Ok(())
}
