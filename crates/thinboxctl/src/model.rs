//! What `thinboxctl` shows, decoupled from the wire types. These structs are
//! also the `--json` schema: field names are stable, sizes are bytes, device
//! ids are numbers, and absent values are `null` (every key is always present).

use serde::Serialize;
pub use thinbox_block_passthrough::probe::KvmProbe;
pub use thinbox_containerd_gc::KeepReason;
use thinbox_proto::admin as proto;

/// `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolStatus {
    /// "reflink" or "dm-thin".
    pub backend: String,
    /// Where the devices live (a directory, a thin pool).
    pub location: String,
    /// Data capacity.
    pub total: u64,
    /// `total - free`.
    pub used: u64,
    /// Free data space.
    pub free: u64,
    /// New devices are refused when `free` is below this.
    pub reserve: u64,
    /// Device records.
    pub devices: u64,
    /// Of those, removed but not yet deleted.
    pub deleting: u64,
    /// Of those, in use but not attached (their re-attach failed).
    pub unattached: u64,
    /// Thin pool metadata (dm-thin only).
    pub metadata: Option<Space>,
    /// Low-water mark in bytes (dm-thin only).
    pub low_water: Option<u64>,
    /// Pool mode: "rw", "ro", "out_of_data_space", "needs_check" (dm-thin only).
    pub mode: Option<String>,
    /// What each consumer holds: `image_layer`, `container_rootfs`, `volume`
    /// and `emptydir` always, then `volume_snapshot` and `null` (devices no
    /// record names) when they hold anything. Empty from a daemon that does
    /// not report it.
    pub consumers: Vec<ConsumerUsage>,
}

/// One consumer's share of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsumerUsage {
    /// "image_layer", "container_rootfs", "volume", "emptydir",
    /// "volume_snapshot"; `null`: devices no record names.
    pub consumer: Option<String>,
    /// Pool devices it holds.
    pub devices: u64,
    /// Their usage summed (as `devices` reports it per device).
    pub bytes: u64,
    /// Devices and volumes whose usage could not be read (not in the bytes).
    pub unreadable: u64,
    /// CSI volumes outside the pool (kind `dir`), on their quota
    /// filesystem.
    pub outside_pool_volumes: u64,
    /// The bytes those hold there.
    pub outside_pool_bytes: u64,
}

impl From<proto::ConsumerUsage> for ConsumerUsage {
    fn from(c: proto::ConsumerUsage) -> Self {
        ConsumerUsage {
            consumer: non_empty(c.consumer),
            devices: c.devices,
            bytes: c.bytes,
            unreadable: c.unreadable,
            outside_pool_volumes: c.outside_pool_volumes,
            outside_pool_bytes: c.outside_pool_bytes,
        }
    }
}

/// The wire's "" (none) as `None`.
fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Capacity and use of one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Space {
    /// Capacity.
    pub total: u64,
    /// In use.
    pub used: u64,
}

impl PoolStatus {
    /// The figures and the per-consumer breakdown of one `PoolStatus` answer.
    pub fn new(p: proto::PoolStatus, consumers: Vec<proto::ConsumerUsage>) -> Self {
        PoolStatus {
            used: p.total.saturating_sub(p.free),
            metadata: match (p.metadata_total, p.metadata_used) {
                (Some(total), Some(used)) => Some(Space { total, used }),
                _ => None,
            },
            backend: p.backend,
            location: p.location,
            total: p.total,
            free: p.free,
            reserve: p.reserve,
            devices: p.devices,
            deleting: p.deleting,
            unattached: p.unattached,
            low_water: p.low_water,
            mode: p.mode,
            consumers: consumers.into_iter().map(ConsumerUsage::from).collect(),
        }
    }
}

/// One row of `devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    /// Device id.
    pub id: u64,
    /// Virtual size.
    pub size: u64,
    /// The device it is a copy-on-write snapshot of.
    pub origin: Option<u64>,
    /// "ext4" or "xfs".
    pub fs: String,
    /// "creating", "ready" or "deleting".
    pub state: String,
    /// "rw" or "ro" as the record wants it attached; `null`: detached.
    pub access: Option<String>,
    /// Block device node while attached.
    pub node: Option<String>,
    /// Bytes held beyond the origin (`null` if unreadable, see `usage_error`).
    pub usage: Option<u64>,
    /// Inodes used beyond the origin.
    pub inodes: Option<u64>,
    /// Why usage could not be read.
    pub usage_error: Option<String>,
    /// Whose it is: "image_layer", "container_rootfs", "volume", "emptydir",
    /// "volume_snapshot"; `null`: no record names it (a leftover, a device
    /// being deleted, or an operation in flight).
    pub consumer: Option<String>,
    /// Snapshot keys this device holds.
    pub snapshots: Vec<String>,
    /// CSI volume or snapshot ids this device holds.
    pub volumes: Vec<String>,
}

impl From<proto::Device> for Device {
    fn from(d: proto::Device) -> Self {
        Device {
            id: d.id,
            size: d.size,
            origin: d.origin,
            fs: d.fs,
            state: d.state,
            access: d.access,
            node: d.node,
            usage: d.usage,
            inodes: d.inodes,
            usage_error: d.usage_error,
            consumer: non_empty(d.consumer),
            snapshots: d.snapshots,
            volumes: d.volumes,
        }
    }
}

/// `check` (what `gc` would do) and `gc` (what it did).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Nothing to do (`check`) or nothing was done (`gc`), and no device is
    /// missing or failed.
    pub clean: bool,
    /// Devices removed: half-created, half-deleted, or referenced by no snapshot.
    pub devices_removed: Vec<u64>,
    /// Active devices attached again.
    pub reattached: Vec<u64>,
    /// Inactive devices whose leftover attachment went.
    pub detached: Vec<u64>,
    /// Kernel or disk state without a record.
    pub orphans: Vec<Orphan>,
    /// Referenced devices whose storage is gone; gc cannot repair them.
    pub missing: Vec<u64>,
    /// Devices gc could not remove, re-attach or detach (the daemon's log has
    /// the same error); the rest of the pool was reconciled without them.
    pub failed: Vec<Failure>,
    /// Orphans gc could not remove, likewise.
    pub orphans_failed: Vec<OrphanFailure>,
    /// Removed devices still open (a VMM holding them): nothing for gc to do,
    /// the daemon deletes them once let go.
    pub held: Vec<u64>,
    /// Orphans still open, likewise.
    pub orphans_held: Vec<Orphan>,
}

/// An orphan reconciliation could not remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrphanFailure {
    #[serde(flatten)]
    pub orphan: Orphan,
    /// The error and its causes.
    pub error: String,
}

/// A device reconciliation could not repair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub device: u64,
    /// "remove", "reattach" or "detach".
    pub repair: String,
    /// The error and its causes.
    pub error: String,
}

/// Something the pool holds without a record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Orphan {
    /// "file", "loop", "dm_device" or "thin_id".
    pub kind: String,
    /// Path, dm name or thin id.
    pub what: String,
}

impl From<proto::Orphan> for Orphan {
    fn from(o: proto::Orphan) -> Self {
        Orphan { kind: o.kind, what: o.what }
    }
}

impl Report {
    /// Whether nothing needs (or needed) doing and nothing is missing or failed.
    pub fn is_clean(&self) -> bool {
        self.devices_removed.is_empty()
            && self.reattached.is_empty()
            && self.detached.is_empty()
            && self.orphans.is_empty()
            && self.missing.is_empty()
            && !self.unrepaired()
    }

    /// Whether some device or orphan could not be repaired.
    pub fn unrepaired(&self) -> bool {
        !self.failed.is_empty() || !self.orphans_failed.is_empty()
    }
}

impl From<proto::ReconcileReport> for Report {
    fn from(r: proto::ReconcileReport) -> Self {
        let mut out = Report {
            clean: false,
            devices_removed: r.devices_removed,
            reattached: r.reattached,
            detached: r.detached,
            orphans: r.orphans.into_iter().map(Orphan::from).collect(),
            missing: r.missing,
            failed: r.failed.into_iter().map(|f| Failure { device: f.device, repair: f.repair, error: f.error }).collect(),
            orphans_failed: r
                .orphans_failed
                .into_iter()
                .map(|f| OrphanFailure { orphan: f.orphan.map(Orphan::from).unwrap_or_default(), error: f.error })
                .collect(),
            held: r.held,
            orphans_held: r.orphans_held.into_iter().map(Orphan::from).collect(),
        };
        out.clean = out.is_clean();
        out
    }
}

/// `gc --containerd`: the snapshots containerd no longer knows that were
/// removed (with `dry_run`: would be), and those kept all the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerdGc {
    /// `--dry-run`: nothing was removed; `removed` is what would have been.
    pub dry_run: bool,
    /// `--min-age` in seconds: snapshots changed more recently were kept.
    pub min_age: u64,
    /// containerd's proxy snapshotters served by this daemon (`--snapshotter`
    /// and any other name containerd gives the same socket).
    pub snapshotters: Vec<String>,
    /// containerd's namespaces; every one was listed.
    pub namespaces: Vec<String>,
    /// Snapshots the daemon held before.
    pub snapshots: usize,
    /// Of those, how many containerd lists (kept).
    pub known: usize,
    /// Of those, how many containerd did not make (key not `<ns>/<n>/<name>`; kept).
    pub other: usize,
    /// Removed, in the order removed (children before parents).
    pub removed: Vec<GcSnapshot>,
    /// Unknown to containerd, yet kept (by key).
    pub kept: Vec<KeptSnapshot>,
}

/// A snapshot `gc --containerd` removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GcSnapshot {
    /// Its key in the daemon (`<namespace>/<n>/<containerd's key>`).
    pub key: String,
    /// "active", "view" or "committed".
    pub kind: String,
    /// Its parent's key.
    pub parent: Option<String>,
}

/// A snapshot unknown to containerd that `gc --containerd` kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeptSnapshot {
    /// Its key in the daemon.
    pub key: String,
    /// "active", "view" or "committed".
    pub kind: String,
    /// Why it was kept.
    pub reason: KeepReason,
}

/// `host`: what this machine offers VM sandboxes. An object, so more probes
/// can join `kvm` later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostReport {
    /// `/dev/kvm` as its ioctls describe it (see `thinbox_block_passthrough::probe`).
    pub kvm: KvmProbe,
}

impl HostReport {
    /// Probes this machine.
    pub fn probe() -> HostReport {
        HostReport { kvm: thinbox_block_passthrough::probe::kvm() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wires_empty_consumer_is_null() {
        let status = proto::PoolStatus { backend: "reflink".into(), total: 10, free: 4, ..Default::default() };
        let named =
            proto::ConsumerUsage { consumer: "emptydir".into(), devices: 1, bytes: 2, unreadable: 3, outside_pool_volumes: 4, outside_pool_bytes: 5 };
        let unnamed = proto::ConsumerUsage { devices: 1, ..Default::default() };
        let s = PoolStatus::new(status, vec![named, unnamed]);
        assert_eq!(s.used, 6);
        assert_eq!(
            s.consumers,
            [
                ConsumerUsage {
                    consumer: Some("emptydir".into()),
                    devices: 1,
                    bytes: 2,
                    unreadable: 3,
                    outside_pool_volumes: 4,
                    outside_pool_bytes: 5
                },
                ConsumerUsage { consumer: None, devices: 1, bytes: 0, unreadable: 0, outside_pool_volumes: 0, outside_pool_bytes: 0 },
            ]
        );
        let d = Device::from(proto::Device { id: 1, consumer: "volume".into(), volumes: vec!["tb-block-1".into()], ..Default::default() });
        assert_eq!((d.consumer.as_deref(), d.volumes.as_slice(), d.snapshots.len()), (Some("volume"), &["tb-block-1".to_owned()][..], 0));
        assert_eq!(Device::from(proto::Device::default()).consumer, None);
    }
}
