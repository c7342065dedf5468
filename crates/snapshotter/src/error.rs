//! Snapshotter errors and their gRPC codes, which containerd's errdefs turns back
//! into its own error kinds (`IsNotFound`, `IsAlreadyExists`, ...).

use thinbox_blockstore::ErrorKind;
use tonic::{Code, Status};

use crate::filter::FilterError;
use crate::shown::shown;

/// Errors of the snapshot service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {} not found", shown(.0))]
    NotFound(String),
    #[error("parent snapshot {} not found", shown(.0))]
    ParentNotFound(String),
    #[error("snapshot {} already exists", shown(.0))]
    AlreadyExists(String),
    #[error("parent {} is not a committed snapshot", shown(.0))]
    ParentNotCommitted(String),
    #[error("snapshot {} is not active", shown(.0))]
    NotActive(String),
    #[error("snapshot {} is committed and has no mounts", shown(.0))]
    Committed(String),
    #[error("cannot remove snapshot {}: it has children", shown(.0))]
    HasChildren(String),
    #[error("snapshot {} cannot be rebased onto {} at commit", shown(key), shown(parent))]
    Rebase { key: String, parent: String },
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("label {key:?}: key and value exceed {max} bytes")]
    LabelTooLarge { key: String, max: usize },
    #[error("label {label}={value:?}: {reason}")]
    BadLabel { label: &'static str, value: String, reason: String },
    #[error("cannot update field {}: only labels are mutable", shown(.0))]
    ImmutableField(String),
    #[error("update needs the snapshot info")]
    MissingInfo,
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("snapshot {} has no attached device", shown(.0))]
    NotAttached(String),
    #[error("snapshot {}'s device holds no filesystem", shown(.0))]
    Unformatted(String),
    #[error(transparent)]
    Block(#[from] thinbox_blockstore::Error),
    #[error("corrupt snapshot record {key:?}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("worker task failed")]
    Join(#[from] tokio::task::JoinError),
}

impl Error {
    /// The stable kind, mapped explicitly to a gRPC code by [`Error::code`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(_) | Error::ParentNotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::ParentNotCommitted(_)
            | Error::NotActive(_)
            | Error::Committed(_)
            | Error::HasChildren(_)
            | Error::Rebase { .. }
            | Error::NotAttached(_) => ErrorKind::FailedPrecondition,
            Error::InvalidKey { .. }
            | Error::LabelTooLarge { .. }
            | Error::BadLabel { .. }
            | Error::ImmutableField(_)
            | Error::MissingInfo
            | Error::Filter(_) => ErrorKind::InvalidArgument,
            Error::Block(e) => e.kind(),
            Error::Unformatted(_) | Error::Corrupt { .. } | Error::Join(_) => ErrorKind::Internal,
        }
    }

    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self.kind() {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::Internal => Code::Internal,
        }
    }
}

pub use thinbox_daemon::chain;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = e.code();
        let msg = chain(&e);
        if code == Code::Internal {
            tracing::error!(error = %msg, "request failed");
        } else {
            tracing::debug!(error = %msg, ?code, "request refused");
        }
        Status::new(code, msg)
    }
}

macro_rules! store_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Block(thinbox_blockstore::Error::Store(e.into()))
            }
        }
    )*};
}
store_errors!(
    thinbox_blockstore::redb::TransactionError,
    thinbox_blockstore::redb::TableError,
    thinbox_blockstore::redb::StorageError,
    thinbox_blockstore::redb::CommitError
);

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shown::SHOWN_BYTES;

    #[test]
    fn messages_repeat_at_most_the_start_of_a_long_key() {
        assert_eq!(Error::NotFound("k".into()).to_string(), "snapshot \"k\" not found");
        let long = "é".repeat(1 << 19);
        let msg = Error::ParentNotFound(long.clone()).to_string();
        assert!(msg.len() < 2 * SHOWN_BYTES, "{msg}");
        assert!(msg.ends_with(&format!("… ({} bytes) not found", long.len())), "{msg}");
        let msg = Error::Rebase { key: long.clone(), parent: long }.to_string();
        assert!(msg.len() < 4 * SHOWN_BYTES, "{msg}");
    }
}
