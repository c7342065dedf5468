//! The snapshot front door: containerd's snapshot service. The daemon binds
//! and serves it (`thinbox_daemon::serve_unix`), adding its own services (the
//! admin service, which spans every front end) to the same socket, so one path
//! and one permission govern them all.

use std::sync::Arc;

use thinbox_metrics::Metrics;
use thinbox_proto::snapshots::snapshots_server::SnapshotsServer;
use tonic::transport::server::Router;

use crate::service::Service;
use crate::snapshots::Snapshots;

/// containerd's snapshot service over `snapshots`. Calls are counted and timed
/// in `metrics`.
pub fn router(snapshots: Arc<Snapshots>, metrics: Arc<Metrics>) -> Router {
    tonic::transport::Server::builder().add_service(SnapshotsServer::new(Service::new(snapshots, metrics)))
}
