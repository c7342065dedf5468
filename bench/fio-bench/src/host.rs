//! What the numbers were measured on: the host's kernel, CPU, memory, tool
//! versions and load.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fio::run_with_timeout;

/// The host of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// `uname -r`.
    pub kernel: String,
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Memory, GiB.
    pub mem_gib: f64,
    /// `fio --version` on the host.
    pub fio_version: String,
    /// First line of `qemu-system-x86_64 --version`, when QEMU is there.
    pub qemu_version: Option<String>,
    /// 1-minute load average when the run started.
    pub load_start: f64,
    /// 1-minute load average when it ended.
    pub load_end: f64,
}

impl HostInfo {
    /// Describes this machine (best effort: unknown fields say so).
    pub fn detect(fio_version: String) -> HostInfo {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        HostInfo {
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".into()),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            mem_gib: mem_total_kib(&meminfo).map_or(0.0, |k| k as f64 / (1 << 20) as f64),
            fio_version,
            qemu_version: qemu_version(),
            load_start: load_average(),
            load_end: 0.0,
        }
    }

    /// One line: `kernel 6.1, AMD EPYC (2 CPUs, 24 GiB), fio-3.33, QEMU 7.2.0`.
    pub fn summary(&self) -> String {
        let qemu = self.qemu_version.as_deref().map(|q| format!(", {q}")).unwrap_or_default();
        format!("kernel {}, {} ({} CPUs, {:.0} GiB), {}{qemu}", self.kernel, self.cpu_model, self.cpus, self.mem_gib, self.fio_version)
    }
}

fn read_trimmed(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_owned()).unwrap_or_else(|_| "unknown".into())
}

/// `model name` of the first CPU.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_owned())
    })
}

/// `MemTotal` in KiB.
pub fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// The 1-minute load average (0 if unreadable).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
}

fn qemu_version() -> Option<String> {
    let out = run_with_timeout(Command::new("qemu-system-x86_64").arg("--version"), Duration::from_secs(30), "qemu-system-x86_64").ok()?;
    let line = out.lines().next()?.trim();
    // "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)" -> "QEMU 7.2.19"
    Some(match line.strip_prefix("QEMU emulator version ") {
        Some(rest) => format!("QEMU {}", rest.split_whitespace().next().unwrap_or(rest)),
        None => line.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: x\n").as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor: 0\n"), None);
        assert_eq!(mem_total_kib("MemTotal:       24589904 kB\nMemFree: 1 kB\n"), Some(24_589_904));
    }
}
