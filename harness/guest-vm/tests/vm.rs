//! The vm tier: real QEMU guests (TCG here, KVM where it works) on the
//! cached guest image, with Thinbox's storage hot-plugged into them over QMP
//! the way a VM sandbox receives it. Needs root (loop devices, mounts) and
//! the `thinboxd` binary built beside this test (`tests/vm/tier.sh` builds
//! it); each daemon instance serves one door, on a private root with every
//! path temporary. Run: `sudo bash tests/vm/tier.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use thinbox_block_passthrough::qmp::{Aio, Disk, Qmp};
use thinbox_block_passthrough::{DirectVolumes, MountInfo};
use thinbox_guest_vm::{Accel, BootDisk, Error, GuestImage, Output, Share9p, VirtioFs, Vm, VmSpec};
use thinbox_proto::admin::PoolStatusRequest;
use thinbox_proto::admin::admin_client::AdminClient;
use thinbox_proto::csi::v1::controller_client::ControllerClient;
use thinbox_proto::csi::v1::identity_client::IdentityClient;
use thinbox_proto::csi::v1::node_client::NodeClient;
use thinbox_proto::csi::v1::volume_capability::access_mode::Mode;
use thinbox_proto::csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use thinbox_proto::csi::v1::*;
use thinbox_proto::snapshots::snapshots_client::SnapshotsClient;
use thinbox_proto::snapshots::*;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(120);
const UNPLUG: Duration = Duration::from_secs(60);

fn require_root() {
    assert!(rustix::process::geteuid().is_root(), "vm-tier tests need root: run `sudo bash tests/vm/tier.sh`");
}

/// The guest image, built once per test process (a cold build takes about
/// a minute; later runs find it in the cache).
fn image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_env("THINBOX_LOG")).with_test_writer().try_init();
        let t = Instant::now();
        let image = GuestImage::ensure(&GuestImage::default_cache_dir()).expect("guest image");
        eprintln!("guest image {} ready in {:.1} s", image.kernel.parent().unwrap().display(), t.elapsed().as_secs_f64());
        image
    })
}

fn boot(work: &Path, spec: &VmSpec) -> Vm {
    let t = Instant::now();
    let vm = Vm::boot(image(), spec, work).expect("boot guest");
    eprintln!("guest booted on {:?} in {:.2} s", vm.accel(), t.elapsed().as_secs_f64());
    vm
}

fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

/// A workspace binary built beside this test (`target/<profile>/NAME`).
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(path.is_file(), "{} is missing: build it first (`cargo build -p {name}`; tests/vm/tier.sh does)", path.display());
    path
}

/// A front door of `thinboxd`.
#[derive(Clone, Copy, Debug)]
enum Door {
    Snapshots,
    Csi,
}

/// Whether `door` answers a request on `socket` now.
async fn answers(socket: &Path, door: Door) -> bool {
    let Ok(channel) = thinbox_proto::unix_channel(socket, Duration::from_secs(5)).await else {
        return false;
    };
    match door {
        Door::Snapshots => AdminClient::new(channel).pool_status(PoolStatusRequest {}).await.is_ok(),
        Door::Csi => IdentityClient::new(channel).probe(ProbeRequest {}).await.is_ok(),
    }
}

/// Waits until `thinboxd` (`child`) serves `door` on `socket`. It binds its
/// sockets before it opens the pool and serves them after, so the socket file
/// alone proves nothing; once a request is answered the daemon is up, its
/// SIGTERM handler installed. Fails if it exits first or takes a minute.
async fn until_served(child: &mut Child, socket: &Path, door: Door) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(socket.exists() && answers(socket, door).await) {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("thinboxd exited during start-up ({status}) before it served {}", socket.display()));
        }
        if Instant::now() >= deadline {
            return Err(format!("thinboxd did not serve {} within 60 s", socket.display()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Runs `f` on a runtime and thread of its own: callable from blocking code
/// and from `Drop`, inside an async test or not.
fn block_on<F: Future + Send>(f: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        let joined = s.spawn(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)).join();
        joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mounts_under(prefix: &Path) -> Vec<String> {
    thinbox_blockstore::mountinfo::mounts_under(prefix).unwrap().into_iter().map(|m| m.display().to_string()).collect()
}

/// The file behind a loop device, if it is bound.
fn loop_backing(dev: &str) -> Option<String> {
    let name = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok().map(|s| s.trim().to_owned())
}

/// The block nodes QEMU still has for `path` (any name).
async fn nodes_for(qmp: &mut Qmp, path: &Path) -> Vec<String> {
    let nodes = qmp.execute("query-named-block-nodes", Some(serde_json::json!({ "flat": true }))).await.unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n.get("file").and_then(|f| f.as_str()) == path.to_str())
        .filter_map(|n| n.get("node-name").and_then(|s| s.as_str()).map(str::to_owned))
        .collect()
}

fn disk(id: &str, path: &Path, serial: &str, bus: String) -> Disk {
    Disk {
        id: id.into(),
        path: path.to_owned(),
        read_only: false,
        cache_direct: true,
        aio: Aio::Threads,
        iothread: None,
        serial: Some(serial.into()),
        bus: Some(bus),
    }
}

/// Checks the device `dev` left the guest after an unplug.
fn assert_gone_from_guest(vm: &mut Vm, dev: &str) {
    let name = dev.trim_start_matches("/dev/");
    let out = vm
        .run(&format!("i=0; while [ -e /sys/block/{name} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; [ ! -e /sys/block/{name} ]"), T)
        .unwrap();
    assert!(out.success(), "{dev} still in the guest after unplug: {}", out.stdout);
}

// ---------------------------------------------------------------------------
// a) boot, accelerator, command round trip

#[test]
fn boots_reports_accel_and_round_trips_commands() {
    require_root();
    let work = tempdir("thinbox-vm-a-");
    let mut vm = boot(work.path(), &VmSpec { hotplug_slots: 2, ..Default::default() });

    // The accelerator reported is the one the guest runs on: a KVM guest's
    // kernel detects the KVM hypervisor, a TCG guest's does not.
    let dmesg = vm.run_ok("dmesg", T).unwrap();
    assert_eq!(dmesg.contains("Hypervisor detected: KVM"), vm.accel() == Accel::Kvm, "accel {:?}; dmesg:\n{dmesg}", vm.accel());
    if let Ok(want) = std::env::var("THINBOX_EXPECT_ACCEL") {
        assert_eq!(format!("{:?}", vm.accel()).to_lowercase(), want.to_lowercase(), "THINBOX_EXPECT_ACCEL");
    }

    let out = vm.run("echo hello; uname -r; echo to-stderr >&2", T).unwrap();
    assert_eq!(out, Output { status: 0, stdout: format!("hello\n{}\nto-stderr\n", image().kernel_version) });
    let out = vm.run("echo partial; exit 42", T).unwrap();
    assert_eq!(out, Output { status: 42, stdout: "partial\n".into() });
    assert!(matches!(vm.run_ok("false", T), Err(Error::Command { status: 1, .. })));
    // Output without a trailing newline and binary-ish bytes cross unchanged.
    assert_eq!(vm.run_ok(r"printf 'a\tb\\n\001end'", T).unwrap(), "a\tb\\n\u{1}end");
    // The guest has what the tests and benchmarks use: the virtio, 9p,
    // virtio-fs, loop and dm modules, fio with its engines, mkfs, and the
    // hot-plug ports' slots.
    let lsmod = vm.run_ok("lsmod", T).unwrap();
    for m in ["virtio_blk", "9pnet_virtio", "virtiofs", "loop", "dm_thin_pool"] {
        assert!(lsmod.lines().any(|l| l.split_whitespace().next() == Some(m)), "{m} not loaded:\n{lsmod}");
    }
    let engines = vm.run_ok("fio --enghelp", T).unwrap();
    assert!(engines.contains("libaio") && engines.contains("io_uring"), "{engines}");
    vm.run_ok("mkfs.ext4 -V && mkfs.xfs -V && dmsetup version", T).unwrap();
    // A filesystem module loads on first mount (busybox modprobe, kernel request).
    vm.run_ok(
        "truncate -s 32M /tmp/e.img && mkfs.ext4 -q /tmp/e.img && mkdir -p /mnt/e && mount -t ext4 -o loop /tmp/e.img /mnt/e && umount /mnt/e",
        T,
    )
    .unwrap();

    // A time limit poisons the console; the VM is then only good for dropping.
    let t = Instant::now();
    assert!(matches!(vm.run("sleep 30", Duration::from_secs(1)), Err(e @ Error::Timeout { .. }) if e.is_timeout()));
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(matches!(vm.run("true", T), Err(Error::Poisoned)));
    drop(vm);
    assert!(qemu_pids_for(work.path()).is_empty(), "QEMU killed on drop");
    assert!(!work.path().join("qmp.sock").exists() && !work.path().join("console.sock").exists(), "sockets removed");
    assert!(work.path().join("kernel.log").metadata().unwrap().len() > 0, "kernel log kept");

    // A clean power-off.
    let mut vm = boot(work.path(), &VmSpec::default());
    vm.run_ok("true", T).unwrap();
    let t = Instant::now();
    vm.shutdown().unwrap();
    eprintln!("shutdown in {:.2} s", t.elapsed().as_secs_f64());
}

/// QEMU processes whose command line names `dir`.
fn qemu_pids_for(dir: &Path) -> Vec<u32> {
    let needle = dir.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.starts_with("qemu-system-x86_64\0") && cmd.contains(needle)
        })
        .collect()
}

/// A process that dies without unwinding (SIGKILL) takes its guest with it:
/// the `guest-shell` example boots a guest that runs a long command (so the
/// guest's own exit on a closed console does not come into play) and is
/// killed.
#[test]
fn a_guest_does_not_outlive_its_process() {
    require_root();
    image();
    let exe = std::env::current_exe().unwrap();
    let example = exe.parent().and_then(Path::parent).unwrap().join("examples/guest-shell");
    assert!(example.is_file(), "{} is missing: `cargo build -p thinbox-guest-vm --example guest-shell` (tests/vm/tier.sh does)", example.display());
    let mut child = Command::new(&example).arg("sleep 300").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    // "booted on Tcg in 5.1 s; QMP at /tmp/thinbox-guest-XXXX/qmp.sock"
    let mut workdir = None;
    for line in std::io::BufRead::lines(stderr) {
        let line = line.unwrap();
        if let Some(qmp) = line.split("QMP at ").nth(1) {
            workdir = Some(PathBuf::from(qmp.trim()).parent().unwrap().to_owned());
            break;
        }
    }
    let workdir = workdir.expect("the example booted a guest");
    assert_eq!(qemu_pids_for(&workdir).len(), 1, "one QEMU for {}", workdir.display());
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !qemu_pids_for(&workdir).is_empty() {
        assert!(Instant::now() < deadline, "QEMU of {} outlived its process by 20 s", workdir.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_dir_all(&workdir).unwrap();
}

// ---------------------------------------------------------------------------
// d) boot disks, 9p and virtio-fs reach the guest

#[test]
fn boot_disks_9p_and_virtiofs_reach_the_guest() {
    require_root();
    let work = tempdir("thinbox-vm-d-");
    let data = work.path().join("disk.img");
    let pattern: Vec<u8> = (0..(8u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&data, &pattern).unwrap();
    let host_md5 = sh("md5sum", &[data.to_str().unwrap()]).split_whitespace().next().unwrap().to_owned();
    let share = work.path().join("share");
    let vfs_dir = work.path().join("vfs");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&vfs_dir).unwrap();
    std::fs::write(vfs_dir.join("from-host"), "over virtio-fs").unwrap();
    let vfs_sock = work.path().join("vfs.sock");
    let mut virtiofsd = VirtioFsd::start(&vfs_sock, &vfs_dir);
    let spec = VmSpec {
        disks: vec![BootDisk { path: data.clone(), serial: "bootdata".into(), read_only: true, cache_direct: true }],
        shares_9p: vec![Share9p { tag: "share".into(), path: share.clone(), read_only: false }],
        virtiofs: vec![VirtioFs { tag: "vfs".into(), socket: vfs_sock.clone() }],
        ..Default::default()
    };
    let mut vm = boot(work.path(), &spec);
    let dev = vm.wait_for_disk("bootdata", T).unwrap();
    let out = vm.run_ok(&format!("blockdev --getro {dev}; blockdev --getsize64 {dev}; md5sum < {dev}"), T).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1", "read-only disk");
    assert_eq!(lines[1], (8u64 << 20).to_string());
    assert_eq!(lines[2].split_whitespace().next(), Some(host_md5.as_str()), "the guest reads the host's bytes");
    assert!(matches!(vm.wait_for_disk("nosuchdisk", Duration::from_secs(1)), Err(Error::Timeout { .. })));

    vm.run_ok(
        "mkdir -p /mnt/9p && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share /mnt/9p && echo from-guest > /mnt/9p/written && sync",
        T,
    )
    .unwrap();
    assert_eq!(std::fs::read_to_string(share.join("written")).unwrap(), "from-guest\n");
    let got =
        vm.run_ok("mkdir -p /mnt/vfs && mount -t virtiofs vfs /mnt/vfs && cat /mnt/vfs/from-host && umount /mnt/vfs && umount /mnt/9p", T).unwrap();
    assert_eq!(got, "over virtio-fs");
    vm.shutdown().unwrap();
    virtiofsd.stop();
}

/// QEMU's C virtiofsd (`qemu-system-common`) serving one directory.
struct VirtioFsd(Option<Child>);

impl VirtioFsd {
    fn start(socket: &Path, dir: &Path) -> VirtioFsd {
        let child = Command::new("/usr/lib/qemu/virtiofsd")
            .arg(format!("--socket-path={}", socket.display()))
            .args(["-o", &format!("source={}", dir.display()), "-o", "cache=auto", "-o", "sandbox=chroot"])
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(socket.with_extension("log")).unwrap())
            .spawn()
            .expect("start /usr/lib/qemu/virtiofsd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "virtiofsd socket did not appear");
            std::thread::sleep(Duration::from_millis(10));
        }
        VirtioFsd(Some(child))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for VirtioFsd {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// b) a container rootfs from the snapshotter, hot-plugged into a guest

/// The real daemon serving snapshots alone (`--no-csi`) on a private root
/// (embedded reflink pool).
struct Snapshotter {
    dir: PathBuf,
    child: Option<Child>,
}

impl Snapshotter {
    async fn start(dir: &Path) -> (Snapshotter, SnapshotsClient<Channel>) {
        let mut s = Snapshotter { dir: dir.to_owned(), child: None };
        s.spawn(false);
        let socket = s.socket();
        until_served(s.child.as_mut().unwrap(), &socket, Door::Snapshots).await.unwrap_or_else(|e| panic!("{e}"));
        let channel = thinbox_proto::unix_channel(&socket, Duration::from_secs(120)).await.expect("connect to the snapshot socket");
        (s, SnapshotsClient::new(channel))
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("snap.sock")
    }

    fn spawn(&mut self, release_on_exit: bool) {
        let _ = std::fs::remove_file(self.socket());
        let mut cmd = Command::new(workspace_bin("thinboxd"));
        cmd.arg("--root")
            .arg(self.dir.join("state"))
            .arg("--snapshotter-address")
            .arg(self.socket())
            .arg("--no-csi")
            .stdin(Stdio::null())
            .env("THINBOX_LOG", "info");
        if release_on_exit {
            cmd.arg("--release-on-exit");
        }
        self.child = Some(cmd.spawn().expect("spawn thinboxd"));
    }

    fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            rustix::process::kill_process(rustix::process::Pid::from_child(&c), rustix::process::Signal::TERM).unwrap();
            let mut c = c;
            assert!(c.wait().unwrap().success(), "thinboxd exits cleanly on SIGTERM");
        }
    }

    /// Stops, then lets a `--release-on-exit` start detach the embedded pool:
    /// no loop device or mount under the root afterwards.
    fn release(&mut self) {
        self.stop();
        self.spawn(true);
        let socket = self.socket();
        block_on(until_served(self.child.as_mut().unwrap(), &socket, Door::Snapshots)).unwrap_or_else(|e| panic!("{e}"));
        self.stop();
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.release()));
        }
    }
}

fn snap_req<T>(r: T) -> tonic::Request<T> {
    tonic::Request::new(r)
}

async fn prepare(c: &mut SnapshotsClient<Channel>, key: &str, parent: &str) -> thinbox_proto::Mount {
    let r = c
        .prepare(snap_req(PrepareSnapshotRequest { snapshotter: "thinbox".into(), key: key.into(), parent: parent.into(), labels: HashMap::new() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.mounts.len(), 1, "one mount");
    r.mounts.into_iter().next().unwrap()
}

async fn commit(c: &mut SnapshotsClient<Channel>, name: &str, key: &str) {
    c.commit(snap_req(CommitSnapshotRequest {
        snapshotter: "thinbox".into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
        parent: String::new(),
    }))
    .await
    .unwrap();
}

async fn remove(c: &mut SnapshotsClient<Channel>, key: &str) {
    c.remove(snap_req(RemoveSnapshotRequest { snapshotter: "thinbox".into(), key: key.into() })).await.unwrap();
}

fn host_mount(m: &thinbox_proto::Mount, target: &Path) {
    std::fs::create_dir_all(target).unwrap();
    assert!(std::fs::metadata(&m.source).unwrap().file_type().is_block_device(), "{} is a block device", m.source);
    sh("mount", &["-t", &m.r#type, "-o", &m.options.join(","), &m.source, target.to_str().unwrap()]);
}

fn host_umount(target: &Path) {
    sh("umount", &[target.to_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshotter_rootfs_hotplugs_into_a_guest_and_leaves_nothing() {
    require_root();
    let dir = tempdir("thinbox-vm-b-");
    let (mut snap, mut c) = Snapshotter::start(dir.path()).await;
    let work = dir.path().join("vm");

    // Layer 1: a base; layer 2 changes, deletes and adds on top.
    let m = prepare(&mut c, "l1-active", "").await;
    let mp = dir.path().join("mnt");
    host_mount(&m, &mp);
    for (f, content) in [("etc/os-release", "base\n"), ("bin/tool", "v1\n"), ("data/remove-me", "x\n"), ("data/keep", "kept\n")] {
        std::fs::create_dir_all(mp.join(f).parent().unwrap()).unwrap();
        std::fs::write(mp.join(f), content).unwrap();
    }
    host_umount(&mp);
    commit(&mut c, "layer1", "l1-active").await;
    let m = prepare(&mut c, "l2-active", "layer1").await;
    host_mount(&m, &mp);
    std::fs::write(mp.join("bin/tool"), "v2\n").unwrap();
    std::fs::remove_file(mp.join("data/remove-me")).unwrap();
    std::fs::create_dir_all(mp.join("app")).unwrap();
    std::fs::write(mp.join("app/new"), "added in layer 2\n").unwrap();
    host_umount(&mp);
    commit(&mut c, "layer2", "l2-active").await;

    // The container's rootfs: a block device the sandbox receives as virtio-blk.
    let rootfs = prepare(&mut c, "rootfs", "layer2").await;
    let dev = PathBuf::from(&rootfs.source);
    assert!(std::fs::metadata(&dev).unwrap().file_type().is_block_device(), "{}", rootfs.source);
    let backing = loop_backing(&rootfs.source).expect("the rootfs is a bound loop device");

    let mut vm = tokio::task::block_in_place(|| boot(&work, &VmSpec { hotplug_slots: 1, ..Default::default() }));
    let mut qmp = Qmp::connect(vm.qmp_socket()).await.unwrap();
    let bus = vm.hotplug_bus(0);
    let rootfs_disk = disk("rootfs", &dev, "tbx-rootfs", bus);
    let fstype = rootfs.r#type.clone();

    let t = Instant::now();
    qmp.hotplug(&rootfs_disk).await.unwrap();
    assert_eq!(qmp.disks().await.unwrap().iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["rootfs"]);
    let gdev = tokio::task::block_in_place(|| {
        let gdev = vm.wait_for_disk("tbx-rootfs", T).unwrap();
        eprintln!("hot-plug to {gdev} in the guest: {:.2} s", t.elapsed().as_secs_f64());
        let out = vm
            .run_ok(
                &format!(
                    "set -e; mkdir -p /mnt/r; mount -t {fstype} {gdev} /mnt/r; cd /mnt/r
                     cat etc/os-release bin/tool data/keep app/new
                     if [ -e data/remove-me ]; then echo 'deleted file present'; exit 1; fi
                     echo from-guest > written; cd /; sync; umount /mnt/r"
                ),
                T,
            )
            .unwrap();
        assert_eq!(out, "base\nv2\nkept\nadded in layer 2\n", "the merged layers as the guest sees them");
        gdev
    });
    let t = Instant::now();
    qmp.unplug("rootfs", UNPLUG).await.unwrap();
    eprintln!("unplug: {:.2} s", t.elapsed().as_secs_f64());
    tokio::task::block_in_place(|| assert_gone_from_guest(&mut vm, &gdev));
    assert!(qmp.disks().await.unwrap().is_empty());

    // Plugged again (same port), the guest's write is there.
    qmp.hotplug(&rootfs_disk).await.unwrap();
    tokio::task::block_in_place(|| {
        let gdev = vm.wait_for_disk("tbx-rootfs", T).unwrap();
        let out = vm.run_ok(&format!("set -e; mount -t {fstype} {gdev} /mnt/r; cat /mnt/r/written; umount /mnt/r"), T).unwrap();
        assert_eq!(out, "from-guest\n", "the write survived unplug and re-plug");
    });
    qmp.unplug("rootfs", UNPLUG).await.unwrap();
    assert!(qmp.disks().await.unwrap().is_empty(), "no disk left plugged");
    assert_eq!(qmp.our_nodes().await.unwrap(), Vec::<String>::new(), "no block node of ours left");
    assert_eq!(nodes_for(&mut qmp, &dev).await, Vec::<String>::new(), "QEMU holds no node for {}", dev.display());

    // The host sees the guest's write too.
    host_mount(&rootfs, &mp);
    assert_eq!(std::fs::read_to_string(mp.join("written")).unwrap(), "from-guest\n");
    host_umount(&mp);

    // Remove: the loop device and its image go (the snapshotter's background
    // deleter detaches and unlinks shortly after the call returns).
    remove(&mut c, "rootfs").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while loop_backing(&rootfs.source).as_deref() == Some(backing.as_str()) || Path::new(&backing).exists() {
        assert!(Instant::now() < deadline, "{} still bound to {backing}, or the image still there, 30 s after Remove", rootfs.source);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!thinbox_blockstore::scan_loops(dir.path()).unwrap().iter().any(|l| l.backing == Path::new(&backing)));
    remove(&mut c, "layer2").await;
    remove(&mut c, "layer1").await;
    drop(qmp);
    tokio::task::block_in_place(|| vm.shutdown()).unwrap();

    snap.release();
    assert_eq!(mounts_under(dir.path()), Vec::<String>::new(), "mounts left");
    assert_eq!(thinbox_blockstore::scan_loops(dir.path()).unwrap(), vec![], "loop devices left");
}

// ---------------------------------------------------------------------------
// c) a CSI `file` volume published for Kata, hot-plugged from its record

/// A small XFS filesystem of its own, so that its free space changes only
/// with what the test does (other work on the machine writes elsewhere).
struct ScratchFs {
    image: PathBuf,
    mountpoint: PathBuf,
    mounted: bool,
}

impl ScratchFs {
    fn new(dir: &Path, size: &str) -> ScratchFs {
        let image = dir.join("scratch-fs.img");
        let mountpoint = dir.join("fs");
        std::fs::create_dir_all(&mountpoint).unwrap();
        sh("truncate", &["-s", size, image.to_str().unwrap()]);
        sh("mkfs.xfs", &["-q", "-m", "reflink=1", image.to_str().unwrap()]);
        sh("mount", &["-o", "loop", image.to_str().unwrap(), mountpoint.to_str().unwrap()]);
        ScratchFs { image, mountpoint, mounted: true }
    }

    fn used(&self) -> u64 {
        let st = rustix::fs::statvfs(&self.mountpoint).unwrap();
        (st.f_blocks - st.f_bfree) * st.f_frsize
    }

    fn unmount(&mut self) {
        if self.mounted {
            sh("umount", &[self.mountpoint.to_str().unwrap()]);
            self.mounted = false;
        }
        assert!(thinbox_blockstore::scan_loops(self.image.parent().unwrap()).unwrap().is_empty(), "the scratch fs loop is gone");
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        if self.mounted {
            // umount of a `-o loop` mount detaches the loop (autoclear).
            let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
    }
}

/// The real daemon serving CSI alone (`--no-snapshotter`) on a root inside the
/// scratch filesystem.
struct Csi {
    root: PathBuf,
    child: Option<Child>,
    ctl: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

impl Csi {
    async fn start(root: &Path) -> Csi {
        std::fs::create_dir_all(root.join("kubelet/pods")).unwrap();
        // The pool straight on the scratch filesystem (XFS with reflink), so
        // its growth is what the volumes' devices take.
        std::fs::create_dir_all(root.join("pool")).unwrap();
        let cfg = format!(
            "[pool]\nbackend = \"reflink\"\ndir = \"{0}/pool\"\nreserve = \"16MiB\"\n[csi]\nkubelet_dir = \"{0}/kubelet\"\ndirect_volumes = \"{0}/kata\"\n",
            root.display()
        );
        std::fs::write(root.join("csi.toml"), cfg).unwrap();
        let (child, ch) = Csi::spawn(root, false).await;
        Csi { root: root.to_owned(), child: Some(child), ctl: ControllerClient::new(ch.clone()), node: NodeClient::new(ch) }
    }

    async fn spawn(root: &Path, release_on_exit: bool) -> (Child, Channel) {
        let sock = root.join("csi.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(workspace_bin("thinboxd"));
        if release_on_exit {
            cmd.arg("--release-on-exit");
        }
        let mut child = cmd
            .args(["--csi-endpoint", &format!("unix://{}", sock.display()), "--no-snapshotter", "--node-id", "vm-node", "--root"])
            .arg(root.join("state"))
            .arg("--config")
            .arg(root.join("csi.toml"))
            .env("THINBOX_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn thinboxd");
        if let Err(e) = until_served(&mut child, &sock, Door::Csi).await {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{e}");
        }
        let ch = thinbox_proto::unix_channel(&sock, Duration::from_secs(120)).await.expect("connect to the CSI socket");
        (child, ch)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            rustix::process::kill_process(rustix::process::Pid::from_child(&c), rustix::process::Signal::TERM).unwrap();
            assert!(c.wait().unwrap().success(), "thinboxd exits cleanly on SIGTERM");
        }
    }

    /// Stop, then start and stop with `--release-on-exit`: nothing of the
    /// driver stays mounted or attached.
    async fn finish(mut self) {
        self.stop();
        let (child, _) = Csi::spawn(&self.root, true).await;
        self.child = Some(child);
        self.stop();
        assert_eq!(mounts_under(&self.root), Vec::<String>::new(), "mounts left");
        assert_eq!(thinbox_blockstore::scan_loops(&self.root).unwrap(), vec![], "loop devices left");
    }
}

impl Drop for Csi {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // Best effort after a failure: unmount and detach what lives under the root.
            let loops = thinbox_blockstore::scan_loops(&self.root).unwrap_or_default();
            for m in mounts_under(&self.root).into_iter().rev() {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
            for l in loops.iter().rev() {
                let _ = Command::new("losetup").arg("-d").arg(&l.node).status();
            }
        }
    }
}

fn capability(raw: bool) -> VolumeCapability {
    let access_type = if raw {
        AccessType::Block(BlockVolume {})
    } else {
        AccessType::Mount(MountVolume { fs_type: "ext4".into(), mount_flags: vec!["noatime".into()], volume_mount_group: String::new() })
    };
    VolumeCapability { access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }), access_type: Some(access_type) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_file_volume_for_kata_is_exactly_its_size_in_the_guest() {
    require_root();
    // The driver's minimum volume size (room for any filesystem).
    const SIZE: u64 = 300 << 20;
    let dir = tempdir("thinbox-vm-c-");
    let mut scratch = ScratchFs::new(dir.path(), "3G");
    let root = scratch.mountpoint.join("csi");
    let mut csi = Csi::start(&root).await;
    let work = dir.path().join("vm");
    let mut vm = tokio::task::block_in_place(|| boot(&work, &VmSpec { hotplug_slots: 1, ..Default::default() }));
    let mut qmp = Qmp::connect(vm.qmp_socket()).await.unwrap();

    // Filesystem access (the guest mounts the ext4 the record names) and raw
    // block access (the guest writes the device).
    for raw in [false, true] {
        let name = if raw { "pvc-raw" } else { "pvc-fs" };
        let cap = capability(raw);
        let vol = csi
            .ctl
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange { required_bytes: SIZE as i64, limit_bytes: 0 }),
                volume_capabilities: vec![cap.clone()],
                parameters: HashMap::from([("kind".to_owned(), "file".to_owned()), ("thinbox.io/sandbox".to_owned(), "kata".to_owned())]),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(vol.capacity_bytes, SIZE as i64);
        let target = if raw {
            root.join(format!("kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/{name}/pod-vm"))
        } else {
            root.join(format!("kubelet/pods/pod-vm/volumes/kubernetes.io~csi/{name}/mount"))
        };
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        csi.node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap();

        // What the Kata runtime would read.
        let records = DirectVolumes::new(root.join("kata"));
        let record: MountInfo = records.get(&target).unwrap().expect("a direct-volume record");
        assert_eq!(record.volume_type, "block");
        assert_eq!(record.fstype, if raw { "" } else { "ext4" });
        let device = PathBuf::from(&record.device);
        assert!(std::fs::metadata(&device).unwrap().file_type().is_block_device(), "{}", record.device);
        let image = loop_backing(&record.device).expect("the volume is a bound loop device");
        assert!(mounts_under(&target).is_empty(), "nothing mounted on the host for a Kata publication");

        let used_before = scratch.used();
        let serial = format!("tbx-{name}");
        let d = disk("vol", &device, &serial, vm.hotplug_bus(0));
        qmp.hotplug(&d).await.unwrap();
        tokio::task::block_in_place(|| {
            let gdev = vm.wait_for_disk(&serial, T).unwrap();
            assert_eq!(
                vm.run_ok(&format!("blockdev --getsize64 {gdev}"), T).unwrap().trim(),
                SIZE.to_string(),
                "the guest's disk is the volume's size"
            );
            if raw {
                // The whole device takes writes; one block past its end does not.
                let mib = SIZE >> 20;
                vm.run_ok(&format!("dd if=/dev/zero of={gdev} bs=1M count={mib} oflag=direct 2>&1"), T).unwrap();
                let past = vm.run(&format!("dd if=/dev/zero of={gdev} bs=1M seek={mib} count=1 oflag=direct 2>&1"), T).unwrap();
                assert_ne!(past.status, 0, "a write past the end must fail: {}", past.stdout);
            } else {
                let opts = record.options.join(",");
                let fill = vm
                    .run(&format!("mkdir -p /mnt/v && mount -t ext4 -o {opts} {gdev} /mnt/v && dd if=/dev/zero of=/mnt/v/fill bs=1M 2>&1"), T)
                    .unwrap();
                assert_ne!(fill.status, 0, "the writer runs into ENOSPC: {}", fill.stdout);
                let written: u64 = vm.run_ok("sync; stat -c %s /mnt/v/fill; umount /mnt/v", T).unwrap().trim().parse().unwrap();
                assert!(written <= SIZE && written > SIZE / 2, "the guest wrote {written} bytes into a {SIZE}-byte volume");
            }
        });
        let meta = std::fs::metadata(&image).unwrap();
        assert_eq!(meta.len(), SIZE, "the image is exactly the volume's size");
        // XFS counts a file's extent-map (bmbt) blocks in st_blocks, and an
        // image cloned from a template then written fragments into many
        // extents: allow that map, never a second copy of the data.
        let allocated = meta.blocks() * 512;
        let grown = scratch.used().saturating_sub(used_before);
        assert!(allocated <= SIZE + (1 << 20), "the image holds {allocated} bytes, more than the volume's {SIZE} and its extent map");
        // The driver's own records may add a little beside the image.
        assert!(grown <= SIZE + (2 << 20), "the host filesystem grew by {grown} bytes for a {SIZE}-byte volume");
        assert!(grown >= SIZE / 2, "the guest's writes reached the image: the host filesystem grew by only {grown} bytes");

        qmp.unplug("vol", UNPLUG).await.unwrap();
        assert!(qmp.disks().await.unwrap().is_empty());
        assert_eq!(nodes_for(&mut qmp, &device).await, Vec::<String>::new());
        csi.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest { volume_id: vol.volume_id.clone(), target_path: target.display().to_string() })
            .await
            .unwrap();
        assert_eq!(records.get(&target).unwrap(), None, "record removed at unpublish");
        csi.ctl.delete_volume(DeleteVolumeRequest { volume_id: vol.volume_id.clone(), secrets: HashMap::new() }).await.unwrap();
        // The device goes in the background, after DeleteVolume returns.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&image).exists() || loop_backing(&record.device).as_deref() == Some(image.as_str()) {
            assert!(Instant::now() < deadline, "{image} still there, or still bound to {}, 30 s after DeleteVolume", record.device);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(qmp.our_nodes().await.unwrap(), Vec::<String>::new());
    drop(qmp);
    tokio::task::block_in_place(|| vm.shutdown()).unwrap();
    csi.finish().await;
    scratch.unmount();
}

/// `thinbox.io/encryption: ephemeral` on an inline emptyDir for Kata: the
/// direct-volume record carries Kata's `encryptionKey: ephemeral`,
/// `createFilesystem: true` and the pod's `fsGroup`, and the guest receives
/// the device exactly its size and unformatted (all zeros, no signature),
/// which is what Kata's agent expects before it formats. The guest then
/// formats and mounts it as the agent does for `createFilesystem`
/// (`src/agent/src/storage/block_handler.rs`: mkfs.ext4 with its options);
/// the LUKS2 layer beneath, made with a key the host never sees, is Kata's
/// confidential-data-hub and is not reproduced here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_encrypted_emptydir_reaches_the_guest_unformatted() {
    require_root();
    const SIZE: u64 = 32 << 20;
    let dir = tempdir("thinbox-vm-e-");
    let mut scratch = ScratchFs::new(dir.path(), "1G");
    let root = scratch.mountpoint.join("csi");
    let mut csi = Csi::start(&root).await;
    let work = dir.path().join("vm");
    let mut vm = tokio::task::block_in_place(|| boot(&work, &VmSpec { hotplug_slots: 1, ..Default::default() }));
    let mut qmp = Qmp::connect(vm.qmp_socket()).await.unwrap();

    let target = root.join("kubelet/pods/pod-enc/volumes/kubernetes.io~csi/scratch/mount");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let mut cap = capability(false);
    if let Some(AccessType::Mount(m)) = &mut cap.access_type {
        m.volume_mount_group = "2000".into();
    }
    let context =
        [("csi.storage.k8s.io/ephemeral", "true"), ("size", "32Mi"), ("thinbox.io/sandbox", "kata"), ("thinbox.io/encryption", "ephemeral")];
    let publish = NodePublishVolumeRequest {
        volume_id: "csi-enc-vm".into(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        volume_context: context.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    csi.node.node_publish_volume(publish).await.unwrap();

    let records = DirectVolumes::new(root.join("kata"));
    let record: MountInfo = records.get(&target).unwrap().expect("a direct-volume record");
    let meta = |k: &str| record.metadata.get(k).map(String::as_str);
    assert_eq!((meta("encryptionKey"), meta("createFilesystem"), meta("fsGroup")), (Some("ephemeral"), Some("true"), Some("2000")));
    assert_eq!(record.fstype, "ext4", "the filesystem the agent is to make");
    let device = PathBuf::from(&record.device);
    assert!(mounts_under(&target).is_empty(), "nothing mounted on the host");

    let serial = "tbx-enc".to_owned();
    let d = disk("enc", &device, &serial, vm.hotplug_bus(0));
    qmp.hotplug(&d).await.unwrap();
    tokio::task::block_in_place(|| {
        let gdev = vm.wait_for_disk(&serial, T).unwrap();
        assert_eq!(vm.run_ok(&format!("blockdev --getsize64 {gdev}"), T).unwrap().trim(), SIZE.to_string(), "exactly its size");
        let nonzero = vm.run_ok(&format!("dd if={gdev} bs=1M 2>/dev/null | tr -d '\\000' | wc -c"), T).unwrap();
        assert_eq!(nonzero.trim(), "0", "every byte the guest reads is zero");
        let probe = vm.run(&format!("blkid -p {gdev}"), T).unwrap();
        assert_eq!(probe.status, 2, "blkid finds no filesystem or other signature: {}", probe.stdout);
        // What the agent does for createFilesystem, then the pod writes.
        vm.run_ok(&format!("mkfs.ext4 -q -F -O ^has_journal -m 0 -i 163840 -I 128 {gdev}"), T).unwrap();
        let opts = if record.options.is_empty() { "defaults".to_owned() } else { record.options.join(",") };
        let wrote = vm
            .run_ok(&format!("mkdir -p /mnt/e && mount -t ext4 -o {opts} {gdev} /mnt/e && echo kept > /mnt/e/f && cat /mnt/e/f && umount /mnt/e"), T)
            .unwrap();
        assert_eq!(wrote.trim(), "kept");
    });

    qmp.unplug("enc", UNPLUG).await.unwrap();
    assert_eq!(nodes_for(&mut qmp, &device).await, Vec::<String>::new());
    csi.node
        .node_unpublish_volume(NodeUnpublishVolumeRequest { volume_id: "csi-enc-vm".into(), target_path: target.display().to_string() })
        .await
        .unwrap();
    assert_eq!(records.get(&target).unwrap(), None, "record removed at unpublish");
    assert_eq!(qmp.our_nodes().await.unwrap(), Vec::<String>::new());
    drop(qmp);
    tokio::task::block_in_place(|| vm.shutdown()).unwrap();
    csi.finish().await;
    scratch.unmount();
}
