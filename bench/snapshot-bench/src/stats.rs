//! Summary statistics and number formatting.

use serde::Serialize;

/// Summary of one metric's samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median (mean of the two middle samples when `n` is even).
    pub median: f64,
    /// 99th percentile, nearest-rank method.
    pub p99: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

/// Sorts samples ascending; NaNs (never produced by the workloads) go last.
pub fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// Nearest-rank percentile of ascending `sorted` samples: the smallest sample
/// such that at least `p` percent of the samples are less than or equal to it.
/// `p` is clamped to `0..=100`; `None` for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let p = if p.is_nan() { 100.0 } else { p.clamp(0.0, 100.0) };
    let n = sorted.len();
    // rank = ceil(p/100 * n), at least 1. Computed in integers where possible so
    // that e.g. p=99, n=100 gives exactly rank 99.
    let exact = p / 100.0 * n as f64;
    let mut rank = exact.ceil() as usize;
    // Guard against floating-point noise pushing an exact integer up by one.
    if rank > 0 && (exact - (rank - 1) as f64).abs() < 1e-9 {
        rank -= 1;
    }
    let rank = rank.clamp(1, n);
    sorted.get(rank - 1).copied()
}

/// Median of ascending `sorted` samples; `None` for no samples.
pub fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    if n % 2 == 1 { sorted.get(n / 2).copied() } else { Some((sorted.get(n / 2 - 1)? + sorted.get(n / 2)?) / 2.0) }
}

/// Summarises samples in any order; `None` for no samples.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let s = sorted(samples);
    Some(Summary {
        n: s.len(),
        median: median(&s)?,
        p99: percentile(&s, 99.0)?,
        min: *s.first()?,
        max: *s.last()?,
        mean: s.iter().sum::<f64>() / s.len() as f64,
    })
}

/// `numerator / baseline` as `0.42×`; `n/a` when the baseline is zero or
/// either number is not finite.
pub fn format_ratio(numerator: f64, baseline: f64) -> String {
    if !numerator.is_finite() || !baseline.is_finite() || baseline <= 0.0 || numerator < 0.0 {
        return "n/a".to_owned();
    }
    let r = numerator / baseline;
    if r >= 100.0 {
        format!("{r:.0}×")
    } else if r >= 10.0 {
        format!("{r:.1}×")
    } else {
        format!("{r:.2}×")
    }
}

/// A value with about three significant digits and no exponent.
pub fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_owned();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(n: usize) -> Vec<f64> {
        (1..=n).map(|i| i as f64).collect()
    }

    #[test]
    fn percentile_nearest_rank() {
        assert_eq!(percentile(&[], 99.0), None);
        assert_eq!(percentile(&[5.0], 99.0), Some(5.0));
        assert_eq!(percentile(&[5.0], 0.0), Some(5.0));
        // n = 100: p99 is the 99th value, p100 the last.
        let h = range(100);
        assert_eq!(percentile(&h, 99.0), Some(99.0));
        assert_eq!(percentile(&h, 100.0), Some(100.0));
        assert_eq!(percentile(&h, 50.0), Some(50.0));
        assert_eq!(percentile(&h, 1.0), Some(1.0));
        assert_eq!(percentile(&h, 0.0), Some(1.0));
        // n = 80: ceil(79.2) = 80 -> the maximum.
        assert_eq!(percentile(&range(80), 99.0), Some(80.0));
        // n = 1000: rank 990.
        assert_eq!(percentile(&range(1000), 99.0), Some(990.0));
        // n = 10: ceil(9.9) = 10.
        assert_eq!(percentile(&range(10), 99.0), Some(10.0));
        // Out-of-range p is clamped.
        assert_eq!(percentile(&h, 150.0), Some(100.0));
        assert_eq!(percentile(&h, -3.0), Some(1.0));
    }

    #[test]
    fn median_odd_even() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[1.0, 3.0]), Some(2.0));
        assert_eq!(median(&[1.0, 2.0, 10.0]), Some(2.0));
    }

    #[test]
    fn summarize_unsorted() {
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).expect("samples");
        assert_eq!(s.n, 4);
        assert_eq!(s.median, 2.5);
        assert_eq!(s.p99, 4.0);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 4.0);
        assert_eq!(s.mean, 2.5);
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn ratio_formatting() {
        assert_eq!(format_ratio(1.0, 2.0), "0.50×");
        assert_eq!(format_ratio(2.0, 2.0), "1.00×");
        assert_eq!(format_ratio(0.0, 2.0), "0.00×");
        assert_eq!(format_ratio(25.0, 2.0), "12.5×");
        assert_eq!(format_ratio(500.0, 2.0), "250×");
        assert_eq!(format_ratio(1.0, 0.0), "n/a");
        assert_eq!(format_ratio(f64::NAN, 1.0), "n/a");
        assert_eq!(format_ratio(1.0, f64::INFINITY), "n/a");
        assert_eq!(format_ratio(-1.0, 1.0), "n/a");
    }

    #[test]
    fn value_formatting() {
        assert_eq!(format_value(0.12345), "0.123");
        assert_eq!(format_value(12.345), "12.35");
        assert_eq!(format_value(123.45), "123.5");
        assert_eq!(format_value(f64::NAN), "n/a");
    }
}
