//! The job matrix — four access patterns at two queue depths — and the fio
//! command line of one job. Every row runs exactly these arguments; only the
//! file name differs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An access pattern with its block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Pattern {
    /// 4 KiB random reads.
    #[serde(rename = "randread-4k")]
    RandRead4k,
    /// 4 KiB random writes.
    #[serde(rename = "randwrite-4k")]
    RandWrite4k,
    /// 128 KiB sequential reads.
    #[serde(rename = "seqread-128k")]
    SeqRead128k,
    /// 128 KiB sequential writes.
    #[serde(rename = "seqwrite-128k")]
    SeqWrite128k,
}

impl Pattern {
    /// All patterns, in table order.
    pub const ALL: [Pattern; 4] = [Pattern::RandRead4k, Pattern::RandWrite4k, Pattern::SeqRead128k, Pattern::SeqWrite128k];

    /// fio's `--rw`.
    pub fn rw(self) -> &'static str {
        match self {
            Pattern::RandRead4k => "randread",
            Pattern::RandWrite4k => "randwrite",
            Pattern::SeqRead128k => "read",
            Pattern::SeqWrite128k => "write",
        }
    }

    /// Block size in bytes.
    pub fn block_size(self) -> u64 {
        match self {
            Pattern::RandRead4k | Pattern::RandWrite4k => 4 << 10,
            Pattern::SeqRead128k | Pattern::SeqWrite128k => 128 << 10,
        }
    }

    /// Whether fio's `read` (else `write`) section holds the numbers.
    pub fn is_read(self) -> bool {
        matches!(self, Pattern::RandRead4k | Pattern::SeqRead128k)
    }

    /// Short name, also the `--jobs` filter word: `randread-4k`, ...
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead4k => "randread-4k",
            Pattern::RandWrite4k => "randwrite-4k",
            Pattern::SeqRead128k => "seqread-128k",
            Pattern::SeqWrite128k => "seqwrite-128k",
        }
    }

    /// Human label: `4k randread`, `128k seq read`.
    pub fn label(self) -> &'static str {
        match self {
            Pattern::RandRead4k => "4k randread",
            Pattern::RandWrite4k => "4k randwrite",
            Pattern::SeqRead128k => "128k seq read",
            Pattern::SeqWrite128k => "128k seq write",
        }
    }
}

/// Queue depths of the matrix.
pub const IODEPTHS: [u32; 2] = [1, 16];

/// One cell column: a pattern at a queue depth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Job {
    /// Access pattern and block size.
    pub pattern: Pattern,
    /// fio's `--iodepth`.
    pub iodepth: u32,
}

impl Job {
    /// The whole matrix in table order: each pattern at qd1 then qd16.
    pub fn matrix() -> Vec<Job> {
        Pattern::ALL.iter().flat_map(|&pattern| IODEPTHS.iter().map(move |&iodepth| Job { pattern, iodepth })).collect()
    }

    /// `randread-4k-qd16`.
    pub fn name(&self) -> String {
        format!("{}-qd{}", self.pattern.name(), self.iodepth)
    }

    /// `4k randread qd16`.
    pub fn label(&self) -> String {
        format!("{} qd{}", self.pattern.label(), self.iodepth)
    }
}

impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A `--jobs` filter word: a job (`randread-4k-qd16`), a pattern
/// (`randread-4k`: both depths) or a depth (`qd16`: every pattern).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobFilter {
    /// Exactly one job.
    Job(Job),
    /// Every depth of a pattern.
    Pattern(Pattern),
    /// Every pattern at a depth.
    Depth(u32),
}

impl JobFilter {
    /// Whether `job` passes.
    pub fn matches(&self, job: &Job) -> bool {
        match self {
            JobFilter::Job(j) => j == job,
            JobFilter::Pattern(p) => *p == job.pattern,
            JobFilter::Depth(d) => *d == job.iodepth,
        }
    }
}

impl FromStr for JobFilter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(job) = Job::matrix().into_iter().find(|j| j.name() == s) {
            return Ok(JobFilter::Job(job));
        }
        if let Some(p) = Pattern::ALL.into_iter().find(|p| p.name() == s) {
            return Ok(JobFilter::Pattern(p));
        }
        if let Some(d) = s.strip_prefix("qd").and_then(|d| d.parse::<u32>().ok())
            && IODEPTHS.contains(&d)
        {
            return Ok(JobFilter::Depth(d));
        }
        let names: Vec<String> = Job::matrix().iter().map(Job::name).collect();
        Err(format!(
            "unknown job {s:?}: expected one of {}, a pattern ({}) or qd1/qd16",
            names.join(", "),
            Pattern::ALL.map(Pattern::name).join(", ")
        ))
    }
}

/// The jobs of the matrix that pass any of `filters` (all when empty), in table order.
pub fn select(filters: &[JobFilter]) -> Vec<Job> {
    Job::matrix().into_iter().filter(|j| filters.is_empty() || filters.iter().any(|f| f.matches(j))).collect()
}

/// Parameters shared by every job of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FioParams {
    /// Measured seconds per job (`--runtime`, `--time_based`).
    pub runtime_secs: u32,
    /// Seconds run before measuring (`--ramp_time`).
    pub ramp_secs: u32,
    /// Size of the test file in bytes (`--size`); the file exists and is
    /// fully written before the first job.
    pub file_size: u64,
    /// fio's `--ioengine`.
    pub ioengine: String,
}

impl FioParams {
    /// The fio arguments of `job` on `filename` (without the output options).
    pub fn args(&self, job: &Job, filename: &str) -> Vec<String> {
        vec![
            format!("--name={}", job.name()),
            format!("--filename={filename}"),
            format!("--rw={}", job.pattern.rw()),
            format!("--bs={}", job.pattern.block_size()),
            format!("--iodepth={}", job.iodepth),
            "--direct=1".to_owned(),
            format!("--ioengine={}", self.ioengine),
            format!("--size={}", self.file_size),
            "--time_based=1".to_owned(),
            format!("--runtime={}", self.runtime_secs),
            format!("--ramp_time={}", self.ramp_secs),
            // The file was written before the first job: never lay it out again.
            "--create_on_open=0".to_owned(),
            "--allow_file_create=0".to_owned(),
            "--numjobs=1".to_owned(),
            "--group_reporting=1".to_owned(),
            // Percentiles of the total latency, not only of completion.
            "--lat_percentiles=1".to_owned(),
            // Same random offsets on every row.
            "--randrepeat=1".to_owned(),
            "--norandommap=1".to_owned(),
        ]
    }

    /// Seconds one job takes at least.
    pub fn job_secs(&self) -> u32 {
        self.runtime_secs + self.ramp_secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_is_four_patterns_at_two_depths() {
        let m = Job::matrix();
        assert_eq!(m.len(), 8);
        assert_eq!(m[0].name(), "randread-4k-qd1");
        assert_eq!(m[1].name(), "randread-4k-qd16");
        assert_eq!(m[7].name(), "seqwrite-128k-qd16");
        assert_eq!(m[7].pattern.block_size(), 128 << 10);
        assert!(m[4].pattern.is_read() && !m[6].pattern.is_read());
    }

    #[test]
    fn filters_pick_jobs_patterns_and_depths() {
        let f: Vec<JobFilter> = ["randread-4k-qd16", "seqwrite-128k"].iter().map(|s| s.parse().expect("valid")).collect();
        let names: Vec<String> = select(&f).iter().map(Job::name).collect();
        assert_eq!(names, ["randread-4k-qd16", "seqwrite-128k-qd1", "seqwrite-128k-qd16"]);
        let qd: JobFilter = "qd1".parse().expect("valid");
        assert_eq!(select(&[qd]).len(), 4);
        assert_eq!(select(&[]).len(), 8);
        assert!("randread".parse::<JobFilter>().is_err());
        assert!("qd8".parse::<JobFilter>().is_err());
    }

    #[test]
    fn patterns_serialize_by_their_names() {
        for p in Pattern::ALL {
            assert_eq!(serde_json::to_string(&p).expect("serializes"), format!("\"{}\"", p.name()));
        }
    }

    #[test]
    fn fio_arguments_are_direct_time_based_and_fixed_size() {
        let p = FioParams { runtime_secs: 10, ramp_secs: 2, file_size: 1 << 30, ioengine: "libaio".into() };
        let job = Job { pattern: Pattern::RandWrite4k, iodepth: 16 };
        let args = p.args(&job, "/mnt/t/fio.dat");
        for want in [
            "--rw=randwrite",
            "--bs=4096",
            "--iodepth=16",
            "--direct=1",
            "--ioengine=libaio",
            "--size=1073741824",
            "--runtime=10",
            "--ramp_time=2",
            "--time_based=1",
            "--lat_percentiles=1",
            "--filename=/mnt/t/fio.dat",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} missing from {args:?}");
        }
        assert_eq!(p.job_secs(), 12);
    }
}
