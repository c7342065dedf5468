//! Filesystems inside devices: mkfs, one-time growth, and cheap inode counts read
//! straight from the superblock. External tools are run as processes; their
//! stderr becomes part of the error.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use rustix::mount::{MountFlags, UnmountFlags, mount, unmount};

use crate::error::{Error, Result};
use crate::types::FsType;
use crate::units::Bytes;

/// Size and free space (for unprivileged users) of the filesystem holding `dir`.
#[derive(Clone, Copy, Debug)]
pub struct FsSpace {
    pub total: Bytes,
    pub free: Bytes,
}

/// The [`FsSpace`] of the filesystem holding `dir`.
pub fn space(dir: &Path) -> Result<FsSpace> {
    let st = rustix::fs::statvfs(dir).map_err(|e| Error::io("statvfs", dir)(e.into()))?;
    Ok(FsSpace { total: Bytes(st.f_blocks * st.f_frsize), free: Bytes(st.f_bavail * st.f_frsize) })
}

/// Freezes (`frozen`) or thaws the filesystem mounted at `dir`, as
/// fsfreeze(8) does, without a process per call.
pub fn freeze(dir: &Path, frozen: bool) -> Result<()> {
    let what = if frozen { "freeze" } else { "thaw" };
    File::open(dir).and_then(|d| crate::sys::freeze(&d, frozen)).map_err(Error::io(what, dir))
}

/// Discards the free blocks of the filesystem mounted at `dir` (fstrim(8)).
pub fn trim(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| crate::sys::trim(&d)).map_err(Error::io("trim", dir))
}

/// Runs `tool args…` and turns a failure into [`Error::Tool`] about `path`.
pub fn run(tool: &'static str, args: &[&std::ffi::OsStr], path: &Path) -> Result<()> {
    let out = Command::new(tool).args(args).output().map_err(Error::io("run tool on", path))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Tool { tool, path: path.to_owned(), status: out.status.to_string(), stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() })
}

macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new($a)),*] };
}

/// Creates an empty filesystem in the (sparse, zero-filled) image `img`.
///
/// ext4 skips inode-table and journal zeroing (the file reads as zeros already)
/// and discard; `lost+found` is removed so a fresh rootfs is really empty, as
/// container images expect.
pub fn mkfs(fs: FsType, img: &Path) -> Result<()> {
    let p = img.as_os_str();
    match fs {
        FsType::Ext4 => {
            run(
                "mkfs.ext4",
                args!["-q", "-F", "-b", "4096", "-m", "0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1,assume_storage_prezeroed=1", p],
                img,
            )?;
            run("debugfs", args!["-w", "-R", "rmdir lost+found", p], img)
        }
        // Sector size 4096 to match the loop device's logical block size.
        FsType::Xfs => run("mkfs.xfs", args!["-q", "-f", "-K", "-s", "size=4096", p], img),
    }
}

/// Grows the filesystem mounted at `mountpoint` from device `node` to fill the
/// device, online (ext4 and xfs both grow while mounted).
pub fn grow_mounted(fs: FsType, node: &Path, mountpoint: &Path) -> Result<()> {
    match fs {
        FsType::Ext4 => run("resize2fs", args![node.as_os_str()], node),
        FsType::Xfs => run("xfs_growfs", args![mountpoint.as_os_str()], node),
    }
}

/// Grows an unmounted ext4 filesystem to fill its image file.
pub fn grow_ext4(img: &Path) -> Result<()> {
    run("resize2fs", args!["-f", img.as_os_str()], img)
}

/// Grows an xfs filesystem to fill its device; xfs grows only while mounted, so
/// it is mounted on `scratch` for the call.
pub fn grow_xfs(node: &Path, scratch: &Path) -> Result<()> {
    std::fs::create_dir_all(scratch).map_err(Error::io("create", scratch))?;
    mount(node, scratch, "xfs", MountFlags::empty(), c"nouuid").map_err(|e| Error::io("mount", node)(e.into()))?;
    let grown = run("xfs_growfs", args![scratch.as_os_str()], node);
    let unmounted = unmount(scratch, UnmountFlags::empty()).map_err(|e| Error::io("unmount", scratch)(e.into()));
    let _ = std::fs::remove_dir(scratch);
    grown.and(unmounted)
}

/// Inodes in use, from the on-disk superblock (as of the last unmount or journal
/// commit); `None` if the superblock is not recognised.
pub fn inodes_used(fs: FsType, img: &Path) -> Result<Option<u64>> {
    let file = File::open(img).map_err(Error::io("open", img))?;
    let mut sb = [0u8; 256];
    match fs {
        FsType::Ext4 => {
            file.read_exact_at(&mut sb, 1024).map_err(Error::io("read superblock of", img))?;
            if u16::from_le_bytes([sb[56], sb[57]]) != 0xEF53 {
                return Ok(None);
            }
            let le = |o: usize| u64::from(u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]));
            Ok(Some(le(0).saturating_sub(le(16))))
        }
        FsType::Xfs => {
            (&file).take(256).read_exact(&mut sb).map_err(Error::io("read superblock of", img))?;
            if &sb[0..4] != b"XFSB" {
                return Ok(None);
            }
            let be = |o: usize| u64::from_be_bytes(sb[o..o + 8].try_into().unwrap_or_default());
            Ok(Some(be(128).saturating_sub(be(136))))
        }
    }
}
