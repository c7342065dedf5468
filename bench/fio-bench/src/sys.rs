//! Host plumbing the rows share: mounts and loop devices that undo
//! themselves when dropped, dropping the page cache, writing test files, and
//! starting daemons that die with their owner.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::mount::{MountFlags, UnmountFlags, mount, unmount};
use thinbox_blockstore::{Bytes, FsType, image};

use crate::Error;

/// A mount, unmounted when dropped (lazily if busy).
#[derive(Debug)]
pub struct Mounted {
    target: PathBuf,
    mounted: bool,
}

impl Mounted {
    /// Mounts `source` at `target` (created if missing).
    pub fn new(source: &Path, target: &Path, fstype: &str, flags: MountFlags, data: &str) -> Result<Mounted, Error> {
        std::fs::create_dir_all(target).map_err(Error::io(format!("creating {}", target.display())))?;
        let data = CString::new(data).map_err(|_| Error::Config("mount data holds a NUL byte".into()))?;
        mount(source, target, fstype, flags, data.as_c_str())
            .map_err(|e| Error::io(format!("mounting {} ({fstype}) at {}", source.display(), target.display()))(e.into()))?;
        Ok(Mounted { target: target.to_owned(), mounted: true })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Unmounts now, reporting failure.
    pub fn unmount(mut self) -> Result<(), Error> {
        self.mounted = false;
        unmount(&self.target, UnmountFlags::empty()).map_err(|e| Error::io(format!("unmounting {}", self.target.display()))(e.into()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted && unmount(&self.target, UnmountFlags::empty()).is_err() {
            let _ = unmount(&self.target, UnmountFlags::DETACH);
        }
    }
}

/// A sparse image file attached to a loop device with direct I/O; detached
/// (and the file removed) when dropped.
#[derive(Debug)]
pub struct LoopImage {
    image: PathBuf,
    node: PathBuf,
}

impl LoopImage {
    /// Creates `image` of `size` with an ext4 filesystem (Thinbox's own mkfs
    /// options) and attaches it.
    pub fn ext4(image: &Path, size: Bytes) -> Result<LoopImage, Error> {
        image::create(image, size, Some(FsType::Ext4)).map_err(Error::store(format!("creating ext4 image {}", image.display())))?;
        let node = image::attach(image, false).map_err(Error::store(format!("attaching {}", image.display())))?;
        Ok(LoopImage { image: image.to_owned(), node })
    }

    /// The loop device.
    pub fn node(&self) -> &Path {
        &self.node
    }
}

impl Drop for LoopImage {
    fn drop(&mut self) {
        if let Err(e) = image::detach(&self.image) {
            tracing::warn!(image = %self.image.display(), error = %crate::chain(&e), "detaching loop");
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Writes dirty pages back and drops the page cache, dentries and inodes.
pub fn drop_caches() -> Result<(), Error> {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").map_err(Error::io("writing /proc/sys/vm/drop_caches".into()))
}

/// The guest-side equivalent of [`drop_caches`].
pub const GUEST_DROP_CACHES: &str = "sync; echo 3 > /proc/sys/vm/drop_caches";

/// Writes a new file of exactly `size` bytes of pseudo-random data (so no
/// layer below can treat it as zeros or compress it), then fsyncs it.
pub fn write_data_file(path: &Path, size: u64) -> Result<(), Error> {
    let ctx = || format!("writing {}", path.display());
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o644).open(path).map_err(Error::io(ctx()))?;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            // xorshift64: fast, and plenty random for a storage test.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).map_err(Error::io(ctx()))?;
        left -= n as u64;
    }
    f.sync_all().map_err(Error::io(ctx()))
}

/// A daemon we started, killed (by its pid) when dropped.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with its output in `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Daemon, Error> {
        let out = std::fs::File::create(log).map_err(Error::io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(Error::io(format!("opening {}", log.display())))?;
        let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().map_err(Error::io(format!("starting {name}")))?;
        Ok(Daemon { name: name.to_owned(), child: Some(child), log: log.to_owned() })
    }

    /// Waits until `path` exists (a socket the daemon creates); fails if
    /// the daemon exits first or `timeout` passes.
    pub fn wait_for(&mut self, path: &Path, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(Error::Tool { tool: self.name.clone(), reason: format!("exited {status}: {}", self.log_tail()) });
            }
            if Instant::now() >= deadline {
                return Err(Error::Tool {
                    tool: self.name.clone(),
                    reason: format!("no {} after {} s: {}", path.display(), timeout.as_secs(), self.log_tail()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        crate::fio::tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 5)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn data_files_have_the_exact_size_and_no_zero_pages() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        write_data_file(&p, (3 << 20) + 4096).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), (3 << 20) + 4096);
        assert!(data.chunks(4096).all(|page| page.iter().any(|b| *b != 0)));
        assert!(write_data_file(&p, 1).is_err(), "never overwrites");
    }
}
