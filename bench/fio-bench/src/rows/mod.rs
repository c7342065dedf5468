//! The rows: each sets up the storage a container would see, places one test
//! file on it, runs fio jobs on that file, and tears everything down.
//!
//! * [`runc`]: fio on the host, on overlayfs over ext4.
//! * [`shared`]: 9p and virtio-fs guests on the same overlayfs layout, shared
//!   from the host (what a Kata guest gets from containerd's overlayfs
//!   snapshotter without Thinbox).
//! * [`thinbox`]: guests on Thinbox devices as virtio-blk: a rootfs snapshot
//!   made by the snapshotter, and an emptyDir made by the CSI driver.

pub mod guest;
pub mod runc;
pub mod shared;
pub mod thinbox;

use std::path::{Path, PathBuf};

use rustix::mount::MountFlags;
use thinbox_blockstore::Bytes;

use crate::Error;
use crate::fio::Measurement;
use crate::jobs::{FioParams, Job};
use crate::report::RowInfo;
use crate::sys::{LoopImage, Mounted, write_data_file};

/// The name of the test file in every row.
pub const FILE_NAME: &str = "fio.dat";
/// Where guests mount the storage under test.
pub const GUEST_MOUNT: &str = "/mnt/t";

/// A row, set up and ready to run jobs.
pub trait Row {
    /// How it is set up.
    fn info(&self) -> &RowInfo;
    /// Runs one job (caches dropped first) and returns its figures.
    fn run(&mut self, job: &Job, params: &FioParams) -> Result<Measurement, Error>;
    /// Tears everything down, reporting what could not be undone.
    fn teardown(self: Box<Self>) -> Result<(), Error>;
}

/// `row` once `build` has set it up. If `build` fails, what it did so far is
/// torn down (a failure of that is logged) and its error returned.
pub fn built<R: Row>(mut row: R, build: impl FnOnce(&mut R) -> Result<(), Error>) -> Result<R, Error> {
    match build(&mut row) {
        Ok(()) => Ok(row),
        Err(e) => {
            let kind = row.info().kind;
            if let Err(t) = Box::new(row).teardown() {
                tracing::warn!(row = ?kind, error = %crate::chain(&t), "tearing down a row that failed to set up");
            }
            Err(e)
        }
    }
}

/// The test file's path inside a guest.
pub fn guest_file() -> String {
    format!("{GUEST_MOUNT}/{FILE_NAME}")
}

/// Room for the test file, a copied-up second copy, and filesystem metadata.
pub fn volume_size(file_size: u64) -> Bytes {
    Bytes((file_size * 2 + (512 << 20)).max(1 << 30)).align_up(1 << 20)
}

/// What a runC container's rootfs is: overlayfs with the image's files in
/// the lower dir and the container's writes in the upper dir, both on an
/// ext4 filesystem (here an image on a loop device with direct I/O, so the
/// host's page cache never holds the image's blocks twice). The test file
/// starts in the lower dir; the first job that opens it for writing copies
/// it up, as a container writing to an image file would.
#[derive(Debug)]
pub struct Overlay {
    // Drop order matters: the overlay before the ext4 under it, then the loop.
    merged: Mounted,
    ext4: Mounted,
    image: LoopImage,
}

impl Overlay {
    /// Makes the image, filesystem, dirs, test file and overlay under `dir`.
    pub fn new(dir: &Path, file_size: u64) -> Result<Overlay, Error> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let image = LoopImage::ext4(&dir.join("ext4.img"), volume_size(file_size))?;
        let ext4 = Mounted::new(image.node(), &dir.join("ext4"), "ext4", MountFlags::empty(), "")?;
        let (lower, upper, work) = (ext4.path().join("lower"), ext4.path().join("upper"), ext4.path().join("work"));
        for d in [&lower, &upper, &work] {
            std::fs::create_dir_all(d).map_err(Error::io(format!("creating {}", d.display())))?;
        }
        write_data_file(&lower.join(FILE_NAME), file_size)?;
        let data = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
        let merged = Mounted::new(Path::new("overlay"), &dir.join("merged"), "overlay", MountFlags::empty(), &data)?;
        Ok(Overlay { merged, ext4, image })
    }

    /// The merged dir.
    pub fn merged(&self) -> &Path {
        self.merged.path()
    }

    /// The test file, seen through the overlay.
    pub fn file(&self) -> PathBuf {
        self.merged.path().join(FILE_NAME)
    }

    /// Unmounts and detaches, reporting the first failure.
    pub fn teardown(self) -> Result<(), Error> {
        let Overlay { merged, ext4, image } = self;
        let r = merged.unmount().and(ext4.unmount());
        drop(image);
        r
    }
}

/// How the overlay rows describe the layout.
pub const OVERLAY_SETUP: &str = "overlayfs (the file in the lower dir, copied up by the first write job) on ext4 on a loop device with direct I/O over a sparse file on the host's ext4";
