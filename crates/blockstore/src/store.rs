//! Device records in the embedded transactional store (`redb`).
//!
//! A record is the *desired* state of one device; the kernel state (image file,
//! loop device) is made to match it, and start-up reconciliation converges any
//! difference left by a crash. Front ends (snapshotter, CSI) keep their own
//! tables in the same database and change them in the same transactions, so a
//! snapshot record and its device record never disagree.

use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use redb::backends::FileBackend;
use redb::{BackendError, ReadableDatabase, ReadableTable, StorageBackend, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::types::BackendKind;
use crate::units::{Bytes, DeviceId};

use crate::types::{Access, FsType};

const DEVICES: TableDefinition<u64, &[u8]> = TableDefinition::new("blockstore.devices");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("blockstore.counters");
const NEXT_ID: &str = "next_device_id";
const SETTINGS: TableDefinition<&str, &str> = TableDefinition::new("blockstore.settings");
const BACKEND: &str = "backend";

/// Lifecycle of a device record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// Intent written; the image may be missing or incomplete. Rolled back on recovery.
    Creating,
    /// Image complete.
    Ready,
    /// Intent to delete written; the image may still exist. Rolled forward on recovery.
    Deleting,
}

impl DeviceState {
    /// Lower-case name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Creating => "creating",
            DeviceState::Ready => "ready",
            DeviceState::Deleting => "deleting",
        }
    }
}

/// The stored description of one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// Never reused.
    pub id: DeviceId,
    /// Virtual size of the block device.
    pub size: Bytes,
    /// The device this one is a copy-on-write snapshot of, if any.
    pub origin: Option<DeviceId>,
    /// Filesystem the host made inside; `None` for a device the host never
    /// formats (its user, a guest, does).
    pub fs: Option<FsType>,
    /// Lifecycle state.
    pub state: DeviceState,
    /// Whether (and how) the device should be attached.
    pub access: Option<Access>,
    /// Size of the origin when this device was made: the filesystem is grown once
    /// if the device is larger.
    pub origin_size: Option<Bytes>,
}

/// Handle to the metadata database.
#[derive(Debug)]
pub struct Store {
    db: redb::Database,
    path: PathBuf,
    io_error: IoError,
}

/// I/O errors on the store's file: how many so far, and the last one's
/// message unless the store proved usable after it.
#[derive(Debug, Default)]
struct IoErrors {
    count: u64,
    last: Option<String>,
}

type IoError = Arc<Mutex<IoErrors>>;

impl Store {
    /// Opens (or creates) the database at `path`. Fails if another process holds it.
    pub fn open(path: &Path) -> Result<Store> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(Error::io("open", path))?;
        let io_error = IoError::default();
        let backend = Watched { file: FileBackend::new(file)?, io_error: io_error.clone() };
        let db = redb::Builder::new().create_with_backend(backend).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::RootInUse(path.to_owned()),
            other => other.into(),
        })?;
        let txn = db.begin_write()?;
        txn.open_table(DEVICES)?;
        txn.open_table(COUNTERS)?;
        txn.open_table(SETTINGS)?;
        txn.commit()?;
        Ok(Store { db, path: path.to_owned(), io_error })
    }

    /// Whether the store has failed for good: after an I/O error on its file
    /// (a full or failing disk), redb refuses every operation until the
    /// database is reopened, so its owner must restart (the start recovers
    /// the state as after a crash). Cheap while no I/O error was seen; after
    /// one, an empty unflushed commit tells a failed store from a write redb
    /// could do without.
    pub fn failure(&self) -> Option<Error> {
        let errors = || self.io_error.lock().unwrap_or_else(PoisonError::into_inner);
        // Not held while probing: the probe waits for a write in progress,
        // whose I/O error must be noted for it to end.
        let (seen, cause) = {
            let e = errors();
            (e.count, e.last.clone()?)
        };
        match self.write_lazy().and_then(|txn| Ok(txn.commit()?)) {
            Ok(()) => {
                let mut e = errors();
                if e.count == seen {
                    e.last = None;
                }
                None
            }
            Err(_) => Some(Error::StoreFailed { path: self.path.clone(), cause }),
        }
    }

    /// The backend this root was first opened with.
    pub fn backend(&self) -> Result<Option<BackendKind>> {
        let Some(v) = self.setting(BACKEND)? else { return Ok(None) };
        serde_json::from_str(&v).map(Some).map_err(|source| Error::Corrupt { key: BACKEND.into(), source })
    }

    /// Remembers the backend (a no-op if unchanged).
    pub fn set_backend(&self, kind: BackendKind) -> Result<()> {
        let v = serde_json::to_string(&kind).map_err(|source| Error::Corrupt { key: BACKEND.into(), source })?;
        self.set_setting(BACKEND, &v)
    }

    /// A remembered setting of this root.
    pub(crate) fn setting(&self, key: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SETTINGS)?;
        Ok(table.get(key)?.map(|v| v.value().to_owned()))
    }

    /// Remembers a setting (a no-op if unchanged).
    pub(crate) fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        if self.setting(key)?.as_deref() == Some(value) {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        txn.open_table(SETTINGS)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }

    /// The underlying database, for front ends' own tables.
    pub fn db(&self) -> &redb::Database {
        &self.db
    }

    /// Starts a write transaction.
    pub fn write(&self) -> Result<WriteTransaction> {
        Ok(self.db.begin_write()?)
    }

    /// Starts a write transaction whose commit is not flushed to disk: it is
    /// visible at once but lost in a crash, unless a later durable commit (any
    /// [`Store::write`] one, or [`Store::persist`]) came first. For changes
    /// that may be undone by a crash, made durable before anything depends on them.
    pub fn write_lazy(&self) -> Result<WriteTransaction> {
        lazy(self.db.begin_write()?)
    }

    /// [`Store::write_lazy`] if no other write transaction is in progress, and
    /// `None` instead of waiting for one: for callers that must not block.
    pub fn try_write_lazy(&self) -> Result<Option<WriteTransaction>> {
        match self.db.try_begin_write() {
            Ok(txn) => lazy(txn).map(Some),
            Err(redb::TransactionError::WouldBlock) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes every earlier commit durable (an empty durable commit).
    pub fn persist(&self) -> Result<()> {
        self.db.begin_write()?.commit()?;
        Ok(())
    }

    /// Reads one device record.
    pub fn device(&self, id: DeviceId) -> Result<Option<DeviceRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DEVICES)?;
        get(&table, id)
    }

    /// Reads every device record.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DEVICES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }
}

/// The store's file through redb's own backend, noting each I/O error for
/// [`Store::failure`].
#[derive(Debug)]
struct Watched {
    file: FileBackend,
    io_error: IoError,
}

impl Watched {
    fn noted<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            let mut errors = self.io_error.lock().unwrap_or_else(PoisonError::into_inner);
            errors.count += 1;
            errors.last = Some(e.to_string());
        }
        r
    }
}

impl StorageBackend for Watched {
    fn len(&self) -> io::Result<u64> {
        self.noted(self.file.len())
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.noted(self.file.read(offset, out))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.noted(self.file.set_len(len))
    }
    fn sync_data(&self) -> io::Result<()> {
        self.noted(self.file.sync_data())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.noted(self.file.write(offset, data))
    }
    fn close(&self) -> io::Result<()> {
        self.file.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> std::result::Result<bool, BackendError> {
        self.file.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> std::result::Result<bool, BackendError> {
        self.file.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> std::result::Result<(), BackendError> {
        self.file.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> std::result::Result<(), BackendError> {
        self.file.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> std::result::Result<(), BackendError> {
        self.file.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> std::result::Result<bool, BackendError> {
        self.file.query_lock_range(start, end)
    }
}

fn lazy(mut txn: WriteTransaction) -> Result<WriteTransaction> {
    txn.set_durability(redb::Durability::None).map_err(|e| Error::Store(e.into()))?;
    Ok(txn)
}

/// Device-record operations inside a caller's write transaction.
pub struct Devices<'txn> {
    table: Table<'txn, u64, &'static [u8]>,
    counters: Table<'txn, &'static str, u64>,
}

impl std::fmt::Debug for Devices<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Devices")
    }
}

impl<'txn> Devices<'txn> {
    /// Opens the device tables in `txn`.
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self> {
        Ok(Devices { table: txn.open_table(DEVICES)?, counters: txn.open_table(COUNTERS)? })
    }

    /// Allocates a fresh, never-used id.
    pub fn allocate_id(&mut self) -> Result<DeviceId> {
        let next = self.counters.get(NEXT_ID)?.map(|v| v.value()).unwrap_or(1);
        self.counters.insert(NEXT_ID, next + 1)?;
        Ok(DeviceId(next))
    }

    /// Reads one record.
    pub fn get(&self, id: DeviceId) -> Result<Option<DeviceRecord>> {
        get(&self.table, id)
    }

    /// Reads one record that must exist.
    pub fn require(&self, id: DeviceId) -> Result<DeviceRecord> {
        self.get(id)?.ok_or(Error::DeviceNotFound(id))
    }

    /// Inserts or replaces a record.
    pub fn put(&mut self, rec: &DeviceRecord) -> Result<()> {
        let bytes = serde_json::to_vec(rec).map_err(|source| Error::Corrupt { key: rec.id.to_string(), source })?;
        self.table.insert(rec.id.0, bytes.as_slice())?;
        Ok(())
    }

    /// Deletes a record.
    pub fn delete(&mut self, id: DeviceId) -> Result<()> {
        self.table.remove(id.0)?;
        Ok(())
    }
}

fn get(table: &impl ReadableTable<u64, &'static [u8]>, id: DeviceId) -> Result<Option<DeviceRecord>> {
    table.get(id.0)?.map(|v| decode(id.0, v.value())).transpose()
}

fn decode(key: u64, bytes: &[u8]) -> Result<DeviceRecord> {
    serde_json::from_slice(bytes).map_err(|source| Error::Corrupt { key: DeviceId(key).to_string(), source })
}
