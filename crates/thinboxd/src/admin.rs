//! The `thinbox.admin.v1.Admin` gRPC service (`thinboxctl`'s server side),
//! served on the snapshot socket next to containerd's snapshot service. It
//! spans the whole pool, both front ends: every device with whose it is (a
//! snapshot's, a CSI volume's or snapshot's), the pool's figures split by
//! consumer, and the engine's check and reconciliation. The daemon owns the
//! store, so operators ask it rather than opening the store themselves.

use std::collections::BTreeMap;
use std::sync::Arc;

use thinbox_blockstore::{
    Access, DeviceId, DeviceRecord, Engine, Orphan as BlockOrphan, PoolStatus as BlockPoolStatus, ReconcileReport as BlockReport, Usage,
};
use thinbox_csi::Driver;
use thinbox_csi::state::Volume;
use thinbox_proto::admin::admin_server::Admin as AdminApi;
use thinbox_proto::admin::*;
use thinbox_snapshotter::Snapshots;
use thinbox_snapshotter::meta::Kind;
use tonic::{Request, Response, Status};

/// Whose a device (or a volume outside the pool) is. The order is the one
/// `PoolStatus` lists consumers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Consumer {
    /// A committed snapshot.
    ImageLayer,
    /// An active snapshot or a view.
    ContainerRootfs,
    /// A CSI volume.
    Volume,
    /// A CSI inline ephemeral volume.
    EmptyDir,
    /// A CSI snapshot.
    VolumeSnapshot,
}

impl Consumer {
    /// Listed by `PoolStatus` even when they hold nothing.
    const ALWAYS: [Consumer; 4] = [Consumer::ImageLayer, Consumer::ContainerRootfs, Consumer::Volume, Consumer::EmptyDir];

    pub(crate) fn of_snapshot(kind: Kind) -> Consumer {
        match kind {
            Kind::Committed => Consumer::ImageLayer,
            Kind::Active | Kind::View => Consumer::ContainerRootfs,
        }
    }

    pub(crate) fn of_volume(v: &Volume) -> Consumer {
        if v.ephemeral { Consumer::EmptyDir } else { Consumer::Volume }
    }

    /// The API's name (`Device.consumer`, `ConsumerUsage.consumer`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Consumer::ImageLayer => "image_layer",
            Consumer::ContainerRootfs => "container_rootfs",
            Consumer::Volume => "volume",
            Consumer::EmptyDir => "emptydir",
            Consumer::VolumeSnapshot => "volume_snapshot",
        }
    }
}

/// The records that name a device. A device is one record's, so `consumer`
/// is that record's; were it named twice, the first of snapshots, volumes,
/// CSI snapshots would say.
#[derive(Debug, Default)]
struct Owner {
    consumer: Option<Consumer>,
    snapshots: Vec<String>,
    volumes: Vec<String>,
}

/// Whose every device is, and the CSI volumes that live outside the pool
/// (the `dir` kind).
#[derive(Debug, Default)]
struct Owners {
    devices: BTreeMap<DeviceId, Owner>,
    outside: Vec<(Consumer, Volume)>,
}

impl Owners {
    /// One read of each front end's records (no lock: an operation in flight
    /// may show a device no record names yet, or any more).
    fn read(snapshots: &Snapshots, driver: &Driver) -> Result<Owners, Status> {
        let mut owners = Owners::default();
        for (key, kind, dev) in snapshots.devices()? {
            owners.name(dev, Consumer::of_snapshot(kind)).snapshots.push(key);
        }
        for vol in driver.volumes()? {
            match vol.device {
                Some(dev) => owners.name(dev, Consumer::of_volume(&vol)).volumes.push(vol.id),
                None => owners.outside.push((Consumer::of_volume(&vol), vol)),
            }
        }
        for snap in driver.snapshots()? {
            if let Some(dev) = snap.device {
                owners.name(dev, Consumer::VolumeSnapshot).volumes.push(snap.id);
            }
        }
        Ok(owners)
    }

    fn name(&mut self, dev: DeviceId, consumer: Consumer) -> &mut Owner {
        let owner = self.devices.entry(dev).or_default();
        owner.consumer.get_or_insert(consumer);
        owner
    }
}

/// One device: its record, its usage (or why not) and whose it is.
struct Row {
    rec: DeviceRecord,
    usage: Result<Usage, String>,
    owner: Owner,
}

/// The gRPC front of the administration operations on the pool and both
/// front ends' records.
#[derive(Debug, Clone)]
pub struct Admin {
    engine: Arc<Engine>,
    snapshots: Arc<Snapshots>,
    driver: Arc<Driver>,
}

impl Admin {
    /// The admin service over `engine` and the two front ends on it.
    pub fn new(engine: Arc<Engine>, snapshots: Arc<Snapshots>, driver: Arc<Driver>) -> Admin {
        Admin { engine, snapshots, driver }
    }

    /// Runs `f` off the async runtime: every operation here reads the store or
    /// the kernel, and check/gc hold the engine's exclusive gate.
    async fn run<T: Send + 'static>(&self, op: &'static str, f: impl FnOnce(&Admin) -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
        let this = self.clone();
        let start = std::time::Instant::now();
        let out = tokio::task::spawn_blocking(move || f(&this)).await.unwrap_or_else(|e| Err(thinbox_snapshotter::Error::from(e).into()));
        tracing::debug!(op, elapsed_us = start.elapsed().as_micros() as u64, ok = out.is_ok(), "admin rpc");
        out
    }

    /// Every device record, ordered by id, with its usage and owner: one read
    /// of the records, then each device's usage once (slow per device on
    /// dm-thin). Usage that cannot be read is kept in its row, not a failure
    /// of the whole answer (a device being deleted has no image to read).
    fn rows(&self, mut owners: BTreeMap<DeviceId, Owner>) -> Result<Vec<Row>, Status> {
        let pool = self.engine.pool();
        let mut records = pool.store().devices().map_err(block)?;
        records.sort_by_key(|r| r.id);
        Ok(records
            .into_iter()
            .map(|rec| {
                let usage = pool.usage(&rec).map_err(|e| thinbox_daemon::chain(&e));
                let owner = owners.remove(&rec.id).unwrap_or_default();
                Row { rec, usage, owner }
            })
            .collect())
    }

    fn devices(&self) -> Result<Vec<Device>, Status> {
        let owners = Owners::read(&self.snapshots, &self.driver)?;
        let pool = self.engine.pool();
        Ok(self.rows(owners.devices)?.into_iter().map(|r| device(&r.rec, pool.node(r.rec.id), r.usage, r.owner)).collect())
    }

    /// The pool's figures and what each consumer holds, from one read of the
    /// records and one usage per device.
    fn status(&self) -> Result<PoolStatusResponse, Status> {
        let st = self.engine.pool().status().map_err(block)?;
        let owners = Owners::read(&self.snapshots, &self.driver)?;
        let rows = self.rows(owners.devices)?;
        let outside: Vec<(Consumer, Option<u64>)> = owners
            .outside
            .iter()
            .map(|(c, vol)| match self.driver.allocated(vol) {
                Ok(bytes) => (*c, Some(bytes)),
                Err(e) => {
                    tracing::warn!(volume = %vol.id, error = %thinbox_daemon::chain(&e), "pool status: volume usage");
                    (*c, None)
                }
            })
            .collect();
        let devices = rows.iter().map(|r| (r.owner.consumer, r.usage.as_ref().ok().map(|u| u.bytes.get())));
        Ok(PoolStatusResponse { status: Some(pool_status(st)), consumers: breakdown(devices, outside) })
    }
}

/// A blockstore error as the snapshot service answers it.
fn block(e: thinbox_blockstore::Error) -> Status {
    thinbox_snapshotter::Error::from(e).into()
}

#[tonic::async_trait]
impl AdminApi for Admin {
    async fn pool_status(&self, _req: Request<PoolStatusRequest>) -> Result<Response<PoolStatusResponse>, Status> {
        Ok(Response::new(self.run("pool_status", Admin::status).await?))
    }

    async fn list_devices(&self, _req: Request<ListDevicesRequest>) -> Result<Response<ListDevicesResponse>, Status> {
        let devices = self.run("list_devices", Admin::devices).await?;
        Ok(Response::new(ListDevicesResponse { devices }))
    }

    async fn check(&self, _req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let report = self.run("check", |a| a.engine.check().map_err(block)).await?;
        Ok(Response::new(CheckResponse { report: Some(reconcile_report(report)) }))
    }

    async fn gc(&self, _req: Request<GcRequest>) -> Result<Response<GcResponse>, Status> {
        let report = self.run("gc", |a| a.engine.reconcile().map_err(block)).await?;
        Ok(Response::new(GcResponse { report: Some(reconcile_report(report)) }))
    }
}

/// What each consumer holds, from each device's consumer (`None`: no record
/// names it) and usage (`None`: unreadable), and each volume outside the pool
/// likewise: [`Consumer::ALWAYS`] in order, then the CSI snapshots' and the
/// unnamed devices' shares if they hold anything.
fn breakdown(
    devices: impl IntoIterator<Item = (Option<Consumer>, Option<u64>)>,
    outside: impl IntoIterator<Item = (Consumer, Option<u64>)>,
) -> Vec<ConsumerUsage> {
    fn share(by: &mut BTreeMap<Option<Consumer>, ConsumerUsage>, c: Option<Consumer>) -> &mut ConsumerUsage {
        by.entry(c).or_insert_with(|| ConsumerUsage { consumer: c.map_or("", Consumer::as_str).to_owned(), ..Default::default() })
    }
    let mut by = BTreeMap::new();
    for (c, usage) in devices {
        let u = share(&mut by, c);
        u.devices += 1;
        match usage {
            Some(b) => u.bytes += b,
            None => u.unreadable += 1,
        }
    }
    for (c, usage) in outside {
        let u = share(&mut by, Some(c));
        u.outside_pool_volumes += 1;
        match usage {
            Some(b) => u.outside_pool_bytes += b,
            None => u.unreadable += 1,
        }
    }
    for c in Consumer::ALWAYS {
        share(&mut by, Some(c));
    }
    // BTreeMap puts `None` first; the unnamed devices go last.
    let unnamed = by.remove(&None);
    by.into_values().chain(unnamed).collect()
}

fn device(rec: &DeviceRecord, node: Option<std::path::PathBuf>, usage: Result<Usage, String>, owner: Owner) -> Device {
    let (usage, inodes, usage_error) = match usage {
        Ok(u) => (Some(u.bytes.get()), Some(u.inodes), None),
        Err(e) => (None, None, Some(e)),
    };
    Device {
        id: rec.id.0,
        size: rec.size.get(),
        origin: rec.origin.map(|o| o.0),
        // "raw": the host made no filesystem (a guest formats it).
        fs: rec.fs.map_or("raw", thinbox_blockstore::FsType::as_str).to_owned(),
        state: rec.state.as_str().to_owned(),
        access: rec.access.map(|a| match a {
            Access::ReadWrite => "rw".to_owned(),
            Access::ReadOnly => "ro".to_owned(),
        }),
        node: node.map(|n| n.display().to_string()),
        usage,
        inodes,
        usage_error,
        snapshots: owner.snapshots,
        consumer: owner.consumer.map_or("", Consumer::as_str).to_owned(),
        volumes: owner.volumes,
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
        deleting: st.deleting,
        unattached: st.unattached,
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
        failed: r.failed.into_iter().map(|f| DeviceFailure { device: f.id.0, repair: f.repair.as_str().to_owned(), error: f.error }).collect(),
        orphans_failed: r.orphans_failed.into_iter().map(|f| OrphanFailure { orphan: Some(orphan(f.orphan)), error: f.error }).collect(),
        held: ids(r.held),
        orphans_held: r.orphans_held.into_iter().map(orphan).collect(),
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

    use thinbox_blockstore::{Bytes, DeviceFailure as BlockFailure, DeviceId, DeviceState, FsType, Repair, Space};

    use super::*;

    fn rec(id: u64, access: Option<Access>) -> DeviceRecord {
        DeviceRecord {
            id: DeviceId(id),
            size: Bytes::GIB,
            origin: Some(DeviceId(1)),
            fs: Some(FsType::Xfs),
            state: DeviceState::Ready,
            access,
            origin_size: Some(Bytes::GIB),
        }
    }

    fn owner(consumer: Option<Consumer>, snapshots: &[&str], volumes: &[&str]) -> Owner {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Owner { consumer, snapshots: names(snapshots), volumes: names(volumes) }
    }

    #[test]
    fn devices_carry_access_node_usage_or_its_error_and_owner() {
        let usage = thinbox_blockstore::Usage { bytes: Bytes(4096), inodes: 3 };
        let d = device(
            &rec(2, Some(Access::ReadWrite)),
            Some(PathBuf::from("/dev/loop7")),
            Ok(usage),
            owner(Some(Consumer::ContainerRootfs), &["k"], &[]),
        );
        assert_eq!((d.id, d.size, d.origin), (2, 1 << 30, Some(1)));
        assert_eq!((d.fs.as_str(), d.state.as_str()), ("xfs", "ready"));
        assert_eq!(d.access.as_deref(), Some("rw"));
        assert_eq!(d.node.as_deref(), Some("/dev/loop7"));
        assert_eq!((d.usage, d.inodes, d.usage_error), (Some(4096), Some(3), None));
        assert_eq!((d.consumer.as_str(), d.snapshots.as_slice(), d.volumes.as_slice()), ("container_rootfs", &["k".to_owned()][..], &[][..]));

        let d = device(&rec(3, Some(Access::ReadOnly)), None, Err("open: gone".into()), owner(Some(Consumer::EmptyDir), &[], &["tb-file-1"]));
        assert_eq!(d.access.as_deref(), Some("ro"));
        assert_eq!((d.usage, d.inodes, d.usage_error.as_deref()), (None, None, Some("open: gone")));
        assert_eq!((d.consumer.as_str(), d.volumes.as_slice()), ("emptydir", &["tb-file-1".to_owned()][..]));
        let d = device(&rec(4, None), None, Err(String::new()), Owner::default());
        assert_eq!((d.access, d.consumer.as_str(), d.snapshots.len(), d.volumes.len()), (None, "", 0, 0), "no record names it");
    }

    #[test]
    fn snapshots_are_image_layers_or_rootfs() {
        assert_eq!(Consumer::of_snapshot(Kind::Committed), Consumer::ImageLayer);
        assert_eq!(Consumer::of_snapshot(Kind::Active), Consumer::ContainerRootfs);
        assert_eq!(Consumer::of_snapshot(Kind::View), Consumer::ContainerRootfs);
        let names: Vec<_> = [Consumer::ImageLayer, Consumer::ContainerRootfs, Consumer::Volume, Consumer::EmptyDir, Consumer::VolumeSnapshot]
            .map(Consumer::as_str)
            .to_vec();
        assert_eq!(names, ["image_layer", "container_rootfs", "volume", "emptydir", "volume_snapshot"]);
    }

    #[test]
    fn breakdown_sums_each_consumer_and_lists_the_four_always() {
        let row = |c: &str, devices, bytes, unreadable, outside_pool_volumes, outside_pool_bytes| ConsumerUsage {
            consumer: c.to_owned(),
            devices,
            bytes,
            unreadable,
            outside_pool_volumes,
            outside_pool_bytes,
        };
        let empty =
            [row("image_layer", 0, 0, 0, 0, 0), row("container_rootfs", 0, 0, 0, 0, 0), row("volume", 0, 0, 0, 0, 0), row("emptydir", 0, 0, 0, 0, 0)];
        assert_eq!(breakdown([], []), empty);

        let devices = [
            (None, Some(7)),
            (Some(Consumer::VolumeSnapshot), Some(1)),
            (Some(Consumer::ContainerRootfs), Some(100)),
            (Some(Consumer::ImageLayer), Some(10)),
            (Some(Consumer::ContainerRootfs), None),
            (Some(Consumer::ImageLayer), Some(20)),
            (Some(Consumer::Volume), Some(5)),
        ];
        let outside = [(Consumer::EmptyDir, Some(64)), (Consumer::EmptyDir, None), (Consumer::Volume, Some(3))];
        assert_eq!(
            breakdown(devices, outside),
            [
                row("image_layer", 2, 30, 0, 0, 0),
                row("container_rootfs", 2, 100, 1, 0, 0),
                row("volume", 1, 5, 0, 1, 3),
                row("emptydir", 0, 0, 1, 2, 64),
                row("volume_snapshot", 1, 1, 0, 0, 0),
                row("", 1, 7, 0, 0, 0),
            ]
        );
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
            deleting: 1,
            unattached: 2,
            metadata: Some(Space { total: Bytes(8), used: Bytes(2) }),
            low_water: Some(Bytes(5)),
            mode: Some("rw".into()),
        };
        let p = pool_status(st);
        assert_eq!((p.backend.as_str(), p.location.as_str()), ("dm-thin", "thinbox-pool"));
        assert_eq!((p.total, p.free, p.reserve, p.devices, p.deleting, p.unattached), (100, 60, 10, 4, 1, 2));
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
            held: vec![DeviceId(6)],
            failed: vec![BlockFailure { id: DeviceId(7), repair: Repair::Reattach, error: "attach: EPERM".into() }],
            orphans_failed: vec![thinbox_blockstore::OrphanFailure { orphan: BlockOrphan::ThinId(8), error: "delete: EIO".into() }],
            orphans_held: vec![BlockOrphan::ThinId(10)],
        });
        assert_eq!((r.devices_removed, r.reattached, r.detached, r.missing), (vec![1], vec![2], vec![3], vec![5]));
        assert_eq!(r.failed, [DeviceFailure { device: 7, repair: "reattach".into(), error: "attach: EPERM".into() }]);
        let thin = Orphan { kind: "thin_id".into(), what: "8".into() };
        assert_eq!(r.orphans_failed, [OrphanFailure { orphan: Some(thin), error: "delete: EIO".into() }]);
        assert_eq!((r.held, r.orphans_held), (vec![6], vec![Orphan { kind: "thin_id".into(), what: "10".into() }]));
        let orphans: Vec<_> = r.orphans.iter().map(|o| (o.kind.as_str(), o.what.as_str())).collect();
        assert_eq!(orphans, [("file", "/p/devices/9.img"), ("loop", "/dev/loop9"), ("dm_device", "thinbox-x-9"), ("thin_id", "9")]);
    }
}
