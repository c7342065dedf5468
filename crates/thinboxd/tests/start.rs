//! Host tier: a start that cannot work fails with one clear line saying what
//! to do, and touches nothing already stored. Each bad start runs against a
//! root that already holds a committed snapshot with content; afterwards a
//! good start still serves it, on the same device.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use thinbox_proto::snapshots::snapshots_client::SnapshotsClient;
use thinbox_proto::snapshots::{CommitSnapshotRequest, ListSnapshotsRequest, PrepareSnapshotRequest, StatSnapshotRequest};

fn thinboxd(root: &Path, socket: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thinboxd"));
    cmd.arg("--root").arg(root).arg("--snapshotter-address").arg(socket).arg("--no-csi").args(extra).stdin(Stdio::null());
    cmd.env("THINBOX_LOG", "info");
    cmd
}

/// Starts thinboxd and waits for its socket.
fn start(root: &Path, socket: &Path, extra: &[&str]) -> Child {
    let mut child = thinboxd(root, socket, extra).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "thinboxd exited during start-up");
        assert!(Instant::now() < deadline, "socket did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn stop(mut child: Child) {
    rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::TERM).unwrap();
    assert!(child.wait().unwrap().success());
}

/// A start that must fail: its status, and its stderr's error lines.
fn refused(root: &Path, socket: &Path, extra: &[&str]) -> (Output, Vec<String>) {
    refused_cmd(thinboxd(root, socket, extra))
}

fn refused_cmd(mut cmd: Command) -> (Output, Vec<String>) {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} must fail to start");
    let errors = String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.contains("ERROR")).map(str::to_owned).collect();
    (out, errors)
}

/// The one error line, which must say `says`.
fn one_line_saying(errors: &[String], says: &str) {
    assert_eq!(errors.len(), 1, "exactly one error line: {errors:#?}");
    assert!(errors[0].contains(says), "{:?} should say {says:?}", errors[0]);
}

fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = e.metadata().unwrap();
        if meta.is_dir() {
            out.extend(files_under(&e.path()));
        } else if e.file_name() != ".lock" {
            out.push((e.path(), meta.len()));
        }
    }
    out.sort();
    out
}

async fn client(socket: &Path) -> SnapshotsClient<tonic::transport::Channel> {
    SnapshotsClient::new(thinbox_proto::unix_channel(socket, Duration::from_secs(30)).await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_start_says_what_to_do_and_touches_nothing() {
    assert!(rustix::process::geteuid().is_root(), "host-tier tests need root");
    let dir = tempfile::Builder::new().prefix("thinbox-start-").tempdir().unwrap();
    let (root, socket) = (dir.path().join("root"), dir.path().join("snap.sock"));
    let small = dir.path().join("small.toml");
    std::fs::write(&small, "[pool]\nbackend = \"reflink\"\nembedded_size = \"2GiB\"\nreserve = \"64MiB\"\n").unwrap();
    let cfg = ["--config", small.to_str().unwrap()];

    // A root with one committed layer holding a file.
    let daemon = start(&root, &socket, &cfg);
    let mut c = client(&socket).await;
    let mounts = c
        .prepare(PrepareSnapshotRequest { snapshotter: "t".into(), key: "a".into(), parent: String::new(), labels: HashMap::new() })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = &mounts[0];
    rustix::mount::mount(m.source.as_str(), &mnt, m.r#type.as_str(), rustix::mount::MountFlags::empty(), None).unwrap();
    std::fs::write(mnt.join("kept"), "layer content").unwrap();
    rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()).unwrap();
    c.commit(CommitSnapshotRequest { snapshotter: "t".into(), name: "layer".into(), key: "a".into(), labels: HashMap::new(), parent: String::new() })
        .await
        .unwrap();
    drop(c);
    // A second daemon on the same root, while the first runs.
    let (_, e) = refused(&root, &dir.path().join("second.sock"), &cfg);
    one_line_saying(&e, &format!("{}/meta.redb is held by another running thinboxd: stop it, or give this one another --root", root.display()));
    stop(daemon);
    let before = files_under(&root.join("pool/devices"));
    assert_eq!(before.len(), 1, "one device image: {before:?}");

    // An unknown key: named with its file, line and column.
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[pool]\nbackend = \"reflink\"\nreserv = \"1GiB\"\n").unwrap();
    let (_, e) = refused(&root, &socket, &["--config", typo.to_str().unwrap()]);
    one_line_saying(&e, &format!("config {}, line 3, column 1: unknown field `reserv`", typo.display()));

    // The socket is served by another process.
    let other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let (_, e) = refused(&root, &socket, &cfg);
    one_line_saying(&e, "is served by another running process: stop it, or give this daemon another socket path");
    drop(other);
    std::fs::remove_file(&socket).unwrap();

    // The metrics port is taken.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = port.local_addr().unwrap().to_string();
    let (_, e) = refused(&root, &socket, &[&cfg[..], &["--metrics-address", &addr]].concat());
    one_line_saying(&e, &format!("bind metrics endpoint {addr}"));
    drop(port);

    // A pool directory on a filesystem that cannot reflink (ext4 or tmpfs here).
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let noreflink = dir.path().join("noreflink.toml");
    std::fs::write(&noreflink, format!("[pool]\nbackend = \"reflink\"\ndir = \"{}\"\n", plain.display())).unwrap();
    let fresh = dir.path().join("fresh");
    let (_, e) = refused(&fresh, &socket, &["--config", noreflink.to_str().unwrap()]);
    one_line_saying(&e, "cannot hold reflinked devices: put [pool] dir on XFS made with `mkfs.xfs -m reflink=1` or on btrfs");

    // A root keeps its backend.
    let dm = dir.path().join("dm.toml");
    std::fs::write(&dm, "[pool]\nbackend = \"dm-thin\"\nembedded_size = \"1GiB\"\n").unwrap();
    let dm_cfg = ["--config", dm.to_str().unwrap()];
    let (_, e) = refused(&root, &socket, &dm_cfg);
    one_line_saying(&e, "holds a reflink pool; pool.backend says dm-thin: a root keeps the backend it started with");

    // dm-thin on a new root: without device-mapper the start says which
    // module to load; with it (a real node, the uml tier's kernel) it starts.
    let fresh_dm = dir.path().join("fresh-dm");
    if thinbox_blockstore::DmThin::available() {
        stop(start(&fresh_dm, &socket, &[&dm_cfg[..], &["--release-on-exit"]].concat()));
    } else {
        let (_, e) = refused(&fresh_dm, &socket, &dm_cfg);
        one_line_saying(
            &e,
            "device-mapper is not available (/dev/mapper/control): load it with `modprobe dm_thin_pool`, or set [pool] backend = \"reflink\"",
        );
    }

    // A volume image of the layout before file volumes moved into the pool:
    // refused with both doors on, and kept.
    let legacy = root.join("files/tb-file-1.img");
    std::fs::create_dir_all(legacy.parent().unwrap()).unwrap();
    std::fs::write(&legacy, "old volume").unwrap();
    let both = dir.path().join("both.toml");
    std::fs::write(
        &both,
        format!(
            "[pool]\nbackend = \"reflink\"\nembedded_size = \"2GiB\"\nreserve = \"64MiB\"\n[csi]\nendpoint = \"unix://{0}/csi.sock\"\nkubelet_dir = \"{0}/kubelet\"\ndirect_volumes = \"{0}/kata\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thinboxd"));
    cmd.arg("--root").arg(&root).arg("--snapshotter-address").arg(&socket).arg("--config").arg(&both).env("THINBOX_LOG", "info");
    let (_, e) = refused_cmd(cmd);
    one_line_saying(
        &e,
        &format!("{}/files holds {}: it was made by a thinboxd from before file volumes moved into the pool", root.display(), legacy.display()),
    );
    assert_eq!(std::fs::read_to_string(&legacy).unwrap(), "old volume");
    std::fs::remove_dir_all(root.join("files")).unwrap();

    // Nothing was touched: same files, and a good start serves the layer.
    assert_eq!(files_under(&root.join("pool/devices")), before);
    let daemon = start(&root, &socket, &[&cfg[..], &["--release-on-exit"]].concat());
    let mut c = client(&socket).await;
    let info = c.stat(StatSnapshotRequest { snapshotter: "t".into(), key: "layer".into() }).await.unwrap().into_inner().info.unwrap();
    assert_eq!(info.name, "layer");
    let keys: Vec<String> = {
        let mut stream = c.list(ListSnapshotsRequest { snapshotter: "t".into(), filters: vec![] }).await.unwrap().into_inner();
        let mut keys = Vec::new();
        while let Some(page) = stream.message().await.unwrap() {
            keys.extend(page.info.into_iter().map(|i| i.name));
        }
        keys
    };
    assert_eq!(keys, ["layer"]);
    let view = c
        .view(thinbox_proto::snapshots::ViewSnapshotRequest {
            snapshotter: "t".into(),
            key: "v".into(),
            parent: "layer".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let v = &view[0];
    rustix::mount::mount(v.source.as_str(), &mnt, v.r#type.as_str(), rustix::mount::MountFlags::RDONLY, None).unwrap();
    let content = std::fs::read_to_string(mnt.join("kept"));
    rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()).unwrap();
    assert_eq!(content.unwrap(), "layer content");
    drop(c);
    stop(daemon);
}
