//! The Thinbox daemons' Prometheus metrics, in the OpenMetrics text format,
//! served at `GET /metrics` by [`serve`].
//!
//! * Operations: each call a daemon serves is counted in
//!   `thinbox_operations_total{api,op,result}` and timed in the histogram
//!   `thinbox_operation_duration_seconds{api,op,result}`
//!   ([`Metrics::observe`]). `api` is `snapshots` (containerd's snapshot
//!   service) or `csi`; `result` is `ok` or `error`.
//! * Gauges read at scrape time (pool space, volumes…): the daemon registers
//!   a [`Collector`] ([`Metrics::register_collector`]), which writes its
//!   families with [`encode_gauges`]. This crate knows nothing of what they
//!   measure. Collectors run on a blocking thread, so they may read the disk
//!   or ask the kernel.

mod http;

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use http::{CONTENT_TYPE, bind, serve};
/// The metric model, for collectors (the same version as this crate's).
pub use prometheus_client;
pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue};
pub use prometheus_client::registry::Unit;

/// Upper bounds (seconds) of the latency buckets: a metadata-only call takes
/// about a millisecond, one that makes a filesystem or waits for the pool
/// seconds; past 30 s only the count and sum tell.
const BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bind metrics endpoint {address}")]
    Bind {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("encode metrics")]
    Encode(#[from] std::fmt::Error),
}

/// The API an operation belongs to (label `api`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    /// containerd's `snapshots.v1` service.
    Snapshots,
    /// CSI Identity, Controller, GroupController and Node.
    Csi,
}

impl Api {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Snapshots => "snapshots",
            Api::Csi => "csi",
        }
    }
}

impl EncodeLabelValue for Api {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// The labels of both operation families.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Operation {
    api: Api,
    op: &'static str,
    result: &'static str,
}

type Histograms = Family<Operation, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// A daemon's metrics: the operation families and the registered collectors.
/// Register collectors first, then share it (`Arc`) between the services
/// that [`observe`](Metrics::observe) and the endpoint that encodes.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    operations: Family<Operation, Counter>,
    durations: Histograms,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// The operation families, no collector yet.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let operations = Family::<Operation, Counter>::default();
        let durations = Histograms::new_with_constructor(histogram);
        // The counter's samples get the `_total` suffix, the histogram's name the unit's.
        registry.register("thinbox_operations", "Calls served, by API, operation and result (ok or error)", operations.clone());
        registry.register_with_unit(
            "thinbox_operation_duration",
            "Time to serve a call, by API, operation and result",
            Unit::Seconds,
            durations.clone(),
        );
        Metrics { registry, operations, durations }
    }

    /// Adds gauges (or anything else) read at each scrape, after the operation families.
    pub fn register_collector(&mut self, collector: impl Collector) {
        self.registry.register_collector(Box::new(collector));
    }

    /// Records one call of `op` (e.g. `prepare`, `create_volume`).
    pub fn observe(&self, api: Api, op: &'static str, ok: bool, elapsed: Duration) {
        let labels = Operation { api, op, result: if ok { "ok" } else { "error" } };
        self.operations.get_or_create(&labels).inc();
        self.durations.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// The exposition (OpenMetrics text, ending in `# EOF`). Runs the
    /// collectors, which may block.
    pub fn encode(&self) -> Result<String, Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Writes one gauge family from a [`Collector`]: its description, then one
/// sample per label set (none: the family is described, empty). `name` comes
/// without the unit's suffix: `("thinbox_csi_available", Some(&Unit::Bytes))`
/// is `thinbox_csi_available_bytes`; `help` has no final period (the encoder
/// adds one). Labels are any
/// [`EncodeLabelSet`](prometheus_client::encoding::EncodeLabelSet), e.g.
/// `[("kind", "block")]`.
pub fn encode_gauges<L, V>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (L, V)>,
) -> std::fmt::Result
where
    L: EncodeLabelSet,
    V: EncodeGaugeValue,
{
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(Debug)]
    struct Pool;

    impl Collector for Pool {
        fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
            encode_gauges(&mut encoder, "thinbox_test_used", "Used", Some(&Unit::Bytes), [([("pool", "a")], 10u64), ([("pool", "b")], 20)])?;
            encode_gauges(&mut encoder, "thinbox_test_devices", "Devices", None, [([] as [(&str, &str); 0], 3i64)])
        }
    }

    #[test]
    fn operations_are_counted_and_timed() {
        let m = Metrics::new();
        m.observe(Api::Csi, "create_volume", true, Duration::from_millis(20));
        m.observe(Api::Csi, "create_volume", true, Duration::from_secs(2));
        m.observe(Api::Snapshots, "remove", false, Duration::from_micros(500));
        let text = m.encode().unwrap();
        for want in [
            "# HELP thinbox_operations Calls served, by API, operation and result (ok or error).\n# TYPE thinbox_operations counter\n",
            "thinbox_operations_total{api=\"csi\",op=\"create_volume\",result=\"ok\"} 2\n",
            "thinbox_operations_total{api=\"snapshots\",op=\"remove\",result=\"error\"} 1\n",
            "# TYPE thinbox_operation_duration_seconds histogram\n",
            "# UNIT thinbox_operation_duration_seconds seconds\n",
            "thinbox_operation_duration_seconds_count{api=\"csi\",op=\"create_volume\",result=\"ok\"} 2\n",
            "thinbox_operation_duration_seconds_sum{api=\"csi\",op=\"create_volume\",result=\"ok\"} 2.02\n",
            // Buckets are cumulative: 20 ms is under 25 ms, 2 s under 2.5 s.
            "thinbox_operation_duration_seconds_bucket{le=\"0.01\",api=\"csi\",op=\"create_volume\",result=\"ok\"} 0\n",
            "thinbox_operation_duration_seconds_bucket{le=\"0.025\",api=\"csi\",op=\"create_volume\",result=\"ok\"} 1\n",
            "thinbox_operation_duration_seconds_bucket{le=\"2.5\",api=\"csi\",op=\"create_volume\",result=\"ok\"} 2\n",
            "thinbox_operation_duration_seconds_bucket{le=\"+Inf\",api=\"csi\",op=\"create_volume\",result=\"ok\"} 2\n",
            "thinbox_operation_duration_seconds_bucket{le=\"0.001\",api=\"snapshots\",op=\"remove\",result=\"error\"} 1\n",
        ] {
            assert!(text.contains(want), "lacks {want:?}:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(!text.contains("op=\"create_volume\",result=\"error\""), "no failed create_volume was observed:\n{text}");
    }

    #[test]
    fn collectors_are_read_at_each_encode() {
        let mut m = Metrics::new();
        m.register_collector(Pool);
        let text = m.encode().unwrap();
        for want in [
            "# TYPE thinbox_test_used_bytes gauge\n# UNIT thinbox_test_used_bytes bytes\n",
            "thinbox_test_used_bytes{pool=\"a\"} 10\n",
            "thinbox_test_used_bytes{pool=\"b\"} 20\n",
            "# TYPE thinbox_test_devices gauge\nthinbox_test_devices 3\n",
        ] {
            assert!(text.contains(want), "lacks {want:?}:\n{text}");
        }
        // Nothing observed yet: a family without members is left out.
        assert!(!text.contains("thinbox_operation"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        #[derive(Debug)]
        struct Odd;
        impl Collector for Odd {
            fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
                encode_gauges(&mut encoder, "thinbox_test", "Odd", None, [([("v", "a\"b\\c\nd")], 1u64)])
            }
        }
        let mut m = Metrics::new();
        m.register_collector(Odd);
        let text = m.encode().unwrap();
        assert!(text.contains(r#"thinbox_test{v="a\"b\\c\nd"} 1"#), "{text}");
    }
}
