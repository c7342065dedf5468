//! The kernel side of a pool, behind one small trait so that the reflink and
//! dm-thin backends share the crash-safe record keeping in [`crate::Pool`].
//!
//! Every method is idempotent: reconciliation may repeat any of them after a
//! crash.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::error::Result;
use crate::store::DeviceRecord;
use crate::types::Access;
use crate::units::{Bytes, DeviceId};

/// Space a device holds on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes the device holds beyond its origin.
    pub bytes: Bytes,
    /// Inodes in use beyond the origin's, from the superblocks.
    pub inodes: u64,
}

/// Pool-wide figures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PoolStatus {
    /// Backend name.
    pub backend: &'static str,
    /// Where the devices live (a directory, a thin pool).
    pub location: String,
    /// Capacity for device data.
    pub total: Bytes,
    /// Free capacity for device data.
    pub free: Bytes,
    /// Space kept in reserve.
    pub reserve: Bytes,
    /// Devices recorded in the store (filled in by the pool).
    pub devices: u64,
    /// Of those, marked deleting: removed, not yet deleted (queued, retrying
    /// after a failure, or still open on dm-thin; filled in by the pool).
    pub deleting: u64,
    /// Of those, in use (an active snapshot or view, a volume) but not
    /// attached: their re-attach failed, or their attach is under way
    /// (filled in by the pool).
    pub unattached: u64,
    /// Thin pool metadata: capacity and use (dm-thin only).
    pub metadata: Option<Space>,
    /// Free data space at which the kernel raises its low-water event (dm-thin only).
    pub low_water: Option<Bytes>,
    /// Pool health as the kernel reports it ("rw", "ro", "out_of_data_space",
    /// "needs_check"; dm-thin only).
    pub mode: Option<String>,
}

/// Capacity and use of one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Space {
    /// Capacity.
    pub total: Bytes,
    /// In use.
    pub used: Bytes,
}

/// Kernel state found without a record, and removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Orphan {
    /// An image file.
    File(PathBuf),
    /// A loop device.
    Loop(PathBuf),
    /// An active dm device.
    DmDevice(String),
    /// A thin id held by the pool.
    ThinId(u64),
}

/// An orphan that could not be removed; it is left as it was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OrphanFailure {
    pub orphan: Orphan,
    /// The error with its sources, for the operator.
    pub error: String,
}

/// What a backend's sweep of orphans did (or, in a check, would do).
#[derive(Debug, Default)]
pub struct Sweep {
    /// Removed (would be removed).
    pub removed: Vec<Orphan>,
    /// Could not be removed: one orphan that cannot go must not keep the rest
    /// of the pool, and so a daemon start, from converging.
    pub failed: Vec<OrphanFailure>,
    /// Still open (a dm device's removal the kernel deferred holds its thin
    /// id): a later pass removes them once let go.
    pub held: Vec<Orphan>,
}

impl Sweep {
    /// Books one orphan and its removal (`None`: not tried, in a check).
    pub(crate) fn book(&mut self, orphan: Orphan, removal: Option<Result<()>>) {
        match removal {
            Some(Err(e)) => {
                let error = thinbox_daemon::chain(&e);
                tracing::error!(?orphan, error, "orphan left as it was");
                self.failed.push(OrphanFailure { orphan, error });
            }
            _ => self.removed.push(orphan),
        }
    }
}

/// What the kernel and disk hold for a pool, read without its store (which the
/// running daemon holds): for crash tests and consistency checks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Inventory {
    /// Backend name.
    pub backend: &'static str,
    /// Devices with storage (image files, thin ids); `None` when the pool is
    /// not live (a torn-down thin pool).
    pub stored: Option<BTreeSet<DeviceId>>,
    /// Attached devices and their nodes.
    pub attached: BTreeMap<DeviceId, PathBuf>,
}

/// What a pool's kernel side must do.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Short name for logs and status ("reflink").
    fn name(&self) -> &'static str;

    /// Whether making a snapshot suspends its origin (which freezes a
    /// filesystem mounted on it), so the snapshot is consistent by itself.
    fn snapshot_suspends_origin(&self) -> bool {
        false
    }

    /// Makes the device's storage: an empty device with a filesystem, or a
    /// copy-on-write snapshot of `rec.origin` grown to `rec.size`; attaches it if
    /// `rec.access` says so and returns the node.
    fn create(&self, rec: &DeviceRecord) -> Result<Option<PathBuf>>;

    /// Makes snapshots of several origins (`recs`: each with an origin, and
    /// no access) as one instant of them all, or none of them.
    /// This one makes them one after another: one instant only where
    /// nothing writes to the origins meanwhile, which the caller sees to
    /// (it freezes what it can).
    fn create_group(&self, recs: &[DeviceRecord]) -> Result<()> {
        for (i, rec) in recs.iter().enumerate() {
            if let Err(e) = self.create(rec) {
                for made in &recs[..i] {
                    if let Err(u) = self.remove(made.id, None) {
                        tracing::warn!(device = %made.id, error = %u, "cleanup after failed group create");
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Attaches the device (no-op if attached) and returns its node.
    fn activate(&self, rec: &DeviceRecord, access: Access) -> Result<PathBuf>;

    /// Detaches the device (lazily if still in use). What was written to it
    /// is durable only after [`Backend::flush`].
    fn deactivate(&self, id: DeviceId) -> Result<()>;

    /// Makes what was written to the device durable where its filesystem's
    /// own flushes do not reach (reflink: the image's extents in the pool's
    /// log). dm-thin needs nothing more: a flush to a thin device commits the
    /// pool's metadata, and an unmount sends one.
    fn flush(&self, _id: DeviceId) -> Result<()> {
        Ok(())
    }

    /// The node of an attached device.
    fn node(&self, id: DeviceId) -> Option<PathBuf>;

    /// Grows the device to `size` (`rec` still has the old one), live if it
    /// is attached; its filesystem is the caller's business.
    fn resize(&self, rec: &DeviceRecord, size: Bytes) -> Result<()>;

    /// Removes everything the device has in the kernel and on disk (`size`, if
    /// known, lets a thin device be discarded first).
    fn remove(&self, id: DeviceId, size: Option<Bytes>) -> Result<()>;

    /// Whether something holds the device open so that [`Backend::remove`]
    /// must refuse it for now (dm-thin: the pool will not delete an open thin
    /// device). Backends that remove an open device (lazily) say no.
    fn held(&self, _id: DeviceId) -> Result<bool> {
        Ok(false)
    }

    /// What the device holds beyond its origin.
    fn usage(&self, rec: &DeviceRecord) -> Result<Usage>;

    /// Pool-wide figures (the reserve is filled in by the pool).
    fn status(&self) -> Result<PoolStatus>;

    /// Whether the pool's data lives in sparse files under the state root
    /// (the embedded pools), so that the root's filesystem must have the
    /// room the pool reports free.
    fn sparse_on_root(&self) -> bool;

    /// Adds room if the backend can (a file-backed thin pool grows its data
    /// file); returns the new size, or `None` if it cannot grow.
    fn grow(&self) -> Result<Option<Bytes>> {
        Ok(None)
    }

    /// Gives blocks freed in the pool back to where it lives, where that
    /// must be asked for (the embedded reflink pool: see
    /// [`crate::embedded::Trimmer`]); for the pool's periodic maintenance.
    fn trim(&self) -> Result<()> {
        Ok(())
    }

    /// Starts watching for kernel events about the pool (see `wait_event`).
    fn arm_events(&self) -> Result<()> {
        Ok(())
    }

    /// Waits up to `timeout` for a kernel event since `arm_events` (dm-thin: a
    /// dm event such as the pool crossing its low-water mark); returns whether
    /// one came. Backends without events just wait.
    fn wait_event(&self, timeout: Duration) -> Result<bool> {
        std::thread::sleep(timeout);
        Ok(false)
    }

    /// Finds kernel and disk state of devices not in `known` and, with `apply`,
    /// removes it, each piece on its own (see [`Sweep::book`]).
    fn remove_unknown(&self, known: &HashSet<DeviceId>, apply: bool) -> Result<Sweep>;

    /// Devices that have storage (image files, thin ids in the pool).
    fn stored(&self) -> Result<BTreeSet<DeviceId>>;

    /// On exit: with `release`, detach everything (lazily) and unmount what the
    /// backend mounted; without, leave devices attached.
    fn shutdown(&self, release: bool) -> Result<()>;
}
