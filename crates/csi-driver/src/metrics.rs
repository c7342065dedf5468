//! The CSI driver's gauges, read at each scrape: room for new volumes, each
//! volume's size and the storage it holds on the node. Operation counts and
//! latencies are the daemons' shared family (`thinbox_operations_total{api="csi",…}`,
//! recorded by the service); the exposition and the endpoint are
//! [`thinbox_metrics`]'s.

use std::sync::Arc;

use thinbox_metrics::{Collector, DescriptorEncoder, Unit, encode_gauges};

use crate::driver::Driver;
use crate::state::{Kind, Volume};

/// The driver's gauges, for [`thinbox_metrics::Metrics::register_collector`].
/// A value that cannot be read is left out (and logged), not the scrape.
#[derive(Debug)]
pub struct Gauges {
    driver: Arc<Driver>,
}

impl Gauges {
    /// Gauges of `driver`'s pool and volumes.
    pub fn new(driver: Arc<Driver>) -> Gauges {
        Gauges { driver }
    }
}

impl Collector for Gauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let d = &self.driver;
        let available = [Kind::Block, Kind::File].into_iter().filter_map(|kind| match d.capacity(kind) {
            Ok(free) => Some(([("kind", kind.as_str())], free)),
            Err(e) => {
                tracing::warn!(kind = kind.as_str(), error = %crate::error::chain(&e), "metrics: capacity");
                None
            }
        });
        encode_gauges(&mut encoder, "thinbox_csi_available", "Room for new volumes, by kind", Some(&Unit::Bytes), available)?;
        let volumes = d.volumes().unwrap_or_else(|e| {
            tracing::warn!(error = %crate::error::chain(&e), "metrics: volumes");
            Vec::new()
        });
        let sizes = volumes.iter().map(|v| (labels(v), v.size.get()));
        encode_gauges(&mut encoder, "thinbox_csi_volume_capacity", "Size of each volume", Some(&Unit::Bytes), sizes)?;
        let allocated = volumes.iter().filter_map(|v| match d.allocated(v) {
            Ok(bytes) => Some((labels(v), bytes)),
            Err(e) => {
                tracing::warn!(volume = %v.id, error = %crate::error::chain(&e), "metrics: usage");
                None
            }
        });
        encode_gauges(&mut encoder, "thinbox_csi_volume_allocated", "Storage each volume holds on the node", Some(&Unit::Bytes), allocated)
    }
}

/// A volume's labels.
fn labels(v: &Volume) -> [(&'static str, &str); 2] {
    [("volume", &v.id), ("kind", v.kind.as_str())]
}
