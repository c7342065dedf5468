//! A pool of copy-on-write block devices: crash-safe records in the store, the
//! kernel side in a [`Backend`].
//!
//! Every change is two-phased: the caller writes the intent into a [`Devices`]
//! table inside its own transaction, then asks the pool to make the kernel match
//! (`build`, `deactivate`, `destroy`). [`Pool::reconcile`] converges whatever a
//! crash left half-done.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::backend::{Backend, Inventory, Orphan, OrphanFailure, PoolStatus, Usage};
use crate::dmthin::DmThin;
use crate::error::{Error, Result};
use crate::fault;
use crate::reflink::Reflink;
use crate::store::{DeviceRecord, DeviceState, Devices, Store};
use crate::types::{Access, BackendKind, FsType};
use crate::units::{Bytes, DeviceId};

use crate::config::PoolConfig;

/// Settings key: where the thin pool of a dm-thin root lives.
const THIN_SOURCE: &str = "thin_source";

/// What to create: see [`Pool::plan_create`].
#[derive(Clone, Copy, Debug)]
pub struct CreateSpec {
    /// Virtual size; at least the origin's.
    pub size: Bytes,
    /// Snapshot this device's origin (copy-on-write); `None` for an empty device.
    pub origin: Option<DeviceId>,
    /// Filesystem for an empty device (a snapshot inherits its origin's);
    /// `None` leaves it unformatted, reading as zeros.
    pub fs: Option<FsType>,
    /// Attach after creation.
    pub access: Option<Access>,
}

/// What reconciliation did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Devices rolled back or deleted (half-created, half-deleted, unreferenced).
    pub devices_removed: Vec<DeviceId>,
    /// Active devices attached again (after a reboot).
    pub reattached: Vec<DeviceId>,
    /// Inactive devices whose leftover attachment was removed.
    pub detached: Vec<DeviceId>,
    /// Kernel or disk state without a record, removed.
    pub orphans: Vec<Orphan>,
    /// Ready devices whose storage is gone (nothing can repair them).
    pub missing: Vec<DeviceId>,
    /// Devices left to be removed that are still open (a VMM holding them):
    /// they go once let go.
    pub held: Vec<DeviceId>,
    /// Devices that could not be brought in line, left as they were; the
    /// rest of the pass went on without them.
    pub failed: Vec<DeviceFailure>,
    /// Orphans that could not be removed, likewise.
    pub orphans_failed: Vec<OrphanFailure>,
    /// Orphans still open (a VMM holding a dm device that had lost its
    /// record): a later pass removes them once let go.
    pub orphans_held: Vec<Orphan>,
}

impl ReconcileReport {
    /// Whether some device or orphan could not be brought in line.
    pub fn unrepaired(&self) -> bool {
        !self.failed.is_empty() || !self.orphans_failed.is_empty()
    }

    /// Whether the pool is now what the records say, but for devices still
    /// open that the deleter retries: nothing unrepaired, no orphan kept.
    pub fn converged(&self) -> bool {
        !self.unrepaired() && self.orphans_held.is_empty()
    }
}

/// A device reconciliation failed to remove, re-attach or detach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceFailure {
    pub id: DeviceId,
    pub repair: Repair,
    /// The error with its sources, for the operator.
    pub error: String,
}

/// What reconciliation does to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Repair {
    Remove,
    Reattach,
    Detach,
}

impl Repair {
    /// The serde name, for logs and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Repair::Remove => "remove",
            Repair::Reattach => "reattach",
            Repair::Detach => "detach",
        }
    }
}

/// What the kernel and disk hold for the pool under `root` (configured with
/// `cfg`), read without its store, so it works while a daemon runs.
pub fn inventory(root: &Path, cfg: &PoolConfig) -> Result<Inventory> {
    let root = root.canonicalize().map_err(Error::io("resolve", root))?;
    if root.join("thin").exists() { crate::dmthin::inventory(&root, &cfg.thin) } else { crate::reflink::inventory(&root, cfg) }
}

/// A pool of devices and its metadata store.
#[derive(Debug)]
pub struct Pool {
    root: PathBuf,
    store: Store,
    backend: Box<dyn Backend>,
    cfg: PoolConfig,
}

impl Pool {
    /// Opens the pool whose state lives under `root`: the metadata store
    /// (`<root>/meta.redb`) and the backend. Call [`Pool::reconcile`] next.
    pub fn open(root: &Path, cfg: PoolConfig) -> Result<Pool> {
        cfg.validate()?;
        fs::DirBuilder::new().recursive(true).mode(0o700).create(root).map_err(Error::io("create", root))?;
        let root = root.canonicalize().map_err(Error::io("resolve", root))?;
        let store = Store::open(&root.join("meta.redb"))?;
        let kind = match (cfg.backend, store.backend()?) {
            (BackendKind::Auto, Some(remembered)) => remembered,
            (BackendKind::Auto, None) if DmThin::available() || cfg.thin.external() => BackendKind::DmThin,
            (BackendKind::Auto, None) => BackendKind::Reflink,
            (wanted, Some(remembered)) if wanted != remembered => {
                return Err(Error::Config(format!(
                    "{} holds a {} pool; pool.backend says {}: a root keeps the backend it started with (give another --root for a new pool)",
                    root.display(),
                    remembered.as_str(),
                    wanted.as_str()
                )));
            }
            (wanted, _) => wanted,
        };
        let backend: Box<dyn Backend> = match kind {
            BackendKind::DmThin => {
                // A root stays with the thin pool it started on: its thin ids live there.
                let source = DmThin::source(&cfg.thin);
                let remembered = store.setting(THIN_SOURCE)?;
                if let Some(r) = &remembered
                    && *r != source
                {
                    return Err(Error::Config(format!("{} holds devices in the thin pool on {r}; pool.thin says {source}", root.display())));
                }
                let dm = DmThin::open(&root, &cfg, remembered.is_none())?;
                store.set_setting(THIN_SOURCE, &source)?;
                Box::new(dm)
            }
            _ => Box::new(Reflink::open(&root, &cfg)?),
        };
        store.set_backend(kind)?;
        tracing::info!(backend = backend.name(), "pool open");
        Ok(Pool { root, store, backend, cfg })
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// Whether a snapshot suspends its origin (dm-thin), so a filesystem
    /// mounted on it needs no freezing for a consistent copy.
    pub fn snapshot_suspends_origin(&self) -> bool {
        self.backend.snapshot_suspends_origin()
    }

    /// The metadata store (shared with the front end's own tables).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Phase one of creation, inside the caller's transaction: checks the origin
    /// and the free space, allocates an id and records the intent (`Creating`).
    pub fn plan_create(&self, devs: &mut Devices<'_>, spec: CreateSpec) -> Result<DeviceRecord> {
        let (fs, origin_size) = match spec.origin {
            Some(origin) => {
                let o = devs.require(origin)?;
                if o.state != DeviceState::Ready {
                    return Err(Error::DeviceNotReady { id: origin, state: o.state.as_str() });
                }
                if spec.size < o.size {
                    return Err(Error::SizeBelowOrigin { requested: spec.size, origin: o.size });
                }
                (o.fs, Some(o.size))
            }
            None => (spec.fs, None),
        };
        self.check_space()?;
        let rec = DeviceRecord {
            id: devs.allocate_id()?,
            size: spec.size.align_up(4096),
            origin: spec.origin,
            fs,
            state: DeviceState::Creating,
            access: spec.access,
            origin_size,
        };
        devs.put(&rec)?;
        Ok(rec)
    }

    /// Phase two of creation: makes the device (clone or mkfs), grows its
    /// filesystem if it is larger than its origin, and attaches it if the record
    /// asks. On error, what was made is undone; the record stays `Creating` for
    /// the caller to discard.
    pub fn build(&self, rec: &DeviceRecord) -> Result<Option<PathBuf>> {
        self.backend.create(rec)
    }

    /// Phase two for a group of snapshots planned together: all of them as
    /// one instant of their origins, or none. On dm-thin every origin in
    /// use is suspended across all the snapshots; elsewhere the caller keeps
    /// the origins still (see [`Backend::create_group`]).
    pub fn build_group(&self, recs: &[DeviceRecord]) -> Result<()> {
        if let Some(r) = recs.iter().find(|r| r.origin.is_none() || r.access.is_some()) {
            return Err(Error::NotAGroupSnapshot(r.id));
        }
        self.backend.create_group(recs)
    }

    /// Attaches a ready device and records that it stays attached, so that
    /// reconciliation attaches it again after a reboot.
    pub fn activate(&self, id: DeviceId, access: Access) -> Result<PathBuf> {
        let txn = self.store.write()?;
        let rec = {
            let mut devs = Devices::open(&txn)?;
            let mut rec = devs.require(id)?;
            if rec.state != DeviceState::Ready {
                return Err(Error::DeviceNotReady { id, state: rec.state.as_str() });
            }
            rec.access = Some(access);
            devs.put(&rec)?;
            rec
        };
        txn.commit()?;
        self.backend.activate(&rec, access)
    }

    /// Grows a ready device to `size` (aligned to 4 KiB), live if attached.
    /// The new size is recorded first, so a crash leaves a device no larger
    /// than its record and a retry (same size) finishes the kernel side; a
    /// growth the backend refuses puts the old size back. Shrinking is
    /// refused. The filesystem inside is the caller's to grow.
    pub fn resize(&self, id: DeviceId, size: Bytes) -> Result<Bytes> {
        let size = size.align_up(4096);
        let rec = self.store.device(id)?.ok_or(Error::DeviceNotFound(id))?;
        if rec.state != DeviceState::Ready {
            return Err(Error::DeviceNotReady { id, state: rec.state.as_str() });
        }
        if size < rec.size {
            return Err(Error::Shrink { id, current: rec.size, requested: size });
        }
        if size > rec.size {
            self.check_space()?;
            let txn = self.store.write()?;
            {
                let mut devs = Devices::open(&txn)?;
                let mut r = devs.require(id)?;
                r.size = size;
                devs.put(&r)?;
            }
            txn.commit()?;
        }
        if let Err(e) = self.backend.resize(&rec, size) {
            if size > rec.size {
                let txn = self.store.write()?;
                let mut devs = Devices::open(&txn)?;
                devs.put(&rec)?;
                drop(devs);
                txn.commit()?;
            }
            return Err(e);
        }
        Ok(size)
    }

    /// Detaches a device and records that it stays detached.
    pub fn release(&self, id: DeviceId) -> Result<()> {
        let txn = self.store.write()?;
        {
            let mut devs = Devices::open(&txn)?;
            let mut rec = devs.require(id)?;
            rec.access = None;
            devs.put(&rec)?;
        }
        txn.commit()?;
        self.deactivate(id)
    }

    /// Flushes a device, then detaches it (lazily, if something still holds it open).
    pub fn deactivate(&self, id: DeviceId) -> Result<()> {
        self.backend.flush(id)?;
        self.backend.deactivate(id)
    }

    /// Makes what was written to a device durable.
    pub fn flush(&self, id: DeviceId) -> Result<()> {
        crate::fault::error("pool.flush").map_err(Error::io("flush device", id.to_string()))?;
        self.backend.flush(id)
    }

    /// Detaches a device the caller has flushed.
    pub fn detach(&self, id: DeviceId) -> Result<()> {
        self.backend.deactivate(id)
    }

    /// The node of an attached device.
    pub fn node(&self, id: DeviceId) -> Option<PathBuf> {
        self.backend.node(id)
    }

    /// Marks a device `Deleting` inside the caller's transaction.
    pub fn plan_delete(&self, devs: &mut Devices<'_>, id: DeviceId) -> Result<()> {
        let mut rec = devs.require(id)?;
        rec.state = DeviceState::Deleting;
        rec.access = None;
        devs.put(&rec)
    }

    /// Phase two of deletion (the caller has marked the record `Deleting` or
    /// dropped its reference): removes the device, then its record.
    pub fn destroy(&self, id: DeviceId) -> Result<()> {
        let size = self.store.device(id)?.map(|r| r.size);
        self.backend.remove(id, size)?;
        fault::point("destroy.after_unlink");
        let txn = self.store.write()?;
        Devices::open(&txn)?.delete(id)?;
        txn.commit()?;
        Ok(())
    }

    /// What the device holds beyond its origin.
    pub fn usage(&self, rec: &DeviceRecord) -> Result<Usage> {
        self.backend.usage(rec)
    }

    /// Pool-wide figures.
    pub fn status(&self) -> Result<PoolStatus> {
        let records = self.store.devices()?;
        let deleting = records.iter().filter(|r| r.state == DeviceState::Deleting).count() as u64;
        let unattached = records.iter().filter(|r| r.state == DeviceState::Ready && r.access.is_some() && self.node(r.id).is_none()).count() as u64;
        let root_free = crate::fs::space(&self.root)?.free;
        Ok(PoolStatus { devices: records.len() as u64, deleting, unattached, ..self.bounded(self.space()?, root_free) })
    }

    /// Pool-wide figures without the device count (which reads every record):
    /// what the hot paths need.
    fn space(&self) -> Result<PoolStatus> {
        Ok(PoolStatus { reserve: self.cfg.reserve, ..self.backend.status()? })
    }

    /// `st` with no more free space than the root's filesystem has
    /// (`root_free`) where every free block of the pool is a hole in a file
    /// there. Not for growth: that needs the pool's own figure.
    fn bounded(&self, mut st: PoolStatus, root_free: Bytes) -> PoolStatus {
        if self.backend.sparse_on_root() {
            st.free = st.free.min(root_free);
        }
        st
    }

    /// Free space on the state root's filesystem, or [`Error::RootFull`]
    /// below `pool.root_reserve`: every creation, of a device or of anything
    /// else kept there, asks first. The store must keep room for every other
    /// change (a failed write stops it for good), an embedded image for its
    /// writers.
    pub fn root_room(&self) -> Result<Bytes> {
        let root_free = crate::fs::space(&self.root)?.free;
        if root_free < self.cfg.root_reserve {
            let embedded = self.backend.sparse_on_root();
            return Err(Error::RootFull { root: self.root.clone(), free: root_free, reserve: self.cfg.root_reserve, embedded });
        }
        Ok(root_free)
    }

    fn check_space(&self) -> Result<()> {
        let root_free = self.root_room()?;
        let st = self.bounded(self.maintain()?, root_free);
        if st.free < st.reserve {
            return Err(Error::PoolFull { pool: st.location, free: st.free, reserve: st.reserve });
        }
        if let Some(meta) = st.metadata
            && meta.used.get().saturating_mul(100) >= meta.total.get().saturating_mul(u64::from(self.cfg.thin.metadata_limit_percent))
        {
            return Err(Error::MetadataFull { pool: st.location, used: meta.used, total: meta.total, limit: self.cfg.thin.metadata_limit_percent });
        }
        Ok(())
    }

    /// Keeps free space above twice the reserve by growing the pool where the
    /// backend can (call it periodically: running containers consume space too).
    /// Returns the status afterwards.
    pub fn maintain(&self) -> Result<PoolStatus> {
        let mut st = self.space()?;
        while st.free < Bytes(st.reserve.get().saturating_mul(2)) {
            let Some(size) = self.backend.grow()? else { break };
            tracing::info!(pool = %st.location, free = %st.free, new_size = %size, "pool grown");
            st = self.space()?;
        }
        Ok(st)
    }

    /// One round of the pool's watch: [`Pool::maintain`], then wait up to
    /// `timeout` for a kernel event (a thin pool crossing its low-water mark
    /// wakes it at once); returns whether one came. Armed before maintaining,
    /// so no event is missed.
    pub fn maintain_and_wait(&self, timeout: Duration) -> Result<bool> {
        self.backend.arm_events()?;
        let st = self.maintain()?;
        if let Err(e) = self.backend.trim() {
            tracing::warn!(pool = %st.location, error = %thinbox_daemon::chain(&e), "trimming the pool");
        }
        let event = self.backend.wait_event(timeout)?;
        if event {
            tracing::debug!(pool = %st.location, "kernel event");
        }
        Ok(event)
    }

    /// Converges the kernel with the store: a device lives only if its record is
    /// `Ready` and `referenced` holds its id; everything else (half-created,
    /// half-deleted, unreferenced devices, kernel state without a record) is
    /// removed; active devices are attached again (after a reboot), inactive ones
    /// lose a leftover attachment.
    pub fn reconcile(&self, referenced: &HashSet<DeviceId>) -> Result<ReconcileReport> {
        self.converge(referenced, true)
    }

    /// What [`Pool::reconcile`] would do, without doing it, plus devices whose
    /// storage is missing. The caller must keep operations out meanwhile.
    pub fn check(&self, referenced: &HashSet<DeviceId>) -> Result<ReconcileReport> {
        self.converge(referenced, false)
    }

    fn converge(&self, referenced: &HashSet<DeviceId>, apply: bool) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let mut known = HashSet::new();
        let stored = self.backend.stored()?;
        for rec in self.store.devices()? {
            if rec.state != DeviceState::Ready || !referenced.contains(&rec.id) {
                if !apply {
                    if self.backend.held(rec.id)? {
                        known.insert(rec.id);
                        report.held.push(rec.id);
                    } else {
                        report.devices_removed.push(rec.id);
                    }
                    continue;
                }
                tracing::info!(device = %rec.id, state = rec.state.as_str(), "removing leftover device");
                match self.destroy(rec.id) {
                    Ok(()) => report.devices_removed.push(rec.id),
                    Err(Error::DeviceBusy(_)) => {
                        // Still open (a VMM holding it): the deleter or a later
                        // pass deletes it, and until then its storage is nobody's orphan.
                        tracing::warn!(device = %rec.id, "leftover device still open; kept for now");
                        known.insert(rec.id);
                        report.held.push(rec.id);
                    }
                    Err(e) => {
                        // What is left of it stays its record's, not an orphan's.
                        repair(&mut report, rec.id, Repair::Remove, Err(e))?;
                        known.insert(rec.id);
                    }
                }
                continue;
            }
            known.insert(rec.id);
            if !stored.contains(&rec.id) {
                tracing::error!(device = %rec.id, backend = self.backend.name(), "device recorded but its storage is gone");
                report.missing.push(rec.id);
                continue;
            }
            match (rec.access, self.node(rec.id)) {
                (Some(access), None) => {
                    let done = !apply || repair(&mut report, rec.id, Repair::Reattach, self.backend.activate(&rec, access).map(drop))?;
                    if done {
                        report.reattached.push(rec.id);
                    }
                }
                (None, Some(_)) => {
                    let done = !apply || repair(&mut report, rec.id, Repair::Detach, self.deactivate(rec.id))?;
                    if done {
                        report.detached.push(rec.id);
                    }
                }
                _ => {}
            }
        }
        let sweep = self.backend.remove_unknown(&known, apply)?;
        (report.orphans, report.orphans_failed, report.orphans_held) = (sweep.removed, sweep.failed, sweep.held);
        Ok(report)
    }

    /// Called on daemon exit. With `release`, every device is detached (lazily:
    /// one still in use stays until its user lets go) and what the backend
    /// mounted is unmounted if nothing uses it; without, everything stays
    /// attached so running containers keep their devices.
    pub fn shutdown(&self, release: bool) -> Result<()> {
        self.backend.shutdown(release)
    }
}

/// The outcome of one device's repair: `true` if done. One device that cannot
/// be repaired must not keep the others (and a daemon start) from converging,
/// so its failure is noted in `report` and the pass goes on; the store's
/// failing stops it.
fn repair(report: &mut ReconcileReport, id: DeviceId, what: Repair, res: Result<()>) -> Result<bool> {
    match res {
        Ok(()) => Ok(true),
        Err(e) if e.is_store() => Err(e),
        Err(e) => {
            let error = thinbox_daemon::chain(&e);
            tracing::error!(device = %id, repair = what.as_str(), error, "device left as it was");
            report.failed.push(DeviceFailure { id, repair: what, error });
            Ok(false)
        }
    }
}
