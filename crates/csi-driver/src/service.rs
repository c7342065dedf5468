//! The CSI gRPC services (Identity, Controller, Node) over one [`Driver`]:
//! request validation and decoding here, the work in [`Driver`], run off the
//! async runtime.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use thinbox_blockstore::FsType;
use thinbox_metrics::{Api, Metrics};
use thinbox_proto::csi::v1::controller_server::Controller;
use thinbox_proto::csi::v1::group_controller_server::GroupController;
use thinbox_proto::csi::v1::identity_server::Identity;
use thinbox_proto::csi::v1::node_server::Node;
use thinbox_proto::csi::v1::volume_capability::access_mode::Mode as AccessMode;
use thinbox_proto::csi::v1::volume_capability::{AccessType as CsiAccessType, MountVolume};
use thinbox_proto::csi::v1::*;
use tonic::{Request, Response, Status};

use crate::controller::CreateRequest;
use crate::driver::Driver;
use crate::error::{Error, Result, invalid};
use crate::node::AccessType;
use crate::paths;
use crate::state::{Encryption, Kind, Sandbox, Source, State};

/// The driver's name (CSIDriver object, StorageClass provisioner).
pub const DRIVER_NAME: &str = "csi.thinbox.io";
/// Topology key: volumes live on one node.
pub const TOPOLOGY_KEY: &str = "topology.thinbox.io/node";
/// Node topology key: `"true"` when the node's `/dev/kvm` is usable for VM
/// sandboxes (block-passthrough's probe), `"false"` otherwise. Nodes carry
/// it; volumes do not (a volume is reachable on its node either way).
pub const KVM_TOPOLOGY_KEY: &str = "topology.thinbox.io/kvm";
/// StorageClass parameter / volume context key: what backs the volume.
pub const PARAM_KIND: &str = "kind";
/// StorageClass parameter / inline attribute: `kata` or `runc`.
pub const PARAM_SANDBOX: &str = "thinbox.io/sandbox";
/// StorageClass parameter (or inline attribute): `ephemeral` has a Kata guest
/// encrypt the volume with a key it throws away.
pub const PARAM_ENCRYPTION: &str = "thinbox.io/encryption";
/// Parameters the CO adds itself (external-provisioner's extra metadata, pod info).
const CO_PREFIX: &str = "csi.storage.k8s.io/";
/// Volume context key that marks an inline ephemeral volume.
const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";

/// The CSI services, sharing one [`Driver`].
#[derive(Debug, Clone)]
pub struct Csi {
    driver: Arc<Driver>,
    metrics: Arc<Metrics>,
}

impl Csi {
    /// Wraps the driver; every call is counted in `metrics`.
    pub fn new(driver: Arc<Driver>, metrics: Arc<Metrics>) -> Csi {
        Csi { driver, metrics }
    }

    async fn run<T: Send + 'static>(&self, op: &'static str, f: impl FnOnce(&Driver) -> Result<T> + Send + 'static) -> Result<T, Status> {
        let d = self.driver.clone();
        let start = std::time::Instant::now();
        let out = tokio::task::spawn_blocking(move || f(&d)).await.map_err(Error::from).and_then(|r| r);
        self.metrics.observe(Api::Csi, op, out.is_ok(), start.elapsed());
        tracing::debug!(op, elapsed_us = start.elapsed().as_micros() as u64, ok = out.is_ok(), "rpc");
        out.map_err(Status::from)
    }

    fn topology(&self) -> Topology {
        Topology { segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), self.driver.node_id().to_owned())]) }
    }
}

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!("{what} is not supported by {DRIVER_NAME}")))
}

/// One page of a listing: from the offset in `token` ("" for the start), at
/// most `max_entries` (0: all), and the token of the next page ("" at the end).
fn page<'a, T>(items: &'a [T], token: &str, max_entries: i32) -> Result<(&'a [T], String), Status> {
    let start: usize = match token {
        "" => 0,
        t => t.parse().map_err(|_| Status::aborted(format!("starting_token {t:?} is not one of ours")))?,
    };
    if start > items.len() {
        return Err(Status::aborted(format!("starting_token {start} is past the end")));
    }
    let max = match usize::try_from(max_entries) {
        Ok(0) => items.len(),
        Ok(n) => n,
        Err(_) => return Err(invalid("max_entries must not be negative").into()),
    };
    let end = start.saturating_add(max).min(items.len());
    let next = if end < items.len() { end.to_string() } else { String::new() };
    Ok((&items[start..end], next))
}

/// Decodes one capability: node-local volumes support the single-node modes.
fn capability(cap: &VolumeCapability) -> Result<AccessType> {
    let mode = cap.access_mode.as_ref().ok_or_else(|| invalid("volume capability needs an access_mode"))?;
    match AccessMode::try_from(mode.mode) {
        Ok(
            AccessMode::SingleNodeWriter | AccessMode::SingleNodeReaderOnly | AccessMode::SingleNodeSingleWriter | AccessMode::SingleNodeMultiWriter,
        ) => {}
        Ok(m) => return Err(invalid(format!("access mode {} is not supported: volumes are local to one node", m.as_str_name()))),
        Err(_) => return Err(invalid(format!("unknown access mode {}", mode.mode))),
    }
    match &cap.access_type {
        Some(CsiAccessType::Block(_)) => Ok(AccessType::Block),
        Some(CsiAccessType::Mount(MountVolume { fs_type, mount_flags, .. })) => {
            Ok(AccessType::Mount { fs: fs_type_of(fs_type)?, flags: mount_flags.clone() })
        }
        None => Err(invalid("volume capability needs an access_type (mount or block)")),
    }
}

/// A Kubernetes quantity of bytes as inline attributes carry it: an integer
/// with an optional binary (`Ki`…`Ei`) or decimal (`k`…`E`) suffix.
fn quantity(s: &str) -> Option<u64> {
    const UNITS: [(&str, u64); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    let (digits, mult) = UNITS.iter().find_map(|(u, m)| s.strip_suffix(u).map(|d| (d, *m))).unwrap_or((s, 1));
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

/// Whether a mount capability names a filesystem.
fn named_fs(access: &[AccessType]) -> bool {
    access.iter().any(|a| matches!(a, AccessType::Mount { fs: Some(_), .. }))
}

fn fs_type_of(s: &str) -> Result<Option<FsType>> {
    match s {
        "" => Ok(None),
        "ext4" => Ok(Some(FsType::Ext4)),
        "xfs" => Ok(Some(FsType::Xfs)),
        other => Err(invalid(format!("filesystem {other:?} is not supported (ext4, xfs)"))),
    }
}

fn capabilities(caps: &[VolumeCapability]) -> Result<Vec<AccessType>> {
    if caps.is_empty() {
        return Err(invalid("volume_capabilities are required"));
    }
    caps.iter().map(capability).collect()
}

/// The StorageClass parameters (or inline attributes) we know.
struct Params {
    kind: Kind,
    sandbox: Option<Sandbox>,
    encryption: Option<Encryption>,
    /// What to keep with the volume (all but the CO's own).
    kept: BTreeMap<String, String>,
}

/// Decodes the StorageClass parameters (or inline attributes) we know;
/// anything else is refused, except what the CO adds itself.
fn parameters(params: &HashMap<String, String>, extra: &[&str]) -> Result<Params> {
    let mut p = Params { kind: Kind::Block, sandbox: None, encryption: None, kept: BTreeMap::new() };
    for (k, v) in params {
        match k.as_str() {
            PARAM_KIND => p.kind = Kind::parse(v).ok_or_else(|| invalid(format!("parameter kind={v:?}: expected block, file or dir")))?,
            PARAM_SANDBOX => {
                p.sandbox = Some(Sandbox::parse(v).ok_or_else(|| invalid(format!("parameter {PARAM_SANDBOX}={v:?}: expected kata or runc")))?)
            }
            PARAM_ENCRYPTION => {
                p.encryption = Some(Encryption::parse(v).ok_or_else(|| invalid(format!("parameter {PARAM_ENCRYPTION}={v:?}: expected ephemeral")))?)
            }
            k if k.starts_with(CO_PREFIX) || extra.contains(&k) => {}
            k => return Err(invalid(format!("unknown parameter {k:?}"))),
        }
    }
    p.kept = params.iter().filter(|(k, _)| !k.starts_with(CO_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect();
    Ok(p)
}

/// NodePublishVolume's `volume_mount_group`: a numeric group id, if any.
fn mount_group(cap: &VolumeCapability) -> Result<Option<u32>> {
    let Some(CsiAccessType::Mount(m)) = &cap.access_type else { return Ok(None) };
    match m.volume_mount_group.as_str() {
        "" => Ok(None),
        g => g.parse().map(Some).map_err(|_| invalid(format!("volume_mount_group {g:?} is not a numeric group id"))),
    }
}

fn volume_message(v: &crate::state::Volume, topology: Topology) -> thinbox_proto::csi::v1::Volume {
    let mut context: HashMap<String, String> = v.parameters.clone().into_iter().collect();
    context.insert(PARAM_KIND.into(), v.kind.as_str().into());
    let content_source = v.source.as_ref().map(|s| VolumeContentSource {
        r#type: Some(match s {
            Source::Snapshot(id) => volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: id.clone() }),
            Source::Volume(id) => volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: id.clone() }),
        }),
    });
    thinbox_proto::csi::v1::Volume {
        capacity_bytes: i64::try_from(v.size.get()).unwrap_or(i64::MAX),
        volume_id: v.id.clone(),
        volume_context: context,
        content_source,
        accessible_topology: vec![topology],
    }
}

fn snapshot_message(s: &crate::state::Snapshot) -> Snapshot {
    Snapshot {
        size_bytes: i64::try_from(s.size.get()).unwrap_or(i64::MAX),
        snapshot_id: s.id.clone(),
        source_volume_id: s.source.clone(),
        creation_time: Some(prost_types::Timestamp { seconds: s.created.0, nanos: s.created.1 }),
        ready_to_use: true,
        group_snapshot_id: s.group.clone().unwrap_or_default(),
    }
}

fn group_message((g, members): &(crate::state::Group, Vec<crate::state::Snapshot>)) -> VolumeGroupSnapshot {
    VolumeGroupSnapshot {
        group_snapshot_id: g.id.clone(),
        snapshots: members.iter().map(snapshot_message).collect(),
        creation_time: Some(prost_types::Timestamp { seconds: g.created.0, nanos: g.created.1 }),
        ready_to_use: true,
    }
}

#[tonic::async_trait]
impl Identity for Csi {
    async fn get_plugin_info(&self, _: Request<GetPluginInfoRequest>) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(&self, _: Request<GetPluginCapabilitiesRequest>) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::service::Type;
        let service = |t: Type| PluginCapability { r#type: Some(plugin_capability::Type::Service(plugin_capability::Service { r#type: t as i32 })) };
        let online = PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(plugin_capability::VolumeExpansion {
                r#type: plugin_capability::volume_expansion::Type::Online as i32,
            })),
        };
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(Type::ControllerService),
                service(Type::GroupControllerService),
                service(Type::VolumeAccessibilityConstraints),
                online,
            ],
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        // Ready once the state is open and reconciled, which happens before serving.
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl Controller for Csi {
    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        paths::name(&r.name, "name")?;
        paths::map(&r.parameters, "parameters")?;
        let access = capabilities(&r.volume_capabilities)?;
        let source = match r.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
            None => None,
            Some(volume_content_source::Type::Snapshot(s)) => Some(Source::Snapshot(paths::object_id(&s.snapshot_id, "snapshot")?.to_owned())),
            Some(volume_content_source::Type::Volume(v)) => Some(Source::Volume(paths::volume_id(&v.volume_id)?.to_owned())),
        };
        if let Some(req) = &r.accessibility_requirements {
            let here = self.topology();
            let listed = req.requisite.iter().chain(&req.preferred).collect::<Vec<_>>();
            if !listed.is_empty() && !listed.iter().any(|t| t.segments.get(TOPOLOGY_KEY) == here.segments.get(TOPOLOGY_KEY)) {
                return Err(Status::resource_exhausted(format!("this driver provisions on node {} only", self.driver.node_id())));
            }
        }
        let Params { kind, sandbox, encryption, kept } = parameters(&r.parameters, &[])?;
        if encryption.is_some() && access.contains(&AccessType::Block) {
            return Err(invalid(format!("{PARAM_ENCRYPTION}: Kata's agent formats what it encrypts; raw block access is not possible")).into());
        }
        // A copy keeps its source's filesystem: only one named explicitly is checked against it.
        let fs = match (&source, kind) {
            // A directory has no filesystem of its own, nor a block device.
            (_, Kind::Dir) if access.contains(&AccessType::Block) => return Err(invalid("dir volumes have no block access").into()),
            (_, Kind::Dir) => None,
            (Some(_), _) => fs_for(&access, kind, FsType::Ext4)?.filter(|_| named_fs(&access)),
            (None, _) => fs_for(&access, kind, self.driver.config().default_fs)?,
        };
        let range = r.capacity_range.unwrap_or_default();
        let (required, limit) = (u64::try_from(range.required_bytes), u64::try_from(range.limit_bytes));
        let (Ok(required), Ok(limit)) = (required, limit) else {
            return Err(invalid("capacity_range must not be negative").into());
        };
        let create = CreateRequest { name: r.name, required, limit, kind, fs, sandbox, ephemeral: false, parameters: kept, source, encryption };
        let vol = self.run("create_volume", move |d| d.create(&create)).await?;
        Ok(Response::new(CreateVolumeResponse { volume: Some(volume_message(&vol, self.topology())) }))
    }

    async fn delete_volume(&self, req: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id is required").into());
        }
        // An id that cannot be ours is already deleted, as far as the CO is concerned.
        if paths::volume_id(&r.volume_id).is_err() {
            return Ok(Response::new(DeleteVolumeResponse {}));
        }
        self.run("delete_volume", move |d| d.delete(&r.volume_id)).await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        unimplemented("ControllerPublishVolume")
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        unimplemented("ControllerUnpublishVolume")
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        let id = paths::volume_id(&r.volume_id)?.to_owned();
        let vol = self.run("validate_volume_capabilities", move |d| d.volume(&id)).await?;
        let vol = vol
            .filter(|v| v.state == crate::state::State::Ready)
            .ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", r.volume_id)))?;
        let access = capabilities(&r.volume_capabilities)?;
        let ok = access.iter().all(|a| match a {
            AccessType::Block => vol.kind != Kind::Dir,
            AccessType::Mount { .. } if vol.kind == Kind::Dir => true,
            AccessType::Mount { fs, .. } => vol.fs.is_some() && fs.is_none_or(|f| Some(f) == vol.fs),
        });
        let confirmed = ok.then(|| validate_volume_capabilities_response::Confirmed {
            volume_context: r.volume_context,
            volume_capabilities: r.volume_capabilities,
            parameters: r.parameters,
            mutable_parameters: HashMap::new(),
        });
        let message = if ok { String::new() } else { "the volume cannot be used with these capabilities".into() };
        Ok(Response::new(ValidateVolumeCapabilitiesResponse { confirmed, message }))
    }

    async fn list_volumes(&self, req: Request<ListVolumesRequest>) -> Result<Response<ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let mut vols = self.run("list_volumes", |d| d.volumes()).await?;
        vols.retain(|v| !v.ephemeral);
        let (page, next_token) = page(&vols, &r.starting_token, r.max_entries)?;
        let entries = page.iter().map(|v| list_volumes_response::Entry { volume: Some(volume_message(v, self.topology())), status: None }).collect();
        Ok(Response::new(ListVolumesResponse { entries, next_token }))
    }

    async fn get_capacity(&self, req: Request<GetCapacityRequest>) -> Result<Response<GetCapacityResponse>, Status> {
        let r = req.into_inner();
        if let Some(t) = &r.accessible_topology
            && t.segments.get(TOPOLOGY_KEY).is_some_and(|n| n != self.driver.node_id())
        {
            return Ok(Response::new(GetCapacityResponse { available_capacity: 0, maximum_volume_size: None, minimum_volume_size: None }));
        }
        // Capabilities are optional here.
        let access = r.volume_capabilities.iter().map(capability).collect::<Result<Vec<_>>>()?;
        let Params { kind, encryption, .. } = parameters(&r.parameters, &[])?;
        let floor = match kind {
            Kind::Dir => crate::config::min_volume_size(None, None),
            _ => crate::config::min_volume_size(fs_for(&access, kind, self.driver.config().default_fs)?, encryption),
        };
        // A kind this node cannot serve (dir volumes without kernel quota support) has no room.
        let free = self
            .run("get_capacity", move |d| match d.capacity(kind) {
                Err(Error::FailedPrecondition(why)) => {
                    tracing::debug!(kind = kind.as_str(), why, "no capacity");
                    Ok(0)
                }
                other => other,
            })
            .await?;
        let free = i64::try_from(free).unwrap_or(i64::MAX);
        Ok(Response::new(GetCapacityResponse {
            available_capacity: free,
            maximum_volume_size: Some(free),
            minimum_volume_size: Some(i64::try_from(floor.get()).unwrap_or(0)),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::rpc::Type;
        let rpc = |t: Type| ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            // EXPAND_VOLUME is a node capability only: in a cluster a single
            // external-resizer serves every node, and its controller call could
            // land on a node that does not hold the volume. The node grows the
            // device and then the filesystem (ControllerExpandVolume still works
            // when called where the volume lives).
            capabilities: vec![
                rpc(Type::CreateDeleteVolume),
                rpc(Type::GetCapacity),
                rpc(Type::ListVolumes),
                rpc(Type::CreateDeleteSnapshot),
                rpc(Type::ListSnapshots),
                rpc(Type::GetSnapshot),
                rpc(Type::CloneVolume),
                rpc(Type::SingleNodeMultiWriter),
            ],
        }))
    }

    async fn create_snapshot(&self, req: Request<CreateSnapshotRequest>) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        paths::name(&r.name, "name")?;
        paths::map(&r.parameters, "parameters")?;
        if r.source_volume_id.is_empty() {
            return Err(invalid("source_volume_id is required").into());
        }
        let source = paths::volume_id(&r.source_volume_id)?.to_owned();
        if let Some((k, _)) = r.parameters.iter().find(|(k, _)| !k.starts_with(CO_PREFIX)) {
            return Err(invalid(format!("unknown snapshot parameter {k:?}")).into());
        }
        let snap = self.run("create_snapshot", move |d| d.create_snapshot(&r.name, &source)).await?;
        Ok(Response::new(CreateSnapshotResponse { snapshot: Some(snapshot_message(&snap)) }))
    }

    async fn delete_snapshot(&self, req: Request<DeleteSnapshotRequest>) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.snapshot_id.is_empty() {
            return Err(invalid("snapshot_id is required").into());
        }
        // An id that cannot be ours is already deleted, as far as the CO is concerned.
        if let Ok(id) = paths::object_id(&r.snapshot_id, "snapshot") {
            let id = id.to_owned();
            self.run("delete_snapshot", move |d| d.delete_snapshot(&id)).await?;
        }
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(&self, req: Request<ListSnapshotsRequest>) -> Result<Response<ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        let mut snaps = self.run("list_snapshots", |d| d.snapshots()).await?;
        snaps.retain(|s| (r.snapshot_id.is_empty() || s.id == r.snapshot_id) && (r.source_volume_id.is_empty() || s.source == r.source_volume_id));
        snaps.sort_by(|a, b| a.id.cmp(&b.id));
        let (page, next_token) = page(&snaps, &r.starting_token, r.max_entries)?;
        let entries = page.iter().map(|s| list_snapshots_response::Entry { snapshot: Some(snapshot_message(s)) }).collect();
        Ok(Response::new(ListSnapshotsResponse { entries, next_token }))
    }

    async fn get_snapshot(&self, req: Request<GetSnapshotRequest>) -> Result<Response<GetSnapshotResponse>, Status> {
        let r = req.into_inner();
        let id = paths::object_id(&r.snapshot_id, "snapshot")?.to_owned();
        let snap = self.run("get_snapshot", move |d| d.snapshot(&id)).await?;
        match snap.filter(|s| s.state == State::Ready) {
            Some(s) => Ok(Response::new(GetSnapshotResponse { snapshot: Some(snapshot_message(&s)) })),
            None => Err(Error::NotFound(format!("snapshot {:?} does not exist", r.snapshot_id)).into()),
        }
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = paths::volume_id(&r.volume_id)?.to_owned();
        let range = r.capacity_range.ok_or_else(|| invalid("capacity_range is required"))?;
        let (Ok(required), Ok(limit)) = (u64::try_from(range.required_bytes), u64::try_from(range.limit_bytes)) else {
            return Err(invalid("capacity_range must not be negative").into());
        };
        if let Some(cap) = &r.volume_capability {
            capability(cap)?;
        }
        let (size, node) = self.run("controller_expand_volume", move |d| d.expand(&id, required, limit)).await?;
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: i64::try_from(size.get()).unwrap_or(i64::MAX),
            node_expansion_required: node,
        }))
    }

    async fn controller_get_volume(&self, _: Request<ControllerGetVolumeRequest>) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        unimplemented("ControllerGetVolume")
    }

    async fn controller_modify_volume(&self, _: Request<ControllerModifyVolumeRequest>) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        unimplemented("ControllerModifyVolume")
    }
}

/// Group snapshots: every member cut at one instant of them all (see
/// [`crate::groups`] for how, per backend). A member a Kata guest holds is
/// crash-consistent: the guest's page cache is not flushed from the host.
#[tonic::async_trait]
impl GroupController for Csi {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<GroupControllerGetCapabilitiesResponse>, Status> {
        use group_controller_service_capability::rpc::Type;
        let rpc = |t: Type| GroupControllerServiceCapability {
            r#type: Some(group_controller_service_capability::Type::Rpc(group_controller_service_capability::Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(GroupControllerGetCapabilitiesResponse { capabilities: vec![rpc(Type::CreateDeleteGetVolumeGroupSnapshot)] }))
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<CreateVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        paths::name(&r.name, "name")?;
        paths::map(&r.parameters, "parameters")?;
        if let Some((k, _)) = r.parameters.iter().find(|(k, _)| !k.starts_with(CO_PREFIX)) {
            return Err(invalid(format!("unknown group snapshot parameter {k:?}")).into());
        }
        let sources = r.source_volume_ids.iter().map(|id| paths::volume_id(id).map(str::to_owned)).collect::<Result<Vec<_>>>()?;
        let made = self.run("create_volume_group_snapshot", move |d| d.create_group_snapshot(&r.name, &sources)).await?;
        Ok(Response::new(CreateVolumeGroupSnapshotResponse { group_snapshot: Some(group_message(&made)) }))
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.group_snapshot_id.is_empty() {
            return Err(invalid("group_snapshot_id is required").into());
        }
        // An id that cannot be ours is already deleted, as far as the CO is concerned.
        if let Ok(id) = paths::object_id(&r.group_snapshot_id, "group snapshot") {
            let id = id.to_owned();
            // Only compared with the members' ids, never used as paths.
            self.run("delete_volume_group_snapshot", move |d| d.delete_group_snapshot(&id, &r.snapshot_ids)).await?;
        }
        Ok(Response::new(DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<GetVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        let id = paths::object_id(&r.group_snapshot_id, "group snapshot")?.to_owned();
        let group = self.run("get_volume_group_snapshot", move |d| d.get_group_snapshot(&id, &r.snapshot_ids)).await?;
        Ok(Response::new(GetVolumeGroupSnapshotResponse { group_snapshot: Some(group_message(&group)) }))
    }
}

/// The filesystem to make: the one a mount capability names, else `default`
/// if any capability mounts or the volume is a block store device (which
/// always gets one; harmless for raw use); none for raw-block-only files.
fn fs_for(access: &[AccessType], kind: Kind, default: FsType) -> Result<Option<FsType>> {
    let mut named = None;
    let mut mounts = false;
    for a in access {
        if let AccessType::Mount { fs, .. } = a {
            mounts = true;
            if let Some(f) = fs {
                if named.is_some_and(|n| n != *f) {
                    return Err(invalid("capabilities ask for different filesystems"));
                }
                named = Some(*f);
            }
        }
    }
    Ok(named.or_else(|| (mounts || kind == Kind::Block).then_some(default)))
}

#[tonic::async_trait]
impl Node for Csi {
    async fn node_stage_volume(&self, _: Request<NodeStageVolumeRequest>) -> Result<Response<NodeStageVolumeResponse>, Status> {
        unimplemented("NodeStageVolume")
    }

    async fn node_unstage_volume(&self, _: Request<NodeUnstageVolumeRequest>) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        unimplemented("NodeUnstageVolume")
    }

    async fn node_publish_volume(&self, req: Request<NodePublishVolumeRequest>) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        if id.is_empty() {
            return Err(invalid("volume_id is required").into());
        }
        let cap = r.volume_capability.as_ref().ok_or_else(|| invalid("volume_capability is required"))?;
        let access = capability(cap)?;
        let group = mount_group(cap)?;
        let kubelet = self.driver.config().kubelet_dir.clone();
        let target = paths::target(&r.target_path, "target_path", &kubelet)?;
        let readonly =
            r.readonly || matches!(AccessMode::try_from(cap.access_mode.as_ref().map_or(0, |m| m.mode)), Ok(AccessMode::SingleNodeReaderOnly));
        paths::map(&r.volume_context, "volume_context")?;
        if r.volume_context.get(EPHEMERAL).is_some_and(|v| v == "true") {
            paths::name(&id, "volume_id")?;
            let ctx = &r.volume_context;
            let Params { sandbox, encryption, kept, .. } = parameters(ctx, &["size", "fsType"])?;
            let size = match ctx.get("size") {
                Some(s) => quantity(s).ok_or_else(|| invalid(format!("attribute size={s:?} is not a Kubernetes quantity of bytes (e.g. 1Gi)")))?,
                None => 0,
            };
            let fs = match (ctx.get("fsType"), &access) {
                (Some(f), _) => fs_type_of(f)?,
                (None, AccessType::Mount { fs, .. }) => fs.or(Some(self.driver.config().default_fs)),
                (None, AccessType::Block) => None,
            };
            let create = CreateRequest {
                name: id.clone(),
                required: size,
                limit: 0,
                kind: Kind::File,
                fs,
                sandbox,
                ephemeral: true,
                parameters: kept,
                source: None,
                encryption,
            };
            self.run("node_publish_volume", move |d| d.publish_ephemeral(&id, &target, create, &access, readonly, group)).await?;
            return Ok(Response::new(NodePublishVolumeResponse {}));
        }
        paths::volume_id(&id)?;
        let sandbox = match r.volume_context.get(PARAM_SANDBOX) {
            Some(s) => Some(Sandbox::parse(s).ok_or_else(|| invalid(format!("{PARAM_SANDBOX}={s:?}: expected kata or runc")))?),
            None => None,
        };
        self.run("node_publish_volume", move |d| d.publish(&id, &target, &access, readonly, sandbox, group)).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(&self, req: Request<NodeUnpublishVolumeRequest>) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        paths::volume_id(&r.volume_id)?;
        let kubelet = self.driver.config().kubelet_dir.clone();
        let target = match paths::target(&r.target_path, "target_path", &kubelet) {
            Ok(t) => t,
            // Already gone with its parent: nothing left to undo.
            Err(Error::NotFound(_)) => return Ok(Response::new(NodeUnpublishVolumeResponse {})),
            Err(e) => return Err(e.into()),
        };
        let handle = r.volume_id;
        self.run("node_unpublish_volume", move |d| {
            let id = d.resolve(&handle)?.map_or(handle, |v| v.id);
            d.unpublish(&id, &target)
        })
        .await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(&self, req: Request<NodeGetVolumeStatsRequest>) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let handle = paths::volume_id(&r.volume_id)?.to_owned();
        if r.volume_path.is_empty() {
            return Err(invalid("volume_path is required").into());
        }
        let path = Path::new(&r.volume_path).to_owned();
        let st = self
            .run("node_get_volume_stats", move |d| {
                let vol = d.resolve(&handle)?.ok_or_else(|| Error::NotFound(format!("volume {handle:?} does not exist")))?;
                d.stats(&vol.id, &path)
            })
            .await?;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut usage =
            vec![VolumeUsage { available: n(st.available), total: n(st.total), used: n(st.used), unit: volume_usage::Unit::Bytes as i32 }];
        if let Some((total, used, free)) = st.inodes {
            usage.push(VolumeUsage { available: n(free), total: n(total), used: n(used), unit: volume_usage::Unit::Inodes as i32 });
        }
        let volume_condition = Some(VolumeCondition { abnormal: st.condition.abnormal, message: st.condition.message });
        Ok(Response::new(NodeGetVolumeStatsResponse { usage, volume_condition }))
    }

    async fn node_expand_volume(&self, req: Request<NodeExpandVolumeRequest>) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = paths::volume_id(&r.volume_id)?.to_owned();
        if r.volume_path.is_empty() {
            return Err(invalid("volume_path is required").into());
        }
        if let Some(cap) = &r.volume_capability {
            capability(cap)?;
        }
        let range = r.capacity_range.unwrap_or_default();
        let (Ok(required), Ok(limit)) = (u64::try_from(range.required_bytes), u64::try_from(range.limit_bytes)) else {
            return Err(invalid("capacity_range must not be negative").into());
        };
        let path = Path::new(&r.volume_path).to_owned();
        let size = self.run("node_expand_volume", move |d| d.expand_on_node(&id, &path, required, limit)).await?;
        Ok(Response::new(NodeExpandVolumeResponse { capacity_bytes: i64::try_from(size.get()).unwrap_or(i64::MAX) }))
    }

    async fn node_get_capabilities(&self, _: Request<NodeGetCapabilitiesRequest>) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::rpc::Type;
        let rpc =
            |t: Type| NodeServiceCapability { r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc { r#type: t as i32 })) };
        let capabilities = vec![
            rpc(Type::GetVolumeStats),
            rpc(Type::ExpandVolume),
            rpc(Type::VolumeCondition),
            rpc(Type::SingleNodeMultiWriter),
            rpc(Type::VolumeMountGroup),
        ];
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        // The node's topology is its volumes' (the node key) plus whether it
        // can run VM sandboxes with KVM, so StorageClasses and pods can
        // select such nodes. Kubelet asks once, at registration: the probe
        // (a few ioctls on /dev/kvm and an empty VM) runs here, off the runtime.
        let kvm = tokio::task::spawn_blocking(thinbox_block_passthrough::probe::kvm).await.map_err(Error::from)?;
        match &kvm.reason {
            None => tracing::info!(api_version = ?kvm.api_version, max_vcpus = ?kvm.max_vcpus, "KVM usable"),
            Some(reason) => tracing::info!(reason, "KVM not usable"),
        }
        let mut topology = self.topology();
        topology.segments.insert(KVM_TOPOLOGY_KEY.to_owned(), kvm.usable.to_string());
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.driver.node_id().to_owned(),
            max_volumes_per_node: 0,
            accessible_topology: Some(topology),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn pages() {
        let items = [1, 2, 3, 4, 5];
        assert_eq!(page(&items, "", 0).unwrap(), (&items[..], String::new()));
        assert_eq!(page(&items, "", 2).unwrap(), (&items[..2], "2".into()));
        assert_eq!(page(&items, "4", 2).unwrap(), (&items[4..], String::new()));
        assert_eq!(page(&items, "x", 0).unwrap_err().code(), tonic::Code::Aborted);
        assert_eq!(page(&items, "6", 0).unwrap_err().code(), tonic::Code::Aborted);
        assert_eq!(page(&items, "", -1).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity("1Gi"), Some(1 << 30));
        assert_eq!(quantity("400Mi"), Some(400 << 20));
        assert_eq!(quantity("500M"), Some(500_000_000));
        assert_eq!(quantity("1048576"), Some(1 << 20));
        for bad in ["", "Gi", "1.5Gi", "-1", "1GB", "lots", "99999999999Ei"] {
            assert_eq!(quantity(bad), None, "{bad}");
        }
    }
}
