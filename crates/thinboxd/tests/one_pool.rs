//! Host tier (and uml, on dm-thin): container rootfs and volumes draw from one
//! pool. Containers run by a real containerd (private instance, real runc)
//! lower CSI's GetCapacity by what their snapshots use; once they fill the
//! pool to its reserve, both APIs refuse new devices alike and every snapshot
//! keeps its content. The reverse holds too: volumes filling the pool make
//! Prepare fail, and every volume keeps its data.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::node::Node;
use thinbox_proto::csi::v1::DeleteVolumeRequest;
use thinbox_proto::snapshots::{Kind, MountsRequest, UsageRequest};
use tonic::Code;

const MIB: u64 = 1 << 20;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Writes `bytes` of a pattern derived from `seed` to `path`, durably.
fn fill(path: &Path, bytes: u64, seed: u8) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk: Vec<u8> = (0..MIB).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    for _ in 0..bytes / MIB {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
}

/// Whether `path` holds exactly what [`fill`] wrote.
fn holds(path: &Path, bytes: u64, seed: u8) -> bool {
    let want: Vec<u8> = (0..MIB).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..bytes / MIB {
        f.read_exact(&mut buf).unwrap();
        if buf != want {
            return false;
        }
    }
    f.read(&mut buf).unwrap() == 0
}

/// A private containerd whose proxy snapshotter `thinbox` is the node's
/// (tests/lib/containerd.sh, the same instance the containerd tier uses).
struct Containerd {
    work: PathBuf,
    pid: i32,
}

impl Containerd {
    fn start(work: &Path, snap_socket: &Path) -> Containerd {
        let out = Command::new("bash")
            .arg("-c")
            .arg("set -e; source \"$0/tests/lib/containerd.sh\"; containerd_start \"$1\" \"$2\" >&2; echo $CONTAINERD_PID")
            .arg(repo())
            .arg(work)
            .arg(snap_socket)
            .env("CONTAINERD_LOG_LEVEL", "info")
            .output()
            .unwrap();
        assert!(out.status.success(), "containerd_start: {}", String::from_utf8_lossy(&out.stderr));
        Containerd { work: work.to_owned(), pid: String::from_utf8_lossy(&out.stdout).trim().parse().unwrap() }
    }

    /// `ctr` against this instance, namespace `onepool`; its output.
    fn ctr(&self, args: &[&str]) -> String {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.work.join("containerd.sock"))
            .args(["-n", "onepool"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "ctr {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `script` in a new container `id` on a Thinbox rootfs (kept after it exits).
    fn run(&self, image: &str, id: &str, script: &str) {
        let w = |p: &str| self.work.join(p).display().to_string();
        self.ctr(&[
            "run",
            "--fifo-dir",
            &w("fifo"),
            "--runc-root",
            &w("runc"),
            "--cgroup",
            "",
            "--snapshotter",
            "thinbox",
            image,
            id,
            "sh",
            "-c",
            script,
        ]);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for c in ["c1", "c2"] {
            let _ = Command::new("ctr")
                .arg("--address")
                .arg(self.work.join("containerd.sock"))
                .args(["-n", "onepool", "containers", "delete", c])
                .output();
        }
        let _ = rustix::process::kill_process(rustix::process::Pid::from_raw(self.pid).unwrap(), rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while rustix::process::test_kill_process(rustix::process::Pid::from_raw(self.pid).unwrap()).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_lower_capacity_and_a_full_pool_refuses_both_apis() {
    assert!(rustix::process::geteuid().is_root(), "host-tier tests need root");
    let dir = tempfile::Builder::new().prefix("tbop-").tempdir().unwrap();
    // Small pools: in the uml tier the thin pool's data file lives in guest memory.
    let mut n = Node::start(dir.path(), "embedded_size = \"1536MiB\"\nreserve = \"128MiB\"\ngrow_step = \"0\"").await;
    let c0 = n.capacity().await;

    let ctrd = Containerd::start(&dir.path().join("ctrd"), &dir.path().join("snap.sock"));
    let image = "localhost/thinbox-onepool:1";
    let tar = dir.path().join("image.tar");
    let built = Command::new("python3").arg(repo().join("tests/lib/make-oci-image.py")).arg(&tar).args(["--ref", image]).status().unwrap();
    assert!(built.success(), "make-oci-image.py");
    ctrd.ctr(&["image", "import", "--snapshotter", "thinbox", tar.to_str().unwrap()]);
    // A container writes 200 MiB into its rootfs.
    ctrd.run(image, "c1", "dd if=/dev/zero of=/fill bs=1M count=200 conv=fsync 2>/dev/null");

    // Capacity went down by what the snapshots hold.
    let c1 = n.capacity().await;
    let snaps = n.snapshots().await;
    assert_eq!(snaps.iter().filter(|(_, k)| *k == Kind::Committed).count(), 3, "three image layers: {snaps:?}");
    assert_eq!(snaps.iter().filter(|(_, k)| *k == Kind::Active).count(), 1, "one container rootfs: {snaps:?}");
    let mut used = 0;
    for (key, _) in &snaps {
        let u = n.snap.usage(UsageRequest { snapshotter: "thinbox".into(), key: key.clone() }).await.unwrap().into_inner();
        used += u64::try_from(u.size).unwrap();
    }
    let drop_ = c0 - c1;
    println!("capacity {c0} -> {c1}: down {drop_} bytes; the snapshots' usage adds up to {used} bytes");
    assert!(used >= 200 * MIB, "the container's 200 MiB are counted: {used}");
    // The pool's own bookkeeping (the filesystem's or thin pool's metadata for
    // new devices) is the only difference.
    let slack = drop_.abs_diff(used);
    assert!(slack <= 16 * MIB, "capacity fell by {drop_}, snapshots use {used}: {slack} bytes apart");

    // A second container fills the pool past its reserve.
    let past = c1 / MIB + 32;
    ctrd.run(image, "c2", &format!("dd if=/dev/zero of=/fill bs=1M count={past} conv=fsync 2>/dev/null"));
    assert_eq!(n.capacity().await, 0, "no room left for a volume");
    let refused = n.create("v-after-full", 64 * MIB).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "CreateVolume: {refused:?}");
    let refused = n.prepare("after-full").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "Prepare: {refused:?}");

    // Every container rootfs still mounts with its content.
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut checked = 0;
    for (key, kind) in n.snapshots().await {
        if kind != Kind::Active {
            continue;
        }
        let m = n.snap.mounts(MountsRequest { snapshotter: "thinbox".into(), key: key.clone() }).await.unwrap().into_inner().mounts.remove(0);
        rustix::mount::mount(m.source.as_str(), &mnt, m.r#type.as_str(), rustix::mount::MountFlags::RDONLY, None).unwrap();
        let fill_len = std::fs::metadata(mnt.join("fill")).map(|m| m.len());
        let layer3 = std::fs::read_to_string(mnt.join("etc/layer3"));
        rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()).unwrap();
        assert!(fill_len.unwrap() >= 200 * MIB, "{key}: the container's data is there");
        assert!(layer3.is_ok(), "{key}: the image's top layer is merged in");
        checked += 1;
    }
    assert_eq!(checked, 2);
    drop(ctrd);
    n.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_fill_the_pool_and_prepare_is_refused() {
    assert!(rustix::process::geteuid().is_root(), "host-tier tests need root");
    let dir = tempfile::Builder::new().prefix("tbop-").tempdir().unwrap();
    let mut n = Node::start(dir.path(), "embedded_size = \"1GiB\"\nreserve = \"128MiB\"\ngrow_step = \"0\"").await;
    n.prepare("rootfs-before").await.unwrap();

    let a = n.create("a", 512 * MIB).await.unwrap();
    // Thin, like rootfs snapshots: together larger than the room left, but
    // each within the pool (960 MiB of XFS on reflink, 1 GiB of thin data).
    assert_eq!(n.create("too-big", 2048 * MIB).await.unwrap_err().code(), Code::ResourceExhausted, "larger than the pool can be");
    let b = n.create("b", 900 * MIB).await.unwrap();
    let (ta, tb) = (n.publish(&a, "a").await, n.publish(&b, "b").await);
    fill(&ta.join("data"), 128 * MIB, 1);
    // `b` takes what is left above the reserve, and a little of the reserve.
    let rest = n.capacity().await / MIB * MIB + 32 * MIB;
    fill(&tb.join("data"), rest, 2);
    assert_eq!(n.capacity().await, 0, "no room left");

    let refused = n.prepare("rootfs-after").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "Prepare: {refused:?}");
    let refused = n.create("c", 64 * MIB).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "CreateVolume: {refused:?}");

    // Every volume keeps its data, also published again.
    assert!(holds(&ta.join("data"), 128 * MIB, 1) && holds(&tb.join("data"), rest, 2));
    n.unpublish(&a, &ta).await;
    n.unpublish(&b, &tb).await;
    let (ta, tb) = (n.publish(&a, "a").await, n.publish(&b, "b").await);
    assert!(holds(&ta.join("data"), 128 * MIB, 1), "volume a after a new publish");
    assert!(holds(&tb.join("data"), rest, 2), "volume b after a new publish");
    n.unpublish(&a, &ta).await;
    n.unpublish(&b, &tb).await;

    // Deleting a volume makes room for a rootfs again.
    n.ctl.delete_volume(DeleteVolumeRequest { volume_id: b, secrets: HashMap::new() }).await.unwrap();
    n.prepare("rootfs-after").await.unwrap();
    n.stop();
}
