//! Loop devices: attach with direct I/O, lazy detach, and discovery of the loops a
//! pool owns (by their backing file) after a restart.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use loopdev::{LoopControl, LoopDevice};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::sys;

/// Attach attempts before giving up when other processes race us for free loops.
const ATTACH_ATTEMPTS: usize = 16;

/// Options for [`attach`].
#[derive(Clone, Copy, Debug)]
pub struct AttachOpts {
    /// Attach read-only.
    pub read_only: bool,
    /// Use direct I/O to the backing file (no double caching); falls back to
    /// buffered I/O with a warning when the backing filesystem refuses.
    pub direct_io: bool,
    /// Detach automatically on last close (used for the embedded pool image, whose
    /// loop must go away when the pool is unmounted).
    pub autoclear: bool,
    /// Logical block size to set (0: the kernel's default). Reflinked XFS files
    /// accept direct I/O only in whole filesystem blocks, hence 4096 for devices.
    pub block_size: u32,
}

/// A loop device we just attached, still open. With `autoclear` the device goes
/// away when this handle is dropped unless something else (a mount) holds it.
#[derive(Debug)]
pub struct Attached {
    /// `/dev/loopN`.
    pub node: PathBuf,
    /// The open device, held only so it stays open while in scope.
    pub _dev: LoopDevice,
}

/// Attaches `file` to a free loop device.
pub fn attach(file: &Path, opts: AttachOpts) -> Result<Attached> {
    let backing = OpenOptions::new().read(true).write(!opts.read_only).open(file).map_err(Error::io("open", file))?;
    let ctl = LoopControl::open().map_err(Error::NoLoopDevices)?;
    let mut flags = if opts.read_only { sys::LO_FLAGS_READ_ONLY } else { 0 };
    if opts.autoclear {
        flags |= sys::LO_FLAGS_AUTOCLEAR;
    }
    let mut dio = opts.direct_io;
    let mut last = None;
    for _ in 0..ATTACH_ATTEMPTS {
        let dev = ctl.next_free().map_err(Error::io("find free loop device for", file))?;
        let f = if dio { flags | sys::LO_FLAGS_DIRECT_IO } else { flags };
        match sys::loop_configure(&dev, &backing, f, opts.block_size, file.as_os_str().as_bytes()) {
            Ok(()) => {
                let node = dev.path().ok_or_else(|| Error::io("name loop device of", file)(io::Error::other("unknown loop node")))?;
                return Ok(Attached { node, _dev: dev });
            }
            // Another process took this loop between GET_FREE and CONFIGURE.
            Err(e) if e.raw_os_error() == Some(Errno::BUSY.raw_os_error()) => last = Some(e),
            Err(e) if dio && e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {
                tracing::warn!(file = %file.display(), error = %e, "direct I/O refused; using buffered I/O");
                dio = false;
            }
            Err(e) => return Err(Error::io("attach loop device to", file)(e)),
        }
    }
    Err(Error::io("attach loop device to", file)(last.unwrap_or_else(|| io::Error::other("no free loop device"))))
}

/// Detaches a loop device. Lazy: if the device is still open (mounted, or held by
/// a VMM) the kernel detaches it on last close. Detaching a loop that is already
/// free is not an error.
pub fn detach(node: &Path) -> Result<()> {
    let dev = match LoopDevice::open(node) {
        Ok(dev) => dev,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("open loop device", node)(e)),
    };
    match dev.detach() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(Errno::NXIO.raw_os_error()) => Ok(()),
        Err(e) => Err(Error::io("detach loop device", node)(e)),
    }
}

/// A bound loop device and the file behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundLoop {
    /// `/dev/loopN`.
    pub node: PathBuf,
    /// The backing file's path as the kernel reports it (without " (deleted)").
    pub backing: PathBuf,
    /// The backing file has been unlinked.
    pub deleted: bool,
}

/// Lists bound loop devices whose backing file lies under `dir`.
pub fn scan(dir: &Path) -> Result<Vec<BoundLoop>> {
    let mut out = Vec::new();
    let sys = Path::new("/sys/block");
    for entry in fs::read_dir(sys).map_err(Error::io("list", sys))? {
        let entry = entry.map_err(Error::io("list", sys))?;
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else { continue };
        // Only bound loops have `backing_file`.
        let Ok(raw) = fs::read_to_string(entry.path().join("loop/backing_file")) else { continue };
        let raw = raw.trim_end_matches('\n');
        let (path, deleted) = match raw.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (raw, false),
        };
        let backing = PathBuf::from(path);
        if backing.starts_with(dir) {
            out.push(BoundLoop { node: Path::new("/dev").join(name), backing, deleted });
        }
    }
    Ok(out)
}

/// Size of a block device in 512-byte sectors, from sysfs.
pub fn sectors(node: &Path) -> Result<u64> {
    let name = node.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let path = Path::new("/sys/class/block").join(name).join("size");
    let text = fs::read_to_string(&path).map_err(Error::io("read", &path))?;
    text.trim().parse().map_err(|_| Error::io("parse", &path)(io::Error::from(io::ErrorKind::InvalidData)))
}

/// Makes a loop device pick up its backing file's new size.
pub fn refresh_capacity(node: &Path) -> Result<()> {
    LoopDevice::open(node).and_then(|d| d.set_capacity()).map_err(Error::io("refresh capacity of", node))
}
