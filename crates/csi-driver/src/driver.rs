//! The driver's logic, independent of gRPC: volumes of each kind, their
//! publications on this node, and reconciliation after a crash.
//!
//! Every change is two-phased like the block store's: the intent goes into
//! the state tables (with the block device's own record, in one transaction)
//! before the kernel or disk is touched, and reconciliation at start-up rolls
//! half-made volumes back and finishes half-deleted ones.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLockReadGuard};

use rustix::mount::{MountFlags, UnmountFlags, mount, mount_bind, mount_remount, unmount};
use thinbox_block_passthrough::{DirectVolumes, MountInfo};
use thinbox_blockstore::redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use thinbox_blockstore::{
    Access, Bytes, Consumer, CreateSpec, DeviceId, DeviceState, Devices, Engine, FsType, Pool, PoolConfig, embedded, fault, image, run_tool,
};

use crate::config::{CsiConfig, MIN_VOLUME_SIZE};
use crate::dirs::Dirs;
use crate::error::{Error, Result, invalid};
use crate::state::{
    self, Kind, Mode, NAMES, PUBLICATIONS, Publication, SNAPSHOT_NAMES, SNAPSHOTS, Sandbox, Snapshot, Source, State, VOLUMES, Volume,
};

/// Volume sizes are whole MiB.
const ALIGN: u64 = 1 << 20;

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
}

/// Where a new volume's content comes from, resolved.
struct Origin {
    kind: Kind,
    fs: Option<FsType>,
    size: Bytes,
    device: Option<thinbox_blockstore::DeviceId>,
    image: PathBuf,
    /// The live volume (a clone's source), to keep still meanwhile.
    live: Option<Volume>,
}

/// A filesystem frozen for a snapshot; thawed when dropped.
struct Frozen(PathBuf);

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = run_tool("fsfreeze", &["-u".as_ref(), self.0.as_os_str()], &self.0) {
            tracing::error!(target = %self.0.display(), error = %crate::error::chain(&e), "thaw after snapshot");
        }
    }
}

/// How to publish, already decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessType {
    /// A filesystem, with mount flags.
    Mount { fs: Option<FsType>, flags: Vec<String> },
    /// The raw device.
    Block,
}

/// Usage figures of a published volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Capacity in bytes.
    pub total: u64,
    /// Bytes in use (filesystem) or allocated (direct volume).
    pub used: u64,
    /// Bytes available (filesystem only).
    pub available: u64,
    /// Inode figures (filesystem only): total, used, free.
    pub inodes: Option<(u64, u64, u64)>,
}

/// The driver state of one node.
#[derive(Debug)]
pub struct Driver {
    engine: Arc<Engine>,
    cfg: CsiConfig,
    node_id: String,
    files: PathBuf,
    snapshots_dir: PathBuf,
    root: PathBuf,
    /// The filesystem of `dir` volumes, set up on first use (not every kernel
    /// has XFS project quotas; the other kinds work without).
    dirs: std::sync::OnceLock<Dirs>,
    direct: DirectVolumes,
    /// Mutating operations run one at a time: they are short, and the CO
    /// retries concurrent calls for the same volume anyway.
    lock: Mutex<()>,
}

/// A mutating operation's hold: the driver's lock, then the engine's gate shared.
struct Serial<'a> {
    _gate: RwLockReadGuard<'a, ()>,
    _lock: MutexGuard<'a, ()>,
}

impl Driver {
    /// Opens the state under `root` as the pool's only consumer and converges
    /// it with the disk and kernel.
    pub fn open(root: &Path, node_id: &str, pool: PoolConfig, cfg: CsiConfig) -> Result<Driver> {
        let engine = Arc::new(Engine::open(root, pool, vec![Box::new(VolumeRecords)])?);
        let d = Driver::new(engine, root, node_id, cfg)?;
        d.engine.reconcile()?;
        Ok(d)
    }

    /// The volume front end over an engine that lists [`VolumeRecords`] among
    /// its consumers: finishes what a crash interrupted on the volumes' side
    /// (publications, half-made or half-deleted volumes, stray images and
    /// directories). The engine's reconciliation, which its owner runs next,
    /// does the pool's side.
    pub fn new(engine: Arc<Engine>, root: &Path, node_id: &str, cfg: CsiConfig) -> Result<Driver> {
        let root = root.canonicalize().map_err(Error::io("resolve", root))?;
        let (files, snapshots_dir) = (root.join("files"), root.join("snapshots"));
        for dir in [&files, &snapshots_dir] {
            fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
        }
        let direct = DirectVolumes::new(&cfg.direct_volumes);
        let d = Driver {
            engine,
            cfg,
            node_id: node_id.to_owned(),
            files,
            snapshots_dir,
            root: root.clone(),
            dirs: std::sync::OnceLock::new(),
            direct,
            lock: Mutex::new(()),
        };
        let txn = d.pool().store().write()?;
        state::init(&txn)?;
        txn.commit()?;
        d.recover()?;
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

    /// The `dir` volumes' filesystem, set up now if it is not yet.
    fn dirs(&self) -> Result<&Dirs> {
        if let Some(d) = self.dirs.get() {
            return Ok(d);
        }
        let d = Dirs::open(&self.root, self.cfg.dir_path.as_deref(), self.cfg.dir_pool_size)
            .map_err(|e| Error::FailedPrecondition(format!("dir volumes are not available on this node: {}", crate::error::chain(&e))))?;
        Ok(self.dirs.get_or_init(|| d))
    }

    /// Whether `dir` volumes were ever set up here (then reconciliation looks at them).
    fn dirs_in_use(&self) -> bool {
        self.cfg.dir_path.is_some() || self.root.join("dirs.img").exists()
    }

    fn serial(&self) -> Serial<'_> {
        let _lock = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        Serial { _gate: self.engine.shared(), _lock }
    }

    fn image(&self, id: &str) -> PathBuf {
        self.files.join(format!("{id}.img"))
    }

    /// A volume by id.
    pub fn volume(&self, id: &str) -> Result<Option<Volume>> {
        let txn = self.pool().store().db().begin_read()?;
        state::get(&txn.open_table(VOLUMES)?, id)
    }

    fn require(&self, id: &str) -> Result<Volume> {
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

    /// Free bytes for new volumes of `kind`.
    pub fn capacity(&self, kind: Kind) -> Result<u64> {
        match kind {
            Kind::Block => {
                let st = self.pool().status()?;
                Ok(st.free.get().saturating_sub(st.reserve.get()))
            }
            Kind::File => {
                let st = rustix::fs::statvfs(&self.files).map_err(|e| Error::io("statvfs", &self.files)(e.into()))?;
                Ok((st.f_bavail * st.f_frsize).saturating_sub(self.pool().config().reserve.get()))
            }
            Kind::Dir => Ok(self.dirs()?.free()?.saturating_sub(self.pool().config().reserve.get())),
        }
    }

    /// CreateVolume: idempotent by name; from a snapshot or a clone of another
    /// volume when `source` says.
    pub fn create(&self, req: &CreateRequest) -> Result<Volume> {
        self.engine.with_room(|e: &Error| e.code() == tonic::Code::ResourceExhausted, || self.create_once(req))
    }

    fn create_once(&self, req: &CreateRequest) -> Result<Volume> {
        let _s = self.serial();
        let origin = match &req.source {
            None => None,
            Some(src) => Some(self.origin(src, req)?),
        };
        let default = origin.as_ref().map_or(self.cfg.default_size, |o| o.size);
        let size = pick_size(req.required, req.limit, default)?;
        let size = origin.as_ref().map_or(size, |o| size.max(o.size));
        let fs = origin.as_ref().map_or(req.fs, |o| o.fs);
        if let Some(v) = self.by_name(&req.name)? {
            let fits = v.size.get() >= req.required && (req.limit == 0 || v.size.get() <= req.limit);
            if v.kind != req.kind || !fits || v.fs != fs || v.source != req.source {
                return Err(Error::AlreadyExists(format!("volume {:?} exists as {} {} {:?}, not as asked", req.name, v.kind.as_str(), v.size, v.fs)));
            }
            return Ok(v);
        }
        if req.kind != Kind::Block && self.capacity(req.kind)? < size.get() {
            return Err(Error::ResourceExhausted(format!("no room for a {size} {} volume on this node", req.kind.as_str())));
        }
        // Intent: the record (and the block device's record) before any work.
        let txn = self.pool().store().write()?;
        let n = state::next_number(&txn, "volume")?;
        let id = format!("tb-{}-{n}", req.kind.as_str());
        let device = match req.kind {
            Kind::Block => {
                let fs = fs.ok_or_else(|| invalid("a block store volume needs a filesystem"))?;
                let spec = CreateSpec { size, origin: origin.as_ref().and_then(|o| o.device), fs, access: None };
                Some(self.pool().plan_create(&mut Devices::open(&txn)?, spec)?)
            }
            Kind::File | Kind::Dir => None,
        };
        let project = (req.kind == Kind::Dir)
            .then(|| u32::try_from(n))
            .transpose()
            .map_err(|_| Error::ResourceExhausted("XFS project ids exhausted".into()))?;
        let mut vol = Volume {
            id: id.clone(),
            name: req.name.clone(),
            kind: req.kind,
            size,
            fs,
            device: device.as_ref().map(|d| d.id),
            state: State::Creating,
            sandbox: req.sandbox,
            ephemeral: req.ephemeral,
            parameters: req.parameters.clone(),
            source: req.source.clone(),
            project,
        };
        state::put(&mut txn.open_table(VOLUMES)?, &id, &vol)?;
        txn.open_table(NAMES)?.insert(req.name.as_str(), id.as_str())?;
        txn.commit()?;
        fault::point("csi.create.after_intent");

        let made = self.freeze(origin.as_ref().and_then(|o| o.live.as_ref())).and_then(|_frozen| match (&device, &origin) {
            (Some(rec), _) => self.pool().build(rec).map(|_| ()).map_err(Error::from),
            (None, _) if req.kind == Kind::Dir => self.dirs()?.create(&id, project.unwrap_or_default(), size),
            (None, Some(o)) => image::copy(&o.image, &self.image(&id), size, fs, &self.scratch(&id)).map_err(Error::from),
            (None, None) => image::create(&self.image(&id), size, fs).map_err(Error::from),
        });
        if let Err(e) = made {
            tracing::warn!(volume = %id, error = %crate::error::chain(&e), "create failed; rolling back");
            self.forget(&vol)?;
            return Err(e);
        }
        fault::point("csi.create.after_build");
        vol.state = State::Ready;
        self.mark_ready(VOLUMES, &id, &vol, vol.device)?;
        tracing::info!(volume = %id, name = %req.name, kind = vol.kind.as_str(), size = %size, source = ?vol.source, "volume created");
        Ok(vol)
    }

    /// Resolves a content source and checks it suits the request.
    fn origin(&self, src: &Source, req: &CreateRequest) -> Result<Origin> {
        let o = match src {
            Source::Snapshot(id) => {
                let snap = self
                    .snapshot(id)?
                    .filter(|s| s.state == State::Ready)
                    .ok_or_else(|| Error::NotFound(format!("snapshot {id:?} does not exist")))?;
                Origin { kind: snap.kind, fs: snap.fs, size: snap.size, device: snap.device, image: self.snap_image(id), live: None }
            }
            Source::Volume(id) => {
                let v = self.require(id)?;
                Origin { kind: v.kind, fs: v.fs, size: v.size, device: v.device, image: self.image(id), live: Some(v) }
            }
        };
        if o.kind == Kind::Dir {
            return Err(invalid("dir volumes have no snapshots or clones"));
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
    /// copy of it is consistent. Not needed on dm-thin, whose snapshot
    /// suspends the device (which freezes it); a Kata guest's filesystem
    /// cannot be frozen from here and is copied crash-consistent.
    fn freeze(&self, vol: Option<&Volume>) -> Result<Option<Frozen>> {
        let Some(vol) = vol else { return Ok(None) };
        if vol.kind == Kind::Block && self.pool().status()?.backend == "dm-thin" {
            return Ok(None);
        }
        let Some(p) = self.publications_of(&vol.id)?.into_iter().find(|p| p.mode == Mode::HostMount && !p.readonly) else { return Ok(None) };
        run_tool("fsfreeze", &["-f".as_ref(), p.target.as_os_str()], &p.target)?;
        Ok(Some(Frozen(p.target)))
    }

    fn scratch(&self, id: &str) -> PathBuf {
        self.files.join(format!(".scratch-{id}"))
    }

    fn snap_image(&self, id: &str) -> PathBuf {
        self.snapshots_dir.join(format!("{id}.img"))
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

    /// CreateSnapshot: idempotent by name. A thin snapshot or reflink of a
    /// block volume, a reflink (or sparse copy) of a file volume; the source
    /// is frozen meanwhile where it is mounted on the host.
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
        let vol = self.require(source)?;
        if vol.kind == Kind::Dir {
            return Err(invalid(format!("volume {source} is a directory; dir volumes have no snapshots")));
        }
        let txn = self.pool().store().write()?;
        let id = format!("tb-snap-{}", state::next_number(&txn, "snapshot")?);
        let device = match vol.device {
            Some(dev) => {
                let spec = CreateSpec { size: vol.size, origin: Some(dev), fs: vol.fs.unwrap_or(self.cfg.default_fs), access: None };
                Some(self.pool().plan_create(&mut Devices::open(&txn)?, spec)?)
            }
            None => None,
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut snap = Snapshot {
            id: id.clone(),
            name: name.to_owned(),
            source: source.to_owned(),
            kind: vol.kind,
            size: vol.size,
            fs: vol.fs,
            device: device.as_ref().map(|d| d.id),
            state: State::Creating,
            created: (i64::try_from(now.as_secs()).unwrap_or(i64::MAX), i32::try_from(now.subsec_nanos()).unwrap_or(0)),
        };
        state::put(&mut txn.open_table(SNAPSHOTS)?, &id, &snap)?;
        txn.open_table(SNAPSHOT_NAMES)?.insert(name, id.as_str())?;
        txn.commit()?;
        let made = self.freeze(Some(&vol)).and_then(|_frozen| match &device {
            Some(rec) => self.pool().build(rec).map(|_| ()).map_err(Error::from),
            None => image::copy(&self.image(source), &self.snap_image(&id), vol.size, None, &self.scratch(&id)).map_err(Error::from),
        });
        if let Err(e) = made {
            tracing::warn!(snapshot = %id, error = %crate::error::chain(&e), "snapshot failed; rolling back");
            self.forget_snapshot(&snap)?;
            return Err(e);
        }
        snap.state = State::Ready;
        self.mark_ready(SNAPSHOTS, &id, &snap, snap.device)?;
        tracing::info!(snapshot = %id, name, source, "snapshot created");
        Ok(snap)
    }

    /// DeleteSnapshot: idempotent. Volumes restored from it keep their content.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        let _s = self.serial();
        match self.snapshot(id)? {
            Some(snap) => self.forget_snapshot(&snap),
            None => Ok(()),
        }
    }

    fn forget_snapshot(&self, snap: &Snapshot) -> Result<()> {
        if let Some(dev) = snap.device {
            self.forget_device(SNAPSHOTS, SNAPSHOT_NAMES, &snap.id, &snap.name, dev)?;
            tracing::info!(snapshot = %snap.id, device = %dev, "snapshot deleted; its device goes in the background");
            return Ok(());
        }
        let marked = Snapshot { state: State::Deleting, ..snap.clone() };
        self.mark_deleting(SNAPSHOTS, &snap.id, &marked, None)?;
        remove_file_if_any(&self.snap_image(&snap.id))?;
        let txn = self.pool().store().write()?;
        state::remove_named(&txn, SNAPSHOTS, SNAPSHOT_NAMES, &snap.id, &snap.name)?;
        txn.commit()?;
        tracing::info!(snapshot = %snap.id, "snapshot deleted");
        Ok(())
    }

    /// Removes a record and its name and marks its device `Deleting` in one
    /// transaction, then hands the device to the engine's deleter: the call
    /// returns before the kernel work, and a crash leaves the device to
    /// reconciliation.
    fn forget_device(
        &self,
        records: TableDefinition<&str, &str>,
        names: TableDefinition<&str, &str>,
        id: &str,
        name: &str,
        dev: DeviceId,
    ) -> Result<()> {
        let txn = self.pool().store().write()?;
        state::remove_named(&txn, records, names, id, name)?;
        {
            let mut devs = Devices::open(&txn)?;
            if devs.get(dev)?.is_some() {
                self.pool().plan_delete(&mut devs, dev)?;
            }
        }
        txn.commit()?;
        self.engine.deleter().push(dev);
        Ok(())
    }

    /// Last phase of a creation: the (ready) record and its device's record
    /// marked ready, in one transaction.
    fn mark_ready<T: serde::Serialize>(
        &self,
        table: TableDefinition<&str, &str>,
        id: &str,
        ready: &T,
        device: Option<thinbox_blockstore::DeviceId>,
    ) -> Result<()> {
        let txn = self.pool().store().write()?;
        if let Some(dev) = device {
            let mut devs = Devices::open(&txn)?;
            let mut r = devs.require(dev)?;
            r.state = DeviceState::Ready;
            devs.put(&r)?;
        }
        state::put(&mut txn.open_table(table)?, id, ready)?;
        txn.commit()?;
        Ok(())
    }

    /// Phase one of a deletion: the record marked `Deleting` and its device
    /// planned for deletion, in one transaction.
    fn mark_deleting<T: serde::Serialize>(
        &self,
        table: TableDefinition<&str, &str>,
        id: &str,
        marked: &T,
        device: Option<thinbox_blockstore::DeviceId>,
    ) -> Result<()> {
        let txn = self.pool().store().write()?;
        state::put(&mut txn.open_table(table)?, id, marked)?;
        if let Some(dev) = device {
            let mut devs = Devices::open(&txn)?;
            if devs.get(dev)?.is_some() {
                self.pool().plan_delete(&mut devs, dev)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn by_name(&self, name: &str) -> Result<Option<Volume>> {
        let txn = self.pool().store().db().begin_read()?;
        let Some(id) = txn.open_table(NAMES)?.get(name)?.map(|v| v.value().to_owned()) else { return Ok(None) };
        state::get(&txn.open_table(VOLUMES)?, &id)
    }

    /// DeleteVolume: idempotent; a published volume is refused.
    pub fn delete(&self, id: &str) -> Result<()> {
        let _s = self.serial();
        let Some(vol) = self.volume(id)? else { return Ok(()) };
        if !self.publications_of(id)?.is_empty() {
            return Err(Error::FailedPrecondition(format!("volume {id} is still published")));
        }
        self.forget(&vol)
    }

    /// Marks the volume deleting, removes its storage, then its records.
    fn forget(&self, vol: &Volume) -> Result<()> {
        if let Some(dev) = vol.device {
            self.forget_device(VOLUMES, NAMES, &vol.id, &vol.name, dev)?;
            fault::point("csi.delete.after_mark");
            tracing::info!(volume = %vol.id, device = %dev, "volume deleted; its device goes in the background");
            return Ok(());
        }
        let marked = Volume { state: State::Deleting, ..vol.clone() };
        self.mark_deleting(VOLUMES, &vol.id, &marked, vol.device)?;
        fault::point("csi.delete.after_mark");
        match vol.project {
            Some(project) => self.dirs()?.remove(&vol.id, project)?,
            None => {
                let img = self.image(&vol.id);
                image::detach(&img)?;
                remove_file_if_any(&img)?;
            }
        }
        let txn = self.pool().store().write()?;
        state::remove_named(&txn, VOLUMES, NAMES, &vol.id, &vol.name)?;
        txn.commit()?;
        tracing::info!(volume = %vol.id, "volume deleted");
        Ok(())
    }

    fn publications_of(&self, id: &str) -> Result<Vec<Publication>> {
        let txn = self.pool().store().db().begin_read()?;
        let all: Vec<Publication> = state::all(&txn.open_table(PUBLICATIONS)?)?;
        Ok(all.into_iter().filter(|p| p.volume == id).collect())
    }

    fn publication(&self, target: &Path) -> Result<Option<Publication>> {
        let txn = self.pool().store().db().begin_read()?;
        state::get(&txn.open_table(PUBLICATIONS)?, &target.to_string_lossy())
    }

    /// The device node of a volume, attaching it if needed.
    /// The device node of a volume (its directory for `dir`), attaching it if needed.
    fn attach(&self, vol: &Volume) -> Result<PathBuf> {
        match (vol.device, vol.kind) {
            (Some(dev), _) => Ok(self.pool().activate(dev, Access::ReadWrite)?),
            (None, Kind::Dir) => Ok(self.dirs()?.path(&vol.id)),
            (None, _) => Ok(image::attach(&self.image(&vol.id), false)?),
        }
    }

    fn detach(&self, vol: &Volume) -> Result<()> {
        match (vol.device, vol.kind) {
            (Some(dev), _) => Ok(self.pool().release(dev)?),
            (None, Kind::Dir) => Ok(()),
            (None, _) => Ok(image::detach(&self.image(&vol.id))?),
        }
    }

    /// NodePublishVolume. `target` has been checked (see [`crate::paths`]).
    pub fn publish(&self, id: &str, target: &Path, access: &AccessType, readonly: bool, sandbox: Option<Sandbox>) -> Result<()> {
        let _s = self.serial();
        let vol = self.require(id)?;
        let sandbox = sandbox.or(vol.sandbox).unwrap_or(self.cfg.default_sandbox);
        let (mode, flags) = match (access, sandbox) {
            // A directory is shared as it is: bind-mounted on the host, and over
            // virtio-fs into a Kata guest.
            (AccessType::Mount { flags, .. }, _) if vol.kind == Kind::Dir => (Mode::HostMount, flags.clone()),
            (AccessType::Block, _) if vol.kind == Kind::Dir => {
                return Err(invalid(format!("volume {id} is a directory; it has no block device")));
            }
            (AccessType::Block, Sandbox::Runc) => (Mode::HostBlock, Vec::new()),
            (AccessType::Block, Sandbox::Kata) => (Mode::Kata, Vec::new()),
            (AccessType::Mount { fs, flags }, sandbox) => {
                let Some(vol_fs) = vol.fs else {
                    return Err(Error::FailedPrecondition(format!("volume {id} is a raw block volume; it has no filesystem to mount")));
                };
                if fs.is_some_and(|f| f != vol_fs) {
                    return Err(invalid(format!("volume {id} holds {}, not {}", vol_fs.as_str(), fs.map(FsType::as_str).unwrap_or_default())));
                }
                (if sandbox == Sandbox::Kata { Mode::Kata } else { Mode::HostMount }, flags.clone())
            }
        };
        let wanted = Publication { volume: id.to_owned(), target: target.to_owned(), mode, readonly, flags };
        if let Some(existing) = self.publication(target)? {
            if existing == wanted {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "{} is already published differently ({} as {:?})",
                target.display(),
                existing.volume,
                existing.mode
            )));
        }
        // Never mounted on the host while a guest has it, and the reverse.
        if let Some(other) = self.publications_of(id)?.into_iter().find(|p| (p.mode == Mode::Kata) != (mode == Mode::Kata)) {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is published at {} for a {} sandbox; a filesystem is never in a guest and on the host at once",
                other.target.display(),
                if other.mode == Mode::Kata { "Kata" } else { "runC" }
            )));
        }
        let txn = self.pool().store().write()?;
        state::put(&mut txn.open_table(PUBLICATIONS)?, &target.to_string_lossy(), &wanted)?;
        txn.commit()?;
        fault::point("csi.publish.after_record");
        let done = self.attach(&vol).and_then(|node| {
            fault::point("csi.publish.after_attach");
            self.make_target(&vol, &wanted, &node)
        });
        if let Err(e) = done {
            tracing::warn!(volume = %id, target = %target.display(), error = %crate::error::chain(&e), "publish failed; undoing");
            let _ = self.undo_publication(&vol, &wanted);
            return Err(e);
        }
        tracing::info!(volume = %id, target = %target.display(), mode = ?mode, readonly, "published");
        Ok(())
    }

    fn make_target(&self, vol: &Volume, p: &Publication, node: &Path) -> Result<()> {
        let fs_name = vol.fs.map(FsType::as_str).unwrap_or_default();
        match p.mode {
            Mode::HostMount if vol.kind == Kind::Dir => {
                mkdir(&p.target)?;
                if !is_mountpoint(&p.target)? {
                    mount_bind(node, &p.target).map_err(|e| Error::io("bind-mount", node)(e.into()))?;
                    let (mut flags, _) = mount_options(&p.flags);
                    if p.readonly {
                        flags |= MountFlags::RDONLY;
                    }
                    if !flags.is_empty() {
                        // Flags of a bind mount change only by remounting it.
                        mount_remount(&p.target, flags | MountFlags::BIND, c"").map_err(|e| Error::io("remount", &p.target)(e.into()))?;
                    }
                }
                Ok(())
            }
            Mode::HostMount => {
                mkdir(&p.target)?;
                let (mut flags, mut data) = mount_options(&p.flags);
                flags |= MountFlags::NOSUID | MountFlags::NODEV;
                if p.readonly {
                    flags |= MountFlags::RDONLY;
                }
                if vol.fs == Some(FsType::Xfs) {
                    data.push("nouuid".into());
                }
                if !is_mountpoint(&p.target)? {
                    let data = std::ffi::CString::new(data.join(",")).map_err(|_| invalid("mount flags must not contain NUL"))?;
                    mount(node, &p.target, fs_name, flags, data.as_c_str()).map_err(|e| Error::io("mount", node)(e.into()))?;
                }
                Ok(())
            }
            Mode::HostBlock => {
                if !p.target.exists() {
                    fs::File::create(&p.target).map_err(Error::io("create", &p.target))?;
                }
                if !is_mountpoint(&p.target)? {
                    mount_bind(node, &p.target).map_err(|e| Error::io("bind-mount", node)(e.into()))?;
                }
                Ok(())
            }
            Mode::Kata => {
                // The runtime looks the target up; the host leaves it empty.
                mkdir(&p.target)?;
                let mut options = p.flags.clone();
                if p.readonly && !options.iter().any(|o| o == "ro") {
                    options.push("ro".into());
                }
                let info = MountInfo {
                    volume_type: "block".into(),
                    device: node.display().to_string(),
                    fstype: vol.fs.map(FsType::as_str).unwrap_or_default().to_owned(),
                    metadata: BTreeMap::from([("thinbox.io/volume".to_owned(), vol.id.clone())]),
                    options,
                };
                Ok(self.direct.add(&p.target, &info)?)
            }
        }
    }

    /// NodeUnpublishVolume: idempotent.
    pub fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        let _s = self.serial();
        let Some(p) = self.publication(target)? else {
            // Not ours (or already done): only make sure nothing of ours is left there.
            if is_mountpoint(target)? {
                return Err(Error::FailedPrecondition(format!("{} is mounted, but not by volume {id}", target.display())));
            }
            return Ok(());
        };
        if p.volume != id {
            return Err(Error::NotFound(format!("volume {id} is not published at {}", target.display())));
        }
        let vol = self.volume(id)?.ok_or_else(|| Error::NotFound(format!("volume {id:?} does not exist")))?;
        self.undo_publication(&vol, &p)?;
        if vol.ephemeral {
            self.forget(&vol)?;
        }
        tracing::info!(volume = %id, target = %target.display(), "unpublished");
        Ok(())
    }

    /// Unmounts (or removes the direct-volume record), removes the target,
    /// forgets the publication and detaches the device if nothing else uses it.
    fn undo_publication(&self, vol: &Volume, p: &Publication) -> Result<()> {
        match p.mode {
            Mode::HostMount | Mode::HostBlock => {
                while is_mountpoint(&p.target)? {
                    unmount(&p.target, UnmountFlags::empty()).map_err(|e| Error::io("unmount", &p.target)(e.into()))?;
                }
            }
            Mode::Kata => {
                self.direct.remove(&p.target)?;
            }
        }
        fault::point("csi.unpublish.after_unmount");
        remove_target(&p.target)?;
        let txn = self.pool().store().write()?;
        txn.open_table(PUBLICATIONS)?.remove(p.target.to_string_lossy().as_ref())?;
        txn.commit()?;
        if self.publications_of(&vol.id)?.is_empty() {
            self.detach(vol)?;
        }
        Ok(())
    }

    /// NodePublishVolume of an inline ephemeral volume: made here, named by the
    /// kubelet's volume id, gone at unpublish.
    pub fn publish_ephemeral(&self, handle: &str, target: &Path, req: CreateRequest, access: &AccessType, readonly: bool) -> Result<()> {
        let existing = self.publication(target)?;
        let vol = match self.by_name(handle)? {
            Some(v) => v,
            None => self.create(&CreateRequest { name: handle.to_owned(), ephemeral: true, ..req })?,
        };
        if existing.is_some_and(|p| p.volume != vol.id) {
            return Err(Error::AlreadyExists(format!("{} is already published for another volume", target.display())));
        }
        let sandbox = vol.sandbox;
        match self.publish(&vol.id, target, access, readonly, sandbox) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Half-way: the volume must not outlive the failed publish.
                if self.publications_of(&vol.id)?.is_empty() {
                    let _s = self.serial();
                    self.forget(&vol)?;
                }
                Err(e)
            }
        }
    }

    /// The volume published at `target`, by the id the CO uses for it (ours, or
    /// the kubelet's handle of an ephemeral volume).
    pub fn resolve(&self, handle: &str) -> Result<Option<Volume>> {
        match self.volume(handle)? {
            Some(v) => Ok(Some(v)),
            None => self.by_name(handle).map(|v| v.filter(|v| v.ephemeral)),
        }
    }

    /// ControllerExpandVolume: grows the device (live if attached) to the
    /// range; a volume already that large stays as it is. Returns the size and
    /// whether a filesystem must be grown on the node.
    pub fn expand(&self, id: &str, required: u64, limit: u64) -> Result<(Bytes, bool)> {
        let _s = self.serial();
        self.grow_device(id, required, limit)
    }

    fn grow_device(&self, id: &str, required: u64, limit: u64) -> Result<(Bytes, bool)> {
        let mut vol = self.require(id)?;
        if limit != 0 && vol.size.get() > limit {
            return Err(Error::OutOfRange(format!("volume {id} is {} already, above limit_bytes {limit}", vol.size)));
        }
        let size = pick_size(required, limit, vol.size)?.max(vol.size);
        if size > vol.size {
            match vol.device {
                Some(dev) => {
                    self.pool().resize(dev, size)?;
                }
                None => {
                    if self.capacity(vol.kind)? < size.get() - vol.size.get() {
                        return Err(Error::ResourceExhausted(format!("no room to grow {id} to {size}")));
                    }
                }
            }
            // Recorded before a file grows: a crash leaves the image no larger
            // than its record, and the CO's retry grows it.
            vol.size = size;
            let txn = self.pool().store().write()?;
            state::put(&mut txn.open_table(VOLUMES)?, id, &vol)?;
            txn.commit()?;
        }
        match (vol.device, vol.project) {
            (Some(_), _) => {}
            (None, Some(project)) => self.dirs()?.limit(project, size)?,
            (None, None) => {
                let img = self.image(id);
                image::grow(&img, size, image::find(&img)?.as_deref())?;
            }
        }
        tracing::info!(volume = %id, size = %size, "volume expanded");
        Ok((size, vol.fs.is_some()))
    }

    /// NodeExpandVolume: grows the device to the range (if the controller side
    /// has not already: in a cluster one resizer serves every node, so the
    /// node does both), then the filesystem mounted at `path`. A Kata volume's
    /// filesystem is in the guest, which grows it itself; a raw block volume
    /// has none.
    pub fn expand_on_node(&self, id: &str, path: &Path, required: u64, limit: u64) -> Result<Bytes> {
        let _s = self.serial();
        self.grow_device(id, required, limit)?;
        let vol = self.require(id)?;
        let p = self.publication(path)?.ok_or_else(|| Error::NotFound(format!("volume {id} is not published at {}", path.display())))?;
        if p.volume != id {
            return Err(Error::NotFound(format!("volume {id} is not published at {}", path.display())));
        }
        if let (Mode::HostMount, Some(fs)) = (p.mode, vol.fs) {
            let node = self.attach(&vol)?;
            image::grow_mounted_fs(fs, &node, path)?;
            tracing::info!(volume = %id, target = %path.display(), "filesystem grown");
        }
        Ok(vol.size)
    }

    /// Bytes the volume holds on the node: its device's usage or its image's
    /// allocated blocks.
    pub fn allocated(&self, vol: &Volume) -> Result<u64> {
        if let Some(project) = vol.project {
            return self.dirs()?.used(project);
        }
        match vol.device {
            Some(dev) => {
                let rec = self.pool().store().device(dev)?.ok_or_else(|| Error::NotFound(format!("device of volume {}", vol.id)))?;
                Ok(self.pool().usage(&rec)?.bytes.get())
            }
            None => {
                let img = self.image(&vol.id);
                Ok(fs::metadata(&img).map_err(Error::io("stat", &img))?.blocks() * 512)
            }
        }
    }

    /// NodeGetVolumeStats.
    pub fn stats(&self, id: &str, path: &Path) -> Result<Stats> {
        let vol = self.require(id)?;
        let Some(p) = self.publication(path)? else {
            return Err(Error::NotFound(format!("volume {id} is not published at {}", path.display())));
        };
        match p.mode {
            Mode::HostMount => {
                let st = rustix::fs::statvfs(path).map_err(|e| Error::io("statvfs", path)(e.into()))?;
                let total = st.f_blocks * st.f_frsize;
                let available = st.f_bavail * st.f_frsize;
                Ok(Stats {
                    total,
                    used: total - st.f_bfree * st.f_frsize,
                    available,
                    inodes: Some((st.f_files, st.f_files - st.f_ffree, st.f_favail)),
                })
            }
            Mode::HostBlock | Mode::Kata => {
                let used = self.allocated(&vol)?;
                Ok(Stats { total: vol.size.get(), used, available: vol.size.get().saturating_sub(used), inodes: None })
            }
        }
    }

    /// Rolls back half-made volumes, finishes half-deleted ones, drops
    /// publications whose target is gone, and lets the pool remove devices no
    /// volume references; image files without a volume are removed.
    fn recover(&self) -> Result<()> {
        let txn = self.pool().store().db().begin_read()?;
        let all: Vec<Volume> = state::all(&txn.open_table(VOLUMES)?)?;
        let pubs: Vec<Publication> = state::all(&txn.open_table(PUBLICATIONS)?)?;
        let snaps: Vec<Snapshot> = state::all(&txn.open_table(SNAPSHOTS)?)?;
        drop(txn);
        let mut images = HashSet::new();
        let mut dirs = HashSet::new();
        for snap in snaps {
            if snap.state != State::Ready {
                tracing::info!(snapshot = %snap.id, state = ?snap.state, "finishing interrupted snapshot change");
                self.forget_snapshot(&snap)?;
                continue;
            }
            if snap.device.is_none() {
                images.insert(self.snap_image(&snap.id));
            }
        }
        for vol in all {
            if vol.state != State::Ready {
                tracing::info!(volume = %vol.id, state = ?vol.state, "finishing interrupted volume change");
                self.forget(&vol)?;
                continue;
            }
            match vol.kind {
                Kind::File => {
                    images.insert(self.image(&vol.id));
                }
                Kind::Dir => {
                    dirs.insert(vol.id.clone());
                }
                Kind::Block => {}
            }
        }
        let mut published = HashSet::new();
        for p in pubs {
            let live = match p.mode {
                Mode::HostMount | Mode::HostBlock => is_mountpoint(&p.target)?,
                Mode::Kata => self.direct.get(&p.target)?.is_some(),
            };
            if live {
                published.insert(p.volume.clone());
                continue;
            }
            tracing::info!(target = %p.target.display(), "dropping publication whose target is gone");
            let txn = self.pool().store().write()?;
            txn.open_table(PUBLICATIONS)?.remove(p.target.to_string_lossy().as_ref())?;
            txn.commit()?;
            // A publish cut short may have made the target directory or file.
            if !is_mountpoint(&p.target)? {
                remove_target(&p.target)?;
            }
        }
        // What nothing publishes is detached; an inline volume whose
        // publication is gone is gone too.
        for vol in self.volumes()? {
            if published.contains(&vol.id) {
                continue;
            }
            if vol.ephemeral {
                tracing::info!(volume = %vol.id, "removing inline volume without a publication");
                images.remove(&self.image(&vol.id));
                self.forget(&vol)?;
                continue;
            }
            self.detach(&vol)?;
        }
        for dir in [&self.files, &self.snapshots_dir] {
            for entry in fs::read_dir(dir).map_err(Error::io("list", dir))? {
                let path = entry.map_err(Error::io("list", dir))?.path();
                if path.is_file() && !images.contains(&path) {
                    tracing::info!(file = %path.display(), "removing image without a volume or snapshot");
                    image::detach(&path)?;
                    fs::remove_file(&path).map_err(Error::io("remove", &path))?;
                }
            }
        }
        if self.dirs_in_use() {
            for dir in self.dirs()?.list()? {
                if !dirs.contains(&dir) {
                    tracing::info!(dir = %dir, "removing directory without a volume");
                    let path = self.dirs()?.path(&dir);
                    fs::remove_dir_all(&path).map_err(Error::io("remove", &path))?;
                }
            }
        }
        tracing::info!("volumes recovered");
        Ok(())
    }

    /// On exit with `release`: unmount the `dir` volumes' filesystem. The
    /// engine's own shutdown is its owner's.
    pub fn release(&self, release: bool) -> Result<()> {
        let _l = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if release && let Some(d) = self.dirs.get() {
            d.release()?;
        }
        Ok(())
    }

    /// On exit, for a daemon that serves volumes alone: [`Driver::release`],
    /// then the engine's shutdown (with `release`: detach what nothing
    /// publishes, unmount the embedded pool).
    pub fn shutdown(&self, release: bool) -> Result<()> {
        self.release(release)?;
        Ok(self.engine.shutdown(release)?)
    }
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

/// Size for a capacity range: the required bytes (or the default, capped by the
/// limit) rounded up to whole MiB, at least the minimum for a filesystem.
pub fn pick_size(required: u64, limit: u64, default: Bytes) -> Result<Bytes> {
    if limit != 0 && required > limit {
        return Err(Error::OutOfRange(format!("required_bytes {required} exceeds limit_bytes {limit}")));
    }
    let want = if required == 0 { if limit == 0 { default.get() } else { default.get().min(limit) } } else { required };
    let size = want.max(MIN_VOLUME_SIZE.get()).div_ceil(ALIGN) * ALIGN;
    if limit != 0 && size > limit {
        return Err(Error::OutOfRange(format!("limit_bytes {limit} is below the smallest volume {MIN_VOLUME_SIZE}")));
    }
    Ok(Bytes(size))
}

/// Splits CSI mount flags into the kernel's generic flags and the options
/// the filesystem parses itself.
fn mount_options(flags: &[String]) -> (MountFlags, Vec<String>) {
    let mut out = MountFlags::empty();
    let mut data = Vec::new();
    for f in flags {
        match f.as_str() {
            "ro" => out |= MountFlags::RDONLY,
            "rw" | "defaults" | "relatime" => {}
            "noatime" => out |= MountFlags::NOATIME,
            "nodiratime" => out |= MountFlags::NODIRATIME,
            "strictatime" => out |= MountFlags::STRICTATIME,
            "lazytime" => out |= MountFlags::LAZYTIME,
            "nosuid" => out |= MountFlags::NOSUID,
            "nodev" => out |= MountFlags::NODEV,
            "noexec" => out |= MountFlags::NOEXEC,
            "sync" => out |= MountFlags::SYNCHRONOUS,
            "dirsync" => out |= MountFlags::DIRSYNC,
            other => data.push(other.to_owned()),
        }
    }
    (out, data)
}

fn remove_file_if_any(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", p)(e)),
    }
}

fn mkdir(p: &Path) -> Result<()> {
    match fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => Ok(()),
        Err(e) => Err(Error::io("create", p)(e)),
    }
}

fn remove_target(p: &Path) -> Result<()> {
    let removed = match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir(p),
        Ok(_) => fs::remove_file(p),
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", p)(e)),
    }
}

/// Whether `p` is a mount point (a device or bind mount on it).
fn is_mountpoint(p: &Path) -> Result<bool> {
    Ok(embedded::is_mountpoint(p)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tonic::Code;

    #[test]
    fn sizes_follow_the_capacity_range() {
        let d = Bytes(1 << 30);
        assert_eq!(pick_size(0, 0, d).unwrap(), d);
        assert_eq!(pick_size(0, 512 << 20, d).unwrap(), Bytes(512 << 20));
        assert_eq!(pick_size((2 << 30) + 1, 0, d).unwrap(), Bytes((2 << 30) + (1 << 20)));
        assert_eq!(pick_size(1, 0, d).unwrap(), MIN_VOLUME_SIZE);
        assert_eq!(pick_size(2, 1, d).unwrap_err().code(), Code::OutOfRange);
        assert_eq!(pick_size(0, 1 << 20, d).unwrap_err().code(), Code::OutOfRange);
    }

    #[test]
    fn mount_flags_split_into_kernel_flags_and_fs_options() {
        let flags: Vec<String> = ["noatime", "ro", "discard", "data=ordered"].map(String::from).to_vec();
        let (f, data) = mount_options(&flags);
        assert_eq!(f, MountFlags::NOATIME | MountFlags::RDONLY);
        assert_eq!(data, vec!["discard", "data=ordered"]);
    }
}
