//! The pool's gauges, read at each scrape: data and metadata space, the
//! devices each consumer holds, and those still being deleted. A figure that
//! cannot be read is left out (and logged), not the scrape.

use std::sync::Arc;

use thinbox_csi::Driver;
use thinbox_metrics::{Collector, DescriptorEncoder, Unit, encode_gauges};
use thinbox_snapshotter::Snapshots;

use crate::admin::Consumer;

/// Gauges of the one pool and its consumers.
#[derive(Debug)]
pub struct Pool {
    snapshots: Arc<Snapshots>,
    driver: Arc<Driver>,
}

impl Pool {
    pub fn new(snapshots: Arc<Snapshots>, driver: Arc<Driver>) -> Pool {
        Pool { snapshots, driver }
    }

    /// Pool devices by consumer, classified as the admin service does: image
    /// layers (committed snapshots), container rootfs (active snapshots and
    /// views), volumes and emptyDirs (inline ephemeral volumes); `dir`
    /// volumes hold no device. A front end
    /// whose records cannot be read leaves out its consumers only.
    fn devices(&self) -> Vec<([(&'static str, &'static str); 1], u64)> {
        let mut out = Vec::new();
        match self.snapshots.devices() {
            Ok(snaps) => {
                out.extend(count([Consumer::ImageLayer, Consumer::ContainerRootfs], snaps.iter().map(|(_, kind, _)| Consumer::of_snapshot(*kind))))
            }
            Err(e) => tracing::warn!(error = %thinbox_daemon::chain(&e), "metrics: snapshots"),
        }
        match self.driver.volumes() {
            Ok(vols) => {
                out.extend(count([Consumer::Volume, Consumer::EmptyDir], vols.iter().filter(|v| v.device.is_some()).map(Consumer::of_volume)))
            }
            Err(e) => tracing::warn!(error = %thinbox_daemon::chain(&e), "metrics: volumes"),
        }
        out
    }
}

/// How many of `of` are each of `consumers`, as gauge samples.
fn count<const N: usize>(consumers: [Consumer; N], of: impl Iterator<Item = Consumer>) -> [([(&'static str, &'static str); 1], u64); N] {
    let mut n = [0; N];
    for c in of {
        if let Some(i) = consumers.iter().position(|x| *x == c) {
            n[i] += 1;
        }
    }
    std::array::from_fn(|i| ([("consumer", label(consumers[i]))], n[i]))
}

/// The metric's label value (plural, unlike the admin API's names).
fn label(c: Consumer) -> &'static str {
    match c {
        Consumer::ImageLayer => "image_layers",
        Consumer::ContainerRootfs => "container_rootfs",
        Consumer::Volume => "volumes",
        Consumer::EmptyDir => "emptydirs",
        Consumer::VolumeSnapshot => "volume_snapshots",
    }
}

impl Collector for Pool {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let status = self.snapshots.pool().status().map_err(|e| tracing::warn!(error = %thinbox_daemon::chain(&e), "metrics: pool status")).ok();
        let data = status.iter().flat_map(|s| {
            [
                ([("state", "total")], s.total.get()),
                ([("state", "used")], s.total.get().saturating_sub(s.free.get())),
                ([("state", "reserve")], s.reserve.get()),
            ]
        });
        encode_gauges(&mut encoder, "thinbox_pool_data", "Pool data space: total, used and kept in reserve", Some(&Unit::Bytes), data)?;
        let metadata =
            status.iter().filter_map(|s| s.metadata).flat_map(|m| [([("state", "total")], m.total.get()), ([("state", "used")], m.used.get())]);
        encode_gauges(
            &mut encoder,
            "thinbox_pool_metadata",
            "Thin pool metadata space: total and used (dm-thin only)",
            Some(&Unit::Bytes),
            metadata,
        )?;
        encode_gauges(&mut encoder, "thinbox_pool_devices", "Devices in the pool, by consumer", None, self.devices())?;
        let deleting = status.iter().map(|s| ([] as [(&str, &str); 0], s.deleting));
        encode_gauges(
            &mut encoder,
            "thinbox_pool_deleting_devices",
            "Devices removed but not yet deleted: queued, retrying, or still open (dm-thin)",
            None,
            deleting,
        )?;
        let unattached = status.iter().map(|s| ([] as [(&str, &str); 0], s.unattached));
        encode_gauges(
            &mut encoder,
            "thinbox_pool_unattached_devices",
            "Devices in use (active snapshots and views, volumes) that are not attached: their re-attach failed",
            None,
            unattached,
        )
    }
}
