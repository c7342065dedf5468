//! The driver's records, in redb tables next to the block store's own (one
//! database, so a volume record and its device change in one transaction).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thinbox_blockstore::redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use thinbox_blockstore::{Bytes, Consumer, DeviceId, FsType};

use crate::error::{Error, Result};

/// Volume id → [`Volume`].
pub const VOLUMES: TableDefinition<&str, &str> = TableDefinition::new("csi.volumes");
/// Volume name (CreateVolume's idempotency key) → volume id.
pub const NAMES: TableDefinition<&str, &str> = TableDefinition::new("csi.names");
/// Target path → [`Publication`].
pub const PUBLICATIONS: TableDefinition<&str, &str> = TableDefinition::new("csi.publications");
/// Snapshot id → [`Snapshot`].
pub const SNAPSHOTS: TableDefinition<&str, &str> = TableDefinition::new("csi.snapshots");
/// Snapshot name → snapshot id.
pub const SNAPSHOT_NAMES: TableDefinition<&str, &str> = TableDefinition::new("csi.snapshot_names");
/// Group snapshot id → [`Group`].
pub const GROUPS: TableDefinition<&str, &str> = TableDefinition::new("csi.groups");
/// Group snapshot name → group snapshot id.
pub const GROUP_NAMES: TableDefinition<&str, &str> = TableDefinition::new("csi.group_names");
/// Counters ("volume", "snapshot", "group").
pub const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("csi.counters");

/// What backs a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A device of the block store (thin device or reflinked image).
    Block,
    /// A sparse image file of exactly the volume's size.
    File,
    /// A host directory with a hard project quota of the volume's size.
    Dir,
}

impl Kind {
    /// The StorageClass parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Block => "block",
            Kind::File => "file",
            Kind::Dir => "dir",
        }
    }

    /// Parses the StorageClass parameter `kind`.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "block" => Some(Kind::Block),
            "file" => Some(Kind::File),
            "dir" => Some(Kind::Dir),
            _ => None,
        }
    }
}

/// Where a pod runs, which decides how its volumes are published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sandbox {
    /// runC and friends: the volume is mounted on the host.
    #[default]
    Runc,
    /// Kata Containers: the device goes into the guest as virtio-blk through a
    /// direct-volume record; the host never mounts it.
    Kata,
}

impl Sandbox {
    /// Parses the parameter `thinbox.io/sandbox`.
    pub fn parse(s: &str) -> Option<Sandbox> {
        match s {
            "runc" => Some(Sandbox::Runc),
            "kata" => Some(Sandbox::Kata),
            _ => None,
        }
    }
}

/// Encryption of a volume, done in a Kata guest (Kata's direct-volume
/// metadata `encryptionKey`, read by `src/runtime/virtcontainers/container.go`
/// and acted on by the agent's `src/agent/src/storage/block_handler.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    /// The agent formats the device as LUKS2 with a key it makes and never
    /// keeps, and ext4 inside: the host never formats the device nor sees a
    /// key, and the data does not outlive the sandbox.
    Ephemeral,
}

impl Encryption {
    /// Parses the parameter `thinbox.io/encryption`.
    pub fn parse(s: &str) -> Option<Encryption> {
        (s == "ephemeral").then_some(Encryption::Ephemeral)
    }

    /// The value of Kata's `encryptionKey` metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Encryption::Ephemeral => "ephemeral",
        }
    }
}

/// Life-cycle state of a volume record (intent first, kernel second).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Being made; reconciliation rolls it back.
    Creating,
    /// Usable.
    Ready,
    /// Being removed; reconciliation finishes it.
    Deleting,
}

/// A volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Our id (`tb-<kind>-<n>`).
    pub id: String,
    /// The CO's name for it (idempotency key).
    pub name: String,
    /// What backs it.
    pub kind: Kind,
    /// Capacity.
    pub size: Bytes,
    /// Filesystem made at creation; `None` for raw block volumes.
    pub fs: Option<FsType>,
    /// The block store device (`block` kind).
    pub device: Option<DeviceId>,
    /// Life-cycle state.
    pub state: State,
    /// Sandbox asked for by its StorageClass or inline attributes, if any.
    pub sandbox: Option<Sandbox>,
    /// A CSI ephemeral inline volume: made at publish, gone at unpublish.
    pub ephemeral: bool,
    /// Parameters it was created with (returned as volume context).
    pub parameters: BTreeMap<String, String>,
    /// What it was made from.
    #[serde(default)]
    pub source: Option<Source>,
    /// XFS project id (`dir` kind).
    #[serde(default)]
    pub project: Option<u32>,
    /// Encrypted in the guest; `fs` is then the guest's to make.
    #[serde(default)]
    pub encryption: Option<Encryption>,
}

impl Volume {
    /// The filesystem the host makes and may mount or grow: none where a
    /// guest formats the device.
    pub fn host_fs(&self) -> Option<FsType> {
        self.fs.filter(|_| self.encryption.is_none())
    }
}

/// The content a volume was made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A snapshot, by id.
    Snapshot(String),
    /// Another volume (a clone), by id.
    Volume(String),
}

/// A point-in-time copy of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Our id (`tb-snap-<n>`).
    pub id: String,
    /// The CO's name for it.
    pub name: String,
    /// The volume it copies.
    pub source: String,
    /// The source's kind (restores are of the same kind).
    pub kind: Kind,
    /// The source's size at the time.
    pub size: Bytes,
    /// The source's filesystem.
    pub fs: Option<FsType>,
    /// The block store device (`block` kind); `file` snapshots are images.
    pub device: Option<DeviceId>,
    /// Life-cycle state.
    pub state: State,
    /// When it was taken (seconds, nanoseconds since the epoch).
    pub created: (i64, i32),
    /// The group snapshot it was cut with, which alone deletes it.
    #[serde(default)]
    pub group: Option<String>,
}

impl Snapshot {
    /// A snapshot of `source`, being made (its id and device come at the intent).
    pub fn of(source: &Volume, name: String, created: (i64, i32), group: Option<String>) -> Snapshot {
        Snapshot {
            id: String::new(),
            name,
            source: source.id.clone(),
            kind: source.kind,
            size: source.size,
            fs: source.fs,
            device: None,
            state: State::Creating,
            created,
            group,
        }
    }
}

/// Snapshots of several volumes cut at one instant (VolumeGroupSnapshot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Our id (`tb-group-<n>`).
    pub id: String,
    /// The CO's name for it.
    pub name: String,
    /// The volumes it copies, in the order asked.
    pub sources: Vec<String>,
    /// Its snapshots, one per source, in the same order.
    pub members: Vec<String>,
    /// Life-cycle state.
    pub state: State,
    /// When it was cut (seconds, nanoseconds since the epoch).
    pub created: (i64, i32),
}

/// How a volume is published at a target path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Filesystem mounted at the target on the host.
    HostMount,
    /// Device node bind-mounted onto the target file on the host.
    HostBlock,
    /// Direct-volume record for Kata; the target is left empty on the host.
    Kata,
}

/// One publication of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    /// Volume id.
    pub volume: String,
    /// Target path.
    pub target: PathBuf,
    /// How.
    pub mode: Mode,
    /// Read-only.
    pub readonly: bool,
    /// Mount flags asked for (host mount) or passed to the guest (Kata).
    pub flags: Vec<String>,
    /// The group that owns the filesystem's files (NodePublishVolume's
    /// `volume_mount_group`, a pod's fsGroup).
    #[serde(default)]
    pub group: Option<u32>,
}

/// Now, as a record's creation time (seconds, nanoseconds since the epoch).
pub fn now() -> (i64, i32) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (i64::try_from(now.as_secs()).unwrap_or(i64::MAX), i32::try_from(now.subsec_nanos()).unwrap_or(0))
}

pub fn decode<T: DeserializeOwned>(key: &str, v: &str) -> Result<T> {
    serde_json::from_str(v).map_err(|source| Error::Corrupt { key: key.to_owned(), source })
}

pub fn encode<T: Serialize>(key: &str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|source| Error::Corrupt { key: key.to_owned(), source })
}

/// Reads a JSON record from a table.
pub fn get<T: DeserializeOwned>(table: &impl ReadableTable<&'static str, &'static str>, key: &str) -> Result<Option<T>> {
    match table.get(key)? {
        Some(v) => decode(key, v.value()).map(Some),
        None => Ok(None),
    }
}

/// Writes a JSON record into a table.
pub fn put<T: Serialize>(table: &mut Table<'_, &'static str, &'static str>, key: &str, v: &T) -> Result<()> {
    table.insert(key, encode(key, v)?.as_str())?;
    Ok(())
}

/// Every record of a table.
pub fn all<T: DeserializeOwned>(table: &impl ReadableTable<&'static str, &'static str>) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        out.push(decode(k.value(), v.value())?);
    }
    Ok(out)
}

/// Removes the record `id` and its name, if the name still points at it.
pub fn remove_named(
    txn: &WriteTransaction,
    records: TableDefinition<&str, &str>,
    names: TableDefinition<&str, &str>,
    id: &str,
    name: &str,
) -> Result<()> {
    txn.open_table(records)?.remove(id)?;
    let mut names = txn.open_table(names)?;
    let ours = names.get(name)?.is_some_and(|v| v.value() == id);
    if ours {
        names.remove(name)?;
    }
    Ok(())
}

/// Allocates the next number of a counter ("volume", "snapshot").
pub fn next_number(txn: &WriteTransaction, counter: &str) -> Result<u64> {
    let mut t = txn.open_table(COUNTERS)?;
    let n = t.get(counter)?.map(|v| v.value()).unwrap_or(0) + 1;
    t.insert(counter, n)?;
    Ok(n)
}

/// Creates the tables (so readers never find them missing).
pub fn init(txn: &WriteTransaction) -> Result<()> {
    txn.open_table(VOLUMES)?;
    txn.open_table(NAMES)?;
    txn.open_table(PUBLICATIONS)?;
    txn.open_table(SNAPSHOTS)?;
    txn.open_table(SNAPSHOT_NAMES)?;
    txn.open_table(COUNTERS)?;
    txn.open_table(GROUPS)?;
    txn.open_table(GROUP_NAMES)?;
    Ok(())
}

/// The volume and snapshot records, as a consumer of the pool. Every record
/// references its device, whatever its state: the driver's own recovery at
/// start (and its operations, under the gate) finish half-made and
/// half-deleted records, so the pool never deletes a device a volume record
/// still names; a device marked `Deleting` goes whoever names it.
#[derive(Debug)]
pub struct VolumeRecords;

impl Consumer for VolumeRecords {
    fn name(&self) -> &'static str {
        "volumes"
    }

    fn settle(&self, txn: &WriteTransaction) -> thinbox_blockstore::Result<HashSet<DeviceId>> {
        /// The one field of a volume or snapshot record the pool cares about.
        #[derive(serde::Deserialize)]
        struct DeviceOf {
            device: Option<DeviceId>,
        }
        let mut referenced = HashSet::new();
        for table in [VOLUMES, SNAPSHOTS] {
            for row in txn.open_table(table)?.iter()? {
                let (k, v) = row?;
                let rec: DeviceOf =
                    serde_json::from_str(v.value()).map_err(|source| thinbox_blockstore::Error::Corrupt { key: k.value().to_owned(), source })?;
                referenced.extend(rec.device);
            }
        }
        Ok(referenced)
    }
}
