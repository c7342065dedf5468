//! `block` and `file` volumes and CSI snapshots: devices of the one pool (a
//! thin device on dm-thin, a reflinked image on a loop device otherwise).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use thinbox_blockstore::redb::WriteTransaction;
use thinbox_blockstore::{Access, Bytes, CreateSpec, DeviceId, DeviceState, Devices, Engine, FsType, Pool};

use super::{Held, New, Shape, Storage};
use crate::error::{Error, Result};

/// Devices of the engine's pool.
#[derive(Debug)]
pub(crate) struct Pooled {
    engine: Arc<Engine>,
    /// The filesystem recorded for a raw block volume's device.
    default_fs: FsType,
}

impl Pooled {
    pub(crate) fn new(engine: Arc<Engine>, default_fs: FsType) -> Pooled {
        Pooled { engine, default_fs }
    }

    fn pool(&self) -> &Pool {
        self.engine.pool()
    }

    fn device(held: &Held<'_>) -> Result<DeviceId> {
        held.device.ok_or_else(|| Error::NotFound(format!("volume {} has no device", held.id)))
    }
}

impl Storage for Pooled {
    fn shape(&self) -> Shape {
        Shape::Device
    }

    fn snapshots(&self) -> bool {
        true
    }

    fn capacity(&self) -> Result<u64> {
        let st = self.pool().status()?;
        Ok(st.free.get().saturating_sub(st.reserve.get()))
    }

    fn plan(&self, txn: &WriteTransaction, new: &New<'_>) -> Result<Option<DeviceId>> {
        // A device without a filesystem (raw block) still records one: the
        // backend formats nothing when it is a copy, and `default_fs` when not.
        let spec = CreateSpec { size: new.size, origin: new.origin, fs: new.fs.unwrap_or(self.default_fs), access: None };
        Ok(Some(self.pool().plan_create(&mut Devices::open(txn)?, spec)?.id))
    }

    fn build(&self, new: &New<'_>, device: Option<DeviceId>) -> Result<()> {
        let id = device.ok_or_else(|| Error::NotFound(format!("volume {} has no device", new.id)))?;
        let rec = self.pool().store().device(id)?.ok_or_else(|| Error::NotFound(format!("device {id} of {}", new.id)))?;
        self.pool().build(&rec)?;
        Ok(())
    }

    fn ready(&self, txn: &WriteTransaction, device: Option<DeviceId>) -> Result<()> {
        if let Some(dev) = device {
            let mut devs = Devices::open(txn)?;
            let mut r = devs.require(dev)?;
            r.state = DeviceState::Ready;
            devs.put(&r)?;
        }
        Ok(())
    }

    fn attach(&self, held: &Held<'_>) -> Result<PathBuf> {
        Ok(self.pool().activate(Self::device(held)?, Access::ReadWrite)?)
    }

    fn detach(&self, held: &Held<'_>) -> Result<()> {
        Ok(self.pool().release(Self::device(held)?)?)
    }

    fn grow(&self, held: &Held<'_>, size: Bytes) -> Result<()> {
        self.pool().resize(Self::device(held)?, size)?;
        Ok(())
    }

    fn allocated(&self, held: &Held<'_>) -> Result<u64> {
        let id = Self::device(held)?;
        let rec = self.pool().store().device(id)?.ok_or_else(|| Error::NotFound(format!("device {id} of {}", held.id)))?;
        Ok(self.pool().usage(&rec)?.bytes.get())
    }

    fn plan_remove(&self, txn: &WriteTransaction, held: &Held<'_>) -> Result<()> {
        let Some(dev) = held.device else { return Ok(()) };
        let mut devs = Devices::open(txn)?;
        if devs.get(dev)?.is_some() {
            self.pool().plan_delete(&mut devs, dev)?;
        }
        Ok(())
    }

    fn remove(&self, held: &Held<'_>) -> Result<()> {
        // The kernel work is the deleter's: DeleteVolume does not wait for it,
        // and a crash leaves the `Deleting` device to reconciliation.
        if let Some(dev) = held.device {
            self.engine.deleter().push(dev);
        }
        Ok(())
    }

    fn sweep(&self, _known: &HashSet<String>) -> Result<()> {
        // Devices no record names are the engine's reconciliation's.
        Ok(())
    }

    fn release(&self) -> Result<()> {
        // The pool is the engine's, released by its owner.
        Ok(())
    }
}
