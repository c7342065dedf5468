//! Harness for tests that drive the real `thinboxd` binary over its snapshot
//! socket (`--no-csi`), as containerd's proxy client does. Needs root (loop
//! devices, mounts).

#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use thinbox_proto::admin::admin_client::AdminClient;
use thinbox_proto::admin::{ListDevicesRequest, PoolStatusRequest};
use thinbox_proto::snapshots::snapshots_client::SnapshotsClient;
use thinbox_proto::snapshots::*;
use tonic::transport::Channel;

pub use super::{free_port, require_root, scrape};

pub type Client = SnapshotsClient<Channel>;
pub type Admin = AdminClient<Channel>;

/// How long a removed snapshot's device may take to be deleted in the
/// background before a test calls it stuck (a failure guard, not a timing
/// assertion: deletion takes milliseconds to a second).
pub const DELETION_DEADLINE: Duration = Duration::from_secs(120);

/// A running daemon with its own state root, serving snapshots only.
pub struct Daemon {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub config: Option<PathBuf>,
    /// The daemon's stderr goes here (appended) instead of the test's.
    pub log: Option<PathBuf>,
    /// More command-line arguments, on every (re)start.
    pub args: Vec<String>,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon on `dir/state` with an optional TOML config and environment.
    pub async fn start(dir: &Path, config: Option<&str>, env: &[(&str, &str)]) -> (Daemon, Client) {
        let root = dir.join("state");
        let socket = dir.join("snap.sock");
        let config = config.map(|c| {
            let p = dir.join("config.toml");
            std::fs::write(&p, c).unwrap();
            p
        });
        let mut d = Daemon { root, socket, config, log: None, args: Vec::new(), child: None };
        let client = d.spawn(env).await;
        (d, client)
    }

    /// [`Daemon::start`] with more command-line arguments.
    pub async fn start_with_args(dir: &Path, config: Option<&str>, args: &[&str]) -> (Daemon, Client) {
        let root = dir.join("state");
        let socket = dir.join("snap.sock");
        let config = config.map(|c| {
            let p = dir.join("config.toml");
            std::fs::write(&p, c).unwrap();
            p
        });
        let mut d = Daemon { root, socket, config, log: None, args: args.iter().map(|a| a.to_string()).collect(), child: None };
        let client = d.spawn(&[]).await;
        (d, client)
    }

    /// [`Daemon::start`] with the daemon's log in `dir/daemon.log`.
    pub async fn start_logged(dir: &Path, config: Option<&str>, env: &[(&str, &str)]) -> (Daemon, Client) {
        let root = dir.join("state");
        let socket = dir.join("snap.sock");
        let config = config.map(|c| {
            let p = dir.join("config.toml");
            std::fs::write(&p, c).unwrap();
            p
        });
        let mut d = Daemon { root, socket, config, log: Some(dir.join("daemon.log")), args: Vec::new(), child: None };
        let client = d.spawn(env).await;
        (d, client)
    }

    /// The daemon's log so far (see [`Daemon::start_logged`]).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.as_ref().expect("started with start_logged")).unwrap_or_default()
    }

    /// The daemon's command line: this root, the snapshot socket, no CSI.
    fn command(&self) -> Command {
        let mut cmd = super::thinboxd();
        cmd.arg("--root").arg(&self.root).arg("--snapshotter-address").arg(&self.socket).arg("--no-csi").stdin(Stdio::null());
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd
    }

    /// (Re)starts the process on the same state.
    pub async fn spawn(&mut self, env: &[(&str, &str)]) -> Client {
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = self.command();
        cmd.args(&self.args);
        if let Some(log) = &self.log {
            cmd.stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap());
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn thinboxd"));
        served(self.child.as_mut().unwrap(), &self.socket).await;
        // The uml tier sets it so that these tests provably ran on dm-thin.
        if let Ok(want) = std::env::var("THINBOX_TEST_BACKEND") {
            let got = thinbox_blockstore::inventory(&self.root, &Default::default()).unwrap().backend;
            assert_eq!(got, want, "THINBOX_TEST_BACKEND");
        }
        connect(&self.socket).await
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::TERM).unwrap();
        child.wait().unwrap()
    }

    /// Waits for the process to end by itself (e.g. an injected crash).
    pub fn wait(&mut self) -> ExitStatus {
        self.child.take().expect("daemon running").wait().unwrap()
    }

    /// Stops with `--release-on-exit` semantics by restarting once with the flag,
    /// leaving no device or mount behind (either backend).
    pub async fn release(mut self) {
        self.release_now();
        assert_eq!(self.inventory().attached, Default::default(), "devices left attached after release");
    }

    /// Blocking: kill or stop the daemon, then let one started with
    /// `--release-on-exit` tear down everything under the root.
    fn release_now(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        let _ = std::fs::remove_file(&self.socket);
        self.child = Some(self.command().arg("--release-on-exit").spawn().unwrap());
        super::block_on(served(self.child.as_mut().unwrap(), &self.socket));
        assert!(self.stop().success());
    }

    /// What the kernel and disk hold for this root (embedded pool).
    pub fn inventory(&self) -> thinbox_blockstore::Inventory {
        thinbox_blockstore::inventory(&self.root, &thinbox_blockstore::PoolConfig::default()).unwrap()
    }

    /// The admin service on the daemon's socket.
    pub async fn admin(&self) -> Admin {
        let channel = thinbox_proto::unix_channel(&self.socket, Duration::from_secs(120)).await.expect("connect admin");
        AdminClient::new(channel)
    }

    /// Waits until the background deleter has finished: no device record is
    /// left `deleting`. Removed snapshots' devices are deleted after Remove
    /// returns, so leak checks come after this. Panics after
    /// [`DELETION_DEADLINE`].
    pub async fn settle(&self) {
        let mut admin = self.admin().await;
        let deadline = Instant::now() + DELETION_DEADLINE;
        loop {
            let devices = admin.list_devices(ListDevicesRequest {}).await.expect("ListDevices").into_inner().devices;
            let deleting: Vec<u64> = devices.iter().filter(|d| d.state == "deleting").map(|d| d.id).collect();
            if deleting.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "devices {deleting:?} still deleting after {DELETION_DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Device records in the store (`deleting` ones included), from the pool status.
    pub async fn device_records(&self) -> u64 {
        self.pool_status().await.devices
    }

    /// The admin service's pool status.
    pub async fn pool_status(&self) -> thinbox_proto::admin::PoolStatus {
        self.admin().await.pool_status(PoolStatusRequest {}).await.expect("PoolStatus").into_inner().status.expect("status")
    }
}

impl Drop for Daemon {
    /// A test that panicked still leaves no device or mount behind.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if self.root.exists() {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.release_now()));
            }
            // A release that failed half-way leaves no process behind either.
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Waits until `child` serves the snapshot socket (see [`super::until_served`]).
async fn served(child: &mut Child, socket: &Path) {
    let answers = |channel| async move { AdminClient::new(channel).pool_status(PoolStatusRequest {}).await.is_ok() };
    super::until_served(child, socket, answers).await.unwrap_or_else(|e| panic!("{e}"));
}

/// Connects, retrying briefly: the socket file appears between bind(2) and
/// listen(2), when connecting is still refused.
pub async fn connect(socket: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match thinbox_proto::unix_channel(socket, Duration::from_secs(120)).await {
            Ok(channel) => return SnapshotsClient::new(channel),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("connect to snapshotter: {e}"),
        }
    }
}

pub fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub async fn prepare(c: &mut Client, key: &str, parent: &str, labels: HashMap<String, String>) -> Result<Vec<thinbox_proto::Mount>, tonic::Status> {
    c.prepare(PrepareSnapshotRequest { snapshotter: "thinbox".into(), key: key.into(), parent: parent.into(), labels })
        .await
        .map(|r| r.into_inner().mounts)
}

pub async fn view(c: &mut Client, key: &str, parent: &str) -> Result<Vec<thinbox_proto::Mount>, tonic::Status> {
    c.view(ViewSnapshotRequest { snapshotter: "thinbox".into(), key: key.into(), parent: parent.into(), labels: HashMap::new() })
        .await
        .map(|r| r.into_inner().mounts)
}

pub async fn commit(c: &mut Client, name: &str, key: &str) -> Result<(), tonic::Status> {
    c.commit(CommitSnapshotRequest {
        snapshotter: "thinbox".into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
        parent: String::new(),
    })
    .await
    .map(|_| ())
}

pub async fn remove(c: &mut Client, key: &str) -> Result<(), tonic::Status> {
    c.remove(RemoveSnapshotRequest { snapshotter: "thinbox".into(), key: key.into() }).await.map(|_| ())
}

pub async fn stat(c: &mut Client, key: &str) -> Result<Info, tonic::Status> {
    c.stat(StatSnapshotRequest { snapshotter: "thinbox".into(), key: key.into() }).await.map(|r| r.into_inner().info.unwrap())
}

pub async fn list(c: &mut Client, filters: &[&str]) -> Result<Vec<String>, tonic::Status> {
    let mut stream =
        c.list(ListSnapshotsRequest { snapshotter: "thinbox".into(), filters: filters.iter().map(|s| s.to_string()).collect() }).await?.into_inner();
    let mut names = Vec::new();
    while let Some(batch) = stream.message().await? {
        names.extend(batch.info.into_iter().map(|i| i.name));
    }
    names.sort();
    Ok(names)
}

/// Mounts the single mount a snapshot returned on `target`.
pub fn mount(m: &[thinbox_proto::Mount], target: &Path) {
    assert_eq!(m.len(), 1, "exactly one mount");
    let m = &m[0];
    std::fs::create_dir_all(target).unwrap();
    let st = std::fs::metadata(&m.source).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_block_device(&st.file_type()), "{} is a block device", m.source);
    let out = Command::new("mount").args(["-t", &m.r#type, "-o", &m.options.join(","), &m.source]).arg(target).output().unwrap();
    assert!(out.status.success(), "mount failed: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn umount(target: &Path) {
    let out = Command::new("umount").arg(target).output().unwrap();
    assert!(out.status.success(), "umount failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Writes a file inside a mounted snapshot and commits it under `name`.
pub async fn layer(c: &mut Client, work: &Path, name: &str, parent: &str, files: &[(&str, &str)]) {
    let key = format!("{name}-active");
    let m = prepare(c, &key, parent, HashMap::new()).await.unwrap();
    let mp = work.join(&key);
    mount(&m, &mp);
    for (f, content) in files {
        std::fs::write(mp.join(f), content).unwrap();
    }
    umount(&mp);
    commit(c, name, &key).await.unwrap();
}

/// Reads a file from a committed snapshot through a temporary view.
pub async fn read_through_view(c: &mut Client, work: &Path, committed: &str, file: &str) -> String {
    let key = format!("{committed}-readview");
    let m = view(c, &key, committed).await.unwrap();
    let mp = work.join(&key);
    mount(&m, &mp);
    let content = std::fs::read_to_string(mp.join(file)).unwrap_or_default();
    umount(&mp);
    remove(c, &key).await.unwrap();
    content
}
