//! The intent discipline, written once for every front end. Making
//! something (a snapshot's device, a volume's device or directory) takes
//! three steps, each a transaction that carries the front end's record and
//! the pool device's record together:
//!
//! 1. intent: the front end's record and the device's (`Creating`), before
//!    the kernel or disk is touched;
//! 2. build: the kernel and disk work; if it fails, the record goes and the
//!    device is marked `Deleting` (one transaction) for the deleter;
//! 3. ready: the front end's record and the device marked ready.
//!
//! A crash between steps leaves a device that is not `Ready` (or a front end
//! record that says it is being made), which reconciliation rolls back; or,
//! as the intent is flushed only with the ready commit, no record at all, and
//! reconciliation removes what the build made as unknown storage.
//! Deletion is the reverse: the record goes (or is marked) and the device is
//! marked `Deleting` in one transaction ([`Engine::plan_forget`]), and the
//! deleter destroys it after the commit ([`Engine::forget`]).

use std::path::PathBuf;

use redb::WriteTransaction;

use crate::engine::Engine;
use crate::error::Error;
use crate::fault;
use crate::pool::CreateSpec;
use crate::store::{DeviceRecord, DeviceState, Devices};
use crate::units::DeviceId;

/// Fault-injection points after each step of a creation, for crash tests.
#[derive(Clone, Copy, Debug)]
pub struct Points {
    pub after_intent: &'static str,
    pub after_build: &'static str,
    pub after_ready: &'static str,
}

/// A front end's part in making one thing (with one pool device, several,
/// as a group snapshot has, or none).
pub trait Creation {
    /// The front end's error.
    type Error: From<Error> + std::fmt::Display;

    /// Intent, first: checks against the store and says which devices to
    /// plan (none: the thing has no pool device, a directory say).
    fn plan(&mut self, txn: &WriteTransaction) -> Result<Vec<CreateSpec>, Self::Error>;

    /// Intent, then: the front end's record, naming the planned devices
    /// (in the order planned).
    fn record(&mut self, txn: &WriteTransaction, devices: &[DeviceRecord]) -> Result<(), Self::Error>;

    /// Build: the kernel and disk work; returns the device node if attached.
    fn build(&mut self, engine: &Engine, devices: &[DeviceRecord]) -> Result<Option<PathBuf>, Self::Error>;

    /// After a failed build, in the transaction that marks the device for
    /// deletion: the record goes (and what the build made outside the pool).
    fn undo(&mut self, txn: &WriteTransaction) -> Result<(), Self::Error>;

    /// Ready, in the transaction that marks the device ready: the record too.
    fn ready(&mut self, txn: &WriteTransaction) -> Result<(), Self::Error>;
}

impl Engine {
    /// Makes `what` under the intent discipline (see the module's docs) and
    /// returns the device node its build attached. Hold the gate shared.
    pub fn create<C: Creation>(&self, what: &mut C, points: Points) -> Result<Option<PathBuf>, C::Error> {
        let pool = self.pool();
        // The intent is not flushed on its own: the ready commit makes it
        // durable with itself (one fsync of the store less). A crash before
        // that may lose it; reconciliation then finds what the build made
        // unknown and removes it: the creation did not happen, as when a
        // crash rolls an intent back.
        let txn = pool.store().write_lazy()?;
        let specs = what.plan(&txn)?;
        let devices = {
            let mut devs = Devices::open(&txn)?;
            specs.into_iter().map(|spec| pool.plan_create(&mut devs, spec)).collect::<crate::Result<Vec<_>>>()?
        };
        what.record(&txn, &devices)?;
        txn.commit().map_err(Error::from)?;
        fault::point(points.after_intent);
        let ids: Vec<DeviceId> = devices.iter().map(|d| d.id).collect();
        let node = match what.build(self, &devices) {
            Ok(node) => node,
            Err(e) => {
                if let Err(u) = self.undo(what, &ids) {
                    tracing::warn!(devices = ?ids, error = %u, "undoing a failed creation; left for reconciliation");
                }
                return Err(e);
            }
        };
        fault::point(points.after_build);
        if let Err(e) = self.mark_ready(what, &ids) {
            // The intent is visible (if not durable): the caller hears of a
            // failure, so nothing of the creation may stay.
            if let Err(u) = self.undo(what, &ids) {
                tracing::warn!(devices = ?ids, error = %u, "undoing a creation whose ready commit failed; left for reconciliation");
            }
            return Err(e);
        }
        fault::point(points.after_ready);
        Ok(node)
    }

    fn mark_ready<C: Creation>(&self, what: &mut C, ids: &[DeviceId]) -> Result<(), C::Error> {
        let txn = self.pool().store().write()?;
        {
            let mut devs = Devices::open(&txn)?;
            for &id in ids {
                let mut r = devs.require(id)?;
                r.state = DeviceState::Ready;
                devs.put(&r)?;
            }
        }
        what.ready(&txn)?;
        txn.commit().map_err(Error::from)?;
        Ok(())
    }

    fn undo<C: Creation>(&self, what: &mut C, devices: &[DeviceId]) -> Result<(), C::Error> {
        let txn = self.pool().store().write()?;
        what.undo(&txn)?;
        for &id in devices {
            self.plan_forget(&txn, id)?;
        }
        txn.commit().map_err(Error::from)?;
        for &id in devices {
            self.forget(id);
        }
        Ok(())
    }

    /// Deletion, in the transaction that removes (or marks) the front end's
    /// record: the device is marked `Deleting`, if it still has a record.
    pub fn plan_forget(&self, txn: &WriteTransaction, id: DeviceId) -> crate::Result<()> {
        let mut devs = Devices::open(txn)?;
        if devs.get(id)?.is_some() {
            self.pool().plan_delete(&mut devs, id)?;
        }
        Ok(())
    }

    /// Deletion, after that transaction's commit: the deleter destroys the
    /// device in the background (a crash leaves it to reconciliation).
    pub fn forget(&self, id: DeviceId) {
        self.deleter().push(id);
    }
}
