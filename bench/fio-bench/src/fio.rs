//! fio's `--output-format=json`, the few fields the report uses, and running
//! fio on the host.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thinbox_bench_stats::{median, sorted};

use crate::Error;
use crate::jobs::{FioParams, Job};

/// The top level of fio's JSON output.
#[derive(Clone, Debug, Deserialize)]
pub struct FioOutput {
    /// `fio-3.33`.
    #[serde(rename = "fio version")]
    pub fio_version: String,
    /// One entry per job (one: `--group_reporting` and `--numjobs=1`).
    pub jobs: Vec<FioJob>,
}

/// One job's results.
#[derive(Clone, Debug, Deserialize)]
pub struct FioJob {
    /// `--name`.
    pub jobname: String,
    /// errno of the job's first error, 0 if none.
    pub error: i64,
    /// Reads.
    pub read: FioDirection,
    /// Writes.
    pub write: FioDirection,
}

/// Figures of one direction.
#[derive(Clone, Debug, Deserialize)]
pub struct FioDirection {
    /// Bytes moved in the measured period.
    pub io_bytes: u64,
    /// Bandwidth, bytes per second.
    pub bw_bytes: u64,
    /// I/Os per second.
    pub iops: f64,
    /// Measured milliseconds.
    pub runtime: u64,
    /// I/Os completed.
    pub total_ios: u64,
    /// Total latency, submission included (`--lat_percentiles=1` gives it
    /// percentiles). Completion latency alone would hide the cost of
    /// filesystems that do the I/O inside `io_submit` (9p: no async direct
    /// I/O), so the report uses this.
    pub lat_ns: FioLatency,
}

/// A latency distribution in nanoseconds.
#[derive(Clone, Debug, Deserialize)]
pub struct FioLatency {
    /// Mean.
    pub mean: f64,
    /// Percentiles keyed `"99.000000"`; absent when there were no I/Os.
    #[serde(default)]
    pub percentile: BTreeMap<String, u64>,
}

/// What one cell reports.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// I/Os per second.
    pub iops: f64,
    /// Bandwidth in bytes per second.
    pub bw_bytes: u64,
    /// 99th percentile total latency (submission to completion), microseconds.
    pub p99_us: f64,
    /// Mean total latency, microseconds.
    pub mean_us: f64,
    /// I/Os measured.
    pub total_ios: u64,
    /// Measured milliseconds.
    pub runtime_ms: u64,
}

impl Measurement {
    /// Several rounds of one cell as one: the median of each figure; I/O
    /// counts and runtimes add up. `None` for no rounds.
    pub fn median(rounds: &[Measurement]) -> Option<Measurement> {
        let med = |f: fn(&Measurement) -> f64| median(&sorted(&rounds.iter().map(f).collect::<Vec<_>>()));
        Some(Measurement {
            iops: med(|m| m.iops)?,
            bw_bytes: med(|m| m.bw_bytes as f64)?.round() as u64,
            p99_us: med(|m| m.p99_us)?,
            mean_us: med(|m| m.mean_us)?,
            total_ios: rounds.iter().map(|m| m.total_ios).sum(),
            runtime_ms: rounds.iter().map(|m| m.runtime_ms).sum(),
        })
    }
}

impl FioOutput {
    /// Parses fio's JSON. fio may print notes before the object; they are skipped.
    pub fn parse(text: &str) -> Result<FioOutput, Error> {
        let start = text.find("\n{").map(|i| i + 1).or_else(|| text.starts_with('{').then_some(0));
        let body = start.map_or(text, |i| &text[i..]);
        serde_json::from_str(body).map_err(|source| Error::FioJson { source })
    }

    /// The measurement of `job` (read or write side by its pattern).
    pub fn measurement(&self, job: &Job) -> Result<Measurement, Error> {
        let name = job.name();
        let j = self
            .jobs
            .iter()
            .find(|j| j.jobname == name)
            .ok_or_else(|| Error::FioResult { job: name.clone(), reason: "job missing from fio's output".into() })?;
        if j.error != 0 {
            return Err(Error::FioResult {
                job: name,
                reason: format!("fio reports error {} ({})", j.error, std::io::Error::from_raw_os_error(j.error as i32)),
            });
        }
        let d = if job.pattern.is_read() { &j.read } else { &j.write };
        let p99 = d
            .lat_ns
            .percentile
            .iter()
            .find(|(k, _)| k.parse::<f64>().is_ok_and(|p| (p - 99.0).abs() < 1e-9))
            .map(|(_, v)| *v)
            .ok_or_else(|| Error::FioResult { job: name.clone(), reason: "no 99th percentile (no I/O completed?)".into() })?;
        Ok(Measurement {
            iops: d.iops,
            bw_bytes: d.bw_bytes,
            p99_us: p99 as f64 / 1000.0,
            mean_us: d.lat_ns.mean / 1000.0,
            total_ios: d.total_ios,
            runtime_ms: d.runtime,
        })
    }
}

/// Markers around fio's JSON in a guest's console output.
pub const BEGIN_MARK: &str = "@@fio-bench-json-begin@@";
/// See [`BEGIN_MARK`].
pub const END_MARK: &str = "@@fio-bench-json-end@@";

/// The text between the last [`BEGIN_MARK`] line and the [`END_MARK`] after it.
pub fn between_marks(text: &str) -> Option<&str> {
    let start = text.rfind(BEGIN_MARK)? + BEGIN_MARK.len();
    let rest = &text[start..];
    let end = rest.find(END_MARK)?;
    Some(rest[..end].trim())
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=./:,+@%".contains(&b)) {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A shell script that runs fio with `args` and prints its JSON between the
/// markers; exits with fio's status.
pub fn guest_script(args: &[String]) -> String {
    let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    format!(
        "rm -f /tmp/fio.json; fio {} --output-format=json --output=/tmp/fio.json >/tmp/fio.log 2>&1; rc=$?; echo {BEGIN_MARK}; cat /tmp/fio.json; echo; echo {END_MARK}; [ $rc = 0 ] || tail -n 20 /tmp/fio.log; exit $rc",
        quoted.join(" ")
    )
}

/// Runs one job with the host's fio on `filename`.
pub fn run_host(job: &Job, params: &FioParams, filename: &Path, scratch: &Path) -> Result<Measurement, Error> {
    let out_file = scratch.join(format!("fio-{}.json", job.name()));
    let mut args = params.args(job, &filename.display().to_string());
    args.push("--output-format=json".into());
    args.push(format!("--output={}", out_file.display()));
    let timeout = Duration::from_secs(u64::from(params.job_secs()) * 3 + 60);
    let log = run_with_timeout(Command::new("fio").args(&args), timeout, "fio")?;
    let text = std::fs::read_to_string(&out_file).map_err(|source| Error::Io { what: format!("reading {}", out_file.display()), source })?;
    let _ = std::fs::remove_file(&out_file);
    FioOutput::parse(&text).and_then(|o| o.measurement(job)).map_err(|e| match e {
        Error::FioJson { .. } => Error::Tool { tool: "fio".into(), reason: format!("unreadable output; log: {log}") },
        other => other,
    })
}

/// `fio --version`, e.g. `fio-3.33`.
pub fn host_version() -> Result<String, Error> {
    let out = run_with_timeout(Command::new("fio").arg("--version"), Duration::from_secs(30), "fio")?;
    Ok(out.trim().to_owned())
}

/// Runs a command to completion (killing it after `timeout`); returns its
/// stdout and stderr, or an error with their tail when it fails.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration, tool: &str) -> Result<String, Error> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Io { what: format!("starting {tool}"), source })?;
    let (out, err) = (child.stdout.take(), child.stderr.take());
    // Read both pipes on threads so a chatty child never blocks on a full pipe.
    let read = |p: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = p {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let out_t = read(out.map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let err_t = read(err.map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(|source| Error::Io { what: format!("waiting for {tool}"), source })? {
            Some(s) => break s,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Tool { tool: tool.into(), reason: format!("no result after {} s; killed", timeout.as_secs()) });
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let text = out_t.join().unwrap_or_default() + &err_t.join().unwrap_or_default();
    if !status.success() {
        return Err(Error::Tool { tool: tool.into(), reason: format!("{status}: {}", tail(&text, 15)) });
    }
    Ok(text)
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::jobs::Pattern;

    /// Real outputs of fio 3.33 on this project's dev machine, made with
    /// [`FioParams::args`] (see `tests/fixtures/README.md`).
    const READ: &str = include_str!("../tests/fixtures/fio-randread-4k-qd16.json");
    const WRITE: &str = include_str!("../tests/fixtures/fio-seqwrite-128k-qd1.json");

    #[test]
    fn parses_a_real_read_job() {
        let out = FioOutput::parse(READ).unwrap();
        assert!(out.fio_version.starts_with("fio-"));
        let m = out.measurement(&Job { pattern: Pattern::RandRead4k, iodepth: 16 }).unwrap();
        assert!(m.iops > 0.0 && m.bw_bytes > 0 && m.p99_us > 0.0 && m.total_ios > 0);
        // 4 KiB blocks: bandwidth is IOPS × 4096 (fio rounds both).
        let implied = m.iops * 4096.0;
        assert!((m.bw_bytes as f64 - implied).abs() / implied < 0.01, "{m:?}");
        assert!(m.p99_us >= m.mean_us * 0.5);
    }

    #[test]
    fn parses_a_real_write_job_from_its_write_side() {
        let out = FioOutput::parse(WRITE).unwrap();
        let job = Job { pattern: Pattern::SeqWrite128k, iodepth: 1 };
        let m = out.measurement(&job).unwrap();
        assert!(m.iops > 0.0 && m.p99_us > 0.0);
        assert_eq!(out.jobs[0].read.total_ios, 0, "a write job reads nothing");
        // The read side of a write job has no percentiles: asking for it fails.
        let wrong = Job { pattern: Pattern::SeqRead128k, iodepth: 1 };
        assert!(matches!(out.measurement(&wrong), Err(Error::FioResult { .. })));
    }

    #[test]
    fn notes_before_the_json_are_skipped_and_errors_reported() {
        let noisy = format!("fio: some note\n{READ}");
        assert!(FioOutput::parse(&noisy).is_ok());
        assert!(matches!(FioOutput::parse("not json"), Err(Error::FioJson { .. })));
        let failed = READ.replacen("\"error\" : 0", "\"error\" : 5", 1);
        assert_ne!(failed, READ, "fixture layout changed");
        let out = FioOutput::parse(&failed).unwrap();
        let e = out.measurement(&Job { pattern: Pattern::RandRead4k, iodepth: 16 }).unwrap_err();
        assert!(e.to_string().contains("error 5"), "{e}");
    }

    #[test]
    fn rounds_combine_by_median() {
        let m =
            |iops: f64, p99_us: f64| Measurement { iops, bw_bytes: (iops * 4096.0) as u64, p99_us, mean_us: 1.0, total_ios: 10, runtime_ms: 1000 };
        let c = Measurement::median(&[m(100.0, 9.0), m(300.0, 1.0), m(200.0, 5.0)]).unwrap();
        assert_eq!((c.iops, c.p99_us, c.total_ios, c.runtime_ms), (200.0, 5.0, 30, 3000));
        assert_eq!(Measurement::median(&[m(100.0, 1.0), m(200.0, 3.0)]).unwrap().iops, 150.0);
        assert_eq!(Measurement::median(&[]), None);
    }

    #[test]
    fn guest_output_is_cut_at_the_markers() {
        let console = format!("boot noise\n{BEGIN_MARK}\n{{\"a\": 1}}\n{END_MARK}\nmore\n");
        assert_eq!(between_marks(&console), Some("{\"a\": 1}"));
        assert_eq!(between_marks("nothing"), None);
        let script = guest_script(&["--name=x y".to_owned(), "--rw=read".to_owned()]);
        assert!(script.contains("fio '--name=x y' --rw=read --output-format=json"), "{script}");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
