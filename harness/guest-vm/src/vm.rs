//! Booting a guest: the QEMU command line, KVM-or-TCG, and the process's life.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::console::Console;
use crate::{Error, GuestImage};

/// The accelerator a guest runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM when `/dev/kvm` opens and a guest boots on it (tried once per
    /// process), else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// A host directory shared over 9p (`mount -t 9p -o trans=virtio,version=9p2000.L TAG DIR`).
#[derive(Debug, Clone)]
pub struct Share9p {
    pub tag: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// A vhost-user-fs device on `socket`, where the caller runs virtiofsd
/// (`mount -t virtiofs TAG DIR` in the guest).
#[derive(Debug, Clone)]
pub struct VirtioFs {
    pub tag: String,
    pub socket: PathBuf,
}

/// A virtio-blk disk present from boot; in the guest, find it with
/// [`Vm::wait_for_disk`] by `serial` (at most 20 characters).
#[derive(Debug, Clone)]
pub struct BootDisk {
    /// An image file or a block device.
    pub path: PathBuf,
    pub serial: String,
    pub read_only: bool,
    /// O_DIRECT on the host (`cache.direct=on`): no host page cache.
    pub cache_direct: bool,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub mem_mib: u32,
    pub cpus: u32,
    pub accel: AccelChoice,
    pub shares_9p: Vec<Share9p>,
    pub virtiofs: Vec<VirtioFs>,
    pub disks: Vec<BootDisk>,
    /// Empty PCIe root ports for QMP hot-plug; see [`Vm::hotplug_bus`].
    pub hotplug_slots: u32,
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec { mem_mib: 512, cpus: 1, accel: AccelChoice::Auto, shares_9p: Vec::new(), virtiofs: Vec::new(), disks: Vec::new(), hotplug_slots: 0 }
    }
}

/// What a guest script printed (stdout and stderr interleaved) and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub status: i32,
    pub stdout: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// How long a KVM boot may take before Auto gives up on KVM: a guest that
/// boots at all on KVM is at its shell in a second or two.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// TCG on a loaded two-core machine: boots take 3–5 s, allow for contention.
const TCG_BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// `poweroff -f` to QEMU's exit.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether KVM boots guests here, found by the first Auto boot of the process.
static KVM_WORKS: OnceLock<bool> = OnceLock::new();

/// QEMU runs under a small shell that kills it once its stdin, a pipe whose
/// only writer is this process, reaches end of file: when the [`Vm`] is
/// dropped, and also when this process dies without unwinding (SIGKILL, a
/// test harness's timeout), so that no guest outlives its user. (The
/// parent-death signal would fire when the spawning *thread* ends.)
/// Background jobs get /dev/null as stdin unless redirected, hence fd 3.
const GUARD: &str = r#"exec 3<&0
qemu-system-x86_64 "$@" </dev/null 3<&- & q=$!
( read -r _ <&3; kill -9 $q 2>/dev/null ) & w=$!
exec 3<&-
wait $q; s=$?
kill $w 2>/dev/null
exit $s"#;

/// A running guest. Dropping it kills QEMU and removes its sockets; the logs
/// (`kernel.log`, `console.log`, `qemu.log`) stay in the work directory.
#[derive(Debug)]
pub struct Vm {
    /// The QEMU guard shell (see [`GUARD`]); its exit status is QEMU's.
    child: Option<Child>,
    /// Closing it kills QEMU.
    lifeline: Option<std::process::ChildStdin>,
    console: Console,
    accel: Accel,
    qmp: PathBuf,
    console_socket: PathBuf,
    kernel_log: PathBuf,
    hotplug_slots: u32,
}

impl Vm {
    /// Boots `image` with `spec`, keeping sockets and logs in `workdir`
    /// (created if missing), and waits for the guest's shell.
    pub fn boot(image: &GuestImage, spec: &VmSpec, workdir: &Path) -> Result<Vm, Error> {
        validate(spec)?;
        match spec.accel {
            AccelChoice::Kvm => Vm::boot_on(image, spec, workdir, Accel::Kvm, TCG_BOOT_TIMEOUT),
            AccelChoice::Tcg => Vm::boot_on(image, spec, workdir, Accel::Tcg, TCG_BOOT_TIMEOUT),
            AccelChoice::Auto => match KVM_WORKS.get() {
                Some(true) => Vm::boot_on(image, spec, workdir, Accel::Kvm, TCG_BOOT_TIMEOUT),
                Some(false) => Vm::boot_on(image, spec, workdir, Accel::Tcg, TCG_BOOT_TIMEOUT),
                None => {
                    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
                        tracing::info!(error = %e, "/dev/kvm unusable: booting on TCG");
                        let _ = KVM_WORKS.set(false);
                        return Vm::boot_on(image, spec, workdir, Accel::Tcg, TCG_BOOT_TIMEOUT);
                    }
                    // A vhost-user daemon (virtiofsd) serves one connection:
                    // a failed KVM attempt would use it up. Such specs are
                    // probed with a bare guest first.
                    let probe = if spec.virtiofs.is_empty() {
                        Vm::boot_on(image, spec, workdir, Accel::Kvm, KVM_PROBE_TIMEOUT)
                    } else {
                        let bare = VmSpec { mem_mib: spec.mem_mib, ..VmSpec::default() };
                        Vm::boot_on(image, &bare, &workdir.join("kvm-probe"), Accel::Kvm, KVM_PROBE_TIMEOUT).and_then(|vm| {
                            drop(vm);
                            Vm::boot_on(image, spec, workdir, Accel::Kvm, TCG_BOOT_TIMEOUT)
                        })
                    };
                    match probe {
                        Ok(vm) => {
                            let _ = KVM_WORKS.set(true);
                            Ok(vm)
                        }
                        Err(e @ (Error::BootExited { .. } | Error::BootTimeout { .. })) => {
                            tracing::warn!(error = %e, "guest did not boot on KVM: falling back to TCG for this process");
                            let vm = Vm::boot_on(image, spec, workdir, Accel::Tcg, TCG_BOOT_TIMEOUT)?;
                            // Only now is KVM to blame: a spec QEMU refuses
                            // fails on TCG too, and proves nothing about KVM.
                            let _ = KVM_WORKS.set(false);
                            Ok(vm)
                        }
                        Err(e) => Err(e),
                    }
                }
            },
        }
    }

    fn boot_on(image: &GuestImage, spec: &VmSpec, workdir: &Path, accel: Accel, timeout: Duration) -> Result<Vm, Error> {
        let started = Instant::now();
        fs::create_dir_all(workdir).map_err(Error::io("create", workdir))?;
        let console_socket = workdir.join("console.sock");
        let qmp = workdir.join("qmp.sock");
        let kernel_log = workdir.join("kernel.log");
        let qemu_log = workdir.join("qemu.log");
        for s in [&console_socket, &qmp] {
            // sun_path holds 108 bytes with the terminating NUL.
            if s.as_os_str().len() > 107 {
                return Err(Error::SocketPath(s.clone()));
            }
            let _ = fs::remove_file(s);
        }
        let args = qemu_args(image, spec, accel, &console_socket, &qmp, &kernel_log)?;
        let log = File::create(&qemu_log).map_err(Error::io("create", &qemu_log))?;
        let log2 = log.try_clone().map_err(Error::io("dup", &qemu_log))?;
        tracing::debug!(?accel, args = %args.join(" "), "starting QEMU");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(GUARD)
            .arg("thinbox-qemu-guard")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| Error::Spawn { tool: "qemu-system-x86_64".into(), source })?;
        // From here on the Vm owns the process: any error drops (kills) it.
        let mut vm = Vm {
            lifeline: child.stdin.take(),
            child: Some(child),
            console: Console::detached(workdir.join("console.log")).map_err(Error::io("create", &workdir.join("console.log")))?,
            accel,
            qmp,
            console_socket,
            kernel_log,
            hotplug_slots: spec.hotplug_slots,
        };
        let deadline = started + timeout;
        // QEMU waits for this connection before starting the guest (wait=on),
        // so nothing the guest prints is lost.
        let stream = loop {
            if let Some(status) = vm.try_wait() {
                return Err(vm.boot_exited(status, &qemu_log));
            }
            if vm.console_socket.exists()
                && let Ok(s) = UnixStream::connect(&vm.console_socket)
            {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(Error::BootTimeout { accel, timeout, kernel_tail: tail_of(&vm.kernel_log) });
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        vm.console.attach(stream);
        match vm.console.wait_ready(deadline) {
            Ok(release) => {
                tracing::info!(?accel, secs = started.elapsed().as_secs_f64(), kernel = %release, "guest shell ready");
                Ok(vm)
            }
            Err(Error::Exited { .. }) => {
                let status = vm.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| "(console closed, QEMU still running)".into());
                Err(vm.boot_exited(status, &qemu_log))
            }
            Err(Error::Timeout { .. }) => {
                if let Some(status) = vm.try_wait() {
                    return Err(vm.boot_exited(status, &qemu_log));
                }
                Err(Error::BootTimeout { accel, timeout, kernel_tail: tail_of(&vm.kernel_log) })
            }
            Err(e) => Err(e),
        }
    }

    fn boot_exited(&self, status: String, qemu_log: &Path) -> Error {
        Error::BootExited { accel: self.accel, status, qemu_tail: tail_of(qemu_log), kernel_tail: tail_of(&self.kernel_log) }
    }

    fn try_wait(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("(wait failed: {e})")),
        }
    }

    /// Waits up to `timeout` for QEMU to exit; its status, or `None` if it
    /// still runs.
    fn wait_exit(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The accelerator this guest runs on.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// QEMU's QMP socket (`server=on,wait=off`): connect any number of times.
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp
    }

    /// The id of the PCIe root port for hot-plug slot `slot`, the `bus` of a
    /// `device_add`. Only `0..hotplug_slots` exist; QEMU refuses others.
    pub fn hotplug_bus(&self, slot: u32) -> String {
        format!("thinbox-hp{slot}")
    }

    /// How many hot-plug slots (empty root ports) the guest has.
    pub fn hotplug_slots(&self) -> u32 {
        self.hotplug_slots
    }

    /// The guest kernel's log (ttyS0), for messages about hot-plug or I/O errors.
    pub fn kernel_log(&self) -> &Path {
        &self.kernel_log
    }

    /// Runs `script` with `sh` in the guest (cwd `/`, stdin `/dev/null`);
    /// its exit status and its stdout and stderr interleaved. A timeout leaves
    /// the console out of step: every later call fails with [`Error::Poisoned`].
    pub fn run(&mut self, script: &str, timeout: Duration) -> Result<Output, Error> {
        let result = self.console.run(script, timeout);
        if let Err(Error::Exited { tail, .. }) = result {
            let status = self.wait_exit(Duration::from_secs(2)).unwrap_or_else(|| "(console closed, QEMU still running)".into());
            return Err(Error::Exited { status, tail });
        }
        result
    }

    /// [`Vm::run`], failing with [`Error::Command`] unless the status is 0;
    /// the output otherwise.
    pub fn run_ok(&mut self, script: &str, timeout: Duration) -> Result<String, Error> {
        let out = self.run(script, timeout)?;
        if out.status != 0 {
            return Err(Error::Command { status: out.status, output: out.stdout });
        }
        Ok(out.stdout)
    }

    /// Waits for a virtio-blk disk whose serial is `serial` (hot-plugged or
    /// not) and its device node; returns `/dev/vdX`. The polling runs in the
    /// guest, so waiting costs no console round trips.
    pub fn wait_for_disk(&mut self, serial: &str, timeout: Duration) -> Result<String, Error> {
        check_serial(serial)?;
        let tenths = timeout.as_millis().div_ceil(100);
        let script = format!(
            r#"i=0
while [ $i -lt {tenths} ]; do
  for d in /sys/block/vd*; do
    [ -e "$d/serial" ] || continue
    if [ "$(cat "$d/serial")" = "{serial}" ] && [ -b "/dev/${{d##*/}}" ]; then echo "/dev/${{d##*/}}"; exit 0; fi
  done
  sleep 0.1; i=$((i+1))
done
echo "no disk with serial {serial}; have:"; for d in /sys/block/*; do echo "${{d##*/}} $(cat $d/serial 2>/dev/null)"; done
exit 1
"#
        );
        // The guest loop counts sleeps, not wall time: allow for its own overhead.
        let out = self.run(&script, timeout * 2 + Duration::from_secs(10))?;
        if out.status != 0 {
            return Err(Error::Timeout { timeout, tail: out.stdout });
        }
        let dev = out.stdout.trim();
        if !dev.starts_with("/dev/vd") {
            return Err(Error::Protocol(format!("wait_for_disk printed {dev:?}")));
        }
        Ok(dev.to_owned())
    }

    /// Syncs and powers the guest off, waits for QEMU to exit and kills it
    /// after a timeout ([`Error::ShutdownTimeout`]).
    pub fn shutdown(mut self) -> Result<(), Error> {
        let sent = self.console.send_final("sync; poweroff -f");
        let Some(status) = self.wait_exit(SHUTDOWN_TIMEOUT) else {
            tracing::warn!(error = ?sent.err(), "guest did not power off: killing QEMU");
            self.kill();
            return Err(Error::ShutdownTimeout { timeout: SHUTDOWN_TIMEOUT });
        };
        tracing::debug!(%status, "QEMU exited");
        self.child = None;
        Ok(())
    }

    /// Closes the lifeline (the guard kills QEMU) and reaps the guard; kills
    /// the guard too if it lingers.
    fn kill(&mut self) {
        self.lifeline = None;
        if self.child.is_some() && self.wait_exit(Duration::from_secs(10)).is_none() {
            tracing::warn!("QEMU guard did not end: killing it");
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_file(&self.console_socket);
        let _ = fs::remove_file(&self.qmp);
    }
}

fn validate(spec: &VmSpec) -> Result<(), Error> {
    if spec.mem_mib < 128 {
        return Err(Error::Spec(format!("mem_mib {} < 128 (the initramfs alone needs ~100 MiB)", spec.mem_mib)));
    }
    if spec.cpus == 0 {
        return Err(Error::Spec("cpus = 0".into()));
    }
    for d in &spec.disks {
        check_serial(&d.serial)?;
    }
    let tags = spec.shares_9p.iter().map(|s| &s.tag).chain(spec.virtiofs.iter().map(|v| &v.tag));
    for t in tags {
        if t.is_empty() || t.len() > 31 || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(Error::Spec(format!("mount tag {t:?}: 1–31 characters of [A-Za-z0-9_-]")));
        }
    }
    Ok(())
}

/// virtio-blk serials hold 20 bytes; the charset keeps them safe in QEMU
/// options and guest scripts.
fn check_serial(serial: &str) -> Result<(), Error> {
    if serial.is_empty() || serial.len() > 20 || !serial.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') {
        return Err(Error::Spec(format!("disk serial {serial:?}: 1–20 characters of [A-Za-z0-9_.-]")));
    }
    Ok(())
}

/// A value inside a QEMU `key=value,...` option: commas are doubled.
fn opt(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// Kernel command line: the console on ttyS0 (logged to a file), panics stop
/// the VM (`-no-reboot`); `quiet` because under TCG every byte on the serial
/// port costs an emulated port write.
const CMDLINE: &str = "console=ttyS0 quiet panic=-1 mitigations=off random.trust_cpu=on";

fn qemu_args(image: &GuestImage, spec: &VmSpec, accel: Accel, console: &Path, qmp: &Path, kernel_log: &Path) -> Result<Vec<String>, Error> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let (accel_name, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg", "max"),
    };
    push(&["-name", "thinbox-guest", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
    push(&["-machine", "q35", "-accel", accel_name, "-cpu", cpu]);
    push(&["-smp", &spec.cpus.to_string(), "-m", &format!("{}M", spec.mem_mib)]);
    push(&["-kernel", &image.kernel.to_string_lossy(), "-initrd", &image.initramfs.to_string_lossy(), "-append", CMDLINE]);
    push(&["-chardev", &format!("file,id=klog,path={}", opt(kernel_log)), "-serial", "chardev:klog"]);
    // The shell's channel: a virtio serial port. A UART's output is paced
    // like a serial line (~20 KB/s), and a virtconsole drops what the socket
    // does not take at once; a port throttles the guest instead.
    push(&["-device", "virtio-serial-pci,id=thinbox-vser"]);
    push(&["-chardev", &format!("socket,id=con,path={},server=on,wait=on", opt(console))]);
    push(&["-device", "virtserialport,chardev=con,name=thinbox.console,id=thinbox-con"]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", opt(qmp))]);
    if !spec.virtiofs.is_empty() {
        // vhost-user needs guest RAM the daemon can map.
        push(&["-object", &format!("memory-backend-memfd,id=mem,size={}M,share=on", spec.mem_mib), "-numa", "node,memdev=mem"]);
    }
    for i in 0..spec.hotplug_slots {
        push(&["-device", &format!("pcie-root-port,id=thinbox-hp{i},bus=pcie.0,chassis={0},slot={0}", i + 1)]);
    }
    for (i, d) in spec.disks.iter().enumerate() {
        let meta = fs::metadata(&d.path).map_err(Error::io("stat", &d.path))?;
        let driver = if meta.file_type().is_block_device() { "host_device" } else { "file" };
        let node = serde_json::json!({
            "driver": "raw",
            "node-name": format!("bootdisk{i}"),
            "read-only": d.read_only,
            "file": {
                "driver": driver,
                "filename": d.path,
                "read-only": d.read_only,
                "cache": { "direct": d.cache_direct },
            },
        });
        push(&["-blockdev", &node.to_string()]);
        push(&["-device", &format!("virtio-blk-pci,drive=bootdisk{i},id=bootdisk{i}-dev,serial={}", d.serial)]);
    }
    for (i, s) in spec.shares_9p.iter().enumerate() {
        let ro = if s.read_only { ",readonly=on" } else { "" };
        push(&["-fsdev", &format!("local,id=fs{i},path={},security_model=none,multidevs=remap{ro}", opt(&s.path))]);
        push(&["-device", &format!("virtio-9p-pci,fsdev=fs{i},mount_tag={}", s.tag)]);
    }
    for (i, v) in spec.virtiofs.iter().enumerate() {
        push(&["-chardev", &format!("socket,id=vfs{i},path={}", opt(&v.socket))]);
        push(&["-device", &format!("vhost-user-fs-pci,chardev=vfs{i},tag={}", v.tag)]);
    }
    Ok(a)
}

/// The last few KiB of a log file, for error messages.
pub(crate) fn tail_of(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(len.saturating_sub(3000)));
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn command_line_has_ports_disks_shares_and_memfd_for_virtiofs() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("d,1.img");
        fs::write(&disk, b"").unwrap();
        let image = GuestImage { kernel: "/k".into(), initramfs: "/i".into(), kernel_version: "v".into() };
        let spec = VmSpec {
            hotplug_slots: 2,
            disks: vec![BootDisk { path: disk.clone(), serial: "data0".into(), read_only: true, cache_direct: true }],
            shares_9p: vec![Share9p { tag: "host".into(), path: "/srv".into(), read_only: true }],
            virtiofs: vec![VirtioFs { tag: "vfs".into(), socket: "/run/v.sock".into() }],
            ..Default::default()
        };
        let a = qemu_args(&image, &spec, Accel::Tcg, Path::new("/w/c.sock"), Path::new("/w/q.sock"), Path::new("/w/k.log")).unwrap().join(" ");
        assert!(a.contains("-accel tcg -cpu max"), "{a}");
        assert!(a.contains("pcie-root-port,id=thinbox-hp0,bus=pcie.0,chassis=1,slot=1"), "{a}");
        assert!(a.contains("pcie-root-port,id=thinbox-hp1,bus=pcie.0,chassis=2,slot=2"), "{a}");
        assert!(a.contains("virtio-blk-pci,drive=bootdisk0,id=bootdisk0-dev,serial=data0"), "{a}");
        assert!(a.contains(r#""cache":{"direct":true}"#) && a.contains(&format!(r#""filename":"{}""#, disk.display())), "{a}");
        assert!(a.contains("path=/srv,security_model=none,multidevs=remap,readonly=on"), "{a}");
        assert!(a.contains("memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem"), "{a}");
        assert!(a.contains("vhost-user-fs-pci,chardev=vfs0,tag=vfs"), "{a}");
        assert_eq!(opt(Path::new("/a,b")), "/a,,b");
        let kvm = qemu_args(&image, &VmSpec::default(), Accel::Kvm, Path::new("/c"), Path::new("/q"), Path::new("/k")).unwrap().join(" ");
        assert!(kvm.contains("-accel kvm -cpu host") && !kvm.contains("memfd"), "{kvm}");
    }

    #[test]
    fn spec_checks() {
        assert!(validate(&VmSpec::default()).is_ok());
        assert!(validate(&VmSpec { cpus: 0, ..Default::default() }).is_err());
        let long = BootDisk { path: "/x".into(), serial: "s".repeat(21), read_only: false, cache_direct: false };
        assert!(matches!(validate(&VmSpec { disks: vec![long], ..Default::default() }), Err(Error::Spec(_))));
        assert!(check_serial("vol-1.a_b").is_ok() && check_serial("a b").is_err() && check_serial("a,b").is_err());
    }
}
