//! Errors of the CSI driver, each with the gRPC code the CSI spec asks for.

use std::path::PathBuf;

use thinbox_block_passthrough::kata_shim::ShimError;
use thinbox_blockstore::ErrorKind;
use tonic::{Code, Status};

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("block store")]
    Blockstore(#[from] thinbox_blockstore::Error),
    #[error("direct-volume record")]
    DirectVolume(#[from] thinbox_block_passthrough::Error),
    #[error("state store")]
    Store(#[from] thinbox_blockstore::redb::Error),
    #[error("corrupt state record {key}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{planned} devices planned for a group snapshot of {members} volumes")]
    GroupPlan { planned: usize, members: usize },
    #[error("worker task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("volume {volume} is held by a Kata sandbox")]
    Kata {
        volume: String,
        #[source]
        source: thinbox_block_passthrough::kata_shim::ShimError,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error about `path`, for `map_err`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    /// The gRPC code, chosen explicitly per kind (never from message text).
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Blockstore(e) => match e.kind() {
                ErrorKind::NotFound => Code::NotFound,
                ErrorKind::InvalidArgument => Code::InvalidArgument,
                ErrorKind::FailedPrecondition => Code::FailedPrecondition,
                ErrorKind::ResourceExhausted => Code::ResourceExhausted,
                _ => Code::Internal,
            },
            Error::Io { source, .. } if thinbox_blockstore::is_no_space(source) => Code::ResourceExhausted,
            Error::Store(e) if thinbox_blockstore::store_out_of_space(e) => Code::ResourceExhausted,
            // The sandbox or its shim is not there, or not answering: worth a retry later.
            Error::Kata { source: ShimError::NoSocket { .. } | ShimError::Timeout { .. } | ShimError::Transport { .. }, .. } => Code::Unavailable,
            Error::Kata { .. } => Code::Internal,
            Error::Io { .. } | Error::DirectVolume(_) | Error::Store(_) | Error::Corrupt { .. } | Error::Join(_) | Error::GroupPlan { .. } => {
                Code::Internal
            }
        }
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(e.into())
            }
        }
    )*};
}
from_redb!(
    thinbox_blockstore::redb::TransactionError,
    thinbox_blockstore::redb::TableError,
    thinbox_blockstore::redb::StorageError,
    thinbox_blockstore::redb::CommitError
);

pub use thinbox_daemon::chain;

/// Longest status message sent: it travels in an HTTP/2 header, which
/// clients bound (tonic: 16 KiB for all of them), and an error about a huge
/// field must still reach the client with its code.
const MAX_MESSAGE: usize = 1024;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = e.code();
        let mut msg = chain(&e);
        if code == Code::Internal {
            tracing::error!(error = %msg, "internal error");
        }
        if msg.len() > MAX_MESSAGE {
            let cut = (0..=MAX_MESSAGE).rev().find(|&i| msg.is_char_boundary(i)).unwrap_or(0);
            msg = format!("{}… ({} bytes in all)", &msg[..cut], msg.len());
        }
        Status::new(code, msg)
    }
}

/// Shorthand for an INVALID_ARGUMENT error.
pub fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_message_is_cut_and_keeps_its_code() {
        let status = Status::from(Error::NotFound(format!("volume {:?} does not exist", "é".repeat(1 << 19))));
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().len() < MAX_MESSAGE + 64, "{}", status.message().len());
        assert!(status.message().ends_with("bytes in all)"), "{}", &status.message()[MAX_MESSAGE - 8..]);
    }
}
