//! Where volumes keep their bytes: one [`Storage`] per kind of storage, each
//! in its own module, as the block store's backends are. The driver picks one
//! per record ([`crate::driver::Driver`]'s `storage`) and otherwise never looks
//! at a volume's kind to decide how to make, attach, grow or remove it.
//!
//! * [`pooled`]: `block` and `file` volumes, and every CSI snapshot, are
//!   devices of the one pool that rootfs snapshots use too, so GetCapacity and
//!   a full pool mean the same for both APIs.
//! * [`dir`]: `dir` volumes are directories with an XFS project quota on a
//!   filesystem of their own.

mod dir;
mod pooled;

use std::path::PathBuf;

use thinbox_blockstore::{Bytes, CreateSpec, DeviceId, DeviceRecord, Engine, FsType};

use crate::error::Result;
use crate::state::{Snapshot, Volume};

pub(crate) use dir::DirStorage;
pub(crate) use pooled::Pooled;

/// A new volume or snapshot, as its storage sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct New<'a> {
    pub id: &'a str,
    pub size: Bytes,
    /// Filesystem the host makes (`None`: raw block, a guest formats it, or
    /// content from `origin`).
    pub fs: Option<FsType>,
    /// The device whose content it starts from (a snapshot's or a clone's source).
    pub origin: Option<DeviceId>,
    /// The project id of a `dir` volume.
    pub project: Option<u32>,
}

/// What a record holds of its storage.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Held<'a> {
    pub id: &'a str,
    pub size: Bytes,
    pub device: Option<DeviceId>,
    pub project: Option<u32>,
}

impl Volume {
    pub(crate) fn held(&self) -> Held<'_> {
        Held { id: &self.id, size: self.size, device: self.device, project: self.project }
    }
}

impl Snapshot {
    pub(crate) fn held(&self) -> Held<'_> {
        Held { id: &self.id, size: self.size, device: self.device, project: None }
    }
}

/// What a publication hands on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    /// A block device node (mounted, bind-mounted or passed to a guest).
    Device,
    /// A directory (bind-mounted; shared over virtio-fs into a guest).
    Directory,
}

/// One kind of storage. Creation and deletion follow the block engine's
/// intent discipline ([`thinbox_blockstore::Creation`]): a pool device is
/// planned in the transaction that writes the driver's record, built after
/// it, and marked ready with the record; reconciliation finishes or rolls
/// back what a crash cut short.
pub(crate) trait Storage: std::fmt::Debug + Send + Sync {
    /// What its publications hand on.
    fn shape(&self) -> Shape;

    /// Whether it has snapshots and clones.
    fn snapshots(&self) -> bool;

    /// Room for a new volume now, after the pool's reserve.
    fn capacity(&self) -> Result<u64>;

    /// Refuses (RESOURCE_EXHAUSTED) a new volume of `size` it cannot take.
    fn admit(&self, size: Bytes) -> Result<()>;

    /// The pool device `new` needs, if it lives in the pool.
    fn spec(&self, new: &New<'_>) -> Option<CreateSpec>;

    /// Makes it, after the intent is committed (`device`: what was planned).
    fn build(&self, engine: &Engine, new: &New<'_>, device: Option<&DeviceRecord>) -> Result<()>;

    /// The node a publication uses (a device node or a directory), attached if need be.
    fn attach(&self, held: &Held<'_>) -> Result<PathBuf>;

    /// Lets go of what [`Storage::attach`] took, once nothing publishes it.
    fn detach(&self, held: &Held<'_>) -> Result<()>;

    /// Grows it to `size` (above `held.size`), live if it is in use; a
    /// filesystem inside is the node's to grow.
    fn grow(&self, held: &Held<'_>, size: Bytes) -> Result<()>;

    /// Bytes it holds on the node.
    fn allocated(&self, held: &Held<'_>) -> Result<u64>;

    /// What is wrong with a published volume's storage, if anything.
    fn condition(&self, held: &Held<'_>) -> Option<String>;

    /// Removes what it holds outside the pool (a pool device is the engine's
    /// to delete).
    fn remove(&self, held: &Held<'_>) -> Result<()>;

    /// At start-up: removes what it holds for no record (`known` ids).
    fn sweep(&self, known: &std::collections::HashSet<String>) -> Result<()>;

    /// On exit with `release`: lets go of what it mounted for itself.
    fn release(&self) -> Result<()>;
}
