//! Serving on a unix socket: mode 0660, graceful stop on SIGTERM/SIGINT. The
//! socket carries containerd's snapshot service and Thinbox's admin service
//! (`thinboxctl`), so one path and one permission govern both.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use thinbox_metrics::Metrics;
pub use thinbox_proto::ServeError;
use thinbox_proto::admin::admin_server::AdminServer;
use thinbox_proto::snapshots::snapshots_server::SnapshotsServer;

use crate::admin::Admin;
use crate::service::Service;
use crate::snapshots::Snapshots;

/// How long open connections get to finish after SIGTERM. containerd keeps its
/// connection open forever, so the wait must be bounded; operations in flight
/// are waited for separately (see [`Snapshots::shutdown`]).
const GRACE: Duration = Duration::from_secs(2);

/// Binds `address`, serves until SIGTERM or SIGINT, then returns. Snapshot
/// service calls are counted and timed in `metrics`; serving those over HTTP
/// is the caller's (`thinbox_metrics::serve`).
pub async fn serve(snapshots: Arc<Snapshots>, address: &Path, metrics: Arc<Metrics>) -> Result<(), ServeError> {
    let router = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service::new(snapshots.clone(), metrics)))
        .add_service(AdminServer::new(Admin::new(snapshots.clone())));
    tracing::info!(address = %address.display(), "serving containerd.services.snapshots.v1 and thinbox.admin.v1");
    let maintenance = tokio::spawn(maintain(snapshots));
    let result = thinbox_proto::serve_unix(router, address, GRACE).await;
    maintenance.abort();
    result
}

/// How often, at least, the pool's free space is checked (running containers
/// consume it); a device-mapper event wakes the check sooner.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// Grows the pool ahead of need where the backend can.
async fn maintain(snapshots: Arc<Snapshots>) {
    loop {
        let s = snapshots.clone();
        // Blocks until a device-mapper event (the thin pool crossing its
        // low-water mark) or MAINTAIN_EVERY; aborting the task at shutdown
        // lets the current round finish.
        match tokio::task::spawn_blocking(move || s.pool().maintain_and_wait(MAINTAIN_EVERY)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::error::chain(&e), "pool maintenance");
                tokio::time::sleep(MAINTAIN_EVERY).await;
            }
            Err(e) => tracing::warn!(error = %e, "pool maintenance task"),
        }
    }
}
