//! Group snapshot latency: CreateVolumeGroupSnapshot (and its delete) of N
//! published volumes, next to N CreateSnapshot calls one after another (what a
//! CO without group snapshots does, at N instants), for each N in turn, on
//! one CSI socket. Every volume is mounted on the host with a file in it, so
//! reflink pools freeze each member and dm-thin pools suspend each origin.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use thinbox_bench_stats::{format_ratio, format_value, summarize};
use thinbox_proto::csi_v1::controller_client::ControllerClient;
use thinbox_proto::csi_v1::group_controller_client::GroupControllerClient;
use thinbox_proto::csi_v1::node_client::NodeClient;
use thinbox_proto::csi_v1::{
    CreateSnapshotRequest, CreateVolumeGroupSnapshotRequest, DeleteSnapshotRequest, DeleteVolumeGroupSnapshotRequest, DeleteVolumeRequest,
    NodePublishVolumeRequest, NodeUnpublishVolumeRequest,
};
use tonic::transport::Channel;

use crate::Error;
use crate::calls::{TargetSpec, block_volume_request, mount_capability, ms};

/// What one run measures.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Group sizes, each measured every round.
    pub sizes: Vec<usize>,
    /// Measured rounds.
    pub rounds: usize,
    /// Unmeasured rounds first.
    pub warmup: usize,
    /// Bytes of each volume.
    pub volume_bytes: i64,
    /// Idle time before each timed step, so that the daemon's background
    /// deletion of the previous step's devices is not timed with it.
    pub pause: Duration,
}

/// Samples of one group size, ms, in round order.
#[derive(Debug, Clone, Default)]
struct Samples {
    group_create: Vec<f64>,
    group_delete: Vec<f64>,
    singles: Vec<f64>,
}

/// One CSI socket and what this run made on it (undone at the end, whatever happened).
struct Bench {
    spec: TargetSpec,
    ctl: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    group: GroupControllerClient<Channel>,
    volumes: Vec<String>,
    published: Vec<(String, PathBuf)>,
    groups: Vec<String>,
    snapshots: Vec<String>,
}

impl Bench {
    fn rpc(&self, op: &str, what: &str) -> impl FnOnce(tonic::Status) -> Error + use<> {
        self.spec.rpc(op, what)
    }

    /// A block volume, mounted where kubelet would ask, with a file in it.
    async fn volume(&mut self, name: &str, bytes: i64) -> Result<String, Error> {
        let vol = self.ctl.create_volume(block_volume_request(name, bytes)).await.map_err(self.rpc("CreateVolume", name))?.into_inner().volume;
        let vol = vol.ok_or_else(|| Error::Parse(format!("{}: CreateVolume {name} returned no volume", self.spec.name)))?;
        self.volumes.push(vol.volume_id.clone());
        let parent = self.spec.kubelet.join("pods").join(name).join("volumes/kubernetes.io~csi/vol");
        std::fs::create_dir_all(&parent).map_err(|source| Error::Io { what: format!("creating {}", parent.display()), source })?;
        let target = parent.join("mount");
        let publish = NodePublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_capability()),
            volume_context: vol.volume_context,
            ..Default::default()
        };
        self.published.push((vol.volume_id.clone(), target.clone()));
        self.node.node_publish_volume(publish).await.map_err(self.rpc("NodePublishVolume", &vol.volume_id))?;
        let file = target.join("data");
        std::fs::write(&file, name).map_err(|source| Error::Io { what: format!("writing {}", file.display()), source })?;
        Ok(vol.volume_id)
    }

    /// One round for `ids`: the group's create and delete, then one snapshot
    /// of each volume in turn (their deletes untimed).
    async fn round(&mut self, name: &str, ids: &[String], pause: Duration, into: &mut Samples) -> Result<(), Error> {
        tokio::time::sleep(pause).await;
        let req = CreateVolumeGroupSnapshotRequest { name: name.to_owned(), source_volume_ids: ids.to_vec(), ..Default::default() };
        let start = Instant::now();
        let made = self.group.create_volume_group_snapshot(req).await;
        into.group_create.push(ms(start.elapsed()));
        let made = made.map_err(self.rpc("CreateVolumeGroupSnapshot", name))?.into_inner().group_snapshot;
        let id = made.ok_or_else(|| Error::Parse(format!("{}: {name} returned no group snapshot", self.spec.name)))?.group_snapshot_id;
        self.groups.push(id.clone());
        let start = Instant::now();
        self.delete_group(&id).await?;
        into.group_delete.push(ms(start.elapsed()));

        tokio::time::sleep(pause).await;
        let start = Instant::now();
        for (i, source) in ids.iter().enumerate() {
            let snap = format!("{name}-{i}");
            let req = CreateSnapshotRequest { source_volume_id: source.clone(), name: snap.clone(), ..Default::default() };
            let made = self.ctl.create_snapshot(req).await.map_err(self.rpc("CreateSnapshot", &snap))?.into_inner().snapshot;
            let made = made.ok_or_else(|| Error::Parse(format!("{}: {snap} returned no snapshot", self.spec.name)))?;
            self.snapshots.push(made.snapshot_id);
        }
        into.singles.push(ms(start.elapsed()));
        for id in self.snapshots.clone() {
            self.delete_snapshot(&id).await?;
        }
        Ok(())
    }

    async fn delete_group(&mut self, id: &str) -> Result<(), Error> {
        let req = DeleteVolumeGroupSnapshotRequest { group_snapshot_id: id.to_owned(), ..Default::default() };
        self.group.delete_volume_group_snapshot(req).await.map_err(self.rpc("DeleteVolumeGroupSnapshot", id))?;
        self.groups.retain(|g| g != id);
        Ok(())
    }

    async fn delete_snapshot(&mut self, id: &str) -> Result<(), Error> {
        let req = DeleteSnapshotRequest { snapshot_id: id.to_owned(), ..Default::default() };
        self.ctl.delete_snapshot(req).await.map_err(self.rpc("DeleteSnapshot", id))?;
        self.snapshots.retain(|s| s != id);
        Ok(())
    }

    /// Undoes what the run left: groups and snapshots, publications, then
    /// volumes; returns what could not be undone.
    async fn cleanup(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        for id in self.groups.clone() {
            left.extend(self.delete_group(&id).await.err().map(|e| e.to_string()));
        }
        for id in self.snapshots.clone() {
            left.extend(self.delete_snapshot(&id).await.err().map(|e| e.to_string()));
        }
        for (volume, target) in std::mem::take(&mut self.published) {
            let req = NodeUnpublishVolumeRequest { volume_id: volume.clone(), target_path: target.display().to_string() };
            left.extend(self.node.node_unpublish_volume(req).await.err().map(|s| format!("NodeUnpublishVolume {volume}: {}", s.message())));
        }
        for volume in std::mem::take(&mut self.volumes) {
            let req = DeleteVolumeRequest { volume_id: volume.clone(), ..Default::default() };
            left.extend(self.ctl.delete_volume(req).await.err().map(|s| format!("DeleteVolume {volume}: {}", s.message())));
        }
        let _ = std::fs::remove_dir_all(self.spec.kubelet.join("pods"));
        left
    }
}

/// Runs the plan on `spec` and returns the Markdown table; whatever it made
/// is undone, also after a failure.
pub async fn run(spec: TargetSpec, plan: &Plan, timeout: Duration, run_id: &str) -> Result<String, Error> {
    let most = plan.sizes.iter().copied().max().filter(|&n| n > 0).ok_or_else(|| Error::Config("--sizes must name group sizes above 0".into()))?;
    if plan.rounds == 0 {
        return Err(Error::Config("--rounds must be at least 1".into()));
    }
    let channel = thinbox_proto::unix_channel(&spec.socket, timeout)
        .await
        .map_err(|source| Error::Connect { socket: spec.socket.clone(), source: Box::new(source) })?;
    let mut bench = Bench {
        spec,
        ctl: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel.clone()),
        group: GroupControllerClient::new(channel),
        volumes: Vec::new(),
        published: Vec::new(),
        groups: Vec::new(),
        snapshots: Vec::new(),
    };
    let mut samples: BTreeMap<usize, Samples> = BTreeMap::new();
    let measured = async {
        let mut ids = Vec::new();
        for i in 0..most {
            ids.push(bench.volume(&format!("{run_id}-v{i}"), plan.volume_bytes).await?);
        }
        for round in 0..plan.warmup + plan.rounds {
            for &n in &plan.sizes {
                let mut into = Samples::default();
                bench.round(&format!("{run_id}-n{n}-r{round}"), &ids[..n], plan.pause, &mut into).await?;
                if round >= plan.warmup {
                    let s = samples.entry(n).or_default();
                    s.group_create.extend(into.group_create);
                    s.group_delete.extend(into.group_delete);
                    s.singles.extend(into.singles);
                }
            }
            if round >= plan.warmup {
                tracing::info!(round = round - plan.warmup + 1, of = plan.rounds, "round done");
            }
        }
        Ok::<(), Error>(())
    };
    let stop = crate::shutdown_signal()?;
    let outcome = tokio::select! {
        r = measured => r,
        _ = stop => Err(Error::Interrupted),
    };
    let left = bench.cleanup().await;
    match (outcome, left.is_empty()) {
        (Ok(()), true) => Ok(render(&bench.spec.name, plan, &samples)),
        (Ok(()), false) => Err(Error::LeftBehind { error: Box::new(Error::Parse("cleanup after the rounds".into())), left }),
        (Err(e), true) => Err(e),
        (Err(e), false) => Err(Error::LeftBehind { error: Box::new(e), left }),
    }
}

fn render(name: &str, plan: &Plan, samples: &BTreeMap<usize, Samples>) -> String {
    let mut out = format!(
        "Group snapshots on {name}: {} rounds after {} unmeasured, {} MiB block volumes (ext4, mounted), {} ms idle before each timed step; ms\n\n\
         | volumes | CreateVolumeGroupSnapshot median / p90 | DeleteVolumeGroupSnapshot median | N × CreateSnapshot median / p90 | group / N singles |\n\
         |---|---|---|---|---|\n",
        plan.rounds,
        plan.warmup,
        plan.volume_bytes >> 20,
        plan.pause.as_millis()
    );
    for (n, s) in samples {
        let (Some(c), Some(d), Some(one)) = (summarize(&s.group_create), summarize(&s.group_delete), summarize(&s.singles)) else { continue };
        out.push_str(&format!(
            "| {n} | {} / {} | {} | {} / {} | {} |\n",
            format_value(c.median),
            format_value(c.p90),
            format_value(d.median),
            format_value(one.median),
            format_value(one.p90),
            format_ratio(c.median, one.median)
        ));
    }
    out
}
