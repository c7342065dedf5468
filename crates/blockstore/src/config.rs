//! The pool's configuration: the `[pool]` table of the daemons' config files
//! and its `[pool.thin]` table, with the checks serde cannot make.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::types::BackendKind;
use crate::units::Bytes;

/// Pool configuration (the `[pool]` table of the daemons' config files).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Backend; see [`BackendKind`].
    pub backend: BackendKind,
    /// Directory on a reflink-capable filesystem (XFS `reflink=1` or btrfs). When
    /// absent, an embedded XFS image under the state root is created and used.
    pub dir: Option<PathBuf>,
    /// Size of the embedded pool image (sparse).
    pub embedded_size: Bytes,
    /// Free space kept back: creating a device fails with "pool full" below it, so
    /// devices that already exist keep room to write.
    pub reserve: Bytes,
    /// Free space kept back on the filesystem of the state root, which holds
    /// the metadata store (and the embedded pool's sparse image): creating a
    /// device fails below it, so the store keeps room for every other change.
    pub root_reserve: Bytes,
    /// Device loops use direct I/O to their image files.
    pub direct_io: bool,
    /// The embedded reflink pool's own loop uses direct I/O to `pool.img`.
    /// Off (the default), the host's page cache holds the pool's blocks: the
    /// blocks that clones share with their layer are read from disk once for
    /// all of them, as overlayfs shares its layers' pages. With `direct_io`
    /// the device loops bypass it, so no block is cached twice. Takes effect
    /// when the pool is attached: a start that finds it mounted keeps its loop.
    pub embedded_direct_io: bool,
    /// A file-backed thin pool running low grows its data file by this much
    /// while the filesystem under it has room (0: never grow).
    pub grow_step: Bytes,
    /// Ceiling for that growth (absent: as long as the filesystem has room).
    pub max_size: Option<Bytes>,
    /// dm-thin settings (the `[pool.thin]` table).
    pub thin: ThinConfig,
}

/// Where the dm-thin backend's pool comes from, and how it treats it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThinConfig {
    /// An existing thin pool, by dm name, used instead of the embedded one. It
    /// must be Thinbox's alone: a pool that already holds thin devices at the
    /// first start is refused.
    pub pool_name: Option<String>,
    /// Block devices to create the pool on (both or neither). The first 4 KiB
    /// of the metadata device must be zero the first time.
    pub metadata_device: Option<PathBuf>,
    /// See `metadata_device`.
    pub data_device: Option<PathBuf>,
    /// Discard a device's blocks before deleting it, so that the pool's data
    /// device gets them back (a file-backed pool's file shrinks, an SSD learns
    /// they are free). Makes deletion slower. Unset: on for the embedded
    /// pool, whose data file would otherwise keep every block it ever held on
    /// the root's filesystem; off on block devices.
    pub discard_on_delete: Option<bool>,
    /// New devices are refused once this share of the pool's metadata is in use
    /// (percent), before running out could corrupt anything.
    pub metadata_limit_percent: u8,
}

impl Default for ThinConfig {
    fn default() -> Self {
        ThinConfig { pool_name: None, metadata_device: None, data_device: None, discard_on_delete: None, metadata_limit_percent: 90 }
    }
}

impl ThinConfig {
    /// Whether a pool source other than the embedded one is configured.
    pub fn external(&self) -> bool {
        self.pool_name.is_some() || self.metadata_device.is_some() || self.data_device.is_some()
    }

    fn validate(&self) -> Result<()> {
        match (&self.pool_name, &self.metadata_device, &self.data_device) {
            (Some(_), None, None) | (None, None, None) => {}
            (None, Some(m), Some(d)) => {
                for p in [m, d] {
                    if !p.is_absolute() {
                        return Err(Error::Config(format!("pool.thin device {} must be an absolute path", p.display())));
                    }
                }
                if m == d {
                    return Err(Error::Config("pool.thin.metadata_device and data_device must differ".into()));
                }
            }
            (Some(_), ..) => return Err(Error::Config("pool.thin.pool_name excludes metadata_device and data_device".into())),
            _ => return Err(Error::Config("pool.thin.metadata_device and data_device go together".into())),
        }
        if let Some(name) = &self.pool_name
            && (name.is_empty() || name.len() > 127 || name.contains('/'))
        {
            return Err(Error::Config(format!("pool.thin.pool_name {name:?} is not a dm device name")));
        }
        if !(1..=99).contains(&self.metadata_limit_percent) {
            return Err(Error::Config(format!("pool.thin.metadata_limit_percent {} must be within 1..=99", self.metadata_limit_percent)));
        }
        Ok(())
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            backend: BackendKind::Auto,
            dir: None,
            embedded_size: Bytes(64 << 30),
            reserve: Bytes(512 << 20),
            root_reserve: Bytes(64 << 20),
            direct_io: true,
            embedded_direct_io: false,
            grow_step: Bytes(4 << 30),
            max_size: None,
            thin: ThinConfig::default(),
        }
    }
}

impl PoolConfig {
    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<()> {
        if let Some(dir) = &self.dir
            && !dir.is_absolute()
        {
            return Err(Error::Config(format!("pool.dir {} must be an absolute path", dir.display())));
        }
        if self.embedded_size < Bytes(512 << 20) {
            return Err(Error::Config(format!("pool.embedded_size {} is below the minimum 512MiB", self.embedded_size)));
        }
        if let Some(max) = self.max_size
            && max < self.embedded_size
        {
            return Err(Error::Config(format!("pool.max_size {max} is below pool.embedded_size {}", self.embedded_size)));
        }
        self.thin.validate()?;
        if self.thin.external() && self.backend == BackendKind::Reflink {
            return Err(Error::Config("pool.thin configures a thin pool, but pool.backend is reflink".into()));
        }
        if self.reserve >= self.embedded_size && self.dir.is_none() {
            return Err(Error::Config(format!("pool.reserve {} leaves no room in a {} pool", self.reserve, self.embedded_size)));
        }
        Ok(())
    }
}
