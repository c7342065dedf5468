//! Stand-alone image files on loop devices, outside any pool (the fio
//! benchmark's scratch filesystems), and filesystem growth on devices. Same
//! conventions as pool devices (sparse, 0600, one `LOOP_CONFIGURE` with
//! direct I/O).

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fs;
use crate::loops::{self, AttachOpts};
use crate::types::FsType;
use crate::units::Bytes;

/// Creates the sparse image `path` of exactly `size` (a fresh file: an existing
/// one is an error) and, unless `fs` is `None` (raw block), a filesystem in it.
/// A failure removes what was made.
pub fn create(path: &Path, size: Bytes, fs: Option<FsType>) -> Result<()> {
    let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(Error::io("create", path))?;
    let made = file.set_len(size.get()).map_err(Error::io("size", path)).and_then(|_| match fs {
        Some(fs) => fs::mkfs(fs, path),
        None => Ok(()),
    });
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// The loop device bound to `path`, attaching one if none is (idempotent:
/// a restarted driver finds the loops it attached before).
pub fn attach(path: &Path, read_only: bool) -> Result<PathBuf> {
    if let Some(node) = find(path)? {
        return Ok(node);
    }
    let attached = loops::attach(path, AttachOpts { read_only, direct_io: true, autoclear: false, block_size: 4096 })?;
    Ok(attached.node.clone())
}

/// The loop device bound to `path`, if any.
pub fn find(path: &Path) -> Result<Option<PathBuf>> {
    let dir = path.parent().unwrap_or(path);
    Ok(loops::scan(dir)?.into_iter().find(|l| l.backing == path && !l.deleted).map(|l| l.node))
}

/// Detaches the loop bound to `path`, if any (lazily, if still open).
pub fn detach(path: &Path) -> Result<()> {
    match find(path)? {
        Some(node) => loops::detach(&node),
        None => Ok(()),
    }
}

/// Grows the image at `path` to `size` and, if it is attached at `node`, makes
/// the loop device see the new size (live; the filesystem is grown separately).
pub fn grow(path: &Path, size: Bytes, node: Option<&Path>) -> Result<()> {
    let file = OpenOptions::new().write(true).open(path).map_err(Error::io("open", path))?;
    if file.metadata().map_err(Error::io("stat", path))?.len() > size.get() {
        return Err(Error::Config(format!("{} is larger than {size}; images never shrink", path.display())));
    }
    file.set_len(size.get()).map_err(Error::io("grow", path))?;
    match node {
        Some(node) => loops::refresh_capacity(node),
        None => Ok(()),
    }
}

/// Grows the filesystem of device `node`, mounted at `mountpoint`, to fill it.
pub fn grow_mounted_fs(fs_type: FsType, node: &Path, mountpoint: &Path) -> Result<()> {
    fs::grow_mounted(fs_type, node, mountpoint)
}

/// Grows the filesystem of device `node`, which nothing has mounted, to
/// fill it: ext4 in place, xfs mounted on `scratch` for the moment (it grows
/// only while mounted).
pub fn grow_unmounted_fs(fs_type: FsType, node: &Path, scratch: &Path) -> Result<()> {
    match fs_type {
        FsType::Ext4 => fs::grow_ext4(node),
        FsType::Xfs => fs::grow_xfs(node, scratch),
    }
}
