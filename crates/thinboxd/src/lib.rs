//! thinboxd: Thinbox's one node daemon. One pool of copy-on-write block
//! devices serves both front ends: containerd's proxy snapshotter (container
//! rootfs and image layers) and the CSI driver (volumes).
//!
//! # Start
//! 1. Every front door is bound first (the snapshot socket, the CSI socket,
//!    the metrics address): a path or port already served fails the start
//!    before any state is opened.
//! 2. The block engine opens the pool under the root (one store, one flock)
//!    with both front ends' records as its consumers, whichever doors are
//!    served: reconciling without one front end's records would delete its
//!    devices.
//! 3. The CSI front end recovers its own side (publications, half-made
//!    volumes, stray images); then one reconciliation converges the pool with
//!    every record, and says what it did.
//! 4. The doors are served until SIGTERM/SIGINT, with one pool-pressure watch
//!    (growth of a file-backed thin pool), if asked `/metrics`, and if asked
//!    (`[snapshot.containerd_gc]`) a periodic sweep of the snapshots
//!    containerd forgot.
//!
//! # Stop
//! Connections get a short grace, the deleter stops after the device in hand
//! (what is still queued stays marked and the next start finishes it), and
//! with `release_on_exit` loops are detached and the embedded pool unmounted.

mod admin;
pub mod config;
mod gauges;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thinbox_blockstore::Engine;
use thinbox_csi::Driver;
use thinbox_csi::state::VolumeRecords;
use thinbox_daemon::{Bound, ServeError};
use thinbox_metrics::Metrics;
use thinbox_proto::admin::admin_server::AdminServer;
use thinbox_snapshotter::snapshots::SnapshotRecords;
use thinbox_snapshotter::{ContainerdGcConfig, Snapshots};

pub use config::{Config, ConfigError};

/// How long open connections get to finish after SIGTERM. containerd and
/// kubelet keep theirs open forever, so the wait must be bounded.
const GRACE: Duration = Duration::from_secs(2);

/// How often, at least, the pool's free space is checked (running containers
/// and volumes consume it); a device-mapper event wakes the check sooner.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// How long a sweep waits for each of containerd's answers.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors that stop the daemon; each renders on one line with its sources.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Metrics(#[from] thinbox_metrics::Error),
    #[error(transparent)]
    Pool(#[from] thinbox_blockstore::Error),
    #[error("volumes")]
    Csi(#[from] thinbox_csi::error::Error),
    #[error("start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("--node-id is not set and the hostname cannot serve as one")]
    NoNodeId,
    #[error("exiting for the service manager to restart thinboxd; the start recovers the state")]
    StoreFailed(#[source] thinbox_blockstore::Error),
}

/// What to run: the root and the configuration with the flags applied.
#[derive(Clone, Debug)]
pub struct Options {
    /// State directory: the store, the embedded pool, volume images.
    pub root: PathBuf,
    /// The configuration.
    pub config: Config,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(opts: Options) -> Result<(), Error> {
    let Options { root, config: cfg } = opts;
    cfg.validate()?;
    let node_id = match &cfg.csi.node_id {
        Some(n) => n.clone(),
        None => hostname().ok_or(Error::NoNodeId)?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(Error::Runtime)?;
    // Before anything else: a SIGTERM during start-up must stop the daemon
    // cleanly once it can, not kill it half-way.
    let signal = {
        let _rt = rt.enter();
        thinbox_daemon::shutdown_signal()?
    };

    // 1. The doors, before any state.
    let snapshot_door = cfg.snapshot.enabled.then(|| thinbox_daemon::bind_unix(&cfg.snapshot.address)).transpose()?;
    let csi_door = if cfg.csi.enabled {
        let path = thinbox_csi::config::endpoint_path(&cfg.csi.endpoint).map_err(|e| ConfigError::Invalid(format!("csi.endpoint: {e}")))?;
        Some(thinbox_daemon::bind_unix(&path)?)
    } else {
        None
    };
    let metrics_door = cfg.metrics_address.map(|a| rt.block_on(thinbox_metrics::bind(a))).transpose()?;

    // 2.-3. One engine for both front ends, then one reconciliation.
    let start = Instant::now();
    let engine = Arc::new(Engine::open(&root, cfg.pool.clone(), vec![Box::new(SnapshotRecords), Box::new(VolumeRecords)])?);
    let snapshots = Arc::new(Snapshots::new(engine.clone(), cfg.snapshot.clone()));
    let driver = Arc::new(Driver::new(engine.clone(), &root, &node_id, cfg.csi.clone())?);
    let report = engine.reconcile()?;
    tracing::info!(
        root = %root.display(),
        node = %node_id,
        backend = engine.pool().status().map(|s| s.backend).unwrap_or("?"),
        devices_removed = report.devices_removed.len(),
        missing = report.missing.len(),
        failed = report.failed.len(),
        orphans_failed = report.orphans_failed.len(),
        elapsed_ms = start.elapsed().as_millis() as u64,
        "pool open and reconciled"
    );

    // 4. Serve.
    let mut metrics = Metrics::new();
    metrics.register_collector(gauges::Pool::new(snapshots.clone(), driver.clone()));
    metrics.register_collector(thinbox_csi::metrics::Gauges::new(driver.clone()));
    let metrics = Arc::new(metrics);
    let sweep = (cfg.snapshot.enabled && cfg.snapshot.containerd_gc.interval_s > 0)
        .then(|| Sweep { cfg: cfg.snapshot.containerd_gc.clone(), ours: cfg.snapshot.address.clone() });
    let doors = Doors { snapshot: snapshot_door, csi: csi_door, metrics: metrics_door, sweep };
    let served = rt.block_on(serve(doors, signal, &snapshots, &driver, metrics, &engine));
    if let Err(Error::StoreFailed(_)) = served {
        // Like a crash: nothing more is asked of a store that refuses it.
        return served;
    }

    let release = cfg.release_on_exit;
    let released = driver.release(release).map_err(Error::from).and_then(|()| Ok(engine.shutdown(release)?));
    served?;
    released?;
    tracing::info!("stopped");
    Ok(())
}

/// The bound front doors, and the sweep that goes with the snapshot door.
struct Doors {
    snapshot: Option<Bound>,
    csi: Option<Bound>,
    metrics: Option<tokio::net::TcpListener>,
    sweep: Option<Sweep>,
}

/// The periodic sweep of snapshots containerd forgot: its settings, and the
/// snapshot socket containerd must use for it to do anything.
struct Sweep {
    cfg: ContainerdGcConfig,
    ours: PathBuf,
}

async fn serve(
    doors: Doors,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
    snapshots: &Arc<Snapshots>,
    driver: &Arc<Driver>,
    metrics: Arc<Metrics>,
    engine: &Arc<Engine>,
) -> Result<(), Error> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut servers = Vec::new();
    if let Some(bound) = doors.snapshot {
        tracing::info!(address = %bound.path().display(), "serving containerd.services.snapshots.v1 and thinbox.admin.v1");
        // The admin service spans both front ends: it joins the snapshot socket here.
        let admin = admin::Admin::new(engine.clone(), snapshots.clone(), driver.clone());
        let router = thinbox_snapshotter::server::router(snapshots.clone(), metrics.clone()).add_service(AdminServer::new(admin));
        servers.push(tokio::spawn(thinbox_daemon::serve_unix(router, bound, GRACE, stopped(stop_rx.clone()))));
    }
    if let Some(bound) = doors.csi {
        tracing::info!(socket = %bound.path().display(), "serving csi.v1 Identity, Controller, GroupController and Node");
        let router = thinbox_csi::server::router(driver.clone(), metrics.clone());
        servers.push(tokio::spawn(thinbox_daemon::serve_unix(router, bound, GRACE, stopped(stop_rx.clone()))));
    }
    let exporter = doors.metrics.map(|l| tokio::spawn(thinbox_metrics::serve(l, metrics.clone())));
    let maintenance = tokio::spawn(maintain(engine.clone(), driver.clone()));
    let sweeper = doors.sweep.map(|s| tokio::spawn(sweep_forgotten(snapshots.clone(), s, metrics.clone())));
    let stopper = tokio::spawn(async move {
        let mut maintenance = maintenance;
        let failed = tokio::select! {
            () = signal => {
                maintenance.abort();
                None
            }
            failure = &mut maintenance => failure.ok(),
        };
        let _ = stop_tx.send(true);
        failed
    });
    let mut result = Ok(());
    for s in servers {
        let r = match s.await {
            Ok(r) => r.map_err(Error::from),
            Err(e) => Err(Error::Runtime(std::io::Error::other(e))),
        };
        if result.is_ok() {
            result = r;
        }
    }
    for t in [exporter, sweeper].into_iter().flatten() {
        t.abort();
    }
    match stopper.await {
        Ok(Some(failure)) => Err(Error::StoreFailed(failure)),
        _ => result,
    }
}

/// Every `interval_s`, removes the snapshots the containerd at `address`
/// forgot (`thinboxctl gc --containerd`, on a timer). A containerd that is
/// down, or that does not use this daemon, makes a sweep do nothing. Each
/// sweep counts as the operation `containerd_gc` in `metrics`.
async fn sweep_forgotten(snapshots: Arc<Snapshots>, sweep: Sweep, metrics: Arc<Metrics>) {
    let Sweep { cfg, ours } = sweep;
    let every = Duration::from_secs(cfg.interval_s);
    let min_age = Duration::from_secs(cfg.min_age_s);
    tracing::info!(containerd = %cfg.address.display(), interval_s = cfg.interval_s, min_age_s = cfg.min_age_s, "sweeping snapshots containerd forgot");
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let started = Instant::now();
        let swept = thinbox_snapshotter::forgotten::sweep(&snapshots, &cfg.address, &ours, min_age, SWEEP_TIMEOUT).await;
        metrics.observe(thinbox_metrics::Api::Snapshots, "containerd_gc", swept.is_ok(), started.elapsed());
        match swept {
            Ok(s) if s.snapshotters.is_empty() => {
                tracing::debug!(containerd = %cfg.address.display(), "no snapshotter of containerd's is served here; nothing swept")
            }
            // Each removal is logged as it happens.
            Ok(s) => tracing::debug!(removed = s.removed, kept = s.kept, snapshotters = ?s.snapshotters, "swept snapshots containerd forgot"),
            Err(e) => tracing::warn!(containerd = %cfg.address.display(), error = %thinbox_daemon::chain(&e), "sweeping snapshots containerd forgot"),
        }
    }
}

/// Reconciles again while the last reconciliation did not converge
/// ([`Engine::heal`]), grows the pool ahead of need where the backend can,
/// gives freed blocks back to the root (the pool's and the `dir` volumes'),
/// and returns the store's failure once it has failed for good: then the
/// daemon must restart.
async fn maintain(engine: Arc<Engine>, driver: Arc<Driver>) -> thinbox_blockstore::Error {
    loop {
        let (e, d) = (engine.clone(), driver.clone());
        // Blocks until a device-mapper event (the thin pool crossing its
        // low-water mark) or MAINTAIN_EVERY; aborting the task at shutdown
        // lets the current round finish.
        let round = tokio::task::spawn_blocking(move || {
            if let Some(Err(err)) = e.heal() {
                tracing::warn!(error = %thinbox_daemon::chain(&err), "reconciling the pool again");
            }
            if let Err(e) = d.maintain() {
                tracing::warn!(error = %thinbox_daemon::chain(&e), "volume maintenance");
            }
            (e.pool().maintain_and_wait(MAINTAIN_EVERY), e.pool().store().failure())
        })
        .await;
        match round {
            Ok((_, Some(failure))) => {
                tracing::error!("the metadata store failed; stopping");
                return failure;
            }
            Ok((Ok(_), None)) => {}
            Ok((Err(e), None)) => {
                tracing::warn!(error = %thinbox_daemon::chain(&e), "pool maintenance");
                tokio::time::sleep(MAINTAIN_EVERY).await;
            }
            Err(e) => tracing::warn!(error = %e, "pool maintenance task"),
        }
    }
}

/// The host's name, the default node id (Kubernetes' default node name).
fn hostname() -> Option<String> {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_str().ok()?.trim().to_owned();
    (!name.is_empty()).then_some(name)
}

/// Applies command-line settings over a configuration: the flags win.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub snapshotter_address: Option<PathBuf>,
    pub csi_endpoint: Option<String>,
    pub node_id: Option<String>,
    pub metrics_address: Option<SocketAddr>,
    pub release_on_exit: bool,
    pub no_snapshotter: bool,
    pub no_csi: bool,
}

impl Overrides {
    /// `cfg` with these settings applied.
    pub fn apply(self, mut cfg: Config) -> Config {
        if let Some(a) = self.snapshotter_address {
            cfg.snapshot.address = a;
        }
        if let Some(e) = self.csi_endpoint {
            cfg.csi.endpoint = e;
        }
        if self.node_id.is_some() {
            cfg.csi.node_id = self.node_id;
        }
        if self.metrics_address.is_some() {
            cfg.metrics_address = self.metrics_address;
        }
        cfg.release_on_exit |= self.release_on_exit;
        cfg.snapshot.enabled &= !self.no_snapshotter;
        cfg.csi.enabled &= !self.no_csi;
        cfg
    }
}
