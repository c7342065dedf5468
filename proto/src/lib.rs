//! Wire definitions for Thinbox, generated from our own `.proto` transcriptions of
//! published APIs (containerd `snapshots.v1` and `types.Mount`).
//!
//! The generated modules mirror the protobuf packages so that type paths read like
//! the upstream API: `containerd::services::snapshots::v1::PrepareSnapshotRequest`.

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
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types::Mount;
