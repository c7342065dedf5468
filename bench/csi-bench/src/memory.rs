//! A daemon's memory as the kernel accounts it: `VmRSS`, `VmHWM`, `RssAnon`
//! and `Threads` from `/proc/PID/status`, `Pss` from `/proc/PID/smaps_rollup`.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// One process to read, from `GROUP:NAME=PID` on the command line: `GROUP`
/// is the side of the comparison (`before`, `after`), `NAME` the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Side of the comparison.
    pub group: String,
    /// Daemon name, as the report prints it.
    pub name: String,
    /// Its process id.
    pub pid: u32,
}

impl FromStr for ProcessSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape = || format!("expected GROUP:NAME=PID, got {s:?}");
        let (group, rest) = s.split_once(':').ok_or_else(shape)?;
        let (name, pid) = rest.split_once('=').ok_or_else(shape)?;
        let pid: u32 = pid.trim().parse().map_err(|_| shape())?;
        let ok = |v: &str| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok(group) || !ok(name) || pid == 0 {
            return Err(shape());
        }
        Ok(ProcessSpec { group: group.to_owned(), name: name.to_owned(), pid })
    }
}

/// One reading of one process (a line of the memory file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    /// Which fill-and-measure round of the run.
    pub round: u32,
    /// Side of the comparison.
    pub group: String,
    /// Daemon name.
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// Resident set size now, KiB.
    pub vm_rss_kib: u64,
    /// Peak resident set size, KiB.
    pub vm_hwm_kib: u64,
    /// Resident anonymous memory (heap, stacks), KiB.
    pub rss_anon_kib: u64,
    /// Proportional set size (shared pages divided among their users), KiB.
    pub pss_kib: u64,
    /// Threads of the process.
    #[serde(default)]
    pub threads: u64,
}

/// The value of the `key:` line of a `/proc` file whose lines read
/// `Key:   12345 kB`.
pub fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.strip_prefix(key).is_some_and(|rest| rest.starts_with(':')))?;
    let mut fields = line[key.len() + 1..].split_whitespace();
    let value = fields.next()?.parse().ok()?;
    matches!(fields.next(), Some("kB") | None).then_some(value)
}

fn read(path: &str) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Io { what: path.to_owned(), source })
}

/// Reads the process's figures now.
pub fn read_process(spec: &ProcessSpec, round: u32) -> Result<Reading, Error> {
    let status_path = format!("/proc/{}/status", spec.pid);
    let rollup_path = format!("/proc/{}/smaps_rollup", spec.pid);
    let status = read(&status_path)?;
    let rollup = read(&rollup_path)?;
    let field = |text: &str, path: &str, key: &str| kib_field(text, key).ok_or_else(|| Error::Parse(format!("no {key} line in {path}")));
    Ok(Reading {
        round,
        group: spec.group.clone(),
        name: spec.name.clone(),
        pid: spec.pid,
        vm_rss_kib: field(&status, &status_path, "VmRSS")?,
        vm_hwm_kib: field(&status, &status_path, "VmHWM")?,
        rss_anon_kib: field(&status, &status_path, "RssAnon")?,
        pss_kib: field(&rollup, &rollup_path, "Pss")?,
        threads: field(&status, &status_path, "Threads")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        let status = "Name:\tthinboxd\nVmHWM:\t   20480 kB\nVmRSS:\t   16384 kB\nRssAnon:\t    9000 kB\nThreads:\t7\n";
        assert_eq!(kib_field(status, "VmRSS"), Some(16384));
        assert_eq!(kib_field(status, "VmHWM"), Some(20480));
        assert_eq!(kib_field(status, "RssAnon"), Some(9000));
        assert_eq!(kib_field(status, "Threads"), Some(7));
        assert_eq!(kib_field(status, "VmPeak"), None);
        let rollup = "55d0-7ff rw-p 00000000 00:00 0   [rollup]\nRss:    16384 kB\nPss:    12001 kB\nPss_Anon:    9000 kB\n";
        assert_eq!(kib_field(rollup, "Pss"), Some(12001));
        assert_eq!(kib_field(rollup, "Pss_Anon"), Some(9000));
        assert_eq!(kib_field("VmRSS:\tabc kB\n", "VmRSS"), None);
        assert_eq!(kib_field("VmRSS:\t1 MB\n", "VmRSS"), None);
    }

    #[test]
    fn process_specs() {
        let p: ProcessSpec = "before:thinbox-csi=42".parse().expect("parses");
        assert_eq!(p, ProcessSpec { group: "before".into(), name: "thinbox-csi".into(), pid: 42 });
        for bad in ["thinbox-csi=42", "before:thinbox-csi", "before:x=0", "before:x=y", ":x=1", "a b:x=1"] {
            assert!(bad.parse::<ProcessSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_own_process() {
        let me = ProcessSpec { group: "g".into(), name: "self".into(), pid: std::process::id() };
        let r = read_process(&me, 1).expect("own /proc entry");
        assert!(r.vm_rss_kib > 0 && r.vm_hwm_kib >= r.vm_rss_kib && r.pss_kib > 0 && r.threads > 0, "{r:?}");
    }
}
