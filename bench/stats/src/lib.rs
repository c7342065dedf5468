//! Medians, nearest-rank percentiles, ratios and the number formats of the
//! benchmarks' reports: one implementation, so that every table rounds and
//! ranks alike.

use serde::Serialize;

/// Summary of one series of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median (mean of the two middle samples when `n` is even).
    pub median: f64,
    /// 90th percentile, nearest-rank method.
    pub p90: f64,
    /// 99th percentile, nearest-rank method.
    pub p99: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

/// Sorts samples ascending; NaNs (no benchmark produces them) go last.
pub fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// Nearest-rank percentile of ascending `sorted`: the smallest sample with at
/// least `p` percent of the samples at or below it. `p` is clamped to
/// `0..=100` (NaN counts as 100); `None` for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let p = if p.is_nan() { 100.0 } else { p.clamp(0.0, 100.0) };
    // rank = ceil(p * n / 100) in integers (p in tenths), so that e.g. p = 99,
    // n = 100 gives exactly rank 99; at least 1.
    let tenths = (p * 10.0).round() as usize;
    let rank = (tenths * n).div_ceil(1000).clamp(1, n);
    sorted.get(rank - 1).copied()
}

/// Median of ascending `sorted`; `None` for no samples.
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
        p90: percentile(&s, 90.0)?,
        p99: percentile(&s, 99.0)?,
        min: *s.first()?,
        max: *s.last()?,
        mean: s.iter().sum::<f64>() / s.len() as f64,
    })
}

/// `value / baseline`, if both are finite and the baseline positive.
pub fn ratio(value: f64, baseline: f64) -> Option<f64> {
    (value.is_finite() && baseline.is_finite() && baseline > 0.0).then(|| value / baseline)
}

/// `value / baseline` as `0.42×`, `12.5×` or `250×`; `n/a` when
/// [`ratio`] has none or the value is negative.
pub fn format_ratio(value: f64, baseline: f64) -> String {
    match ratio(value, baseline) {
        Some(r) if r >= 0.0 => match r {
            r if r >= 100.0 => format!("{r:.0}×"),
            r if r >= 10.0 => format!("{r:.1}×"),
            r => format!("{r:.2}×"),
        },
        _ => "n/a".to_owned(),
    }
}

/// About three significant digits, no exponent; `n/a` if not finite.
pub fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_owned();
    }
    match v.abs() {
        a if a >= 100.0 => format!("{v:.1}"),
        a if a >= 10.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
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
        // n = 80: ceil(79.2) = 80, the maximum; n = 1000: rank 990.
        assert_eq!(percentile(&range(80), 99.0), Some(80.0));
        assert_eq!(percentile(&range(1000), 99.0), Some(990.0));
        // n = 20: p90 is the 18th; n = 25: ceil(22.5) = 23.
        assert_eq!(percentile(&range(20), 90.0), Some(18.0));
        assert_eq!(percentile(&range(25), 90.0), Some(23.0));
        // Out-of-range p is clamped, NaN is the maximum.
        assert_eq!(percentile(&h, 150.0), Some(100.0));
        assert_eq!(percentile(&h, -3.0), Some(1.0));
        assert_eq!(percentile(&h, f64::NAN), Some(100.0));
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
        assert_eq!((s.n, s.median, s.p90, s.p99, s.min, s.max, s.mean), (4, 2.5, 4.0, 4.0, 1.0, 4.0, 2.5));
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(1.0, 4.0), Some(0.25));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
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
    fn values() {
        assert_eq!(format_value(0.12345), "0.123");
        assert_eq!(format_value(12.345), "12.35");
        assert_eq!(format_value(123.45), "123.5");
        assert_eq!(format_value(f64::NAN), "n/a");
    }
}
