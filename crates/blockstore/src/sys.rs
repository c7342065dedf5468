//! The only `unsafe` code of the block engine: the ioctls no maintained crate
//! wraps (FIEMAP, BLKDISCARD, FIFREEZE/FITHAW, FITRIM, and a loop device's logical
//! block size, which `loopdev-3` lacks). Other loop ioctls go through
//! `loopdev-3`; FICLONE and mounts through `rustix`'s safe wrappers.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::ioctl::{NoArg, Opcode, Updater, ioctl, opcode};

/// `LOOP_CONFIGURE` from `<linux/loop.h>` (a plain number, not `_IO`-encoded).
const LOOP_CONFIGURE: Opcode = 0x4C0A;
/// `LO_FLAGS_*`.
pub const LO_FLAGS_READ_ONLY: u32 = 1;
/// Detach on last close.
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// Direct I/O to the backing file.
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Binds `backing` to the free loop device `dev` with flags and a logical block
/// size in one `LOOP_CONFIGURE` call. Setting them one by one on a bound device
/// freezes its queue each time (about 16 ms apiece here); before binding it is free.
pub fn loop_configure(dev: &impl AsRawFd, backing: &File, flags: u32, block_size: u32, name: &[u8]) -> io::Result<()> {
    let mut file_name = [0u8; 64];
    let n = name.len().min(63);
    file_name[..n].copy_from_slice(&name[..n]);
    let mut config = LoopConfig {
        fd: u32::try_from(backing.as_raw_fd()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        block_size,
        info: LoopInfo64 {
            device: 0,
            inode: 0,
            rdevice: 0,
            offset: 0,
            sizelimit: 0,
            number: 0,
            encrypt_type: 0,
            encrypt_key_size: 0,
            flags,
            file_name,
            crypt_name: [0; 64],
            encrypt_key: [0; 32],
            init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: the descriptor belongs to `dev`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(dev.as_raw_fd()) };
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `LoopConfig` mirrors.
    let updater = unsafe { Updater::<LOOP_CONFIGURE, LoopConfig>::new(&mut config) };
    // SAFETY: `config` and `backing` outlive the call; the kernel only reads `config`.
    unsafe { ioctl(fd, updater) }?;
    Ok(())
}

/// `FIFREEZE` and `FITHAW` from `<linux/fs.h>`: `_IOWR('X', 119, int)` and
/// `_IOWR('X', 120, int)`; the kernel reads no argument.
const FIFREEZE: Opcode = opcode::read_write::<std::ffi::c_int>(b'X', 119);
const FITHAW: Opcode = opcode::read_write::<std::ffi::c_int>(b'X', 120);

/// Freezes the filesystem mounted at the directory `dir` (flushed, writers
/// blocked until the thaw), or thaws it.
pub fn freeze(dir: &File, frozen: bool) -> io::Result<()> {
    if frozen { no_arg::<FIFREEZE>(dir) } else { no_arg::<FITHAW>(dir) }
}

/// `FITRIM` from `<linux/fs.h>`: `_IOWR('X', 121, struct fstrim_range)`.
const FITRIM: Opcode = opcode::read_write::<[u64; 3]>(b'X', 121);

/// Discards every free block of the filesystem mounted at the directory
/// `dir`, as fstrim(8) does.
pub fn trim(dir: &File) -> io::Result<()> {
    // `struct fstrim_range`: start, length, minimum extent length.
    let mut range = [0, u64::MAX, 0];
    // SAFETY: FITRIM reads and writes a `struct fstrim_range`, three u64s,
    // which `range` is; it lives across the call.
    let updater = unsafe { Updater::<FITRIM, [u64; 3]>::new(&mut range) };
    // SAFETY: `dir` is an open descriptor; the kernel only touches `range`.
    unsafe { ioctl(dir, updater) }?;
    Ok(())
}

/// The ioctl `OP`, which takes no argument, on `fd`.
fn no_arg<const OP: Opcode>(fd: &File) -> io::Result<()> {
    // SAFETY: only for ioctls that take no argument: none is passed.
    let op = unsafe { NoArg::<OP>::new() };
    // SAFETY: `fd` is an open descriptor, and the kernel is given no pointer.
    unsafe { ioctl(fd, op) }?;
    Ok(())
}

/// `BLKDISCARD` from `<linux/fs.h>`: `_IO(0x12, 119)`, argument `u64[2]`.
const BLKDISCARD: Opcode = opcode::none(0x12, 119);

/// Discards `len` bytes from `offset` of the block device `dev` (a thin device
/// gives its blocks back to the pool, and the pool's loop device to its file).
pub fn discard(dev: &File, offset: u64, len: u64) -> io::Result<()> {
    let mut range = [offset, len];
    // SAFETY: BLKDISCARD reads two u64s (start, length) through the pointer;
    // `range` lives across the call.
    let updater = unsafe { Updater::<BLKDISCARD, [u64; 2]>::new(&mut range) };
    // SAFETY: `dev` is an open descriptor; the kernel only reads `range`.
    unsafe { ioctl(dev, updater) }?;
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
            header: FiemapHeader { start, length: u64::MAX - start, flags: FIEMAP_FLAG_SYNC, extent_count: BATCH as u32, ..FiemapHeader::default() },
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
