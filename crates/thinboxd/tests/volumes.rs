//! Host tier: the real daemon (`thinboxd`, CSI socket only) over its socket,
//! driven the way kubelet and external-provisioner drive it, on real loop
//! devices and filesystems (one reflink pool for `block` and `file` volumes,
//! an XFS quota filesystem for `dir` volumes). Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::volumes::*;
use thinbox_proto::csi::v1::volume_capability::AccessMode;
use thinbox_proto::csi::v1::volume_capability::access_mode::Mode;
use thinbox_proto::csi::v1::*;
use tonic::Code;

#[tokio::test]
async fn identity_node_info_and_metrics() {
    let port = free_port();
    let mut d = Driver::start_with(&["--metrics-address", &format!("127.0.0.1:{port}")]).await;
    let info = d.ident.get_plugin_info(GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "csi.thinbox.io");
    assert!(!info.vendor_version.is_empty());
    assert_eq!(d.ident.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));
    let caps = d.ident.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.unwrap().into_inner().capabilities;
    assert_eq!(caps.len(), 4, "controller and group controller services, topology, online expansion");
    let ni = d.node.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(ni.node_id, NODE);
    // The node also says whether KVM works, as the probe sees it here.
    let kvm = thinbox_block_passthrough::probe::kvm().usable.to_string();
    assert_eq!(ni.accessible_topology.unwrap().segments, params(&[("topology.thinbox.io/node", NODE), ("topology.thinbox.io/kvm", &kvm)]));
    let cap = d.ctl.get_capacity(GetCapacityRequest { parameters: params(&[("kind", "block")]), ..Default::default() }).await.unwrap().into_inner();
    // The new 4 GiB pool is free, as far as the filesystem under its sparse
    // files has room (in the uml tier, less than 4 GiB of guest memory).
    let st = rustix::fs::statvfs(d.path("state")).unwrap();
    let room = st.f_bavail * st.f_frsize;
    let available = u64::try_from(cap.available_capacity).unwrap();
    assert!(available <= room && available >= (3 << 30).min(room.saturating_sub(256 << 20)), "{available} bytes offered, {room} free under the pool");
    let file = d.ctl.get_capacity(GetCapacityRequest { parameters: params(&[("kind", "file")]), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(file.available_capacity, cap.available_capacity, "block and file volumes draw from the one pool");
    let vol = create(&mut d, "pvc-m", 300 << 20, &[("kind", "file")], mount_cap("ext4")).await;
    let text = scrape(port).await;
    for want in [
        "\r\ncontent-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n",
        "thinbox_operations_total{api=\"csi\",op=\"create_volume\",result=\"ok\"} 1\n",
        "thinbox_operations_total{api=\"csi\",op=\"get_capacity\",result=\"ok\"} 2\n",
        "thinbox_operation_duration_seconds_count{api=\"csi\",op=\"create_volume\",result=\"ok\"} 1\n",
        "# TYPE thinbox_csi_available_bytes gauge\n",
        "thinbox_csi_available_bytes{kind=\"block\"}",
        "thinbox_csi_available_bytes{kind=\"file\"}",
        &format!("thinbox_csi_volume_capacity_bytes{{volume=\"{}\",kind=\"file\"}} {}\n", vol.volume_id, 300 << 20),
        &format!("thinbox_csi_volume_allocated_bytes{{volume=\"{}\",kind=\"file\"}}", vol.volume_id),
    ] {
        assert!(text.contains(want), "metrics lack {want:?}:\n{text}");
    }
    assert!(text.ends_with("\n# EOF\n"), "{text}");
    d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id, secrets: HashMap::new() }).await.unwrap();
    d.finish().await;
}

#[tokio::test]
async fn block_volume_mounted_for_runc_full_lifecycle() {
    let mut d = Driver::start().await;
    let vol = create(&mut d, "pvc-1", 1 << 30, &[("csi.storage.k8s.io/pvc/name", "data")], mount_cap("ext4")).await;
    assert_eq!(vol.capacity_bytes, 1 << 30);
    assert_eq!(vol.accessible_topology[0].segments, params(&[("topology.thinbox.io/node", NODE)]));
    // CreateVolume is idempotent by name; a different size under the same name is refused.
    let again = create(&mut d, "pvc-1", 1 << 30, &[], mount_cap("ext4")).await;
    assert_eq!(again.volume_id, vol.volume_id);
    assert_eq!(code(d.ctl.create_volume(create_req("pvc-1", 2 << 30, &[], mount_cap("ext4"))).await), Code::AlreadyExists);

    let target = d.target("pod-1", "pvc-1");
    d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap("ext4"), false, &[])).await.unwrap();
    assert_eq!(fstype_of(&target), "ext4");
    std::fs::write(target.join("hello"), "from the pod").unwrap();
    // Repeating the same publish is fine; a different one at the same target is not.
    d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap("ext4"), false, &[])).await.unwrap();
    assert_eq!(code(d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap("ext4"), true, &[])).await), Code::AlreadyExists);
    assert_eq!(
        code(d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id.clone(), secrets: HashMap::new() }).await),
        Code::FailedPrecondition
    );

    let stats = d.node.node_get_volume_stats(stats_req(&vol.volume_id, &target)).await.unwrap().into_inner();
    assert_eq!(stats.usage.len(), 2, "bytes and inodes");
    assert!(stats.usage[0].total > 900 << 20 && stats.usage[0].used > 0, "{:?}", stats.usage[0]);
    assert!(stats.usage[1].used >= 2, "{:?}", stats.usage[1]);

    // A restart keeps the volume and its publication.
    d.restart().await;
    assert_eq!(std::fs::read_to_string(target.join("hello")).unwrap(), "from the pod");
    let listed = d.ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), 1);

    unpublish(&mut d, &vol.volume_id, &target).await.unwrap();
    assert!(!target.exists(), "target removed");
    unpublish(&mut d, &vol.volume_id, &target).await.unwrap();
    // The data outlives the publication.
    d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap(""), true, &[])).await.unwrap();
    assert_eq!(std::fs::read_to_string(target.join("hello")).unwrap(), "from the pod");
    assert!(std::fs::write(target.join("x"), "y").is_err(), "read-only publish");
    unpublish(&mut d, &vol.volume_id, &target).await.unwrap();

    d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id.clone(), secrets: HashMap::new() }).await.unwrap();
    d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id.clone(), secrets: HashMap::new() }).await.unwrap();
    assert_eq!(code(d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap("ext4"), false, &[])).await), Code::NotFound);
    assert!(d.ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries.is_empty());
    d.finish().await;
}

#[tokio::test]
async fn file_volume_quota_is_its_size() {
    let mut d = Driver::start().await;
    let before = file_capacity(&mut d).await;
    let vol = create(&mut d, "pvc-q", 300 << 20, &[("kind", "file")], mount_cap("ext4")).await;
    let target = d.target("pod-q", "pvc-q");
    d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap("ext4"), false, &[])).await.unwrap();
    assert!(!dd(&target.join("fill"), 400), "a writer past the size gets ENOSPC");
    let took = before - file_capacity(&mut d).await;
    assert!(took > 200 << 20, "the volume's data is in the pool: it took {took} bytes");
    assert!(took <= (300 << 20) + (16 << 20), "the pool gave the volume at most its size (and one allocation unit): {took}");
    unpublish(&mut d, &vol.volume_id, &target).await.unwrap();
    d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id.clone(), secrets: HashMap::new() }).await.unwrap();
    assert_eq!(d.stored_devices(0).await, 0, "the device went with the volume");
    d.finish().await;
}

/// Inline emptyDirs get exactly their `size` (not a 300 MiB floor): a writer
/// runs into ENOSPC, and the pool gives each no more than its size.
#[tokio::test]
async fn small_emptydirs_are_exactly_their_size() {
    let mut d = Driver::start().await;
    for mib in [16u64, 64] {
        let before = file_capacity(&mut d).await;
        let handle = format!("csi-exact-{mib}");
        let target = d.target(&format!("pod-x{mib}"), "scratch");
        let size = format!("{mib}Mi");
        let ctx = [("csi.storage.k8s.io/ephemeral", "true"), ("size", size.as_str()), ("fsType", "ext4")];
        d.node.node_publish_volume(publish_req(&handle, &target, mount_cap(""), false, &ctx)).await.unwrap();
        let st = rustix::fs::statvfs(&target).unwrap();
        let fs_bytes = st.f_blocks * st.f_frsize;
        assert!(fs_bytes <= mib << 20 && fs_bytes > (mib << 20) / 2, "{mib} MiB: the filesystem is {fs_bytes} bytes");
        assert!(!dd(&target.join("fill"), u32::try_from(2 * mib).unwrap()), "{mib} MiB: a writer past the size gets ENOSPC");
        let written = std::fs::metadata(target.join("fill")).unwrap().len();
        let took = before - file_capacity(&mut d).await;
        assert!(written > (mib << 20) / 4, "{mib} MiB: the writer got {written} bytes in");
        assert!(took <= mib << 20, "{mib} MiB: the pool gave it {took} bytes, more than its size");
        unpublish(&mut d, &handle, &target).await.unwrap();
    }
    assert_eq!(d.stored_devices(0).await, 0);
    d.finish().await;
}

/// NodePublishVolume's `volume_mount_group` (a pod's fsGroup, which kubelet
/// leaves to a driver with VOLUME_MOUNT_GROUP): on a host mount, the files
/// take the group with read-write for it, directories set-group-id, as
/// kubelet itself would; a read-only publication gets it too. A group that
/// is not a number is refused, and nothing is mounted.
#[tokio::test]
async fn a_pods_fs_group_owns_a_host_mounted_volume() {
    let mut d = Driver::start().await;
    let with_group = |g: &str| {
        let mut cap = mount_cap("ext4");
        if let Some(volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
            m.volume_mount_group = g.into();
        }
        cap
    };
    let vol = create(&mut d, "pvc-group", 64 << 20, &[], mount_cap("ext4")).await;
    let target = d.target("pod-g1", "data");
    d.node.node_publish_volume(publish_req(&vol.volume_id, &target, with_group("2000"), false, &[])).await.unwrap();
    let root = std::fs::metadata(&target).unwrap();
    assert_eq!((root.gid(), root.mode() & 0o2070), (2000, 0o2070), "the root: the group's, rwx, set-group-id");
    std::fs::create_dir(target.join("sub")).unwrap();
    std::fs::write(target.join("sub/old"), b"x").unwrap();
    assert_eq!(std::fs::metadata(target.join("sub/old")).unwrap().gid(), 2000, "new files inherit the group");
    unpublish(&mut d, &vol.volume_id, &target).await.unwrap();

    // Another pod, another group, read-only: what is there takes the new group.
    let target = d.target("pod-g2", "data");
    d.node.node_publish_volume(publish_req(&vol.volume_id, &target, with_group("3000"), true, &[])).await.unwrap();
    let old = std::fs::metadata(target.join("sub/old")).unwrap();
    assert_eq!((old.gid(), old.mode() & 0o060), (3000, 0o060), "an old file: the new group, read-write for it");
    assert!(std::fs::write(target.join("new"), b"x").is_err(), "the publication is still read-only");
    unpublish(&mut d, &vol.volume_id, &target).await.unwrap();

    let target = d.target("pod-g3", "data");
    let bad = d.node.node_publish_volume(publish_req(&vol.volume_id, &target, with_group("staff"), false, &[])).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(mounts_under(&d.path("kubelet")).is_empty(), "nothing mounted");
    d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id, secrets: HashMap::new() }).await.unwrap();
    d.finish().await;
}

async fn file_capacity(d: &mut Driver) -> u64 {
    let req = GetCapacityRequest { parameters: params(&[("kind", "file")]), ..Default::default() };
    u64::try_from(d.ctl.get_capacity(req).await.unwrap().into_inner().available_capacity).unwrap()
}

#[tokio::test]
async fn raw_block_volume_is_bind_mounted_onto_the_target_file() {
    let mut d = Driver::start().await;
    for kind in ["block", "file"] {
        let vol = create(&mut d, &format!("raw-{kind}"), 300 << 20, &[("kind", kind)], block_cap()).await;
        let parent = d.path(&format!("kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/raw-{kind}"));
        std::fs::create_dir_all(&parent).unwrap();
        let target = parent.join("pod-uid");
        d.node.node_publish_volume(publish_req(&vol.volume_id, &target, block_cap(), false, &[])).await.unwrap();
        let out = Command::new("blockdev").arg("--getsize64").arg(&target).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (300u64 << 20).to_string(), "{kind}: the target is the device");
        unpublish(&mut d, &vol.volume_id, &target).await.unwrap();
        assert!(!target.exists());
        d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id, secrets: HashMap::new() }).await.unwrap();
    }
    d.finish().await;
}

/// NodeGetVolumeStats' VOLUME_CONDITION: healthy while the publication
/// holds, abnormal (saying why) once its mount or its Kata record is gone
/// behind the driver's back; unpublish still cleans up.
#[tokio::test]
async fn volume_condition_says_what_went_wrong() {
    let mut d = Driver::start().await;
    let caps = d.node.node_get_capabilities(NodeGetCapabilitiesRequest {}).await.unwrap().into_inner().capabilities;
    let rpcs: Vec<i32> = caps.iter().filter_map(|c| c.r#type.as_ref().map(|node_service_capability::Type::Rpc(r)| r.r#type)).collect();
    use node_service_capability::rpc::Type;
    for t in [Type::GetVolumeStats, Type::ExpandVolume, Type::VolumeCondition, Type::SingleNodeMultiWriter, Type::VolumeMountGroup] {
        assert!(rpcs.contains(&(t as i32)), "node capability {t:?}: {rpcs:?}");
    }
    let condition = |d: &mut Driver, id: String, target: &Path| {
        let req = stats_req(&id, target);
        let mut node = d.node.clone();
        async move { node.node_get_volume_stats(req).await.unwrap().into_inner().volume_condition.unwrap() }
    };
    for (kind, sandbox) in [("block", "runc"), ("file", "kata")] {
        let vol = create(&mut d, &format!("pvc-cond-{kind}"), 300 << 20, &[("kind", kind), ("thinbox.io/sandbox", sandbox)], mount_cap("ext4")).await;
        let target = d.target("pod-cond", &format!("pvc-cond-{kind}"));
        d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap("ext4"), false, &[])).await.unwrap();
        let ok = condition(&mut d, vol.volume_id.clone(), &target).await;
        assert_eq!((ok.abnormal, ok.message.as_str()), (false, "healthy"), "{kind}");
        let why = if sandbox == "runc" {
            rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH).unwrap();
            "nothing is mounted at"
        } else {
            std::fs::remove_dir_all(d.path(&format!("kata/{}", base64_url(target.to_str().unwrap())))).unwrap();
            "its Kata direct-volume record is gone"
        };
        let wrong = condition(&mut d, vol.volume_id.clone(), &target).await;
        assert!(wrong.abnormal && wrong.message.contains(why), "{kind}: {wrong:?}");
        unpublish(&mut d, &vol.volume_id, &target).await.unwrap();
        d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id, secrets: HashMap::new() }).await.unwrap();
    }
    d.finish().await;
}

#[tokio::test]
async fn kata_volumes_become_direct_volume_records_never_host_mounts() {
    let mut d = Driver::start().await;
    let vol = create(&mut d, "pvc-k", 1 << 30, &[("kind", "file"), ("thinbox.io/sandbox", "kata")], mount_cap("ext4")).await;
    assert_eq!(vol.volume_context.get("thinbox.io/sandbox").map(String::as_str), Some("kata"));
    let target = d.target("pod-k", "pvc-k");
    // The CO passes the volume context back at publish.
    let ctx: Vec<(&str, &str)> = vol.volume_context.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap("ext4"), false, &ctx)).await.unwrap();
    assert!(target.is_dir() && fstype_of(&target).is_empty(), "the target exists but nothing is mounted on the host");
    let encoded = base64_url(target.to_str().unwrap());
    let record = d.path(&format!("kata/{encoded}/mountInfo.json"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    let device = json["device"].as_str().unwrap().to_owned();
    // A loop device (reflink pool) or a thin device (dm-thin).
    assert!(std::fs::metadata(&device).unwrap().file_type().is_block_device(), "{json}");
    assert_eq!(json["volume-type"], "block");
    assert_eq!(json["fstype"], "ext4");
    assert_eq!(json["metadata"]["thinbox.io/volume"], vol.volume_id.as_str());
    assert_eq!(json["options"], serde_json::json!(["noatime"]));
    // The guest would mount the device; the host must not at the same time.
    let other = d.target("pod-r", "pvc-k");
    let runc = publish_req(&vol.volume_id, &other, mount_cap("ext4"), false, &[("thinbox.io/sandbox", "runc")]);
    assert_eq!(code(d.node.node_publish_volume(runc).await), Code::FailedPrecondition);
    assert!(!other.exists());
    unpublish(&mut d, &vol.volume_id, &target).await.unwrap();
    assert!(!record.exists() && !record.parent().unwrap().exists(), "record removed");
    d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id, secrets: HashMap::new() }).await.unwrap();
    d.finish().await;
}

/// Go's base64.URLEncoding (with padding), as Kata names record directories.
fn base64_url(s: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", "import base64,sys; print(base64.urlsafe_b64encode(sys.argv[1].encode()).decode())", s])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn ephemeral_inline_volume_lives_as_long_as_its_publication() {
    let mut d = Driver::start().await;
    let handle = "csi-8d9f0c1e2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f7e8d9c0b1a2f3e4d5c6b7a8f9e";
    let target = d.target("pod-e", "scratch");
    let ctx = [("csi.storage.k8s.io/ephemeral", "true"), ("size", "400Mi"), ("fsType", "xfs"), ("csi.storage.k8s.io/pod.name", "p")];
    d.node.node_publish_volume(publish_req(handle, &target, mount_cap(""), false, &ctx)).await.unwrap();
    assert_eq!(fstype_of(&target), "xfs");
    d.node.node_publish_volume(publish_req(handle, &target, mount_cap(""), false, &ctx)).await.unwrap();
    assert_eq!(d.stored_devices(1).await, 1, "the inline volume is a device of the pool");
    assert!(d.ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries.is_empty(), "inline volumes are not listed as PVs");
    unpublish(&mut d, handle, &target).await.unwrap();
    assert_eq!(d.stored_devices(0).await, 0, "the device went with the publication");
    // A bad attribute fails the publish and leaves nothing behind.
    let bad = [("csi.storage.k8s.io/ephemeral", "true"), ("size", "lots")];
    assert_eq!(code(d.node.node_publish_volume(publish_req(handle, &target, mount_cap(""), false, &bad)).await), Code::InvalidArgument);
    assert_eq!(d.stored_devices(0).await, 0);
    d.finish().await;
}

#[tokio::test]
async fn bad_requests_get_the_right_codes_and_change_nothing() {
    let mut d = Driver::start().await;
    let ok = create(&mut d, "pvc-ok", 300 << 20, &[], mount_cap("ext4")).await;
    let c = &mut d.ctl;
    assert_eq!(code(c.create_volume(create_req("", 1 << 30, &[], mount_cap("ext4"))).await), Code::InvalidArgument, "no name");
    let mut no_caps = create_req("n", 1 << 30, &[], mount_cap("ext4"));
    no_caps.volume_capabilities.clear();
    assert_eq!(code(c.create_volume(no_caps).await), Code::InvalidArgument, "no capabilities");
    let multi = VolumeCapability { access_mode: Some(AccessMode { mode: Mode::MultiNodeMultiWriter as i32 }), ..mount_cap("ext4") };
    assert_eq!(code(c.create_volume(create_req("n", 1 << 30, &[], multi)).await), Code::InvalidArgument, "multi-node access");
    assert_eq!(
        code(c.create_volume(create_req("n", 1 << 30, &[("colour", "blue")], mount_cap("ext4"))).await),
        Code::InvalidArgument,
        "unknown parameter"
    );
    assert_eq!(code(c.create_volume(create_req("n", 1 << 30, &[("kind", "nfs")], mount_cap("ext4"))).await), Code::InvalidArgument, "unknown kind");
    assert_eq!(code(c.create_volume(create_req("n", 1 << 30, &[], mount_cap("zfs"))).await), Code::InvalidArgument, "unknown filesystem");
    let mut range = create_req("n", 2 << 30, &[], mount_cap("ext4"));
    range.capacity_range = Some(CapacityRange { required_bytes: 2 << 30, limit_bytes: 1 << 30 });
    assert_eq!(code(c.create_volume(range).await), Code::OutOfRange, "required above limit");
    assert_eq!(
        code(c.create_volume(create_req("huge", 1 << 50, &[("kind", "file")], mount_cap("ext4"))).await),
        Code::ResourceExhausted,
        "bigger than the node"
    );
    let mut elsewhere = create_req("n", 1 << 30, &[], mount_cap("ext4"));
    elsewhere.accessibility_requirements =
        Some(TopologyRequirement { requisite: vec![Topology { segments: params(&[("topology.thinbox.io/node", "node-b")]) }], preferred: vec![] });
    assert_eq!(code(c.create_volume(elsewhere).await), Code::ResourceExhausted, "another node's topology");
    assert_eq!(code(c.delete_volume(DeleteVolumeRequest::default()).await), Code::InvalidArgument);
    c.delete_volume(DeleteVolumeRequest { volume_id: "tb-block-999".into(), secrets: HashMap::new() }).await.unwrap();
    let vvc =
        |id: &str| ValidateVolumeCapabilitiesRequest { volume_id: id.into(), volume_capabilities: vec![mount_cap("ext4")], ..Default::default() };
    assert_eq!(code(c.validate_volume_capabilities(vvc("tb-block-999")).await), Code::NotFound);
    assert!(c.validate_volume_capabilities(vvc(&ok.volume_id)).await.unwrap().into_inner().confirmed.is_some());
    let xfs = ValidateVolumeCapabilitiesRequest { volume_capabilities: vec![mount_cap("xfs")], ..vvc(&ok.volume_id) };
    assert!(c.validate_volume_capabilities(xfs).await.unwrap().into_inner().confirmed.is_none(), "an ext4 volume is not xfs");
    assert_eq!(code(c.create_snapshot(CreateSnapshotRequest::default()).await), Code::InvalidArgument, "snapshot without name");

    let target = d.target("pod-x", "v");
    let dotdot = PathBuf::from(format!("{}/pods/../../escape", d.path("kubelet").display()));
    let n = &mut d.node;
    let p = |id: &str, t: &Path| publish_req(id, t, mount_cap("ext4"), false, &[]);
    assert_eq!(code(n.node_publish_volume(p("", &target)).await), Code::InvalidArgument, "no volume id");
    assert_eq!(code(n.node_publish_volume(p(&ok.volume_id, Path::new(""))).await), Code::InvalidArgument, "no target");
    let no_cap = NodePublishVolumeRequest { volume_capability: None, ..p(&ok.volume_id, &target) };
    assert_eq!(code(n.node_publish_volume(no_cap).await), Code::InvalidArgument, "no capability");
    assert_eq!(code(n.node_publish_volume(p("tb-block-999", &target)).await), Code::NotFound, "unknown volume");
    assert_eq!(code(n.node_publish_volume(p(&ok.volume_id, Path::new("/etc/thinbox-escape"))).await), Code::InvalidArgument, "outside kubelet dir");
    assert_eq!(code(n.node_publish_volume(p(&ok.volume_id, &dotdot)).await), Code::InvalidArgument, "..");
    assert_eq!(
        code(n.node_publish_volume(publish_req(&ok.volume_id, &target, mount_cap("xfs"), false, &[])).await),
        Code::InvalidArgument,
        "wrong fs"
    );
    assert!(!target.exists(), "failed publishes leave no target");
    assert_eq!(
        code(n.node_unpublish_volume(NodeUnpublishVolumeRequest { volume_id: String::new(), target_path: target.display().to_string() }).await),
        Code::InvalidArgument
    );
    assert_eq!(code(n.node_get_volume_stats(stats_req(&ok.volume_id, &target)).await), Code::NotFound, "not published there");
    assert_eq!(code(n.node_stage_volume(NodeStageVolumeRequest::default()).await), Code::Unimplemented);
    d.ctl.delete_volume(DeleteVolumeRequest { volume_id: ok.volume_id, secrets: HashMap::new() }).await.unwrap();
    d.finish().await;
}

#[tokio::test]
async fn a_crash_mid_create_is_rolled_back_at_restart() {
    let mut d = Driver::start().await;
    // Kill the driver while a large xfs file volume is being formatted.
    let mut ctl = d.ctl.clone();
    let pending = tokio::spawn(async move { ctl.create_volume(create_req("pvc-crash", 1 << 30, &[("kind", "file")], mount_cap("xfs"))).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    d.kill9();
    let _ = pending.await;
    d.restart().await;
    // Either the create finished before the kill (then it is listed and
    // retrying returns it) or it was rolled back (then its device goes).
    let listed = d.ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries.len();
    assert_eq!(d.stored_devices(listed).await, listed, "pool devices and volumes agree");
    // The CO retries: the same name now succeeds, once.
    let vol = create(&mut d, "pvc-crash", 1 << 30, &[("kind", "file")], mount_cap("xfs")).await;
    assert_eq!(d.stored_devices(1).await, 1);
    d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id, secrets: HashMap::new() }).await.unwrap();
    d.finish().await;
}

/// Grows a published volume of each kind with filesystem `fs`: the device
/// through the controller, the mounted filesystem through the node.
async fn grow_online(d: &mut Driver, fs: &str) {
    for kind in ["block", "file"] {
        let name = format!("grow-{kind}-{fs}");
        let vol = create(d, &name, 400 << 20, &[("kind", kind)], mount_cap(fs)).await;
        let target = d.target(&format!("pod-{name}"), &name);
        d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap(fs), false, &[])).await.unwrap();
        std::fs::write(target.join("keep"), "kept").unwrap();
        let grow = |bytes: i64| ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
            ..Default::default()
        };
        let r = d.ctl.controller_expand_volume(grow(1 << 30)).await.unwrap().into_inner();
        assert_eq!((r.capacity_bytes, r.node_expansion_required), (1 << 30, true), "{name}");
        // Asking again, or for less, changes nothing.
        assert_eq!(d.ctl.controller_expand_volume(grow(1 << 30)).await.unwrap().into_inner().capacity_bytes, 1 << 30);
        assert_eq!(d.ctl.controller_expand_volume(grow(500 << 20)).await.unwrap().into_inner().capacity_bytes, 1 << 30);
        let path = target.display().to_string();
        let r = d
            .node
            .node_expand_volume(NodeExpandVolumeRequest { volume_id: vol.volume_id.clone(), volume_path: path.clone(), ..Default::default() })
            .await
            .unwrap();
        assert_eq!(r.into_inner().capacity_bytes, 1 << 30);
        // The node alone can grow a volume too (one cluster-wide resizer never calls the controller side).
        let node_only = NodeExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: path,
            capacity_range: Some(CapacityRange { required_bytes: 1200 << 20, limit_bytes: 0 }),
            ..Default::default()
        };
        assert_eq!(d.node.node_expand_volume(node_only).await.unwrap().into_inner().capacity_bytes, 1200 << 20);
        let st = rustix::fs::statvfs(&target).unwrap();
        assert!(st.f_blocks * st.f_frsize > 1100 << 20, "{name}: the mounted filesystem grew to {}", st.f_blocks * st.f_frsize);
        assert_eq!(std::fs::read_to_string(target.join("keep")).unwrap(), "kept");
        unpublish(d, &vol.volume_id, &target).await.unwrap();
        d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id.clone(), secrets: HashMap::new() }).await.unwrap();
    }
}

#[tokio::test]
async fn xfs_volumes_grow_online() {
    let mut d = Driver::start().await;
    grow_online(&mut d, "xfs").await;
    let missing = ControllerExpandVolumeRequest {
        volume_id: "tb-block-999".into(),
        capacity_range: Some(CapacityRange { required_bytes: 1 << 30, limit_bytes: 0 }),
        ..Default::default()
    };
    assert_eq!(code(d.ctl.controller_expand_volume(missing).await), Code::NotFound);
    d.finish().await;
}

/// ext4 grows online only with CAP_SYS_RESOURCE (EXT4_IOC_RESIZE_FS), which
/// the CI sandbox's root lacks: the host tier skips this test by name and the
/// uml tier, where root has every capability, runs it.
#[tokio::test]
async fn ext4_volumes_grow_online() {
    let caps = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = caps.lines().find_map(|l| l.strip_prefix("CapEff:")).map(|v| u64::from_str_radix(v.trim(), 16).unwrap()).unwrap();
    assert!(eff & (1 << 24) != 0, "needs CAP_SYS_RESOURCE for online ext4 growth: run it in the uml tier");
    let mut d = Driver::start().await;
    grow_online(&mut d, "ext4").await;
    d.finish().await;
}

fn snapshot_source(id: &str) -> VolumeContentSource {
    VolumeContentSource { r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: id.into() })) }
}

#[tokio::test]
async fn snapshots_restore_and_clones_keep_point_in_time_content() {
    let mut d = Driver::start().await;
    for (kind, fs) in [("block", "ext4"), ("file", "xfs")] {
        let vol = create(&mut d, &format!("src-{kind}"), 400 << 20, &[("kind", kind)], mount_cap(fs)).await;
        let target = d.target(&format!("pod-s-{kind}"), "src");
        d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap(fs), false, &[])).await.unwrap();
        std::fs::write(target.join("state"), "before").unwrap();
        // Snapshot while published and mounted: the filesystem is frozen for it.
        let snap_req = |name: &str, src: &str| CreateSnapshotRequest { source_volume_id: src.into(), name: name.into(), ..Default::default() };
        let snap = d.ctl.create_snapshot(snap_req(&format!("snap-{kind}"), &vol.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
        assert!(snap.ready_to_use && snap.size_bytes == 400 << 20 && snap.source_volume_id == vol.volume_id, "{snap:?}");
        let again = d.ctl.create_snapshot(snap_req(&format!("snap-{kind}"), &vol.volume_id)).await.unwrap().into_inner().snapshot.unwrap();
        assert_eq!(again.snapshot_id, snap.snapshot_id, "idempotent by name");
        let got = d.ctl.get_snapshot(GetSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() }).await.unwrap().into_inner();
        assert_eq!(got.snapshot.as_ref(), Some(&snap), "GetSnapshot");
        std::fs::write(target.join("state"), "after").unwrap();

        // Restore, larger than the source: the filesystem grows with it.
        let mut restore = create_req(&format!("restored-{kind}"), 600 << 20, &[("kind", kind)], mount_cap(""));
        restore.volume_content_source = Some(snapshot_source(&snap.snapshot_id));
        let restored = d.ctl.create_volume(restore.clone()).await.unwrap().into_inner().volume.unwrap();
        assert_eq!(restored.content_source, Some(snapshot_source(&snap.snapshot_id)));
        assert_eq!(restored.capacity_bytes, 600 << 20);
        assert_eq!(d.ctl.create_volume(restore).await.unwrap().into_inner().volume.unwrap().volume_id, restored.volume_id);
        let taken = snap_req(&format!("snap-{kind}"), &restored.volume_id);
        assert_eq!(code(d.ctl.create_snapshot(taken).await), Code::AlreadyExists, "a snapshot name belongs to one source");
        let rt = d.target(&format!("pod-r-{kind}"), "restored");
        d.node.node_publish_volume(publish_req(&restored.volume_id, &rt, mount_cap(fs), false, &[])).await.unwrap();
        assert_eq!(std::fs::read_to_string(rt.join("state")).unwrap(), "before", "{kind}: the snapshot's content");
        let st = rustix::fs::statvfs(&rt).unwrap();
        assert!(st.f_blocks * st.f_frsize > 500 << 20, "{kind}: restored filesystem fills 600MiB: {}", st.f_blocks * st.f_frsize);
        std::fs::write(rt.join("state"), "restored").unwrap();
        assert_eq!(std::fs::read_to_string(target.join("state")).unwrap(), "after", "{kind}: the source is independent");

        // A clone of the live volume.
        let mut clone = create_req(&format!("clone-{kind}"), 0, &[("kind", kind)], mount_cap(fs));
        clone.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: vol.volume_id.clone() })),
        });
        let cloned = d.ctl.create_volume(clone).await.unwrap().into_inner().volume.unwrap();
        assert_eq!(cloned.capacity_bytes, 400 << 20, "a clone without a range is its source's size");
        let ct = d.target(&format!("pod-c-{kind}"), "clone");
        d.node.node_publish_volume(publish_req(&cloned.volume_id, &ct, mount_cap(fs), false, &[])).await.unwrap();
        assert_eq!(std::fs::read_to_string(ct.join("state")).unwrap(), "after");

        let listed = d
            .ctl
            .list_snapshots(ListSnapshotsRequest { source_volume_id: vol.volume_id.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .entries;
        assert_eq!(listed.len(), 1);
        // Deleting the snapshot leaves what was restored from it.
        d.ctl.delete_snapshot(DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), secrets: HashMap::new() }).await.unwrap();
        d.ctl.delete_snapshot(DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), secrets: HashMap::new() }).await.unwrap();
        assert_eq!(std::fs::read_to_string(rt.join("state")).unwrap(), "restored");
        for (id, t) in [(&vol.volume_id, &target), (&restored.volume_id, &rt), (&cloned.volume_id, &ct)] {
            unpublish(&mut d, id, t).await.unwrap();
            d.ctl.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), secrets: HashMap::new() }).await.unwrap();
        }
    }
    let c = &mut d.ctl;
    assert_eq!(
        code(c.create_snapshot(CreateSnapshotRequest { source_volume_id: "tb-block-999".into(), name: "x".into(), ..Default::default() }).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.create_snapshot(CreateSnapshotRequest { source_volume_id: "tb-block-999".into(), ..Default::default() }).await),
        Code::InvalidArgument
    );
    let get = |id: &str| GetSnapshotRequest { snapshot_id: id.into(), ..Default::default() };
    assert_eq!(code(c.get_snapshot(get("tb-snap-999")).await), Code::NotFound);
    assert_eq!(code(c.get_snapshot(get("")).await), Code::InvalidArgument);
    let mut from_missing = create_req("from-missing", 0, &[], mount_cap("ext4"));
    from_missing.volume_content_source = Some(snapshot_source("tb-snap-999"));
    assert_eq!(code(c.create_volume(from_missing).await), Code::NotFound);
    assert_eq!(d.stored_devices(0).await, 0, "no snapshot or volume device left");
    d.finish().await;
}

#[tokio::test]
async fn dir_volume_hard_project_quota_and_growth() {
    let mut d = Driver::start().await;
    let vol = create(&mut d, "pvc-dir", 300 << 20, &[("kind", "dir")], mount_cap("")).await;
    assert_eq!(vol.volume_context.get("kind").map(String::as_str), Some("dir"));
    let target = d.target("pod-d", "pvc-dir");
    d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap(""), false, &[])).await.unwrap();
    let dirs_img = d.path("state/dirs.img");
    let before = std::fs::metadata(&dirs_img).unwrap().blocks() * 512;
    assert!(!dd(&target.join("fill"), 400), "a writer past the quota gets EDQUOT");
    let grown = std::fs::metadata(&dirs_img).unwrap().blocks() * 512 - before;
    assert!(grown <= (300 << 20) + (16 << 20), "the host filesystem grew by about the quota at most: {grown}");
    let stats = d.node.node_get_volume_stats(stats_req(&vol.volume_id, &target)).await.unwrap().into_inner();
    assert_eq!(stats.usage[0].total, 300 << 20, "statfs reports the quota as the volume's size");
    assert!(stats.usage[0].used >= 290 << 20, "{:?}", stats.usage[0]);
    std::fs::remove_file(target.join("fill")).unwrap();
    // Growth raises the quota; no filesystem to grow on the node.
    let grow = ControllerExpandVolumeRequest {
        volume_id: vol.volume_id.clone(),
        capacity_range: Some(CapacityRange { required_bytes: 600 << 20, limit_bytes: 0 }),
        ..Default::default()
    };
    let r = d.ctl.controller_expand_volume(grow).await.unwrap().into_inner();
    assert_eq!((r.capacity_bytes, r.node_expansion_required), (600 << 20, false));
    assert!(dd(&target.join("fill"), 400), "400MiB fit under the raised quota");
    assert_eq!(
        code(d.ctl.create_snapshot(CreateSnapshotRequest { source_volume_id: vol.volume_id.clone(), name: "s".into(), ..Default::default() }).await),
        Code::InvalidArgument
    );
    assert_eq!(code(d.ctl.create_volume(create_req("dir-block", 300 << 20, &[("kind", "dir")], block_cap())).await), Code::InvalidArgument);
    unpublish(&mut d, &vol.volume_id, &target).await.unwrap();
    d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id.clone(), secrets: HashMap::new() }).await.unwrap();
    assert!(!d.path(&format!("state/dirs/{}", vol.volume_id)).exists(), "directory removed");
    d.finish().await;
}

/// A writer that puts one sequence number into every file of `files` in
/// turn, round after round, each with one `pwrite` at offset 0 (a freeze
/// or a suspend falls between two writes, never inside one).
struct SequenceWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl SequenceWriter {
    fn start(files: Vec<PathBuf>) -> SequenceWriter {
        use std::os::unix::fs::FileExt;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let files: Vec<std::fs::File> = files.iter().map(|p| std::fs::File::create(p).unwrap()).collect();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                for f in &files {
                    f.write_all_at(format!("{n:020}").as_bytes(), 0).unwrap();
                }
            }
            n
        });
        SequenceWriter { stop, thread }
    }

    /// Stops it; the last round written.
    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn sequence(path: &Path) -> u64 {
    std::fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn a_group_snapshot_cuts_its_volumes_at_one_instant() {
    let mut d = Driver::start().await;
    let caps = d.group.group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest {}).await.unwrap().into_inner().capabilities;
    let rpc = |t: group_controller_service_capability::rpc::Type| GroupControllerServiceCapability {
        r#type: Some(group_controller_service_capability::Type::Rpc(group_controller_service_capability::Rpc { r#type: t as i32 })),
    };
    assert_eq!(caps, vec![rpc(group_controller_service_capability::rpc::Type::CreateDeleteGetVolumeGroupSnapshot)]);

    // A database volume and a log volume, written in one loop while mounted.
    let mut sources = Vec::new();
    for (name, kind, fs) in [("db", "block", "ext4"), ("log", "file", "xfs")] {
        let size = if fs == "xfs" { 300 << 20 } else { 64 << 20 };
        let vol = create(&mut d, name, size, &[("kind", kind)], mount_cap(fs)).await;
        let target = d.target("pod-grp", name);
        d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap(fs), false, &[])).await.unwrap();
        sources.push((vol.volume_id, target, fs));
    }
    let ids: Vec<String> = sources.iter().map(|s| s.0.clone()).collect();
    let writer = SequenceWriter::start(sources.iter().map(|s| s.1.join("seq")).collect());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let req =
        |name: &str, ids: &[String]| CreateVolumeGroupSnapshotRequest { name: name.into(), source_volume_ids: ids.to_vec(), ..Default::default() };
    let group = d.group.create_volume_group_snapshot(req("grp", &ids)).await.unwrap().into_inner().group_snapshot.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last = writer.stop();
    assert!(group.ready_to_use && group.creation_time.is_some() && group.group_snapshot_id.starts_with("tb-group-"), "{group:?}");
    assert_eq!(group.snapshots.iter().map(|s| s.source_volume_id.clone()).collect::<Vec<_>>(), ids);
    assert!(group.snapshots.iter().all(|s| s.group_snapshot_id == group.group_snapshot_id && s.ready_to_use), "{group:?}");
    let members: Vec<String> = group.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();

    // Idempotent by name, whatever the order of the sources; a name is one group.
    let reversed: Vec<String> = ids.iter().rev().cloned().collect();
    let again = d.group.create_volume_group_snapshot(req("grp", &reversed)).await.unwrap().into_inner().group_snapshot.unwrap();
    assert_eq!(again, group, "the same group snapshot");
    assert_eq!(code(d.group.create_volume_group_snapshot(req("grp", &ids[..1])).await), Code::AlreadyExists);

    // Members are snapshots of their own (listed, fetched, restored), but go only with their group.
    let listed = d.ctl.list_snapshots(ListSnapshotsRequest::default()).await.unwrap().into_inner().entries;
    let listed: Vec<Snapshot> = listed.into_iter().filter_map(|e| e.snapshot).collect();
    assert_eq!(listed, group.snapshots, "ListSnapshots shows the members with their group");
    let member = |id: &str| DeleteSnapshotRequest { snapshot_id: id.into(), secrets: HashMap::new() };
    assert_eq!(code(d.ctl.delete_snapshot(member(&members[0])).await), Code::InvalidArgument, "a member goes only with its group");
    let get = |id: &str, snaps: &[String]| GetVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: snaps.to_vec(),
        ..Default::default()
    };
    let got = d.group.get_volume_group_snapshot(get(&group.group_snapshot_id, &members)).await.unwrap().into_inner();
    assert_eq!(got.group_snapshot.as_ref(), Some(&group));
    assert_eq!(code(d.group.get_volume_group_snapshot(get(&group.group_snapshot_id, &members[..1])).await), Code::InvalidArgument);
    assert_eq!(code(d.group.get_volume_group_snapshot(get("tb-group-999", &[])).await), Code::NotFound);
    assert_eq!(code(d.group.get_volume_group_snapshot(get("", &[])).await), Code::InvalidArgument);

    // A source deleted after the cut: its member still restores.
    let (gone, gone_target, _) = &sources[1];
    let at_delete = sequence(&gone_target.join("seq"));
    unpublish(&mut d, gone, gone_target).await.unwrap();
    d.ctl.delete_volume(DeleteVolumeRequest { volume_id: gone.clone(), secrets: HashMap::new() }).await.unwrap();

    // Restored, the members hold one instant of the loop: the same round,
    // or the first volume one round ahead (cut between a round's two writes).
    let mut seen = Vec::new();
    for (snap, (_, _, fs)) in group.snapshots.iter().zip(&sources) {
        let mut restore = create_req(&format!("restored-{}", snap.snapshot_id), 0, &[], mount_cap(fs));
        restore.parameters = params(&[("kind", if *fs == "xfs" { "file" } else { "block" })]);
        restore.volume_content_source = Some(snapshot_source(&snap.snapshot_id));
        let vol = d.ctl.create_volume(restore).await.unwrap().into_inner().volume.unwrap();
        let target = d.target("pod-restored", &vol.volume_id);
        d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap(fs), false, &[])).await.unwrap();
        seen.push(sequence(&target.join("seq")));
        unpublish(&mut d, &vol.volume_id, &target).await.unwrap();
        d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id, secrets: HashMap::new() }).await.unwrap();
    }
    let (db, log) = (seen[0], seen[1]);
    assert!(db > 0 && db < last && at_delete > db, "cut while the loop ran: db {db}, log {log}, last round {last}");
    assert!(db == log || db == log + 1, "one instant of both volumes: db at round {db}, log at round {log}");

    // Delete: the snapshot ids must be the members; then idempotent.
    let delete = |id: &str, snaps: &[String]| DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: snaps.to_vec(),
        ..Default::default()
    };
    assert_eq!(code(d.group.delete_volume_group_snapshot(delete(&group.group_snapshot_id, &members[1..])).await), Code::InvalidArgument);
    assert!(d.group.get_volume_group_snapshot(get(&group.group_snapshot_id, &[])).await.is_ok(), "a refused delete keeps it");
    d.group.delete_volume_group_snapshot(delete(&group.group_snapshot_id, &members)).await.unwrap();
    d.group.delete_volume_group_snapshot(delete(&group.group_snapshot_id, &members)).await.unwrap();
    d.group.delete_volume_group_snapshot(delete("no/such", &[])).await.unwrap();
    assert_eq!(code(d.group.get_volume_group_snapshot(get(&group.group_snapshot_id, &[])).await), Code::NotFound);
    assert!(d.ctl.list_snapshots(ListSnapshotsRequest::default()).await.unwrap().into_inner().entries.is_empty());

    // Raw block publications write where no freeze reaches: one may join a
    // group of frozen members anywhere; two only where the pool suspends
    // every origin (dm-thin), else the group would span two instants.
    let db_id = sources[0].0.clone();
    let mut raw = Vec::new();
    for name in ["raw-a", "raw-b"] {
        let vol = create(&mut d, name, 16 << 20, &[("kind", "block")], block_cap()).await;
        let parent = d.path(&format!("kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/{name}"));
        std::fs::create_dir_all(&parent).unwrap();
        let target = parent.join("pod-uid");
        d.node.node_publish_volume(publish_req(&vol.volume_id, &target, block_cap(), false, &[])).await.unwrap();
        raw.push((vol.volume_id, target));
    }
    let one = d.group.create_volume_group_snapshot(req("one-raw", &[db_id.clone(), raw[0].0.clone()])).await.unwrap().into_inner();
    let two = d.group.create_volume_group_snapshot(req("two-raw", &[raw[0].0.clone(), raw[1].0.clone()])).await;
    let suspends = std::env::var("THINBOX_TEST_BACKEND").is_ok_and(|b| b == "dm-thin");
    let mut made = vec![one.group_snapshot.unwrap().group_snapshot_id];
    match two {
        Ok(g) if suspends => made.push(g.into_inner().group_snapshot.unwrap().group_snapshot_id),
        Err(e) if !suspends => assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}"),
        other => panic!("two raw writers, suspending pool {suspends}: {other:?}"),
    }
    for id in made {
        d.group.delete_volume_group_snapshot(delete(&id, &[])).await.unwrap();
    }
    for (id, target) in raw {
        unpublish(&mut d, &id, &target).await.unwrap();
        d.ctl.delete_volume(DeleteVolumeRequest { volume_id: id, secrets: HashMap::new() }).await.unwrap();
    }

    // Bad requests change nothing.
    let mut unknown_param = req("p", std::slice::from_ref(&db_id));
    unknown_param.parameters = params(&[("color", "red")]);
    for (what, r, want) in [
        ("no sources", req("x", &[]), Code::InvalidArgument),
        ("no name", req("", std::slice::from_ref(&db_id)), Code::InvalidArgument),
        ("a volume twice", req("x", &[db_id.clone(), db_id.clone()]), Code::InvalidArgument),
        ("an unknown volume", req("x", &[db_id.clone(), "tb-block-999".into()]), Code::NotFound),
        ("another node's or a malformed id", req("x", &[db_id.clone(), "../node-b/vol".into()]), Code::NotFound),
        ("a deleted volume", req("x", &[db_id.clone(), gone.clone()]), Code::NotFound),
        ("an unknown parameter", unknown_param, Code::InvalidArgument),
    ] {
        assert_eq!(code(d.group.create_volume_group_snapshot(r).await), want, "{what}");
    }
    assert!(d.ctl.list_snapshots(ListSnapshotsRequest::default()).await.unwrap().into_inner().entries.is_empty(), "no snapshot made");
    assert_eq!(d.stored_devices(1).await, 1, "only the db volume's device left");
    unpublish(&mut d, &db_id, &sources[0].1).await.unwrap();
    d.ctl.delete_volume(DeleteVolumeRequest { volume_id: db_id, secrets: HashMap::new() }).await.unwrap();
    assert_eq!(d.stored_devices(0).await, 0, "no device left");
    d.finish().await;
}
