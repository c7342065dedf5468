//! The `[snapshot]` section of thinboxd's configuration: the snapshot front
//! door and the defaults of new snapshots.
//!
//! ```toml
//! [snapshot]
//! enabled = true                                # serve containerd's snapshots.v1 (and thinbox.admin.v1)
//! address = "/run/thinbox/snapshotter.sock"
//! default_size = "10GiB"   # unless the label containerd.io/snapshot/max-size says otherwise
//! filesystem = "ext4"      # or "xfs"
//!
//! [snapshot.containerd_gc]  # the daemon's sweep of snapshots containerd forgot
//! interval_s = 0            # seconds between sweeps; 0: never (`thinboxctl gc --containerd` on request)
//! address = "/run/containerd/containerd.sock"
//! min_age_s = 600           # a snapshot changed more recently is kept
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thinbox_blockstore::{Bytes, FsType};

/// Where containerd's proxy plugin finds the snapshotter by default.
pub const DEFAULT_ADDRESS: &str = "/run/thinbox/snapshotter.sock";

/// containerd's socket, as Debian's containerd serves it.
pub const CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";

/// The snapshot front end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Serve the snapshot API (off: the daemon serves volumes only; the
    /// pool's snapshot records are still reconciled and kept).
    pub enabled: bool,
    /// Unix socket of containerd's proxy plugin (and of `thinboxctl`).
    pub address: PathBuf,
    /// Size of a snapshot without a `containerd.io/snapshot/max-size` label.
    pub default_size: Bytes,
    /// Filesystem of a snapshot without a parent.
    pub filesystem: FsType,
    /// The daemon's sweep of snapshots containerd forgot.
    pub containerd_gc: ContainerdGcConfig,
}

/// `[snapshot.containerd_gc]`: every `interval_s`, the daemon does what
/// `thinboxctl gc --containerd` does (see [`crate::forgotten`]). Off by
/// default: it is right only where one containerd uses the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerdGcConfig {
    /// Seconds between sweeps, the first one interval after start; 0: never.
    pub interval_s: u64,
    /// containerd's socket.
    pub address: PathBuf,
    /// A snapshot created or changed less than this many seconds before a
    /// sweep is kept: containerd may be about to record it.
    pub min_age_s: u64,
}

impl Default for ContainerdGcConfig {
    fn default() -> Self {
        ContainerdGcConfig { interval_s: 0, address: PathBuf::from(CONTAINERD_ADDRESS), min_age_s: 600 }
    }
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            enabled: true,
            address: PathBuf::from(DEFAULT_ADDRESS),
            default_size: Bytes(10 << 30),
            filesystem: FsType::Ext4,
            containerd_gc: ContainerdGcConfig::default(),
        }
    }
}

/// Smallest snapshot: room for an ext4 or xfs filesystem.
pub const MIN_SNAPSHOT_SIZE: Bytes = Bytes(300 << 20);

impl SnapshotConfig {
    /// Checks what serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.address.is_absolute() {
            return Err(format!("snapshot.address {} must be an absolute path", self.address.display()));
        }
        if self.default_size < MIN_SNAPSHOT_SIZE {
            return Err(format!("snapshot.default_size {} is below the minimum {MIN_SNAPSHOT_SIZE}", self.default_size));
        }
        if !self.containerd_gc.address.is_absolute() {
            return Err(format!("snapshot.containerd_gc.address {} must be an absolute path", self.containerd_gc.address.display()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn defaults_and_checks() {
        let d = SnapshotConfig::default();
        d.validate().unwrap();
        assert!(d.enabled);
        assert_eq!(d.address, PathBuf::from(DEFAULT_ADDRESS));
        let cfg: SnapshotConfig = toml::from_str("default_size = \"20GiB\"\nfilesystem = \"xfs\"").unwrap();
        assert_eq!((cfg.default_size, cfg.filesystem), (Bytes(20 << 30), FsType::Xfs));
        assert!(toml::from_str::<SnapshotConfig>("filesystem = \"zfs\"").is_err());
        assert!(toml::from_str::<SnapshotConfig>("size = 1").is_err(), "unknown key");
        let small: SnapshotConfig = toml::from_str("default_size = \"1MiB\"").unwrap();
        assert!(small.validate().unwrap_err().contains("snapshot.default_size"));
        let rel: SnapshotConfig = toml::from_str("address = \"s.sock\"").unwrap();
        assert!(rel.validate().is_err());
        assert_eq!(d.containerd_gc.interval_s, 0, "the sweep is off by default");
        let gc: SnapshotConfig = toml::from_str("[containerd_gc]\ninterval_s = 3600\nmin_age_s = 60").unwrap();
        gc.validate().unwrap();
        assert_eq!((gc.containerd_gc.interval_s, gc.containerd_gc.min_age_s), (3600, 60));
        assert_eq!(gc.containerd_gc.address, PathBuf::from(CONTAINERD_ADDRESS));
        assert!(toml::from_str::<SnapshotConfig>("[containerd_gc]\nevery = 1").is_err(), "unknown key");
        let rel: SnapshotConfig = toml::from_str("[containerd_gc]\naddress = \"c.sock\"").unwrap();
        assert!(rel.validate().unwrap_err().contains("snapshot.containerd_gc.address"));
    }
}
