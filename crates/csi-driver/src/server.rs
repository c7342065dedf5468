//! The CSI front door: Identity, Controller, GroupController and Node on one unix socket. The
//! daemon binds and serves it (`thinbox_daemon::serve_unix`).

use std::path::PathBuf;
use std::sync::Arc;

use thinbox_metrics::Metrics;
use thinbox_proto::csi::v1::controller_server::ControllerServer;
use thinbox_proto::csi::v1::group_controller_server::GroupControllerServer;
use thinbox_proto::csi::v1::identity_server::IdentityServer;
use thinbox_proto::csi::v1::node_server::NodeServer;
use tonic::transport::server::Router;

use crate::driver::Driver;
use crate::error::invalid;
use crate::service::Csi;

/// The socket path of a CSI endpoint (`unix:///csi/csi.sock` or a bare path).
pub fn endpoint_path(endpoint: &str) -> crate::error::Result<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(invalid(format!("endpoint {endpoint:?} must be unix:///absolute/path")));
    }
    Ok(PathBuf::from(path))
}

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;

    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(endpoint_path("unix:///csi/csi.sock").unwrap(), Path::new("/csi/csi.sock"));
        assert_eq!(endpoint_path("/csi/csi.sock").unwrap(), Path::new("/csi/csi.sock"));
        assert!(endpoint_path("unix://relative.sock").is_err());
        assert!(endpoint_path("tcp://1.2.3.4:5").is_err());
    }
}
