//! The `[csi]` section of thinboxd's configuration: the CSI front door and
//! the defaults of new volumes. Every key is optional; unknown keys are errors.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thinbox_block_passthrough::KATA_DIRECT_VOLUMES;
use thinbox_block_passthrough::kata_shim::SANDBOX_DIRS;
use thinbox_blockstore::{Bytes, FsType};

use crate::state::{Encryption, Sandbox};

/// Where kubelet's plugin registration finds the driver by default.
pub const DEFAULT_ENDPOINT: &str = "unix:///var/lib/kubelet/plugins/csi.thinbox.io/csi.sock";

/// The volume front end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CsiConfig {
    /// Serve CSI (off: the daemon serves snapshots only; the pool's volume
    /// records are still reconciled and kept).
    pub enabled: bool,
    /// CSI endpoint: `unix:///absolute/path`.
    pub endpoint: String,
    /// This node's name as Kubernetes knows it; absent: the hostname.
    pub node_id: Option<String>,
    /// The kubelet's root directory: every target path must lie inside it.
    pub kubelet_dir: PathBuf,
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
    /// Where the Kata runtimes keep their sandboxes' shim sockets
    /// (`<dir>/<sandbox id>/shim-monitor.sock`): the Go runtime's, then
    /// runtime-rs'.
    pub kata_sandbox_dirs: Vec<PathBuf>,
    /// XFS filesystem mounted with `prjquota` for `dir` volumes; absent: an
    /// embedded image under the state root.
    pub dir_path: Option<PathBuf>,
    /// Size of that embedded image (sparse).
    pub dir_pool_size: Bytes,
}

impl Default for CsiConfig {
    fn default() -> Self {
        CsiConfig {
            enabled: true,
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            node_id: None,
            kubelet_dir: PathBuf::from("/var/lib/kubelet"),
            default_fs: FsType::Ext4,
            default_size: Bytes(1 << 30),
            default_sandbox: Sandbox::Runc,
            direct_volumes: PathBuf::from(KATA_DIRECT_VOLUMES),
            kata_sandbox_dirs: SANDBOX_DIRS.iter().map(PathBuf::from).collect(),
            dir_path: None,
            dir_pool_size: Bytes(64 << 30),
        }
    }
}

/// Volume sizes are whole 4 KiB blocks, what every backend and filesystem
/// here takes.
pub const ALIGN: u64 = 4096;

/// The data offset of cryptsetup's default LUKS2 layout (two metadata copies
/// and the key slots), which Kata's guest-side encryption uses.
pub const LUKS2_HEADER: u64 = 16 << 20;

/// The smallest volume that holds `fs` (`None`: a raw device, or a
/// directory), inside LUKS2 if `encryption`: mkfs.xfs refuses less than
/// 300 MiB; ext4 fits its 4 MiB journal from 8 MiB; a device or a quota
/// needs one block.
pub fn min_volume_size(fs: Option<FsType>, encryption: Option<Encryption>) -> Bytes {
    let fs = match fs {
        Some(FsType::Xfs) => 300 << 20,
        Some(FsType::Ext4) => 8 << 20,
        None => ALIGN,
    };
    Bytes(fs + encryption.map_or(0, |_| LUKS2_HEADER))
}

impl CsiConfig {
    /// Checks what serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        endpoint_path(&self.endpoint).map_err(|e| format!("csi.endpoint: {e}"))?;
        if self.node_id.as_deref() == Some("") {
            return Err("csi.node_id must not be empty".into());
        }
        for (key, p) in [("kubelet_dir", &self.kubelet_dir), ("direct_volumes", &self.direct_volumes)]
            .into_iter()
            .chain(self.dir_path.iter().map(|p| ("dir_path", p)))
            .chain(self.kata_sandbox_dirs.iter().map(|p| ("kata_sandbox_dirs", p)))
        {
            if !p.is_absolute() {
                return Err(format!("csi.{key} {} must be an absolute path", p.display()));
            }
        }
        let floor = min_volume_size(Some(self.default_fs), None);
        if self.default_size < floor {
            return Err(format!("csi.default_size {} is below the smallest {} volume, {floor}", self.default_size, self.default_fs.as_str()));
        }
        Ok(())
    }
}

/// The socket path of a CSI endpoint (`unix:///csi/csi.sock` or a bare path).
pub fn endpoint_path(endpoint: &str) -> crate::error::Result<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(crate::error::invalid(format!("endpoint {endpoint:?} must be unix:///absolute/path")));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parses_and_validates() {
        let cfg: CsiConfig = toml::from_str("kubelet_dir = \"/k\"\ndefault_sandbox = \"kata\"\ndefault_fs = \"xfs\"").unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.default_sandbox, Sandbox::Kata);
        assert!(toml::from_str::<CsiConfig>("kubelet = \"/k\"").is_err(), "unknown key");
        assert!(toml::from_str::<CsiConfig>("[pool]\nbackend = \"reflink\"").is_err(), "the pool is thinboxd's [pool]");
        let rel: CsiConfig = toml::from_str("kubelet_dir = \"k\"").unwrap();
        assert!(rel.validate().unwrap_err().contains("csi.kubelet_dir"));
        let small: CsiConfig = toml::from_str("default_size = \"1MiB\"").unwrap();
        assert!(small.validate().is_err());
        let tcp: CsiConfig = toml::from_str("endpoint = \"tcp://1.2.3.4:5\"").unwrap();
        assert!(tcp.validate().unwrap_err().contains("csi.endpoint"));
    }

    #[test]
    fn endpoints() {
        use std::path::Path;
        assert_eq!(endpoint_path("unix:///csi/csi.sock").unwrap(), Path::new("/csi/csi.sock"));
        assert_eq!(endpoint_path("/csi/csi.sock").unwrap(), Path::new("/csi/csi.sock"));
        assert!(endpoint_path("unix://relative.sock").is_err());
        assert!(endpoint_path("tcp://1.2.3.4:5").is_err());
    }
}
