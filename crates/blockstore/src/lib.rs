//! Thinbox's block engine: a pool of copy-on-write block devices and the
//! crash-safe metadata that describes them.
//!
//! # Lifecycle
//! 1. [`Pool::open`] opens the metadata store (`<root>/meta.redb`), mounts the
//!    embedded pool image when no pool directory is configured, and learns which
//!    loop devices already belong to the pool.
//! 2. The front end drops its own half-done records, then calls
//!    [`Pool::reconcile`] with the device ids it still references: half-created
//!    devices are rolled back, half-deleted ones finished, unreferenced ones and
//!    stray files and loops removed, active devices re-attached after a reboot.
//! 3. Each change is two-phased. In one write transaction the front end changes
//!    its own records and the device records ([`Pool::plan_create`],
//!    [`Pool::plan_delete`], or a record's `access`); after commit, the pool
//!    makes the kernel match ([`Pool::build`], [`Pool::deactivate`],
//!    [`Pool::destroy`]). A crash between the two leaves a record that step 2
//!    converges.
//!
//! # Backends
//! The kernel side sits behind the [`Backend`] trait. [`Reflink`] keeps each
//! device as a sparse image on XFS (`reflink=1`) or btrfs: a snapshot is a
//! `FICLONE`, an active device a loop device with direct I/O. [`DmThin`] keeps
//! each device as a thin device of a kernel thin pool (`create_snap` of an
//! inactive origin). `auto` picks dm-thin where the kernel has device-mapper.

mod backend;
mod config;
mod deleter;
mod dmthin;
pub mod embedded;
mod engine;
mod error;
pub mod fault;
mod fs;
pub mod image;
mod intent;
mod loops;
pub mod mountinfo;
mod pool;
mod reflink;
mod store;
mod sys;
mod types;
mod units;

pub use backend::{Backend, Inventory, Orphan, OrphanFailure, PoolStatus, Space, Sweep, Usage};
pub use config::{PoolConfig, ThinConfig};
pub use deleter::{Deleter, Progress};
pub use dmthin::DmThin;
pub use engine::{Consumer, Engine};
pub use error::{Error, ErrorKind, Result, is_no_space, store_out_of_space};
pub use fs::{FsSpace, freeze, run as run_tool, space};
pub use intent::{Creation, Points};
pub use loops::{BoundLoop, scan as scan_loops};
pub use pool::{CreateSpec, DeviceFailure, Pool, ReconcileReport, Repair, inventory};
pub use redb;
pub use reflink::Reflink;
pub use store::{DeviceRecord, DeviceState, Devices, Store};
pub use types::{Access, BackendKind, FsType};
pub use units::{Bytes, DeviceId, ParseBytesError};
