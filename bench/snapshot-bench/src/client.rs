//! A snapshots.v1 client for one target, with per-call timing and a ledger of
//! every key it may have created so that cleanup never depends on how far a
//! workload got.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thinbox_proto::snapshots::snapshots_client::SnapshotsClient;
use thinbox_proto::snapshots::{CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, ViewSnapshotRequest};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

use crate::Error;
use crate::spec::TargetSpec;

/// gRPC header containerd reads the namespace from.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";

/// Label that keeps containerd's garbage collector away from snapshots that no
/// image, container or lease references. Sent to every target alike so the
/// requests are identical.
pub const GC_ROOT_LABEL: &str = "containerd.io/gc.root";

/// A connected target.
#[derive(Debug, Clone)]
pub struct Target {
    /// What was asked for on the command line.
    pub spec: Arc<TargetSpec>,
    client: SnapshotsClient<Channel>,
    namespace: Option<AsciiMetadataValue>,
    ledger: Arc<Mutex<Vec<String>>>,
}

impl Target {
    /// Connects to the target's socket. `timeout` bounds connecting and every
    /// single request.
    pub async fn connect(spec: TargetSpec, timeout: Duration) -> Result<Self, Error> {
        let namespace = match &spec.namespace {
            Some(ns) => {
                Some(ns.parse::<AsciiMetadataValue>().map_err(|_| Error::Config(format!("namespace {ns:?} is not a valid gRPC header value")))?)
            }
            None => None,
        };
        let channel = thinbox_proto::unix_channel(spec.socket.clone(), timeout).await.map_err(|source| Error::Connect {
            target: spec.name.clone(),
            socket: spec.socket.clone(),
            source: Box::new(source),
        })?;
        Ok(Target { spec: Arc::new(spec), client: SnapshotsClient::new(channel), namespace, ledger: Arc::new(Mutex::new(Vec::new())) })
    }

    /// Target name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        if let Some(ns) = &self.namespace {
            req.metadata_mut().insert(NAMESPACE_HEADER, ns.clone());
        }
        req
    }

    fn labels() -> HashMap<String, String> {
        HashMap::from([(GC_ROOT_LABEL.to_owned(), "thinbox-snapshot-bench".to_owned())])
    }

    fn ledger(&self) -> MutexGuard<'_, Vec<String>> {
        self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn note(&self, key: &str) {
        let mut ledger = self.ledger();
        if !ledger.iter().any(|k| k == key) {
            ledger.push(key.to_owned());
        }
    }

    fn forget(&self, key: &str) {
        let mut ledger = self.ledger();
        if let Some(pos) = ledger.iter().rposition(|k| k == key) {
            ledger.remove(pos);
        }
    }

    /// Keys this client created (or tried to) and has not removed, oldest first.
    pub fn outstanding(&self) -> Vec<String> {
        self.ledger().clone()
    }

    /// After a failed create (Prepare, View, Commit): keep `key` in the
    /// ledger only if the service may have created it anyway.
    fn failed_create(&self, op: &'static str, key: &str, status: tonic::Status) -> Error {
        use tonic::Code;
        let ambiguous = matches!(status.code(), Code::Unknown | Code::DeadlineExceeded | Code::Cancelled | Code::Unavailable | Code::Internal);
        if !ambiguous {
            self.forget(key);
        }
        self.rpc_error(op, key, status)
    }

    fn rpc_error(&self, op: &'static str, key: &str, status: tonic::Status) -> Error {
        Error::Rpc { target: self.spec.name.clone(), op, key: key.to_owned(), status: Box::new(status) }
    }

    /// `Prepare(key, parent)`; returns the call's latency.
    pub async fn prepare(&self, key: &str, parent: &str) -> Result<Duration, Error> {
        self.note(key);
        let req = self.request(PrepareSnapshotRequest {
            snapshotter: self.spec.snapshotter.clone(),
            key: key.to_owned(),
            parent: parent.to_owned(),
            labels: Self::labels(),
        });
        let (res, took) = timed(self.client.clone().prepare(req)).await;
        res.map_err(|s| self.failed_create("prepare", key, s))?;
        Ok(took)
    }

    /// `View(key, parent)`; returns the call's latency.
    pub async fn view(&self, key: &str, parent: &str) -> Result<Duration, Error> {
        self.note(key);
        let req = self.request(ViewSnapshotRequest {
            snapshotter: self.spec.snapshotter.clone(),
            key: key.to_owned(),
            parent: parent.to_owned(),
            labels: Self::labels(),
        });
        let (res, took) = timed(self.client.clone().view(req)).await;
        res.map_err(|s| self.failed_create("view", key, s))?;
        Ok(took)
    }

    /// `Commit(name, key)`; returns the call's latency.
    pub async fn commit(&self, name: &str, key: &str) -> Result<Duration, Error> {
        self.note(name);
        let req = self.request(CommitSnapshotRequest {
            snapshotter: self.spec.snapshotter.clone(),
            name: name.to_owned(),
            key: key.to_owned(),
            labels: Self::labels(),
            parent: String::new(),
        });
        let (res, took) = timed(self.client.clone().commit(req)).await;
        res.map_err(|s| self.failed_create("commit", name, s))?;
        // The active snapshot is gone now; only `name` needs removing.
        self.forget(key);
        Ok(took)
    }

    /// `Remove(key)`; returns the call's latency.
    pub async fn remove(&self, key: &str) -> Result<Duration, Error> {
        let (res, took) = self.timed_remove(key).await;
        match res {
            Ok(_) => {
                self.forget(key);
                Ok(took)
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                self.forget(key);
                Err(self.rpc_error("remove", key, status))
            }
            Err(status) => Err(self.rpc_error("remove", key, status)),
        }
    }

    /// A Remove of `key`, which must not exist: the round trip through the
    /// service with no work behind it. Anything but NOT_FOUND is an error.
    pub async fn remove_missing(&self, key: &str) -> Result<Duration, Error> {
        let (res, took) = self.timed_remove(key).await;
        match res {
            Err(status) if status.code() == tonic::Code::NotFound => Ok(took),
            Err(status) => Err(self.rpc_error("remove (missing key)", key, status)),
            Ok(_) => Err(Error::Internal(format!("target {}: Remove of {key:?}, which was never created, succeeded", self.name()))),
        }
    }

    async fn timed_remove(&self, key: &str) -> (Result<tonic::Response<()>, tonic::Status>, Duration) {
        let req = self.request(RemoveSnapshotRequest { snapshotter: self.spec.snapshotter.clone(), key: key.to_owned() });
        timed(self.client.clone().remove(req)).await
    }

    /// Best-effort removal of everything still in the ledger, newest first
    /// (children before parents). Keys that do not exist are dropped; a few
    /// passes cope with an order the service disagrees with. Returns the keys
    /// that could not be removed, with the last error for each.
    pub async fn cleanup(&self) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        for _pass in 0..3 {
            failed.clear();
            let keys = self.outstanding();
            if keys.is_empty() {
                break;
            }
            for key in keys.iter().rev() {
                match self.remove(key).await {
                    Ok(_) => {}
                    Err(Error::Rpc { status, .. }) if status.code() == tonic::Code::NotFound => {}
                    Err(e) => failed.push((key.clone(), e.to_string())),
                }
            }
        }
        failed
    }
}

/// Awaits `call` and measures how long it took.
async fn timed<T>(call: impl std::future::Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = call.await;
    (out, start.elapsed())
}

/// Reads `VmRSS` of `pid` from `/proc/PID/status`, in KiB.
pub fn read_rss_kib(pid: u32) -> Result<u64, Error> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { what: path.clone(), source })?;
    parse_vm_rss_kib(&text).ok_or_else(|| Error::Config(format!("no VmRSS line in {path}")))
}

/// Extracts `VmRSS:   12345 kB` from the text of `/proc/PID/status`.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => Some(value),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss() {
        let status = "Name:\tcontainerd\nVmPeak:\t 1000 kB\nVmRSS:\t   53124 kB\nThreads:\t12\n";
        assert_eq!(parse_vm_rss_kib(status), Some(53124));
        assert_eq!(parse_vm_rss_kib("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss_kib("VmRSS:\tabc kB\n"), None);
    }
}
