//! A pod's fsGroup on a host mount (NodePublishVolume's `volume_mount_group`,
//! which kubelet hands over to drivers with the VOLUME_MOUNT_GROUP
//! capability instead of applying it itself). What kubelet would do, with
//! its default policy (Always): every entry gets the group and read-write
//! for it; directories also get search and set-group-id, so what is made in
//! them later takes the group. Symbolic links get the group only, and the
//! walk stays on the volume's filesystem.

use std::fs::{self, Permissions};
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const GROUP_RW: u32 = 0o060;
const GROUP_X: u32 = 0o010;
const SET_GID: u32 = 0o2000;

/// Gives the tree under `root` (a fresh mount) the group `gid`.
pub(crate) fn set_group(root: &Path, gid: u32) -> Result<()> {
    let dev = fs::symlink_metadata(root).map_err(Error::io("stat", root))?.dev();
    let mut todo: Vec<PathBuf> = vec![root.to_owned()];
    while let Some(path) = todo.pop() {
        let meta = fs::symlink_metadata(&path).map_err(Error::io("stat", &path))?;
        if meta.dev() != dev {
            continue;
        }
        lchown(&path, None, Some(gid)).map_err(Error::io("chown", &path))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mut mode = meta.mode() | GROUP_RW;
        if meta.is_dir() {
            mode |= GROUP_X | SET_GID;
            for entry in fs::read_dir(&path).map_err(Error::io("list", &path))? {
                todo.push(entry.map_err(Error::io("list", &path))?.path());
            }
        }
        fs::set_permissions(&path, Permissions::from_mode(mode & 0o7777)).map_err(Error::io("chmod", &path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_tree_takes_the_group_and_its_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/f"), b"x").unwrap();
        fs::set_permissions(root.join("d/f"), Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("d/f", root.join("l")).unwrap();
        // Our own group: the one an unprivileged test may give.
        let gid = fs::metadata(root).unwrap().gid();
        set_group(root, gid).unwrap();
        let mode = |p: &str| fs::symlink_metadata(root.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("d/f"), 0o660, "a file: read-write for the group, nothing more");
        assert_eq!(mode("d") & (SET_GID | 0o070), SET_GID | 0o070, "a directory: rwx and set-group-id");
        assert_eq!(mode(""), mode("d"), "the root too");
        assert_eq!(fs::read_link(root.join("l")).unwrap(), Path::new("d/f"), "a link is left a link");
    }
}
