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
