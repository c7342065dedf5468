//! Prometheus metrics over plain HTTP (`GET /metrics`, text format 0.0.4):
//! operation counts and latencies, pool capacity, per-volume size and use.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::driver::Driver;
use crate::state::Kind;

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

#[derive(Clone, Debug, Default)]
struct Op {
    count: u64,
    sum: f64,
    /// Per bucket of [`BUCKETS`], observations at or below its bound.
    le: [u64; BUCKETS.len()],
}

/// Operation statistics, by RPC and outcome.
#[derive(Debug, Default)]
pub struct Metrics {
    ops: Mutex<BTreeMap<(&'static str, bool), Op>>,
}

impl Metrics {
    /// Records one RPC.
    pub fn observe(&self, op: &'static str, ok: bool, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let o = ops.entry((op, ok)).or_default();
        o.count += 1;
        o.sum += secs;
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                o.le[i] += 1;
            }
        }
    }

    /// The exposition text: operations, then pool and volume gauges read now.
    pub fn render(&self, driver: &Driver) -> String {
        let mut out = String::new();
        out.push_str("# HELP thinbox_csi_operations_total CSI calls served, by operation and result.\n# TYPE thinbox_csi_operations_total counter\n");
        let ops = self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for ((op, ok), o) in &ops {
            let _ = writeln!(out, "thinbox_csi_operations_total{{op=\"{op}\",result=\"{}\"}} {}", result(*ok), o.count);
        }
        out.push_str(
            "# HELP thinbox_csi_operation_duration_seconds Latency of CSI calls.\n# TYPE thinbox_csi_operation_duration_seconds histogram\n",
        );
        for ((op, ok), o) in &ops {
            let labels = format!("op=\"{op}\",result=\"{}\"", result(*ok));
            for (bound, n) in BUCKETS.iter().zip(o.le) {
                let _ = writeln!(out, "thinbox_csi_operation_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(out, "thinbox_csi_operation_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", o.count);
            let _ = writeln!(out, "thinbox_csi_operation_duration_seconds_sum{{{labels}}} {}", o.sum);
            let _ = writeln!(out, "thinbox_csi_operation_duration_seconds_count{{{labels}}} {}", o.count);
        }
        out.push_str("# HELP thinbox_csi_available_bytes Room for new volumes, by kind.\n# TYPE thinbox_csi_available_bytes gauge\n");
        for kind in [Kind::Block, Kind::File] {
            match driver.capacity(kind) {
                Ok(free) => {
                    let _ = writeln!(out, "thinbox_csi_available_bytes{{kind=\"{}\"}} {free}", kind.as_str());
                }
                Err(e) => tracing::warn!(error = %crate::error::chain(&e), "metrics: capacity"),
            }
        }
        out.push_str("# HELP thinbox_csi_volume_capacity_bytes Size of each volume.\n# TYPE thinbox_csi_volume_capacity_bytes gauge\n");
        out.push_str(
            "# HELP thinbox_csi_volume_allocated_bytes Storage each volume holds on the node.\n# TYPE thinbox_csi_volume_allocated_bytes gauge\n",
        );
        match driver.volumes() {
            Ok(vols) => {
                for v in vols {
                    let labels = format!("volume=\"{}\",kind=\"{}\"", v.id, v.kind.as_str());
                    let _ = writeln!(out, "thinbox_csi_volume_capacity_bytes{{{labels}}} {}", v.size.get());
                    match driver.allocated(&v) {
                        Ok(bytes) => {
                            let _ = writeln!(out, "thinbox_csi_volume_allocated_bytes{{{labels}}} {bytes}");
                        }
                        Err(e) => tracing::warn!(volume = %v.id, error = %crate::error::chain(&e), "metrics: usage"),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %crate::error::chain(&e), "metrics: volumes"),
        }
        out
    }
}

fn result(ok: bool) -> &'static str {
    if ok { "ok" } else { "error" }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, driver: Arc<Driver>) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(address = %addr, "serving Prometheus metrics at /metrics");
    }
    loop {
        let (mut conn, _) = listener.accept().await?;
        let (metrics, driver) = (metrics.clone(), driver.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let response = if request.starts_with("GET /metrics ") || request.starts_with("GET /metrics?") {
                let body = tokio::task::spawn_blocking(move || metrics.render(&driver)).await.unwrap_or_default();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
            };
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe("create_volume", true, Duration::from_millis(20));
        m.observe("create_volume", true, Duration::from_secs(2));
        let ops = m.ops.lock().unwrap_or_else(|p| p.into_inner());
        let o = &ops[&("create_volume", true)];
        assert_eq!(o.count, 2);
        assert_eq!(o.le[0], 0, "5ms");
        assert_eq!(o.le[2], 1, "25ms");
        assert_eq!(o.le[8], 2, "5s");
    }
}
