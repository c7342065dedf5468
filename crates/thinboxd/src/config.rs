//! thinboxd's configuration: one TOML file (every key optional, unknown keys
//! are errors) with a section per part of the daemon, then the command-line
//! flags on top.
//!
//! ```toml
//! release_on_exit = false          # on SIGTERM: detach loops, unmount the embedded pool
//! metrics_address = "127.0.0.1:9822"
//! [pool]                           # the one pool (blockstore::PoolConfig)
//! [snapshot]                       # containerd's snapshotter (thinbox_snapshotter::SnapshotConfig)
//! [csi]                            # the CSI driver (thinbox_csi::CsiConfig)
//! ```

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thinbox_blockstore::PoolConfig;
use thinbox_csi::CsiConfig;
use thinbox_snapshotter::SnapshotConfig;

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// On SIGTERM, detach every loop (lazily: in-use ones stay until released)
    /// and unmount the embedded pool. Off by default, so running sandboxes
    /// keep their devices across a restart of the daemon.
    pub release_on_exit: bool,
    /// Serve Prometheus metrics at `http://ADDRESS/metrics`; absent: not served.
    pub metrics_address: Option<SocketAddr>,
    /// The one pool under container rootfs and volumes.
    pub pool: PoolConfig,
    /// The snapshot front end.
    pub snapshot: SnapshotConfig,
    /// The volume front end.
    pub csi: CsiConfig,
}

/// Errors of the configuration; each renders on one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] thinbox_daemon::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = thinbox_daemon::load_toml(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.pool.validate().map_err(|e| ConfigError::Invalid(format!("pool: {}", thinbox_daemon::chain(&e))))?;
        self.snapshot.validate().map_err(ConfigError::Invalid)?;
        self.csi.validate().map_err(ConfigError::Invalid)?;
        if !self.snapshot.enabled && !self.csi.enabled {
            return Err(ConfigError::Invalid("snapshot.enabled and csi.enabled are both false: nothing to serve".into()));
        }
        if self.snapshot.enabled
            && self.csi.enabled
            && thinbox_csi::config::endpoint_path(&self.csi.endpoint).ok().as_deref() == Some(self.snapshot.address.as_path())
        {
            return Err(ConfigError::Invalid(format!("snapshot.address and csi.endpoint name the same socket {}", self.snapshot.address.display())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::PathBuf;

    use thinbox_blockstore::{Bytes, FsType};

    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = thinbox_daemon::parse_toml(Path::new("t.toml"), text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn sections_and_defaults() {
        let cfg = parse(
            r#"
            release_on_exit = true
            metrics_address = "127.0.0.1:9822"
            [pool]
            reserve = "1GiB"
            [snapshot]
            default_size = "20GiB"
            filesystem = "xfs"
            [csi]
            kubelet_dir = "/k"
            default_sandbox = "kata"
            "#,
        )
        .unwrap();
        assert!(cfg.release_on_exit);
        assert_eq!(cfg.pool.reserve, Bytes(1 << 30));
        assert_eq!((cfg.snapshot.default_size, cfg.snapshot.filesystem), (Bytes(20 << 30), FsType::Xfs));
        assert_eq!(cfg.snapshot.address, PathBuf::from("/run/thinbox/snapshotter.sock"));
        assert_eq!(cfg.csi.endpoint, "unix:///var/lib/kubelet/plugins/csi.thinbox.io/csi.sock");
        assert_eq!(cfg.csi.kubelet_dir, PathBuf::from("/k"));
        assert_eq!(Config::default(), parse("").unwrap());
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values_naming_them() {
        for (text, says) in [
            ("[pool]\nsize = 1", "unknown field `size`"),
            ("kubelet_dir = \"/k\"", "unknown field `kubelet_dir`"),
            ("[snapshot]\nfilesystem = \"zfs\"", "zfs"),
            ("[snapshot]\ndefault_size = \"1MiB\"", "snapshot.default_size"),
            ("[csi]\nendpoint = \"tcp://1.2.3.4:5\"", "csi.endpoint"),
            ("[pool]\ndir = \"relative\"", "pool: "),
            ("[snapshot]\nenabled = false\n[csi]\nenabled = false", "nothing to serve"),
            ("[snapshot]\naddress = \"/s.sock\"\n[csi]\nendpoint = \"unix:///s.sock\"", "same socket"),
        ] {
            let e = parse(text).unwrap_err();
            let line = thinbox_daemon::chain(&e);
            assert!(line.contains(says), "{text:?}: {line}");
            assert!(!line.contains('\n'), "{line}");
        }
    }

    /// The node config the unit and the package install sets nothing but
    /// defaults (its commented keys show them).
    #[test]
    fn shipped_node_config_is_the_defaults() {
        assert_eq!(parse(include_str!("../../../deploy/host/thinboxd.toml")).unwrap(), Config::default());
    }

    /// The samples in the README and docs/csi.md are valid configs.
    #[test]
    fn documented_samples_parse() {
        for (doc, first) in [(include_str!("../../../README.md"), "    release_on_exit = "), (include_str!("../../../docs/csi.md"), "    [csi]")] {
            let start = doc.find(first).unwrap();
            let sample: String =
                doc[start..].lines().take_while(|l| l.starts_with("    ") || l.is_empty()).map(|l| format!("{}\n", l.trim_start())).collect();
            parse(&sample).unwrap();
        }
    }
}
