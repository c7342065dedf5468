//! Crash tier (a plain build: SIGKILL needs no injection point): thinboxd,
//! serving both doors on one pool, is killed with SIGKILL again and again
//! while a containerd-like client drives snapshots (Prepare, Mounts, Commit,
//! View, Remove) and a kubelet-like client drives volumes (CreateVolume,
//! NodePublish, NodeUnpublish, CreateSnapshot, DeleteSnapshot, DeleteVolume)
//! at the same time. Every request answered before a kill must have
//! succeeded. After the last kill the daemon starts once more and the clients
//! clean up as a CO would (every listed volume's known targets unpublished,
//! every volume and snapshot the rounds made deleted); then the pool holds
//! exactly the layers and volumes made before the rounds, with their
//! content, the engine's check finds nothing, and once the daemon is stopped
//! (release on exit) no loop device or mount is left under the test's
//! directory. Where volumes live on disk is the daemon's business: leaks are
//! counted through its APIs, its check, and the kernel's loops and mounts
//! under the test's directory. Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::node::{Node, ext4};
use common::snapshots::{commit, labels, prepare, read_through_view, remove, view};
use thinbox_proto::admin::{CheckRequest, PoolStatusRequest, ReconcileReport};
use thinbox_proto::csi::v1::controller_client::ControllerClient;
use thinbox_proto::csi::v1::node_client::NodeClient;
use thinbox_proto::csi::v1::{
    CapacityRange, CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeRequest, ListSnapshotsRequest as CsiListSnapshots,
    ListVolumesRequest, NodePublishVolumeRequest, NodeUnpublishVolumeRequest,
};
use thinbox_proto::snapshots::snapshots_client::SnapshotsClient;
use thinbox_proto::snapshots::{Info, ListSnapshotsRequest, MountsRequest};
use tonic::Status;
use tonic::transport::Channel;

const POOL: &str = "embedded_size = \"4GiB\"\nreserve = \"64MiB\"";
const MIB: u64 = 1 << 20;
/// The smallest volume CSI makes.
const VOLUME: u64 = 300 * MIB;
/// How long each round lets the clients run before the SIGKILL: varied, so
/// the kill lands early (the first requests) and late (a long run of them).
const KILL_AFTER_MS: [u64; 8] = [50, 800, 180, 1200, 420, 90, 650, 300];
/// Pre-made committed layers: name, parent, file, content.
const LAYERS: [(&str, &str, &str, &str); 2] = [("base", "", "hello", "world"), ("mid", "base", "mid", "layer two")];
/// Pre-made volumes: name, kind, content of its file `data`.
const VOLUMES: [(&str, &str, &str); 2] = [("pre-block", "block", "block volume data"), ("pre-file", "file", "file volume data")];

/// Targets each volume id was ever published at: what the kubelet knows and
/// unpublishes again after a crash.
type Targets = Arc<Mutex<HashMap<String, BTreeSet<PathBuf>>>>;

/// What a client did in all rounds.
#[derive(Default)]
struct Tally {
    done: AtomicUsize,
    /// The request asked last (in flight at the kill, or just answered).
    last: Mutex<String>,
}

/// A request's answer: before the kill it must be a success (`Err` fails
/// the test); after the kill any failure ends the client (`Ok(None)`).
fn answer<T>(killed: &AtomicBool, what: &str, r: Result<T, Status>) -> Result<Option<T>, String> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(_) if killed.load(Ordering::SeqCst) => Ok(None),
        Err(e) => Err(format!("{what} failed before the kill: {e:?}")),
    }
}

/// One request of a client, in a client's loop: remembered as the last one
/// asked, its answer checked by [`answer`], counted; after the kill it ends
/// the client (`return Ok(())`).
macro_rules! step {
    ($tally:expr, $killed:expr, $what:expr, $r:expr) => {{
        let what = $what;
        *$tally.last.lock().unwrap() = what.clone();
        match answer(&$killed, &what, $r)? {
            Some(v) => {
                $tally.done.fetch_add(1, Ordering::SeqCst);
                v
            }
            None => return Ok(()),
        }
    }};
}

/// containerd's side: new keys on the pre-made layers (and without a parent),
/// each prepared, asked for its mounts, committed, viewed and removed.
async fn snapshot_client(mut c: SnapshotsClient<Channel>, round: usize, killed: Arc<AtomicBool>, tally: Arc<Tally>) -> Result<(), String> {
    for i in 0.. {
        if killed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let (key, name, v) = (format!("r{round}-a{i}"), format!("r{round}-c{i}"), format!("r{round}-v{i}"));
        let parent = ["base", "mid", ""][i % 3];
        // A new filesystem is made smaller than the 10 GiB default (mkfs time); a child keeps its parent's size.
        let size = if parent.is_empty() { labels(&[("containerd.io/snapshot/max-size", "536870912")]) } else { HashMap::new() };
        let mounts = step!(tally, killed, format!("Prepare {key} on {parent:?}"), prepare(&mut c, &key, parent, size).await);
        let again = step!(tally, killed, format!("Mounts {key}"), c.mounts(MountsRequest { snapshotter: "thinbox".into(), key: key.clone() }).await);
        if mounts.len() != 1 || again.into_inner().mounts != mounts {
            return Err(format!("{key}: Mounts does not repeat Prepare's one mount: {mounts:?}"));
        }
        step!(tally, killed, format!("Commit {key} as {name}"), commit(&mut c, &name, &key).await);
        if i % 2 == 0 {
            step!(tally, killed, format!("View {v} of {name}"), view(&mut c, &v, &name).await);
            step!(tally, killed, format!("Remove {v}"), remove(&mut c, &v).await);
        }
        step!(tally, killed, format!("Remove {name}"), remove(&mut c, &name).await);
    }
    Ok(())
}

/// Pod `pod`'s target for volume `name` (the parent made as kubelet does).
fn target(dir: &Path, pod: &str, name: &str) -> PathBuf {
    let parent = dir.join("kubelet/pods").join(pod).join("volumes/kubernetes.io~csi").join(name);
    std::fs::create_dir_all(&parent).unwrap();
    parent.join("mount")
}

fn create_req(name: &str, kind: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: VOLUME as i64, limit_bytes: 0 }),
        volume_capabilities: vec![ext4()],
        parameters: HashMap::from([("kind".into(), kind.into())]),
        ..Default::default()
    }
}

fn publish_req(id: &str, target: &Path) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(ext4()),
        volume_context: HashMap::from([("thinbox.io/sandbox".into(), "runc".into())]),
        ..Default::default()
    }
}

/// The kubelet's and external-provisioner's side: volumes of both kinds
/// created, published on the host, written, unpublished, snapshotted and
/// deleted; and snapshots of a pre-made volume taken and deleted.
#[allow(clippy::too_many_arguments)]
async fn volume_client(
    mut ctl: ControllerClient<Channel>,
    mut node: NodeClient<Channel>,
    dir: PathBuf,
    round: usize,
    premade: String,
    targets: Targets,
    killed: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Result<(), String> {
    for i in 0.. {
        if killed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let name = format!("r{round}-v{i}");
        let kind = ["block", "file"][i % 2];
        let vol = step!(tally, killed, format!("CreateVolume {name} ({kind})"), ctl.create_volume(create_req(&name, kind)).await);
        let id = vol.into_inner().volume.unwrap().volume_id;
        let t = target(&dir, &format!("r{round}"), &name);
        // Known to the kubelet before it asks: a publish the kill interrupts is retried by it.
        targets.lock().unwrap().entry(id.clone()).or_default().insert(t.clone());
        step!(tally, killed, format!("NodePublishVolume {id} at {}", t.display()), node.node_publish_volume(publish_req(&id, &t)).await);
        if let Err(e) = std::fs::write(t.join("data"), &name) {
            return Err(format!("write into the published {id}: {e}"));
        }
        let unpublish = NodeUnpublishVolumeRequest { volume_id: id.clone(), target_path: t.display().to_string() };
        step!(tally, killed, format!("NodeUnpublishVolume {id}"), node.node_unpublish_volume(unpublish).await);
        // A snapshot of the volume just made, and every other round one of a pre-made volume.
        let sources = if i % 2 == 0 { vec![id.clone(), premade.clone()] } else { vec![id.clone()] };
        for (j, source) in sources.into_iter().enumerate() {
            let req = CreateSnapshotRequest { source_volume_id: source.clone(), name: format!("r{round}-s{i}-{j}"), ..Default::default() };
            let snap = step!(tally, killed, format!("CreateSnapshot of {source}"), ctl.create_snapshot(req).await);
            let snapshot_id = snap.into_inner().snapshot.unwrap().snapshot_id;
            let del = DeleteSnapshotRequest { snapshot_id: snapshot_id.clone(), secrets: HashMap::new() };
            step!(tally, killed, format!("DeleteSnapshot {snapshot_id}"), ctl.delete_snapshot(del).await);
        }
        step!(
            tally,
            killed,
            format!("DeleteVolume {id}"),
            ctl.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), secrets: HashMap::new() }).await
        );
    }
    Ok(())
}

/// The engine's check found nothing to repair or clean.
fn assert_clean(report: Option<ReconcileReport>, when: &str) {
    assert_eq!(report.unwrap(), ReconcileReport::default(), "{when}: the engine's check finds records and devices in step");
}

/// Every snapshot with its info.
async fn snapshot_infos(c: &mut SnapshotsClient<Channel>) -> Vec<Info> {
    let mut stream = c.list(ListSnapshotsRequest { snapshotter: "thinbox".into(), filters: vec![] }).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        out.extend(page.info);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_snapshots_and_volumes_at_once_then_a_clean_pool() {
    common::require_root();
    let started = Instant::now();
    let tmp = tempfile::Builder::new().prefix("tbkill-").tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let work = dir.join("work");
    let mut n = Node::start(&dir, POOL).await;

    // Before the rounds: committed layers and volumes with known content.
    for (name, parent, file, content) in LAYERS {
        common::snapshots::layer(&mut n.snap, &work, name, parent, &[(file, content)]).await;
    }
    let mut premade: BTreeMap<String, (&str, &str)> = BTreeMap::new();
    for (name, kind, content) in VOLUMES {
        let vol = n.ctl.create_volume(create_req(name, kind)).await.unwrap().into_inner().volume.unwrap();
        let t = n.publish(&vol.volume_id, name).await;
        std::fs::write(t.join("data"), content).unwrap();
        n.unpublish(&vol.volume_id, &t).await;
        premade.insert(vol.volume_id, (name, content));
    }
    let block_volume = premade.iter().find(|(_, (name, _))| *name == "pre-block").unwrap().0.clone();

    let targets: Targets = Arc::default();
    let (snap_tally, vol_tally) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    for (round, delay) in KILL_AFTER_MS.into_iter().enumerate() {
        if round > 0 {
            n = Node::start(&dir, POOL).await;
        }
        // Each start converged what the last kill interrupted.
        assert_clean(n.admin().await.check(CheckRequest {}).await.unwrap().into_inner().report, &format!("start of round {round}"));
        let killed = Arc::new(AtomicBool::new(false));
        let snaps = tokio::spawn(snapshot_client(n.snap.clone(), round, killed.clone(), snap_tally.clone()));
        let vols = tokio::spawn(volume_client(
            n.ctl.clone(),
            n.node.clone(),
            dir.clone(),
            round,
            block_volume.clone(),
            targets.clone(),
            killed.clone(),
            vol_tally.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(delay)).await;
        killed.store(true, Ordering::SeqCst);
        n.kill9();
        for (who, task) in [("snapshot client", snaps), ("volume client", vols)] {
            let joined = tokio::time::timeout(Duration::from_secs(120), task).await;
            let result = joined.unwrap_or_else(|_| panic!("round {round}: the {who} still runs 120 s after the kill")).unwrap();
            if let Err(e) = result {
                panic!(
                    "round {round} (kill after {delay} ms), {who}: {e}\n{}",
                    std::fs::read_to_string(dir.join("thinboxd.log")).unwrap_or_default()
                );
            }
        }
        let last = |t: &Tally| t.last.lock().unwrap().clone();
        println!("round {round}: killed after {delay} ms, at {:?} and {:?}", last(&snap_tally), last(&vol_tally));
        // Each start truncates the log: keep the killed daemon's.
        std::fs::rename(dir.join("thinboxd.log"), dir.join(format!("thinboxd-round{round}.log"))).unwrap();
    }
    let (snap_ops, vol_ops) = (snap_tally.done.load(Ordering::SeqCst), vol_tally.done.load(Ordering::SeqCst));
    println!("{} rounds: {snap_ops} snapshot and {vol_ops} volume requests answered before the kills", KILL_AFTER_MS.len());
    assert!(snap_ops >= 20 && vol_ops >= 10, "the clients did work between the kills: {snap_ops} snapshot, {vol_ops} volume requests");

    // The last start, and the cleanup a CO does.
    let mut n = Node::start(&dir, POOL).await;
    assert_clean(n.admin().await.check(CheckRequest {}).await.unwrap().into_inner().report, "after the last kill");
    let csi_snaps = n.ctl.list_snapshots(CsiListSnapshots::default()).await.unwrap().into_inner().entries;
    for e in csi_snaps {
        let id = e.snapshot.unwrap().snapshot_id;
        n.ctl.delete_snapshot(DeleteSnapshotRequest { snapshot_id: id, secrets: HashMap::new() }).await.unwrap();
    }
    let listed = n.ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert!(listed.next_token.is_empty(), "one page");
    let known = targets.lock().unwrap().clone();
    for e in listed.entries {
        let id = e.volume.unwrap().volume_id;
        for t in known.get(&id).into_iter().flatten() {
            n.node
                .node_unpublish_volume(NodeUnpublishVolumeRequest { volume_id: id.clone(), target_path: t.display().to_string() })
                .await
                .unwrap_or_else(|e| panic!("the kubelet's unpublish of {id} at {}: {e:?}", t.display()));
        }
        if !premade.contains_key(&id) {
            n.ctl
                .delete_volume(DeleteVolumeRequest { volume_id: id.clone(), secrets: HashMap::new() })
                .await
                .unwrap_or_else(|e| panic!("{id}: {e:?}"));
        }
    }
    // Snapshots the rounds left, children before their parents.
    let keep: BTreeSet<&str> = LAYERS.iter().map(|l| l.0).collect();
    let mut left: Vec<Info> = snapshot_infos(&mut n.snap).await.into_iter().filter(|i| !keep.contains(i.name.as_str())).collect();
    while !left.is_empty() {
        let parents: BTreeSet<String> = left.iter().map(|i| i.parent.clone()).collect();
        let (leaves, rest): (Vec<Info>, Vec<Info>) = left.into_iter().partition(|i| !parents.contains(&i.name));
        assert!(!leaves.is_empty(), "a cycle of parents: {rest:?}");
        for i in leaves {
            remove(&mut n.snap, &i.name).await.unwrap_or_else(|e| panic!("Remove {}: {e:?}", i.name));
        }
        left = rest;
    }

    // Exactly what was made before the rounds is left, with its content.
    let infos = snapshot_infos(&mut n.snap).await;
    let names: BTreeSet<&str> = infos.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, keep, "only the pre-made layers");
    for (name, parent, file, content) in LAYERS {
        let info = infos.iter().find(|i| i.name == name).unwrap();
        assert_eq!((info.parent.as_str(), info.kind), (parent, thinbox_proto::snapshots::Kind::Committed as i32), "{name}");
        assert_eq!(read_through_view(&mut n.snap, &work, name, file).await, content, "layer {name}'s {file}");
    }
    assert_eq!(read_through_view(&mut n.snap, &work, "mid", "hello").await, "world", "mid holds base's file");
    let vols: BTreeSet<String> = n.volume_ids().await.into_iter().collect();
    assert_eq!(vols, premade.keys().cloned().collect(), "only the pre-made volumes");
    assert!(n.ctl.list_snapshots(CsiListSnapshots::default()).await.unwrap().into_inner().entries.is_empty(), "no CSI snapshot left");
    for (id, (name, content)) in &premade {
        let t = n.publish(id, &format!("{name}-check")).await;
        let read = std::fs::read_to_string(t.join("data"));
        n.unpublish(id, &t).await;
        assert_eq!(read.unwrap(), *content, "volume {name}'s data");
    }

    // No leak: every device is a pre-made layer's or volume's, each of those
    // has one, and the engine's check agrees with the records.
    let devices = n.settled_devices().await;
    let mut layer_owners = BTreeSet::new();
    let mut volume_owners = BTreeSet::new();
    for d in &devices {
        assert_eq!(d.state, "ready", "{d:?}");
        assert!(d.snapshots.len() + d.volumes.len() == 1, "each device has exactly one owner: {d:?}");
        for s in &d.snapshots {
            assert!(keep.contains(s.as_str()) && d.consumer == "image_layer", "a device of a snapshot the rounds made: {d:?}");
            layer_owners.insert(s.clone());
        }
        for v in &d.volumes {
            assert!(premade.contains_key(v) && d.consumer == "volume", "a device of a volume the rounds made: {d:?}");
            volume_owners.insert(v.clone());
        }
        assert_eq!(d.access, None, "nothing is attached: {d:?}");
    }
    assert_eq!(layer_owners.iter().map(String::as_str).collect::<BTreeSet<_>>(), keep, "every layer has its device");
    assert!(volume_owners.contains(&block_volume), "the block volume has its device");
    let status = n.admin().await.pool_status(PoolStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.status.unwrap().devices, devices.len() as u64, "status counts the listed devices");
    let share = |c: &str| status.consumers.iter().find(|u| u.consumer == c).cloned().unwrap_or_default();
    assert_eq!(share("image_layer").devices, LAYERS.len() as u64, "{:?}", status.consumers);
    assert_eq!(share("container_rootfs").devices, 0, "{:?}", status.consumers);
    let volume = share("volume");
    assert_eq!(volume.devices + volume.outside_pool_volumes, VOLUMES.len() as u64, "{:?}", status.consumers);
    let empty_dir = share("emptydir");
    assert_eq!((empty_dir.devices, empty_dir.outside_pool_volumes), (0, 0), "{:?}", status.consumers);
    assert_eq!(share("volume_snapshot").devices, 0, "{:?}", status.consumers);
    assert!(status.consumers.iter().all(|u| !u.consumer.is_empty()), "no device without an owner: {:?}", status.consumers);
    assert_clean(n.admin().await.check(CheckRequest {}).await.unwrap().into_inner().report, "after the cleanup");
    assert_eq!(common::volumes::mounts_under(&dir.join("kubelet")), Vec::<PathBuf>::new(), "no publication left mounted");

    // Stopped with release on exit: nothing of the test's is left in the kernel.
    n.stop();
    assert_eq!(thinbox_blockstore::scan_loops(&dir).unwrap(), vec![], "loop devices backed under {}", dir.display());
    assert_eq!(common::volumes::mounts_under(&dir), Vec::<PathBuf>::new(), "mounts under {}", dir.display());
    let errors = common::error_lines(&std::fs::read(dir.join("thinboxd.log")).unwrap());
    println!("the last daemon logged {} error line(s): {errors:#?}", errors.len());
    println!("took {:?}", started.elapsed());
}
