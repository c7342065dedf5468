//! `block` and `file` volumes and CSI snapshots: devices of the one pool (a
//! thin device on dm-thin, a reflinked image on a loop device otherwise).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use thinbox_blockstore::{Access, Bytes, CreateSpec, DeviceId, DeviceRecord, Engine, Pool};

use super::{Held, New, Shape, Storage};
use crate::error::{Error, Result};

/// Devices of the engine's pool.
#[derive(Debug)]
pub(crate) struct Pooled {
    engine: Arc<Engine>,
}

impl Pooled {
    pub(crate) fn new(engine: Arc<Engine>) -> Pooled {
        Pooled { engine }
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

    fn admit(&self, size: Bytes) -> Result<()> {
        // Devices are thin, like rootfs snapshots: a volume may be larger
        // than the room left now (the pool itself refuses new devices once
        // it is below its reserve), but never larger than the pool can be.
        let st = self.pool().status()?;
        let most = st.total.max(self.pool().config().max_size.unwrap_or_default());
        if size > most {
            return Err(Error::ResourceExhausted(format!("a {size} volume is larger than this node's pool ({most})")));
        }
        Ok(())
    }

    fn spec(&self, new: &New<'_>) -> Option<CreateSpec> {
        // A copy keeps its origin's filesystem; a raw block volume, or one a
        // guest formats, starts unformatted (zeros).
        Some(CreateSpec { size: new.size, origin: new.origin, fs: new.fs, access: None })
    }

    fn build(&self, engine: &Engine, new: &New<'_>, device: Option<&DeviceRecord>) -> Result<()> {
        let rec = device.ok_or_else(|| Error::NotFound(format!("volume {} has no device", new.id)))?;
        engine.pool().build(rec)?;
        Ok(())
    }

    fn attach(&self, held: &Held<'_>) -> Result<PathBuf> {
        Ok(self.pool().activate(Self::device(held)?, Access::ReadWrite)?)
    }

    fn detach(&self, held: &Held<'_>) -> Result<()> {
        Ok(self.pool().release(Self::device(held)?)?)
    }

    fn grow(&self, held: &Held<'_>, size: Bytes) -> Result<()> {
        self.admit(size)?;
        self.pool().resize(Self::device(held)?, size)?;
        Ok(())
    }

    fn allocated(&self, held: &Held<'_>) -> Result<u64> {
        let id = Self::device(held)?;
        let rec = self.pool().store().device(id)?.ok_or_else(|| Error::NotFound(format!("device {id} of {}", held.id)))?;
        Ok(self.pool().usage(&rec)?.bytes.get())
    }

    fn condition(&self, held: &Held<'_>) -> Option<String> {
        let Some(id) = held.device else { return Some("it has no device".into()) };
        match self.pool().store().device(id) {
            Ok(Some(_)) if self.pool().node(id).is_some() => None,
            Ok(Some(_)) => Some(format!("its device {id} is not attached")),
            Ok(None) => Some(format!("its device {id} is gone from the pool")),
            Err(e) => Some(format!("its device {id} cannot be read: {}", crate::error::chain(&e))),
        }
    }

    fn remove(&self, _held: &Held<'_>) -> Result<()> {
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
