//! Value types used throughout the crate: in device records, the pool's
//! configuration and the backends. Their serde forms are stored (device
//! records, the remembered backend) and must not change.

use serde::{Deserialize, Serialize};

/// Filesystem created inside a fresh device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// ext4: fast to create (lazy init, no discard), default.
    #[default]
    Ext4,
    /// xfs: mounted with `nouuid`, since clones share the origin's UUID.
    Xfs,
}

impl FsType {
    /// The name `mount(2)` knows it by.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

/// How an active device is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Read-write block device.
    ReadWrite,
    /// Read-only block device.
    ReadOnly,
}

/// Which backend holds the devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// dm-thin where the kernel has device-mapper, else reflink. Decided once, at
    /// the first start on a root, and remembered.
    #[default]
    Auto,
    /// Reflinked image files on loop devices.
    Reflink,
    /// Thin devices in a kernel thin pool.
    DmThin,
}

impl BackendKind {
    /// The name the configuration uses (`pool.backend`).
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Reflink => "reflink",
            BackendKind::DmThin => "dm-thin",
        }
    }
}
