//! The block engine every front end shares: one [`Pool`] (one store, one
//! flock on the root), one gate, one background [`Deleter`], and one
//! reconciliation over the records of every consumer of the pool.
//!
//! A front end (the snapshotter's snapshots, the CSI driver's volumes) keeps
//! its own records in its own tables of the pool's store and registers a
//! [`Consumer`] that says which devices those records reference. The pool
//! deletes a device only when no consumer references it, so front ends never
//! reconcile the pool on their own: a reconciliation that saw one front end's
//! records would delete the other's devices.
//!
//! The gate: every operation that plans or builds devices holds it shared
//! ([`Engine::shared`]); reconciliation, `check` and shutdown hold it alone, so
//! they never mistake an operation in flight for a leftover. The deleter holds
//! it shared around each destroy.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};

use redb::WriteTransaction;

use crate::config::PoolConfig;
use crate::deleter::Deleter;
use crate::error::{Error, Result};
use crate::pool::{Pool, ReconcileReport, Repair};
use crate::units::DeviceId;

/// How long a retry for space waits at most for deleted devices' space to show.
const FREED_SPACE_WAIT: Duration = Duration::from_secs(2);

/// The wait before reconciling again after the `n`-th reconciliation in a row
/// (1-based) that did not converge: soon at first, for a cause that clears by
/// itself, then every ten minutes.
fn retry_after(n: u32) -> Duration {
    Duration::from_secs(1 << n.saturating_sub(1).min(10)).min(Duration::from_secs(600))
}

/// Reconciliations in a row that did not converge, and when the next is due.
#[derive(Debug, Default)]
struct Retry {
    failures: u32,
    due: Option<Instant>,
}

impl Retry {
    fn note(&mut self, converged: bool, now: Instant) {
        *self = if converged {
            Retry::default()
        } else {
            let failures = self.failures.saturating_add(1);
            Retry { failures, due: Some(now + retry_after(failures)) }
        };
    }

    fn is_due(&self, now: Instant) -> bool {
        self.due.is_some_and(|t| t <= now)
    }
}

/// Settings key: every consumer that ever opened this root.
const CONSUMERS: &str = "consumers";

/// A front end whose records reference pool devices.
pub trait Consumer: Send + Sync + std::fmt::Debug {
    /// Stable name, remembered by the root (`snapshots`, `volumes`).
    fn name(&self) -> &'static str;

    /// Inside reconciliation's write transaction (committed only when the
    /// reconciliation applies): drops this consumer's records whose device
    /// never became ready, and returns the devices its remaining records
    /// reference.
    fn settle(&self, txn: &WriteTransaction) -> Result<HashSet<DeviceId>>;
}

/// The shared pool, its gate, deleter and consumers.
#[derive(Debug)]
pub struct Engine {
    pool: Arc<Pool>,
    gate: Arc<RwLock<()>>,
    deleter: Deleter,
    consumers: Vec<Box<dyn Consumer>>,
    retry: Mutex<Retry>,
}

impl Engine {
    /// Opens the pool under `root` for `consumers` and starts the deleter.
    /// Front ends attach next (each undoing its own half-done work that needs
    /// the kernel), then [`Engine::reconcile`] converges the pool with all of
    /// them before anything is served.
    ///
    /// A root remembers every consumer that ever opened it and refuses to open
    /// without one of them: reconciling without its records would delete its
    /// devices.
    pub fn open(root: &Path, cfg: PoolConfig, consumers: Vec<Box<dyn Consumer>>) -> Result<Engine> {
        let pool = Arc::new(Pool::open(root, cfg)?);
        let given: BTreeSet<&str> = consumers.iter().map(|c| c.name()).collect();
        let remembered = pool.store().setting(CONSUMERS)?.unwrap_or_default();
        let remembered: BTreeSet<&str> = remembered.split(',').filter(|s| !s.is_empty()).collect();
        let missing: Vec<&str> = remembered.difference(&given).copied().collect();
        if !missing.is_empty() {
            return Err(Error::Config(format!(
                "{} also holds {} records, which this daemon does not serve: start thinboxd on it",
                root.display(),
                missing.join(" and ")
            )));
        }
        let all: Vec<&str> = remembered.union(&given).copied().collect();
        pool.store().set_setting(CONSUMERS, &all.join(","))?;
        let gate = Arc::new(RwLock::new(()));
        let deleter = Deleter::start(pool.clone(), gate.clone()).map_err(Error::io("start the deleter thread for", root))?;
        Ok(Engine { pool, gate, deleter, consumers, retry: Mutex::default() })
    }

    /// The device pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The background deleter (a front end pushes the devices it marked `Deleting`).
    pub fn deleter(&self) -> &Deleter {
        &self.deleter
    }

    /// The gate, shared: hold it for the whole of an operation.
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The gate, shared, if that need not wait.
    pub fn try_shared(&self) -> Option<RwLockReadGuard<'_, ()>> {
        match self.gate.try_read() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Runs `op`; when it fails for space (`is_full`) while deletions are
    /// pending, or finished while it ran, waits for the deleter and runs it
    /// once more: a client that deletes to make room must not fail because
    /// the deletion is deferred. The caller must not hold the gate.
    pub fn with_room<T, E: std::fmt::Display>(&self, is_full: impl Fn(&E) -> bool, mut op: impl FnMut() -> Result<T, E>) -> Result<T, E> {
        let before = self.deleter.progress();
        match op() {
            Err(e) if is_full(&e) => {
                let now = self.deleter.progress();
                if before.pending == 0 && now.pending == 0 && now.finished == before.finished {
                    return Err(e);
                }
                tracing::info!(pending = now.pending, error = %e, "pool full while deletions are pending; waiting for them, then retrying once");
                self.deleter.wait_idle();
                self.wait_for_freed_space();
                op()
            }
            other => other,
        }
    }

    /// Waits (at most [`FREED_SPACE_WAIT`]) until the pool's free space is
    /// above its reserve: a filesystem may release a deleted image's blocks a
    /// moment after the unlink (XFS frees unlinked inodes in the background),
    /// so the deleter being done does not yet mean the space is.
    fn wait_for_freed_space(&self) {
        let deadline = Instant::now() + FREED_SPACE_WAIT;
        while Instant::now() < deadline {
            match self.pool.status() {
                Ok(st) if st.free < st.reserve => std::thread::sleep(Duration::from_millis(20)),
                _ => return,
            }
        }
    }

    /// containerd's `Cleanup` ("reclaim what removed snapshots hold, now"):
    /// runs the queued deletions at once and waits for them. Only when one
    /// is left behind (it failed and waits for a retry, or was given up)
    /// does it take a full reconciliation, which finishes it. containerd
    /// calls this after every garbage collection that removed snapshots,
    /// while the next containers start, so the usual case must not walk
    /// every record and file of the pool under the exclusive gate, which
    /// would stall their Prepares; that audit is start-up's and
    /// `thinboxctl gc`'s. A device that reconciliation cannot delete either
    /// fails the call: its space is not back.
    pub fn finish_deletions(&self) -> Result<ReconcileReport> {
        let left = self.deleter.wait_idle();
        if left == 0 {
            return Ok(ReconcileReport::default());
        }
        tracing::info!(left, "deletions left behind; reconciling");
        let report = self.reconcile()?;
        let undeleted: Vec<_> = report.failed.iter().filter(|f| f.repair == Repair::Remove).collect();
        match undeleted.first() {
            Some(f) => Err(Error::NotDeleted { count: undeleted.len(), id: f.id, error: f.error.clone() }),
            None => Ok(report),
        }
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Converges the pool with every consumer's records: half-done records
    /// are dropped, devices nobody references (and those marked `Deleting`)
    /// destroyed, stray files and loops removed, active devices re-attached.
    /// At start, and on request (`Cleanup`, `thinboxctl gc`): it finishes
    /// every pending deletion synchronously.
    pub fn reconcile(&self) -> Result<ReconcileReport> {
        let result = self.reconcile_once();
        self.retry().note(result.as_ref().is_ok_and(ReconcileReport::converged), Instant::now());
        result
    }

    fn reconcile_once(&self) -> Result<ReconcileReport> {
        let _g = self.exclusive();
        let report = self.converge(true)?;
        // Reconciliation destroyed every device not `Ready`, so every queued
        // one, except those still open or that it failed to remove: they go
        // back to the deleter.
        self.deleter.forget_all();
        for &id in &report.held {
            self.deleter.push_held(id);
        }
        for f in report.failed.iter().filter(|f| f.repair == Repair::Remove) {
            self.deleter.push_failed(f.id);
        }
        if report.unrepaired() {
            tracing::warn!(?report, "reconciled, but some devices or orphans could not be repaired");
        } else {
            tracing::info!(?report, "reconciled");
        }
        Ok(report)
    }

    /// Reconciles again if the last reconciliation did not converge (it
    /// failed, left devices or orphans it could not repair, or kept an orphan
    /// still open) and its retry is due: a cause that goes away by itself (a
    /// full loop table, an I/O error, an operator's `chattr`, a VMM letting go)
    /// must not leave a device unattached, or its space taken, until someone
    /// runs `thinboxctl gc` or the daemon restarts. Retries back off from 1 s
    /// to every ten minutes; any reconciliation that converges ends them.
    /// `None` if none was due. The daemon's maintenance loop calls this.
    pub fn heal(&self) -> Option<Result<ReconcileReport>> {
        let attempt = {
            let retry = self.retry();
            if !retry.is_due(Instant::now()) {
                return None;
            }
            retry.failures
        };
        tracing::info!(attempt, "reconciling again: the last reconciliation did not converge");
        Some(self.reconcile())
    }

    fn retry(&self) -> MutexGuard<'_, Retry> {
        self.retry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What [`Engine::reconcile`] would do, changing nothing; also devices
    /// whose storage is missing. Deletions in progress are waited for first,
    /// so what it reports was left behind, not merely not yet done (except a
    /// delete arriving in between, and deletions waiting for a retry).
    pub fn check(&self) -> Result<ReconcileReport> {
        self.deleter.wait_idle();
        let _g = self.exclusive();
        self.converge(false)
    }

    fn converge(&self, apply: bool) -> Result<ReconcileReport> {
        let txn = self.pool.store().write()?;
        let mut referenced = HashSet::new();
        for c in &self.consumers {
            referenced.extend(c.settle(&txn)?);
        }
        if !apply {
            txn.abort()?;
            return self.pool.check(&referenced);
        }
        txn.commit()?;
        self.pool.reconcile(&referenced)
    }

    /// Called on exit. The deleter stops after the device in hand; devices
    /// still queued stay marked `Deleting` and the next start finishes them,
    /// the same path as after a crash. Draining instead could hold a stop for
    /// minutes (a thin delete costs up to hundreds of milliseconds) and buys
    /// no safety. With `release`, loops are detached and the embedded pool
    /// unmounted.
    pub fn shutdown(&self, release: bool) -> Result<()> {
        let left = self.deleter.stop();
        if left > 0 {
            tracing::info!(devices = left, "pending deletions left for the next start");
        }
        let _g = self.exclusive();
        // Deletes the deleter did not get to are made durable too.
        self.pool.store().persist()?;
        self.pool.shutdown(release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_ten_minutes_and_a_converged_pass_ends_them() {
        let t0 = Instant::now();
        let mut r = Retry::default();
        assert!(!r.is_due(t0 + Duration::from_secs(3600)), "nothing to retry");
        r.note(false, t0);
        assert!(!r.is_due(t0) && r.is_due(t0 + Duration::from_secs(1)));
        let waits: Vec<u64> = (1..=12).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        r.note(false, t0);
        assert_eq!((r.failures, r.due), (2, Some(t0 + Duration::from_secs(2))));
        r.note(true, t0);
        assert!(!r.is_due(t0 + Duration::from_secs(3600)));
        assert_eq!(r.failures, 0);
        assert_eq!(retry_after(u32::MAX), Duration::from_secs(600));
    }
}
