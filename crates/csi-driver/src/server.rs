//! Serving the three CSI services on one unix socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thinbox_metrics::Metrics;
use thinbox_proto::ServeError;
use thinbox_proto::csi::v1::controller_server::ControllerServer;
use thinbox_proto::csi::v1::identity_server::IdentityServer;
use thinbox_proto::csi::v1::node_server::NodeServer;

use crate::driver::Driver;
use crate::error::invalid;
use crate::metrics::Gauges;
use crate::service::Csi;

/// Connections get this long to finish after SIGTERM.
const GRACE: Duration = Duration::from_secs(2);

/// The socket path of a CSI endpoint (`unix:///csi/csi.sock` or a bare path).
pub fn endpoint_path(endpoint: &str) -> crate::error::Result<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(invalid(format!("endpoint {endpoint:?} must be unix:///absolute/path")));
    }
    Ok(PathBuf::from(path))
}

/// Serves until SIGTERM or SIGINT, and metrics on `metrics_address` if given.
pub async fn serve(driver: Arc<Driver>, socket: &Path, metrics_address: Option<SocketAddr>) -> Result<(), ServeError> {
    let mut metrics = Metrics::new();
    metrics.register_collector(Gauges::new(driver.clone()));
    let metrics = Arc::new(metrics);
    let exporter = match metrics_address {
        Some(addr) => {
            // Bound before serving, so a bad or busy address fails the start.
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Io {
                op: "bind metrics endpoint",
                path: addr.to_string(),
                source,
            })?;
            Some(tokio::spawn(thinbox_metrics::serve(listener, metrics.clone())))
        }
        None => None,
    };
    let csi = Csi::new(driver, metrics);
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(csi.clone()))
        .add_service(ControllerServer::new(csi.clone()))
        .add_service(NodeServer::new(csi));
    tracing::info!(socket = %socket.display(), "serving csi.v1 Identity, Controller and Node");
    let result = thinbox_proto::serve_unix(router, socket, GRACE).await;
    if let Some(t) = exporter {
        t.abort();
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(endpoint_path("unix:///csi/csi.sock").unwrap(), Path::new("/csi/csi.sock"));
        assert_eq!(endpoint_path("/csi/csi.sock").unwrap(), Path::new("/csi/csi.sock"));
        assert!(endpoint_path("unix://relative.sock").is_err());
        assert!(endpoint_path("tcp://1.2.3.4:5").is_err());
    }
}
