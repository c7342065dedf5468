//! Background deletion of removed devices, for every front end.
//!
//! A front end's delete (a snapshot's `Remove`, a volume's `DeleteVolume`)
//! commits the record's removal and the device's `Deleting` mark in one
//! transaction, hands the device id to the [`Deleter`] and returns: the client
//! only needs the record gone, and the kernel work (detach, discard, the thin
//! pool's `delete`, or unlinking an image) costs milliseconds to hundreds of
//! milliseconds. One worker thread destroys the queued devices one at a time,
//! each under the engine's shared gate, so the exclusive paths (`Cleanup`,
//! `check`, shutdown) never see a half-done destroy.
//!
//! The queue is only a hint: the `Deleting` mark in the store is what counts.
//! A crash, a stop, or a deletion that keeps failing leaves the device marked,
//! and reconciliation (every start, `Cleanup`, `thinboxctl gc`) finishes it. So
//! the worker checks the mark before each destroy and skips devices that are
//! already gone. Device ids (and so thin ids) come from a counter that never
//! goes back, so a device still being deleted never shares its id with a new one.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::pool::Pool;
use crate::store::DeviceState;
use crate::units::DeviceId;

/// Attempts per device before it is left to reconciliation.
const ATTEMPTS: u32 = 4;

/// A fresh deletion waits until Removes have paused this long, so that a
/// burst of Removes (containerd's garbage collector removing an image's
/// layers) is answered before the kernel work starts competing for the CPU...
const QUIET: Duration = Duration::from_millis(20);

/// ...but never longer than this after its Remove.
const MAX_DEFER: Duration = Duration::from_secs(1);

/// The deleter thread's nice value: deletion yields the CPU to requests.
const NICE: i32 = 10;

/// Wait before the retry that follows the `n`-th failure (1-based).
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(match failures {
        1 => 1,
        2 => 10,
        _ => 60,
    })
}

/// A device waiting for its (next) attempt.
#[derive(Clone, Copy, Debug)]
struct Job {
    id: DeviceId,
    /// Failed attempts so far.
    failures: u32,
    /// When its Remove queued it.
    queued: Instant,
    /// After a failure: when to retry.
    retry_at: Option<Instant>,
    /// Its last attempt found it still open (a VMM holding it): it is
    /// retried until its holder lets go, and is nobody's work to wait for.
    held: bool,
}

#[derive(Debug, Default)]
struct Queue {
    /// In the order they were removed; retries go to the back.
    jobs: VecDeque<Job>,
    /// The device being destroyed right now.
    busy: Option<DeviceId>,
    /// Devices finished so far (destroyed, or found done by someone else).
    finished: u64,
    /// Devices queued so far: Removes up to this count have committed.
    pushed: u64,
    /// Devices given up after [`ATTEMPTS`] failures since the last
    /// reconciliation: still marked `Deleting`, in no queue.
    given_up: usize,
    /// When the last device was queued.
    last_push: Option<Instant>,
    /// Callers waiting for the queue to drain: fresh jobs are due at once.
    hurry: usize,
    /// While the worker sleeps: until when (`None`: until woken).
    asleep: Option<Option<Instant>>,
    stop: bool,
}

impl Queue {
    /// When a job may run: a retry at its time; a fresh job once Removes
    /// have paused for [`QUIET`] (at once if someone waits for the queue),
    /// but no later than [`MAX_DEFER`] after its Remove.
    fn due(&self, j: &Job) -> Instant {
        match j.retry_at {
            Some(t) => t,
            None if self.hurry > 0 => j.queued,
            None => self.last_push.map_or(j.queued, |t| t + QUIET).min(j.queued + MAX_DEFER),
        }
    }

    /// The first job whose time has come, taken out of the queue.
    fn take_due(&mut self, now: Instant) -> Option<Job> {
        let i = self.jobs.iter().position(|j| self.due(j) <= now)?;
        self.jobs.remove(i)
    }

    /// When the next job is due.
    fn next_due(&self) -> Option<Instant> {
        self.jobs.iter().map(|j| self.due(j)).min()
    }

    /// Whether the worker must be woken for a fresh job: only if it sleeps
    /// past the job's time. A burst of Removes only postpones the worker, and
    /// waking a thread per Remove would cost more than the Remove itself
    /// where thread switches are dear (UML, loaded hosts).
    fn must_wake_for(&self, j: &Job) -> bool {
        self.asleep.is_some_and(|until| until.is_none_or(|t| self.due(j) < t))
    }

    /// Work that a caller draining the queue waits for: the device in hand
    /// and every job not held back by a failure.
    fn runnable(&self) -> bool {
        self.busy.is_some() || self.jobs.iter().any(|j| j.retry_at.is_none())
    }
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where deletion stands; see [`Deleter::progress`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Devices queued, in hand, or waiting for a retry.
    pub pending: usize,
    /// Devices finished since start (grows only).
    pub finished: u64,
}

/// The queue of devices to delete and its worker thread.
#[derive(Debug)]
pub struct Deleter {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Deleter {
    /// Starts the worker. It takes `gate` shared around each destroy.
    pub fn start(pool: Arc<Pool>, gate: Arc<RwLock<()>>) -> std::io::Result<Deleter> {
        let shared = Arc::new(Shared::default());
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new().name("deleter".into()).spawn(move || work(&shared, &pool, &gate))?
        };
        Ok(Deleter { shared, worker: Mutex::new(Some(worker)) })
    }

    /// Queues a device whose record is already marked `Deleting` (committed,
    /// durably or not: the worker makes it durable before it deletes).
    pub fn push(&self, id: DeviceId) {
        self.enqueue(Job { id, failures: 0, queued: Instant::now(), retry_at: None, held: false });
    }

    /// Queues a device that reconciliation found still open, for a retry
    /// after [`backoff`]`(1)` and on from there as after a failed attempt.
    pub fn push_held(&self, id: DeviceId) {
        self.retry(id, true);
    }

    /// Queues a device that reconciliation failed to delete, as a deletion
    /// that failed once: left behind (so containerd's `Cleanup` reconciles
    /// again) until it goes or is given up.
    pub fn push_failed(&self, id: DeviceId) {
        self.retry(id, false);
    }

    /// Unless the worker has the device in hand (taken before
    /// [`Deleter::forget_all`], waiting for the gate): that job queues itself
    /// again if it fails.
    fn retry(&self, id: DeviceId, held: bool) {
        if self.shared.lock().busy == Some(id) {
            return;
        }
        let now = Instant::now();
        self.enqueue(Job { id, failures: u32::from(!held), queued: now, retry_at: Some(now + backoff(1)), held });
    }

    fn enqueue(&self, job: Job) {
        let mut q = self.shared.lock();
        q.jobs.push_back(job);
        if job.retry_at.is_none() {
            q.pushed += 1;
            q.last_push = Some(job.queued);
        }
        let wake = q.must_wake_for(&job);
        drop(q);
        if wake {
            self.shared.changed.notify_all();
        }
    }

    /// How many deletions are pending, and how many finished so far.
    pub fn progress(&self) -> Progress {
        let q = self.shared.lock();
        Progress { pending: q.jobs.len() + usize::from(q.busy.is_some()), finished: q.finished }
    }

    /// Blocks until the worker has nothing left that it can do now (devices
    /// waiting for a retry after a failure are not waited for) or has stopped,
    /// and returns how many deletions are left behind: waiting for a retry,
    /// given up since the last reconciliation, or queued when it stopped. A
    /// device still open is not left behind: it is retried until let go, and
    /// reconciling again would find it as open.
    /// The caller must not hold the gate: the worker needs it.
    pub fn wait_idle(&self) -> usize {
        let mut q = self.shared.lock();
        q.hurry += 1;
        self.shared.changed.notify_all();
        while q.runnable() && !q.stop {
            q = self.shared.changed.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        q.hurry -= 1;
        q.jobs.iter().filter(|j| !j.held).count() + q.given_up
    }

    /// Forgets every queued device: reconciliation has just finished them all
    /// (the caller holds the gate exclusively; a device the worker already
    /// took waits for the gate and is then found done).
    pub fn forget_all(&self) {
        let mut q = self.shared.lock();
        let n = q.jobs.len() as u64;
        q.jobs.clear();
        q.finished += n;
        q.given_up = 0;
        drop(q);
        self.shared.changed.notify_all();
    }

    /// Stops the worker after the device in hand, if any, and returns how many
    /// deletions were left: they stay marked `Deleting` in the store, and the
    /// next start's reconciliation finishes them, exactly as after a crash.
    /// Idempotent. The caller must not hold the gate.
    pub fn stop(&self) -> usize {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = worker
            && w.join().is_err()
        {
            tracing::error!("device deleter thread panicked");
        }
        self.shared.lock().jobs.len()
    }
}

impl Drop for Deleter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The worker: takes the next due device, destroys it under the shared gate,
/// books the outcome; sleeps until a push, a due job or stop. Runs at a
/// lower CPU priority than the threads serving requests.
fn work(shared: &Shared, pool: &Pool, gate: &RwLock<()>) {
    // On Linux the nice value is per thread; `None` is the calling thread.
    if let Err(e) = rustix::process::setpriority_process(None, NICE) {
        tracing::debug!(error = %e, "deleter keeps the normal CPU priority");
    }
    // Removes commit without flushing (`Store::write_lazy`); every Remove
    // counted up to here is durable.
    let mut durable = 0;
    loop {
        let (job, pushed) = {
            let mut q = shared.lock();
            loop {
                if q.stop {
                    return;
                }
                let now = Instant::now();
                if let Some(job) = q.take_due(now) {
                    q.busy = Some(job.id);
                    break (job, q.pushed);
                }
                let until = q.next_due();
                q.asleep = Some(until);
                q = match until {
                    Some(t) => shared.changed.wait_timeout(q, t.saturating_duration_since(now)).unwrap_or_else(|p| p.into_inner()).0,
                    None => shared.changed.wait(q).unwrap_or_else(|p| p.into_inner()),
                };
                q.asleep = None;
            }
        };
        let start = Instant::now();
        let result = {
            let _shared_gate = gate.read().unwrap_or_else(|p| p.into_inner());
            // A Remove must be durable before its device is touched: a crash
            // may undo a Remove (the snapshot comes back whole), never leave a
            // snapshot whose device is half gone.
            let persisted = if pushed > durable { pool.store().persist() } else { Ok(()) };
            persisted.and_then(|()| {
                durable = pushed;
                destroy_if_deleting(pool, job.id)
            })
        };
        let mut q = shared.lock();
        q.busy = None;
        match result {
            Ok(()) => {
                tracing::debug!(device = %job.id, elapsed_us = start.elapsed().as_micros() as u64, "device deleted");
                q.finished += 1;
            }
            Err(e) => {
                let failures = job.failures + 1;
                let error = thinbox_daemon::chain(&e);
                // Open (a VMM holding it): deletable once let go, whenever that is.
                let held = matches!(e, crate::Error::DeviceBusy(_));
                if held || failures < ATTEMPTS {
                    let wait = backoff(failures);
                    if held && job.held {
                        tracing::debug!(device = %job.id, failures, retry_in_s = wait.as_secs(), "device still open; will retry");
                    } else {
                        tracing::warn!(device = %job.id, failures, retry_in_s = wait.as_secs(), %error, "deleting device failed; will retry");
                    }
                    q.jobs.push_back(Job { retry_at: Some(Instant::now() + wait), failures, held, ..job });
                } else {
                    tracing::error!(device = %job.id, failures, %error, "deleting device failed; it stays marked deleting until Cleanup or the next start");
                    q.given_up += 1;
                }
            }
        }
        drop(q);
        shared.changed.notify_all();
    }
}

/// Destroys the device if its record still says `Deleting`; a device that
/// reconciliation already finished (record gone) is done.
fn destroy_if_deleting(pool: &Pool, id: DeviceId) -> crate::Result<()> {
    match pool.store().device(id)? {
        Some(rec) if rec.state == DeviceState::Deleting => pool.destroy(id),
        Some(rec) => {
            // Only reconciliation or Remove change a Deleting record, and
            // neither makes it anything else: this would be a bug upstream.
            tracing::error!(device = %id, state = rec.state.as_str(), "device queued for deletion is not marked deleting; left alone");
            Ok(())
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: u64, queued: Instant, retry_at: Option<Instant>) -> Job {
        Job { id: DeviceId(id), failures: u32::from(retry_at.is_some()), queued, retry_at, held: false }
    }

    #[test]
    fn jobs_run_in_order_and_retries_wait_for_their_time() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        let mut q = Queue::default();
        q.jobs.extend([job(1, now, Some(later)), job(2, now, None), job(3, now, None)]);
        assert!(q.runnable());
        assert_eq!(q.take_due(now).map(|j| j.id), Some(DeviceId(2)));
        assert_eq!(q.take_due(now).map(|j| j.id), Some(DeviceId(3)));
        assert!(q.take_due(now).is_none(), "the retry is not due yet");
        assert!(!q.runnable(), "a held-back retry is not work to wait for");
        assert_eq!(q.next_due(), Some(later));
        assert_eq!(q.take_due(later).map(|j| j.id), Some(DeviceId(1)));
        assert_eq!(q.next_due(), None);
        q.busy = Some(DeviceId(1));
        assert!(q.runnable(), "the device in hand is work");
    }

    #[test]
    fn fresh_jobs_wait_for_a_pause_in_removes_but_not_forever_nor_when_someone_waits() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        q.jobs.push_back(job(1, t0, None));
        q.last_push = Some(t0);
        assert!(q.take_due(t0).is_none(), "Removes may still be coming");
        assert_eq!(q.next_due(), Some(t0 + QUIET));
        // Removes keep coming: the first job still runs MAX_DEFER after its own.
        let busy_until = t0 + MAX_DEFER + QUIET;
        q.last_push = Some(busy_until);
        assert_eq!(q.next_due(), Some(t0 + MAX_DEFER));
        assert!(q.take_due(t0 + MAX_DEFER - QUIET).is_none());
        q.hurry = 1;
        assert_eq!(q.take_due(t0).map(|j| j.id), Some(DeviceId(1)), "a waiter makes fresh jobs due at once");
    }

    #[test]
    fn a_push_wakes_the_worker_only_if_it_would_sleep_past_the_job() {
        let t0 = Instant::now();
        let fresh = job(1, t0, None);
        let mut q = Queue { last_push: Some(t0), ..Queue::default() };
        assert!(!q.must_wake_for(&fresh), "awake: it looks at the queue before it sleeps");
        q.asleep = Some(None);
        assert!(q.must_wake_for(&fresh), "asleep until woken");
        q.asleep = Some(Some(t0 + QUIET / 2));
        assert!(!q.must_wake_for(&fresh), "wakes before the job is due anyway");
        q.asleep = Some(Some(t0 + Duration::from_secs(60)));
        assert!(q.must_wake_for(&fresh), "asleep until a retry far later");
        q.asleep = Some(Some(t0 + QUIET / 2));
        q.hurry = 1;
        assert!(q.must_wake_for(&fresh), "someone waits: the job is due now");
    }

    #[test]
    fn backoff_grows_then_stays() {
        assert!(backoff(1) < backoff(2) && backoff(2) < backoff(3));
        assert_eq!(backoff(3), backoff(9));
    }
}
