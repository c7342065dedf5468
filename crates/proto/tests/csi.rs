//! Wire compatibility of `thinbox_proto::csi::v1` with the published CSI spec.
//!
//! Every expected field number, enum value and name below is copied from the
//! published `csi.proto` at tag v1.12.0 of
//! github.com/container-storage-interface/spec, not from our transcription, and the
//! expected bytes are built by hand from those numbers. Points checked are the ones
//! that are easy to get wrong when transcribing: field numbers that are not in
//! declaration order, oneof members, map fields, enum values added in later minor
//! versions, and the well-known wrapper types.

use prost::Message;
use std::collections::HashMap;
use thinbox_proto::csi::v1 as csi;

// ---- hand-rolled protobuf encoding (fields < 16, payloads < 128 bytes) ----

const VARINT: u8 = 0;
const LEN: u8 = 2;

fn key(field: u8, wire_type: u8) -> u8 {
    assert!(field < 16);
    (field << 3) | wire_type
}

fn varint(field: u8, value: u8) -> Vec<u8> {
    assert!(value < 128);
    vec![key(field, VARINT), value]
}

fn len(field: u8, payload: impl AsRef<[u8]>) -> Vec<u8> {
    let payload = payload.as_ref();
    assert!(payload.len() < 128);
    let mut out = vec![key(field, LEN), payload.len() as u8];
    out.extend_from_slice(payload);
    out
}

/// One entry of a `map<string, string>` field: a message with key = 1, value = 2.
fn map_entry(field: u8, k: &str, v: &str) -> Vec<u8> {
    len(field, [len(1, k), len(2, v)].concat())
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

// ---- messages ----

#[test]
fn node_publish_volume_request_encodes_with_spec_field_numbers() {
    // Spec: volume_id = 1, publish_context = 2, staging_target_path = 3,
    // target_path = 4, volume_capability = 5, readonly = 6, secrets = 7,
    // volume_context = 8.
    let req = csi::NodePublishVolumeRequest {
        volume_id: "vol-1".into(),
        target_path: "/var/lib/kubelet/pods/p/volumes/v/mount".into(),
        readonly: true,
        volume_context: map(&[("pool", "thin0")]),
        ..Default::default()
    };
    let expected = [len(1, "vol-1"), len(4, "/var/lib/kubelet/pods/p/volumes/v/mount"), varint(6, 1), map_entry(8, "pool", "thin0")].concat();
    assert_eq!(req.encode_to_vec(), expected);
    assert_eq!(expected[0], 0x0a, "volume_id: field 1, length-delimited");
}

#[test]
fn node_publish_volume_request_decodes_every_spec_field() {
    let bytes = [
        map_entry(8, "ctx", "c"),
        map_entry(7, "sec", "s"),
        varint(6, 1),
        len(5, len(1, [])), // volume_capability { block {} }
        len(4, "/target"),
        len(3, "/staging"),
        map_entry(2, "pub", "p"),
        len(1, "vol-1"),
    ]
    .concat();
    let req = csi::NodePublishVolumeRequest::decode(bytes.as_slice()).expect("decode");
    assert_eq!(req.volume_id, "vol-1");
    assert_eq!(req.publish_context, map(&[("pub", "p")]));
    assert_eq!(req.staging_target_path, "/staging");
    assert_eq!(req.target_path, "/target");
    let cap = req.volume_capability.expect("volume_capability");
    assert!(matches!(cap.access_type, Some(csi::volume_capability::AccessType::Block(_))));
    assert!(req.readonly);
    assert_eq!(req.secrets, map(&[("sec", "s")]));
    assert_eq!(req.volume_context, map(&[("ctx", "c")]));
}

#[test]
fn volume_capability_oneof_and_access_mode_numbers() {
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode};

    // Spec: oneof access_type { BlockVolume block = 1; MountVolume mount = 2; }
    // AccessMode access_mode = 3; AccessMode.mode = 1.
    let block = csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    };
    assert_eq!(block.encode_to_vec(), [len(1, []), len(3, varint(1, 1))].concat());

    // Spec: MountVolume fs_type = 1, mount_flags = 2, volume_mount_group = 3.
    let mount = csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: vec!["noatime".into()],
            volume_mount_group: "1000".into(),
        })),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeMultiWriter as i32 }),
    };
    let expected = [len(2, [len(1, "ext4"), len(2, "noatime"), len(3, "1000")].concat()), len(3, varint(1, 7))].concat();
    assert_eq!(mount.encode_to_vec(), expected);
    assert_eq!(csi::VolumeCapability::decode(expected.as_slice()).expect("decode"), mount);
}

#[test]
fn create_volume_request_decodes_every_spec_field() {
    // Spec: name = 1, capacity_range = 2, volume_capabilities = 3, parameters = 4,
    // secrets = 5, volume_content_source = 6, accessibility_requirements = 7,
    // mutable_parameters = 8. CapacityRange: required_bytes = 1, limit_bytes = 2.
    // VolumeContentSource: oneof type { snapshot = 1; volume = 2; }, each with its
    // id at 1. TopologyRequirement: requisite = 1, preferred = 2;
    // Topology.segments = 1.
    let bytes = [
        len(1, "pvc-1"),
        len(2, [varint(1, 100), varint(2, 120)].concat()),
        len(3, len(2, len(1, "xfs"))),
        map_entry(4, "param", "a"),
        map_entry(5, "secret", "b"),
        len(6, len(1, len(1, "snap-1"))),
        len(7, [len(1, map_entry(1, "zone", "z1")), len(2, map_entry(1, "zone", "z2"))].concat()),
        map_entry(8, "iops", "3000"),
    ]
    .concat();
    let req = csi::CreateVolumeRequest::decode(bytes.as_slice()).expect("decode");
    assert_eq!(req.name, "pvc-1");
    assert_eq!(req.capacity_range, Some(csi::CapacityRange { required_bytes: 100, limit_bytes: 120 }));
    assert_eq!(req.volume_capabilities.len(), 1);
    match &req.volume_capabilities[0].access_type {
        Some(csi::volume_capability::AccessType::Mount(m)) => assert_eq!(m.fs_type, "xfs"),
        other => panic!("expected mount, got {other:?}"),
    }
    assert_eq!(req.parameters, map(&[("param", "a")]));
    assert_eq!(req.secrets, map(&[("secret", "b")]));
    match req.volume_content_source.and_then(|s| s.r#type) {
        Some(csi::volume_content_source::Type::Snapshot(s)) => assert_eq!(s.snapshot_id, "snap-1"),
        other => panic!("expected snapshot source, got {other:?}"),
    }
    let topo = req.accessibility_requirements.expect("accessibility_requirements");
    assert_eq!(topo.requisite[0].segments, map(&[("zone", "z1")]));
    assert_eq!(topo.preferred[0].segments, map(&[("zone", "z2")]));
    assert_eq!(req.mutable_parameters, map(&[("iops", "3000")]));

    // The other member of VolumeContentSource.type.
    let src = csi::VolumeContentSource::decode(len(2, len(1, "vol-0")).as_slice()).expect("decode");
    match src.r#type {
        Some(csi::volume_content_source::Type::Volume(v)) => assert_eq!(v.volume_id, "vol-0"),
        other => panic!("expected volume source, got {other:?}"),
    }
}

#[test]
fn modify_volume_and_validate_capabilities_mutable_parameters() {
    // Spec: ControllerModifyVolumeRequest volume_id = 1, secrets = 2,
    // mutable_parameters = 3; ValidateVolumeCapabilitiesRequest
    // mutable_parameters = 6.
    let req = csi::ControllerModifyVolumeRequest { volume_id: "v".into(), secrets: map(&[("s", "1")]), mutable_parameters: map(&[("m", "2")]) };
    assert_eq!(req.encode_to_vec(), [len(1, "v"), map_entry(2, "s", "1"), map_entry(3, "m", "2")].concat());

    let req = csi::ValidateVolumeCapabilitiesRequest { mutable_parameters: map(&[("m", "2")]), ..Default::default() };
    assert_eq!(req.encode_to_vec(), map_entry(6, "m", "2"));
}

#[test]
fn well_known_types_are_wrappers_on_the_wire() {
    // Spec: ProbeResponse { google.protobuf.BoolValue ready = 1; }. An explicit
    // false must be sent (as an empty BoolValue), unlike an unset field.
    assert_eq!(csi::ProbeResponse { ready: Some(false) }.encode_to_vec(), len(1, []));
    assert_eq!(csi::ProbeResponse { ready: Some(true) }.encode_to_vec(), len(1, varint(1, 1)));
    assert!(csi::ProbeResponse { ready: None }.encode_to_vec().is_empty());

    // Spec: GetCapacityResponse available_capacity = 1 (int64),
    // maximum_volume_size = 2 and minimum_volume_size = 3 (Int64Value).
    let resp = csi::GetCapacityResponse { available_capacity: 5, maximum_volume_size: Some(100), minimum_volume_size: Some(1) };
    assert_eq!(resp.encode_to_vec(), [varint(1, 5), len(2, varint(1, 100)), len(3, varint(1, 1))].concat());

    // Spec: Snapshot size_bytes = 1, snapshot_id = 2, source_volume_id = 3,
    // creation_time = 4 (Timestamp: seconds = 1, nanos = 2), ready_to_use = 5,
    // group_snapshot_id = 6.
    let snap = csi::Snapshot {
        size_bytes: 7,
        snapshot_id: "s".into(),
        source_volume_id: "v".into(),
        creation_time: Some(prost_types::Timestamp { seconds: 1, nanos: 2 }),
        ready_to_use: true,
        group_snapshot_id: "g".into(),
    };
    let expected = [varint(1, 7), len(2, "s"), len(3, "v"), len(4, [varint(1, 1), varint(2, 2)].concat()), varint(5, 1), len(6, "g")].concat();
    assert_eq!(snap.encode_to_vec(), expected);
}

#[test]
fn capability_oneofs() {
    // Spec: ControllerServiceCapability / NodeServiceCapability { oneof type { RPC rpc = 1; } },
    // RPC.type = 1. PluginCapability { oneof type { Service service = 1;
    // VolumeExpansion volume_expansion = 2; } }, each with type = 1.
    let cap = csi::ControllerServiceCapability {
        r#type: Some(csi::controller_service_capability::Type::Rpc(csi::controller_service_capability::Rpc {
            r#type: csi::controller_service_capability::rpc::Type::ModifyVolume as i32,
        })),
    };
    assert_eq!(cap.encode_to_vec(), len(1, varint(1, 14)));

    let cap = csi::NodeServiceCapability {
        r#type: Some(csi::node_service_capability::Type::Rpc(csi::node_service_capability::Rpc {
            r#type: csi::node_service_capability::rpc::Type::StageUnstageVolume as i32,
        })),
    };
    assert_eq!(cap.encode_to_vec(), len(1, varint(1, 1)));

    let cap = csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::VolumeExpansion(csi::plugin_capability::VolumeExpansion {
            r#type: csi::plugin_capability::volume_expansion::Type::Online as i32,
        })),
    };
    assert_eq!(cap.encode_to_vec(), len(2, varint(1, 1)));
}

// ---- enums: every published value, by name and number, and nothing more ----

/// Checks that `$enum` has exactly the published values: each name maps to its
/// number and back, and the value after the last one is unknown.
macro_rules! assert_enum {
    ($enum:ty, [$(($name:literal, $num:literal)),+ $(,)?]) => {{
        let published: &[(&str, i32)] = &[$(($name, $num)),+];
        for (i, &(name, num)) in published.iter().enumerate() {
            assert_eq!(num, i as i32, "{}: published values are contiguous from 0", stringify!($enum));
            let by_name = <$enum>::from_str_name(name)
                .unwrap_or_else(|| panic!("{}: no value named {name}", stringify!($enum)));
            assert_eq!(by_name as i32, num, "{}::{name}", stringify!($enum));
            let by_num = <$enum>::try_from(num)
                .unwrap_or_else(|_| panic!("{}: no value {num}", stringify!($enum)));
            assert_eq!(by_num.as_str_name(), name, "{}: value {num}", stringify!($enum));
        }
        let next = published.len() as i32;
        assert!(<$enum>::try_from(next).is_err(), "{}: unexpected value {next}", stringify!($enum));
    }};
}

#[test]
fn access_mode_values() {
    assert_enum!(
        csi::volume_capability::access_mode::Mode,
        [
            ("UNKNOWN", 0),
            ("SINGLE_NODE_WRITER", 1),
            ("SINGLE_NODE_READER_ONLY", 2),
            ("MULTI_NODE_READER_ONLY", 3),
            ("MULTI_NODE_SINGLE_WRITER", 4),
            ("MULTI_NODE_MULTI_WRITER", 5),
            ("SINGLE_NODE_SINGLE_WRITER", 6),
            ("SINGLE_NODE_MULTI_WRITER", 7),
        ]
    );
}

#[test]
fn controller_capability_values() {
    assert_enum!(
        csi::controller_service_capability::rpc::Type,
        [
            ("UNKNOWN", 0),
            ("CREATE_DELETE_VOLUME", 1),
            ("PUBLISH_UNPUBLISH_VOLUME", 2),
            ("LIST_VOLUMES", 3),
            ("GET_CAPACITY", 4),
            ("CREATE_DELETE_SNAPSHOT", 5),
            ("LIST_SNAPSHOTS", 6),
            ("CLONE_VOLUME", 7),
            ("PUBLISH_READONLY", 8),
            ("EXPAND_VOLUME", 9),
            ("LIST_VOLUMES_PUBLISHED_NODES", 10),
            ("VOLUME_CONDITION", 11),
            ("GET_VOLUME", 12),
            ("SINGLE_NODE_MULTI_WRITER", 13),
            ("MODIFY_VOLUME", 14),
            ("GET_SNAPSHOT", 15),
        ]
    );
}

#[test]
fn node_capability_values() {
    assert_enum!(
        csi::node_service_capability::rpc::Type,
        [
            ("UNKNOWN", 0),
            ("STAGE_UNSTAGE_VOLUME", 1),
            ("GET_VOLUME_STATS", 2),
            ("EXPAND_VOLUME", 3),
            ("VOLUME_CONDITION", 4),
            ("SINGLE_NODE_MULTI_WRITER", 5),
            ("VOLUME_MOUNT_GROUP", 6),
        ]
    );
}

#[test]
fn plugin_group_and_usage_values() {
    assert_enum!(
        csi::plugin_capability::service::Type,
        [
            ("UNKNOWN", 0),
            ("CONTROLLER_SERVICE", 1),
            ("VOLUME_ACCESSIBILITY_CONSTRAINTS", 2),
            ("GROUP_CONTROLLER_SERVICE", 3),
            ("SNAPSHOT_METADATA_SERVICE", 4),
        ]
    );
    assert_enum!(csi::plugin_capability::volume_expansion::Type, [("UNKNOWN", 0), ("ONLINE", 1), ("OFFLINE", 2),]);
    assert_enum!(csi::group_controller_service_capability::rpc::Type, [("UNKNOWN", 0), ("CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT", 1),]);
    assert_enum!(csi::volume_usage::Unit, [("UNKNOWN", 0), ("BYTES", 1), ("INODES", 2)]);
}

#[test]
fn grpc_service_names() {
    // gRPC paths are "/csi.v1.<Service>/<Rpc>".
    assert_eq!(csi::identity_server::SERVICE_NAME, "csi.v1.Identity");
    assert_eq!(csi::controller_server::SERVICE_NAME, "csi.v1.Controller");
    assert_eq!(csi::group_controller_server::SERVICE_NAME, "csi.v1.GroupController");
    assert_eq!(csi::node_server::SERVICE_NAME, "csi.v1.Node");
}
