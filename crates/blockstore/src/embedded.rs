//! Embedded XFS images: with no pool directory configured, a sparse XFS image
//! (`reflink=1`) under the state root, loop-mounted at `<root>/pool`; the CSI
//! driver's directory volumes get one mounted with project quotas. Their loop
//! devices are attached with autoclear, so unmounting an image frees it.
//! A [`Trimmer`] gives the blocks freed inside an image back to the
//! filesystem under it.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::mount::{MountFlags, UnmountFlags, mount, unmount};

use crate::error::{Error, Result};
use crate::fs::run;
use crate::loops::{self, AttachOpts};
use crate::mountinfo;
use crate::units::Bytes;

/// Makes sure the embedded pool exists and is mounted; returns its mount point.
pub(crate) fn ensure(root: &Path, size: Bytes, direct_io: bool) -> Result<PathBuf> {
    let mp = root.join("pool");
    ensure_xfs(&root.join("pool.img"), &mp, size, direct_io, c"")?;
    Ok(mp)
}

/// Makes sure the sparse XFS image `img` of `size` exists (made once, under a
/// temporary name) and is mounted at `mp` with mount options `data`.
pub fn ensure_xfs(img: &Path, mp: &Path, size: Bytes, direct_io: bool, data: &std::ffi::CStr) -> Result<()> {
    if is_mountpoint(mp)? {
        return Ok(());
    }
    fs::create_dir_all(mp).map_err(Error::io("create", mp))?;
    if !img.exists() {
        // Format under a temporary name so a crash never leaves a half-made pool image.
        let tmp = img.with_extension("img.tmp");
        let file = OpenOptions::new().create(true).write(true).truncate(true).open(&tmp).map_err(Error::io("create", &tmp))?;
        file.set_len(size.get()).map_err(Error::io("size", &tmp))?;
        drop(file);
        run("mkfs.xfs", &["-q".as_ref(), "-f".as_ref(), "-K".as_ref(), "-m".as_ref(), "reflink=1".as_ref(), tmp.as_os_str()], &tmp)?;
        fs::rename(&tmp, img).map_err(Error::io("rename", &tmp))?;
    }
    let attached = loops::attach(img, AttachOpts { read_only: false, direct_io, autoclear: true, block_size: 0 })?;
    // `attached` stays open until the mount holds the device, or autoclear would free it.
    mount(&attached.node, mp, "xfs", MountFlags::NOATIME, data).map_err(|e| Error::io("mount image", img)(e.into()))?;
    tracing::info!(image = %img.display(), mountpoint = %mp.display(), loop_dev = %attached.node.display(), %size, "embedded image mounted");
    Ok(())
}

/// How often at most a [`Trimmer`] trims while blocks are being freed.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// How long XFS may take to make a freed block trimmable: an unlinked file's
/// blocks are freed in the background and stay busy until the log's next
/// checkpoint, which XFS makes at least every 30 s (`fs.xfs.xfssyncd_centisecs`).
const TRIM_SETTLE: Duration = Duration::from_secs(40);

/// Gives the blocks an embedded image's filesystem frees back to the
/// filesystem under the image: FITRIM, for which the loop device punches
/// holes in the image file. Without it an image never shrinks, and every
/// device or directory deleted in it would leave the state root's filesystem
/// fuller for good. (A `discard` mount option would do it for new mounts
/// only: a remount ignores it, and an image stays mounted across restarts.)
#[derive(Debug)]
pub struct Trimmer {
    mountpoint: PathBuf,
    state: Mutex<TrimState>,
}

#[derive(Debug)]
struct TrimState {
    /// Blocks were freed that no trim may have taken yet.
    pending: bool,
    /// The last free in this run.
    freed: Option<Instant>,
    /// The last trim in this run.
    trimmed: Option<Instant>,
}

impl Trimmer {
    /// For the image mounted at `mountpoint`. The first [`Trimmer::tick`]
    /// trims: earlier runs, or versions without a trimmer, may have left
    /// freed blocks.
    pub fn new(mountpoint: &Path) -> Trimmer {
        Trimmer { mountpoint: mountpoint.to_owned(), state: Mutex::new(TrimState { pending: true, freed: None, trimmed: None }) }
    }

    /// Where the image is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Notes that blocks were freed (a file removed).
    pub fn freed(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.pending = true;
        s.freed = Some(Instant::now());
    }

    /// Trims if blocks were freed and the last trim was [`TRIM_EVERY`] ago.
    /// For a periodic task, not a request's path.
    pub fn tick(&self) -> Result<()> {
        let now = Instant::now();
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if !s.pending || s.trimmed.is_some_and(|t| now.duration_since(t) < TRIM_EVERY) {
                return Ok(());
            }
            // Blocks freed lately may not be trimmable yet: again next time.
            s.pending = s.freed.is_some_and(|f| now.duration_since(f) < TRIM_SETTLE);
            s.trimmed = Some(now);
        }
        if let Err(e) = crate::fs::trim(&self.mountpoint) {
            self.state.lock().unwrap_or_else(|p| p.into_inner()).pending = true;
            return Err(e);
        }
        tracing::debug!(mountpoint = %self.mountpoint.display(), elapsed_us = now.elapsed().as_micros() as u64, "trimmed");
        Ok(())
    }
}

/// How long [`release`] asks a busy image again before it leaves it mounted.
const RELEASE_PATIENCE: Duration = Duration::from_secs(2);

/// Unmounts an embedded image if nothing uses it any more; otherwise leaves it.
///
/// A loop device just detached from a file in the image may keep that file
/// open a moment longer: when another process has the device open at that
/// instant (another tool looking for a free loop, say), the kernel finishes
/// the detach on that process's last close. So a busy image is asked again
/// for up to [`RELEASE_PATIENCE`]; one that a mount or a VM really holds is
/// then left mounted.
pub fn release(mp: &Path) -> Result<()> {
    let deadline = Instant::now() + RELEASE_PATIENCE;
    loop {
        match unmount(mp, UnmountFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(rustix::io::Errno::BUSY) => {
                tracing::warn!(mountpoint = %mp.display(), "pool still in use; left mounted");
                return Ok(());
            }
            Err(e) => return Err(Error::io("unmount", mp)(e.into())),
        }
    }
}

/// Whether `path` is a mount point, from `/proc/self/mountinfo`.
pub fn is_mountpoint(path: &Path) -> Result<bool> {
    mountinfo::is_mount_point(path).map_err(Error::io("read", mountinfo::PATH))
}
