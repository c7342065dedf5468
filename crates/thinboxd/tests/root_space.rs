//! Host tier: the filesystem of the state root runs short of room. It holds
//! the metadata store (and, by default, the embedded pool's sparse image), so
//! its room is the pool's too: below `pool.root_reserve` both APIs refuse new
//! devices and everything else keeps working; a store whose write failed
//! anyway stops the daemon, and the restart recovers the state; what deleted
//! devices and directories held in an embedded image goes back to the root.
//! Real filesystems on loop devices: a small ext4 for the root, an XFS for
//! the pool directory. `dir_volumes_*` need XFS project quotas, which this
//! host's kernel lacks: the uml tier runs them.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::node::Node;
use thinbox_proto::snapshots::{CommitSnapshotRequest, Kind};
use tonic::Code;

const MIB: u64 = 1 << 20;

/// A test's directory (needs root), where [`Disks::mount`] makes
/// filesystems; when dropped, every mount and loop under it goes before the
/// directory does.
struct Disks(tempfile::TempDir);

impl Disks {
    fn new() -> Disks {
        common::require_root();
        Disks(tempfile::Builder::new().prefix("tbrs-").tempdir().unwrap())
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// A filesystem of `size` made by `mkfs` in `NAME.img`, mounted on `NAME`.
    fn mount(&self, name: &str, size: &str, mkfs: &[&str]) -> PathBuf {
        let (img, at) = (self.path().join(format!("{name}.img")), self.path().join(name));
        let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
        ok(Command::new("truncate").arg("-s").arg(size).arg(&img));
        ok(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&img));
        std::fs::create_dir_all(&at).unwrap();
        ok(Command::new("mount").arg("-o").arg("loop").arg(&img).arg(&at));
        at
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        common::volumes::cleanup(self.path());
    }
}

fn free(dir: &Path) -> u64 {
    let st = rustix::fs::statvfs(dir).unwrap();
    st.f_bavail * st.f_frsize
}

/// Writes zeros to `path` until `leave` bytes are free on its filesystem
/// (0: until it is full).
fn fill(path: &Path, leave: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; MIB as usize];
    while free(path.parent().unwrap()) > leave + MIB {
        f.write_all(&chunk).unwrap();
        f.sync_all().unwrap();
    }
    if leave == 0 {
        while f.write_all(&chunk[..4096]).is_ok() {}
        let _ = f.sync_all();
    }
}

/// The `[pool]` of a node whose pool is the directory `dir/pool`.
fn pool_config(dir: &Path, extra: &str) -> String {
    format!("dir = \"{}\"\nreserve = \"64MiB\"\n{extra}", dir.join("pool").display())
}

/// A node whose root is a 96 MiB ext4 and whose pool is an XFS directory.
async fn node(disks: &Disks, extra: &str) -> Node {
    disks.mount("state", "96M", &["mkfs.ext4", "-q", "-m", "0"]);
    disks.mount("pool", "1G", &["mkfs.xfs", "-q", "-m", "reflink=1"]);
    Node::start(disks.path(), &pool_config(disks.path(), extra)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_short_of_room_refuses_new_devices_and_serves_the_rest() {
    let disks = Disks::new();
    let d = disks.path();
    let mut n = node(&disks, "").await;
    n.prepare("before").await.unwrap();
    let volume = n.create("v-before", 64 * MIB).await.unwrap();
    let devices = n.settled_devices().await;

    // 32 MiB left: below the default root_reserve (64 MiB).
    let filler = d.join("state/filler");
    fill(&filler, 32 * MIB);
    let refused = n.prepare("refused").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "Prepare: {refused:?}");
    assert!(refused.message().contains("below pool.root_reserve"), "{}", refused.message());
    let refused = n.create("v-refused", 64 * MIB).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "CreateVolume: {refused:?}");

    // Nothing was made, and the store still takes every other change.
    assert_eq!(n.snapshots().await, [("before".to_owned(), Kind::Active)]);
    assert_eq!(n.volume_ids().await, [volume]);
    let commit = CommitSnapshotRequest {
        snapshotter: "thinbox".into(),
        name: "layer".into(),
        key: "before".into(),
        labels: HashMap::new(),
        parent: String::new(),
    };
    n.snap.commit(commit).await.unwrap();
    assert_eq!(n.snapshots().await, [("layer".to_owned(), Kind::Committed)]);
    assert_eq!(n.settled_devices().await.len(), devices.len());

    std::fs::remove_file(&filler).unwrap();
    n.prepare("after").await.unwrap();
    n.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_failed_stops_the_daemon_and_the_restart_recovers() {
    let disks = Disks::new();
    let d = disks.path();
    // No reserve: let a write of the store itself fail.
    let no_reserve = "root_reserve = \"0\"";
    let mut n = node(&disks, no_reserve).await;
    n.prepare("before").await.unwrap();

    let filler = d.join("state/filler");
    fill(&filler, 0);
    // A commit may still fit in blocks the store's file already has.
    let mut made = vec![("before".to_owned(), Kind::Active)];
    let failed = loop {
        let key = format!("k{}", made.len());
        match n.prepare(&key).await {
            Ok(()) => made.push((key, Kind::Active)),
            Err(e) => break e,
        }
        assert!(made.len() < 100, "100 Prepares on a full filesystem, none failed");
    };
    assert_eq!(failed.code(), Code::ResourceExhausted, "{failed:?}");
    // redb refuses every change after a failed write until it is reopened:
    // the daemon exits for its service manager to restart it.
    let status = n.exited(Duration::from_secs(30));
    let log = std::fs::read_to_string(d.join("thinboxd.log")).unwrap();
    assert!(!status.success(), "{status:?}: {log}");
    assert!(log.contains("exiting for the service manager to restart thinboxd"), "{log}");

    std::fs::remove_file(&filler).unwrap();
    let mut n = Node::start(d, &pool_config(d, no_reserve)).await;
    let mut listed = n.snapshots().await;
    listed.sort();
    made.sort();
    assert_eq!(listed, made, "what was answered, no more");
    let devices = n.settled_devices().await;
    assert_eq!(devices.len(), made.len(), "{devices:?}");
    // The failed Prepare left no image and no loop.
    let images: Vec<_> =
        std::fs::read_dir(d.join("pool/devices")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "img")).collect();
    assert_eq!(images.len(), made.len(), "{images:?}");
    assert_eq!(thinbox_blockstore::scan_loops(&d.join("pool/devices")).unwrap().len(), made.len());
    n.prepare("after").await.unwrap();
    n.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_pool_has_no_more_room_than_the_root() {
    let disks = Disks::new();
    let d = disks.path();
    let root = disks.mount("state", "256M", &["mkfs.ext4", "-q", "-m", "0"]);
    // A sparse 2 GiB pool image on a 256 MiB filesystem.
    let mut n = Node::start(d, "embedded_size = \"2GiB\"\nreserve = \"64MiB\"").await;
    let capacity = n.capacity().await;
    let root_free = free(&root);
    assert!(capacity <= root_free, "GetCapacity says {capacity} bytes, the root's filesystem has {root_free}");
    assert!(capacity > 0, "room is left: {root_free} bytes free");
    n.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn dir_volumes_have_no_more_room_than_the_root() {
    let disks = Disks::new();
    let d = disks.path();
    let root = disks.mount("state", "256M", &["mkfs.ext4", "-q", "-m", "0"]);
    disks.mount("pool", "1G", &["mkfs.xfs", "-q", "-m", "reflink=1"]);
    let mut n = Node::start(d, &pool_config(d, "")).await;
    // The first dir volume makes their embedded image: 64 GiB, sparse, on the root.
    let small = n.create_of("dir", "v-small", 64 * MIB).await.unwrap();
    let capacity = n.capacity_of("dir").await;
    let root_free = free(&root);
    assert!(capacity <= root_free, "GetCapacity says {capacity} bytes for dir volumes, the root's filesystem has {root_free}");
    assert!(capacity > 0, "room is left: {root_free} bytes free");
    let refused = n.create_of("dir", "v-large", root_free + 64 * MIB).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "a dir volume larger than the root's room: {refused:?}");

    // 32 MiB left: below the default root_reserve (64 MiB).
    let filler = d.join("state/filler");
    fill(&filler, 32 * MIB);
    assert_eq!(n.capacity_of("dir").await, 0);
    let refused = n.create_of("dir", "v-refused", MIB).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("below pool.root_reserve"), "{}", refused.message());
    assert_eq!(n.volume_ids().await, std::slice::from_ref(&small));
    let dirs: Vec<_> = std::fs::read_dir(d.join("state/dirs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|f| f.to_string_lossy().starts_with("tb-dir-"))
        .collect();
    assert_eq!(dirs, [std::ffi::OsString::from(&small)], "only the volume that was made has a directory");

    std::fs::remove_file(&filler).unwrap();
    n.create_of("dir", "v-after", MIB).await.unwrap();
    n.stop();
}

/// Blocks of `path` on its filesystem.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Writes 128 MiB of data (not zeros) to the new file `path` and syncs it;
/// checks that `image` grew by (nearly) as much from `before` bytes.
fn write_128mib(path: &Path, image: &Path, before: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    for _ in 0..128 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    let written = allocated(image);
    assert!(written >= before + 120 * MIB, "{} holds the data: {before} then {written} bytes", image.display());
}

/// Waits for `image` to take no more than 16 MiB over `before` bytes again:
/// XFS makes freed blocks trimmable within its 30 s log checkpoint.
async fn until_given_back(image: &Path, before: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while allocated(image) > before + 16 * MIB {
        let now = allocated(image);
        assert!(std::time::Instant::now() < deadline, "{} still takes {now} bytes 90 s after the delete, {before} before", image.display());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn delete_volume(n: &mut Node, id: String) {
    let req = thinbox_proto::csi::v1::DeleteVolumeRequest { volume_id: id, ..Default::default() };
    n.ctl.delete_volume(req).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_devices_give_their_space_back_to_the_root() {
    let disks = Disks::new();
    let d = disks.path();
    disks.mount("state", "512M", &["mkfs.ext4", "-q", "-m", "0"]);
    let image = d.join("state/pool.img");
    let mut n = Node::start(d, "embedded_size = \"2GiB\"\nreserve = \"64MiB\"").await;
    let before = allocated(&image);

    let id = n.create("v", 256 * MIB).await.unwrap();
    let target = n.publish(&id, "v").await;
    write_128mib(&target.join("data"), &image, before);
    n.unpublish(&id, &target).await;
    delete_volume(&mut n, id).await;
    n.settled_devices().await;
    until_given_back(&image, before).await;
    n.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn dir_volumes_give_their_space_back_to_the_root() {
    let disks = Disks::new();
    let d = disks.path();
    disks.mount("state", "512M", &["mkfs.ext4", "-q", "-m", "0"]);
    disks.mount("pool", "1G", &["mkfs.xfs", "-q", "-m", "reflink=1"]);
    let image = d.join("state/dirs.img");
    let mut n = Node::start(d, &pool_config(d, "")).await;
    let id = n.create_of("dir", "v", 256 * MIB).await.unwrap();
    let before = allocated(&image);

    write_128mib(&d.join("state/dirs").join(&id).join("data"), &image, before);
    delete_volume(&mut n, id).await;
    until_given_back(&image, before).await;
    n.stop();
}
