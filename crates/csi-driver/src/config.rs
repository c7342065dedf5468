//! Configuration file (TOML): every key optional, unknown keys are errors.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thinbox_block_passthrough::KATA_DIRECT_VOLUMES;
use thinbox_blockstore::{Bytes, FsType, PoolConfig};

use crate::state::Sandbox;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] thinbox_daemon::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The driver's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The kubelet's root directory: every target path must lie inside it.
    pub kubelet_dir: PathBuf,
    /// The pool of `block` volumes (same keys as the snapshotter's `[pool]`).
    pub pool: PoolConfig,
    /// Filesystem when neither the request nor the StorageClass names one.
    pub default_fs: FsType,
    /// Size when a request gives no capacity range (and for inline volumes
    /// without a `size` attribute).
    pub default_size: Bytes,
    /// How volumes are published when neither the StorageClass nor the inline
    /// attributes say (`runc`: mounted on the host; `kata`: direct volume).
    pub default_sandbox: Sandbox,
    /// Where Kata looks for direct-volume records.
    pub direct_volumes: PathBuf,
    /// XFS filesystem mounted with `prjquota` for `dir` volumes; absent: an
    /// embedded image under the state root.
    pub dir_path: Option<PathBuf>,
    /// Size of that embedded image (sparse).
    pub dir_pool_size: Bytes,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kubelet_dir: PathBuf::from("/var/lib/kubelet"),
            pool: PoolConfig::default(),
            default_fs: FsType::Ext4,
            default_size: Bytes(1 << 30),
            default_sandbox: Sandbox::Runc,
            direct_volumes: PathBuf::from(KATA_DIRECT_VOLUMES),
            dir_path: None,
            dir_pool_size: Bytes(64 << 30),
        }
    }
}

/// Smallest volume: room for ext4 or xfs metadata (xfs needs 300 MiB).
pub const MIN_VOLUME_SIZE: Bytes = Bytes(300 << 20);

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
        for (key, p) in [("kubelet_dir", &self.kubelet_dir), ("direct_volumes", &self.direct_volumes)]
            .into_iter()
            .chain(self.dir_path.iter().map(|p| ("dir_path", p)))
        {
            if !p.is_absolute() {
                return Err(ConfigError::Invalid(format!("{key} {} must be an absolute path", p.display())));
            }
        }
        if self.default_size < MIN_VOLUME_SIZE {
            return Err(ConfigError::Invalid(format!("default_size {} is below the minimum {MIN_VOLUME_SIZE}", self.default_size)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parses_and_validates() {
        let cfg: Config =
            toml::from_str("kubelet_dir = \"/k\"\ndefault_sandbox = \"kata\"\ndefault_fs = \"xfs\"\n[pool]\nbackend = \"reflink\"").unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.default_sandbox, Sandbox::Kata);
        assert!(toml::from_str::<Config>("kubelet = \"/k\"").is_err(), "unknown key");
        let rel: Config = toml::from_str("kubelet_dir = \"k\"").unwrap();
        assert!(rel.validate().is_err());
        let small: Config = toml::from_str("default_size = \"1MiB\"").unwrap();
        assert!(small.validate().is_err());
    }

    /// The sample in docs/csi.md is a valid config.
    #[test]
    fn documented_sample_parses() {
        let doc = include_str!("../../../docs/csi.md");
        let start = doc.find("    kubelet_dir = ").unwrap();
        let sample: String =
            doc[start..].lines().take_while(|l| l.starts_with("    ") || l.is_empty()).map(|l| format!("{}\n", l.trim_start())).collect();
        let cfg: Config = toml::from_str(&sample).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.dir_pool_size, Bytes(64 << 30));
    }
}
