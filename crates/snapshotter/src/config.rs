//! Daemon configuration: a TOML file (all keys optional) plus command-line flags.
//!
//! ```toml
//! release_on_exit = false      # detach loops and unmount the embedded pool on SIGTERM
//! [pool]
//! dir = "/var/lib/thinbox-pool"  # reflink-capable directory; absent: embedded XFS image
//! embedded_size = "64GiB"
//! reserve = "512MiB"
//! direct_io = true
//! [snapshot]
//! default_size = "10GiB"       # unless the label containerd.io/snapshot/max-size says otherwise
//! filesystem = "ext4"          # or "xfs"
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};
use thinbox_blockstore::{Bytes, FsType, PoolConfig};

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] thinbox_daemon::ConfigError),
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Snapshot defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Size of a snapshot without a `containerd.io/snapshot/max-size` label.
    pub default_size: Bytes,
    /// Filesystem of a snapshot without a parent.
    pub filesystem: FsType,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig { default_size: Bytes(10 << 30), filesystem: FsType::Ext4 }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The block pool.
    pub pool: PoolConfig,
    /// Snapshot defaults.
    pub snapshot: SnapshotConfig,
    /// On SIGTERM, detach every loop (lazily: in-use ones stay until released) and
    /// unmount the embedded pool. Off by default so running containers keep their
    /// devices across a restart of the daemon.
    pub release_on_exit: bool,
}

/// Smallest snapshot: room for an ext4 or xfs filesystem.
pub const MIN_SNAPSHOT_SIZE: Bytes = Bytes(300 << 20);

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = thinbox_daemon::load_toml(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.pool.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.snapshot.default_size < MIN_SNAPSHOT_SIZE {
            return Err(ConfigError::Invalid(format!(
                "snapshot.default_size {} is below the minimum {MIN_SNAPSHOT_SIZE}",
                self.snapshot.default_size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_config() {
        let cfg: Config = toml::from_str(
            r#"
            release_on_exit = true
            [pool]
            dir = "/srv/pool"
            reserve = "1GiB"
            [snapshot]
            default_size = "20GiB"
            filesystem = "xfs"
            "#,
        )
        .expect("valid config");
        cfg.validate().expect("valid values");
        assert_eq!(cfg.snapshot.default_size, Bytes(20 << 30));
        assert_eq!(cfg.snapshot.filesystem, FsType::Xfs);
        assert_eq!(cfg.pool.reserve, Bytes(1 << 30));
        assert!(cfg.release_on_exit);
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(toml::from_str::<Config>("[pool]\nsize = 1").is_err());
        assert!(toml::from_str::<Config>("[snapshot]\nfilesystem = \"zfs\"").is_err());
        let small: Config = toml::from_str("[snapshot]\ndefault_size = \"1MiB\"").expect("parses");
        assert!(small.validate().is_err());
        let rel: Config = toml::from_str("[pool]\ndir = \"relative\"").expect("parses");
        assert!(rel.validate().is_err());
    }

    #[test]
    fn thin_pool_sources_are_checked() {
        let ok: Config = toml::from_str("[pool.thin]\npool_name = \"vg-pool\"\ndiscard_on_delete = true").expect("parses");
        ok.validate().expect("an existing pool");
        assert_eq!(ok.pool.thin.metadata_limit_percent, 90);
        for bad in [
            "[pool.thin]\npool_name = \"p\"\ndata_device = \"/dev/vdb\"",
            "[pool.thin]\nmetadata_device = \"/dev/vdb\"",
            "[pool.thin]\nmetadata_device = \"/dev/vdb\"\ndata_device = \"/dev/vdb\"",
            "[pool.thin]\nmetadata_device = \"vdb\"\ndata_device = \"/dev/vdc\"",
            "[pool.thin]\nmetadata_limit_percent = 0",
            "[pool]\nbackend = \"reflink\"\n[pool.thin]\npool_name = \"p\"",
        ] {
            let cfg: Config = toml::from_str(bad).expect("parses");
            assert!(cfg.validate().is_err(), "accepted: {bad}");
        }
        assert!(toml::from_str::<Config>("[pool.thin]\nname = \"p\"").is_err(), "unknown key");
    }

    /// The sample in the README is a valid config.
    #[test]
    fn readme_sample_parses() {
        let readme = include_str!("../../../README.md");
        let start = readme.find("    release_on_exit = false").expect("README config sample");
        let sample: String =
            readme[start..].lines().take_while(|l| l.starts_with("    ") || l.is_empty()).map(|l| format!("{}\n", l.trim_start())).collect();
        let cfg: Config = toml::from_str(&sample).expect("README sample parses");
        cfg.validate().expect("README sample is valid");
        assert_eq!(cfg.pool.thin.pool_name.as_deref(), Some("vg-thinpool"));
    }
}
