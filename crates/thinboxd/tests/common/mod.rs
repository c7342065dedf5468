//! Harnesses of the tests that drive the real `thinboxd` binary over its front
//! doors, as containerd and kubelet do: [`snapshots`] serves the snapshot
//! socket alone (`--no-csi`), [`volumes`] the CSI socket alone
//! (`--no-snapshotter`), [`node`] both on one pool. Every path the daemon uses
//! is under the test's temporary directory. Needs root (loop devices, mounts).

#![allow(dead_code, clippy::unwrap_used)]

pub mod kata_shim;
pub mod node;
pub mod snapshots;
pub mod volumes;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

/// How long a start may take until the doors are served: the pool is opened
/// and reconciled first (seconds on a thin pool inside user-mode Linux).
pub const START_DEADLINE: Duration = Duration::from_secs(60);

pub fn require_root() {
    assert!(rustix::process::geteuid().is_root(), "host-tier tests need root: run `sudo tests/run.sh host`");
}

/// The daemon under test, with its log level set.
pub fn thinboxd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thinboxd"));
    cmd.env("THINBOX_LOG", "info");
    cmd
}

/// Waits until the daemon `child` serves `socket`: `answers` (one request on
/// a fresh channel) succeeds. thinboxd binds its sockets before it opens the
/// pool and serves them after, so the socket file alone proves nothing; once
/// a request is answered the daemon is up, its SIGTERM handler installed.
/// Fails if the daemon exits meanwhile or [`START_DEADLINE`] passes.
pub async fn until_served<F, Fut>(child: &mut Child, socket: &Path, answers: F) -> Result<(), String>
where
    F: Fn(Channel) -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("thinboxd exited during start-up ({status}) before it served {}", socket.display()));
        }
        if socket.exists()
            && let Ok(channel) = thinbox_proto::unix_channel(socket, Duration::from_secs(5)).await
            && answers(channel).await
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("thinboxd did not serve {} within {START_DEADLINE:?}", socket.display()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `f` to completion on a runtime of its own, on a thread of its own:
/// callable from blocking code and from `Drop` alike, inside an async test or
/// not.
pub fn block_on<F: Future + Send>(f: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        let joined = s.spawn(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)).join();
        joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A TCP port on 127.0.0.1 that nothing listens on (just now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET /metrics` on 127.0.0.1:`port`: the whole response, headers included
/// (the server closes the connection after it).
pub async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_string(&mut out)).await.expect("metrics response").unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    out
}

/// The lines of a daemon's stderr that log an error.
pub fn error_lines(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr).lines().filter(|l| l.contains("ERROR")).map(str::to_owned).collect()
}

/// A file or directory flagged immutable (`chattr +i`) until dropped: a file
/// cannot be opened for writing meanwhile, and nothing in a directory can be
/// unlinked.
pub struct Immutable(PathBuf);

impl Immutable {
    pub fn new(path: &Path) -> Immutable {
        let out = Command::new("chattr").arg("+i").arg(path).output().unwrap();
        assert!(out.status.success(), "chattr +i {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        Immutable(path.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let out = Command::new("chattr").arg("-i").arg(&self.0).output().unwrap();
        if !std::thread::panicking() {
            assert!(out.status.success(), "chattr -i {}: {}", self.0.display(), String::from_utf8_lossy(&out.stderr));
        }
    }
}
