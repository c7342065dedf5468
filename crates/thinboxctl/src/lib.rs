//! `thinboxctl`: the operator's view of a running `thinboxd`.
//!
//! The daemon owns the metadata store (redb admits one process), so every
//! command asks the daemon over its socket (`thinbox.admin.v1`, served next to
//! containerd's snapshot service) instead of opening the store:
//!
//! * `status`: pool capacity, free space, reserve, devices; dm-thin also
//!   metadata use, low-water mark and mode; then what each consumer (image
//!   layers, container rootfs, volumes, emptyDirs) holds: devices and bytes.
//! * `devices`: every device record with its state, attachment, usage, whose
//!   it is (consumer) and the snapshot keys or CSI ids it holds.
//! * `check`: what `gc` would do, read-only; exit code 1 if anything.
//! * `gc`: reconciliation (what containerd's `Cleanup` and a restart do).
//! * `gc --containerd [SOCK]`: instead, removes the snapshots containerd no
//!   longer lists (a collection pass containerd dropped while the daemon was
//!   unreachable); see [`containerd`].
//! * `host`: what this host offers VM sandboxes (is KVM usable, its API
//!   version and vCPU limits), probed locally; it needs no daemon.
//!
//! Output is aligned tables, or one JSON document with `--json`. [`ask`] talks
//! to the daemon (and containerd), [`render::render`] prints; the binary only maps the
//! [`render::Outcome`] or the [`Error`] to an exit code.

pub mod containerd;
pub mod model;
pub mod render;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use thinbox_proto::admin::admin_client::AdminClient;
use thinbox_proto::admin::{CheckRequest, GcRequest, ListDevicesRequest, PoolStatusRequest};
use thinbox_proto::snapshots::snapshots_client::SnapshotsClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::model::{ContainerdGc, Device, HostReport, PoolStatus, Report};

/// Where `thinboxd` serves its snapshot socket by default (README, `scripts/quickstart.sh`).
pub const DEFAULT_ADDRESS: &str = "/run/thinbox/snapshotter.sock";
/// containerd's socket by default.
pub const DEFAULT_CONTAINERD: &str = "/run/containerd/containerd.sock";
/// The name containerd's config gives the proxy snapshotter by default (`[proxy_plugins.thinbox]`).
pub const DEFAULT_SNAPSHOTTER: &str = "thinbox";
/// `gc --containerd` keeps snapshots changed within this many seconds.
pub const DEFAULT_MIN_AGE: u64 = 600;

/// Exit code: success (and for `check`: nothing to clean).
pub const EXIT_OK: u8 = 0;
/// Exit code: `check` found something to clean or a device whose storage is
/// missing, or `gc` left a device or orphan it could not repair.
pub const EXIT_FINDINGS: u8 = 1;
/// Exit code: the daemon (or, for `gc --containerd`, containerd) could not be
/// reached or refused, or bad usage.
pub const EXIT_ERROR: u8 = 2;

/// Command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "thinboxctl",
    version,
    about = "Inspect and clean up the pool of a running thinboxd; probe this host for VM sandboxes (host)",
    after_help = "Exit codes: 0 success; 1 `check` found something to clean or a device whose storage is missing, \
                  or `gc` left a device or orphan it could not repair; \
                  2 the daemon (or for gc --containerd: containerd) could not be reached or refused the request, or bad usage."
)]
pub struct Cli {
    /// thinboxd's snapshot socket (its --snapshotter-address).
    #[arg(long, global = true, env = "THINBOX_SOCKET", default_value = DEFAULT_ADDRESS, value_name = "SOCK")]
    pub address: PathBuf,
    /// Print one JSON document instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for connecting and for the answer (gc on a large pool takes a while).
    #[arg(long, global = true, default_value_t = 60, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Pool capacity, free space and reserve; dm-thin: metadata, low-water mark, mode; devices and
    /// bytes by consumer (image layers, container rootfs, volumes, emptyDirs).
    Status,
    /// Every device: state, attachment, node, usage, consumer, the snapshot keys or CSI ids it holds.
    Devices,
    /// Compare the store with the pool; report what `gc` would do, changing nothing.
    Check,
    /// Remove leftover devices and orphans, re-attach or detach devices to match their records;
    /// with --containerd, instead remove the snapshots containerd no longer knows.
    Gc(GcArgs),
    /// This host's KVM: usable or why not, API version, vCPU limits (probed here, no daemon needed).
    Host,
}

/// `gc`'s options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct GcArgs {
    /// Instead of reconciling the pool: remove every snapshot containerd (at SOCK, default
    /// /run/containerd/containerd.sock) no longer lists in any namespace, children first; refuses if
    /// containerd cannot be reached or any listing fails.
    #[arg(long, value_name = "SOCK", num_args = 0..=1, default_missing_value = DEFAULT_CONTAINERD)]
    pub containerd: Option<PathBuf>,
    /// With --containerd: the proxy snapshotter's name in containerd's config; it must be served at --address.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_SNAPSHOTTER, requires = "containerd")]
    pub snapshotter: String,
    /// With --containerd: list what would be removed, remove nothing.
    #[arg(long, requires = "containerd")]
    pub dry_run: bool,
    /// With --containerd: keep snapshots created or changed within SECS (containerd records a snapshot
    /// after the daemon made it, so a young one may be about to be known).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_MIN_AGE, requires = "containerd")]
    pub min_age: u64,
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Devices => "devices",
            Command::Check => "check",
            Command::Gc(_) => "gc",
            Command::Host => "host",
        }
    }
}

/// What went wrong; the binary prints the chain once and exits with [`EXIT_ERROR`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the socket failed.
    #[error("cannot reach thinboxd at {}: {reason}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The root cause, with a hint where there is an obvious one. (tonic's
        /// transport error repeats its cause in its own message, so the chain
        /// would print it twice.)
        reason: String,
    },
    /// The connection broke during the request.
    #[error("cannot reach thinboxd at {}: {}", socket.display(), status.message())]
    Unavailable {
        /// The socket.
        socket: PathBuf,
        /// The status the client made of it.
        status: Box<Status>,
    },
    /// The daemon does not know the admin service.
    #[error("thinboxd at {} does not serve thinbox.admin.v1 (a daemon older than thinboxctl?)", socket.display())]
    Unimplemented {
        /// The socket.
        socket: PathBuf,
    },
    /// The socket does not serve containerd's snapshots API.
    #[error("{} does not serve containerd's snapshots API: not a thinboxd snapshot socket", socket.display())]
    NotSnapshotter {
        /// The socket.
        socket: PathBuf,
    },
    /// Connecting to containerd failed (`gc --containerd`); nothing was removed.
    #[error("cannot reach containerd at {}: {reason}; nothing removed", socket.display())]
    ContainerdConnect {
        /// containerd's socket.
        socket: PathBuf,
        /// The root cause, with a hint.
        reason: String,
    },
    /// containerd failed a request `gc --containerd` needs for its view; nothing was removed.
    #[error("containerd at {}: {what}: {reason}; nothing removed", socket.display())]
    Containerd {
        /// containerd's socket.
        socket: PathBuf,
        /// The request.
        what: String,
        /// containerd's answer.
        reason: String,
    },
    /// containerd's `--snapshotter` is not the daemon at `--address`; nothing was removed.
    #[error(
        "containerd at {}: snapshotter {name:?} {found}, not at --address {} (see --snapshotter); nothing removed",
        containerd.display(),
        address.display()
    )]
    NotOurSnapshotter {
        /// containerd's socket.
        containerd: PathBuf,
        /// `--snapshotter`.
        name: String,
        /// What containerd has under that name.
        found: String,
        /// `--address`.
        address: PathBuf,
    },
    /// Removing a snapshot failed; `gc --containerd` stopped there.
    #[error("gc: removing snapshot {key:?} failed after {done} removal(s): {} ({:?})", status.message(), status.code())]
    Remove {
        /// The snapshot.
        key: String,
        /// How many were removed before.
        done: usize,
        /// The daemon's answer.
        status: Box<Status>,
    },
    /// No answer within `--timeout`.
    #[error("{op}: no answer from thinboxd within {secs} s (--timeout)")]
    Timeout {
        /// The command.
        op: &'static str,
        /// The timeout.
        secs: u64,
    },
    /// The daemon answered with an error.
    #[error("{op}: thinboxd failed: {} ({:?})", status.message(), status.code())]
    Rpc {
        /// The command.
        op: &'static str,
        /// Its answer.
        status: Box<Status>,
    },
    /// The answer lacks a field the daemon always sends.
    #[error("{op}: the daemon's answer has no {field}")]
    Incomplete {
        /// The command.
        op: &'static str,
        /// The missing message field.
        field: &'static str,
    },
    /// The async runtime could not start.
    #[error("start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// Writing to stdout or stderr failed.
    #[error("write output")]
    Output(#[from] std::io::Error),
    /// Encoding the JSON document failed.
    #[error("encode JSON")]
    Json(#[from] serde_json::Error),
}

impl Error {
    fn rpc(cli: &Cli, status: Status) -> Error {
        let op = cli.command.name();
        match status.code() {
            Code::Unavailable => Error::Unavailable { socket: cli.address.clone(), status: Box::new(status) },
            Code::Unimplemented => Error::Unimplemented { socket: cli.address.clone() },
            // What tonic makes of its own client-side timeout.
            Code::Cancelled if status.message() == tonic::TimeoutExpired(()).to_string() => Error::Timeout { op, secs: cli.timeout },
            Code::DeadlineExceeded => Error::Timeout { op, secs: cli.timeout },
            _ => Error::Rpc { op, status: Box::new(status) },
        }
    }
}

/// The hint for a daemon socket that is missing or refuses connections.
const DAEMON_HINT: &str = " (is the daemon running? --address or THINBOX_SOCKET must name its socket)";

/// The innermost cause of a failed connect, plus what an operator usually
/// has to do about it (`not_running` if nothing listens there).
fn connect_reason(e: &(dyn std::error::Error + 'static), not_running: &str) -> String {
    let mut root = e;
    while let Some(next) = root.source() {
        root = next;
    }
    let hint = match root.downcast_ref::<std::io::Error>().map(std::io::Error::kind) {
        Some(std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => not_running,
        Some(std::io::ErrorKind::PermissionDenied) => " (the socket is mode 0660: run as root or as a member of its group)",
        _ => "",
    };
    format!("{root}{hint}")
}

/// The daemon's answer to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `status`.
    Status(PoolStatus),
    /// `devices`.
    Devices(Vec<Device>),
    /// `check`.
    Check(Report),
    /// `gc`.
    Gc(Report),
    /// `gc --containerd`.
    ContainerdGc(ContainerdGc),
    /// `host`.
    Host(HostReport),
}

/// Asks the daemon what `cli.command` needs; `host` asks this machine and
/// never connects; `gc --containerd` asks containerd first.
pub async fn ask(cli: &Cli) -> Result<Answer, Error> {
    let op = cli.command.name();
    let rpc = |status| Error::rpc(cli, status);
    Ok(match &cli.command {
        Command::Status => {
            let r = connect(cli).await?.pool_status(PoolStatusRequest {}).await.map_err(rpc)?.into_inner();
            Answer::Status(PoolStatus::new(r.status.ok_or(Error::Incomplete { op, field: "status" })?, r.consumers))
        }
        Command::Devices => {
            let devs = connect(cli).await?.list_devices(ListDevicesRequest {}).await.map_err(rpc)?.into_inner().devices;
            Answer::Devices(devs.into_iter().map(Device::from).collect())
        }
        Command::Check => {
            let r = connect(cli).await?.check(CheckRequest {}).await.map_err(rpc)?.into_inner().report;
            Answer::Check(r.ok_or(Error::Incomplete { op, field: "report" })?.into())
        }
        Command::Gc(args @ GcArgs { containerd: Some(socket), .. }) => Answer::ContainerdGc(containerd::run(cli, args, socket).await?),
        Command::Gc(_) => {
            let r = connect(cli).await?.gc(GcRequest {}).await.map_err(rpc)?.into_inner().report;
            Answer::Gc(r.ok_or(Error::Incomplete { op, field: "report" })?.into())
        }
        Command::Host => Answer::Host(HostReport::probe()),
    })
}

async fn channel(cli: &Cli) -> Result<Channel, Error> {
    thinbox_proto::unix_channel(&cli.address, Duration::from_secs(cli.timeout))
        .await
        .map_err(|e| Error::Connect { socket: cli.address.clone(), reason: connect_reason(&e, DAEMON_HINT) })
}

async fn connect(cli: &Cli) -> Result<AdminClient<Channel>, Error> {
    Ok(AdminClient::new(channel(cli).await?))
}

/// containerd's snapshots API on the daemon's socket.
async fn connect_snapshots(cli: &Cli) -> Result<SnapshotsClient<Channel>, Error> {
    Ok(SnapshotsClient::new(channel(cli).await?))
}

/// [`Error::rpc`] for a request of containerd's snapshots API to the daemon.
fn snapshots_status(cli: &Cli, status: Status) -> Error {
    match status.code() {
        Code::Unimplemented => Error::NotSnapshotter { socket: cli.address.clone() },
        _ => Error::rpc(cli, status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_global_flags_anywhere() {
        let cli = Cli::try_parse_from(["thinboxctl", "check", "--json", "--address", "/tmp/s.sock", "--timeout", "5"]).expect("parses");
        assert_eq!(cli.command, Command::Check);
        assert!(cli.json);
        assert_eq!(cli.address, PathBuf::from("/tmp/s.sock"));
        assert_eq!(cli.timeout, 5);
        assert!(Cli::try_parse_from(["thinboxctl", "status", "--timeout", "0"]).is_err(), "a zero timeout never answers");
        assert!(Cli::try_parse_from(["thinboxctl"]).is_err(), "a command is required");
    }

    #[tokio::test]
    async fn host_needs_no_daemon() {
        let cli = Cli::try_parse_from(["thinboxctl", "--address", "/nonexistent/thinbox.sock", "host", "--json"]).expect("parses");
        assert_eq!((&cli.command, cli.json), (&Command::Host, true));
        let Answer::Host(h) = ask(&cli).await.expect("no socket needed") else { panic!("host answers Host") };
        assert_eq!(h.kvm.usable, h.kvm.reason.is_none());
    }

    #[test]
    fn cli_defaults_to_the_documented_socket() {
        // THINBOX_SOCKET would override it; tests do not set it.
        if std::env::var_os("THINBOX_SOCKET").is_none() {
            let cli = Cli::try_parse_from(["thinboxctl", "status"]).expect("parses");
            assert_eq!(cli.address, PathBuf::from(DEFAULT_ADDRESS));
            assert_eq!((cli.json, cli.timeout), (false, 60));
        }
    }

    #[test]
    fn connect_errors_name_the_root_cause_once_with_a_hint() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Wrapper(#[source] std::io::Error);
        let e = Wrapper(std::io::Error::from(std::io::ErrorKind::NotFound));
        let reason = connect_reason(&e, DAEMON_HINT);
        assert!(reason.starts_with("entity not found (is the daemon running?"), "{reason}");
        let e = Wrapper(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(connect_reason(&e, DAEMON_HINT).contains("mode 0660"));
        assert_eq!(connect_reason(&Wrapper(std::io::Error::other("odd")), DAEMON_HINT), "odd");
    }

    #[test]
    fn gc_takes_containerd_options_only_with_containerd() {
        let cli = Cli::try_parse_from(["thinboxctl", "gc"]).expect("parses");
        assert_eq!(cli.command, Command::Gc(GcArgs { snapshotter: "thinbox".into(), min_age: DEFAULT_MIN_AGE, ..GcArgs::default() }));
        let cli = Cli::try_parse_from(["thinboxctl", "gc", "--containerd", "--json"]).expect("parses");
        let Command::Gc(args) = &cli.command else { panic!("gc") };
        assert_eq!(args.containerd.as_deref(), Some(std::path::Path::new(DEFAULT_CONTAINERD)), "SOCK is optional");
        assert!(cli.json && !args.dry_run);
        let cli = Cli::try_parse_from(["thinboxctl", "gc", "--containerd", "/c.sock", "--snapshotter", "tb", "--dry-run", "--min-age", "0"])
            .expect("parses");
        assert_eq!(cli.command, Command::Gc(GcArgs { containerd: Some("/c.sock".into()), snapshotter: "tb".into(), dry_run: true, min_age: 0 }));
        for flags in [&["--dry-run"][..], &["--snapshotter", "x"], &["--min-age", "5"]] {
            let args = ["thinboxctl", "gc"].iter().chain(flags).copied();
            assert!(Cli::try_parse_from(args).is_err(), "{flags:?} needs --containerd");
        }
    }

    #[test]
    fn statuses_map_to_clear_errors() {
        let cli = Cli::try_parse_from(["thinboxctl", "--address", "/s", "--timeout", "7", "gc"]).expect("parses");
        let msg = |s: Status| Error::rpc(&cli, s).to_string();
        assert_eq!(msg(Status::unavailable("connection reset")), "cannot reach thinboxd at /s: connection reset");
        assert!(msg(Status::unimplemented("")).contains("does not serve thinbox.admin.v1"));
        assert_eq!(msg(Status::cancelled("Timeout expired")), "gc: no answer from thinboxd within 7 s (--timeout)");
        assert_eq!(msg(Status::internal("pool: I/O error")), "gc: thinboxd failed: pool: I/O error (Internal)");
    }
}
