//! A guest for one row, through `thinbox-guest-vm`: boot, shell scripts,
//! and fio jobs whose JSON comes back over the console.

use std::path::Path;
use std::time::Duration;

use thinbox_guest_vm::{Accel, AccelChoice, GuestImage, Vm, VmSpec};

use crate::Error;
use crate::fio::{FioOutput, Measurement, between_marks, guest_script, tail};
use crate::jobs::{FioParams, Job};
use crate::report::GuestInfo;
use crate::rows::guest_file;
use crate::sys::{GUEST_DROP_CACHES, drop_caches};

/// What every guest of a run shares.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// The kernel and initramfs.
    pub image: GuestImage,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub mem_mib: u32,
    /// KVM, TCG, or KVM where it works.
    pub accel: AccelChoice,
}

impl GuestConfig {
    /// A spec with this config and no devices.
    pub fn spec(&self) -> VmSpec {
        VmSpec { mem_mib: self.mem_mib, cpus: self.cpus, accel: self.accel, ..VmSpec::default() }
    }
}

/// A booted guest.
#[derive(Debug)]
pub struct Guest {
    vm: Vm,
    info: GuestInfo,
}

/// Shell commands of the setup: mounting, checking, laying out.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

impl Guest {
    /// Boots `spec` with its sockets and logs in `workdir`, and asks the
    /// guest for its kernel and fio versions.
    pub fn boot(cfg: &GuestConfig, spec: &VmSpec, workdir: &Path) -> Result<Guest, Error> {
        let mut vm = Vm::boot(&cfg.image, spec, workdir).map_err(Error::guest("booting"))?;
        let out = vm.run_ok("uname -r; fio --version", SETUP_TIMEOUT).map_err(Error::guest("asking for versions"))?;
        let mut lines = out.lines().map(str::trim).filter(|l| !l.is_empty());
        let kernel = lines.next().unwrap_or("unknown").to_owned();
        let fio_version = lines.next().unwrap_or("unknown").to_owned();
        let accel = match vm.accel() {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        };
        let info = GuestInfo { accel: accel.into(), cpus: spec.cpus, mem_mib: spec.mem_mib, kernel, fio_version };
        Ok(Guest { vm, info })
    }

    /// How it runs.
    pub fn info(&self) -> &GuestInfo {
        &self.info
    }

    /// Runs a setup script; its output, or an error naming `what`.
    pub fn sh(&mut self, what: &'static str, script: &str, timeout: Duration) -> Result<String, Error> {
        self.vm.run_ok(script, timeout).map_err(Error::guest(what))
    }

    /// A virtio-blk disk's `/dev/vdX` by serial.
    pub fn disk(&mut self, serial: &str) -> Result<String, Error> {
        self.vm.wait_for_disk(serial, Duration::from_secs(30)).map_err(Error::guest("finding the disk"))
    }

    /// Mounts `source` (`-t fstype -o options`) at `mountpoint` and checks
    /// that `file` there has `size` bytes (skipped when `size` is `None`).
    pub fn mount(&mut self, fstype: &str, options: &str, source: &str, mountpoint: &str, file: Option<(&str, u64)>) -> Result<(), Error> {
        let opts = if options.is_empty() { String::new() } else { format!(" -o {options}") };
        let mut script = format!("set -e; mkdir -p {mountpoint}; mount -t {fstype}{opts} {source} {mountpoint}");
        if let Some((f, size)) = file {
            script.push_str(&format!("; s=$(stat -c %s {f}); [ \"$s\" = {size} ] || {{ echo \"{f} has $s bytes, not {size}\"; exit 1; }}"));
        }
        self.sh("mounting the storage under test", &script, SETUP_TIMEOUT).map(drop)
    }

    /// Writes `file` of `size` bytes with fio (1 MiB sequential direct writes).
    pub fn lay_out(&mut self, file: &str, size: u64) -> Result<(), Error> {
        let args = [
            "--name=layout".to_owned(),
            format!("--filename={file}"),
            "--rw=write".into(),
            "--bs=1M".into(),
            format!("--size={size}"),
            "--direct=1".into(),
            "--ioengine=libaio".into(),
            "--iodepth=4".into(),
        ];
        let script = format!("{} && sync", guest_script(&args));
        // A slow TCG guest writes some tens of MB/s.
        let timeout = SETUP_TIMEOUT + Duration::from_secs(size / (2 << 20));
        self.sh("laying out the test file", &script, timeout).map(drop)
    }

    /// Runs one fio job on the row's test file ([`guest_file`]) after
    /// dropping the host's and the guest's caches.
    pub fn fio(&mut self, job: &Job, params: &FioParams) -> Result<Measurement, Error> {
        drop_caches()?;
        let script = format!("{GUEST_DROP_CACHES}; {}", guest_script(&params.args(job, &guest_file())));
        // fio's own start-up is slow under TCG; the job itself is bounded by --runtime.
        let timeout = Duration::from_secs(u64::from(params.job_secs()) * 3 + 120);
        let out = self.vm.run(&script, timeout).map_err(Error::guest("running fio"))?;
        let json = between_marks(&out.stdout);
        if out.status != 0 {
            return Err(Error::Tool { tool: "fio in the guest".into(), reason: format!("exit {}: {}", out.status, tail(&out.stdout, 15)) });
        }
        let json =
            json.ok_or_else(|| Error::Tool { tool: "fio in the guest".into(), reason: format!("no JSON in the output: {}", tail(&out.stdout, 10)) })?;
        FioOutput::parse(json)?.measurement(job)
    }

    /// Powers the guest off.
    pub fn shutdown(self) -> Result<(), Error> {
        self.vm.shutdown().map_err(Error::guest("shutting down"))
    }
}
