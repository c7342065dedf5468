//! A pool of copy-on-write block devices on a reflink-capable filesystem.
//!
//! Each device is a sparse image file `<pool>/devices/<id>.img`; a snapshot is a
//! `FICLONE` of its origin's image; an active device is that file on a loop
//! device with direct I/O. Every change is two-phased: the caller writes the
//! intent into a [`Devices`] table inside its own transaction, then asks the pool
//! to make the kernel match (`build`, `activate`, `deactivate`, `destroy`).
//! [`Pool::reconcile`] converges whatever a crash left half-done.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fault;
use crate::fs as filesystem;
use crate::loops::{self, AttachOpts};
use crate::store::{Access, DeviceRecord, DeviceState, Devices, FsType, Store};
use crate::sys::{self, FIEMAP_EXTENT_SHARED};
use crate::units::{Bytes, DeviceId};
use crate::embedded;

/// Pool configuration (the `[pool]` table of the daemons' config files).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Directory on a reflink-capable filesystem (XFS `reflink=1` or btrfs). When
    /// absent, an embedded XFS image under the state root is created and used.
    pub dir: Option<PathBuf>,
    /// Size of the embedded pool image (sparse).
    pub embedded_size: Bytes,
    /// Free space kept back: creating a device fails with "pool full" below it, so
    /// devices that already exist keep room to write.
    pub reserve: Bytes,
    /// Loop devices use direct I/O to their image (no double page cache).
    pub direct_io: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { dir: None, embedded_size: Bytes(64 << 30), reserve: Bytes(512 << 20), direct_io: true }
    }
}

impl PoolConfig {
    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<()> {
        if let Some(dir) = &self.dir
            && !dir.is_absolute()
        {
            return Err(Error::Config(format!("pool.dir {} must be an absolute path", dir.display())));
        }
        if self.embedded_size < Bytes(512 << 20) {
            return Err(Error::Config(format!("pool.embedded_size {} is below the minimum 512MiB", self.embedded_size)));
        }
        if self.reserve >= self.embedded_size && self.dir.is_none() {
            return Err(Error::Config(format!("pool.reserve {} leaves no room in a {} pool", self.reserve, self.embedded_size)));
        }
        Ok(())
    }
}

/// What to create: see [`Pool::plan_create`].
#[derive(Clone, Copy, Debug)]
pub struct CreateSpec {
    /// Virtual size; at least the origin's.
    pub size: Bytes,
    /// Snapshot this device's origin (copy-on-write); `None` for an empty device.
    pub origin: Option<DeviceId>,
    /// Filesystem for an empty device (a snapshot inherits its origin's).
    pub fs: FsType,
    /// Attach after creation.
    pub access: Option<Access>,
}

/// Space a device holds on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of the image not shared with any other image (its origin or siblings).
    pub bytes: Bytes,
    /// Inodes in use beyond the origin's, from the superblocks.
    pub inodes: u64,
}

/// Pool-wide figures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PoolStatus {
    /// Directory holding the images.
    pub dir: PathBuf,
    /// Size of the backing filesystem.
    pub total: Bytes,
    /// Free space of the backing filesystem.
    pub free: Bytes,
    /// Space kept in reserve.
    pub reserve: Bytes,
}

/// What start-up reconciliation did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Devices rolled back or deleted (half-created, half-deleted, unreferenced).
    pub devices_removed: Vec<DeviceId>,
    /// Active devices whose loop device was attached again.
    pub reattached: Vec<DeviceId>,
    /// Inactive devices whose leftover loop device was detached.
    pub detached: Vec<DeviceId>,
    /// Image files with no record, removed.
    pub orphan_files: Vec<PathBuf>,
    /// Loop devices onto images with no record, detached.
    pub orphan_loops: Vec<PathBuf>,
}

/// A pool of devices and its metadata store.
#[derive(Debug)]
pub struct Pool {
    store: Store,
    root: PathBuf,
    devices_dir: PathBuf,
    cfg: PoolConfig,
    embedded: Option<PathBuf>,
    /// Loop node of each attached device.
    attached: Mutex<HashMap<DeviceId, PathBuf>>,
    /// Held for the pool's lifetime: two daemons on one pool directory would
    /// take each other's images for orphans.
    lock: Mutex<Option<File>>,
}

impl Pool {
    /// Opens the pool whose state lives under `root`: opens the metadata store,
    /// mounts the embedded pool image if one is used, checks that the pool
    /// directory can reflink, and learns which loop devices are already ours.
    /// Call [`Pool::reconcile`] next.
    pub fn open(root: &Path, cfg: PoolConfig) -> Result<Pool> {
        cfg.validate()?;
        fs::DirBuilder::new().recursive(true).mode(0o700).create(root).map_err(Error::io("create", root))?;
        let root = root.canonicalize().map_err(Error::io("resolve", root))?;
        let store = Store::open(&root.join("meta.redb"))?;
        let (pool_dir, embedded) = match &cfg.dir {
            Some(dir) => (dir.canonicalize().map_err(Error::io("resolve pool directory", dir))?, None),
            None => {
                let mp = embedded::ensure(&root, cfg.embedded_size, cfg.direct_io)?;
                (mp.clone(), Some(mp))
            }
        };
        let opened = Self::open_devices(store, root, pool_dir, cfg, embedded.clone());
        if opened.is_err()
            && let Some(mp) = &embedded
        {
            // Do not leave a pool mounted by a daemon that failed to start.
            let _ = embedded::release(mp);
        }
        opened
    }

    fn open_devices(store: Store, root: PathBuf, pool_dir: PathBuf, cfg: PoolConfig, embedded: Option<PathBuf>) -> Result<Pool> {
        let devices_dir = pool_dir.join("devices");
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&devices_dir).map_err(Error::io("create", &devices_dir))?;
        let lock = lock_pool(&devices_dir)?;
        probe_reflink(&devices_dir)?;
        clear_scratch(&root.join("tmp"))?;
        let mut attached = HashMap::new();
        let mut strays = Vec::new();
        for l in loops::scan(&devices_dir)? {
            match image_id(&l.backing).filter(|_| !l.deleted) {
                Some(id) if !attached.contains_key(&id) => {
                    attached.insert(id, l.node);
                }
                _ => strays.push(l.node),
            }
        }
        // Loops onto deleted images or duplicates are leftovers of interrupted work.
        for node in strays {
            loops::detach(&node)?;
        }
        Ok(Pool { store, root, devices_dir, cfg, embedded, attached: Mutex::new(attached), lock: Mutex::new(Some(lock)) })
    }

    /// The metadata store (shared with the front end's own tables).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Path of a device's image file.
    pub fn image(&self, id: DeviceId) -> PathBuf {
        self.devices_dir.join(format!("{}.img", id.0))
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

    /// Phase two of creation: makes the image (clone or mkfs), grows its
    /// filesystem if the device is larger than its origin, and attaches it if the
    /// record asks. On error, what was made is undone; the record stays
    /// `Creating` for the caller to discard.
    pub fn build(&self, rec: &DeviceRecord) -> Result<Option<PathBuf>> {
        let result = self.try_build(rec);
        if result.is_err() {
            // Best effort: the record is still `Creating`, so reconciliation retries.
            if let Err(e) = self.remove_kernel_state(rec.id) {
                tracing::warn!(device = %rec.id, error = %e, "cleanup after failed create");
            }
        }
        result
    }

    fn try_build(&self, rec: &DeviceRecord) -> Result<Option<PathBuf>> {
        let img = self.image(rec.id);
        // Images are container filesystems: readable by root only.
        let file = OpenOptions::new().create_new(true).write(true).mode(0o600).open(&img).map_err(Error::io("create", &img))?;
        match rec.origin {
            Some(origin) => {
                let src_path = self.image(origin);
                let src = File::open(&src_path).map_err(Error::io("open", &src_path))?;
                rustix::fs::ioctl_ficlone(&file, &src).map_err(|e| Error::io("reflink", &img)(e.into()))?;
                file.set_len(rec.size.get()).map_err(Error::io("size", &img))?;
            }
            None => {
                file.set_len(rec.size.get()).map_err(Error::io("size", &img))?;
                drop(file);
                filesystem::mkfs(rec.fs, &img)?;
            }
        }
        fault::point("create.after_image");
        let grow = rec.origin_size.is_some_and(|o| o < rec.size);
        if grow && rec.fs == FsType::Ext4 {
            filesystem::grow_ext4(&img)?;
        }
        let Some(access) = rec.access else { return Ok(None) };
        let node = self.activate(rec.id, access)?;
        if grow && rec.fs == FsType::Xfs {
            filesystem::grow_xfs(&node, &self.root.join("tmp").join(rec.id.0.to_string()))?;
        }
        fault::point("create.after_attach");
        Ok(Some(node))
    }

    /// Attaches a device's image to a loop device (no-op if already attached) and
    /// returns the node.
    ///
    /// Callers never activate the same device concurrently: the snapshot record
    /// serialises its operations, and reconciliation runs alone.
    pub fn activate(&self, id: DeviceId, access: Access) -> Result<PathBuf> {
        if let Some(node) = self.node(id) {
            return Ok(node);
        }
        let img = self.image(id);
        let opts = AttachOpts { read_only: access == Access::ReadOnly, direct_io: self.cfg.direct_io, autoclear: false, block_size: 4096 };
        // Not under the map's lock: attaching takes a while and others must not wait.
        let node = loops::attach(&img, opts)?.node;
        self.lock().insert(id, node.clone());
        Ok(node)
    }

    /// Detaches a device's loop (lazily, if something still holds it open) and
    /// flushes its image to stable storage.
    pub fn deactivate(&self, id: DeviceId) -> Result<()> {
        let node = self.lock().remove(&id);
        if let Some(node) = node {
            loops::detach(&node)?;
        }
        let img = self.image(id);
        File::open(&img).and_then(|f| f.sync_all()).map_err(Error::io("sync", &img))
    }

    /// The loop node of an attached device.
    pub fn node(&self, id: DeviceId) -> Option<PathBuf> {
        self.lock().get(&id).cloned()
    }

    /// Phase two of deletion (the caller has marked the record `Deleting` or
    /// dropped its reference): detaches, unlinks, then removes the record.
    pub fn destroy(&self, id: DeviceId) -> Result<()> {
        self.remove_kernel_state(id)?;
        fault::point("destroy.after_unlink");
        let txn = self.store.write()?;
        Devices::open(&txn)?.delete(id)?;
        txn.commit()?;
        Ok(())
    }

    /// Marks a device `Deleting` inside the caller's transaction.
    pub fn plan_delete(&self, devs: &mut Devices<'_>, id: DeviceId) -> Result<()> {
        let mut rec = devs.require(id)?;
        rec.state = DeviceState::Deleting;
        rec.access = None;
        devs.put(&rec)
    }

    fn remove_kernel_state(&self, id: DeviceId) -> Result<()> {
        if let Some(node) = self.lock().remove(&id) {
            loops::detach(&node)?;
        }
        let img = self.image(id);
        match fs::remove_file(&img) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io("remove", &img)(e)),
            _ => Ok(()),
        }
    }

    /// Bytes and inodes the device holds beyond its origin: its allocated extents
    /// less those it still shares, block for block, with the origin's image.
    pub fn usage(&self, rec: &DeviceRecord) -> Result<Usage> {
        let img = self.image(rec.id);
        let mine = extents(&img)?;
        let total: u64 = mine.iter().map(|e| e.length).sum();
        let origin = rec.origin.map(|o| self.image(o)).filter(|p| p.exists());
        let shared = match &origin {
            // Only extents the filesystem flags as shared can overlap the origin's.
            Some(o) if mine.iter().any(|e| e.flags & FIEMAP_EXTENT_SHARED != 0) => {
                let theirs: Vec<(u64, u64)> = extents(o)?.iter().map(|e| (e.physical, e.physical + e.length)).collect();
                overlap(&mine.iter().filter(|e| e.flags & FIEMAP_EXTENT_SHARED != 0).map(|e| (e.physical, e.physical + e.length)).collect::<Vec<_>>(), theirs)
            }
            _ => 0,
        };
        let inodes = filesystem::inodes_used(rec.fs, &img)?.unwrap_or(0);
        let origin_inodes = match &origin {
            Some(o) => filesystem::inodes_used(rec.fs, o)?.unwrap_or(0),
            None => 0,
        };
        Ok(Usage { bytes: Bytes(total - shared.min(total)), inodes: inodes.saturating_sub(origin_inodes) })
    }

    /// Size and free space of the pool's filesystem.
    pub fn status(&self) -> Result<PoolStatus> {
        let st = rustix::fs::statvfs(&self.devices_dir).map_err(|e| Error::io("statvfs", &self.devices_dir)(e.into()))?;
        Ok(PoolStatus {
            dir: self.devices_dir.clone(),
            total: Bytes(st.f_blocks * st.f_frsize),
            free: Bytes(st.f_bavail * st.f_frsize),
            reserve: self.cfg.reserve,
        })
    }

    fn check_space(&self) -> Result<()> {
        let st = self.status()?;
        if st.free < st.reserve {
            return Err(Error::PoolFull { path: st.dir, free: st.free, reserve: st.reserve });
        }
        Ok(())
    }

    /// Converges the kernel with the store: a device lives only if its record is
    /// `Ready` and `referenced` holds its id; everything else (half-created,
    /// half-deleted, unreferenced devices, image files and loops without a
    /// record) is removed; active devices get their loop back (after a reboot),
    /// inactive ones lose a leftover loop.
    pub fn reconcile(&self, referenced: &HashSet<DeviceId>) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let mut known = HashSet::new();
        for rec in self.store.devices()? {
            if rec.state != DeviceState::Ready || !referenced.contains(&rec.id) {
                tracing::info!(device = %rec.id, state = rec.state.as_str(), "removing leftover device");
                self.destroy(rec.id)?;
                report.devices_removed.push(rec.id);
                continue;
            }
            known.insert(rec.id);
            match (rec.access, self.node(rec.id)) {
                (Some(access), None) => {
                    self.activate(rec.id, access)?;
                    report.reattached.push(rec.id);
                }
                (None, Some(_)) => {
                    self.deactivate(rec.id)?;
                    report.detached.push(rec.id);
                }
                _ => {}
            }
        }
        let strays: Vec<_> = self.lock().iter().filter(|(id, _)| !known.contains(id)).map(|(id, n)| (*id, n.clone())).collect();
        for (id, node) in strays {
            self.lock().remove(&id);
            loops::detach(&node)?;
            report.orphan_loops.push(node);
        }
        for entry in fs::read_dir(&self.devices_dir).map_err(Error::io("list", &self.devices_dir))? {
            let path = entry.map_err(Error::io("list", &self.devices_dir))?.path();
            if image_id(&path).is_some_and(|id| known.contains(&id)) || path.file_name() == Some(".lock".as_ref()) {
                continue;
            }
            fs::remove_file(&path).map_err(Error::io("remove", &path))?;
            report.orphan_files.push(path);
        }
        Ok(report)
    }

    /// Called on daemon exit. With `release`, every loop is detached (lazily: one
    /// still in use stays until its user lets go) and the embedded pool is
    /// unmounted if nothing uses it; without, everything stays attached so running
    /// containers keep their devices.
    pub fn shutdown(&self, release: bool) -> Result<()> {
        if !release {
            return Ok(());
        }
        let nodes: Vec<_> = self.lock().drain().map(|(_, n)| n).collect();
        for node in nodes {
            loops::detach(&node)?;
        }
        // An open lock file would keep the pool's filesystem busy.
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
        match &self.embedded {
            Some(mp) => embedded::release(mp),
            None => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, PathBuf>> {
        // A panic while holding the map cannot leave it inconsistent (single inserts/removes).
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every mapped extent of the file at `path`.
fn extents(path: &Path) -> Result<Vec<sys::Extent>> {
    let file = File::open(path).map_err(Error::io("open", path))?;
    let mut out = Vec::new();
    sys::for_each_extent(&file, |e| out.push(e)).map_err(Error::io("map extents of", path))?;
    Ok(out)
}

/// Total length of the intersection of two sets of half-open ranges.
fn overlap(a: &[(u64, u64)], mut b: Vec<(u64, u64)>) -> u64 {
    b.sort_unstable();
    // Merge so the ranges of `b` are disjoint and sorted.
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(b.len());
    for (s, e) in b {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    a.iter()
        .map(|&(s, e)| {
            let first = merged.partition_point(|&(_, me)| me <= s);
            merged[first..].iter().take_while(|&&(ms, _)| ms < e).map(|&(ms, me)| me.min(e) - ms.max(s)).sum::<u64>()
        })
        .sum()
}

/// The device id an image path names (`<id>.img`).
fn image_id(path: &Path) -> Option<DeviceId> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".img")?.parse().ok().map(DeviceId)
}

/// Unmounts and removes scratch mount points a crash left (growing xfs mounts a
/// device there for a moment); a leftover mount would pin its loop device.
fn clear_scratch(dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(()) };
    for entry in entries {
        let path = entry.map_err(Error::io("list", dir))?.path();
        if embedded::is_mountpoint(&path)? {
            tracing::info!(path = %path.display(), "unmounting leftover scratch mount");
            rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH).map_err(|e| Error::io("unmount", &path)(e.into()))?;
        }
        fs::remove_dir(&path).map_err(Error::io("remove", &path))?;
    }
    Ok(())
}

/// Takes the pool directory's lock, or fails if another daemon holds it.
fn lock_pool(dir: &Path) -> Result<File> {
    let path = dir.join(".lock");
    let file = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path).map_err(Error::io("open", &path))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::PoolInUse(dir.to_owned())),
        Err(e) => Err(Error::io("lock", &path)(e.into())),
    }
}

/// Fails unless files in `dir` can be reflinked.
fn probe_reflink(dir: &Path) -> Result<()> {
    let a = dir.join(".reflink-probe-a");
    let b = dir.join(".reflink-probe-b");
    let result = (|| {
        let src = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&a)?;
        let dst = OpenOptions::new().write(true).create(true).truncate(true).open(&b)?;
        rustix::fs::ioctl_ficlone(&dst, &src).map_err(io::Error::from)
    })();
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    result.map_err(|source| Error::NoReflink { path: dir.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_of_ranges() {
        assert_eq!(overlap(&[(0, 10)], vec![(5, 20)]), 5);
        assert_eq!(overlap(&[(0, 10), (20, 30)], vec![(25, 26), (0, 2), (1, 3)]), 4);
        assert_eq!(overlap(&[(0, 10)], vec![]), 0);
        assert_eq!(overlap(&[(10, 20)], vec![(0, 10), (20, 30)]), 0);
    }

    #[test]
    fn image_names() {
        assert_eq!(image_id(Path::new("/p/devices/42.img")), Some(DeviceId(42)));
        assert_eq!(image_id(Path::new("/p/devices/42.img.tmp")), None);
        assert_eq!(image_id(Path::new("/p/devices/x.img")), None);
    }
}
