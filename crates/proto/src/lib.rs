//! Wire definitions for Thinbox, generated from our own `.proto` transcriptions of
//! published APIs (containerd `snapshots.v1` and `types.Mount`, the parts of
//! containerd's `namespaces.v1` and `introspection.v1` that `thinboxctl` calls,
//! and the Container Storage Interface `csi.v1` at spec v1.12.0), and of
//! Thinbox's own administration API (`thinbox.admin.v1`, served next to
//! `snapshots.v1`).
//!
//! The generated modules mirror the protobuf packages so that type paths read like
//! the upstream API: `containerd::services::snapshots::v1::PrepareSnapshotRequest`,
//! `csi::v1::NodePublishVolumeRequest`.
//!
//! CSI: servers and clients are generated for the `Identity`, `Controller`,
//! `GroupController` and `Node` services (`csi::v1::node_server::NodeServer`,
//! `csi::v1::identity_client::IdentityClient`, ...). The alpha `SnapshotMetadata`
//! service is not transcribed. Well-known types come from `prost-types`
//! (`ProbeResponse::ready` is an `Option<bool>`, `Snapshot::creation_time` an
//! `Option<prost_types::Timestamp>`).

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

/// containerd APIs.
pub mod containerd {
    /// `containerd.types`.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services.*`.
    pub mod services {
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
        /// `containerd.services.namespaces`.
        pub mod namespaces {
            /// `containerd.services.namespaces.v1`: only `List`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.namespaces.v1");
            }
        }
        /// `containerd.services.introspection`.
        pub mod introspection {
            /// `containerd.services.introspection.v1`: only `Plugins`, and of a
            /// plugin only its type, id and exports.
            pub mod v1 {
                tonic::include_proto!("containerd.services.introspection.v1");
            }
        }
    }
}

/// Thinbox's own APIs.
pub mod thinbox {
    /// `thinbox.admin`.
    pub mod admin {
        /// `thinbox.admin.v1`.
        pub mod v1 {
            tonic::include_proto!("thinbox.admin.v1");
        }
    }
}

/// Container Storage Interface.
pub mod csi {
    /// `csi.v1`, transcribed from the CSI spec v1.12.0.
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types::Mount;
pub use csi::v1 as csi_v1;
pub use thinbox::admin::v1 as admin;

/// A gRPC channel over a unix socket (containerd and CSI speak gRPC on unix
/// sockets); `timeout` bounds connecting and each request.
pub async fn unix_channel(
    socket: impl AsRef<std::path::Path>,
    timeout: std::time::Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let socket = socket.as_ref().to_owned();
    // The URI is required but unused: the connector ignores it.
    tonic::transport::Endpoint::from_static("http://[::]:50051")
        .timeout(timeout)
        .connect_timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await
}
