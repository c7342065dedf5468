//! The dm-thin backend: every device is a thin device in a kernel thin pool.
//!
//! The pool is the embedded default here: sparse metadata and data files under
//! `<root>/thin/` on loop devices (autoclear: they go when the pool is torn
//! down), wrapped in dm-linear devices and a `thin-pool` target. A device's thin
//! id is its [`DeviceId`] (ids are never reused; the pool's ids are 24-bit). A
//! snapshot is the pool message `create_snap` of an *inactive* origin, so no
//! running device is ever suspended. Devices are named `<prefix>-<id>`, where
//! the prefix is unique per state root, and addressed as `/dev/dm-N`
//! (devtmpfs), which needs no udev.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use devicemapper::{
    DM, DataBlocks, DevId, Device, DmDevice, DmFlags, DmName, DmNameBuf, DmOptions, LinearDev, LinearDevTargetParams,
    LinearTargetParams, Sectors, TargetLine, ThinDev, ThinDevId, ThinPoolDev, ThinPoolStatus, message,
};

use crate::backend::{Backend, Inventory, Orphan, PoolStatus, Usage};
use crate::error::{Error, Result};
use crate::fault;
use crate::fs as filesystem;
use crate::loops::{self, AttachOpts};
use crate::pool::PoolConfig;
use crate::store::{Access, DeviceRecord, FsType};
use crate::units::{Bytes, DeviceId};

/// Data block size of the embedded pool: 64 KiB, as containerd's devmapper.
const BLOCK_SECTORS: u64 = 128;
/// Largest thin id the kernel accepts.
const MAX_THIN_ID: u64 = (1 << 24) - 1;

fn dm_err(op: &'static str, what: impl std::fmt::Display) -> impl FnOnce(devicemapper::DmError) -> Error {
    let what = what.to_string();
    move |e| Error::Dm { op, what, detail: e.to_string() }
}

/// Devices as thin devices of a kernel thin pool.
pub struct DmThin {
    dm: DM,
    root: PathBuf,
    prefix: String,
    pool: Mutex<ThinPoolDev>,
    grow_step: Bytes,
    max_size: Option<Bytes>,
    /// Free space the filesystem under the data file keeps after growing.
    host_reserve: Bytes,
    /// Name and node of each active thin device.
    active: Mutex<HashMap<DeviceId, PathBuf>>,
}

impl std::fmt::Debug for DmThin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmThin").field("root", &self.root).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl DmThin {
    /// Whether this kernel has device-mapper (the `auto` backend choice).
    pub fn available() -> bool {
        Path::new("/dev/mapper/control").exists()
    }

    /// Creates or re-opens the embedded thin pool under `root` and adopts the
    /// thin devices already active.
    pub fn open(root: &Path, cfg: &PoolConfig) -> Result<DmThin> {
        let dm = DM::new().map_err(dm_err("open", "/dev/mapper/control"))?;
        let prefix = prefix(root);
        let dir = root.join("thin");
        fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        let meta_size = Bytes((cfg.embedded_size.get() / 1000).clamp(64 << 20, 16 << 30)).align_up(1 << 20);
        let meta = linear(&dm, &dir.join("meta.img"), meta_size, &format!("{prefix}-meta"))?;
        let data = linear(&dm, &dir.join("data.img"), cfg.embedded_size, &format!("{prefix}-data"))?;
        let pool_name = name(&format!("{prefix}-pool"))?;
        let data_blocks = data.size().0 / BLOCK_SECTORS;
        let pool = ThinPoolDev::setup(
            &dm,
            &pool_name,
            None,
            meta,
            data,
            Sectors(BLOCK_SECTORS),
            DataBlocks(data_blocks / 10),
            vec!["error_if_no_space".into()],
        )
        .map_err(dm_err("set up thin pool", &*pool_name))?;
        let active: HashMap<_, _> = active_devices(&dm, &prefix)?.into_iter().collect();
        tracing::info!(pool = %&*pool_name, devices = active.len(), "thin pool ready");
        Ok(DmThin {
            dm,
            root: root.to_owned(),
            prefix,
            pool: Mutex::new(pool),
            grow_step: cfg.grow_step,
            max_size: cfg.max_size,
            host_reserve: cfg.reserve,
            active: Mutex::new(active),
        })
    }

    fn dev_name(&self, id: DeviceId) -> Result<DmNameBuf> {
        name(&format!("{}-{}", self.prefix, id.0))
    }

    fn pool(&self) -> MutexGuard<'_, ThinPoolDev> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn map(&self) -> MutexGuard<'_, HashMap<DeviceId, PathBuf>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, msg: &str) -> Result<()> {
        let pool = self.pool();
        message(&self.dm, &*pool, msg).map_err(dm_err("message", msg))
    }

    fn try_create(&self, rec: &DeviceRecord) -> Result<Option<PathBuf>> {
        let id = thin_id(rec.id)?;
        match rec.origin {
            Some(origin) => self.send(&format!("create_snap {id} {}", thin_id(origin)?))?,
            None => self.send(&format!("create_thin {id}"))?,
        }
        fault::point("create.after_image");
        // mkfs and growing need the device attached; a view is made read-write,
        // then detached and attached read-only.
        let node = self.activate(rec, Access::ReadWrite)?;
        let grow = rec.origin_size.is_some_and(|o| o < rec.size);
        match (rec.origin, rec.fs) {
            (None, fs) => filesystem::mkfs(fs, &node)?,
            (Some(_), FsType::Ext4) if grow => filesystem::grow_ext4(&node)?,
            (Some(_), FsType::Xfs) if grow => filesystem::grow_xfs(&node, &self.root.join("tmp").join(rec.id.0.to_string()))?,
            _ => {}
        }
        if rec.access != Some(Access::ReadWrite) {
            self.deactivate(rec.id)?;
        }
        let node = match rec.access {
            Some(Access::ReadOnly) => self.activate(rec, Access::ReadOnly)?,
            Some(Access::ReadWrite) => node,
            None => return Ok(None),
        };
        fault::point("create.after_attach");
        Ok(Some(node))
    }

    /// Removes a dm device. One still open (mounted, held by a VMM) is left to
    /// the kernel's deferred removal: it goes when its last user closes it.
    fn remove_dm(&self, name: &DmName) -> Result<()> {
        let id = DevId::Name(name);
        if !devicemapper::device_exists(&self.dm, name).map_err(dm_err("look up", name))? {
            return Ok(());
        }
        let open = self.dm.device_info(&id).map_err(dm_err("inspect", name))?.open_count();
        let options = if open > 0 {
            tracing::info!(device = %name, open, "dm device in use; deferring its removal");
            DmOptions::default().set_flags(DmFlags::DM_DEFERRED_REMOVE)
        } else {
            DmOptions::default()
        };
        // device_remove itself retries a transient EBUSY.
        self.dm.device_remove(&id, options).map(|_| ()).map_err(dm_err("remove", name))
    }

    fn thin_ls(&self) -> Result<HashMap<u64, u64>> {
        let (pool_name, meta) = {
            let pool = self.pool();
            (pool.name().to_owned(), pool.meta_dev().devnode())
        };
        thin_ls(&self.dm, &pool_name, &meta)
    }
}

/// Per thin id, the bytes mapped by that device alone, from `thin_ls` on a
/// metadata snapshot of the live pool (which keeps running).
fn thin_ls(dm: &DM, pool: &DmName, meta: &Path) -> Result<HashMap<u64, u64>> {
    let msg = |m: &str| dm.target_msg(&DevId::Name(pool), None, m).map(|_| ()).map_err(dm_err("message", m));
    msg("reserve_metadata_snap")?;
    let out = Command::new("thin_ls").args(["--metadata-snap", "--no-headers", "-o", "DEV,EXCLUSIVE_BYTES"]).arg(meta).output();
    let released = msg("release_metadata_snap");
    let out = out.map_err(Error::io("run thin_ls on", meta))?;
    released?;
    if !out.status.success() {
        return Err(Error::Tool {
            tool: "thin_ls",
            path: meta.to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect())
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
pub(crate) fn inventory(root: &Path) -> Result<Inventory> {
    let dm = DM::new().map_err(dm_err("open", "/dev/mapper/control"))?;
    let prefix = prefix(root);
    let pool_name = name(&format!("{prefix}-pool"))?;
    let live = devicemapper::device_exists(&dm, &pool_name).map_err(dm_err("look up", &*pool_name))?;
    // Thin ids are read from the live pool only: the tools cannot read the
    // metadata file of a torn-down pool on every filesystem (O_DIRECT).
    let stored = if live {
        let meta = name(&format!("{prefix}-meta"))?;
        let minor = dm.device_info(&DevId::Name(&meta)).map_err(dm_err("inspect", &*meta))?.device().minor;
        Some(thin_ls(&dm, &pool_name, &PathBuf::from(format!("/dev/dm-{minor}")))?.into_keys().map(DeviceId).collect())
    } else {
        None
    };
    Ok(Inventory { backend: "dm-thin", stored, attached: active_devices(&dm, &prefix)? })
}

impl Backend for DmThin {
    fn name(&self) -> &'static str {
        "dm-thin"
    }

    fn create(&self, rec: &DeviceRecord) -> Result<Option<PathBuf>> {
        let result = self.try_create(rec);
        if result.is_err()
            && let Err(e) = self.remove(rec.id)
        {
            tracing::warn!(device = %rec.id, error = %e, "cleanup after failed create");
        }
        result
    }

    fn activate(&self, rec: &DeviceRecord, access: Access) -> Result<PathBuf> {
        if let Some(node) = self.node(rec.id) {
            return Ok(node);
        }
        let name = self.dev_name(rec.id)?;
        let dev = {
            let pool = self.pool();
            ThinDev::setup(&self.dm, &name, None, Sectors(rec.size.get() / 512), &pool, ThinDevId::new_u64(thin_id(rec.id)?).map_err(dm_err("thin id", rec.id))?)
                .map_err(dm_err("activate", &*name))?
        };
        let node = dev.devnode();
        if access == Access::ReadOnly {
            crate::fs::run("blockdev", &["--setro".as_ref(), node.as_os_str()], &node)?;
        }
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

    fn remove(&self, id: DeviceId) -> Result<()> {
        self.deactivate(id)?;
        // Deleting an id the pool does not hold fails; that is the goal state.
        if let Err(e) = self.send(&format!("delete {}", thin_id(id)?)) {
            tracing::debug!(device = %id, error = %e, "thin id already gone");
        }
        Ok(())
    }

    fn usage(&self, rec: &DeviceRecord) -> Result<Usage> {
        let bytes = self.thin_ls()?.get(&thin_id(rec.id)?).copied().unwrap_or(0);
        Ok(Usage { bytes: Bytes(bytes), inodes: 0 })
    }

    fn status(&self) -> Result<PoolStatus> {
        let pool = self.pool();
        let status = pool.status(&self.dm, DmOptions::default()).map_err(dm_err("status", pool.name()))?;
        let ThinPoolStatus::Working(w) = status else {
            return Err(Error::Dm { op: "status", what: pool.name().to_string(), detail: "thin pool failed".into() });
        };
        let block = BLOCK_SECTORS * 512;
        Ok(PoolStatus {
            backend: "dm-thin",
            location: pool.name().to_string(),
            total: Bytes(w.usage.total_data.0 * block),
            free: Bytes((w.usage.total_data.0 - w.usage.used_data.0) * block),
            reserve: Bytes(0),
        })
    }

    /// Grows the data file by `grow_step` (up to `max_size`, and only while the
    /// filesystem under it keeps its reserve), then the loop, the dm-linear data
    /// device and the pool's table, without stopping the pool's users.
    fn grow(&self) -> Result<Option<Bytes>> {
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
        let st = rustix::fs::statvfs(&dir).map_err(|e| Error::io("statvfs", &dir)(e.into()))?;
        let host_free = st.f_bavail * st.f_frsize;
        if host_free < target - current + self.host_reserve.get() {
            tracing::warn!(free = %Bytes(host_free), "no room to grow the thin pool's data file");
            return Ok(None);
        }
        let Some(node) = loops::scan(&dir)?.into_iter().find(|l| l.backing == data && !l.deleted).map(|l| l.node) else {
            return Ok(None);
        };
        let mut pool = self.pool();
        OpenOptions::new().write(true).open(&data).and_then(|f| f.set_len(target)).map_err(Error::io("grow", &data))?;
        loops::refresh_capacity(&node)?;
        pool.set_data_table(&self.dm, whole_device(&node)?).map_err(dm_err("load grown table", pool.name()))?;
        pool.resume(&self.dm).map_err(dm_err("resume", pool.name()))?;
        Ok(Some(Bytes(target)))
    }

    fn remove_unknown(&self, known: &HashSet<DeviceId>) -> Result<Vec<Orphan>> {
        let mut out = Vec::new();
        let strays: Vec<DeviceId> = self.map().keys().filter(|id| !known.contains(id)).copied().collect();
        for id in strays {
            self.deactivate(id)?;
            out.push(Orphan::DmDevice((*self.dev_name(id)?).to_string()));
        }
        for thin in self.thin_ls()?.into_keys() {
            if !known.contains(&DeviceId(thin)) {
                self.send(&format!("delete {thin}"))?;
                out.push(Orphan::ThinId(thin));
            }
        }
        Ok(out)
    }

    fn shutdown(&self, release: bool) -> Result<()> {
        if !release {
            return Ok(());
        }
        let ids: Vec<DeviceId> = self.map().keys().copied().collect();
        for id in ids {
            self.deactivate(id)?;
        }
        let mut pool = self.pool();
        pool.teardown(&self.dm).map_err(dm_err("tear down", pool.name()))
    }
}

/// A dm-linear device over a loop device over a sparse file of `size`.
fn linear(dm: &DM, file: &Path, size: Bytes, dm_name: &str) -> Result<LinearDev> {
    let dm_name = name(dm_name)?;
    let existing = loops::scan(file.parent().unwrap_or(file))?.into_iter().find(|l| l.backing == file && !l.deleted);
    let node = match existing {
        Some(l) => l.node,
        None => {
            if !file.exists() {
                let f = OpenOptions::new().create_new(true).write(true).mode(0o600).open(file).map_err(Error::io("create", file))?;
                f.set_len(size.get()).map_err(Error::io("size", file))?;
            }
            // Autoclear: the loop goes when the dm device over it does. The
            // handle is held until the dm table holds the device.
            let attached = loops::attach(file, AttachOpts { read_only: false, direct_io: false, autoclear: true, block_size: 0 })?;
            let node = attached.node.clone();
            let dev = setup_linear(dm, &dm_name, &node)?;
            drop(attached);
            return Ok(dev);
        }
    };
    setup_linear(dm, &dm_name, &node)
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
