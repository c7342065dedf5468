//! Snapshot records, kept in the blockstore's database so that a snapshot and its
//! device change in one transaction.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thinbox_blockstore::DeviceId;
use thinbox_blockstore::redb::{MultimapTableDefinition, ReadableTable, TableDefinition};

use crate::error::{Error, Result};

/// key → JSON [`Record`].
pub const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshotter.snapshots");
/// parent key → child keys.
pub const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("snapshotter.children");

/// containerd's snapshot kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only, made from a committed parent; never committed.
    View,
    /// Writable; can be committed.
    Active,
    /// Immutable; can be a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==active`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// One snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Kind.
    pub kind: Kind,
    /// Parent key, empty for none.
    pub parent: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the epoch.
    pub created: u64,
    /// Last update time, nanoseconds since the epoch.
    pub updated: u64,
    /// The device holding its content.
    pub device: DeviceId,
}

/// Now, as stored.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A stored time as a protobuf timestamp.
pub fn timestamp(nanos: u64) -> prost_types::Timestamp {
    let d = Duration::from_nanos(nanos);
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// Reads a record.
pub fn get(table: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Option<Record>> {
    table.get(key)?.map(|v| decode(key, v.value())).transpose()
}

/// Decodes a stored record.
pub fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|source| Error::Corrupt { key: key.to_owned(), source })
}

/// Encodes a record.
pub fn encode(key: &str, rec: &Record) -> Result<Vec<u8>> {
    serde_json::to_vec(rec).map_err(|source| Error::Corrupt { key: key.to_owned(), source })
}
