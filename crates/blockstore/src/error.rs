//! Errors of the block engine. Each variant carries its context (device, path,
//! operation) and maps to a stable [`ErrorKind`] that front ends translate into
//! gRPC codes; nobody matches on message text.

use std::io;
use std::path::PathBuf;

use crate::units::{Bytes, DeviceId};

/// Stable classification of an error, independent of its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is malformed.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// The object already exists.
    AlreadyExists,
    /// The object is not in a state that allows the operation.
    FailedPrecondition,
    /// The pool (or its backing filesystem) is out of space.
    ResourceExhausted,
    /// A bug or an unexpected failure of the kernel or a tool.
    Internal,
}

/// Errors of the block engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("device {0} not found")]
    DeviceNotFound(DeviceId),
    #[error("device {0} is still open (a VMM or a mount holds it): it can be deleted once its user lets go")]
    DeviceBusy(DeviceId),
    #[error("device {id} is {state}, not ready")]
    DeviceNotReady { id: DeviceId, state: &'static str },
    #[error("{count} removed device(s) could not be deleted; device {id}: {error}")]
    NotDeleted { count: usize, id: DeviceId, error: String },
    #[error("device size {requested} is smaller than its origin's {origin}")]
    SizeBelowOrigin { requested: Bytes, origin: Bytes },
    #[error("device {0} is in a group of snapshots but has no origin, or asks to be attached")]
    NotAGroupSnapshot(DeviceId),
    #[error("shrinking device {id} from {current} to {requested} is not supported")]
    Shrink { id: DeviceId, current: Bytes, requested: Bytes },
    #[error("pool {pool} is full: {free} free, {reserve} kept in reserve")]
    PoolFull { pool: String, free: Bytes, reserve: Bytes },
    #[error(
        "the filesystem of {root} has {free} free, below pool.root_reserve {reserve}: free space there (it holds the metadata store{embedded})",
        embedded = if *.embedded { " and the embedded pool's image" } else { "" }
    )]
    RootFull { root: PathBuf, free: Bytes, reserve: Bytes, embedded: bool },
    #[error("thin pool {pool} metadata is {used} of {total}, past the {limit}% limit")]
    MetadataFull { pool: String, used: Bytes, total: Bytes, limit: u8 },
    #[error("thin pool {pool} cannot be used: {detail}")]
    PoolSource { pool: String, detail: String },
    #[error(
        "pool directory {path} cannot hold reflinked devices: put [pool] dir on XFS made with `mkfs.xfs -m reflink=1` or on btrfs, or leave it unset for the embedded pool"
    )]
    NoReflink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("device-mapper is not available (/dev/mapper/control): load it with `modprobe dm_thin_pool`, or set [pool] backend = \"reflink\"")]
    NoDeviceMapper(#[source] devicemapper::DmError),
    #[error("loop devices are not available (/dev/loop-control): load the loop module with `modprobe loop`")]
    NoLoopDevices(#[source] io::Error),
    #[error("the kernel cannot mount {fs} (for {path}): load its module with `modprobe {fs}`")]
    NoFilesystem {
        fs: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is held by another running thinboxd: stop it, or give this one another --root")]
    RootInUse(PathBuf),
    #[error("pool directory {0} is in use by another daemon")]
    PoolInUse(PathBuf),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{tool} on {path} failed ({status}): {stderr}")]
    Tool { tool: &'static str, path: PathBuf, status: String, stderr: String },
    /// `errno`: the kernel's answer to the failed ioctl, where there was one.
    #[error("device-mapper {op} {what}: {detail}")]
    Dm { op: &'static str, what: String, detail: String, errno: Option<rustix::io::Errno> },
    #[error("metadata store")]
    Store(#[from] redb::Error),
    #[error("metadata store {path} failed ({cause}); it refuses every change until it is reopened")]
    StoreFailed { path: PathBuf, cause: String },
    #[error("corrupt metadata record {key}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// Builds an [`Error::Io`] for `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    /// Whether the metadata store failed (not one device): nothing more
    /// should be asked of the pool until it is reopened.
    pub fn is_store(&self) -> bool {
        matches!(self, Error::Store(_) | Error::StoreFailed { .. } | Error::Corrupt { .. })
    }

    /// The stable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::DeviceNotFound(_) => ErrorKind::NotFound,
            Error::DeviceNotReady { .. }
            | Error::DeviceBusy(_)
            | Error::NoReflink { .. }
            | Error::NoDeviceMapper(_)
            | Error::NoLoopDevices(_)
            | Error::NoFilesystem { .. }
            | Error::PoolInUse(_)
            | Error::RootInUse(_)
            | Error::PoolSource { .. } => ErrorKind::FailedPrecondition,
            Error::SizeBelowOrigin { .. } | Error::Shrink { .. } | Error::Config(_) => ErrorKind::InvalidArgument,
            Error::PoolFull { .. } | Error::MetadataFull { .. } | Error::RootFull { .. } => ErrorKind::ResourceExhausted,
            Error::Io { source, .. } if is_no_space(source) => ErrorKind::ResourceExhausted,
            Error::Store(e) if store_out_of_space(e) => ErrorKind::ResourceExhausted,
            Error::Io { .. }
            | Error::Tool { .. }
            | Error::Dm { .. }
            | Error::Store(_)
            | Error::StoreFailed { .. }
            | Error::Corrupt { .. }
            | Error::NotDeleted { .. }
            | Error::NotAGroupSnapshot(_) => ErrorKind::Internal,
        }
    }
}

/// Whether the metadata store failed for want of space on its filesystem.
pub fn store_out_of_space(e: &redb::Error) -> bool {
    matches!(e, redb::Error::Io(io) if is_no_space(io))
}

/// Whether an I/O error says the filesystem (or a quota) is full.
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error() || code == rustix::io::Errno::DQUOT.raw_os_error())
}

macro_rules! store_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(e.into())
            }
        }
    )*};
}
store_from!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// Result alias of the block engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;
