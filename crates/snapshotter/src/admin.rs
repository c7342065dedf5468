//! The `thinbox.admin.v1.Admin` gRPC service (`thinboxctl`'s server side),
//! served on the same socket as the snapshot service: the daemon owns the
//! store, so operators ask it rather than opening the store themselves.

use std::sync::Arc;

use thinbox_blockstore::{Access, DeviceRecord, Orphan as BlockOrphan, PoolStatus as BlockPoolStatus, ReconcileReport as BlockReport};
use thinbox_proto::admin::admin_server::Admin as AdminApi;
use thinbox_proto::admin::*;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::snapshots::Snapshots;

/// The gRPC front of the administration operations on [`Snapshots`].
#[derive(Debug, Clone)]
pub struct Admin {
    inner: Arc<Snapshots>,
}

impl Admin {
    /// Wraps the snapshotter.
    pub fn new(inner: Arc<Snapshots>) -> Admin {
        Admin { inner }
    }

    /// Runs `f` off the async runtime: every operation here reads the store or
    /// the kernel, and check/gc hold the snapshotter's exclusive gate.
    async fn run<T: Send + 'static>(&self, op: &'static str, f: impl FnOnce(&Snapshots) -> Result<T> + Send + 'static) -> Result<T, Status> {
        let inner = self.inner.clone();
        let start = std::time::Instant::now();
        let out = tokio::task::spawn_blocking(move || f(&inner)).await.map_err(Error::from).and_then(|r| r);
        tracing::debug!(op, elapsed_us = start.elapsed().as_micros() as u64, ok = out.is_ok(), "admin rpc");
        out.map_err(Status::from)
    }
}

#[tonic::async_trait]
impl AdminApi for Admin {
    async fn pool_status(&self, _req: Request<PoolStatusRequest>) -> Result<Response<PoolStatusResponse>, Status> {
        let st = self.run("pool_status", |s| Ok(s.pool().status()?)).await?;
        Ok(Response::new(PoolStatusResponse { status: Some(pool_status(st)) }))
    }

    async fn list_devices(&self, _req: Request<ListDevicesRequest>) -> Result<Response<ListDevicesResponse>, Status> {
        let devices = self.run("list_devices", list_devices).await?;
        Ok(Response::new(ListDevicesResponse { devices }))
    }

    async fn check(&self, _req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let report = self.run("check", |s| s.check()).await?;
        Ok(Response::new(CheckResponse { report: Some(reconcile_report(report)) }))
    }

    async fn gc(&self, _req: Request<GcRequest>) -> Result<Response<GcResponse>, Status> {
        let report = self.run("gc", |s| s.cleanup()).await?;
        Ok(Response::new(GcResponse { report: Some(reconcile_report(report)) }))
    }
}

/// Every device record with its node, usage and snapshot keys. The keys and the
/// records are two reads, so an operation in flight may show a device without
/// a key; usage that cannot be read is reported in its row, not as a failure
/// of the whole listing (a device being deleted has no image to read).
fn list_devices(s: &Snapshots) -> Result<Vec<Device>> {
    let mut keys = s.keys_by_device()?;
    let mut records = s.pool().store().devices()?;
    records.sort_by_key(|r| r.id);
    Ok(records
        .into_iter()
        .map(|rec| {
            let usage = s.pool().usage(&rec).map_err(|e| crate::error::chain(&e));
            let snapshots = keys.remove(&rec.id).unwrap_or_default();
            device(&rec, s.pool().node(rec.id), usage, snapshots)
        })
        .collect())
}

fn device(rec: &DeviceRecord, node: Option<std::path::PathBuf>, usage: Result<thinbox_blockstore::Usage, String>, snapshots: Vec<String>) -> Device {
    let (usage, inodes, usage_error) = match usage {
        Ok(u) => (Some(u.bytes.get()), Some(u.inodes), None),
        Err(e) => (None, None, Some(e)),
    };
    Device {
        id: rec.id.0,
        size: rec.size.get(),
        origin: rec.origin.map(|o| o.0),
        fs: rec.fs.as_str().to_owned(),
        state: rec.state.as_str().to_owned(),
        access: rec.access.map(|a| match a {
            Access::ReadWrite => "rw".to_owned(),
            Access::ReadOnly => "ro".to_owned(),
        }),
        node: node.map(|n| n.display().to_string()),
        usage,
        inodes,
        usage_error,
        snapshots,
    }
}

fn pool_status(st: BlockPoolStatus) -> PoolStatus {
    PoolStatus {
        backend: st.backend.to_owned(),
        location: st.location,
        total: st.total.get(),
        free: st.free.get(),
        reserve: st.reserve.get(),
        devices: st.devices,
        metadata_total: st.metadata.map(|m| m.total.get()),
        metadata_used: st.metadata.map(|m| m.used.get()),
        low_water: st.low_water.map(|b| b.get()),
        mode: st.mode,
    }
}

fn reconcile_report(r: BlockReport) -> ReconcileReport {
    let ids = |v: Vec<thinbox_blockstore::DeviceId>| v.into_iter().map(|d| d.0).collect();
    ReconcileReport {
        devices_removed: ids(r.devices_removed),
        reattached: ids(r.reattached),
        detached: ids(r.detached),
        orphans: r.orphans.into_iter().map(orphan).collect(),
        missing: ids(r.missing),
    }
}

/// Kinds are the blockstore's serde names, so logs and the API agree.
fn orphan(o: BlockOrphan) -> Orphan {
    let (kind, what) = match o {
        BlockOrphan::File(p) => ("file", p.display().to_string()),
        BlockOrphan::Loop(p) => ("loop", p.display().to_string()),
        BlockOrphan::DmDevice(name) => ("dm_device", name),
        BlockOrphan::ThinId(id) => ("thin_id", id.to_string()),
    };
    Orphan { kind: kind.to_owned(), what }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use thinbox_blockstore::{Bytes, DeviceId, DeviceState, FsType, Space};

    use super::*;

    fn rec(id: u64, access: Option<Access>) -> DeviceRecord {
        DeviceRecord {
            id: DeviceId(id),
            size: Bytes::GIB,
            origin: Some(DeviceId(1)),
            fs: FsType::Xfs,
            state: DeviceState::Ready,
            access,
            origin_size: Some(Bytes::GIB),
        }
    }

    #[test]
    fn devices_carry_access_node_and_usage_or_its_error() {
        let usage = thinbox_blockstore::Usage { bytes: Bytes(4096), inodes: 3 };
        let d = device(&rec(2, Some(Access::ReadWrite)), Some(PathBuf::from("/dev/loop7")), Ok(usage), vec!["k".into()]);
        assert_eq!((d.id, d.size, d.origin), (2, 1 << 30, Some(1)));
        assert_eq!((d.fs.as_str(), d.state.as_str()), ("xfs", "ready"));
        assert_eq!(d.access.as_deref(), Some("rw"));
        assert_eq!(d.node.as_deref(), Some("/dev/loop7"));
        assert_eq!((d.usage, d.inodes, d.usage_error), (Some(4096), Some(3), None));
        assert_eq!(d.snapshots, ["k"]);

        let d = device(&rec(3, Some(Access::ReadOnly)), None, Err("open: gone".into()), vec![]);
        assert_eq!(d.access.as_deref(), Some("ro"));
        assert_eq!((d.usage, d.inodes, d.usage_error.as_deref()), (None, None, Some("open: gone")));
        assert_eq!(device(&rec(4, None), None, Err(String::new()), vec![]).access, None);
    }

    #[test]
    fn status_and_report_keep_every_field() {
        let st = BlockPoolStatus {
            backend: "dm-thin",
            location: "thinbox-pool".into(),
            total: Bytes(100),
            free: Bytes(60),
            reserve: Bytes(10),
            devices: 4,
            metadata: Some(Space { total: Bytes(8), used: Bytes(2) }),
            low_water: Some(Bytes(5)),
            mode: Some("rw".into()),
        };
        let p = pool_status(st);
        assert_eq!((p.backend.as_str(), p.location.as_str()), ("dm-thin", "thinbox-pool"));
        assert_eq!((p.total, p.free, p.reserve, p.devices), (100, 60, 10, 4));
        assert_eq!((p.metadata_total, p.metadata_used, p.low_water, p.mode.as_deref()), (Some(8), Some(2), Some(5), Some("rw")));

        let r = reconcile_report(BlockReport {
            devices_removed: vec![DeviceId(1)],
            reattached: vec![DeviceId(2)],
            detached: vec![DeviceId(3)],
            orphans: vec![
                BlockOrphan::File("/p/devices/9.img".into()),
                BlockOrphan::Loop("/dev/loop9".into()),
                BlockOrphan::DmDevice("thinbox-x-9".into()),
                BlockOrphan::ThinId(9),
            ],
            missing: vec![DeviceId(5)],
        });
        assert_eq!((r.devices_removed, r.reattached, r.detached, r.missing), (vec![1], vec![2], vec![3], vec![5]));
        let orphans: Vec<_> = r.orphans.iter().map(|o| (o.kind.as_str(), o.what.as_str())).collect();
        assert_eq!(orphans, [("file", "/p/devices/9.img"), ("loop", "/dev/loop9"), ("dm_device", "thinbox-x-9"), ("thin_id", "9")]);
    }
}
