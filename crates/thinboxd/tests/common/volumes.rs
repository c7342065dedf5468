//! The harness of the volume tests: a real `thinboxd` process serving its CSI
//! socket alone (`--no-snapshotter`) on a temporary root with its own kubelet
//! and Kata directories, and request builders.

#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thinbox_proto::csi::v1::controller_client::ControllerClient;
use thinbox_proto::csi::v1::group_controller_client::GroupControllerClient;
use thinbox_proto::csi::v1::identity_client::IdentityClient;
use thinbox_proto::csi::v1::node_client::NodeClient;
use thinbox_proto::csi::v1::volume_capability::access_mode::Mode;
use thinbox_proto::csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use thinbox_proto::csi::v1::*;
use tonic::Code;
use tonic::transport::Channel;

pub use super::{free_port, require_root, scrape};

pub const NODE: &str = "node-a";

/// How long a deleted volume's device may take to be deleted in the
/// background before a test calls it stuck (a failure guard, not a timing
/// assertion: deletion takes milliseconds to a second).
pub const DELETION_DEADLINE: Duration = Duration::from_secs(120);

/// A driver process on a temporary root, with its own kubelet and Kata directories.
pub struct Driver {
    pub dir: tempfile::TempDir,
    /// Extra daemon arguments, kept across restarts.
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub ctl: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub ident: IdentityClient<Channel>,
    pub group: GroupControllerClient<Channel>,
}

impl Driver {
    pub async fn start() -> Driver {
        Driver::start_with(&[]).await
    }

    pub async fn start_with(args: &[&str]) -> Driver {
        require_root();
        let dir = tempfile::Builder::new().prefix("thinbox-csi-").tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kubelet/pods")).unwrap();
        let cfg = format!(
            "[pool]\nbackend = \"{1}\"\nembedded_size = \"4GiB\"\nreserve = \"64MiB\"\n[csi]\nkubelet_dir = \"{0}/kubelet\"\ndirect_volumes = \"{0}/kata\"\nkata_sandbox_dirs = [\"{0}/sbs-go\", \"{0}/sbs-rs\"]\n",
            dir.path().display(),
            // The uml tier runs these tests again on a kernel thin pool.
            std::env::var("THINBOX_TEST_BACKEND").unwrap_or_else(|_| "reflink".into())
        );
        std::fs::write(dir.path().join("csi.toml"), cfg).unwrap();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, ctl, node, ident, group) = spawn(dir.path(), &args).await;
        Driver { dir, args, child: Some(child), ctl, node, ident, group }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A pod's volume directory (kubelet makes the parent; the driver the target).
    pub fn target(&self, pod: &str, name: &str) -> PathBuf {
        let parent = self.path(&format!("kubelet/pods/{pod}/volumes/kubernetes.io~csi/{name}"));
        std::fs::create_dir_all(&parent).unwrap();
        parent.join("mount")
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Restarts with `THINBOX_FAULT=point`: the next operation reaching it aborts the driver.
    pub async fn restart_faulty(&mut self, point: &str) {
        self.stop();
        let (child, ctl, node, ident, group) = spawn_with(self.dir.path(), &self.args, Some(point)).await;
        (self.child, self.ctl, self.node, self.ident, self.group) = (Some(child), ctl, node, ident, group);
    }

    /// Waits for a driver that aborted at an injected fault.
    pub fn reap_crash(&mut self) {
        let status = self.child.take().unwrap().wait().unwrap();
        assert!(!status.success(), "the driver was expected to abort: {status:?}");
    }

    pub async fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            rustix::process::kill_process(rustix::process::Pid::from_child(&c), rustix::process::Signal::TERM).unwrap();
            assert!(c.wait().unwrap().success());
        }
        let (child, ctl, node, ident, group) = spawn(self.dir.path(), &self.args).await;
        (self.child, self.ctl, self.node, self.ident, self.group) = (Some(child), ctl, node, ident, group);
    }

    /// Stops the driver and checks nothing of ours is left mounted but the
    /// embedded pool and dir filesystem (kept across restarts); then a start and stop with
    /// `--release-on-exit` must leave no mount, loop or dm device at all.
    pub async fn finish(mut self) {
        self.stop();
        let kept = [self.path("state/pool"), self.path("state/dirs")];
        let mounts: Vec<_> = mounts_under(self.dir.path()).into_iter().filter(|m| !kept.contains(m)).collect();
        assert_eq!(mounts, Vec::<PathBuf>::new(), "mounts left");
        self.child = Some(spawn(self.dir.path(), &["--release-on-exit".to_owned()]).await.0);
        self.stop();
        assert_eq!(mounts_under(self.dir.path()), Vec::<PathBuf>::new(), "mounts left after release");
        assert_eq!(thinbox_blockstore::scan_loops(self.dir.path()).unwrap(), vec![], "loop devices left");
        assert_eq!(thinbox_blockstore::inventory(&self.path("state"), &Default::default()).unwrap().attached, Default::default(), "devices left");
    }

    /// How many devices the pool holds once the background deleter has
    /// finished what DeleteVolume and DeleteSnapshot left it: waits for the
    /// count to come down to `want`, at most [`DELETION_DEADLINE`], and
    /// returns it (the caller asserts).
    pub async fn stored_devices(&self, want: usize) -> usize {
        let deadline = Instant::now() + DELETION_DEADLINE;
        loop {
            let n = thinbox_blockstore::inventory(&self.path("state"), &Default::default()).unwrap().stored.unwrap_or_default().len();
            if n <= want || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stop(&mut self) {
        let mut c = self.child.take().unwrap();
        rustix::process::kill_process(rustix::process::Pid::from_child(&c), rustix::process::Signal::TERM).unwrap();
        assert!(c.wait().unwrap().success(), "driver exits cleanly on SIGTERM");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        cleanup(self.dir.path());
    }
}

/// Best effort after a failure: unmount and detach whatever lives under `dir`.
pub fn cleanup(dir: &Path) {
    // Loops first: once their filesystems are lazily unmounted their backing
    // paths no longer show where they live.
    let loops = thinbox_blockstore::scan_loops(dir).unwrap_or_default();
    for m in mounts_under(dir).into_iter().rev() {
        let _ = Command::new("umount").arg("-l").arg(m).status();
    }
    for l in loops.iter().rev() {
        let _ = Command::new("losetup").arg("-d").arg(&l.node).status();
    }
}

/// A started daemon and its CSI clients.
pub type Spawned = (Child, ControllerClient<Channel>, NodeClient<Channel>, IdentityClient<Channel>, GroupControllerClient<Channel>);

pub async fn spawn(dir: &Path, args: &[String]) -> Spawned {
    spawn_with(dir, args, None).await
}

/// [`spawn`], with `THINBOX_FAULT=fault` (fault-injection builds abort there).
pub async fn spawn_with(dir: &Path, args: &[String], fault: Option<&str>) -> Spawned {
    let sock = dir.join("csi.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = super::thinboxd();
    if let Some(f) = fault {
        cmd.env("THINBOX_FAULT", f);
    }
    let mut child = cmd
        .args(args)
        .args(["--csi-endpoint", &format!("unix://{}", sock.display()), "--no-snapshotter", "--node-id", NODE, "--root"])
        .arg(dir.join("state"))
        .arg("--config")
        .arg(dir.join("csi.toml"))
        .env("THINBOX_LOG", "info,thinbox_csi=debug")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // A start that fails or hangs leaves nothing mounted or running.
    let answers =
        |channel| async move { IdentityClient::new(channel).probe(ProbeRequest {}).await.is_ok_and(|r| r.into_inner().ready == Some(true)) };
    if let Err(e) = super::until_served(&mut child, &sock, answers).await {
        let _ = child.kill();
        let _ = child.wait();
        cleanup(dir);
        panic!("{e}");
    }
    let ch = thinbox_proto::unix_channel(&sock, Duration::from_secs(120)).await.expect("connect to the CSI socket");
    (child, ControllerClient::new(ch.clone()), NodeClient::new(ch.clone()), IdentityClient::new(ch.clone()), GroupControllerClient::new(ch))
}

pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    thinbox_blockstore::mountinfo::mounts_under(dir).unwrap()
}

pub fn mount_cap(fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec!["noatime".into()],
            volume_mount_group: String::new(),
        })),
    }
}

pub fn block_cap() -> VolumeCapability {
    VolumeCapability { access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }), access_type: Some(AccessType::Block(BlockVolume {})) }
}

pub fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub fn create_req(name: &str, bytes: i64, p: &[(&str, &str)], cap: VolumeCapability) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![cap],
        parameters: params(p),
        ..Default::default()
    }
}

pub async fn create(d: &mut Driver, name: &str, bytes: i64, p: &[(&str, &str)], cap: VolumeCapability) -> Volume {
    d.ctl.create_volume(create_req(name, bytes, p, cap)).await.unwrap().into_inner().volume.unwrap()
}

pub fn publish_req(id: &str, target: &Path, cap: VolumeCapability, readonly: bool, ctx: &[(&str, &str)]) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        readonly,
        volume_context: params(ctx),
        ..Default::default()
    }
}

pub fn stats_req(id: &str, target: &Path) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest { volume_id: id.into(), volume_path: target.display().to_string(), staging_target_path: String::new() }
}

pub async fn unpublish(d: &mut Driver, id: &str, target: &Path) -> Result<(), tonic::Status> {
    d.node.node_unpublish_volume(NodeUnpublishVolumeRequest { volume_id: id.into(), target_path: target.display().to_string() }).await.map(|_| ())
}

pub fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

pub fn fstype_of(target: &Path) -> String {
    let out = Command::new("findmnt").args(["-n", "-o", "FSTYPE", "--mountpoint"]).arg(target).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn dd(of: &Path, mib: u32) -> bool {
    Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", &format!("count={mib}"), "conv=fsync"])
        .arg(format!("of={}", of.display()))
        .output()
        .unwrap()
        .status
        .success()
}
