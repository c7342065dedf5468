//! Medians, nearest-rank percentiles and the number formats of the report.

/// Summary of one series of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median (mean of the two middle samples when `n` is even).
    pub median: f64,
    /// 90th percentile, nearest-rank method.
    pub p90: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

/// Nearest-rank percentile of ascending `sorted`: the smallest sample with at
/// least `p` percent of the samples at or below it. `None` for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    // rank = ceil(p * n / 100) in integers (p in tenths), at least 1.
    let tenths = (p.clamp(0.0, 100.0) * 10.0).round() as usize;
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
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Some(Summary { n: s.len(), median: median(&s)?, p90: percentile(&s, 90.0)?, min: *s.first()?, max: *s.last()? })
}

/// `value / baseline` as `0.42×`; `n/a` when either is not a finite positive number.
pub fn ratio(value: f64, baseline: f64) -> String {
    if !value.is_finite() || !baseline.is_finite() || baseline <= 0.0 || value < 0.0 {
        return "n/a".to_owned();
    }
    let r = value / baseline;
    if r >= 10.0 { format!("{r:.1}×") } else { format!("{r:.2}×") }
}

/// About three significant digits, no exponent.
pub fn value(v: f64) -> String {
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

    #[test]
    fn nearest_rank() {
        let h: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&h, 90.0), Some(18.0));
        assert_eq!(percentile(&h, 100.0), Some(20.0));
        assert_eq!(percentile(&h, 0.0), Some(1.0));
        let t: Vec<f64> = (1..=25).map(f64::from).collect();
        // ceil(22.5) = 23.
        assert_eq!(percentile(&t, 90.0), Some(23.0));
        assert_eq!(percentile(&[], 90.0), None);
        assert_eq!(percentile(&[7.0], 90.0), Some(7.0));
    }

    #[test]
    fn medians_and_summary() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, 3.0]), Some(2.0));
        assert_eq!(median(&[1.0, 2.0, 10.0]), Some(2.0));
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).expect("samples");
        assert_eq!((s.n, s.median, s.p90, s.min, s.max), (4, 2.5, 4.0, 1.0, 4.0));
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn formats() {
        assert_eq!(ratio(1.0, 2.0), "0.50×");
        assert_eq!(ratio(25.0, 2.0), "12.5×");
        assert_eq!(ratio(1.0, 0.0), "n/a");
        assert_eq!(value(0.12345), "0.123");
        assert_eq!(value(12.345), "12.35");
        assert_eq!(value(123.45), "123.5");
    }
}
