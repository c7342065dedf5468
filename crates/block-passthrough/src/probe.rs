//! Can this host run VM sandboxes with KVM?
//!
//! [`kvm`] asks `/dev/kvm` what the kernel says, through the `kvm-ioctls`
//! crate (which keeps its ioctls, and their `unsafe`, to itself): it opens
//! the device, checks the API version (12 since Linux 2.6.22; anything else
//! means a kernel this userspace does not speak to), asks for the recommended
//! and maximum vCPU counts, and creates (and drops) an empty VM, which is what
//! fails when the device exists but virtualisation is off or taken.
//!
//! Limitation: this is what the ioctls say, not a boot. A kernel can accept
//! all of them and still not run a standard guest: a PVM host (`kvm_pvm`,
//! paravirtualised KVM inside a VM) answers like real KVM, but QEMU's default
//! guest aborts under `-accel kvm` there (it fails to set MSRs). Only booting
//! a guest settles it; the VM test harness does that and falls back to TCG.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;

/// The device the probe opens.
pub const KVM_DEVICE: &str = "/dev/kvm";
/// `KVM_API_VERSION`: the only version the kernel has ever reported.
pub const KVM_API_VERSION: i32 = 12;

/// What [`kvm`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmProbe {
    /// `/dev/kvm` opened, spoke API version 12 and created a VM.
    pub usable: bool,
    /// `KVM_GET_API_VERSION`, when the device could be opened.
    pub api_version: Option<i32>,
    /// `KVM_CAP_MAX_VCPUS`: the most vCPUs one VM may have.
    pub max_vcpus: Option<usize>,
    /// `KVM_CAP_NR_VCPUS`: the most vCPUs the kernel recommends (usually the host's CPUs).
    pub recommended_vcpus: Option<usize>,
    /// Why KVM is not usable; `None` when it is.
    pub reason: Option<String>,
}

/// Probes [`KVM_DEVICE`].
pub fn kvm() -> KvmProbe {
    kvm_at(Path::new(KVM_DEVICE))
}

/// Probes the KVM device at `device` (tests point it elsewhere).
pub fn kvm_at(device: &Path) -> KvmProbe {
    let mut probe = KvmProbe { usable: false, api_version: None, max_vcpus: None, recommended_vcpus: None, reason: None };
    let Ok(path) = CString::new(device.as_os_str().as_bytes()) else {
        probe.reason = Some(format!("{} contains a NUL byte", device.display()));
        return probe;
    };
    let kvm = match Kvm::new_with_path(&path) {
        Ok(kvm) => kvm,
        Err(e) => {
            probe.reason = Some(format!("open {}: {e}", device.display()));
            return probe;
        }
    };
    let version = kvm.get_api_version();
    if version < 0 {
        // The ioctl failed (the crate hands back its raw -1; errno is still
        // this thread's): not a KVM device.
        let errno = std::io::Error::last_os_error();
        probe.reason = Some(format!("{} is not a KVM device (KVM_GET_API_VERSION: {errno})", device.display()));
        return probe;
    }
    probe.api_version = Some(version);
    if version != KVM_API_VERSION {
        probe.reason = Some(format!("KVM API version {version}, expected {KVM_API_VERSION}"));
        return probe;
    }
    probe.recommended_vcpus = Some(kvm.get_nr_vcpus());
    probe.max_vcpus = Some(kvm.get_max_vcpus());
    if !kvm.check_extension(Cap::UserMemory) {
        probe.reason = Some("KVM lacks KVM_CAP_USER_MEMORY".into());
        return probe;
    }
    match kvm.create_vm() {
        Ok(vm) => drop(vm),
        Err(e) => {
            probe.reason = Some(format!("KVM_CREATE_VM: {e}"));
            return probe;
        }
    }
    probe.usable = true;
    probe
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn coherent(p: &KvmProbe) {
        if p.usable {
            assert_eq!(p.api_version, Some(KVM_API_VERSION), "{p:?}");
            assert_eq!(p.reason, None, "{p:?}");
            let (max, rec) = (p.max_vcpus.unwrap(), p.recommended_vcpus.unwrap());
            assert!(rec >= 1 && max >= rec, "{p:?}");
        } else {
            assert!(p.reason.as_deref().is_some_and(|r| !r.is_empty()), "{p:?}");
        }
    }

    /// Whatever this host has, the answer hangs together (with /dev/kvm
    /// here, a PVM host, the ioctls say usable).
    #[test]
    fn the_host_probe_is_coherent() {
        let p = kvm();
        coherent(&p);
        if !Path::new(KVM_DEVICE).exists() {
            assert!(!p.usable);
            assert!(p.reason.as_deref().unwrap().starts_with("open /dev/kvm"), "{p:?}");
        }
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["usable"], p.usable);
        assert!(json.get("recommended_vcpus").is_some() && json.get("reason").is_some());
    }

    #[test]
    fn a_missing_or_foreign_device_is_not_usable_and_says_why() {
        let p = kvm_at(Path::new("/nonexistent/kvm"));
        coherent(&p);
        assert_eq!((p.usable, p.api_version), (false, None));
        assert!(p.reason.as_deref().unwrap().starts_with("open /nonexistent/kvm: "), "{p:?}");
        let p = kvm_at(Path::new("/dev/null"));
        coherent(&p);
        assert_eq!((p.usable, p.api_version), (false, None));
        let reason = p.reason.unwrap();
        assert!(reason.contains("not a KVM device") && reason.contains("os error 25"), "ENOTTY: {reason}");
    }
}
