//! The dm-thin backend: every device is a thin device in a kernel thin pool.
//!
//! The pool comes from one of three sources (`[pool.thin]`): the embedded
//! default, sparse metadata and data files under `<root>/thin/` on loop devices
//! (autoclear: they go when the pool is torn down) wrapped in dm-linear devices
//! and a `thin-pool` target; a pool Thinbox creates the same way on two given
//! block devices; or an existing pool, by name, that Thinbox only uses. A
//! device's thin id is its [`DeviceId`] (ids are never reused; the pool's ids
//! are 24-bit). A snapshot is the pool message `create_snap` of an *inactive*
//! origin, so no running device is ever suspended. Devices are named
//! `<prefix>-<id>`, where the prefix is unique per state root, and addressed as
//! `/dev/dm-N` (devtmpfs), which needs no udev.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use devicemapper::{
    DM, DataBlocks, DevId, Device, DmDevice, DmFlags, DmName, DmNameBuf, DmOptions, LinearDev, LinearDevTargetParams, LinearTargetParams, Sectors,
    TargetLine, TargetTable, ThinDevId, ThinDevTargetTable, ThinPoolDev, ThinPoolStatus, ThinPoolStatusSummary, ThinPoolTargetParams,
    ThinTargetParams,
};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use crate::backend::{Backend, Inventory, Orphan, PoolStatus, Space, Sweep, Usage};
use crate::config::{PoolConfig, ThinConfig};
use crate::error::{Error, Result};
use crate::fault;
use crate::fs as filesystem;
use crate::loops::{self, AttachOpts};
use crate::store::DeviceRecord;
use crate::sys;
use crate::types::{Access, FsType};
use crate::units::{Bytes, DeviceId};

/// Data block size of pools Thinbox creates: 64 KiB, as containerd's devmapper.
const BLOCK_SECTORS: u64 = 128;
/// Largest thin id the kernel accepts.
const MAX_THIN_ID: u64 = (1 << 24) - 1;
/// Thin pool metadata blocks are 4 KiB.
const META_BLOCK: u64 = 4096;

fn dm_err(op: &'static str, what: impl std::fmt::Display) -> impl FnOnce(devicemapper::DmError) -> Error {
    let what = what.to_string();
    move |e| {
        let errno = match &e {
            devicemapper::DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, errno)) => Some(Errno::from_raw_os_error(**errno as i32)),
            _ => None,
        };
        Error::Dm { op, what, detail: e.to_string(), errno }
    }
}

/// Devices as thin devices of a kernel thin pool.
pub struct DmThin {
    dm: DM,
    root: PathBuf,
    prefix: String,
    pool_name: DmNameBuf,
    /// The pool's device number, for thin tables.
    pool_dev: Device,
    /// Data block size of the pool.
    block: Bytes,
    /// The pool's low-water mark (growth keeps it: only the data table changes).
    low_water: DataBlocks,
    /// The pool, when Thinbox set it up (not an existing one): it is grown and
    /// torn down. The lock also serialises pool messages and table reloads.
    owned: Mutex<Option<ThinPoolDev>>,
    /// The data lives in `<root>/thin/data.img`, which can grow.
    file_backed: bool,
    grow_step: Bytes,
    max_size: Option<Bytes>,
    /// Free space the filesystem under the data file keeps after growing.
    host_reserve: Bytes,
    discard: bool,
    /// Name and node of each active thin device.
    active: Mutex<HashMap<DeviceId, PathBuf>>,
    /// Held while an inactive device is activated just to read its superblock.
    probe: Mutex<()>,
    /// A control handle of its own for event polling (armed per handle).
    events: DM,
}

impl std::fmt::Debug for DmThin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmThin").field("root", &self.root).field("pool", &self.pool_name).finish_non_exhaustive()
    }
}

impl DmThin {
    /// Whether this kernel has device-mapper (the `auto` backend choice):
    /// its control node opens and answers the version ioctl. The node alone
    /// says nothing: `dmsetup` makes it on a kernel without device-mapper too.
    pub fn available() -> bool {
        DM::new().and_then(|dm| dm.version()).is_ok()
    }

    /// Where the pool configured by `cfg` lives, as remembered per root.
    pub fn source(cfg: &ThinConfig) -> String {
        match (&cfg.pool_name, &cfg.metadata_device, &cfg.data_device) {
            (Some(name), ..) => format!("pool {name}"),
            (None, Some(m), Some(d)) => format!("devices {} {}", m.display(), d.display()),
            _ => "embedded files".into(),
        }
    }

    /// Sets up or re-opens the configured thin pool and adopts the thin devices
    /// of this root already active. On the `first` start on a root, a pool not
    /// embedded must hold no thin devices yet: Thinbox would delete them.
    pub fn open(root: &Path, cfg: &PoolConfig, first: bool) -> Result<DmThin> {
        let dm = DM::new().map_err(Error::NoDeviceMapper)?;
        let prefix = prefix(root);
        let dir = root.join("thin");
        fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        let thin = &cfg.thin;
        let (pool_name, owned) = match (&thin.pool_name, &thin.metadata_device, &thin.data_device) {
            (Some(existing), ..) => (name(existing)?, None),
            (None, Some(m), Some(d)) => {
                let meta = linear_on_device(&dm, m, &format!("{prefix}-meta"))?;
                let data = linear_on_device(&dm, d, &format!("{prefix}-data"))?;
                let pool_name = name(&format!("{prefix}-pool"))?;
                (pool_name.clone(), Some(setup_pool(&dm, &pool_name, meta, data)?))
            }
            _ => {
                let meta_size = Bytes((cfg.embedded_size.get() / 1000).clamp(64 << 20, 16 << 30)).align_up(1 << 20);
                let meta = linear_on_file(&dm, &dir.join("meta.img"), meta_size, &format!("{prefix}-meta"))?;
                let data = linear_on_file(&dm, &dir.join("data.img"), cfg.embedded_size, &format!("{prefix}-data"))?;
                let pool_name = name(&format!("{prefix}-pool"))?;
                (pool_name.clone(), Some(setup_pool(&dm, &pool_name, meta, data)?))
            }
        };
        let params = pool_table(&dm, &pool_name)?;
        let pool_dev = dm.device_info(&DevId::Name(&pool_name)).map_err(dm_err("inspect", &*pool_name))?.device();
        let active: HashMap<_, _> = active_devices(&dm, &prefix)?.into_iter().collect();
        let dm_thin = DmThin {
            dm,
            root: root.to_owned(),
            prefix,
            pool_name,
            pool_dev,
            block: Bytes(params.data_block_size.0 * 512),
            low_water: params.low_water_mark,
            file_backed: !thin.external(),
            owned: Mutex::new(owned),
            grow_step: cfg.grow_step,
            max_size: cfg.max_size,
            host_reserve: cfg.reserve,
            discard: thin.discard_on_delete.unwrap_or(!thin.external()),
            active: Mutex::new(active),
            probe: Mutex::new(()),
            events: DM::new().map_err(dm_err("open", "/dev/mapper/control"))?,
        };
        if first && thin.external() {
            let held = dm_thin.thin_ls()?.len();
            if held > 0 {
                let _ = dm_thin.shutdown(true);
                return Err(Error::PoolSource {
                    pool: dm_thin.pool_name.to_string(),
                    detail: format!("it already holds {held} thin devices; Thinbox needs a pool of its own"),
                });
            }
        }
        tracing::info!(pool = %&*dm_thin.pool_name, source = DmThin::source(thin), devices = dm_thin.map().len(), "thin pool ready");
        Ok(dm_thin)
    }

    fn dev_name(&self, id: DeviceId) -> Result<DmNameBuf> {
        name(&format!("{}-{}", self.prefix, id.0))
    }

    fn owned(&self) -> MutexGuard<'_, Option<ThinPoolDev>> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn map(&self) -> MutexGuard<'_, HashMap<DeviceId, PathBuf>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, msg: &str) -> Result<()> {
        let _serial = self.owned();
        pool_message(&self.dm, &self.pool_name, msg)
    }

    /// Runs `f` (thin snapshots of `origins`) with every origin in use
    /// suspended, then resumes them, also after a failure. An origin in use
    /// (a CSI volume snapshotted while published) must be: suspending flushes
    /// its I/O and freezes a filesystem mounted on it, as the kernel requires,
    /// and no write reaches any of them until the last snapshot is made.
    fn with_suspended(&self, origins: &[DeviceId], f: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut suspended = Vec::new();
        let made = (|| {
            for &origin in origins.iter().filter(|&&o| self.node(o).is_some()) {
                let name = self.dev_name(origin)?;
                self.dm
                    .device_suspend(&DevId::Name(&name), DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
                    .map_err(dm_err("suspend", &*name))?;
                suspended.push(name);
            }
            f()
        })();
        let mut resumed = Ok(());
        for name in suspended.iter().rev() {
            if let Err(e) = self.dm.device_suspend(&DevId::Name(name), DmOptions::default()).map_err(dm_err("resume", &**name)) {
                tracing::error!(device = %&**name, error = %e, "resume after a snapshot");
                resumed = resumed.and(Err(e));
            }
        }
        made.and(resumed)
    }

    fn try_create(&self, rec: &DeviceRecord) -> Result<Option<PathBuf>> {
        let id = thin_id(rec.id)?;
        match rec.origin {
            Some(origin) => self.with_suspended(&[origin], || self.send(&format!("create_snap {id} {}", thin_id(origin)?)))?,
            None => self.send(&format!("create_thin {id}"))?,
        }
        fault::point("create.after_image");
        // mkfs and growing need the device attached read-write; a view that
        // needs either is then detached and attached read-only. A clone that
        // needs neither, or has no filesystem, is attached once, as asked.
        let grow = rec.origin_size.is_some_and(|o| o < rec.size);
        if rec.fs.is_some() && (rec.origin.is_none() || grow) {
            let node = self.activate(rec, Access::ReadWrite)?;
            match (rec.origin, rec.fs) {
                (_, None) => {}
                (None, Some(fs)) => filesystem::mkfs(fs, &node)?,
                (Some(_), Some(FsType::Ext4)) => filesystem::grow_ext4(&node)?,
                (Some(_), Some(FsType::Xfs)) => filesystem::grow_xfs(&node, &self.root.join("tmp").join(rec.id.0.to_string()))?,
            }
            if rec.access != Some(Access::ReadWrite) {
                self.deactivate(rec.id)?;
            }
        }
        let node = match rec.access {
            Some(access) => self.activate(rec, access)?,
            None => return Ok(None),
        };
        fault::point("create.after_attach");
        Ok(Some(node))
    }

    /// Activates a thin device of `size` with the pool's thin id `id`; a
    /// read-only one gets a read-only table, which makes the disk read-only.
    fn setup_thin(&self, id: DeviceId, size: Bytes, access: Access) -> Result<PathBuf> {
        let name = self.dev_name(id)?;
        let thin = ThinDevId::new_u64(thin_id(id)?).map_err(dm_err("thin id", id))?;
        let info = if devicemapper::device_exists(&self.dm, &name).map_err(dm_err("look up", &*name))? {
            self.dm.device_info(&DevId::Name(&name)).map_err(dm_err("inspect", &*name))?
        } else {
            let table = ThinDevTargetTable::new(Sectors(0), Sectors(size.get() / 512), ThinTargetParams::new(self.pool_dev, thin, None));
            let dev = DevId::Name(&name);
            self.dm.device_create(&name, None, DmOptions::default()).map_err(dm_err("create", &*name))?;
            let load = match access {
                Access::ReadOnly => DmOptions::default().set_flags(DmFlags::DM_READONLY),
                Access::ReadWrite => DmOptions::default(),
            };
            let loaded = self.dm.table_load(&dev, &table.to_raw_table(), load).and_then(|_| self.dm.device_suspend(&dev, DmOptions::default()));
            match loaded {
                Ok(info) => info,
                Err(e) => {
                    let _ = self.dm.device_remove(&dev, DmOptions::default());
                    return Err(match dm_err("activate", &*name)(e) {
                        // The thin target answers ENODATA for an id the pool
                        // does not hold (thin_ctr), as after a crash between
                        // the pool's delete and the record's.
                        Error::Dm { errno: Some(Errno::NODATA), .. } => Error::DeviceNotFound(id),
                        e => e,
                    });
                }
            }
        };
        Ok(PathBuf::from(format!("/dev/dm-{}", info.device().minor)))
    }

    /// How many holders the dm device `name` has (mounts, open files);
    /// `None` if it does not exist.
    fn open_count(&self, name: &DmName) -> Result<Option<i32>> {
        if !devicemapper::device_exists(&self.dm, name).map_err(dm_err("look up", name))? {
            return Ok(None);
        }
        Ok(Some(self.dm.device_info(&DevId::Name(name)).map_err(dm_err("inspect", name))?.open_count()))
    }

    /// Removes a dm device. One still open (mounted, held by a VMM) is left to
    /// the kernel's deferred removal: it goes when its last user closes it.
    fn remove_dm(&self, name: &DmName) -> Result<()> {
        let Some(open) = self.open_count(name)? else { return Ok(()) };
        let id = DevId::Name(name);
        let options = if open > 0 {
            tracing::info!(device = %name, open, "dm device in use; deferring its removal");
            DmOptions::default().set_flags(DmFlags::DM_DEFERRED_REMOVE)
        } else {
            DmOptions::default()
        };
        // device_remove itself retries a transient EBUSY.
        self.dm.device_remove(&id, options).map(|_| ()).map_err(dm_err("remove", name))
    }

    /// Gives a device's blocks back to the pool (and through it to the data
    /// device) before deletion. Best effort: a device still open elsewhere
    /// (O_EXCL fails) or already gone is left alone, and so is one active
    /// read-only (a view): it wrote nothing, its blocks are its origin's.
    fn discard_blocks(&self, id: DeviceId, size: Bytes) {
        let temporary = self.node(id).is_none();
        if !temporary && self.read_only(id) {
            return;
        }
        let result = self.setup_thin(id, size, Access::ReadWrite).and_then(|node| {
            let dev = OpenOptions::new().write(true).custom_flags(O_EXCL).open(&node).map_err(Error::io("open", &node))?;
            sys::discard(&dev, 0, size.get()).map_err(Error::io("discard", &node))
        });
        match result {
            Ok(()) => {}
            Err(Error::DeviceNotFound(_)) => tracing::debug!(device = %id, "thin id already gone; nothing to discard"),
            Err(e) => tracing::warn!(device = %id, error = %thinbox_daemon::chain(&e), "discard before delete skipped"),
        }
        if temporary && let Err(e) = self.deactivate(id) {
            tracing::warn!(device = %id, error = %thinbox_daemon::chain(&e), "deactivate after discard");
        }
    }

    /// Deletes `id`'s thin id from the pool. An id the pool does not hold
    /// (ENODATA: an earlier delete got this far) is the goal state. Any other
    /// failure is returned, so the record keeps the id for a retry: EBUSY
    /// above all, while the device is still open (a VMM holding it, its dm
    /// device left to deferred removal), which would otherwise leak the id
    /// and its blocks.
    fn delete_thin(&self, id: DeviceId) -> Result<()> {
        match self.send(&format!("delete {}", thin_id(id)?)) {
            Err(Error::Dm { errno: Some(Errno::NODATA), .. }) => {
                tracing::debug!(device = %id, "thin id already gone");
                Ok(())
            }
            Err(Error::Dm { errno: Some(Errno::BUSY), .. }) => Err(Error::DeviceBusy(id)),
            result => result,
        }
    }

    /// Whether the active device `id` has a read-only table.
    fn read_only(&self, id: DeviceId) -> bool {
        let info = self.dev_name(id).and_then(|name| self.dm.device_info(&DevId::Name(&name)).map_err(dm_err("inspect", &*name)));
        info.is_ok_and(|i| i.flags().contains(DmFlags::DM_READONLY))
    }

    /// Inodes in use on the device, from its superblock; an inactive device is
    /// activated for the read and removed again.
    fn inodes_used(&self, id: DeviceId, size: Bytes, fs: Option<FsType>) -> Result<u64> {
        let Some(fs) = fs else { return Ok(0) };
        if let Some(node) = self.node(id) {
            return Ok(filesystem::inodes_used(fs, &node)?.unwrap_or(0));
        }
        let _one_at_a_time = self.probe.lock().unwrap_or_else(|p| p.into_inner());
        let node = self.setup_thin(id, size, Access::ReadOnly)?;
        let used = filesystem::inodes_used(fs, &node);
        let removed = self.remove_dm(&self.dev_name(id)?);
        let used = used?;
        removed?;
        Ok(used.unwrap_or(0))
    }

    fn thin_ls(&self) -> Result<HashMap<u64, u64>> {
        let _serial = self.owned();
        thin_ls(&self.dm, &self.pool_name)
    }
}

/// `O_EXCL` on a block device: the open fails with EBUSY while it is mounted.
const O_EXCL: i32 = rustix::fs::OFlags::EXCL.bits() as i32;

/// Sends a message to the pool's target.
fn pool_message(dm: &DM, pool: &DmName, msg: &str) -> Result<()> {
    dm.target_msg(&DevId::Name(pool), None, msg).map(|_| ()).map_err(dm_err("message", msg))
}

/// The live table of the thin pool `pool`; fails unless it is a thin pool.
fn pool_table(dm: &DM, pool: &DmName) -> Result<ThinPoolTargetParams> {
    let source = |detail: String| Error::PoolSource { pool: pool.to_string(), detail };
    if !devicemapper::device_exists(dm, pool).map_err(dm_err("look up", pool))? {
        return Err(source("no such dm device".into()));
    }
    let (_, lines) = dm.table_status(&DevId::Name(pool), DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE)).map_err(dm_err("table", pool))?;
    match lines.as_slice() {
        [(_, _, kind, params)] if kind == "thin-pool" => format!("{kind} {params}").parse().map_err(dm_err("parse table", pool)),
        _ => Err(source("not a thin-pool device".into())),
    }
}

/// Per thin id, the bytes it maps, from `thin_ls` on a metadata snapshot of
/// the live pool (which keeps running).
fn thin_ls(dm: &DM, pool: &DmName) -> Result<HashMap<u64, u64>> {
    let out = with_metadata_snap(dm, pool, "thin_ls", &["--no-headers", "-o", "DEV,MAPPED_BYTES"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect())
}

/// Runs a thin-provisioning tool with `--metadata-snap` on the pool's metadata
/// device, holding a metadata snapshot meanwhile, and returns its output.
fn with_metadata_snap(dm: &DM, pool: &DmName, tool: &'static str, args: &[&str]) -> Result<String> {
    let meta = node_of(pool_table(dm, pool)?.metadata_dev)?;
    pool_message(dm, pool, "reserve_metadata_snap")?;
    let out = Command::new(tool).arg("--metadata-snap").args(args).arg(&meta).output();
    let released = pool_message(dm, pool, "release_metadata_snap");
    let out = out.map_err(Error::io("run thin tool on", &meta))?;
    released?;
    if !out.status.success() {
        return Err(Error::Tool { tool, path: meta, status: out.status.to_string(), stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Blocks that `thin_delta` (from the origin to the device) reports as
/// written by the device: `different` and `right_only` ranges.
fn delta_blocks(xml: &str) -> u64 {
    xml.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("<different ") || l.starts_with("<right_only "))
        .filter_map(|l| l.split("length=\"").nth(1)?.split('"').next()?.parse::<u64>().ok())
        .sum()
}

/// The `/dev` node of a block device number, from sysfs (no udev needed).
fn node_of(dev: Device) -> Result<PathBuf> {
    let uevent = PathBuf::from(format!("/sys/dev/block/{}:{}/uevent", dev.major, dev.minor));
    let text = fs::read_to_string(&uevent).map_err(Error::io("read", &uevent))?;
    text.lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(|n| Path::new("/dev").join(n))
        .ok_or_else(|| Error::io("parse", &uevent)(std::io::ErrorKind::InvalidData.into()))
}

/// The dm names of the pool under `root` start with this.
fn prefix(root: &Path) -> String {
    format!("thinbox-{:08x}", fnv(root.as_os_str().as_encoded_bytes()))
}

/// Active thin devices of the pool with `prefix`, by id.
fn active_devices(dm: &DM, prefix: &str) -> Result<BTreeMap<DeviceId, PathBuf>> {
    let mut out = BTreeMap::new();
    for (n, dev, _) in dm.list_devices().map_err(dm_err("list devices", "dm"))? {
        if let Some(id) = n.to_string().strip_prefix(&format!("{prefix}-")).and_then(|s| s.parse().ok()) {
            out.insert(DeviceId(id), PathBuf::from(format!("/dev/dm-{}", dev.minor)));
        }
    }
    Ok(out)
}

/// What the kernel holds for the pool under `root`, read without the store.
pub(crate) fn inventory(root: &Path, cfg: &ThinConfig) -> Result<Inventory> {
    let dm = DM::new().map_err(dm_err("open", "/dev/mapper/control"))?;
    let prefix = prefix(root);
    let pool_name = name(&cfg.pool_name.clone().unwrap_or_else(|| format!("{prefix}-pool")))?;
    let live = devicemapper::device_exists(&dm, &pool_name).map_err(dm_err("look up", &*pool_name))?;
    // Thin ids are read from the live pool only: the tools cannot read the
    // metadata file of a torn-down pool on every filesystem (O_DIRECT).
    let stored = if live { Some(thin_ls(&dm, &pool_name)?.into_keys().map(DeviceId).collect()) } else { None };
    Ok(Inventory { backend: "dm-thin", stored, attached: active_devices(&dm, &prefix)? })
}

impl Backend for DmThin {
    fn name(&self) -> &'static str {
        "dm-thin"
    }

    fn snapshot_suspends_origin(&self) -> bool {
        true
    }

    fn create(&self, rec: &DeviceRecord) -> Result<Option<PathBuf>> {
        let result = self.try_create(rec);
        if result.is_err()
            && let Err(e) = self.remove(rec.id, None)
        {
            tracing::warn!(device = %rec.id, error = %e, "cleanup after failed create");
        }
        result
    }

    fn create_group(&self, recs: &[DeviceRecord]) -> Result<()> {
        // Every origin in use is suspended before the first snapshot and
        // resumed after the last: the snapshots are one instant of them all.
        let origins: Vec<DeviceId> = recs.iter().filter_map(|r| r.origin).collect();
        let made = self.with_suspended(&origins, || {
            for rec in recs {
                let origin = rec.origin.ok_or(Error::NotAGroupSnapshot(rec.id))?;
                self.send(&format!("create_snap {} {}", thin_id(rec.id)?, thin_id(origin)?))?;
            }
            Ok(())
        });
        if made.is_err() {
            for rec in recs {
                if let Err(e) = self.remove(rec.id, None) {
                    tracing::warn!(device = %rec.id, error = %e, "cleanup after failed group create");
                }
            }
        }
        made
    }

    fn activate(&self, rec: &DeviceRecord, access: Access) -> Result<PathBuf> {
        if let Some(node) = self.node(rec.id) {
            return Ok(node);
        }
        let node = self.setup_thin(rec.id, rec.size, access)?;
        self.map().insert(rec.id, node.clone());
        Ok(node)
    }

    fn deactivate(&self, id: DeviceId) -> Result<()> {
        self.map().remove(&id);
        self.remove_dm(&self.dev_name(id)?)
    }

    fn node(&self, id: DeviceId) -> Option<PathBuf> {
        self.map().get(&id).cloned()
    }

    /// A thin device's size is only its table's length: an active one gets a
    /// longer table (resume swaps it in live); an inactive one the new size at
    /// its next activation.
    fn resize(&self, rec: &DeviceRecord, size: Bytes) -> Result<()> {
        if self.node(rec.id).is_none() {
            return Ok(());
        }
        let name = self.dev_name(rec.id)?;
        let thin = ThinDevId::new_u64(thin_id(rec.id)?).map_err(dm_err("thin id", rec.id))?;
        let table = ThinDevTargetTable::new(Sectors(0), Sectors(size.get() / 512), ThinTargetParams::new(self.pool_dev, thin, None));
        let id = DevId::Name(&name);
        self.dm.table_load(&id, &table.to_raw_table(), DmOptions::default()).map_err(dm_err("load grown table", &*name))?;
        self.dm.device_suspend(&id, DmOptions::default()).map(|_| ()).map_err(dm_err("resume", &*name))
    }

    fn held(&self, id: DeviceId) -> Result<bool> {
        Ok(self.open_count(&self.dev_name(id)?)?.is_some_and(|n| n > 0))
    }

    fn remove(&self, id: DeviceId, size: Option<Bytes>) -> Result<()> {
        // Say so before touching it, so its blocks are discarded once it is let go.
        if self.held(id)? {
            return Err(Error::DeviceBusy(id));
        }
        if self.discard
            && let Some(size) = size
        {
            self.discard_blocks(id, size);
        }
        self.deactivate(id)?;
        self.delete_thin(id)
    }

    /// Bytes the device maps that its origin does not (all it maps if it has
    /// none), compared block by block with `thin_delta`; inode delta from the
    /// superblocks.
    fn usage(&self, rec: &DeviceRecord) -> Result<Usage> {
        let held = self.thin_ls()?;
        let id = thin_id(rec.id)?;
        let bytes = match rec.origin {
            Some(o) if held.contains_key(&o.0) => {
                let (snap1, snap2) = (o.0.to_string(), id.to_string());
                let _serial = self.owned();
                let xml = with_metadata_snap(&self.dm, &self.pool_name, "thin_delta", &["--snap1", &snap1, "--snap2", &snap2])?;
                delta_blocks(&xml) * self.block.get()
            }
            _ => held.get(&id).copied().unwrap_or(0),
        };
        let inodes = self.inodes_used(rec.id, rec.size, rec.fs)?;
        let origin_inodes = match (rec.origin, rec.origin_size) {
            (Some(o), Some(size)) if held.contains_key(&o.0) => self.inodes_used(o, size, rec.fs)?,
            _ => 0,
        };
        Ok(Usage { bytes: Bytes(bytes), inodes: inodes.saturating_sub(origin_inodes) })
    }

    fn status(&self) -> Result<PoolStatus> {
        let name = &*self.pool_name;
        let (_, lines) = self.dm.table_status(&DevId::Name(name), DmOptions::default()).map_err(dm_err("status", name))?;
        let status: ThinPoolStatus = match lines.as_slice() {
            [(_, _, _, line)] => line.parse().map_err(dm_err("parse status", name))?,
            _ => return Err(Error::Dm { op: "status", what: name.to_string(), detail: format!("{} status lines", lines.len()), errno: None }),
        };
        let ThinPoolStatus::Working(w) = status else {
            return Err(Error::Dm { op: "status", what: name.to_string(), detail: "thin pool failed".into(), errno: None });
        };
        let block = self.block.get();
        let mode = match (w.needs_check, &w.summary) {
            (true, _) => "needs_check",
            (false, ThinPoolStatusSummary::Good) => "rw",
            (false, ThinPoolStatusSummary::ReadOnly) => "ro",
            (false, ThinPoolStatusSummary::OutOfSpace) => "out_of_data_space",
        };
        Ok(PoolStatus {
            backend: "dm-thin",
            location: name.to_string(),
            total: Bytes(w.usage.total_data.0 * block),
            free: Bytes((w.usage.total_data.0 - w.usage.used_data.0) * block),
            reserve: Bytes(0),
            devices: 0,
            deleting: 0,
            unattached: 0,
            metadata: Some(Space { total: Bytes(w.usage.total_meta.0 * META_BLOCK), used: Bytes(w.usage.used_meta.0 * META_BLOCK) }),
            low_water: Some(Bytes(self.low_water.0 * block)),
            mode: Some(mode.into()),
        })
    }

    fn sparse_on_root(&self) -> bool {
        self.file_backed
    }

    /// Grows the data file by `grow_step` (up to `max_size`, and only while the
    /// filesystem under it keeps its reserve), then the loop, the dm-linear data
    /// device and the pool's table, without stopping the pool's users.
    fn grow(&self) -> Result<Option<Bytes>> {
        if !self.file_backed {
            return Ok(None);
        }
        let data = self.root.join("thin/data.img");
        let current = fs::metadata(&data).map_err(Error::io("stat", &data))?.len();
        let mut target = current.saturating_add(self.grow_step.get());
        if let Some(max) = self.max_size {
            target = target.min(max.get());
        }
        if target <= current {
            return Ok(None);
        }
        let dir = self.root.join("thin");
        let host_free = crate::fs::space(&dir)?.free.get();
        if host_free < target - current + self.host_reserve.get() {
            tracing::warn!(free = %Bytes(host_free), "no room to grow the thin pool's data file");
            return Ok(None);
        }
        let Some(node) = loops::scan(&dir)?.into_iter().find(|l| l.backing == data && !l.deleted).map(|l| l.node) else {
            return Ok(None);
        };
        let mut owned = self.owned();
        let Some(pool) = owned.as_mut() else { return Ok(None) };
        OpenOptions::new().write(true).open(&data).and_then(|f| f.set_len(target)).map_err(Error::io("grow", &data))?;
        loops::refresh_capacity(&node)?;
        pool.set_data_table(&self.dm, whole_device(&node)?).map_err(dm_err("load grown table", &*self.pool_name))?;
        pool.resume(&self.dm).map_err(dm_err("resume", &*self.pool_name))?;
        Ok(Some(Bytes(target)))
    }

    fn arm_events(&self) -> Result<()> {
        self.events.arm_poll().map(|_| ()).map_err(dm_err("arm event poll", "/dev/mapper/control"))
    }

    fn wait_event(&self, timeout: Duration) -> Result<bool> {
        let mut fds = [PollFd::new(self.events.file(), PollFlags::IN)];
        let timeout = Timespec { tv_sec: timeout.as_secs().try_into().unwrap_or(i64::MAX), tv_nsec: timeout.subsec_nanos().into() };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(n) => Ok(n > 0),
            Err(Errno::INTR) => Ok(false),
            Err(e) => Err(Error::io("poll", Path::new("/dev/mapper/control"))(e.into())),
        }
    }

    fn remove_unknown(&self, known: &HashSet<DeviceId>, apply: bool) -> Result<Sweep> {
        let mut sweep = Sweep::default();
        let strays: Vec<DeviceId> = self.map().keys().filter(|id| !known.contains(id)).copied().collect();
        for id in strays {
            let name = (*self.dev_name(id)?).to_string();
            sweep.book(Orphan::DmDevice(name), apply.then(|| self.deactivate(id)));
        }
        for thin in self.thin_ls()?.into_keys().filter(|t| !known.contains(&DeviceId(*t))) {
            let id = DeviceId(thin);
            // A check finds what gc would: a device still open keeps its id.
            let removal = if apply { Some(self.delete_thin(id)) } else { self.held(id)?.then_some(Err(Error::DeviceBusy(id))) };
            if let Some(Err(e @ Error::DeviceBusy(_))) = &removal {
                // Still held open (its dm device's removal deferred): a
                // later pass deletes it; this one carries on.
                if apply {
                    tracing::warn!(error = %e, "orphan thin id kept for now");
                }
                sweep.held.push(Orphan::ThinId(thin));
                continue;
            }
            sweep.book(Orphan::ThinId(thin), removal);
        }
        Ok(sweep)
    }

    fn stored(&self) -> Result<BTreeSet<DeviceId>> {
        Ok(self.thin_ls()?.into_keys().map(DeviceId).collect())
    }

    fn shutdown(&self, release: bool) -> Result<()> {
        if !release {
            return Ok(());
        }
        let ids: Vec<DeviceId> = self.map().keys().copied().collect();
        for id in ids {
            self.deactivate(id)?;
        }
        // An existing pool is not ours to tear down.
        match self.owned().as_mut() {
            Some(pool) => pool.teardown(&self.dm).map_err(dm_err("tear down", &*self.pool_name)),
            None => Ok(()),
        }
    }
}

/// Sets up (or adopts) the thin pool `name` on `meta` and `data`: 64 KiB
/// blocks, low-water event at 10% free, errors instead of queueing when full.
fn setup_pool(dm: &DM, name: &DmName, meta: LinearDev, data: LinearDev) -> Result<ThinPoolDev> {
    let data_blocks = data.size().0 / BLOCK_SECTORS;
    ThinPoolDev::setup(dm, name, None, meta, data, Sectors(BLOCK_SECTORS), DataBlocks(data_blocks / 10), vec!["error_if_no_space".into()])
        .map_err(dm_err("set up thin pool", name))
}

/// A dm-linear device over all of the block device `dev` (given by the operator).
fn linear_on_device(dm: &DM, dev: &Path, dm_name: &str) -> Result<LinearDev> {
    let node = dev.canonicalize().map_err(Error::io("resolve", dev))?;
    if !fs::metadata(&node).map_err(Error::io("stat", &node))?.file_type().is_block_device() {
        return Err(Error::PoolSource { pool: dm_name.into(), detail: format!("{} is not a block device", dev.display()) });
    }
    setup_linear(dm, &name(dm_name)?, &node)
}

/// A dm-linear device over a loop device over a sparse file of `size`.
fn linear_on_file(dm: &DM, file: &Path, size: Bytes, dm_name: &str) -> Result<LinearDev> {
    let dm_name = name(dm_name)?;
    let existing = loops::scan(file.parent().unwrap_or(file))?.into_iter().find(|l| l.backing == file && !l.deleted);
    if let Some(l) = existing {
        return setup_linear(dm, &dm_name, &l.node);
    }
    if !file.exists() {
        let f = OpenOptions::new().create_new(true).write(true).mode(0o600).open(file).map_err(Error::io("create", file))?;
        f.set_len(size.get()).map_err(Error::io("size", file))?;
    }
    // Autoclear: the loop goes when the dm device over it does. The handle is
    // held until the dm table holds the device.
    let attached = loops::attach(file, AttachOpts { read_only: false, direct_io: false, autoclear: true, block_size: 0 })?;
    setup_linear(dm, &dm_name, &attached.node)
}

fn setup_linear(dm: &DM, dm_name: &DmName, node: &Path) -> Result<LinearDev> {
    LinearDev::setup(dm, dm_name, None, whole_device(node)?).map_err(dm_err("set up linear", dm_name))
}

/// A dm-linear table mapping all of the block device `node`.
fn whole_device(node: &Path) -> Result<Vec<TargetLine<LinearDevTargetParams>>> {
    let rdev = fs::metadata(node).map_err(Error::io("stat", node))?.rdev();
    let params = LinearDevTargetParams::Linear(LinearTargetParams::new(Device::from(rdev), Sectors(0)));
    Ok(vec![TargetLine::new(Sectors(0), Sectors(loops::sectors(node)?), params)])
}

fn name(s: &str) -> Result<DmNameBuf> {
    DmNameBuf::new(s.to_owned()).map_err(dm_err("name", s))
}

fn thin_id(id: DeviceId) -> Result<u64> {
    if id.0 > MAX_THIN_ID {
        return Err(Error::Config(format!("device id {} exceeds the thin pool's 24-bit ids", id.0)));
    }
    Ok(id.0)
}

/// FNV-1a: a stable short hash for the per-root name prefix.
fn fnv(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_counts_blocks_the_device_wrote() {
        let xml = r#"<superblock uuid="" time="1" transaction="0" data_block_size="128" nr_data_blocks="0">
  <diff left="1" right="2">
    <same begin="0" length="64"/>
    <different begin="64" length="32"/>
    <left_only begin="100" length="7"/>
    <right_only begin="320" length="48"/>
  </diff>
</superblock>"#;
        assert_eq!(delta_blocks(xml), 80);
        assert_eq!(delta_blocks(""), 0);
    }

    #[test]
    fn names_are_per_root() {
        assert_ne!(prefix(Path::new("/a")), prefix(Path::new("/b")));
        assert!(prefix(Path::new("/var/lib/thinbox")).starts_with("thinbox-"));
    }
}
