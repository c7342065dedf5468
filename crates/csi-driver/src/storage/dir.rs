//! `dir` volumes: host directories with a hard XFS project quota, for
//! runtimes that share volumes over virtio-fs. Each volume is a directory with
//! its own project id (inherited by everything created inside) and a block
//! hard limit of its size, so a writer gets EDQUOT at the size.
//!
//! The directories live on an XFS filesystem mounted with `prjquota`: the one
//! at `dir_path` if configured, else an embedded sparse XFS image under the
//! state root (`<root>/dirs.img` at `<root>/dirs`).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use thinbox_blockstore::{Bytes, CreateSpec, DeviceRecord, Engine};
use thinbox_blockstore::{embedded, mountinfo};

use super::{Held, New, Shape, Storage};
use crate::error::{Error, Result};

/// The `dir` kind: [`Dirs`], set up on first use (not every kernel has XFS
/// project quotas; the other kinds work without).
#[derive(Debug)]
pub(crate) struct DirStorage {
    /// Whose pool's state root (`root`) holds the volumes' records, and whose
    /// reserves apply.
    engine: Arc<Engine>,
    root: PathBuf,
    configured: Option<PathBuf>,
    size: Bytes,
    dirs: OnceLock<Dirs>,
}

impl DirStorage {
    /// `dir` volumes at `configured`, else in an embedded image of `size` under `root`.
    pub(crate) fn new(engine: Arc<Engine>, root: &Path, configured: Option<&Path>, size: Bytes) -> DirStorage {
        DirStorage { engine, root: root.to_owned(), configured: configured.map(Path::to_owned), size, dirs: OnceLock::new() }
    }

    /// The filesystem, set up now if it is not yet.
    fn dirs(&self) -> Result<&Dirs> {
        if let Some(d) = self.dirs.get() {
            return Ok(d);
        }
        let d = Dirs::open(&self.root, self.configured.as_deref(), self.size)
            .map_err(|e| Error::FailedPrecondition(format!("dir volumes are not available on this node: {}", crate::error::chain(&e))))?;
        Ok(self.dirs.get_or_init(|| d))
    }

    fn project(held: &Held<'_>) -> Result<u32> {
        held.project.ok_or_else(|| Error::NotFound(format!("volume {} has no project id", held.id)))
    }
}

impl Storage for DirStorage {
    fn shape(&self) -> Shape {
        Shape::Directory
    }

    fn snapshots(&self) -> bool {
        false
    }

    fn capacity(&self) -> Result<u64> {
        let dirs = self.dirs()?;
        let mut free = dirs.free()?;
        if dirs.trimmer.is_some() {
            // Every free block of the embedded image is a hole in a file on the root.
            free = free.min(thinbox_blockstore::space(&self.root)?.free);
        }
        Ok(free.get().saturating_sub(self.engine.pool().config().reserve.get()))
    }

    fn admit(&self, size: Bytes) -> Result<()> {
        self.engine.pool().root_room()?;
        if self.capacity()? < size.get() {
            return Err(Error::ResourceExhausted(format!("no room for a {size} dir volume on this node")));
        }
        Ok(())
    }

    fn spec(&self, _new: &New<'_>) -> Option<CreateSpec> {
        None
    }

    fn build(&self, _engine: &Engine, new: &New<'_>, _device: Option<&DeviceRecord>) -> Result<()> {
        let project = new.project.ok_or_else(|| Error::NotFound(format!("volume {} has no project id", new.id)))?;
        self.dirs()?.create(new.id, project, new.size)
    }

    fn attach(&self, held: &Held<'_>) -> Result<PathBuf> {
        Ok(self.dirs()?.path(held.id))
    }

    fn detach(&self, _held: &Held<'_>) -> Result<()> {
        Ok(())
    }

    fn grow(&self, held: &Held<'_>, size: Bytes) -> Result<()> {
        self.engine.pool().root_room()?;
        if self.capacity()? < size.get() - held.size.get() {
            return Err(Error::ResourceExhausted(format!("no room to grow {} to {size}", held.id)));
        }
        self.dirs()?.limit(Self::project(held)?, size)
    }

    fn allocated(&self, held: &Held<'_>) -> Result<u64> {
        self.dirs()?.used(Self::project(held)?)
    }

    fn condition(&self, held: &Held<'_>) -> Option<String> {
        match self.dirs() {
            Ok(d) if d.path(held.id).is_dir() => None,
            Ok(d) => Some(format!("its directory {} is gone", d.path(held.id).display())),
            Err(e) => Some(crate::error::chain(&e)),
        }
    }

    fn remove(&self, held: &Held<'_>) -> Result<()> {
        self.dirs()?.remove(held.id, Self::project(held)?)
    }

    fn sweep(&self, known: &HashSet<String>) -> Result<()> {
        // Only where dir volumes were ever set up: opening the filesystem
        // would make the embedded image.
        if self.configured.is_none() && !self.root.join("dirs.img").exists() {
            return Ok(());
        }
        let dirs = self.dirs()?;
        for dir in dirs.list()? {
            if !known.contains(&dir) {
                tracing::info!(dir = %dir, "removing directory without a volume");
                let path = dirs.path(&dir);
                fs::remove_dir_all(&path).map_err(Error::io("remove", &path))?;
                dirs.freed();
            }
        }
        Ok(())
    }

    fn release(&self) -> Result<()> {
        match self.dirs.get() {
            Some(d) => d.release(),
            None => Ok(()),
        }
    }
}

impl DirStorage {
    /// Gives what removed volumes freed in the embedded image back to the
    /// root's filesystem (see [`embedded::Trimmer`]); for periodic maintenance.
    pub(crate) fn trim(&self) -> Result<()> {
        match self.dirs.get().and_then(|d| d.trimmer.as_ref()) {
            Some(t) => Ok(t.tick()?),
            None => Ok(()),
        }
    }
}

/// The filesystem that holds directory volumes.
#[derive(Debug)]
pub(crate) struct Dirs {
    mountpoint: PathBuf,
    /// Present exactly for the embedded image: gives what removals free back
    /// to the root.
    trimmer: Option<embedded::Trimmer>,
}

impl Dirs {
    /// Uses `configured` (checked: XFS with project quotas on) or mounts the
    /// embedded image of `size` under `root`.
    pub fn open(root: &Path, configured: Option<&Path>, size: Bytes) -> Result<Dirs> {
        let (mountpoint, embedded) = match configured {
            Some(p) => (p.to_owned(), false),
            None => {
                let mp = root.join("dirs");
                embedded::ensure_xfs(&root.join("dirs.img"), &mp, size, true, c"prjquota")?;
                (mp, true)
            }
        };
        let opts = mount_options(&mountpoint)?;
        let Some((fstype, options)) = opts else {
            return Err(Error::FailedPrecondition(format!(
                "{} is not a mount point; dir volumes need a filesystem of their own",
                mountpoint.display()
            )));
        };
        if fstype != "xfs" || !options.split(',').any(|o| matches!(o, "prjquota" | "pquota")) {
            return Err(Error::FailedPrecondition(format!(
                "{} is {fstype} mounted with {options}; dir volumes need XFS mounted with prjquota",
                mountpoint.display()
            )));
        }
        let trimmer = embedded.then(|| embedded::Trimmer::new(&mountpoint));
        Ok(Dirs { mountpoint, trimmer })
    }

    /// A volume's directory.
    pub fn path(&self, id: &str) -> PathBuf {
        self.mountpoint.join(id)
    }

    /// Free space on the filesystem.
    pub fn free(&self) -> Result<Bytes> {
        Ok(thinbox_blockstore::space(&self.mountpoint)?.free)
    }

    /// Makes the volume's directory (idempotent) with project `project` and a
    /// hard limit of `size`.
    pub fn create(&self, id: &str, project: u32, size: Bytes) -> Result<()> {
        let dir = self.path(id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("create", &dir)(e)),
        }
        self.quota(&[&format!("project -s -p {} {project}", dir.display())])?;
        self.limit(project, size)
    }

    /// Sets the volume's hard limit (growth raises it).
    pub fn limit(&self, project: u32, size: Bytes) -> Result<()> {
        self.quota(&[&format!("limit -p bhard={} {project}", size.get())])
    }

    /// Bytes the project holds, from the quota accounting.
    pub fn used(&self, project: u32) -> Result<u64> {
        let out = self.quota_output(&format!("quota -p -N -b {project}"))?;
        // "<device> <used KiB> <soft> <hard> <warn/grace>": used is the second field.
        let kib: u64 = out.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(kib * 1024)
    }

    /// Removes the directory and its limit (idempotent).
    pub fn remove(&self, id: &str, project: u32) -> Result<()> {
        let dir = self.path(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => self.freed(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &dir)(e)),
        }
        self.limit(project, Bytes(0))
    }

    /// Notes that a removal freed blocks.
    fn freed(&self) {
        if let Some(t) = &self.trimmer {
            t.freed();
        }
    }

    /// Directories that look like volumes (for reconciliation).
    pub fn list(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.mountpoint).map_err(Error::io("list", &self.mountpoint))? {
            let entry = entry.map_err(Error::io("list", &self.mountpoint))?;
            if let Some(name) = entry.file_name().to_str().filter(|n| n.starts_with("tb-dir-")) {
                out.push(name.to_owned());
            }
        }
        Ok(out)
    }

    /// Unmounts the embedded image (if nothing uses it).
    pub fn release(&self) -> Result<()> {
        if self.trimmer.is_some() {
            embedded::release(&self.mountpoint)?;
        }
        Ok(())
    }

    fn quota(&self, cmds: &[&str]) -> Result<()> {
        for c in cmds {
            self.quota_output(c)?;
        }
        Ok(())
    }

    fn quota_output(&self, cmd: &str) -> Result<String> {
        let out = Command::new("xfs_quota")
            .args(["-x", "-c", cmd])
            .arg(&self.mountpoint)
            .output()
            .map_err(Error::io("run xfs_quota on", &self.mountpoint))?;
        if !out.status.success() {
            return Err(Error::Io {
                op: "xfs_quota",
                path: self.mountpoint.clone(),
                source: std::io::Error::other(format!("{cmd}: {}", String::from_utf8_lossy(&out.stderr).trim())),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Filesystem type and super options of the mount at `mp`, if it is one.
fn mount_options(mp: &Path) -> Result<Option<(String, String)>> {
    let mount = mountinfo::mount_at(mp).map_err(Error::io("read", mountinfo::PATH))?;
    Ok(mount.map(|m| (m.fs_type, m.super_options)))
}
