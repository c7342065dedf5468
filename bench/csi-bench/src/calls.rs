//! CSI call latency: one volume's life (create, publish on the host, snapshot,
//! unpublish, delete the snapshot, delete the volume) per round and target,
//! targets taking turns within each round, with a ledger so that whatever a
//! failed or interrupted round made is undone.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thinbox_proto::csi_v1::controller_client::ControllerClient;
use thinbox_proto::csi_v1::node_client::NodeClient;
use thinbox_proto::csi_v1::volume_capability::access_mode::Mode;
use thinbox_proto::csi_v1::volume_capability::{AccessMode, AccessType, MountVolume};
use thinbox_proto::csi_v1::{
    CapacityRange, CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeRequest, NodePublishVolumeRequest,
    NodeUnpublishVolumeRequest, VolumeCapability,
};
use tonic::transport::Channel;

use crate::Error;

/// The calls measured, in the order a round makes them.
pub const OPS: [&str; 6] = ["CreateVolume", "NodePublishVolume", "CreateSnapshot", "NodeUnpublishVolume", "DeleteSnapshot", "DeleteVolume"];

/// One CSI service, from `NAME=SOCKET,kubelet=DIR`: `DIR` is the kubelet
/// directory the driver is configured with (target paths must lie in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetSpec {
    /// Label in the report.
    pub name: String,
    /// The CSI socket.
    pub socket: PathBuf,
    /// The driver's kubelet directory.
    pub kubelet: PathBuf,
}

impl TargetSpec {
    /// The error of call `op` about `what` on this target, for `map_err`.
    pub(crate) fn rpc(&self, op: &str, what: &str) -> impl FnOnce(tonic::Status) -> Error + use<> {
        let what = format!("{}: {op} {what}", self.name);
        move |status| Error::Rpc { what, status: Box::new(status) }
    }
}

impl FromStr for TargetSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape = || format!("expected NAME=SOCKET,kubelet=DIR, got {s:?}");
        let (head, option) = s.split_once(',').ok_or_else(shape)?;
        let (name, socket) = head.split_once('=').ok_or_else(shape)?;
        let kubelet = option.strip_prefix("kubelet=").ok_or_else(shape)?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            return Err(format!("target name {name:?} must be non-empty and use only [A-Za-z0-9._-]"));
        }
        if socket.is_empty() || !kubelet.starts_with('/') {
            return Err(shape());
        }
        Ok(TargetSpec { name: name.to_owned(), socket: socket.into(), kubelet: kubelet.into() })
    }
}

/// A filesystem (ext4) single-node-writer capability, as a runC pod's PVC asks.
pub fn mount_capability() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume { fs_type: "ext4".into(), mount_flags: vec![], volume_mount_group: String::new() })),
    }
}

/// CreateVolume of a `block` volume (ext4) of `bytes`, as every step of the bench makes them.
pub fn block_volume_request(name: &str, bytes: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![mount_capability()],
        parameters: HashMap::from([("kind".to_owned(), "block".to_owned())]),
        ..Default::default()
    }
}

/// What a round made and has not undone yet.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Made {
    Volume(String),
    Published { volume: String, target: PathBuf },
    Snapshot(String),
}

/// A connected CSI service.
#[derive(Debug)]
pub struct Target {
    /// What was asked for.
    pub spec: TargetSpec,
    ctl: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    made: Vec<Made>,
}

/// Latencies of one round on one target, ms, in [`OPS`] order.
pub type RoundTimes = [f64; 6];

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Target {
    /// Connects; `timeout` bounds connecting and every request.
    pub async fn connect(spec: TargetSpec, timeout: Duration) -> Result<Target, Error> {
        let channel = thinbox_proto::unix_channel(&spec.socket, timeout)
            .await
            .map_err(|source| Error::Connect { socket: spec.socket.clone(), source: Box::new(source) })?;
        Ok(Target { spec, ctl: ControllerClient::new(channel.clone()), node: NodeClient::new(channel), made: Vec::new() })
    }

    fn rpc(&self, op: &str, what: &str) -> impl FnOnce(tonic::Status) -> Error + use<> {
        self.spec.rpc(op, what)
    }

    /// The pod directory of volume `name`, which kubelet would make.
    fn pod_dir(&self, name: &str) -> PathBuf {
        self.spec.kubelet.join("pods").join(name)
    }

    /// One volume's life, each call timed.
    pub async fn round(&mut self, name: &str, bytes: i64) -> Result<RoundTimes, Error> {
        let mut t = [0.0; 6];
        let start = Instant::now();
        let res = self.ctl.create_volume(block_volume_request(name, bytes)).await;
        t[0] = ms(start.elapsed());
        let volume = res
            .map_err(self.rpc("CreateVolume", name))?
            .into_inner()
            .volume
            .ok_or_else(|| Error::Parse(format!("{}: CreateVolume {name} returned no volume", self.spec.name)))?;
        let id = volume.volume_id.clone();
        self.made.push(Made::Volume(id.clone()));

        let parent = self.pod_dir(name).join("volumes/kubernetes.io~csi/vol");
        std::fs::create_dir_all(&parent).map_err(|source| Error::Io { what: format!("creating {}", parent.display()), source })?;
        let target = parent.join("mount");
        let publish = NodePublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_capability()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        };
        self.made.push(Made::Published { volume: id.clone(), target: target.clone() });
        let start = Instant::now();
        let res = self.node.node_publish_volume(publish).await;
        t[1] = ms(start.elapsed());
        res.map_err(self.rpc("NodePublishVolume", &id))?;

        let snap_name = format!("{name}-snap");
        let start = Instant::now();
        let res =
            self.ctl.create_snapshot(CreateSnapshotRequest { source_volume_id: id.clone(), name: snap_name.clone(), ..Default::default() }).await;
        t[2] = ms(start.elapsed());
        let snapshot = res
            .map_err(self.rpc("CreateSnapshot", &snap_name))?
            .into_inner()
            .snapshot
            .ok_or_else(|| Error::Parse(format!("{}: CreateSnapshot {snap_name} returned no snapshot", self.spec.name)))?;
        self.made.push(Made::Snapshot(snapshot.snapshot_id.clone()));

        t[3] = self.unpublish(&id, &target).await?;
        t[4] = self.delete_snapshot(&snapshot.snapshot_id).await?;
        t[5] = self.delete_volume(&id).await?;
        let _ = std::fs::remove_dir_all(self.pod_dir(name));
        Ok(t)
    }

    async fn unpublish(&mut self, volume: &str, target: &Path) -> Result<f64, Error> {
        let req = NodeUnpublishVolumeRequest { volume_id: volume.to_owned(), target_path: target.display().to_string() };
        let start = Instant::now();
        let res = self.node.node_unpublish_volume(req).await;
        let took = ms(start.elapsed());
        res.map_err(self.rpc("NodeUnpublishVolume", volume))?;
        self.made.retain(|m| !matches!(m, Made::Published { target: t, .. } if t == target));
        Ok(took)
    }

    async fn delete_snapshot(&mut self, id: &str) -> Result<f64, Error> {
        let start = Instant::now();
        let res = self.ctl.delete_snapshot(DeleteSnapshotRequest { snapshot_id: id.to_owned(), ..Default::default() }).await;
        let took = ms(start.elapsed());
        res.map_err(self.rpc("DeleteSnapshot", id))?;
        self.made.retain(|m| *m != Made::Snapshot(id.to_owned()));
        Ok(took)
    }

    async fn delete_volume(&mut self, id: &str) -> Result<f64, Error> {
        let start = Instant::now();
        let res = self.ctl.delete_volume(DeleteVolumeRequest { volume_id: id.to_owned(), ..Default::default() }).await;
        let took = ms(start.elapsed());
        res.map_err(self.rpc("DeleteVolume", id))?;
        self.made.retain(|m| *m != Made::Volume(id.to_owned()));
        Ok(took)
    }

    /// Undoes what the rounds left, newest first (publications, then
    /// snapshots, then volumes); returns what could not be undone.
    pub async fn cleanup(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        let mut made = std::mem::take(&mut self.made);
        made.sort_by_key(|m| match m {
            Made::Published { .. } => 0,
            Made::Snapshot(_) => 1,
            Made::Volume(_) => 2,
        });
        for m in made {
            let res = match &m {
                Made::Published { volume, target } => self.unpublish(volume, target).await,
                Made::Snapshot(id) => self.delete_snapshot(id).await,
                Made::Volume(id) => self.delete_volume(id).await,
            };
            if let Err(e) = res {
                failed.push(format!("{m:?}: {e}"));
            }
        }
        let _ = std::fs::remove_dir_all(self.spec.kubelet.join("pods"));
        self.made.clear();
        failed
    }
}

/// Every latency of a run, ms: target name → op → samples in round order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallTimes {
    /// Targets in command-line order; the first is the baseline.
    pub targets: Vec<TargetSpec>,
    /// Measured rounds per target.
    pub rounds: usize,
    /// Unmeasured rounds per target before them.
    pub warmup: usize,
    /// Pause after each target's turn, ms.
    pub pause_ms: u64,
    /// Volume size, bytes.
    pub volume_bytes: u64,
    /// The samples.
    pub samples: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
}

impl CallTimes {
    /// Records one round of one target.
    pub fn push(&mut self, target: &str, times: &RoundTimes) {
        let per_op = self.samples.entry(target.to_owned()).or_default();
        for (op, v) in OPS.iter().zip(times) {
            per_op.entry((*op).to_owned()).or_default().push(*v);
        }
    }
}

/// Which target goes first in `round`: the order turns around every round,
/// so that neither always runs right after the other's pause.
pub fn turn_order(targets: usize, round: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..targets).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_specs() {
        let t: TargetSpec = "old=/tmp/w/csi.sock,kubelet=/tmp/w/kubelet".parse().expect("parses");
        assert_eq!(t, TargetSpec { name: "old".into(), socket: "/tmp/w/csi.sock".into(), kubelet: "/tmp/w/kubelet".into() });
        for bad in ["old=/s", "old=/s,kubelet=rel", "=/s,kubelet=/k", "old=,kubelet=/k", "o d=/s,kubelet=/k", "old=/s,admin=/k"] {
            assert!(bad.parse::<TargetSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn turns_alternate() {
        assert_eq!(turn_order(2, 0), vec![0, 1]);
        assert_eq!(turn_order(2, 1), vec![1, 0]);
        assert_eq!(turn_order(2, 2), vec![0, 1]);
    }

    #[test]
    fn samples_by_op() {
        let mut c = CallTimes::default();
        c.push("new", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        c.push("new", &[1.5, 2.0, 3.0, 4.0, 5.0, 6.5]);
        assert_eq!(c.samples["new"]["CreateVolume"], vec![1.0, 1.5]);
        assert_eq!(c.samples["new"]["DeleteVolume"], vec![6.0, 6.5]);
    }
}
