//! Thinbox's CSI driver: node-local volumes for VM sandboxes.
//!
//! # Lifecycle
//! 1. thinboxd opens [`Driver`] on the block engine of its state root: the pool
//!    that rootfs snapshots use too (`block` and `file` volumes and CSI
//!    snapshots: thin devices or reflinked images), the quota filesystem of
//!    `dir` volumes, and the driver's own redb tables in the pool's database.
//!    Reconciliation rolls back half-made volumes, finishes half-deleted
//!    ones and forgets publications whose target is gone.
//! 2. It serves CSI Identity, Controller, GroupController and Node on one unix socket. In
//!    Kubernetes, external-provisioner runs beside it on every node
//!    (`--node-deployment`), so Controller calls are node-local too.
//! 3. CreateVolume records the intent, then makes the device (formatted
//!    unless raw block only, or encrypted and formatted in a Kata guest) or
//!    directory. NodePublishVolume attaches it and
//!    either mounts it at the target (runC pods) or writes a Kata direct-volume
//!    record (`thinbox.io/sandbox: kata`) so the runtime passes the device into
//!    the guest as virtio-blk: the filesystem is never mounted on the host and
//!    in a guest at once. Inline ephemeral volumes are `file` volumes made at
//!    publish and removed at unpublish.

pub mod config;
pub mod controller;
pub mod driver;
pub mod error;
pub mod groups;
pub mod metrics;
pub mod node;
mod ownership;
pub mod paths;
pub mod recover;
pub mod server;
pub mod service;
pub mod state;
mod storage;

pub use config::CsiConfig;
pub use driver::Driver;
pub use service::{Csi, DRIVER_NAME, TOPOLOGY_KEY};
