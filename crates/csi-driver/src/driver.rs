//! The driver's logic, independent of gRPC: the state of one node's volumes,
//! with the controller's operations in [`crate::controller`], the node's in
//! [`crate::node`] and reconciliation in [`crate::recover`].
//!
//! Every change is two-phased like the block store's: the intent goes into
//! the state tables (with what its [`Storage`] reserves, such as the pool
//! device's record, in one transaction) before the kernel or disk is touched,
//! and reconciliation at start-up rolls half-made volumes back and finishes
//! half-deleted ones.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLockReadGuard};
use std::time::Duration;

use serde::Serialize;
use thinbox_block_passthrough::DirectVolumes;
use thinbox_block_passthrough::kata_shim::{Shim, ShimError};
use thinbox_blockstore::redb::{ReadableDatabase, TableDefinition};
use thinbox_blockstore::{Bytes, Engine, FsType, Pool, PoolConfig, fault};

use crate::config::{ALIGN, CsiConfig, min_volume_size};
use crate::error::{Error, Result};
use crate::state::{self, Encryption, Kind, Mode, NAMES, PUBLICATIONS, Publication, SNAPSHOTS, Snapshot, State, VOLUMES, Volume};
use crate::storage::{DirStorage, Held, Pooled, Storage};

/// How long a Kata sandbox's shim may take to answer.
pub(crate) const SHIM_TIMEOUT: Duration = Duration::from_secs(5);

/// The driver state of one node.
#[derive(Debug)]
pub struct Driver {
    pub(crate) engine: Arc<Engine>,
    pub(crate) cfg: CsiConfig,
    node_id: String,
    pooled: Pooled,
    dirs: DirStorage,
    pub(crate) direct: DirectVolumes,
    /// Where a filesystem is mounted for a moment (xfs grows only mounted).
    pub(crate) scratch: PathBuf,
    /// Mutating operations run one at a time: they are short, and the CO
    /// retries concurrent calls for the same volume anyway.
    lock: Mutex<()>,
}

/// A mutating operation's hold: the driver's lock, then the engine's gate shared.
pub(crate) struct Serial<'a> {
    _gate: RwLockReadGuard<'a, ()>,
    _lock: MutexGuard<'a, ()>,
}

impl Driver {
    /// Opens the state under `root` as the pool's only consumer and converges
    /// it with the disk and kernel (volumes without snapshots, in process).
    pub fn open(root: &Path, node_id: &str, pool: PoolConfig, cfg: CsiConfig) -> Result<Driver> {
        let engine = Arc::new(Engine::open(root, pool, vec![Box::new(crate::state::VolumeRecords)])?);
        let d = Driver::new(engine, root, node_id, cfg)?;
        d.engine.reconcile()?;
        Ok(d)
    }

    /// The volume front end over an engine that lists
    /// [`crate::state::VolumeRecords`] among its consumers: finishes what a
    /// crash interrupted on the volumes' side (publications, half-made or
    /// half-deleted volumes, stray directories). The engine's reconciliation,
    /// which its owner runs next, does the pool's side.
    pub fn new(engine: Arc<Engine>, root: &Path, node_id: &str, cfg: CsiConfig) -> Result<Driver> {
        let root = root.canonicalize().map_err(Error::io("resolve", root))?;
        let d = Driver {
            pooled: Pooled::new(engine.clone()),
            dirs: DirStorage::new(engine.clone(), &root, cfg.dir_path.as_deref(), cfg.dir_pool_size),
            direct: DirectVolumes::new(&cfg.direct_volumes),
            scratch: root.join("tmp"),
            engine,
            cfg,
            node_id: node_id.to_owned(),
            lock: Mutex::new(()),
        };
        let txn = d.pool().store().write()?;
        state::init(&txn)?;
        txn.commit()?;
        d.recover(&root)?;
        Ok(d)
    }

    /// The device pool.
    pub fn pool(&self) -> &Pool {
        self.engine.pool()
    }

    /// The node's id (for NodeGetInfo and topology).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The configuration.
    pub fn config(&self) -> &CsiConfig {
        &self.cfg
    }

    /// Where volumes of `kind` keep their bytes: the one place that maps a
    /// kind to its storage. `block` and `file` volumes share the pool.
    pub(crate) fn storage(&self, kind: Kind) -> &dyn Storage {
        match kind {
            Kind::Block | Kind::File => &self.pooled,
            Kind::Dir => &self.dirs,
        }
    }

    /// Where snapshots keep their bytes.
    pub(crate) fn snapshot_storage(&self) -> &dyn Storage {
        &self.pooled
    }

    pub(crate) fn serial(&self) -> Serial<'_> {
        let _lock = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        Serial { _gate: self.engine.shared(), _lock }
    }

    /// A volume by id.
    pub fn volume(&self, id: &str) -> Result<Option<Volume>> {
        let txn = self.pool().store().db().begin_read()?;
        state::get(&txn.open_table(VOLUMES)?, id)
    }

    pub(crate) fn require(&self, id: &str) -> Result<Volume> {
        match self.volume(id)? {
            Some(v) if v.state == State::Ready => Ok(v),
            _ => Err(Error::NotFound(format!("volume {id:?} does not exist"))),
        }
    }

    /// Every ready volume.
    pub fn volumes(&self) -> Result<Vec<Volume>> {
        let txn = self.pool().store().db().begin_read()?;
        let all: Vec<Volume> = state::all(&txn.open_table(VOLUMES)?)?;
        Ok(all.into_iter().filter(|v| v.state == State::Ready).collect())
    }

    pub(crate) fn by_name(&self, name: &str) -> Result<Option<Volume>> {
        let txn = self.pool().store().db().begin_read()?;
        let Some(id) = txn.open_table(NAMES)?.get(name)?.map(|v| v.value().to_owned()) else { return Ok(None) };
        state::get(&txn.open_table(VOLUMES)?, &id)
    }

    /// A snapshot by id.
    pub fn snapshot(&self, id: &str) -> Result<Option<Snapshot>> {
        let txn = self.pool().store().db().begin_read()?;
        state::get(&txn.open_table(SNAPSHOTS)?, id)
    }

    /// Every ready snapshot.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let txn = self.pool().store().db().begin_read()?;
        let all: Vec<Snapshot> = state::all(&txn.open_table(SNAPSHOTS)?)?;
        Ok(all.into_iter().filter(|s| s.state == State::Ready).collect())
    }

    pub(crate) fn publications_of(&self, id: &str) -> Result<Vec<Publication>> {
        let txn = self.pool().store().db().begin_read()?;
        let all: Vec<Publication> = state::all(&txn.open_table(PUBLICATIONS)?)?;
        Ok(all.into_iter().filter(|p| p.volume == id).collect())
    }

    /// The Kata sandboxes that hold volume `id`: each Kata publication whose
    /// record the runtime marked with its sandbox's id, and that id.
    pub(crate) fn holders(&self, id: &str) -> Result<Vec<(PathBuf, String)>> {
        let mut out = Vec::new();
        for p in self.publications_of(id)?.into_iter().filter(|p| p.mode == Mode::Kata) {
            if let Some(sandbox) = self.direct.sandbox(&p.target)? {
                out.push((p.target, sandbox));
            }
        }
        Ok(out)
    }

    /// Runs `call` against the shim of `sandbox` (about `volume`), bounded by
    /// [`SHIM_TIMEOUT`] inside the call. From a blocking worker of the
    /// daemon's runtime, or with a runtime of its own in process.
    pub(crate) fn shim<T, F>(&self, volume: &str, sandbox: &str, call: impl FnOnce(Shim) -> F) -> Result<T>
    where
        F: Future<Output = Result<T, ShimError>>,
    {
        let kata = |source| Error::Kata { volume: volume.to_owned(), source };
        let shim = Shim::find(sandbox, &self.cfg.kata_sandbox_dirs).map_err(kata)?;
        let answered = match tokio::runtime::Handle::try_current() {
            Ok(rt) => rt.block_on(call(shim)),
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(Error::io("start a runtime for", &self.cfg.direct_volumes))?
                .block_on(call(shim)),
        };
        answered.map_err(kata)
    }

    pub(crate) fn publication(&self, target: &Path) -> Result<Option<Publication>> {
        let txn = self.pool().store().db().begin_read()?;
        state::get(&txn.open_table(PUBLICATIONS)?, &target.to_string_lossy())
    }

    /// Bytes the volume holds on the node.
    pub fn allocated(&self, vol: &Volume) -> Result<u64> {
        self.storage(vol.kind).allocated(&vol.held())
    }

    /// Removes a volume or snapshot: the record marked `Deleting` with its
    /// pool device (one transaction), what it holds outside the pool
    /// removed, the device handed to the engine's deleter (so the call does
    /// not wait for the kernel), then the record and its name. A crash in
    /// between leaves a `Deleting` record, which reconciliation removes the
    /// same way.
    pub(crate) fn forget<T: Serialize>(
        &self,
        (records, names): (TableDefinition<&str, &str>, TableDefinition<&str, &str>),
        storage: &dyn Storage,
        held: &Held<'_>,
        name: &str,
        marked: &T,
    ) -> Result<()> {
        let txn = self.pool().store().write()?;
        state::put(&mut txn.open_table(records)?, held.id, marked)?;
        if let Some(dev) = held.device {
            self.engine.plan_forget(&txn, dev)?;
        }
        txn.commit()?;
        fault::point("csi.delete.after_mark");
        storage.remove(held)?;
        if let Some(dev) = held.device {
            self.engine.forget(dev);
        }
        let txn = self.pool().store().write()?;
        state::remove_named(&txn, records, names, held.id, name)?;
        txn.commit()?;
        Ok(())
    }

    /// Removes a volume (see [`Driver::forget`]).
    pub(crate) fn forget_volume(&self, vol: &Volume) -> Result<()> {
        let marked = Volume { state: State::Deleting, ..vol.clone() };
        self.forget((VOLUMES, NAMES), self.storage(vol.kind), &vol.held(), &vol.name, &marked)?;
        tracing::info!(volume = %vol.id, device = ?vol.device, "volume deleted");
        Ok(())
    }

    /// On exit of a [`Driver::open`]: [`Driver::release`], then the engine's
    /// shutdown (with `release`: detach what nothing publishes, unmount the
    /// embedded pool).
    pub fn shutdown(&self, release: bool) -> Result<()> {
        self.release(release)?;
        Ok(self.engine.shutdown(release)?)
    }

    /// Periodic upkeep of the volume kinds' own storage, outside any request:
    /// the `dir` volumes' embedded image gives freed blocks back to the root.
    pub fn maintain(&self) -> Result<()> {
        self.dirs.trim()
    }

    /// On exit with `release`: let go of what the volume kinds mounted for
    /// themselves (the `dir` volumes' filesystem). The engine's own shutdown
    /// is its owner's.
    pub fn release(&self, release: bool) -> Result<()> {
        let _l = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if release {
            self.pooled.release()?;
            self.dirs.release()?;
        }
        Ok(())
    }
}

/// Size for a capacity range: the required bytes (or the default, capped by
/// the limit) in whole 4 KiB blocks, at least the smallest volume holding
/// `fs`. Nothing more: the volume is exactly what was asked for.
pub fn pick_size(required: u64, limit: u64, default: Bytes, fs: Option<FsType>, encryption: Option<Encryption>) -> Result<Bytes> {
    if limit != 0 && required > limit {
        return Err(Error::OutOfRange(format!("required_bytes {required} exceeds limit_bytes {limit}")));
    }
    let floor = min_volume_size(fs, encryption);
    let want = if required == 0 { if limit == 0 { default.get() } else { default.get().min(limit) } } else { required };
    let size = want.max(floor.get()).div_ceil(ALIGN) * ALIGN;
    if limit == 0 || size <= limit {
        return Ok(Bytes(size));
    }
    // Capped by the limit: whole blocks below it, if that still holds what is required.
    let below = limit / ALIGN * ALIGN;
    if below >= floor.get() && below >= required {
        return Ok(Bytes(below));
    }
    let what = format!("{}{}", encryption.map_or("", |_| "encrypted "), fs.map_or("raw block or dir", FsType::as_str));
    Err(Error::OutOfRange(format!("limit_bytes {limit} is below the smallest {what} volume, {floor}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tonic::Code;

    #[test]
    fn sizes_are_exact_above_each_filesystems_floor() {
        let d = Bytes(1 << 30);
        let ext4 = Some(FsType::Ext4);
        assert_eq!(pick_size(0, 0, d, ext4, None).unwrap(), d);
        assert_eq!(pick_size(0, 512 << 20, d, ext4, None).unwrap(), Bytes(512 << 20));
        assert_eq!(pick_size(64 << 20, 0, d, ext4, None).unwrap(), Bytes(64 << 20), "exactly what was asked");
        assert_eq!(pick_size((2 << 30) + 1, 0, d, ext4, None).unwrap(), Bytes((2 << 30) + 4096), "whole blocks");
        assert_eq!(pick_size(1, 0, d, ext4, None).unwrap(), Bytes(8 << 20), "ext4's floor");
        assert_eq!(pick_size(1, 0, d, Some(FsType::Xfs), None).unwrap(), Bytes(300 << 20), "xfs's floor");
        assert_eq!(pick_size(1, 0, d, None, None).unwrap(), Bytes(4096), "a raw device: one block");
        assert_eq!(pick_size(0, (64 << 20) + 100, d, ext4, None).unwrap(), Bytes(64 << 20), "capped: whole blocks below the limit");
        assert_eq!(pick_size(2, 1, d, None, None).unwrap_err().code(), Code::OutOfRange);
        let below = pick_size(0, 64 << 20, d, Some(FsType::Xfs), None).unwrap_err();
        assert_eq!(below.code(), Code::OutOfRange);
        assert!(below.to_string().contains("smallest xfs volume, 300MiB"), "{below}");
        // Inside LUKS2, the guest's ext4 starts after the 16 MiB header.
        let luks = Some(crate::state::Encryption::Ephemeral);
        assert_eq!(pick_size(1, 0, d, ext4, luks).unwrap(), Bytes(24 << 20), "encrypted ext4's floor");
        let below = pick_size(0, 16 << 20, d, ext4, luks).unwrap_err();
        assert!(below.to_string().contains("smallest encrypted ext4 volume, 24MiB"), "{below}");
    }
}
