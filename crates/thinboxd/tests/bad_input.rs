//! Host tier: bad input on both doors of one daemon. Malformed snapshot keys
//! and names, ids and paths CSI must refuse (relative, `..`, outside the
//! kubelet directory, symlinks, staging paths), oversize requests (above the
//! gRPC message limit, names and parameter maps far beyond CSI's limits),
//! bad capacity ranges, unknown kinds, filesystems, parameters and access
//! modes: each gets its own gRPC code, the one docs/csi.md ("Requests are
//! checked before anything happens") and the snapshotter's error mapping
//! promise, and nothing changes: both APIs, the admin service's devices and
//! status, the engine's check, the kubelet directory and the mounts read the
//! same after the whole batch as before it and after a restart, and the
//! layer and volume made before it still hold their content. Needs root.
//!
//! Among them, what once broke things: status messages that echoed a 1 MiB
//! field (a client sees a message beyond its header limit as
//! RESOURCE_EXHAUSTED), and a target named beyond NAME_MAX, whose
//! publication was recorded before the kernel refused it and kept the daemon
//! from starting again.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};

use common::node::{Node, ext4};
use common::snapshots::{commit, labels, list, prepare, read_through_view, remove, stat, view};
use thinbox_proto::admin::{CheckRequest, PoolStatusRequest, ReconcileReport};
use thinbox_proto::csi::v1::volume_capability::access_mode::Mode;
use thinbox_proto::csi::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use thinbox_proto::csi::v1::*;
use thinbox_proto::snapshots::{ListSnapshotsRequest as SnapList, MountsRequest, StatSnapshotRequest, UpdateSnapshotRequest, UsageRequest};
use tonic::{Code, Status};

const POOL: &str = "embedded_size = \"4GiB\"\nreserve = \"64MiB\"";
const MIB: i64 = 1 << 20;
/// Above tonic's default 4 MiB limit on a received message.
const OVER_GRPC_LIMIT: usize = 5 << 20;
/// Far beyond any limit on a field, still a message the server reads.
const FAR_TOO_LONG: usize = 1 << 20;

/// Everything both APIs and the admin service show, and what the kernel holds
/// under the test's directory.
#[derive(Debug, PartialEq)]
struct Everything {
    snapshots: Vec<thinbox_proto::snapshots::Info>,
    volumes: Vec<list_volumes_response::Entry>,
    csi_snapshots: Vec<list_snapshots_response::Entry>,
    devices: Vec<thinbox_proto::admin::Device>,
    pool_devices: u64,
    consumers: Vec<thinbox_proto::admin::ConsumerUsage>,
    check: Option<ReconcileReport>,
    kubelet: Vec<PathBuf>,
    mounts: Vec<PathBuf>,
    loops: usize,
}

async fn everything(n: &mut Node) -> Everything {
    let mut stream = n.snap.list(SnapList { snapshotter: "thinbox".into(), filters: vec![] }).await.unwrap().into_inner();
    let mut snapshots = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        snapshots.extend(page.info);
    }
    snapshots.sort_by(|a, b| a.name.cmp(&b.name));
    let volumes = n.ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert!(volumes.next_token.is_empty());
    let csi_snapshots = n.ctl.list_snapshots(ListSnapshotsRequest::default()).await.unwrap().into_inner().entries;
    let mut admin = n.admin().await;
    let devices = n.settled_devices().await;
    let status = admin.pool_status(PoolStatusRequest {}).await.unwrap().into_inner();
    let check = admin.check(CheckRequest {}).await.unwrap().into_inner().report;
    Everything {
        snapshots,
        volumes: volumes.entries,
        csi_snapshots,
        devices,
        pool_devices: status.status.unwrap().devices,
        consumers: status.consumers,
        check,
        kubelet: tree(&n.dir.join("kubelet")),
        mounts: common::volumes::mounts_under(&n.dir),
        loops: thinbox_blockstore::scan_loops(&n.dir).unwrap().len(),
    }
}

/// Every path under `dir`, symlinks not followed.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.push(e.path());
        if e.file_type().unwrap().is_dir() {
            out.extend(tree(&e.path()));
        }
    }
    out.sort();
    out
}

/// The cases run, and those answered with another code than promised
/// (collected, so one run names every wrong answer).
#[derive(Default)]
struct Cases {
    run: usize,
    wrong: Vec<String>,
}

impl Cases {
    fn expect<T: Debug>(&mut self, what: &str, got: Result<T, Status>, want: Code) {
        self.run += 1;
        let code = got.as_ref().map_or_else(Status::code, |_| Code::Ok);
        if code != want {
            let detail = match &got {
                Ok(v) => format!("{v:?}").chars().take(300).collect::<String>(),
                Err(s) => s.message().chars().take(300).collect(),
            };
            self.wrong.push(format!("{what}: got {code:?}, want {want:?} ({detail})"));
        }
    }
}

fn cap(mode: i32, fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode }),
        access_type: Some(AccessType::Mount(MountVolume { fs_type: fs.into(), mount_flags: vec![], volume_mount_group: String::new() })),
    }
}

fn create(name: &str, required: i64, limit: i64, params: &[(&str, &str)], caps: Vec<VolumeCapability>) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: required, limit_bytes: limit }),
        volume_capabilities: caps,
        parameters: labels(params),
        ..Default::default()
    }
}

fn publish(id: &str, target: &str, capability: Option<VolumeCapability>, ctx: HashMap<String, String>) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.into(),
        volume_capability: capability,
        volume_context: ctx,
        ..Default::default()
    }
}

/// `count` parameters the CO may add (`csi.storage.k8s.io/…`), about 1 KiB each.
fn co_parameters(count: usize) -> HashMap<String, String> {
    (0..count).map(|i| (format!("csi.storage.k8s.io/pvc/extra-{i}"), "v".repeat(1000))).collect()
}

async fn snapshot_cases(n: &mut Node, cases: &mut Cases) {
    let c = &mut n.snap;
    let none = HashMap::new;
    let huge = "k".repeat(5000);
    let over = "k".repeat(OVER_GRPC_LIMIT);
    // Keys and names: non-empty, at most 4096 bytes, no NUL (InvalidKey: INVALID_ARGUMENT).
    cases.expect("Prepare key \"\"", prepare(c, "", "", none()).await, Code::InvalidArgument);
    cases.expect("Prepare key with NUL", prepare(c, "a\0b", "", none()).await, Code::InvalidArgument);
    cases.expect("Prepare key of 5000 bytes", prepare(c, &huge, "", none()).await, Code::InvalidArgument);
    cases.expect("Prepare key of 1 MiB", prepare(c, &"k".repeat(FAR_TOO_LONG), "base", none()).await, Code::InvalidArgument);
    cases.expect("View key \"\"", view(c, "", "base").await, Code::InvalidArgument);
    cases.expect("View key with NUL", view(c, "v\0", "base").await, Code::InvalidArgument);
    cases.expect("View key of 5000 bytes", view(c, &huge, "base").await, Code::InvalidArgument);
    cases.expect("Commit act as \"\"", commit(c, "", "act").await, Code::InvalidArgument);
    cases.expect("Commit act as a name with NUL", commit(c, "done\0", "act").await, Code::InvalidArgument);
    cases.expect("Commit act as a name of 5000 bytes", commit(c, &huge, "act").await, Code::InvalidArgument);
    // Parents and keys nothing holds: NOT_FOUND.
    cases.expect("Prepare on an unknown parent", prepare(c, "k", "no-such-layer", none()).await, Code::NotFound);
    cases.expect("Prepare on a parent with NUL", prepare(c, "k", "base\0", none()).await, Code::NotFound);
    cases.expect("View of an unknown parent", view(c, "v", "no-such-layer").await, Code::NotFound);
    cases.expect("Commit of an unknown key", commit(c, "done", "no-such-key").await, Code::NotFound);
    cases.expect("Stat \"\"", stat(c, "").await, Code::NotFound);
    cases.expect("Stat a key of 5000 bytes", stat(c, &huge).await, Code::NotFound);
    cases.expect("Remove \"\"", remove(c, "").await, Code::NotFound);
    cases.expect("Remove a key with NUL", remove(c, "base\0").await, Code::NotFound);
    cases.expect("Mounts of \"\"", c.mounts(MountsRequest { snapshotter: "thinbox".into(), key: String::new() }).await, Code::NotFound);
    // Keys far too long where they are only looked up: NOT_FOUND too (the
    // answer must not echo the whole key: a client's header limit refuses it).
    let mib = "k".repeat(FAR_TOO_LONG);
    cases.expect("Stat a key of 1 MiB", stat(c, &mib).await, Code::NotFound);
    cases.expect("Remove a key of 1 MiB", remove(c, &mib).await, Code::NotFound);
    cases.expect("Mounts of a key of 1 MiB", c.mounts(MountsRequest { snapshotter: "thinbox".into(), key: mib.clone() }).await, Code::NotFound);
    cases.expect("Usage of a key of 1 MiB", c.usage(UsageRequest { snapshotter: "thinbox".into(), key: mib.clone() }).await, Code::NotFound);
    cases.expect("Prepare on a parent of 1 MiB", prepare(c, "k", &mib, none()).await, Code::NotFound);
    cases.expect("View of a parent of 1 MiB", view(c, "v", &mib).await, Code::NotFound);
    cases.expect("Commit of a key of 1 MiB", commit(c, "done", &mib).await, Code::NotFound);
    // Labels: each key and value within 4 KiB; the size label a size.
    cases.expect("Prepare with a 1 MiB label", prepare(c, "k", "", labels(&[("l", &"v".repeat(FAR_TOO_LONG))])).await, Code::InvalidArgument);
    let max_size = |v: &str| labels(&[("containerd.io/snapshot/max-size", v)]);
    cases.expect("Prepare with max-size \"lots\"", prepare(c, "k", "", max_size("lots")).await, Code::InvalidArgument);
    cases.expect("Prepare with max-size above u64", prepare(c, "k", "", max_size("99999999999999999999999")).await, Code::InvalidArgument);
    cases.expect("Prepare with max-size -1", prepare(c, "k", "", max_size("-1")).await, Code::InvalidArgument);
    cases.expect("Prepare with max-size below the parent's", prepare(c, "k", "base", max_size("536870912")).await, Code::InvalidArgument);
    let update = |info: Option<thinbox_proto::snapshots::Info>, paths: Vec<String>| UpdateSnapshotRequest {
        snapshotter: String::new(),
        info,
        update_mask: Some(prost_types::FieldMask { paths }),
    };
    let base = |name: &str| Some(thinbox_proto::snapshots::Info { name: name.into(), ..Default::default() });
    cases.expect("Update without info", c.update(update(None, vec!["labels".into()])).await, Code::InvalidArgument);
    cases.expect("Update of the parent", c.update(update(base("base"), vec!["parent".into()])).await, Code::InvalidArgument);
    cases.expect("Update of a 1 MiB field", c.update(update(base("base"), vec!["f".repeat(FAR_TOO_LONG)])).await, Code::InvalidArgument);
    cases.expect("Update of an unknown key of 1 MiB", c.update(update(base(&mib), vec!["labels".into()])).await, Code::NotFound);
    cases.expect("List with a malformed filter", list(c, &["name=="]).await, Code::InvalidArgument);
    let bad_regex = format!("name~=/{}(/", "a".repeat(FAR_TOO_LONG));
    cases.expect("List with a malformed regular expression of 1 MiB", list(c, &[&bad_regex]).await, Code::InvalidArgument);
    // Above the gRPC limit: refused by the server's decoder before any handler.
    // tonic answers OUT_OF_RANGE (gRPC's status table says RESOURCE_EXHAUSTED).
    cases.expect("Prepare with a key above the gRPC message limit", prepare(c, &over, "", none()).await, Code::OutOfRange);
    cases.expect(
        "Stat with a key above the gRPC message limit",
        c.stat(StatSnapshotRequest { snapshotter: String::new(), key: over }).await,
        Code::OutOfRange,
    );
}

#[allow(clippy::too_many_lines)]
async fn csi_cases(n: &mut Node, cases: &mut Cases, pre: &str) {
    let dir = n.dir.clone();
    let kubelet = dir.join("kubelet");
    let ok_target = n.target("fresh");
    let ok = ok_target.to_str().unwrap();
    let sw = Mode::SingleNodeWriter as i32;
    let ctx = || labels(&[("thinbox.io/sandbox", "runc")]);
    let far_too_long = "n".repeat(FAR_TOO_LONG);
    let c = &mut n.ctl;

    // CreateVolume: names, parameters, capabilities.
    cases.expect("CreateVolume name \"\"", c.create_volume(create("", 300 * MIB, 0, &[], vec![ext4()])).await, Code::InvalidArgument);
    cases.expect("CreateVolume without capabilities", c.create_volume(create("v", 300 * MIB, 0, &[], vec![])).await, Code::InvalidArgument);
    let no_mode = VolumeCapability { access_mode: None, ..ext4() };
    cases.expect(
        "CreateVolume capability without access mode",
        c.create_volume(create("v", 300 * MIB, 0, &[], vec![no_mode])).await,
        Code::InvalidArgument,
    );
    let no_type = VolumeCapability { access_type: None, ..ext4() };
    cases.expect(
        "CreateVolume capability without access type",
        c.create_volume(create("v", 300 * MIB, 0, &[], vec![no_type])).await,
        Code::InvalidArgument,
    );
    for (mode, name) in
        [(Mode::MultiNodeMultiWriter, "MULTI_NODE_MULTI_WRITER"), (Mode::MultiNodeReaderOnly, "MULTI_NODE_READER_ONLY"), (Mode::Unknown, "UNKNOWN")]
    {
        let r = c.create_volume(create("v", 300 * MIB, 0, &[], vec![cap(mode as i32, "ext4")])).await;
        cases.expect(&format!("CreateVolume access mode {name}"), r, Code::InvalidArgument);
    }
    cases.expect("CreateVolume access mode 99", c.create_volume(create("v", 300 * MIB, 0, &[], vec![cap(99, "ext4")])).await, Code::InvalidArgument);
    cases.expect("CreateVolume fs zfs", c.create_volume(create("v", 300 * MIB, 0, &[], vec![cap(sw, "zfs")])).await, Code::InvalidArgument);
    let both = vec![cap(sw, "ext4"), cap(sw, "xfs")];
    cases.expect("CreateVolume asking for ext4 and xfs", c.create_volume(create("v", 300 * MIB, 0, &[], both)).await, Code::InvalidArgument);
    cases.expect("CreateVolume kind nfs", c.create_volume(create("v", 300 * MIB, 0, &[("kind", "nfs")], vec![ext4()])).await, Code::InvalidArgument);
    let long_kind = format!("block{far_too_long}");
    // A 1 MiB parameter: refused before anything echoes it (a status message
    // beyond a client's header limit would reach it as RESOURCE_EXHAUSTED).
    cases.expect(
        "CreateVolume kind of 1 MiB",
        lone_ctl(&dir).await.create_volume(create("v", 300 * MIB, 0, &[("kind", &long_kind)], vec![ext4()])).await,
        Code::InvalidArgument,
    );
    cases.expect(
        "CreateVolume sandbox lxc",
        c.create_volume(create("v", 300 * MIB, 0, &[("thinbox.io/sandbox", "lxc")], vec![ext4()])).await,
        Code::InvalidArgument,
    );
    cases.expect(
        "CreateVolume unknown parameter",
        c.create_volume(create("v", 300 * MIB, 0, &[("fsType", "ext4")], vec![ext4()])).await,
        Code::InvalidArgument,
    );
    let mut many = create("v", 300 * MIB, 0, &[], vec![ext4()]);
    many.parameters = (0..10_000).map(|i| (format!("p{i}"), "x".into())).collect();
    cases.expect("CreateVolume with 10000 unknown parameters", c.create_volume(many).await, Code::InvalidArgument);
    let mut dir_block = create("v", 300 * MIB, 0, &[("kind", "dir")], vec![]);
    dir_block.volume_capabilities = vec![VolumeCapability {
        access_mode: Some(AccessMode { mode: sw }),
        access_type: Some(AccessType::Block(volume_capability::BlockVolume {})),
    }];
    cases.expect("CreateVolume dir with block access", c.create_volume(dir_block).await, Code::InvalidArgument);
    let elsewhere = CreateVolumeRequest {
        accessibility_requirements: Some(TopologyRequirement {
            requisite: vec![Topology { segments: labels(&[("topology.thinbox.io/node", "another-node")]) }],
            preferred: vec![],
        }),
        ..create("v", 300 * MIB, 0, &[], vec![ext4()])
    };
    cases.expect("CreateVolume on another node's topology", c.create_volume(elsewhere).await, Code::ResourceExhausted);
    let from = |t| CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource { r#type: Some(t) }),
        ..create("v", 300 * MIB, 0, &[], vec![ext4()])
    };
    let snap_src = |id: &str| volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: id.into() });
    let vol_src = |id: &str| volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: id.into() });
    cases.expect("CreateVolume from an unknown snapshot", c.create_volume(from(snap_src("tb-snap-99999"))).await, Code::NotFound);
    cases.expect("CreateVolume from a snapshot id with ..", c.create_volume(from(snap_src("../../etc"))).await, Code::NotFound);
    cases.expect("CreateVolume from snapshot id \"\"", c.create_volume(from(snap_src(""))).await, Code::InvalidArgument);
    cases.expect("CreateVolume from an unknown volume", c.create_volume(from(vol_src("tb-block-99999"))).await, Code::NotFound);

    // Capacity ranges (docs/csi.md: one that cannot be met is OUT_OF_RANGE).
    cases.expect("CreateVolume required -1", c.create_volume(create("v", -1, 0, &[], vec![ext4()])).await, Code::InvalidArgument);
    cases.expect("CreateVolume limit -1", c.create_volume(create("v", 300 * MIB, -1, &[], vec![ext4()])).await, Code::InvalidArgument);
    cases.expect("CreateVolume limit < required", c.create_volume(create("v", 600 * MIB, 400 * MIB, &[], vec![ext4()])).await, Code::OutOfRange);
    cases.expect("CreateVolume limit below the smallest volume", c.create_volume(create("v", 0, MIB, &[], vec![ext4()])).await, Code::OutOfRange);
    cases.expect(
        "CreateVolume from a volume above limit",
        c.create_volume(CreateVolumeRequest {
            capacity_range: Some(CapacityRange { required_bytes: 0, limit_bytes: 299 * MIB }),
            ..from(vol_src(pre))
        })
        .await,
        Code::OutOfRange,
    );
    // More than the node has room for (docs/csi.md: no room is RESOURCE_EXHAUSTED).
    cases.expect(
        "CreateVolume file of i64::MAX bytes",
        c.create_volume(create("bad-max-file", i64::MAX, 0, &[("kind", "file")], vec![ext4()])).await,
        Code::ResourceExhausted,
    );
    cases.expect(
        "CreateVolume file of 1 PiB",
        c.create_volume(create("bad-pib-file", 1 << 50, 0, &[("kind", "file")], vec![ext4()])).await,
        Code::ResourceExhausted,
    );
    // Volumes are thin, but none is larger than the pool can be.
    cases.expect(
        "CreateVolume block of i64::MAX bytes",
        c.create_volume(create("bad-max-block", i64::MAX, 0, &[("kind", "block")], vec![ext4()])).await,
        Code::ResourceExhausted,
    );
    cases.expect(
        "CreateVolume block of 1 TiB in a 4 GiB pool",
        c.create_volume(create("bad-tib-block", 1 << 40, 0, &[("kind", "block")], vec![ext4()])).await,
        Code::ResourceExhausted,
    );

    // Oversize: a name far beyond CSI's 128 bytes, a parameter map far beyond 4 KiB, a message above the gRPC limit.
    // Names and maps beyond CSI's size limits (128 bytes, 4 KiB).
    cases.expect("CreateVolume name of 1 MiB", c.create_volume(create(&far_too_long, 300 * MIB, 0, &[], vec![ext4()])).await, Code::InvalidArgument);
    let mut big_map = create("bad-big-map", 300 * MIB, 0, &[], vec![ext4()]);
    big_map.parameters = co_parameters(1000);
    cases.expect("CreateVolume with 1 MB of CO parameters", c.create_volume(big_map).await, Code::InvalidArgument);
    let over = "n".repeat(OVER_GRPC_LIMIT);
    cases.expect(
        "CreateVolume above the gRPC message limit",
        c.create_volume(create(&over, 300 * MIB, 0, &[], vec![ext4()])).await,
        Code::OutOfRange,
    );
    let snap = |name: &str, source: &str| CreateSnapshotRequest { source_volume_id: source.into(), name: name.into(), ..Default::default() };
    cases.expect("CreateSnapshot name \"\"", c.create_snapshot(snap("", pre)).await, Code::InvalidArgument);
    cases.expect("CreateSnapshot source \"\"", c.create_snapshot(snap("s", "")).await, Code::InvalidArgument);
    cases.expect("CreateSnapshot of an unknown volume", c.create_snapshot(snap("s", "tb-block-99999")).await, Code::NotFound);
    cases.expect("CreateSnapshot of a volume id with /", c.create_snapshot(snap("s", "tb-block-1/../x")).await, Code::NotFound);
    cases.expect("CreateSnapshot name of 1 MiB", c.create_snapshot(snap(&far_too_long, pre)).await, Code::InvalidArgument);
    let with_param = CreateSnapshotRequest { parameters: labels(&[("tier", "gold")]), ..snap("s", pre) };
    cases.expect("CreateSnapshot unknown parameter", c.create_snapshot(with_param).await, Code::InvalidArgument);
    cases.expect("DeleteVolume id \"\"", c.delete_volume(DeleteVolumeRequest::default()).await, Code::InvalidArgument);
    cases.expect("DeleteSnapshot id \"\"", c.delete_snapshot(DeleteSnapshotRequest::default()).await, Code::InvalidArgument);
    // CSI: deleting what does not exist succeeds (and changes nothing).
    let del = |id: &str| DeleteVolumeRequest { volume_id: id.into(), secrets: HashMap::new() };
    cases.expect("DeleteVolume unknown id", c.delete_volume(del("tb-block-99999")).await, Code::Ok);
    cases.expect("DeleteVolume id with ..", c.delete_volume(del("../../etc")).await, Code::Ok);
    let vvc = |id: &str| ValidateVolumeCapabilitiesRequest { volume_id: id.into(), volume_capabilities: vec![ext4()], ..Default::default() };
    cases.expect("ValidateVolumeCapabilities id \"\"", c.validate_volume_capabilities(vvc("")).await, Code::InvalidArgument);
    cases.expect("ValidateVolumeCapabilities unknown id", c.validate_volume_capabilities(vvc("tb-block-99999")).await, Code::NotFound);
    let expand = |id: &str, required: i64, limit: i64| ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(CapacityRange { required_bytes: required, limit_bytes: limit }),
        ..Default::default()
    };
    cases.expect("ControllerExpandVolume unknown id", c.controller_expand_volume(expand("tb-block-99999", GIB, 0)).await, Code::NotFound);
    cases.expect("ControllerExpandVolume limit < required", c.controller_expand_volume(expand(pre, 2 * GIB, GIB)).await, Code::OutOfRange);
    cases.expect("ControllerExpandVolume limit below the size", c.controller_expand_volume(expand(pre, 0, 100 * MIB)).await, Code::OutOfRange);
    cases.expect("ControllerExpandVolume required -1", c.controller_expand_volume(expand(pre, -1, 0)).await, Code::InvalidArgument);
    // Growing beyond what the pool can be is refused before anything is
    // recorded (the device's record keeps its size; checked with everything
    // else at the end).
    cases.expect("ControllerExpandVolume to i64::MAX bytes", c.controller_expand_volume(expand(pre, i64::MAX, 0)).await, Code::ResourceExhausted);
    let get_cap = |p: &[(&str, &str)]| GetCapacityRequest { parameters: labels(p), ..Default::default() };
    cases.expect("GetCapacity kind nfs", c.get_capacity(get_cap(&[("kind", "nfs")])).await, Code::InvalidArgument);
    cases.expect("GetCapacity unknown parameter", c.get_capacity(get_cap(&[("tier", "gold")])).await, Code::InvalidArgument);
    let lv = |token: &str, max: i32| ListVolumesRequest { starting_token: token.into(), max_entries: max };
    cases.expect("ListVolumes starting_token not ours", c.list_volumes(lv("garbage", 0)).await, Code::Aborted);
    cases.expect("ListVolumes max_entries -1", c.list_volumes(lv("", -1)).await, Code::InvalidArgument);

    // NodePublishVolume: ids, targets, capabilities, context.
    let nd = &mut n.node;
    cases.expect("NodePublish volume id \"\"", nd.node_publish_volume(publish("", ok, Some(ext4()), ctx())).await, Code::InvalidArgument);
    cases.expect("NodePublish unknown volume", nd.node_publish_volume(publish("tb-block-99999", ok, Some(ext4()), ctx())).await, Code::NotFound);
    cases.expect("NodePublish volume id with ..", nd.node_publish_volume(publish("../../etc", ok, Some(ext4()), ctx())).await, Code::NotFound);
    // The NOT_FOUND's message is cut, so the client gets it (see "kind of 1 MiB").
    cases.expect(
        "NodePublish volume id of 1 MiB",
        lone_node(&dir).await.node_publish_volume(publish(&far_too_long, ok, Some(ext4()), ctx())).await,
        Code::NotFound,
    );
    cases.expect("NodePublish without capability", nd.node_publish_volume(publish(pre, ok, None, ctx())).await, Code::InvalidArgument);
    cases.expect("NodePublish fs zfs", nd.node_publish_volume(publish(pre, ok, Some(cap(sw, "zfs")), ctx())).await, Code::InvalidArgument);
    cases.expect(
        "NodePublish xfs of an ext4 volume",
        nd.node_publish_volume(publish(pre, ok, Some(cap(sw, "xfs")), ctx())).await,
        Code::InvalidArgument,
    );
    let multi = cap(Mode::MultiNodeMultiWriter as i32, "ext4");
    cases.expect(
        "NodePublish access mode MULTI_NODE_MULTI_WRITER",
        nd.node_publish_volume(publish(pre, ok, Some(multi), ctx())).await,
        Code::InvalidArgument,
    );
    let lxc = labels(&[("thinbox.io/sandbox", "lxc")]);
    cases.expect("NodePublish sandbox lxc", nd.node_publish_volume(publish(pre, ok, Some(ext4()), lxc)).await, Code::InvalidArgument);
    let outside = dir.join("outside");
    let bad_targets: Vec<(&str, String, Code)> = vec![
        ("target \"\"", String::new(), Code::InvalidArgument),
        ("relative target", "kubelet/pods/p/volumes/kubernetes.io~csi/fresh/mount".into(), Code::InvalidArgument),
        ("target with ..", format!("{}/pods/p/../../../outside/mount", kubelet.display()), Code::InvalidArgument),
        ("target outside the kubelet dir", outside.join("mount").display().to_string(), Code::InvalidArgument),
        ("target /etc", "/etc".into(), Code::InvalidArgument),
        ("target /", "/".into(), Code::InvalidArgument),
        ("target through a symlinked parent", format!("{}/pods/p/escape/mount", kubelet.display()), Code::InvalidArgument),
        ("target that is a symlink", format!("{}/pods/p/volumes/link", kubelet.display()), Code::InvalidArgument),
        ("target whose parent does not exist", format!("{}/pods/nobody/volumes/x/mount", kubelet.display()), Code::NotFound),
    ];
    for (what, t, want) in &bad_targets {
        cases.expect(&format!("NodePublish {what}"), nd.node_publish_volume(publish(pre, t, Some(ext4()), ctx())).await, *want);
    }
    let dot = format!("{}/pods/p/./volumes/kubernetes.io~csi/fresh/mount", kubelet.display());
    cases.expect("NodePublish target with .", nd.node_publish_volume(publish(pre, &dot, Some(ext4()), ctx())).await, Code::InvalidArgument);
    // Names the kernel would refuse are refused before anything is recorded.
    let long_name = format!("{}/pods/p/{}", kubelet.display(), "n".repeat(300));
    cases.expect(
        "NodePublish target named beyond NAME_MAX",
        nd.node_publish_volume(publish(pre, &long_name, Some(ext4()), ctx())).await,
        Code::InvalidArgument,
    );
    cases.expect(
        "NodeUnpublish target named beyond NAME_MAX",
        nd.node_unpublish_volume(NodeUnpublishVolumeRequest { volume_id: pre.into(), target_path: long_name.clone() }).await,
        Code::InvalidArgument,
    );
    let long = format!("{}/pods/p/{}", kubelet.display(), "n".repeat(FAR_TOO_LONG));
    cases.expect(
        "NodePublish target of 1 MiB",
        lone_node(&dir).await.node_publish_volume(publish(pre, &long, Some(ext4()), ctx())).await,
        Code::InvalidArgument,
    );
    // Inline ephemeral volumes: attributes are checked like parameters.
    let eph = |pairs: &[(&str, &str)]| {
        let mut m = labels(&[("csi.storage.k8s.io/ephemeral", "true"), ("thinbox.io/sandbox", "runc")]);
        m.extend(labels(pairs));
        publish("csi-eph-handle", ok, Some(ext4()), m)
    };
    cases.expect("NodePublish ephemeral size lots", nd.node_publish_volume(eph(&[("size", "lots")])).await, Code::InvalidArgument);
    cases.expect("NodePublish ephemeral size 1.5Gi", nd.node_publish_volume(eph(&[("size", "1.5Gi")])).await, Code::InvalidArgument);
    cases.expect("NodePublish ephemeral size beyond u64", nd.node_publish_volume(eph(&[("size", "99999999999Ei")])).await, Code::InvalidArgument);
    cases.expect(
        "NodePublish ephemeral fsType zfs",
        nd.node_publish_volume(eph(&[("size", "300Mi"), ("fsType", "zfs")])).await,
        Code::InvalidArgument,
    );
    cases.expect(
        "NodePublish ephemeral unknown attribute",
        nd.node_publish_volume(eph(&[("size", "300Mi"), ("tier", "gold")])).await,
        Code::InvalidArgument,
    );
    cases.expect("NodePublish ephemeral of 1 PiB", nd.node_publish_volume(eph(&[("size", "1Pi")])).await, Code::ResourceExhausted);
    // Staging: the driver has no STAGE_UNSTAGE_VOLUME, whatever the paths.
    let stage = NodeStageVolumeRequest {
        volume_id: pre.into(),
        staging_target_path: "../../etc".into(),
        volume_capability: Some(ext4()),
        ..Default::default()
    };
    cases.expect("NodeStageVolume staging path ../../etc", nd.node_stage_volume(stage).await, Code::Unimplemented);
    let unstage = NodeUnstageVolumeRequest { volume_id: pre.into(), staging_target_path: "/".into() };
    cases.expect("NodeUnstageVolume staging path /", nd.node_unstage_volume(unstage).await, Code::Unimplemented);

    // NodeUnpublishVolume, stats and expansion.
    let unpub = |id: &str, t: &str| NodeUnpublishVolumeRequest { volume_id: id.into(), target_path: t.into() };
    cases.expect("NodeUnpublish volume id \"\"", nd.node_unpublish_volume(unpub("", ok)).await, Code::InvalidArgument);
    cases.expect("NodeUnpublish relative target", nd.node_unpublish_volume(unpub(pre, "pods/p/mount")).await, Code::InvalidArgument);
    let dotdot = format!("{}/pods/p/../../../outside/mount", kubelet.display());
    cases.expect("NodeUnpublish target with ..", nd.node_unpublish_volume(unpub(pre, &dotdot)).await, Code::InvalidArgument);
    cases.expect("NodeUnpublish target /etc", nd.node_unpublish_volume(unpub(pre, "/etc")).await, Code::InvalidArgument);
    let via_link = format!("{}/pods/p/escape/mount", kubelet.display());
    cases.expect("NodeUnpublish target through a symlinked parent", nd.node_unpublish_volume(unpub(pre, &via_link)).await, Code::InvalidArgument);
    let link = format!("{}/pods/p/volumes/link", kubelet.display());
    cases.expect("NodeUnpublish target that is a symlink", nd.node_unpublish_volume(unpub(pre, &link)).await, Code::InvalidArgument);
    let stats = |id: &str, p: &str| NodeGetVolumeStatsRequest { volume_id: id.into(), volume_path: p.into(), staging_target_path: String::new() };
    cases.expect("NodeGetVolumeStats id \"\"", nd.node_get_volume_stats(stats("", ok)).await, Code::InvalidArgument);
    cases.expect("NodeGetVolumeStats path \"\"", nd.node_get_volume_stats(stats(pre, "")).await, Code::InvalidArgument);
    cases.expect("NodeGetVolumeStats unknown id", nd.node_get_volume_stats(stats("tb-block-99999", ok)).await, Code::NotFound);
    cases.expect("NodeGetVolumeStats path /etc", nd.node_get_volume_stats(stats(pre, "/etc")).await, Code::NotFound);
    let nexp = |id: &str, p: &str, required: i64| NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: p.into(),
        capacity_range: Some(CapacityRange { required_bytes: required, limit_bytes: 0 }),
        ..Default::default()
    };
    cases.expect("NodeExpandVolume unknown id", nd.node_expand_volume(nexp("tb-block-99999", ok, GIB)).await, Code::NotFound);
    cases.expect("NodeExpandVolume path \"\"", nd.node_expand_volume(nexp(pre, "", GIB)).await, Code::InvalidArgument);
    cases.expect("NodeExpandVolume required -1", nd.node_expand_volume(nexp(pre, ok, -1)).await, Code::InvalidArgument);
}

const GIB: i64 = 1 << 30;

/// A connection of its own, for a case whose answer breaks it (a status
/// message beyond the client's header limit resets the connection, and the
/// next request on it would be CANCELLED).
async fn lone(dir: &Path) -> tonic::transport::Channel {
    thinbox_proto::unix_channel(dir.join("csi.sock"), std::time::Duration::from_secs(120)).await.unwrap()
}

async fn lone_ctl(dir: &Path) -> controller_client::ControllerClient<tonic::transport::Channel> {
    controller_client::ControllerClient::new(lone(dir).await)
}

async fn lone_node(dir: &Path) -> node_client::NodeClient<tonic::transport::Channel> {
    node_client::NodeClient::new(lone(dir).await)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_on_both_doors_gets_its_code_and_changes_nothing() {
    common::require_root();
    let tmp = tempfile::Builder::new().prefix("tbbad-").tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let work = dir.join("work");
    let mut n = Node::start(&dir, POOL).await;

    // What is there before: a layer with a file, an active snapshot on it, a volume with a file.
    common::snapshots::layer(&mut n.snap, &work, "base", "", &[("hello", "world")]).await;
    prepare(&mut n.snap, "act", "base", HashMap::new()).await.unwrap();
    let pre = n.create("pre", 300 << 20).await.unwrap();
    let t = n.publish(&pre, "pre").await;
    std::fs::write(t.join("data"), "volume content").unwrap();
    n.unpublish(&pre, &t).await;
    // Paths a hostile or confused CO could name: a directory outside the
    // kubelet's, a symlinked parent leading there, a symlink as the target.
    std::fs::create_dir_all(dir.join("outside")).unwrap();
    let pods = dir.join("kubelet/pods/p");
    std::fs::create_dir_all(pods.join("volumes/kubernetes.io~csi/fresh")).unwrap();
    std::os::unix::fs::symlink(dir.join("outside"), pods.join("escape")).unwrap();
    std::os::unix::fs::symlink(dir.join("outside"), pods.join("volumes/link")).unwrap();

    let before = everything(&mut n).await;
    assert_eq!(before.snapshots.len(), 2, "{:?}", before.snapshots);
    assert_eq!(before.volumes.len(), 1, "{:?}", before.volumes);
    assert_eq!(before.check, Some(ReconcileReport::default()));
    let mut cases = Cases::default();
    snapshot_cases(&mut n, &mut cases).await;
    csi_cases(&mut n, &mut cases, &pre).await;
    println!("{} bad requests", cases.run);
    let after = everything(&mut n).await;
    assert!(cases.wrong.is_empty(), "{} of {} cases got another code than promised:\n{}", cases.wrong.len(), cases.run, cases.wrong.join("\n"));
    // Field by field, so that a failure names what changed.
    let Everything { snapshots, volumes, csi_snapshots, devices, pool_devices, consumers, check, kubelet, mounts, loops } = after;
    assert_eq!(snapshots, before.snapshots, "snapshots changed");
    assert_eq!(volumes, before.volumes, "CSI volumes changed");
    assert_eq!(csi_snapshots, before.csi_snapshots, "CSI snapshots changed");
    assert_eq!(devices, before.devices, "devices changed");
    assert_eq!((pool_devices, consumers), (before.pool_devices, before.consumers), "the pool's status changed");
    assert_eq!(check, before.check, "the engine's check changed");
    assert_eq!(kubelet, before.kubelet, "the kubelet directory changed");
    assert_eq!((mounts, loops), (before.mounts, before.loops), "mounts or loop devices changed");
    assert_eq!(std::fs::read_dir(dir.join("outside")).unwrap().count(), 0, "nothing was made outside the kubelet directory");

    // The layer, the active snapshot and the volume are whole.
    assert_eq!(read_through_view(&mut n.snap, &work, "base", "hello").await, "world");
    commit(&mut n.snap, "act-done", "act").await.unwrap();
    assert_eq!(read_through_view(&mut n.snap, &work, "act-done", "hello").await, "world");
    let t = n.publish(&pre, "pre").await;
    let data = std::fs::read_to_string(t.join("data"));
    n.unpublish(&pre, &t).await;
    assert_eq!(data.unwrap(), "volume content");
    let before = everything(&mut n).await;

    // A restart keeps it all.
    n.stop();
    let mut n = Node::start(&dir, POOL).await;
    let again = everything(&mut n).await;
    assert_eq!(again.snapshots, before.snapshots, "snapshots after a restart");
    assert_eq!(again.volumes, before.volumes, "volumes after a restart");
    // A device attached again may get another loop device node.
    let nodeless = |devices: Vec<thinbox_proto::admin::Device>| -> Vec<_> {
        devices.into_iter().map(|d| thinbox_proto::admin::Device { node: d.node.map(|_| "attached".into()), ..d }).collect()
    };
    assert_eq!(nodeless(again.devices), nodeless(before.devices), "devices after a restart");
    assert_eq!(again.check, Some(ReconcileReport::default()), "the engine's check after a restart");
    n.stop();
    assert_eq!(thinbox_blockstore::scan_loops(&dir).unwrap(), vec![], "loop devices left");
    assert_eq!(common::volumes::mounts_under(&dir), Vec::<PathBuf>::new(), "mounts left");
}
