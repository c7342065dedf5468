//! The only `unsafe` code of the block engine: the ioctls no maintained crate
//! wraps (FIEMAP, and a loop device's logical block size, which `loopdev-3`
//! lacks). Other loop ioctls go through `loopdev-3`; FICLONE and mounts through
//! `rustix`'s safe wrappers.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::ioctl::{IntegerSetter, Opcode, Updater, ioctl, opcode};

/// `LOOP_SET_BLOCK_SIZE` from `<linux/loop.h>` (a plain number, not `_IO`-encoded).
const LOOP_SET_BLOCK_SIZE: Opcode = 0x4C09;

/// Sets a bound loop device's logical block size.
pub fn set_loop_block_size(dev: &impl AsRawFd, size: u32) -> io::Result<()> {
    // SAFETY: the descriptor belongs to `dev`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(dev.as_raw_fd()) };
    // SAFETY: LOOP_SET_BLOCK_SIZE is a valid opcode whose argument is the size itself.
    let setter = unsafe { IntegerSetter::<LOOP_SET_BLOCK_SIZE>::new_usize(size as usize) };
    // SAFETY: the kernel reads nothing through the argument; it is a plain integer.
    unsafe { ioctl(fd, setter) }?;
    Ok(())
}

const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// The extent is shared with another file (a reflink clone or its origin).
pub const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
/// Extents fetched per ioctl call.
const BATCH: usize = 128;

/// `struct fiemap` from `<linux/fiemap.h>`, without its flexible array.
#[repr(C)]
#[derive(Default)]
struct FiemapHeader {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
}

/// `struct fiemap_extent`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

/// The header followed by room for `BATCH` extents, as the kernel expects.
#[repr(C)]
struct FiemapBuf {
    header: FiemapHeader,
    extents: [FiemapExtent; BATCH],
}

/// `FS_IOC_FIEMAP`: `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: Opcode = opcode::read_write::<FiemapHeader>(b'f', 11);

/// One mapped extent of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the filesystem's device.
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

/// Calls `f` for every mapped extent of `file` (dirty data is flushed first).
pub fn for_each_extent(file: &File, mut f: impl FnMut(Extent)) -> io::Result<()> {
    let mut start = 0u64;
    loop {
        let mut buf = FiemapBuf {
            header: FiemapHeader {
                start,
                length: u64::MAX - start,
                flags: FIEMAP_FLAG_SYNC,
                extent_count: BATCH as u32,
                ..FiemapHeader::default()
            },
            extents: [FiemapExtent::default(); BATCH],
        };
        // SAFETY: FS_IOC_FIEMAP reads and writes a `struct fiemap` followed by
        // `extent_count` extents: exactly `FiemapBuf`'s layout.
        let updater = unsafe { Updater::<FS_IOC_FIEMAP, FiemapBuf>::new(&mut buf) };
        // SAFETY: `buf` outlives the call and is large enough for the extents requested.
        unsafe { ioctl(file, updater) }?;
        let n = (buf.header.mapped_extents as usize).min(BATCH);
        if n == 0 {
            return Ok(());
        }
        for e in &buf.extents[..n] {
            f(Extent { logical: e.logical, physical: e.physical, length: e.length, flags: e.flags });
        }
        let last = buf.extents[n - 1];
        if last.flags & FIEMAP_EXTENT_LAST != 0 {
            return Ok(());
        }
        start = last.logical + last.length;
    }
}
