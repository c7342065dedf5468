//! A power cut right after an answer: what the answer promised is on disk.
//!
//! The embedded pool's XFS is shut down without flushing its log (`xfs_io -x
//! -c shutdown`, xfstests' "godown"): whatever the filesystem had not yet
//! forced to its log is lost, as if the power went, while the store (another
//! filesystem) keeps what it flushed. Then the daemon is killed, the pool
//! unmounted, and thinboxd started again on the same root: XFS replays its
//! log, and every device the store calls ready must still have its storage.
//! Also: a device whose storage is gone all the same is reported, and does
//! not keep the daemon (both doors) from starting. Reflink only: dm-thin
//! commits its metadata with each message. Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::node::Node;
use thinbox_proto::admin::{CheckRequest, ReconcileReport};
use thinbox_proto::csi::v1::{CreateSnapshotRequest, DeleteVolumeRequest, ListSnapshotsRequest};

const POOL: &str = "backend = \"reflink\"";
/// Buffered loops: the test must not lean on the flush of its backing file
/// that binding a loop with direct I/O makes.
const BUFFERED_POOL: &str = "backend = \"reflink\"\ndirect_io = false";

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

async fn check(n: &Node) -> ReconcileReport {
    n.admin().await.check(CheckRequest {}).await.unwrap().into_inner().report.unwrap()
}

/// After the daemon died: detaches the devices' loops (they hold files of the
/// pool) and unmounts the pool, whose own loop then goes (autoclear).
fn unmount_pool(dir: &Path) {
    let pool = dir.join("state/pool");
    for l in thinbox_blockstore::scan_loops(&pool).unwrap() {
        run(Command::new("losetup").arg("-d").arg(&l.node));
    }
    run(Command::new("umount").arg(&pool));
}

/// What is answered between the pool filesystem's last flush and the cut.
#[derive(Clone, Copy, Debug)]
enum Answer {
    CreateVolume,
    CreateSnapshot,
    Prepare,
}

/// Starts a node, makes volume `v1` (its CreateVolume also makes the pool's
/// ext4 template) and flushes the pool filesystem; then gets `answer`, cuts
/// the power of the pool, restarts, and checks that nothing the store calls
/// ready lost its storage.
async fn cut_after(answer: Answer) -> (tempfile::TempDir, Node) {
    common::require_root();
    let tmp = tempfile::Builder::new().prefix("thinbox-cut-").tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let mut n = Node::start(&dir, BUFFERED_POOL).await;
    let v1 = n.create("v1", 64 << 20).await.unwrap();
    run(Command::new("sync").arg("-f").arg(dir.join("state/pool")));
    match answer {
        Answer::CreateVolume => drop(n.create("v2", 64 << 20).await.unwrap()),
        Answer::CreateSnapshot => {
            let snap = CreateSnapshotRequest { source_volume_id: v1, name: "s1".into(), ..Default::default() };
            n.ctl.create_snapshot(snap).await.unwrap();
        }
        Answer::Prepare => n.prepare("ctr").await.unwrap(),
    }
    run(Command::new("xfs_io").args(["-x", "-c", "shutdown"]).arg(dir.join("state/pool")));
    n.kill9();
    unmount_pool(&dir);

    let n = Node::start(&dir, BUFFERED_POOL).await;
    let report = check(&n).await;
    assert!(report.missing.is_empty(), "{answer:?} answered before the cut, its device lost its storage: {report:?}");
    (tmp, n)
}

#[tokio::test]
async fn a_power_cut_after_create_volume_keeps_the_volume() {
    let (_dir, mut n) = cut_after(Answer::CreateVolume).await;
    // The cloned filesystem is whole: it mounts and takes a file.
    let ids = n.volume_ids().await;
    assert_eq!(ids.len(), 2, "{ids:?}");
    for (i, id) in ids.iter().enumerate() {
        let target = n.publish(id, &format!("v{i}")).await;
        std::fs::write(target.join("after-the-cut"), b"ok").unwrap();
        n.unpublish(id, &target).await;
    }
    n.stop();
}

#[tokio::test]
async fn a_power_cut_after_create_snapshot_keeps_the_snapshot() {
    let (_dir, mut n) = cut_after(Answer::CreateSnapshot).await;
    let snaps = n.ctl.list_snapshots(ListSnapshotsRequest::default()).await.unwrap().into_inner().entries;
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    n.stop();
}

#[tokio::test]
async fn a_power_cut_after_prepare_keeps_the_snapshot() {
    let (_dir, mut n) = cut_after(Answer::Prepare).await;
    assert!(n.snapshots().await.iter().any(|(k, _)| k == "ctr"), "the prepared snapshot is still there");
    n.stop();
}

#[tokio::test]
async fn a_device_whose_storage_is_gone_is_reported_and_the_daemon_still_starts() {
    common::require_root();
    let dir = tempfile::Builder::new().prefix("thinbox-lost-").tempdir().unwrap();
    let mut n = Node::start(dir.path(), POOL).await;
    let v = n.create("v", 64 << 20).await.unwrap();
    // Lost behind the daemon's back (an operator's rm, a broken disk).
    let images: Vec<_> = std::fs::read_dir(dir.path().join("state/pool/devices"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "img"))
        .collect();
    assert_eq!(images.len(), 1, "one volume, one image: {images:?}");
    std::fs::remove_file(&images[0]).unwrap();
    n.stop();

    let mut n = Node::start(dir.path(), POOL).await;
    let report = check(&n).await;
    assert_eq!(report.missing.len(), 1, "the lost image is reported: {report:?}");
    // The volume can still be deleted, and then nothing is left to report.
    n.ctl.delete_volume(DeleteVolumeRequest { volume_id: v, ..Default::default() }).await.unwrap();
    n.settled_devices().await;
    let report = check(&n).await;
    assert!(report.missing.is_empty() && report.orphans.is_empty() && report.devices_removed.is_empty(), "{report:?}");
    n.stop();
}
