//! `thinboxd --root DIR [--snapshotter-address SOCK] [--csi-endpoint unix://SOCK]
//! [--node-id NODE] [--metrics-address ADDR] [--config FILE]`: Thinbox's node
//! daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use thinboxd::{Config, Options, Overrides};

/// Thinbox's node daemon: one pool of copy-on-write block devices for container
/// rootfs (a containerd proxy snapshotter) and volumes (a CSI driver), handed to
/// VM sandboxes as virtio-blk.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// State directory: the store, the embedded pool image, volume images.
    #[arg(long, default_value = "/var/lib/thinbox")]
    root: PathBuf,
    /// TOML configuration file ([pool], [snapshot], [csi]; see /etc/thinbox/config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Unix socket for containerd's proxy plugin and thinboxctl [config: snapshot.address;
    /// default /run/thinbox/snapshotter.sock].
    #[arg(long)]
    snapshotter_address: Option<PathBuf>,
    /// CSI endpoint, unix:///path [config: csi.endpoint; default
    /// unix:///var/lib/kubelet/plugins/csi.thinbox.io/csi.sock].
    #[arg(long)]
    csi_endpoint: Option<String>,
    /// This node's Kubernetes name [config: csi.node_id; default: the hostname].
    #[arg(long)]
    node_id: Option<String>,
    /// Serve Prometheus metrics at http://ADDRESS/metrics, e.g. 127.0.0.1:9822 [config: metrics_address].
    #[arg(long)]
    metrics_address: Option<SocketAddr>,
    /// Do not serve the snapshotter (volumes only) [config: snapshot.enabled].
    #[arg(long)]
    no_snapshotter: bool,
    /// Do not serve CSI (snapshots only) [config: csi.enabled].
    #[arg(long)]
    no_csi: bool,
    /// On exit, detach loop devices and unmount the embedded pool [config: release_on_exit].
    #[arg(long)]
    release_on_exit: bool,
}

fn main() -> ExitCode {
    thinbox_daemon::init_tracing();
    let args = Args::parse();
    let result = match &args.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    };
    let result = result.map_err(thinboxd::Error::from).and_then(|cfg| {
        let overrides = Overrides {
            snapshotter_address: args.snapshotter_address,
            csi_endpoint: args.csi_endpoint,
            node_id: args.node_id,
            metrics_address: args.metrics_address,
            release_on_exit: args.release_on_exit,
            no_snapshotter: args.no_snapshotter,
            no_csi: args.no_csi,
        };
        thinboxd::run(Options { root: args.root, config: overrides.apply(cfg) })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %thinbox_daemon::chain(&e), "thinboxd failed");
            ExitCode::FAILURE
        }
    }
}
