//! Thinbox's containerd proxy snapshotter.
//!
//! # Lifecycle
//! * Start: the block engine opens the pool under `--root` (mounting the
//!   embedded pool image if no pool directory is configured) with
//!   [`snapshots::SnapshotRecords`] among its consumers; its reconciliation
//!   drops snapshot records a crash left half-made, removes devices no consumer
//!   references, and re-attaches active snapshots after a reboot
//!   ([`Snapshots::open`] does both for a daemon that serves snapshots alone). Then [`server::serve`] listens
//!   on the unix socket (mode 0660).
//! * Prepare/View: one transaction writes the snapshot and its device intent; the
//!   device is then cloned from the parent (or made with mkfs) and attached to a
//!   loop device; a second transaction marks it ready. The response is one mount
//!   `{type: ext4|xfs, source: /dev/loopN, options: [rw|ro]}`.
//! * Commit: the record becomes committed and the device is detached.
//! * Remove: the record goes (refused with children) and the device is marked
//!   `Deleting` in the same, unflushed transaction; the engine's deleter thread
//!   makes it durable and destroys the device after the call returns.
//!   `Cleanup` finishes pending deletions at once; a Prepare that finds the
//!   pool full while deletions are pending waits for them and tries once more.
//! * Stop (SIGTERM): stop accepting, finish requests in flight and the
//!   deletion in hand; devices still queued for deletion stay marked and the
//!   next start finishes them (as after a crash); devices stay attached unless
//!   `release_on_exit` is set.
//!
//! thinboxd serves its admin service (`thinbox.admin.v1`, for `thinboxctl`)
//! on the same socket; it spans both front ends, so it lives in the daemon.

pub mod config;
pub mod error;
pub mod filter;
pub mod forgotten;
pub mod meta;
pub mod server;
pub mod service;
mod shown;
pub mod snapshots;

pub use config::{ContainerdGcConfig, SnapshotConfig};
pub use error::Error;
pub use snapshots::Snapshots;
