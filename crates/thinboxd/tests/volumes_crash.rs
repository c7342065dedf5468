//! Crash safety (crash tier, `fault-injection` build): `thinboxd`, serving its
//! CSI socket, aborts, like `kill -9`, at each step of CreateVolume,
//! NodePublishVolume, NodeUnpublishVolume and DeleteVolume. After a restart the
//! volume either exists whole or not at all, no publication is half-made
//! (nothing mounted, nothing attached), the CO's retry succeeds, and nothing
//! leaks. Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::volumes::*;
use thinbox_proto::csi::v1::*;

/// Every injection point, for each volume kind that reaches it.
const POINTS: &[&str] = &[
    "csi.create.after_intent",
    "csi.create.after_build",
    "csi.publish.after_record",
    "csi.publish.after_attach",
    "csi.unpublish.after_unmount",
    "csi.delete.after_mark",
];

#[tokio::test]
async fn every_interrupted_step_converges_after_restart() {
    for kind in ["block", "file"] {
        for point in POINTS {
            crash_at(kind, point).await;
        }
    }
}

async fn crash_at(kind: &str, point: &str) {
    let mut d = Driver::start().await;
    let what = format!("{kind} at {point}");
    let name = "pvc-crash";
    let target = d.target("pod-c", name);
    let before_create = point.starts_with("csi.create");
    d.restart_faulty(if before_create { point } else { "none" }).await;
    let created = d.ctl.create_volume(create_req(name, 400 << 20, &[("kind", kind)], mount_cap("ext4"))).await;
    if before_create {
        assert!(created.is_err(), "{what}: the driver aborted");
        d.reap_crash();
        d.restart().await;
        // Rolled back entirely: nothing listed, nothing on disk.
        assert!(d.ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries.is_empty(), "{what}");
        assert_eq!(d.stored_devices(0).await, 0, "{what}: no device left");
    }
    // The CO retries (or this is the first create): it succeeds.
    let vol = create(&mut d, name, 400 << 20, &[("kind", kind)], mount_cap("ext4")).await;
    let id = vol.volume_id.clone();

    let publish = publish_req(&id, &target, mount_cap("ext4"), false, &[]);
    if point.starts_with("csi.publish") {
        d.restart_faulty(point).await;
        assert!(d.node.node_publish_volume(publish.clone()).await.is_err(), "{what}: the driver aborted");
        d.reap_crash();
        d.restart().await;
        assert!(fstype_of(&target).is_empty(), "{what}: nothing mounted after the restart");
        assert_eq!(attached(&d), 0, "{what}: nothing attached for a publication that never finished");
    }
    d.node.node_publish_volume(publish.clone()).await.unwrap();
    std::fs::write(target.join("data"), "kept").unwrap();

    if point == "csi.unpublish.after_unmount" {
        d.restart_faulty(point).await;
        assert!(unpublish(&mut d, &id, &target).await.is_err(), "{what}: the driver aborted");
        d.reap_crash();
        d.restart().await;
        assert!(fstype_of(&target).is_empty(), "{what}: left unmounted");
        assert_eq!(attached(&d), 0, "{what}: detached at restart");
    }
    unpublish(&mut d, &id, &target).await.unwrap();
    // The data survived whatever happened to the publications.
    d.node.node_publish_volume(publish).await.unwrap();
    assert_eq!(std::fs::read_to_string(target.join("data")).unwrap(), "kept", "{what}");
    unpublish(&mut d, &id, &target).await.unwrap();

    let delete = DeleteVolumeRequest { volume_id: id.clone(), secrets: HashMap::new() };
    if point == "csi.delete.after_mark" {
        d.restart_faulty(point).await;
        assert!(d.ctl.delete_volume(delete.clone()).await.is_err(), "{what}: the driver aborted");
        d.reap_crash();
        d.restart().await;
        // Reconciliation finished the deletion.
        assert!(d.ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries.is_empty(), "{what}");
    }
    d.ctl.delete_volume(delete).await.unwrap();
    // The device goes in the background, after DeleteVolume returns.
    assert_eq!(d.stored_devices(0).await, 0, "{what}: no device left");
    d.finish().await;
}

/// Attached devices of the pool (the embedded pool's own loop excluded).
fn attached(d: &Driver) -> usize {
    thinbox_blockstore::inventory(&d.path("state"), &Default::default()).unwrap().attached.len()
}

/// A group snapshot aborted at each step of its create and delete: after a
/// restart it exists whole (members and devices) or not at all, the CO's
/// retry succeeds, and nothing leaks.
#[tokio::test]
async fn an_interrupted_group_snapshot_converges_after_restart() {
    for point in ["csi.group.after_intent", "csi.group.after_build", "csi.group.after_ready", "csi.group.delete.after_mark"] {
        let mut d = Driver::start().await;
        let mut ids = Vec::new();
        for name in ["db", "log"] {
            ids.push(create(&mut d, name, 64 << 20, &[("kind", "block")], mount_cap("ext4")).await.volume_id);
        }
        let target = d.target("pod-g", "db");
        d.node.node_publish_volume(publish_req(&ids[0], &target, mount_cap("ext4"), false, &[])).await.unwrap();
        std::fs::write(target.join("data"), "kept").unwrap();
        let members = |d: &mut Driver| {
            let mut ctl = d.ctl.clone();
            async move { ctl.list_snapshots(ListSnapshotsRequest::default()).await.unwrap().into_inner().entries.len() }
        };
        let req = CreateVolumeGroupSnapshotRequest { name: "grp".into(), source_volume_ids: ids.clone(), ..Default::default() };
        if !point.contains("delete") {
            d.restart_faulty(point).await;
            assert!(d.group.create_volume_group_snapshot(req.clone()).await.is_err(), "{point}: the driver aborted");
            d.reap_crash();
            d.restart().await;
            let want = if point.ends_with("after_ready") { 2 } else { 0 };
            assert_eq!(members(&mut d).await, want, "{point}: all members or none");
            assert_eq!(d.stored_devices(2 + want).await, 2 + want, "{point}: a device per volume and member");
        }
        // The CO retries (or this is the first create): it succeeds, once.
        let group = d.group.create_volume_group_snapshot(req.clone()).await.unwrap().into_inner().group_snapshot.unwrap();
        assert_eq!(members(&mut d).await, 2, "{point}");
        let mut restore = create_req("restored", 0, &[("kind", "block")], mount_cap("ext4"));
        restore.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: group.snapshots[0].snapshot_id.clone(),
            })),
        });
        let restored = d.ctl.create_volume(restore).await.unwrap().into_inner().volume.unwrap().volume_id;
        let rt = d.target("pod-r", "restored");
        d.node.node_publish_volume(publish_req(&restored, &rt, mount_cap("ext4"), false, &[])).await.unwrap();
        assert_eq!(std::fs::read_to_string(rt.join("data")).unwrap(), "kept", "{point}: the member holds the data");
        unpublish(&mut d, &restored, &rt).await.unwrap();

        let delete = DeleteVolumeGroupSnapshotRequest { group_snapshot_id: group.group_snapshot_id.clone(), ..Default::default() };
        if point.contains("delete") {
            d.restart_faulty(point).await;
            assert!(d.group.delete_volume_group_snapshot(delete.clone()).await.is_err(), "{point}: the driver aborted");
            d.reap_crash();
            d.restart().await;
            assert_eq!(members(&mut d).await, 0, "{point}: reconciliation finished the deletion");
            let get = GetVolumeGroupSnapshotRequest { group_snapshot_id: group.group_snapshot_id.clone(), ..Default::default() };
            assert_eq!(d.group.get_volume_group_snapshot(get).await.unwrap_err().code(), tonic::Code::NotFound, "{point}");
        }
        d.group.delete_volume_group_snapshot(delete).await.unwrap();
        unpublish(&mut d, &ids[0], &target).await.unwrap();
        for id in ids.into_iter().chain([restored]) {
            d.ctl.delete_volume(DeleteVolumeRequest { volume_id: id, secrets: HashMap::new() }).await.unwrap();
        }
        assert_eq!(d.stored_devices(0).await, 0, "{point}: no device left");
        d.finish().await;
    }
}
