//! Raw samples collected per metric and target.

use serde::Serialize;

use crate::spec::Workload;

/// Unit of a metric's samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Milliseconds (latency, wall time).
    Ms,
    /// Mebibytes (resident memory).
    MiB,
}

impl Unit {
    /// Short name for tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Ms => "ms",
            Unit::MiB => "MiB",
        }
    }
}

/// Identity of a metric: which workload, which operation, which unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetricId {
    /// Workload that produced it.
    pub workload: Workload,
    /// Operation or quantity (`prepare`, `rss with 1000 snapshots`, ...).
    pub op: String,
    /// Unit of its samples.
    pub unit: Unit,
}

/// What one target produced for one metric.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cell {
    /// Measured samples (possibly none yet).
    Samples(Vec<f64>),
    /// Not measurable for this target, with the reason shown instead.
    NotAvailable(String),
}

/// One metric's cells, one per target (same order as the targets).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricRow {
    /// Which metric.
    pub id: MetricId,
    /// One cell per target.
    pub cells: Vec<Cell>,
}

/// A workload run that failed for one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// Workload.
    pub workload: Workload,
    /// Target name.
    pub target: String,
    /// Repeat index.
    pub repeat: usize,
    /// Error text.
    pub error: String,
}

/// Samples from one workload run on one target, merged into [`Results`]
/// only when the run succeeds.
#[derive(Debug, Default)]
pub struct Batch {
    entries: Vec<(String, Unit, Option<f64>, Option<String>)>,
}

impl Batch {
    /// Adds a sample.
    pub fn push(&mut self, op: impl Into<String>, unit: Unit, value: f64) {
        self.entries.push((op.into(), unit, Some(value), None));
    }

    /// Adds a latency sample in milliseconds.
    pub fn push_duration(&mut self, op: impl Into<String>, d: std::time::Duration) {
        self.push(op, Unit::Ms, d.as_secs_f64() * 1000.0);
    }

    /// Marks a metric as not measurable for this target.
    pub fn not_available(&mut self, op: impl Into<String>, unit: Unit, why: impl Into<String>) {
        self.entries.push((op.into(), unit, None, Some(why.into())));
    }
}

/// All metrics of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Results {
    /// Target names, in command-line order; the first is the baseline.
    pub targets: Vec<String>,
    /// Metrics in the order they were declared or first seen.
    pub rows: Vec<MetricRow>,
    /// Workload runs that failed.
    pub failures: Vec<Failure>,
}

impl Results {
    /// Empty results for these targets.
    pub fn new(targets: Vec<String>) -> Self {
        Results { targets, rows: Vec::new(), failures: Vec::new() }
    }

    /// Index of the row for a metric, created (with empty cells) if new.
    pub fn declare(&mut self, workload: Workload, op: &str, unit: Unit) -> usize {
        if let Some(i) = self.rows.iter().position(|r| r.id.workload == workload && r.id.op == op && r.id.unit == unit) {
            return i;
        }
        self.rows.push(MetricRow { id: MetricId { workload, op: op.to_owned(), unit }, cells: vec![Cell::Samples(Vec::new()); self.targets.len()] });
        self.rows.len() - 1
    }

    /// Merges a successful run's batch for target `target`.
    pub fn merge(&mut self, workload: Workload, target: usize, batch: Batch) {
        for (op, unit, value, why) in batch.entries {
            let row = self.declare(workload, &op, unit);
            let Some(cell) = self.rows.get_mut(row).and_then(|r| r.cells.get_mut(target)) else {
                continue;
            };
            match (value, why) {
                (Some(v), _) => match cell {
                    Cell::Samples(s) => s.push(v),
                    Cell::NotAvailable(_) => *cell = Cell::Samples(vec![v]),
                },
                (None, Some(why)) => {
                    if matches!(cell, Cell::Samples(s) if s.is_empty()) {
                        *cell = Cell::NotAvailable(why);
                    }
                }
                (None, None) => {}
            }
        }
    }

    /// Whether `target` failed any run of `workload`.
    pub fn failed(&self, workload: Workload, target: &str) -> bool {
        self.failures.iter().any(|f| f.workload == workload && f.target == target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_order_and_targets() {
        let mut r = Results::new(vec!["a".into(), "b".into()]);
        r.declare(Workload::Rss, "rss before", Unit::MiB);
        let mut b = Batch::default();
        b.push("prepare", Unit::Ms, 1.0);
        b.push("prepare", Unit::Ms, 2.0);
        b.not_available("rss before", Unit::MiB, "n/a (no --pid)");
        r.merge(Workload::Rss, 1, b);
        assert_eq!(r.rows.len(), 2);
        assert_eq!(r.rows[0].id.op, "rss before");
        assert_eq!(r.rows[0].cells[0], Cell::Samples(vec![]));
        assert_eq!(r.rows[0].cells[1], Cell::NotAvailable("n/a (no --pid)".into()));
        assert_eq!(r.rows[1].cells[1], Cell::Samples(vec![1.0, 2.0]));
    }
}
