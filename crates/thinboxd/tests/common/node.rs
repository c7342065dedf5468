//! Harness of the tests that drive thinboxd with both doors on one pool, as a
//! node runs it: the snapshot socket (containerd's snapshots and the admin
//! service) and the CSI socket, with its own kubelet and Kata directories;
//! every path under the test's directory, `release_on_exit` set. Needs root.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use thinbox_proto::admin::PoolStatusRequest;
use thinbox_proto::admin::admin_client::AdminClient;
use thinbox_proto::csi::v1::controller_client::ControllerClient;
use thinbox_proto::csi::v1::identity_client::IdentityClient;
use thinbox_proto::csi::v1::node_client::NodeClient;
use thinbox_proto::csi::v1::volume_capability::access_mode::Mode;
use thinbox_proto::csi::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use thinbox_proto::csi::v1::{
    CapacityRange, CreateVolumeRequest, GetCapacityRequest, ListVolumesRequest, NodePublishVolumeRequest, NodeUnpublishVolumeRequest, ProbeRequest,
    VolumeCapability,
};
use thinbox_proto::snapshots::snapshots_client::SnapshotsClient;
use thinbox_proto::snapshots::{Kind, ListSnapshotsRequest, PrepareSnapshotRequest};
use tonic::transport::Channel;

/// thinboxd with both doors on one pool, every path under `dir`.
pub struct Node {
    pub dir: PathBuf,
    child: Option<Child>,
    pub snap: SnapshotsClient<Channel>,
    pub ctl: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl Node {
    /// Starts thinboxd on `dir/state` with `pool` as its `[pool]` section's
    /// body, its log in `dir/thinboxd.log`; returns once both doors answer.
    pub async fn start(dir: &Path, pool: &str) -> Node {
        let (kubelet, direct) = (dir.join("kubelet"), dir.join("direct-volumes"));
        std::fs::create_dir_all(kubelet.join("pods")).unwrap();
        let cfg = dir.join("thinboxd.toml");
        std::fs::write(
            &cfg,
            format!(
                "release_on_exit = true\n[pool]\n{pool}\n[snapshot]\naddress = \"{}\"\n[csi]\nendpoint = \"unix://{}\"\nnode_id = \"n1\"\nkubelet_dir = \"{}\"\ndirect_volumes = \"{}\"\n",
                dir.join("snap.sock").display(),
                dir.join("csi.sock").display(),
                kubelet.display(),
                direct.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("thinboxd.log")).unwrap();
        let mut child =
            super::thinboxd().arg("--root").arg(dir.join("state")).arg("--config").arg(&cfg).stdin(Stdio::null()).stderr(log).spawn().unwrap();
        let snapshots = |channel| async move { AdminClient::new(channel).pool_status(PoolStatusRequest {}).await.is_ok() };
        let csi =
            |channel| async move { IdentityClient::new(channel).probe(ProbeRequest {}).await.is_ok_and(|r| r.into_inner().ready == Some(true)) };
        let served = match super::until_served(&mut child, &dir.join("snap.sock"), snapshots).await {
            Ok(()) => super::until_served(&mut child, &dir.join("csi.sock"), csi).await,
            Err(e) => Err(e),
        };
        if let Err(e) = served {
            let _ = child.kill();
            let _ = child.wait();
            super::volumes::cleanup(dir);
            panic!("{e}: {}", std::fs::read_to_string(dir.join("thinboxd.log")).unwrap_or_default());
        }
        if let Ok(want) = std::env::var("THINBOX_TEST_BACKEND") {
            assert_eq!(thinbox_blockstore::inventory(&dir.join("state"), &Default::default()).unwrap().backend, want, "THINBOX_TEST_BACKEND");
        }
        let chan = |s: &str| thinbox_proto::unix_channel(dir.join(s), Duration::from_secs(120));
        let csi = chan("csi.sock").await.unwrap();
        Node {
            dir: dir.to_owned(),
            child: Some(child),
            snap: SnapshotsClient::new(chan("snap.sock").await.unwrap()),
            ctl: ControllerClient::new(csi.clone()),
            node: NodeClient::new(csi),
        }
    }

    /// The snapshot socket (where `thinboxctl --address` points).
    pub fn snap_socket(&self) -> PathBuf {
        self.dir.join("snap.sock")
    }

    /// What CSI says a new block volume can get.
    pub async fn capacity(&mut self) -> u64 {
        self.capacity_of("block").await
    }

    /// What CSI says a new volume of `kind` can get.
    pub async fn capacity_of(&mut self, kind: &str) -> u64 {
        let req = GetCapacityRequest { parameters: HashMap::from([("kind".into(), kind.into())]), ..Default::default() };
        u64::try_from(self.ctl.get_capacity(req).await.unwrap().into_inner().available_capacity).unwrap()
    }

    /// CreateVolume of an ext4 `block` volume; its id.
    pub async fn create(&mut self, name: &str, bytes: u64) -> Result<String, tonic::Status> {
        self.create_of("block", name, bytes).await
    }

    /// CreateVolume of a volume of `kind` (ext4 where it is a device); its id.
    pub async fn create_of(&mut self, kind: &str, name: &str, bytes: u64) -> Result<String, tonic::Status> {
        let req = CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange { required_bytes: i64::try_from(bytes).unwrap(), limit_bytes: 0 }),
            volume_capabilities: vec![ext4()],
            parameters: HashMap::from([("kind".into(), kind.into())]),
            ..Default::default()
        };
        Ok(self.ctl.create_volume(req).await?.into_inner().volume.unwrap().volume_id)
    }

    /// Pod `p`'s target for volume `name` (kubelet makes the parent).
    pub fn target(&self, name: &str) -> PathBuf {
        let target = self.dir.join("kubelet/pods/p/volumes/kubernetes.io~csi").join(name).join("mount");
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        target
    }

    /// NodePublishVolume of volume `id` for a runC pod (mounted on the host);
    /// the target.
    pub async fn publish(&mut self, id: &str, name: &str) -> PathBuf {
        let target = self.target(name);
        let req = NodePublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.display().to_string(),
            volume_capability: Some(ext4()),
            volume_context: HashMap::from([("thinbox.io/sandbox".into(), "runc".into())]),
            ..Default::default()
        };
        self.node.node_publish_volume(req).await.unwrap();
        target
    }

    /// NodePublishVolume of an inline ephemeral volume (the emptyDir
    /// replacement) of `size` (a Kubernetes quantity) under the kubelet's
    /// `handle`, for a runC pod; the target.
    pub async fn publish_ephemeral(&mut self, handle: &str, name: &str, size: &str) -> PathBuf {
        let target = self.target(name);
        let ctx = [("csi.storage.k8s.io/ephemeral", "true"), ("size", size), ("thinbox.io/sandbox", "runc"), ("csi.storage.k8s.io/pod.name", "p")];
        let req = NodePublishVolumeRequest {
            volume_id: handle.into(),
            target_path: target.display().to_string(),
            volume_capability: Some(ext4()),
            volume_context: ctx.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        self.node.node_publish_volume(req).await.unwrap();
        target
    }

    pub async fn unpublish(&mut self, id: &str, target: &Path) {
        let req = NodeUnpublishVolumeRequest { volume_id: id.into(), target_path: target.display().to_string() };
        self.node.node_unpublish_volume(req).await.unwrap();
    }

    /// Prepare of an active snapshot `key` without a parent.
    pub async fn prepare(&mut self, key: &str) -> Result<(), tonic::Status> {
        let req = PrepareSnapshotRequest { snapshotter: "thinbox".into(), key: key.into(), parent: String::new(), labels: HashMap::new() };
        self.snap.prepare(req).await.map(|_| ())
    }

    /// Every volume's id (ListVolumes).
    pub async fn volume_ids(&mut self) -> Vec<String> {
        let entries = self.ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries;
        entries.into_iter().map(|e| e.volume.unwrap().volume_id).collect()
    }

    /// Every snapshot: key and kind.
    pub async fn snapshots(&mut self) -> Vec<(String, Kind)> {
        let mut stream = self.snap.list(ListSnapshotsRequest { snapshotter: "thinbox".into(), filters: vec![] }).await.unwrap().into_inner();
        let mut out = Vec::new();
        while let Some(page) = stream.message().await.unwrap() {
            out.extend(page.info.into_iter().map(|i| (i.name.clone(), i.kind())));
        }
        out
    }

    /// SIGKILL, as the OOM killer or a crash would: nothing is cleaned up.
    /// The node is then [`Node::start`]ed again on the same directory.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Waits (at most `within`) for the daemon to exit by itself; its status.
    pub fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "thinboxd still running after {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The admin service (on the snapshot socket).
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(thinbox_proto::unix_channel(self.snap_socket(), Duration::from_secs(120)).await.unwrap())
    }

    /// Every device record, in id order, once the background deleter has
    /// finished what Remove, DeleteVolume and DeleteSnapshot left it (no
    /// record `deleting`; panics after [`super::snapshots::DELETION_DEADLINE`]).
    pub async fn settled_devices(&self) -> Vec<thinbox_proto::admin::Device> {
        let mut admin = self.admin().await;
        let deadline = std::time::Instant::now() + super::snapshots::DELETION_DEADLINE;
        loop {
            let devices = admin.list_devices(thinbox_proto::admin::ListDevicesRequest {}).await.unwrap().into_inner().devices;
            if devices.iter().all(|d| d.state != "deleting") {
                return devices;
            }
            assert!(std::time::Instant::now() < deadline, "devices still deleting: {devices:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM; the daemon must exit cleanly (and, with `release_on_exit`,
    /// release what nothing uses).
    pub fn stop(&mut self) {
        let mut child = self.child.take().unwrap();
        rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::TERM).unwrap();
        assert!(child.wait().unwrap().success(), "thinboxd exits cleanly: {}", std::fs::read_to_string(self.dir.join("thinboxd.log")).unwrap());
    }
}

impl Drop for Node {
    /// Stops a daemon still running; after a failed test, also unmounts and
    /// detaches whatever is left under the directory.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            if self.child.is_some() {
                self.stop();
            }
            return;
        }
        if let Some(mut child) = self.child.take() {
            let _ = rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::TERM);
            let _ = child.wait();
        }
        super::volumes::cleanup(&self.dir);
    }
}

pub fn ext4() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume { fs_type: "ext4".into(), mount_flags: vec![], volume_mount_group: String::new() })),
    }
}
