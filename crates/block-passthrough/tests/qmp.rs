//! Host tier: the QMP client against a real `qemu-system-x86_64`.
//!
//! Each test starts its own QEMU, paused (`-S`) and without a guest: QEMU's
//! block layer and device model do all the hot-plug work without one. What a
//! paused VM cannot do is *finish* an unplug, since `device_del` waits for the
//! guest to release the device; here that is tested as a timeout. The full
//! unplug (the guest acks, `DEVICE_DELETED`, nodes deleted) is covered by the
//! VM tier (tests/vm), which boots a guest kernel.
//!
//! Needs root (loop devices) and QEMU (`scripts/install-deps.sh --test`); a
//! missing QEMU fails the tests, it does not skip them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use thinbox_block_passthrough::qmp::{Aio, Disk, PluggedDisk, Qmp, QmpError, QmpErrorKind};
use tokio::process::{Child, Command};

const QEMU: &str = "qemu-system-x86_64";
/// PCIe root ports: each takes one hot-plugged device.
const PORTS: usize = 3;

/// A paused, guest-less QEMU and our QMP connection to it.
struct Vm {
    child: Child,
    qmp: Qmp,
    dir: tempfile::TempDir,
}

impl Vm {
    async fn start() -> Vm {
        let dir = tempfile::Builder::new().prefix("thinbox-qmp-").tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let mut cmd = Command::new(QEMU);
        cmd.args(["-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-S"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(["-object", "iothread,id=io0"]);
        for i in 0..PORTS {
            cmd.args(["-device", &format!("pcie-root-port,id=rp{i},chassis={}", i + 1)]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {QEMU} (scripts/install-deps.sh --test installs it): {e}"));
        let qmp = match Qmp::connect_within(&sock, Duration::from_secs(20)).await {
            Ok(q) => q,
            Err(e) => {
                let status = child.try_wait();
                panic!("connect to QEMU's QMP socket: {e} (QEMU: {status:?})");
            }
        };
        Vm { child, qmp, dir }
    }

    /// An image file of `mib` MiB in the test directory.
    fn image(&self, name: &str, mib: u64) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::File::create(&path).unwrap().set_len(mib << 20).unwrap();
        path
    }

    /// Every block node name QEMU has, ours or not.
    async fn all_nodes(&mut self) -> Vec<String> {
        let nodes = self.qmp.execute("query-named-block-nodes", Some(json!({"flat": true}))).await.unwrap();
        nodes.as_array().unwrap().iter().map(|n| n["node-name"].as_str().unwrap().to_owned()).collect()
    }

    /// `query-block`'s entry for the device `id`.
    async fn query_block(&mut self, id: &str) -> Option<Value> {
        let blocks = self.qmp.execute("query-block", None).await.unwrap();
        let qdev = format!("/machine/peripheral/{id}/");
        blocks.as_array().unwrap().iter().find(|b| b["qdev"].as_str().is_some_and(|q| q.starts_with(&qdev))).cloned()
    }

    /// Kills QEMU and reaps it (kill_on_drop covers a panicking test).
    async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

fn disk(id: &str, path: &Path, bus: &str) -> Disk {
    Disk { bus: Some(bus.into()), ..Disk::new(id, path) }
}

/// A loop device over a file, detached on drop (after QEMU let go of it).
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = std::process::Command::new("losetup").args(["--find", "--show"]).arg(file).output().unwrap();
        assert!(out.status.success(), "losetup (needs root): {}", String::from_utf8_lossy(&out.stderr));
        Loop(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let st = std::process::Command::new("losetup").arg("-d").arg(&self.0).status();
        if !matches!(st, Ok(s) if s.success()) && !std::thread::panicking() {
            panic!("losetup -d {}: {st:?}", self.0.display());
        }
    }
}

#[tokio::test]
async fn image_file_hotplug_shows_in_disks_and_query_block() {
    let mut vm = Vm::start().await;
    assert!(vm.qmp.greeting()["version"]["qemu"]["major"].as_u64().unwrap() >= 7);
    assert_eq!(vm.qmp.disks().await.unwrap(), vec![]);

    let img = vm.image("a.img", 64);
    let a = Disk { serial: Some("thinbox-a".into()), iothread: Some("io0".into()), ..disk("vol-a", &img, "rp0") };
    vm.qmp.hotplug(&a).await.unwrap();
    let ro_img = vm.image("b.img", 16);
    let b = Disk { read_only: true, aio: Aio::Native, ..disk("vol-b", &ro_img, "rp1") };
    vm.qmp.hotplug(&b).await.unwrap();

    assert_eq!(
        vm.qmp.disks().await.unwrap(),
        vec![
            PluggedDisk { id: "vol-a".into(), node: "tbxr-vol-a".into(), path: img.clone(), read_only: false },
            PluggedDisk { id: "vol-b".into(), node: "tbxr-vol-b".into(), path: ro_img.clone(), read_only: true },
        ]
    );
    let qa = vm.query_block("vol-a").await.expect("vol-a in query-block");
    assert_eq!(qa["inserted"]["node-name"], "tbxr-vol-a");
    assert_eq!(qa["inserted"]["cache"]["direct"], true);
    assert_eq!(qa["inserted"]["image"]["virtual-size"], 64 << 20);
    let qb = vm.query_block("vol-b").await.expect("vol-b in query-block");
    assert_eq!(qb["inserted"]["ro"], true);
    // The device carries the serial and sits on the port we named.
    let serial = vm.qmp.execute("qom-get", Some(json!({"path": "/machine/peripheral/vol-a/virtio-backend", "property": "serial"}))).await.unwrap();
    assert_eq!(serial, "thinbox-a");
    let port = vm.qmp.execute("qom-get", Some(json!({"path": "/machine/peripheral/vol-a", "property": "parent_bus"}))).await.unwrap();
    assert!(port.as_str().unwrap().contains("rp0"), "{port}");
    assert_eq!(vm.qmp.our_nodes().await.unwrap(), ["tbxf-vol-a", "tbxf-vol-b", "tbxr-vol-a", "tbxr-vol-b"]);

    // Plugging an id again fails at the first blockdev-add and must not
    // roll back the nodes of the disk that is plugged.
    let e = vm.qmp.hotplug(&disk("vol-a", &img, "rp2")).await.unwrap_err();
    assert_eq!(e.kind(), QmpErrorKind::Command, "{e}");
    assert_eq!(vm.qmp.disks().await.unwrap().len(), 2);
    assert_eq!(vm.qmp.our_nodes().await.unwrap().len(), 4);

    // QMP errors are typed by class, with the command named.
    let e = vm.qmp.execute("device_del", Some(json!({"id": "no-such-device"}))).await.unwrap_err();
    assert!(matches!(&e, QmpError::Command { command, class, .. } if command == "device_del" && class == "DeviceNotFound"), "{e}");
    vm.stop().await;
}

#[tokio::test]
async fn loop_device_hotplug_uses_host_device() {
    let mut vm = Vm::start().await;
    let img = vm.image("loop.img", 32);
    let lo = Loop::attach(&img);
    vm.qmp.hotplug(&Disk { aio: Aio::IoUring, ..disk("vol-loop", &lo.0, "rp0") }).await.unwrap();
    assert_eq!(
        vm.qmp.disks().await.unwrap(),
        vec![PluggedDisk { id: "vol-loop".into(), node: "tbxr-vol-loop".into(), path: lo.0.clone(), read_only: false }]
    );
    let q = vm.query_block("vol-loop").await.expect("in query-block");
    assert_eq!(q["inserted"]["image"]["virtual-size"], 32 << 20);
    let nodes = vm.qmp.execute("query-named-block-nodes", Some(json!({"flat": true}))).await.unwrap();
    let file = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "tbxf-vol-loop").expect("protocol node");
    assert_eq!(file["drv"], "host_device", "a block device is opened as host_device");
    vm.stop().await;
    drop(lo);
}

#[tokio::test]
async fn refused_hotplugs_leave_no_block_node() {
    let mut vm = Vm::start().await;
    let img = vm.image("a.img", 8);
    let before = vm.all_nodes().await;

    let e = vm.qmp.hotplug(&disk("vol-a", &vm.dir.path().join("missing.img"), "rp0")).await.unwrap_err();
    assert!(matches!(e, QmpError::Path { .. }), "{e}");
    assert_eq!(e.kind(), QmpErrorKind::NotFound);
    let e = vm.qmp.hotplug(&disk("vol-a", Path::new("a.img"), "rp0")).await.unwrap_err();
    assert!(matches!(e, QmpError::InvalidPath { .. }), "relative: {e}");
    let e = vm.qmp.hotplug(&disk("vol-a", vm.dir.path(), "rp0")).await.unwrap_err();
    assert!(matches!(e, QmpError::NotFileOrBlockDevice { .. }), "{e}");
    for bad in ["1abc", "a b", "a/b", "", &"x".repeat(27)] {
        let e = vm.qmp.hotplug(&disk(bad, &img, "rp0")).await.unwrap_err();
        assert!(matches!(e, QmpError::InvalidId { field: "disk id", .. }), "{bad:?}: {e}");
        assert_eq!(e.kind(), QmpErrorKind::InvalidArgument);
    }
    let e = vm.qmp.hotplug(&Disk { serial: Some("s".repeat(21)), ..disk("vol-a", &img, "rp0") }).await.unwrap_err();
    assert!(matches!(e, QmpError::InvalidSerial { .. }), "{e}");
    let e = vm.qmp.hotplug(&Disk { aio: Aio::Native, cache_direct: false, ..disk("vol-a", &img, "rp0") }).await.unwrap_err();
    assert!(matches!(e, QmpError::NativeAioWithoutDirect { .. }), "{e}");

    assert_eq!(vm.all_nodes().await, before, "nothing was added");
    assert_eq!(vm.qmp.our_nodes().await.unwrap(), Vec::<String>::new());
    assert_eq!(vm.qmp.disks().await.unwrap(), vec![]);
    vm.stop().await;
}

#[tokio::test]
async fn failed_device_add_rolls_back_the_block_nodes() {
    let mut vm = Vm::start().await;
    let img = vm.image("a.img", 8);
    let e = vm.qmp.hotplug(&disk("vol-a", &img, "no-such-bus")).await.unwrap_err();
    assert!(matches!(&e, QmpError::Command { command, .. } if command == "device_add"), "{e}");
    assert_eq!(vm.qmp.our_nodes().await.unwrap(), Vec::<String>::new(), "blockdev-add rolled back");
    let e = vm.qmp.hotplug(&Disk { iothread: Some("no-such-iothread".into()), ..disk("vol-a", &img, "rp0") }).await.unwrap_err();
    assert!(matches!(&e, QmpError::Command { command, .. } if command == "device_add"), "{e}");
    assert_eq!(vm.qmp.our_nodes().await.unwrap(), Vec::<String>::new());
    // The q35 root bus takes no hot-plugs: QEMU refuses, we roll back.
    let e = vm.qmp.hotplug(&disk("vol-a", &img, "pcie.0")).await.unwrap_err();
    assert_eq!(e.kind(), QmpErrorKind::Command, "{e}");
    assert_eq!(vm.qmp.our_nodes().await.unwrap(), Vec::<String>::new());
    assert_eq!(vm.qmp.disks().await.unwrap(), vec![]);
    // The names are free again.
    vm.qmp.hotplug(&disk("vol-a", &img, "rp0")).await.unwrap();
    assert_eq!(vm.qmp.disks().await.unwrap().len(), 1);
    vm.stop().await;
}

#[tokio::test]
async fn unplug_of_an_unknown_id_is_a_typed_error() {
    let mut vm = Vm::start().await;
    let e = vm.qmp.unplug("vol-none", Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(&e, QmpError::UnknownDisk { id } if id == "vol-none"), "{e}");
    assert_eq!(e.kind(), QmpErrorKind::NotFound);
    let e = vm.qmp.unplug("0bad", Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(e, QmpError::InvalidId { .. }), "{e}");
    vm.stop().await;
}

/// A paused VM has no guest to release the device: `unplug` times out and the
/// disk stays, nodes and all. (The VM tier covers the completed unplug.)
#[tokio::test]
async fn unplug_without_a_guest_times_out_and_the_disk_stays() {
    let mut vm = Vm::start().await;
    let img = vm.image("a.img", 8);
    vm.qmp.hotplug(&disk("vol-a", &img, "rp0")).await.unwrap();
    let e = vm.qmp.unplug("vol-a", Duration::from_millis(1500)).await.unwrap_err();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
    assert_eq!(e.kind(), QmpErrorKind::Timeout);
    assert_eq!(vm.qmp.disks().await.unwrap().len(), 1, "the device stays until the guest releases it");
    assert_eq!(vm.qmp.our_nodes().await.unwrap(), ["tbxf-vol-a", "tbxr-vol-a"]);
    // Retrying on the same connection waits again rather than asking twice
    // (QEMU refuses a second device_del while one is pending).
    let e = vm.qmp.unplug("vol-a", Duration::from_millis(500)).await.unwrap_err();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
    assert_eq!(vm.qmp.disks().await.unwrap().len(), 1);
    vm.stop().await;
}
