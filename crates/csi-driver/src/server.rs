//! The CSI front door: Identity, Controller, GroupController and Node on one unix socket. The
//! daemon binds and serves it (`thinbox_daemon::serve_unix`).

use std::sync::Arc;

use thinbox_metrics::Metrics;
use thinbox_proto::csi::v1::controller_server::ControllerServer;
use thinbox_proto::csi::v1::group_controller_server::GroupControllerServer;
use thinbox_proto::csi::v1::identity_server::IdentityServer;
use thinbox_proto::csi::v1::node_server::NodeServer;
use tonic::transport::server::Router;

use crate::driver::Driver;
use crate::service::Csi;

/// The CSI services (Identity, Controller, GroupController, Node); calls are counted and timed in `metrics` (the
/// driver's gauges are [`crate::metrics::Gauges`], registered by the daemon).
pub fn router(driver: Arc<Driver>, metrics: Arc<Metrics>) -> Router {
    let csi = Csi::new(driver, metrics);
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(csi.clone()))
        .add_service(ControllerServer::new(csi.clone()))
        .add_service(GroupControllerServer::new(csi.clone()))
        .add_service(NodeServer::new(csi))
}
