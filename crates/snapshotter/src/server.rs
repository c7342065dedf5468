//! The snapshot front door: containerd's snapshot service and Thinbox's admin
//! service (`thinboxctl`) on one unix socket, so one path and one permission
//! govern both. The daemon binds and serves it (`thinbox_daemon::serve_unix`).

use std::sync::Arc;

use thinbox_metrics::Metrics;
use thinbox_proto::admin::admin_server::AdminServer;
use thinbox_proto::snapshots::snapshots_server::SnapshotsServer;
use tonic::transport::server::Router;

use crate::admin::Admin;
use crate::service::Service;
use crate::snapshots::Snapshots;

/// The services of the snapshot socket. Snapshot calls are counted and timed
/// in `metrics`.
pub fn router(snapshots: Arc<Snapshots>, metrics: Arc<Metrics>) -> Router {
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service::new(snapshots.clone(), metrics)))
        .add_service(AdminServer::new(Admin::new(snapshots)))
}
