//! The reflink backend: each device is a sparse image file
//! `<pool>/devices/<id>.img` on XFS (`reflink=1`) or btrfs; a snapshot is a
//! `FICLONE` of its origin's image; an attached device is that file on a loop
//! device with direct I/O. Without a configured directory the pool is the
//! embedded XFS image under the state root.
//!
//! A device without an origin is a clone too: of `<pool>/templates/<fs>-v1-<size>.img`,
//! an empty filesystem made once per filesystem type and size (mkfs and
//! debugfs are two processes and tens of milliseconds, a clone one ioctl).
//! Templates are never attached or written after they are made; a crash while
//! making one leaves only a `.tmp-*` file, removed when the pool opens.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::backend::{Backend, Inventory, Orphan, PoolStatus, Sweep, Usage};
use crate::config::PoolConfig;
use crate::embedded::{self, Trimmer};
use crate::error::{Error, Result};
use crate::fault;
use crate::fs as filesystem;
use crate::image;
use crate::loops::{self, AttachOpts};
use crate::store::DeviceRecord;
use crate::sys::{self, FIEMAP_EXTENT_SHARED};
use crate::types::{Access, FsType};
use crate::units::{Bytes, DeviceId};

/// Devices as reflinked image files on loop devices.
#[derive(Debug)]
pub struct Reflink {
    root: PathBuf,
    devices_dir: PathBuf,
    templates_dir: PathBuf,
    direct_io: bool,
    /// The embedded image, if the pool is in it: its trimmer gives the
    /// image's freed blocks back to the root's filesystem.
    embedded: Option<Trimmer>,
    /// Loop node of each attached device.
    attached: Mutex<HashMap<DeviceId, PathBuf>>,
    /// Held while the pool is open: two daemons on one pool directory would
    /// take each other's images for orphans.
    lock: Mutex<Option<File>>,
}

impl Reflink {
    /// Opens the pool directory (mounting the embedded image if no directory is
    /// configured), checks it can reflink, and adopts the loops already attached
    /// to its images.
    pub fn open(root: &Path, cfg: &PoolConfig) -> Result<Reflink> {
        let (pool_dir, embedded) = match &cfg.dir {
            Some(dir) => (dir.canonicalize().map_err(Error::io("resolve pool directory", dir))?, None),
            None => {
                let mp = embedded::ensure(root, cfg.embedded_size, cfg.embedded_direct_io)?;
                (mp.clone(), Some(mp))
            }
        };
        let opened = Self::open_dir(root, &pool_dir, cfg, embedded.clone());
        if opened.is_err()
            && let Some(mp) = &embedded
        {
            // Do not leave a pool mounted by a daemon that failed to start.
            let _ = embedded::release(mp);
        }
        opened
    }

    fn open_dir(root: &Path, pool_dir: &Path, cfg: &PoolConfig, embedded: Option<PathBuf>) -> Result<Reflink> {
        let devices_dir = pool_dir.join("devices");
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&devices_dir).map_err(Error::io("create", &devices_dir))?;
        let lock = lock_pool(&devices_dir)?;
        probe_reflink(&devices_dir)?;
        clear_scratch(&root.join("tmp"))?;
        let templates_dir = pool_dir.join("templates");
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&templates_dir).map_err(Error::io("create", &templates_dir))?;
        clear_templates(&templates_dir)?;
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
        Ok(Reflink {
            root: root.to_owned(),
            devices_dir,
            templates_dir,
            direct_io: cfg.direct_io,
            embedded: embedded.as_deref().map(Trimmer::new),
            attached: Mutex::new(attached),
            lock: Mutex::new(Some(lock)),
        })
    }

    /// Path of a device's image file.
    pub fn image(&self, id: DeviceId) -> PathBuf {
        self.devices_dir.join(format!("{}.img", id.0))
    }

    fn try_create(&self, rec: &DeviceRecord) -> Result<Option<PathBuf>> {
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
            None => match rec.fs {
                Some(fs) => {
                    let template = self.template(fs, rec)?;
                    let src = File::open(&template).map_err(Error::io("open", &template))?;
                    rustix::fs::ioctl_ficlone(&file, &src).map_err(|e| Error::io("reflink", &img)(e.into()))?;
                }
                // Sparse: reads as zeros, and holds no block until written.
                None => file.set_len(rec.size.get()).map_err(Error::io("size", &img))?,
            },
        }
        // Durable before the engine records the device ready (in a store on
        // another filesystem): until something forces the pool filesystem's
        // log, the new file and its clone live only in memory, and a power
        // cut would leave a ready record without its image.
        file.sync_all().map_err(Error::io("sync", &img))?;
        fault::point("create.after_image");
        let grow = rec.origin_size.is_some_and(|o| o < rec.size);
        if grow && rec.fs == Some(FsType::Ext4) {
            filesystem::grow_ext4(&img)?;
        }
        if grow && rec.fs == Some(FsType::Xfs) {
            // xfs grows only while mounted read-write, whatever access the device gets.
            let node = self.activate(rec, Access::ReadWrite)?;
            let grown = filesystem::grow_xfs(&node, &self.root.join("tmp").join(rec.id.0.to_string()));
            let flushed = self.flush(rec.id);
            self.deactivate(rec.id)?;
            grown?;
            flushed?;
        }
        let Some(access) = rec.access else { return Ok(None) };
        let node = self.activate(rec, access)?;
        fault::point("create.after_attach");
        Ok(Some(node))
    }

    /// The template for a device without origin like `rec` (its filesystem and
    /// size), made now if the pool has none yet: in a temporary file, flushed,
    /// then renamed into place, so a template under its name is always whole.
    fn template(&self, fs: FsType, rec: &DeviceRecord) -> Result<PathBuf> {
        let path = self.templates_dir.join(template_name(fs, rec.size));
        if path.exists() {
            return Ok(path);
        }
        // Device ids are unique in the pool, and one daemon holds the pool.
        let tmp = self.templates_dir.join(format!(".tmp-{}", rec.id.0));
        let made = (|| {
            let file = OpenOptions::new().create_new(true).write(true).mode(0o600).open(&tmp).map_err(Error::io("create", &tmp))?;
            file.set_len(rec.size.get()).map_err(Error::io("size", &tmp))?;
            drop(file);
            filesystem::mkfs(fs, &tmp)?;
            File::open(&tmp).and_then(|f| f.sync_all()).map_err(Error::io("sync", &tmp))?;
            fs::rename(&tmp, &path).map_err(Error::io("rename", &tmp))
        })();
        if made.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        made?;
        tracing::debug!(template = %path.display(), "made filesystem template");
        Ok(path)
    }

    /// Notes that an image was removed (its blocks freed, unless shared).
    fn freed(&self) {
        if let Some(t) = &self.embedded {
            t.freed();
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<DeviceId, PathBuf>> {
        // Single inserts and removes: a panic cannot leave the map inconsistent.
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for Reflink {
    fn name(&self) -> &'static str {
        "reflink"
    }

    fn create(&self, rec: &DeviceRecord) -> Result<Option<PathBuf>> {
        let result = self.try_create(rec);
        if result.is_err() {
            // Best effort: the record is still `Creating`, so reconciliation retries.
            if let Err(e) = self.remove(rec.id, None) {
                tracing::warn!(device = %rec.id, error = %e, "cleanup after failed create");
            }
        }
        result
    }

    /// Callers never activate the same device concurrently: the snapshot record
    /// serialises its operations, and reconciliation runs alone.
    fn activate(&self, rec: &DeviceRecord, access: Access) -> Result<PathBuf> {
        if let Some(node) = self.node(rec.id) {
            return Ok(node);
        }
        let img = self.image(rec.id);
        let opts = AttachOpts { read_only: access == Access::ReadOnly, direct_io: self.direct_io, autoclear: false, block_size: 4096 };
        // Not under the map's lock: attaching takes a while and others must not wait.
        let node = loops::attach(&img, opts)?.node;
        self.map().insert(rec.id, node.clone());
        Ok(node)
    }

    fn deactivate(&self, id: DeviceId) -> Result<()> {
        let node = self.map().remove(&id);
        match node {
            Some(node) => loops::detach(&node),
            None => Ok(()),
        }
    }

    /// An fsync of the image: data written through a loop with direct I/O
    /// is in place, but a write that unshared a block is remapped by a
    /// transaction that reaches the disk only with the pool's log.
    fn flush(&self, id: DeviceId) -> Result<()> {
        let img = self.image(id);
        match File::open(&img).and_then(|f| f.sync_all()) {
            // Nothing left to flush: reconciliation reports the device's
            // storage missing, and a start must not fail on it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            done => done.map_err(Error::io("sync", &img)),
        }
    }

    fn node(&self, id: DeviceId) -> Option<PathBuf> {
        self.map().get(&id).cloned()
    }

    fn resize(&self, rec: &DeviceRecord, size: Bytes) -> Result<()> {
        image::grow(&self.image(rec.id), size, self.node(rec.id).as_deref())
    }

    fn remove(&self, id: DeviceId, _size: Option<Bytes>) -> Result<()> {
        let node = self.map().remove(&id);
        if let Some(node) = node {
            loops::detach(&node)?;
        }
        let img = self.image(id);
        match fs::remove_file(&img) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(Error::io("remove", &img)(e)),
            Err(_) => {}
            Ok(()) => self.freed(),
        }
        Ok(())
    }

    /// The image's allocated extents less those it still shares, block for
    /// block, with the origin's image (so a layer with children still reports
    /// its own data).
    fn usage(&self, rec: &DeviceRecord) -> Result<Usage> {
        let img = self.image(rec.id);
        let mine = extents(&img)?;
        let total: u64 = mine.iter().map(|e| e.length).sum();
        let origin = rec.origin.map(|o| self.image(o)).filter(|p| p.exists());
        let shared = match &origin {
            // Only extents the filesystem flags as shared can overlap the origin's.
            Some(o) if mine.iter().any(|e| e.flags & FIEMAP_EXTENT_SHARED != 0) => {
                let theirs: Vec<(u64, u64)> = extents(o)?.iter().map(|e| (e.physical, e.physical + e.length)).collect();
                let ours: Vec<(u64, u64)> =
                    mine.iter().filter(|e| e.flags & FIEMAP_EXTENT_SHARED != 0).map(|e| (e.physical, e.physical + e.length)).collect();
                overlap(&ours, theirs)
            }
            _ => 0,
        };
        let inodes_used = |img: &Path| match rec.fs {
            Some(fs) => Ok(filesystem::inodes_used(fs, img)?.unwrap_or(0)),
            None => Ok::<_, Error>(0),
        };
        let inodes = inodes_used(&img)?;
        let origin_inodes = match &origin {
            Some(o) => inodes_used(o)?,
            None => 0,
        };
        Ok(Usage { bytes: Bytes(total - shared.min(total)), inodes: inodes.saturating_sub(origin_inodes) })
    }

    fn status(&self) -> Result<PoolStatus> {
        let space = crate::fs::space(&self.devices_dir)?;
        Ok(PoolStatus {
            backend: self.name(),
            location: self.devices_dir.display().to_string(),
            total: space.total,
            free: space.free,
            reserve: Bytes(0),
            devices: 0,
            deleting: 0,
            unattached: 0,
            metadata: None,
            low_water: None,
            mode: None,
        })
    }

    fn sparse_on_root(&self) -> bool {
        self.embedded.is_some()
    }

    fn trim(&self) -> Result<()> {
        match &self.embedded {
            Some(t) => t.tick(),
            None => Ok(()),
        }
    }

    fn remove_unknown(&self, known: &HashSet<DeviceId>, apply: bool) -> Result<Sweep> {
        let mut sweep = Sweep::default();
        let strays: Vec<_> = self.map().iter().filter(|(id, _)| !known.contains(id)).map(|(id, n)| (*id, n.clone())).collect();
        for (id, node) in strays {
            let removal = apply.then(|| {
                self.map().remove(&id);
                loops::detach(&node)
            });
            sweep.book(Orphan::Loop(node), removal);
        }
        for entry in fs::read_dir(&self.devices_dir).map_err(Error::io("list", &self.devices_dir))? {
            let path = entry.map_err(Error::io("list", &self.devices_dir))?.path();
            if image_id(&path).is_some_and(|id| known.contains(&id)) || path.file_name() == Some(".lock".as_ref()) {
                continue;
            }
            let removal = apply.then(|| fs::remove_file(&path).map(|()| self.freed()).map_err(Error::io("remove", &path)));
            sweep.book(Orphan::File(path), removal);
        }
        Ok(sweep)
    }

    fn stored(&self) -> Result<BTreeSet<DeviceId>> {
        images(&self.devices_dir)
    }

    fn shutdown(&self, release: bool) -> Result<()> {
        if !release {
            return Ok(());
        }
        let nodes: Vec<_> = self.map().drain().map(|(_, n)| n).collect();
        for node in nodes {
            loops::detach(&node)?;
        }
        // An open lock file would keep the pool's filesystem busy.
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
        match &self.embedded {
            Some(t) => embedded::release(t.mountpoint()),
            None => Ok(()),
        }
    }
}

/// What the pool under `root` holds on disk and in the kernel, read without the
/// store: image files and the loops attached to them.
pub(crate) fn inventory(root: &Path, cfg: &PoolConfig) -> Result<Inventory> {
    let devices_dir = cfg.dir.clone().unwrap_or_else(|| root.join("pool")).join("devices");
    let attached = loops::scan(&devices_dir)?.into_iter().filter_map(|l| Some((image_id(&l.backing)?, l.node))).collect();
    Ok(Inventory { backend: "reflink", stored: Some(images(&devices_dir)?), attached })
}

/// Ids of the device images in `dir` (none if it does not exist yet).
fn images(dir: &Path) -> Result<BTreeSet<DeviceId>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(Error::io("list", dir)(e)),
    };
    let mut out = BTreeSet::new();
    for entry in entries {
        out.extend(image_id(&entry.map_err(Error::io("list", dir))?.path()));
    }
    Ok(out)
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

/// Version of the templates' making (mkfs options): a change must bump it, so
/// that a pool made by an older release stops cloning its templates.
const TEMPLATE_VERSION: u32 = 1;

/// File name of the template for `fs` and `size`.
fn template_name(fs: FsType, size: Bytes) -> String {
    format!("{}-v{TEMPLATE_VERSION}-{}.img", fs.as_str(), size.get())
}

/// Removes what is not a current template: temporary files of one a crash
/// interrupted, and templates of another version.
fn clear_templates(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(Error::io("list", dir))? {
        let path = entry.map_err(Error::io("list", dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let current = [FsType::Ext4, FsType::Xfs].iter().any(|fs| {
            name.strip_prefix(&format!("{}-v{TEMPLATE_VERSION}-", fs.as_str()))
                .and_then(|rest| rest.strip_suffix(".img"))
                .is_some_and(|size| size.parse::<u64>().is_ok())
        });
        if !current {
            tracing::info!(path = %path.display(), "removing stale filesystem template");
            fs::remove_file(&path).map_err(Error::io("remove", &path))?;
        }
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
    fn template_names() {
        assert_eq!(template_name(FsType::Ext4, Bytes(10 << 30)), "ext4-v1-10737418240.img");
        assert_eq!(template_name(FsType::Xfs, Bytes(1 << 30)), "xfs-v1-1073741824.img");
    }

    #[test]
    fn image_names() {
        assert_eq!(image_id(Path::new("/p/devices/42.img")), Some(DeviceId(42)));
        assert_eq!(image_id(Path::new("/p/devices/42.img.tmp")), None);
        assert_eq!(image_id(Path::new("/p/devices/x.img")), None);
    }
}
