//! `thinboxctl`: the operator's view of a running `thinbox-snapshotter`.
//!
//! The daemon owns the metadata store (redb admits one process), so every
//! command asks the daemon over its socket (`thinbox.admin.v1`, served next to
//! containerd's snapshot service) instead of opening the store:
//!
//! * `status`: pool capacity, free space, reserve, devices; dm-thin also
//!   metadata use, low-water mark and mode.
//! * `devices`: every device record with its state, attachment, usage and the
//!   snapshot keys it holds.
//! * `check`: what `gc` would do, read-only; exit code 1 if anything.
//! * `gc`: reconciliation (what containerd's `Cleanup` and a restart do).
//! * `host`: what this host offers VM sandboxes (is KVM usable, its API
//!   version and vCPU limits), probed locally; it needs no daemon.
//!
//! Output is aligned tables, or one JSON document with `--json`. [`ask`] talks
//! to the daemon, [`render::render`] prints; the binary only maps the
//! [`render::Outcome`] or the [`Error`] to an exit code.

pub mod model;
pub mod render;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use thinbox_proto::admin::admin_client::AdminClient;
use thinbox_proto::admin::{CheckRequest, GcRequest, ListDevicesRequest, PoolStatusRequest};
use tonic::{Code, Status};

use crate::model::{Device, HostReport, PoolStatus, Report};

/// Where `thinbox-snapshotter` serves by default (README, `scripts/quickstart.sh`).
pub const DEFAULT_ADDRESS: &str = "/run/thinbox/snapshotter.sock";

/// Exit code: success (and for `check`: nothing to clean).
pub const EXIT_OK: u8 = 0;
/// Exit code: `check` found something to clean or a device whose storage is missing.
pub const EXIT_FINDINGS: u8 = 1;
/// Exit code: the daemon could not be reached or refused, or bad usage.
pub const EXIT_ERROR: u8 = 2;

/// Command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "thinboxctl",
    version,
    about = "Inspect and clean up the pool of a running thinbox-snapshotter; probe this host for VM sandboxes (host)",
    after_help = "Exit codes: 0 success; 1 `check` found something to clean or a device whose storage is missing; \
                  2 the daemon could not be reached or refused the request, or bad usage."
)]
pub struct Cli {
    /// The daemon's socket (its --address).
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Pool capacity, free space and reserve; dm-thin: metadata, low-water mark, mode.
    Status,
    /// Every device: state, attachment, node, usage, snapshot keys.
    Devices,
    /// Compare the store with the pool; report what `gc` would do, changing nothing.
    Check,
    /// Remove leftover devices and orphans, re-attach or detach devices to match their records.
    Gc,
    /// This host's KVM: usable or why not, API version, vCPU limits (probed here, no daemon needed).
    Host,
}

impl Command {
    fn name(self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Devices => "devices",
            Command::Check => "check",
            Command::Gc => "gc",
            Command::Host => "host",
        }
    }
}

/// What went wrong; the binary prints the chain once and exits with [`EXIT_ERROR`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the socket failed.
    #[error("cannot reach thinbox-snapshotter at {}: {reason}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The root cause, with a hint where there is an obvious one. (tonic's
        /// transport error repeats its cause in its own message, so the chain
        /// would print it twice.)
        reason: String,
    },
    /// The connection broke during the request.
    #[error("cannot reach thinbox-snapshotter at {}: {}", socket.display(), status.message())]
    Unavailable {
        /// The socket.
        socket: PathBuf,
        /// The status the client made of it.
        status: Box<Status>,
    },
    /// The daemon does not know the admin service.
    #[error("thinbox-snapshotter at {} does not serve thinbox.admin.v1 (a daemon older than thinboxctl?)", socket.display())]
    Unimplemented {
        /// The socket.
        socket: PathBuf,
    },
    /// No answer within `--timeout`.
    #[error("{op}: no answer from thinbox-snapshotter within {secs} s (--timeout)")]
    Timeout {
        /// The command.
        op: &'static str,
        /// The timeout.
        secs: u64,
    },
    /// The daemon answered with an error.
    #[error("{op}: thinbox-snapshotter failed: {} ({:?})", status.message(), status.code())]
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

/// The innermost cause of a failed connect, plus what an operator usually
/// has to do about it.
fn connect_reason(e: &(dyn std::error::Error + 'static)) -> String {
    let mut root = e;
    while let Some(next) = root.source() {
        root = next;
    }
    let hint = match root.downcast_ref::<std::io::Error>().map(std::io::Error::kind) {
        Some(std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            " (is the daemon running? --address or THINBOX_SOCKET must name its socket)"
        }
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
    /// `host`.
    Host(HostReport),
}

/// Asks the daemon what `cli.command` needs; `host` asks this machine and
/// never connects.
pub async fn ask(cli: &Cli) -> Result<Answer, Error> {
    let op = cli.command.name();
    let rpc = |status| Error::rpc(cli, status);
    Ok(match cli.command {
        Command::Status => {
            let st = connect(cli).await?.pool_status(PoolStatusRequest {}).await.map_err(rpc)?.into_inner().status;
            Answer::Status(st.ok_or(Error::Incomplete { op, field: "status" })?.into())
        }
        Command::Devices => {
            let devs = connect(cli).await?.list_devices(ListDevicesRequest {}).await.map_err(rpc)?.into_inner().devices;
            Answer::Devices(devs.into_iter().map(Device::from).collect())
        }
        Command::Check => {
            let r = connect(cli).await?.check(CheckRequest {}).await.map_err(rpc)?.into_inner().report;
            Answer::Check(r.ok_or(Error::Incomplete { op, field: "report" })?.into())
        }
        Command::Gc => {
            let r = connect(cli).await?.gc(GcRequest {}).await.map_err(rpc)?.into_inner().report;
            Answer::Gc(r.ok_or(Error::Incomplete { op, field: "report" })?.into())
        }
        Command::Host => Answer::Host(HostReport::probe()),
    })
}

async fn connect(cli: &Cli) -> Result<AdminClient<tonic::transport::Channel>, Error> {
    let channel = thinbox_proto::unix_channel(&cli.address, Duration::from_secs(cli.timeout))
        .await
        .map_err(|e| Error::Connect { socket: cli.address.clone(), reason: connect_reason(&e) })?;
    Ok(AdminClient::new(channel))
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
        assert_eq!((cli.command, cli.json), (Command::Host, true));
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
        let reason = connect_reason(&e);
        assert!(reason.starts_with("entity not found (is the daemon running?"), "{reason}");
        let e = Wrapper(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(connect_reason(&e).contains("mode 0660"));
        assert_eq!(connect_reason(&Wrapper(std::io::Error::other("odd"))), "odd");
    }

    #[test]
    fn statuses_map_to_clear_errors() {
        let cli = Cli::try_parse_from(["thinboxctl", "--address", "/s", "--timeout", "7", "gc"]).expect("parses");
        let msg = |s: Status| Error::rpc(&cli, s).to_string();
        assert_eq!(msg(Status::unavailable("connection reset")), "cannot reach thinbox-snapshotter at /s: connection reset");
        assert!(msg(Status::unimplemented("")).contains("does not serve thinbox.admin.v1"));
        assert_eq!(msg(Status::cancelled("Timeout expired")), "gc: no answer from thinbox-snapshotter within 7 s (--timeout)");
        assert_eq!(msg(Status::internal("pool: I/O error")), "gc: thinbox-snapshotter failed: pool: I/O error (Internal)");
    }
}
