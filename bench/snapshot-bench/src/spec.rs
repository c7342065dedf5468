//! Command-line vocabulary: target specifications and workload names.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;

/// One snapshot service to measure, parsed from
/// `NAME=SOCKET[,snapshotter=NAME][,namespace=NS][,pid=PID]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetSpec {
    /// Label used in the report (`thinbox`, `overlayfs`, ...).
    pub name: String,
    /// Unix socket that serves `containerd.services.snapshots.v1.Snapshots`.
    pub socket: PathBuf,
    /// Value of the `snapshotter` request field. containerd routes on it
    /// (`overlayfs`); a proxy snapshotter such as Thinbox ignores it.
    pub snapshotter: String,
    /// containerd namespace sent as the `containerd-namespace` gRPC header on
    /// every request. containerd requires one; a bare snapshotter does not.
    pub namespace: Option<String>,
    /// Process whose `VmRSS` the `rss` workload reports.
    pub pid: Option<u32>,
}

/// Why a `--target` value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// No `NAME=SOCKET` at the start.
    #[error("expected NAME=SOCKET[,snapshotter=..][,namespace=..][,pid=..], got {0:?}")]
    Shape(String),
    /// `NAME` is empty or has characters that do not fit in a snapshot key.
    #[error("target name {0:?} must be non-empty and use only [A-Za-z0-9._-]")]
    Name(String),
    /// An option other than `snapshotter`, `namespace`, `pid`.
    #[error("unknown target option {0:?} (known: snapshotter, namespace, pid)")]
    UnknownOption(String),
    /// The same option given twice.
    #[error("target option {0:?} given twice")]
    Duplicate(String),
    /// An option with an empty or malformed value.
    #[error("bad value {value:?} for target option {option:?}")]
    Value {
        /// Option name.
        option: String,
        /// Offending value.
        value: String,
    },
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl FromStr for TargetSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default();
        let (name, socket) = head.split_once('=').ok_or_else(|| SpecError::Shape(s.to_owned()))?;
        let (name, socket) = (name.trim(), socket.trim());
        if !valid_name(name) {
            return Err(SpecError::Name(name.to_owned()));
        }
        if socket.is_empty() {
            return Err(SpecError::Shape(s.to_owned()));
        }
        let mut snapshotter = None;
        let mut namespace = None;
        let mut pid = None;
        for part in parts {
            let (key, value) = part.split_once('=').ok_or_else(|| SpecError::Shape(s.to_owned()))?;
            let (key, value) = (key.trim(), value.trim());
            let bad = || SpecError::Value { option: key.to_owned(), value: value.to_owned() };
            if value.is_empty() {
                return Err(bad());
            }
            let slot_taken = match key {
                "snapshotter" => snapshotter.replace(value.to_owned()).is_some(),
                "namespace" => {
                    // gRPC metadata values must be visible ASCII.
                    if !value.chars().all(|c| c.is_ascii_graphic()) {
                        return Err(bad());
                    }
                    namespace.replace(value.to_owned()).is_some()
                }
                "pid" => {
                    let parsed: u32 = value.parse().map_err(|_| bad())?;
                    if parsed == 0 {
                        return Err(bad());
                    }
                    pid.replace(parsed).is_some()
                }
                other => return Err(SpecError::UnknownOption(other.to_owned())),
            };
            if slot_taken {
                return Err(SpecError::Duplicate(key.to_owned()));
            }
        }
        Ok(TargetSpec { name: name.to_owned(), socket: PathBuf::from(socket), snapshotter: snapshotter.unwrap_or_default(), namespace, pid })
    }
}

/// A benchmark workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Prepare/Commit a layer chain, View its top, Remove it all.
    Chain,
    /// Many containers Prepared at once from one image.
    Parallel,
    /// Daemon memory with many snapshots alive.
    Rss,
}

impl Workload {
    /// Every workload, in the default order.
    pub const ALL: [Workload; 3] = [Workload::Chain, Workload::Parallel, Workload::Rss];

    /// Lower-case name as used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Chain => "chain",
            Workload::Parallel => "parallel",
            Workload::Rss => "rss",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "chain" => Ok(Workload::Chain),
            "parallel" => Ok(Workload::Parallel),
            "rss" => Ok(Workload::Rss),
            other => Err(format!("unknown workload {other:?} (known: chain, parallel, rss)")),
        }
    }
}

/// Parses `chain,parallel,rss` (order kept, duplicates dropped).
pub fn parse_workloads(s: &str) -> Result<Vec<Workload>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let w: Workload = part.parse()?;
        if !out.contains(&w) {
            out.push(w);
        }
    }
    if out.is_empty() {
        return Err("no workloads given".to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_target() {
        let t: TargetSpec = "thinbox=/run/thinbox.sock".parse().expect("parses");
        assert_eq!(t.name, "thinbox");
        assert_eq!(t.socket, PathBuf::from("/run/thinbox.sock"));
        assert_eq!(t.snapshotter, "");
        assert_eq!(t.namespace, None);
        assert_eq!(t.pid, None);
    }

    #[test]
    fn full_target() {
        let t: TargetSpec = "overlayfs=/tmp/c/containerd.sock,snapshotter=overlayfs,namespace=bench,pid=42".parse().expect("parses");
        assert_eq!(t.name, "overlayfs");
        assert_eq!(t.socket, PathBuf::from("/tmp/c/containerd.sock"));
        assert_eq!(t.snapshotter, "overlayfs");
        assert_eq!(t.namespace.as_deref(), Some("bench"));
        assert_eq!(t.pid, Some(42));
    }

    #[test]
    fn options_in_any_order_and_socket_with_equals() {
        let t: TargetSpec = "a=/tmp/x=y.sock,pid=7,namespace=ns".parse().expect("parses");
        assert_eq!(t.socket, PathBuf::from("/tmp/x=y.sock"));
        assert_eq!(t.pid, Some(7));
        assert_eq!(t.namespace.as_deref(), Some("ns"));
    }

    #[test]
    fn rejects_bad_targets() {
        let err = |s: &str| s.parse::<TargetSpec>().expect_err(s);
        assert!(matches!(err("/run/x.sock"), SpecError::Shape(_)));
        assert!(matches!(err("=/run/x.sock"), SpecError::Name(_)));
        assert!(matches!(err("a b=/run/x.sock"), SpecError::Name(_)));
        assert!(matches!(err("a="), SpecError::Shape(_)));
        assert!(matches!(err("a=/s,pid=abc"), SpecError::Value { .. }));
        assert!(matches!(err("a=/s,pid=0"), SpecError::Value { .. }));
        assert!(matches!(err("a=/s,namespace="), SpecError::Value { .. }));
        assert!(matches!(err("a=/s,colour=red"), SpecError::UnknownOption(_)));
        assert!(matches!(err("a=/s,pid=1,pid=2"), SpecError::Duplicate(_)));
        assert!(matches!(err("a=/s,pid"), SpecError::Shape(_)));
    }

    #[test]
    fn workloads_list() {
        assert_eq!(parse_workloads("rss,chain,rss").expect("parses"), vec![Workload::Rss, Workload::Chain]);
        assert_eq!(parse_workloads("chain,parallel,rss").expect("parses"), Workload::ALL.to_vec());
        assert!(parse_workloads("chain,nope").is_err());
        assert!(parse_workloads("").is_err());
    }
}
