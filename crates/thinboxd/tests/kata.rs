//! Host tier: volumes a Kata sandbox holds, grown and measured through the
//! sandbox's shim, against a test shim written from Kata's management API
//! (tests/common/kata_shim.rs; Kata's shim cannot run here). A volume is
//! held once the Kata runtime has written its sandbox id beside the
//! direct-volume record (`RecordSandboxID`); these tests write it as the
//! runtime would. Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::kata_shim::{Answer, Got, TestShim};
use common::volumes::*;
use thinbox_block_passthrough::DirectVolumes;
use thinbox_block_passthrough::kata_shim::{GuestCondition, GuestStats, GuestUsage, ResizeRequest};
use thinbox_proto::csi::v1::*;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn expand_req(id: &str, target: &Path, bytes: i64) -> NodeExpandVolumeRequest {
    NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: target.display().to_string(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        ..Default::default()
    }
}

/// A Kata volume published at a fresh target, and its direct-volume record's directory.
async fn kata_volume(d: &mut Driver, name: &str, bytes: i64, fs: &str) -> (Volume, PathBuf, PathBuf) {
    let vol = create(d, name, bytes, &[("thinbox.io/sandbox", "kata")], mount_cap(fs)).await;
    let target = d.target(&format!("pod-{name}"), name);
    d.node.node_publish_volume(publish_req(&vol.volume_id, &target, mount_cap(fs), false, &[])).await.unwrap();
    let record = DirectVolumes::new(d.path("kata")).dir(&target).unwrap();
    assert!(record.join("mountInfo.json").exists());
    (vol, target, record)
}

async fn size_of(d: &mut Driver, id: &str) -> i64 {
    let listed = d.ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries;
    listed.into_iter().map(|e| e.volume.unwrap()).find(|v| v.volume_id == id).unwrap().capacity_bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn expansion_and_stats_go_through_the_shim_of_the_sandbox_that_holds_the_volume() {
    let mut d = Driver::start().await;
    // One sandbox of each runtime: the Go runtime's and runtime-rs' socket directories.
    for (sandboxes, sandbox) in [("sbs-go", "sandbox-go"), ("sbs-rs", "sandbox-rs")] {
        let name = format!("pvc-{sandbox}");
        let (vol, target, record) = kata_volume(&mut d, &name, 64 * MIB, "ext4").await;
        std::fs::write(record.join(sandbox), "").unwrap();
        let shim = TestShim::start(&d.path(sandboxes), sandbox);
        let id = vol.volume_id.clone();

        // Accepted: the guest was told the volume's path and new size.
        let grown = d.node.node_expand_volume(expand_req(&id, &target, 128 * MIB)).await.unwrap().into_inner();
        assert_eq!(grown.capacity_bytes, 128 * MIB);
        let asked = ResizeRequest { volume_path: target.display().to_string(), size: 128 << 20 };
        assert_eq!(shim.got(), [Got::Resize(asked)], "{sandbox}");
        assert_eq!(size_of(&mut d, &id).await, 128 * MIB);

        // Refused: an error naming the sandbox, and the record keeps what was granted.
        shim.answer(Answer::Refuse("failed to resize the volume: hypervisor says no".into()));
        let refused = d.node.node_expand_volume(expand_req(&id, &target, 192 * MIB)).await.unwrap_err();
        assert_eq!(refused.code(), Code::Internal, "{refused:?}");
        assert!(refused.message().contains(sandbox) && refused.message().contains("hypervisor says no"), "{}", refused.message());
        assert_eq!(size_of(&mut d, &id).await, 128 * MIB, "a refused growth is not recorded");

        // Silent: the call ends (bounded), and other volumes are served meanwhile.
        shim.answer(Answer::Silent);
        let mut node = d.node.clone();
        let pending = tokio::spawn({
            let (id, target) = (id.clone(), target.clone());
            async move { node.node_expand_volume(expand_req(&id, &target, 192 * MIB)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let other = create(&mut d, &format!("other-{sandbox}"), 16 * MIB, &[], mount_cap("ext4")).await;
        d.ctl.delete_volume(DeleteVolumeRequest { volume_id: other.volume_id, secrets: HashMap::new() }).await.unwrap();
        assert!(!pending.is_finished(), "another volume's create and delete were served while the shim hung");
        let silent = pending.await.unwrap().unwrap_err();
        assert_eq!(silent.code(), Code::Unavailable, "{silent:?}");
        assert!(silent.message().contains(sandbox) && silent.message().contains("did not answer"), "{}", silent.message());
        assert_eq!(size_of(&mut d, &id).await, 128 * MIB);

        // The retry finishes it.
        shim.got();
        shim.answer(Answer::Accept);
        assert_eq!(d.node.node_expand_volume(expand_req(&id, &target, 192 * MIB)).await.unwrap().into_inner().capacity_bytes, 192 * MIB);
        assert_eq!(size_of(&mut d, &id).await, 192 * MIB);
        assert_eq!(shim.got().len(), 1);

        // Stats are the guest's, with its condition.
        let usage = vec![
            GuestUsage { available: 150 << 20, total: 180 << 20, used: 30 << 20, unit: 1 },
            GuestUsage { available: 9000, total: 12288, used: 3288, unit: 2 },
        ];
        shim.stats(GuestStats { usage, volume_condition: None });
        let st = d.node.node_get_volume_stats(stats_req(&id, &target)).await.unwrap().into_inner();
        assert_eq!((st.usage[0].total, st.usage[0].used, st.usage[0].available), (180 << 20, 30 << 20, 150 << 20));
        assert_eq!((st.usage[1].total, st.usage[1].used, st.usage[1].unit), (12288, 3288, volume_usage::Unit::Inodes as i32));
        let c = st.volume_condition.unwrap();
        assert!(!c.abnormal && c.message.contains(sandbox), "{c:?}");
        assert_eq!(shim.got(), [Got::Stats(target.display().to_string())], "the volume's path, unescaped by the shim");
        shim.stats(GuestStats { usage: vec![], volume_condition: Some(GuestCondition { abnormal: true, message: "I/O errors".into() }) });
        let c = d.node.node_get_volume_stats(stats_req(&id, &target)).await.unwrap().into_inner().volume_condition.unwrap();
        assert!(c.abnormal && c.message.contains("I/O errors"), "{c:?}");

        // No shim: the host's figures, and the condition says so.
        drop(shim);
        let st = d.node.node_get_volume_stats(stats_req(&id, &target)).await.unwrap().into_inner();
        assert_eq!(st.usage[0].total, 192 * MIB);
        let c = st.volume_condition.unwrap();
        assert!(!c.abnormal && c.message.starts_with("host-side figures"), "{c:?}");

        unpublish(&mut d, &id, &target).await.unwrap();
        d.ctl.delete_volume(DeleteVolumeRequest { volume_id: id, secrets: HashMap::new() }).await.unwrap();
    }
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_sandbox_a_kata_volume_grows_on_the_host() {
    let mut d = Driver::start().await;
    for (fs, from, to) in [("ext4", 64 * MIB, 128 * MIB), ("xfs", 300 * MIB, 400 * MIB)] {
        let (vol, target, _) = kata_volume(&mut d, &format!("pvc-offline-{fs}"), from, fs).await;
        let grown = d.node.node_expand_volume(expand_req(&vol.volume_id, &target, to)).await.unwrap().into_inner();
        assert_eq!(grown.capacity_bytes, to);
        let device = DirectVolumes::new(d.path("kata")).get(&target).unwrap().unwrap().device;
        let out = Command::new("blockdev").args(["--getsize64", &device]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), to.to_string(), "{fs}: the device");
        assert_eq!(fs_bytes(fs, &device), to, "{fs}: the filesystem fills the device");
        unpublish(&mut d, &vol.volume_id, &target).await.unwrap();
        d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id, secrets: HashMap::new() }).await.unwrap();
    }
    d.finish().await;
}

/// The size the filesystem on `device` says it has, from its superblock.
fn fs_bytes(fs: &str, device: &str) -> i64 {
    let (tool, args, field): (&str, Vec<&str>, &str) = match fs {
        "ext4" => ("dumpe2fs", vec!["-h", device], "Block count:"),
        _ => ("xfs_db", vec!["-r", "-c", "sb 0", "-c", "p dblocks", device], "dblocks ="),
    };
    let out = Command::new(tool).args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let blocks: i64 = text.lines().find_map(|l| l.strip_prefix(field)).unwrap_or_else(|| panic!("{tool}: {text}")).trim().parse().unwrap();
    blocks * 4096
}

fn group_cap(fs: &str, group: &str) -> VolumeCapability {
    let mut cap = mount_cap(fs);
    if let Some(volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.volume_mount_group = group.into();
    }
    cap
}

/// `thinbox.io/encryption: ephemeral` on an inline emptyDir: the record
/// carries Kata's `encryptionKey: ephemeral` and `createFilesystem: true`
/// (and the pod's fsGroup), and the device reaches the runtime exactly its
/// size, never formatted on the host: all zeros, no signature, so Kata's
/// agent formats it inside LUKS2 with a key the host never sees.
#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_emptydir_reaches_kata_unformatted_with_its_metadata() {
    let mut d = Driver::start().await;
    let target = d.target("pod-enc", "scratch");
    let ctx = [("csi.storage.k8s.io/ephemeral", "true"), ("size", "32Mi"), ("thinbox.io/sandbox", "kata"), ("thinbox.io/encryption", "ephemeral")];
    d.node.node_publish_volume(publish_req("csi-enc-1", &target, group_cap("ext4", "2000"), false, &ctx)).await.unwrap();
    let info = DirectVolumes::new(d.path("kata")).get(&target).unwrap().expect("a direct-volume record");
    assert_eq!((info.volume_type.as_str(), info.fstype.as_str()), ("block", "ext4"), "{info:?}");
    let meta = |k: &str| info.metadata.get(k).map(String::as_str);
    assert_eq!((meta("encryptionKey"), meta("createFilesystem"), meta("fsGroup")), (Some("ephemeral"), Some("true"), Some("2000")));
    let out = Command::new("blockdev").args(["--getsize64", &info.device]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (32 << 20).to_string(), "exactly its size");
    let bytes = std::fs::read(&info.device).unwrap();
    assert!(bytes.iter().all(|&b| b == 0), "the host wrote nothing on it");
    let probe = Command::new("blkid").args(["-p", &info.device]).output().unwrap();
    assert_eq!(probe.status.code(), Some(2), "blkid finds no signature: {}", String::from_utf8_lossy(&probe.stdout));
    assert!(mounts_under(&d.path("kubelet")).is_empty(), "nothing mounted on the host");
    // A publication again is idempotent; another group is another publication.
    d.node.node_publish_volume(publish_req("csi-enc-1", &target, group_cap("ext4", "2000"), false, &ctx)).await.unwrap();
    let other = d.node.node_publish_volume(publish_req("csi-enc-1", &target, group_cap("ext4", "3000"), false, &ctx)).await.unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists, "{other:?}");
    unpublish(&mut d, "csi-enc-1", &target).await.unwrap();
    assert_eq!(DirectVolumes::new(d.path("kata")).get(&target).unwrap(), None);
    assert_eq!(d.stored_devices(0).await, 0, "the emptyDir went with its publication");
    d.finish().await;
}

/// Where Kata's guest cannot encrypt, or the host would have to, the request
/// is refused with INVALID_ARGUMENT and nothing is made, mounted or recorded.
#[tokio::test(flavor = "multi_thread")]
async fn encryption_is_refused_where_a_kata_guest_cannot_do_it() {
    let mut d = Driver::start().await;
    let enc = ("thinbox.io/encryption", "ephemeral");
    let kata = ("thinbox.io/sandbox", "kata");
    let cases = [
        ("raw block access", vec![enc, kata], block_cap()),
        ("xfs, which the agent does not create", vec![enc, kata], mount_cap("xfs")),
        ("a dir volume", vec![enc, kata, ("kind", "dir")], mount_cap("")),
        ("a runC sandbox", vec![enc, ("thinbox.io/sandbox", "runc")], mount_cap("ext4")),
        ("an unknown scheme", vec![("thinbox.io/encryption", "aes"), kata], mount_cap("ext4")),
    ];
    for (what, p, cap) in cases {
        let r = d.ctl.create_volume(create_req(&format!("pvc-{}", what.len()), 64 * MIB, &p, cap)).await;
        assert_eq!(code(r), Code::InvalidArgument, "{what}");
    }
    let small = CreateVolumeRequest {
        capacity_range: Some(CapacityRange { required_bytes: 0, limit_bytes: 16 * MIB }),
        ..create_req("pvc-small", 0, &[enc, kata], mount_cap("ext4"))
    };
    let small = d.ctl.create_volume(small).await.unwrap_err();
    assert_eq!(small.code(), Code::OutOfRange);
    assert!(small.message().contains("encrypted ext4") && small.message().contains("24MiB"), "{}", small.message());

    // An encrypted volume: never on the host, never raw, never copied.
    let vol = create(&mut d, "pvc-enc", 64 * MIB, &[enc, kata], mount_cap("ext4")).await;
    assert_eq!(vol.capacity_bytes, 64 * MIB);
    let target = d.target("pod-runc", "data");
    let runc = publish_req(&vol.volume_id, &target, mount_cap("ext4"), false, &[("thinbox.io/sandbox", "runc")]);
    assert_eq!(code(d.node.node_publish_volume(runc).await), Code::InvalidArgument, "a runC publication");
    let raw = publish_req(&vol.volume_id, &target, block_cap(), false, &[]);
    assert_eq!(code(d.node.node_publish_volume(raw).await), Code::InvalidArgument, "raw block access");
    let snap = CreateSnapshotRequest { source_volume_id: vol.volume_id.clone(), name: "snap-enc".into(), ..Default::default() };
    assert_eq!(code(d.ctl.create_snapshot(snap).await), Code::InvalidArgument, "a snapshot");
    let clone = CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: vol.volume_id.clone() })),
        }),
        ..create_req("pvc-clone", 64 * MIB, &[kata], mount_cap("ext4"))
    };
    assert_eq!(code(d.ctl.create_volume(clone).await), Code::InvalidArgument, "a clone");
    assert!(mounts_under(&d.path("kubelet")).is_empty(), "nothing mounted");
    assert!(!d.path("kata").exists() || std::fs::read_dir(d.path("kata")).unwrap().next().is_none(), "no direct-volume record");
    let listed = d.ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries;
    assert_eq!(listed.len(), 1, "only the encrypted volume");
    let snaps = d.ctl.list_snapshots(ListSnapshotsRequest::default()).await.unwrap().into_inner().entries;
    assert!(snaps.is_empty());
    d.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id, secrets: HashMap::new() }).await.unwrap();
    assert_eq!(d.stored_devices(0).await, 0);
    d.finish().await;
}
