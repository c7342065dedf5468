//! The `containerd.services.snapshots.v1.Snapshots` gRPC service. Thin: decodes
//! requests, runs the blocking work off the async runtime, encodes responses.
//! A Remove that need not wait runs in place (see `Snapshots::try_remove`).
//! Every call is counted and timed in [`Metrics`] (`api="snapshots"`), from
//! its arrival to its answer (waiting for a slot included).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use thinbox_metrics::{Api, Metrics};
use thinbox_proto::snapshots::snapshots_server::Snapshots as SnapshotsApi;
use thinbox_proto::snapshots::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::meta::Kind;
use crate::snapshots::Snapshots;

/// Infos per `List` response message.
const LIST_BATCH: usize = 100;

/// Prepares, Views and Commits running at once, per CPU (see `Service::change_slots`).
const CHANGES_PER_CPU: usize = 2;

/// Removes running at once (see `Service::remove_slots`).
const REMOVES_AT_ONCE: usize = 16;

/// The gRPC front of [`Snapshots`].
#[derive(Debug, Clone)]
pub struct Service {
    inner: Arc<Snapshots>,
    metrics: Arc<Metrics>,
    /// Prepares, Views and Commits running at once; the rest wait in arrival
    /// order. Each passes the same serialized steps (the store's write
    /// transaction, the pool's message lock) around its kernel work, so a
    /// burst admitted all at once moves through them in lockstep and all of
    /// it finishes near the end, on as many threads as there are requests;
    /// admitted a few at a time, the first ones finish first and the total
    /// stays the same as long as the CPUs are busy.
    change_slots: Arc<tokio::sync::Semaphore>,
    /// Removes handed to threads at once (those that would wait for the
    /// store). A Remove is one store transaction and no kernel work, so it
    /// gets its own, larger limit (it must not wait behind Prepares); the
    /// limit only keeps a burst from starting a thread per request.
    remove_slots: Arc<tokio::sync::Semaphore>,
}

impl Service {
    /// Wraps the snapshotter; every call is recorded in `metrics`.
    pub fn new(inner: Arc<Snapshots>, metrics: Arc<Metrics>) -> Service {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Service {
            inner,
            metrics,
            change_slots: Arc::new(tokio::sync::Semaphore::new(CHANGES_PER_CPU * cpus)),
            remove_slots: Arc::new(tokio::sync::Semaphore::new(REMOVES_AT_ONCE)),
        }
    }

    /// [`Service::run`] once one of `slots` is free.
    async fn run_limited<T: Send + 'static>(
        &self,
        slots: &tokio::sync::Semaphore,
        op: &'static str,
        f: impl FnOnce(&Snapshots) -> Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let arrived = Instant::now();
        // Never closed, so acquiring cannot fail.
        let _slot = slots.acquire().await.map_err(|_| Status::internal("request slots closed"))?;
        let waited = arrived.elapsed();
        if waited > std::time::Duration::from_millis(1) {
            tracing::debug!(op, waited_us = waited.as_micros() as u64, "waited for a slot");
        }
        self.run_since(arrived, op, f).await
    }

    async fn run<T: Send + 'static>(&self, op: &'static str, f: impl FnOnce(&Snapshots) -> Result<T> + Send + 'static) -> Result<T, Status> {
        self.run_since(Instant::now(), op, f).await
    }

    /// Runs `f` on a blocking thread; the call arrived at `arrived`.
    async fn run_since<T: Send + 'static>(
        &self,
        arrived: Instant,
        op: &'static str,
        f: impl FnOnce(&Snapshots) -> Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let inner = self.inner.clone();
        let start = Instant::now();
        let out = tokio::task::spawn_blocking(move || f(&inner)).await.map_err(Error::from).and_then(|r| r);
        self.metrics.observe(Api::Snapshots, op, out.is_ok(), arrived.elapsed());
        tracing::debug!(op, elapsed_us = start.elapsed().as_micros() as u64, ok = out.is_ok(), "rpc");
        out.map_err(Status::from)
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotsApi for Service {
    async fn prepare(&self, req: Request<PrepareSnapshotRequest>) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts = self
            .run_limited(&self.change_slots, "prepare", move |s| s.prepare(Kind::Active, &r.key, &r.parent, r.labels.into_iter().collect()))
            .await?;
        Ok(Response::new(PrepareSnapshotResponse { mounts }))
    }

    async fn view(&self, req: Request<ViewSnapshotRequest>) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts =
            self.run_limited(&self.change_slots, "view", move |s| s.prepare(Kind::View, &r.key, &r.parent, r.labels.into_iter().collect())).await?;
        Ok(Response::new(ViewSnapshotResponse { mounts }))
    }

    async fn mounts(&self, req: Request<MountsRequest>) -> Result<Response<MountsResponse>, Status> {
        let r = req.into_inner();
        let mounts = self.run("mounts", move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(MountsResponse { mounts }))
    }

    async fn commit(&self, req: Request<CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.run_limited(&self.change_slots, "commit", move |s| s.commit(&r.name, &r.key, r.labels.into_iter().collect(), &r.parent)).await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, req: Request<RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let start = Instant::now();
        match self.inner.try_remove(&r.key) {
            Some(out) => {
                self.metrics.observe(Api::Snapshots, "remove", out.is_ok(), start.elapsed());
                tracing::debug!(op = "remove", elapsed_us = start.elapsed().as_micros() as u64, ok = out.is_ok(), inline = true, "rpc");
                out?;
            }
            None => self.run_limited(&self.remove_slots, "remove", move |s| s.remove(&r.key)).await?,
        }
        Ok(Response::new(()))
    }

    async fn stat(&self, req: Request<StatSnapshotRequest>) -> Result<Response<StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = self.run("stat", move |s| s.stat(&r.key)).await?;
        Ok(Response::new(StatSnapshotResponse { info: Some(info) }))
    }

    async fn update(&self, req: Request<UpdateSnapshotRequest>) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = self.run("update", move |s| s.update(r.info.ok_or(Error::MissingInfo)?, &paths)).await?;
        Ok(Response::new(UpdateSnapshotResponse { info: Some(info) }))
    }

    type ListStream = ListStream;

    async fn list(&self, req: Request<ListSnapshotsRequest>) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let infos = self.run("list", move |s| s.list(&r.filters)).await?;
        let batches: Vec<_> = infos.chunks(LIST_BATCH).map(|c| Ok(ListSnapshotsResponse { info: c.to_vec() })).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(&self, req: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        let r = req.into_inner();
        let u = self.run("usage", move |s| s.usage(&r.key)).await?;
        Ok(Response::new(UsageResponse { size: u.size as i64, inodes: u.inodes as i64 }))
    }

    async fn cleanup(&self, _req: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        self.run("cleanup", |s| s.cleanup().map(|_| ())).await?;
        Ok(Response::new(()))
    }
}
