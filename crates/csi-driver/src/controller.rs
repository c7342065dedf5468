//! The controller's side of the driver: volumes and snapshots made, grown and
//! removed, and the room for new ones.

use std::collections::BTreeMap;
use std::path::PathBuf;

use thinbox_blockstore::redb::{ReadableDatabase, WriteTransaction};
use thinbox_blockstore::{Bytes, CreateSpec, Creation, DeviceId, DeviceRecord, Engine, FsType, Points, freeze};

use crate::driver::{Driver, SHIM_TIMEOUT, pick_size};
use crate::error::{Error, Result, invalid};
use crate::state::{self, Encryption, Kind, Mode, NAMES, SNAPSHOT_NAMES, SNAPSHOTS, Sandbox, Snapshot, Source, State, VOLUMES, Volume};
use crate::storage::{New, Shape, Storage};

/// What CreateVolume asks for, already decoded.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    /// Idempotency key.
    pub name: String,
    /// At least this many bytes (0: no lower bound).
    pub required: u64,
    /// At most this many bytes (0: no upper bound).
    pub limit: u64,
    /// What backs it.
    pub kind: Kind,
    /// Filesystem, or `None` for raw block only.
    pub fs: Option<FsType>,
    /// Sandbox asked for by the StorageClass.
    pub sandbox: Option<Sandbox>,
    /// An inline ephemeral volume.
    pub ephemeral: bool,
    /// Parameters to keep.
    pub parameters: BTreeMap<String, String>,
    /// Content to start from (a snapshot, or another volume to clone).
    pub source: Option<Source>,
    /// Encrypted in a Kata guest (`thinbox.io/encryption`).
    pub encryption: Option<Encryption>,
}

/// Where a new volume's content comes from, resolved.
struct Origin {
    kind: Kind,
    fs: Option<FsType>,
    size: Bytes,
    device: Option<DeviceId>,
    /// The live volume (a clone's source), to keep still meanwhile.
    live: Option<Volume>,
}

/// A filesystem frozen for a snapshot; thawed when dropped.
pub(crate) struct Frozen(PathBuf);

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = freeze(&self.0, false) {
            tracing::error!(target = %self.0.display(), error = %crate::error::chain(&e), "thaw after snapshot");
        }
    }
}

/// Crash-test points of CreateVolume's steps.
const VOLUME_POINTS: Points =
    Points { after_intent: "csi.create.after_intent", after_build: "csi.create.after_build", after_ready: "csi.create.after_ready" };
/// Crash-test points of CreateSnapshot's steps.
const SNAPSHOT_POINTS: Points =
    Points { after_intent: "csi.snapshot.after_intent", after_build: "csi.snapshot.after_build", after_ready: "csi.snapshot.after_ready" };

/// CreateVolume's part in the engine's intent discipline: the volume record
/// (`Creating`, then `Ready`) beside its pool device's.
struct MakeVolume<'a> {
    driver: &'a Driver,
    storage: &'a dyn Storage,
    /// The record; its id and project are given at the intent.
    vol: Volume,
    /// The source's device, and the live volume to keep still (a clone's).
    origin: Option<(Option<DeviceId>, Option<&'a Volume>)>,
}

impl MakeVolume<'_> {
    fn wanted(&self) -> New<'_> {
        let v = &self.vol;
        New { id: &v.id, size: v.size, fs: v.host_fs(), origin: self.origin.and_then(|(d, _)| d), project: v.project }
    }
}

impl Creation for MakeVolume<'_> {
    type Error = Error;

    fn plan(&mut self, txn: &WriteTransaction) -> Result<Vec<CreateSpec>> {
        let n = state::next_number(txn, "volume")?;
        self.vol.id = format!("tb-{}-{n}", self.vol.kind.as_str());
        self.vol.project = (self.storage.shape() == Shape::Directory)
            .then(|| u32::try_from(n))
            .transpose()
            .map_err(|_| Error::ResourceExhausted("XFS project ids exhausted".into()))?;
        Ok(self.storage.spec(&self.wanted()).into_iter().collect())
    }

    fn record(&mut self, txn: &WriteTransaction, devices: &[DeviceRecord]) -> Result<()> {
        self.vol.device = devices.first().map(|d| d.id);
        state::put(&mut txn.open_table(VOLUMES)?, &self.vol.id, &self.vol)?;
        txn.open_table(NAMES)?.insert(self.vol.name.as_str(), self.vol.id.as_str())?;
        Ok(())
    }

    fn build(&mut self, engine: &Engine, devices: &[DeviceRecord]) -> Result<Option<PathBuf>> {
        let _frozen = self.driver.freeze(self.origin.and_then(|(_, live)| live))?;
        self.storage.build(engine, &self.wanted(), devices.first())?;
        Ok(None)
    }

    fn undo(&mut self, txn: &WriteTransaction) -> Result<()> {
        tracing::warn!(volume = %self.vol.id, "create failed; rolling back");
        self.storage.remove(&self.vol.held())?;
        state::remove_named(txn, VOLUMES, NAMES, &self.vol.id, &self.vol.name)
    }

    fn ready(&mut self, txn: &WriteTransaction) -> Result<()> {
        self.vol.state = State::Ready;
        state::put(&mut txn.open_table(VOLUMES)?, &self.vol.id, &self.vol)
    }
}

/// CreateSnapshot's part in the engine's intent discipline.
struct MakeSnapshot<'a> {
    driver: &'a Driver,
    /// The record; its id is given at the intent.
    snap: Snapshot,
    source: &'a Volume,
}

impl MakeSnapshot<'_> {
    fn wanted(&self) -> New<'_> {
        snapshot_wanted(&self.snap, self.source)
    }
}

/// What the pool makes for snapshot `snap` of `source`: a copy of its device.
pub(crate) fn snapshot_wanted<'s>(snap: &'s Snapshot, source: &Volume) -> New<'s> {
    New { id: &snap.id, size: snap.size, fs: snap.fs, origin: source.device, project: None }
}

impl Creation for MakeSnapshot<'_> {
    type Error = Error;

    fn plan(&mut self, txn: &WriteTransaction) -> Result<Vec<CreateSpec>> {
        self.snap.id = format!("tb-snap-{}", state::next_number(txn, "snapshot")?);
        Ok(self.driver.snapshot_storage().spec(&self.wanted()).into_iter().collect())
    }

    fn record(&mut self, txn: &WriteTransaction, devices: &[DeviceRecord]) -> Result<()> {
        self.snap.device = devices.first().map(|d| d.id);
        state::put(&mut txn.open_table(SNAPSHOTS)?, &self.snap.id, &self.snap)?;
        txn.open_table(SNAPSHOT_NAMES)?.insert(self.snap.name.as_str(), self.snap.id.as_str())?;
        Ok(())
    }

    fn build(&mut self, engine: &Engine, devices: &[DeviceRecord]) -> Result<Option<PathBuf>> {
        let _frozen = self.driver.freeze(Some(self.source))?;
        self.driver.snapshot_storage().build(engine, &self.wanted(), devices.first())?;
        Ok(None)
    }

    fn undo(&mut self, txn: &WriteTransaction) -> Result<()> {
        tracing::warn!(snapshot = %self.snap.id, "snapshot failed; rolling back");
        state::remove_named(txn, SNAPSHOTS, SNAPSHOT_NAMES, &self.snap.id, &self.snap.name)
    }

    fn ready(&mut self, txn: &WriteTransaction) -> Result<()> {
        self.snap.state = State::Ready;
        state::put(&mut txn.open_table(SNAPSHOTS)?, &self.snap.id, &self.snap)
    }
}

impl Driver {
    /// Free bytes for new volumes of `kind`: for `block` and `file`, what the
    /// pool has left after everything (rootfs snapshots and image layers
    /// too) and its reserve.
    pub fn capacity(&self, kind: Kind) -> Result<u64> {
        self.storage(kind).capacity()
    }

    /// CreateVolume: idempotent by name; from a snapshot or a clone of another
    /// volume when `source` says.
    pub fn create(&self, req: &CreateRequest) -> Result<Volume> {
        self.engine.with_room(|e: &Error| e.code() == tonic::Code::ResourceExhausted, || self.create_once(req))
    }

    fn create_once(&self, req: &CreateRequest) -> Result<Volume> {
        let _s = self.serial();
        self.check_encryption(req)?;
        let origin = match &req.source {
            None => None,
            Some(src) => Some(self.origin(src, req)?),
        };
        let default = origin.as_ref().map_or(self.cfg.default_size, |o| o.size);
        let fs = origin.as_ref().map_or(req.fs, |o| o.fs);
        let size = pick_size(req.required, req.limit, default, fs, req.encryption)?;
        let size = origin.as_ref().map_or(size, |o| size.max(o.size));
        if let Some(v) = self.by_name(&req.name)? {
            let fits = v.size.get() >= req.required && (req.limit == 0 || v.size.get() <= req.limit);
            if v.kind != req.kind || !fits || v.fs != fs || v.source != req.source || v.encryption != req.encryption {
                return Err(Error::AlreadyExists(format!("volume {:?} exists as {} {} {:?}, not as asked", req.name, v.kind.as_str(), v.size, v.fs)));
            }
            return Ok(v);
        }
        let storage = self.storage(req.kind);
        storage.admit(size)?;
        let new = Volume {
            id: String::new(),
            name: req.name.clone(),
            kind: req.kind,
            size,
            fs,
            device: None,
            state: State::Creating,
            sandbox: req.sandbox,
            ephemeral: req.ephemeral,
            parameters: req.parameters.clone(),
            source: req.source.clone(),
            project: None,
            encryption: req.encryption,
        };
        let origin = origin.as_ref().map(|o| (o.device, o.live.as_ref()));
        let mut make = MakeVolume { driver: self, storage, vol: new, origin };
        self.engine.create(&mut make, VOLUME_POINTS)?;
        let vol = make.vol;
        tracing::info!(volume = %vol.id, name = %req.name, kind = vol.kind.as_str(), size = %size, source = ?vol.source, "volume created");
        Ok(vol)
    }

    /// What Kata's guest-side encryption can take: a device (not a
    /// directory), formatted by the agent (ext4 only, in its
    /// `block_handler.rs`), empty (a key that is thrown away leaves nothing
    /// to copy or restore), and never a runC publication.
    fn check_encryption(&self, req: &CreateRequest) -> Result<()> {
        let Some(enc) = req.encryption else { return Ok(()) };
        let refuse = |why: &str| Err(invalid(format!("thinbox.io/encryption={}: {why}", enc.as_str())));
        if self.storage(req.kind).shape() != Shape::Device {
            return refuse(&format!("{} volumes are directories, not devices a guest can encrypt", req.kind.as_str()));
        }
        match req.fs {
            Some(FsType::Ext4) => {}
            None => return refuse("Kata's agent formats what it encrypts; raw block access is not possible"),
            Some(other) => return refuse(&format!("Kata's agent creates ext4 only, not {}", other.as_str())),
        }
        if req.sandbox == Some(Sandbox::Runc) {
            return refuse("only a Kata guest encrypts; a runC sandbox cannot");
        }
        if req.source.is_some() {
            return refuse("a volume encrypted with a throwaway key starts empty; it has no snapshot or clone source");
        }
        Ok(())
    }

    /// Resolves a content source and checks it suits the request.
    fn origin(&self, src: &Source, req: &CreateRequest) -> Result<Origin> {
        let o = match src {
            Source::Snapshot(id) => {
                let snap = self
                    .snapshot(id)?
                    .filter(|s| s.state == State::Ready)
                    .ok_or_else(|| Error::NotFound(format!("snapshot {id:?} does not exist")))?;
                Origin { kind: snap.kind, fs: snap.fs, size: snap.size, device: snap.device, live: None }
            }
            Source::Volume(id) => {
                let v = self.require(id)?;
                if v.encryption.is_some() {
                    return Err(invalid(format!("volume {id} is encrypted with a key only its guest held; a clone of it is unreadable")));
                }
                Origin { kind: v.kind, fs: v.fs, size: v.size, device: v.device, live: Some(v) }
            }
        };
        if !self.storage(o.kind).snapshots() {
            return Err(invalid(format!("{} volumes have no snapshots or clones", o.kind.as_str())));
        }
        if o.kind != req.kind {
            return Err(invalid(format!("the source is a {} volume; a {} volume cannot be made from it", o.kind.as_str(), req.kind.as_str())));
        }
        if req.fs.is_some_and(|f| Some(f) != o.fs) {
            return Err(invalid("the source holds a different filesystem"));
        }
        if req.limit != 0 && o.size.get() > req.limit {
            return Err(Error::OutOfRange(format!("the source is {}, above limit_bytes {}", o.size, req.limit)));
        }
        Ok(o)
    }

    /// Freezes the filesystem of `vol` where it is mounted on this host, so a
    /// copy of it is consistent. Not needed where the pool's snapshot
    /// suspends the origin (dm-thin), which freezes it; a Kata guest's
    /// filesystem cannot be frozen from here and is copied crash-consistent.
    pub(crate) fn freeze(&self, vol: Option<&Volume>) -> Result<Option<Frozen>> {
        let Some(vol) = vol else { return Ok(None) };
        if self.pool().snapshot_suspends_origin() {
            return Ok(None);
        }
        let Some(p) = self.publications_of(&vol.id)?.into_iter().find(|p| p.mode == Mode::HostMount && !p.readonly) else { return Ok(None) };
        freeze(&p.target, true)?;
        Ok(Some(Frozen(p.target)))
    }

    /// CreateSnapshot: idempotent by name. A thin snapshot or reflink of the
    /// volume's device; the source is frozen meanwhile where it is mounted on
    /// the host.
    pub fn create_snapshot(&self, name: &str, source: &str) -> Result<Snapshot> {
        let _s = self.serial();
        let existing = {
            let txn = self.pool().store().db().begin_read()?;
            let id = txn.open_table(SNAPSHOT_NAMES)?.get(name)?.map(|v| v.value().to_owned());
            match id {
                Some(id) => state::get::<Snapshot>(&txn.open_table(SNAPSHOTS)?, &id)?,
                None => None,
            }
        };
        if let Some(snap) = existing {
            if snap.source != source {
                return Err(Error::AlreadyExists(format!("snapshot {name:?} exists for volume {}", snap.source)));
            }
            return Ok(snap);
        }
        let vol = self.snapshot_source(source)?;
        let snap = Snapshot::of(&vol, name.to_owned(), state::now(), None);
        let mut make = MakeSnapshot { driver: self, snap, source: &vol };
        self.engine.create(&mut make, SNAPSHOT_POINTS)?;
        tracing::info!(snapshot = %make.snap.id, name, source, "snapshot created");
        Ok(make.snap)
    }

    /// A volume that can be snapshotted, by id.
    pub(crate) fn snapshot_source(&self, id: &str) -> Result<Volume> {
        let vol = self.require(id)?;
        if !self.storage(vol.kind).snapshots() {
            return Err(invalid(format!("volume {id} is a {} volume; those have no snapshots", vol.kind.as_str())));
        }
        if vol.encryption.is_some() {
            return Err(invalid(format!("volume {id} is encrypted with a key only its guest held; a snapshot of it is unreadable")));
        }
        Ok(vol)
    }

    /// DeleteSnapshot: idempotent. Volumes restored from it keep their
    /// content. A group snapshot's member goes only with its group.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        let _s = self.serial();
        match self.snapshot(id)? {
            Some(Snapshot { group: Some(group), .. }) => {
                Err(invalid(format!("snapshot {id} was cut with group snapshot {group}; delete the group snapshot")))
            }
            Some(snap) => self.forget_snapshot(&snap),
            None => Ok(()),
        }
    }

    pub(crate) fn forget_snapshot(&self, snap: &Snapshot) -> Result<()> {
        let marked = Snapshot { state: State::Deleting, ..snap.clone() };
        self.forget((SNAPSHOTS, SNAPSHOT_NAMES), self.snapshot_storage(), &snap.held(), &snap.name, &marked)?;
        tracing::info!(snapshot = %snap.id, device = ?snap.device, "snapshot deleted");
        Ok(())
    }

    /// DeleteVolume: idempotent; a published volume is refused.
    pub fn delete(&self, id: &str) -> Result<()> {
        let _s = self.serial();
        let Some(vol) = self.volume(id)? else { return Ok(()) };
        if !self.publications_of(id)?.is_empty() {
            return Err(Error::FailedPrecondition(format!("volume {id} is still published")));
        }
        self.forget_volume(&vol)
    }

    /// ControllerExpandVolume: grows the volume (live if attached, and in
    /// the guest of a Kata sandbox that holds it) to the range; a volume
    /// already that large stays as it is. Returns the size and whether a
    /// filesystem must be grown on the node.
    pub fn expand(&self, id: &str, required: u64, limit: u64) -> Result<(Bytes, bool)> {
        self.grow(id, required, limit)
    }

    /// Grows the volume's storage (under the lock), then has every Kata
    /// sandbox that holds it grow it in the guest (without the lock: a slow
    /// or dead shim must not hold up other volumes' calls), then records the
    /// size: the record never says more than the storage and the guest were
    /// granted, and a retry after a failure finishes the job.
    pub(crate) fn grow(&self, id: &str, required: u64, limit: u64) -> Result<(Bytes, bool)> {
        let (vol, size) = {
            let _s = self.serial();
            let vol = self.require(id)?;
            if limit != 0 && vol.size.get() > limit {
                return Err(Error::OutOfRange(format!("volume {id} is {} already, above limit_bytes {limit}", vol.size)));
            }
            let size = pick_size(required, limit, vol.size, vol.fs, vol.encryption)?.max(vol.size);
            if size > vol.size {
                self.storage(vol.kind).grow(&vol.held(), size)?;
            }
            (vol, size)
        };
        if size > vol.size {
            for (target, sandbox) in self.holders(id)? {
                self.shim(id, &sandbox, |shim| shim.resize(target, size.get(), SHIM_TIMEOUT))?;
                tracing::info!(volume = %id, sandbox, size = %size, "grown in the Kata guest");
            }
            let _s = self.serial();
            let mut now = self.require(id)?;
            if now.size < size {
                now.size = size;
                let txn = self.pool().store().write()?;
                state::put(&mut txn.open_table(VOLUMES)?, id, &now)?;
                txn.commit()?;
            }
            tracing::info!(volume = %id, size = %size, "volume expanded");
        }
        Ok((size, vol.fs.is_some()))
    }
}
