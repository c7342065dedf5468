//! The `[snapshot]` section of thinboxd's configuration: the snapshot front
//! door and the defaults of new snapshots.
//!
//! ```toml
//! [snapshot]
//! enabled = true                                # serve containerd's snapshots.v1 (and thinbox.admin.v1)
//! address = "/run/thinbox/snapshotter.sock"
//! default_size = "10GiB"   # unless the label containerd.io/snapshot/max-size says otherwise
//! filesystem = "ext4"      # or "xfs"
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thinbox_blockstore::{Bytes, FsType};

/// Where containerd's proxy plugin finds the snapshotter by default.
pub const DEFAULT_ADDRESS: &str = "/run/thinbox/snapshotter.sock";

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
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig { enabled: true, address: PathBuf::from(DEFAULT_ADDRESS), default_size: Bytes(10 << 30), filesystem: FsType::Ext4 }
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
    }
}
