//! Generates the tonic/prost code for our own copies of the published protos
//! (containerd snapshots, namespaces and introspection, CSI v1.12.0) and for
//! Thinbox's own admin API.
//! Well-known types (`google.protobuf.Timestamp`, `Int64Value`, ...) map to
//! `prost-types`, tonic-prost-build's default.
//! `protoc` comes from `protoc-bin-vendored` so a fresh machine needs cargo only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().build_server(true).build_client(true).compile_protos(
        &[
            "proto/containerd/types/mount.proto",
            "proto/containerd/services/snapshots/v1/snapshots.proto",
            "proto/containerd/services/namespaces/v1/namespace.proto",
            "proto/containerd/services/introspection/v1/introspection.proto",
            "proto/thinbox/admin/v1/admin.proto",
            "proto/csi/v1/csi.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
