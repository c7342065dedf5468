//! The pool's gauges, read at each scrape: data and metadata space, and the
//! devices each consumer holds. A figure that cannot be read is left out (and
//! logged), not the scrape.

use std::sync::Arc;

use thinbox_csi::Driver;
use thinbox_metrics::{Collector, DescriptorEncoder, Unit, encode_gauges};
use thinbox_snapshotter::Snapshots;

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

    /// Devices by consumer: image layers (committed snapshots), container
    /// rootfs (active snapshots and views), volumes and emptyDirs (inline
    /// ephemeral volumes).
    fn devices(&self) -> Vec<([(&'static str, &'static str); 1], u64)> {
        let mut out = Vec::new();
        match self.snapshots.counts() {
            Ok((layers, rootfs)) => out.extend([([("consumer", "image_layers")], layers), ([("consumer", "container_rootfs")], rootfs)]),
            Err(e) => tracing::warn!(error = %thinbox_daemon::chain(&e), "metrics: snapshots"),
        }
        match self.driver.volumes() {
            Ok(vols) => {
                let empty_dirs = vols.iter().filter(|v| v.ephemeral).count() as u64;
                out.extend([([("consumer", "volumes")], vols.len() as u64 - empty_dirs), ([("consumer", "emptydirs")], empty_dirs)]);
            }
            Err(e) => tracing::warn!(error = %thinbox_daemon::chain(&e), "metrics: volumes"),
        }
        out
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
        encode_gauges(&mut encoder, "thinbox_pool_devices", "Devices in the pool, by consumer", None, self.devices())
    }
}
