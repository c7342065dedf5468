//! Guests on a host directory: the runC row's overlayfs layout, shared over
//! virtio-9p or virtio-fs — how a Kata guest reads a rootfs from containerd's
//! overlayfs snapshotter.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use thinbox_guest_vm::{Share9p, VirtioFs};

use crate::Error;
use crate::fio::{Measurement, run_with_timeout};
use crate::jobs::{FioParams, Job};
use crate::report::{RowInfo, RowKind};
use crate::rows::guest::{Guest, GuestConfig};
use crate::rows::{GUEST_MOUNT, OVERLAY_SETUP, Overlay, Row, guest_file};
use crate::sys::Daemon;

/// The mount tag of both shares.
const TAG: &str = "fiobench";

/// 9p's guest cache mode (`cache=` of the 9p mount).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NinePCache {
    /// No caching; file data goes to the server on every read and write.
    None,
    /// As `none`, plus shared mmap support: Kata's mode.
    Mmap,
    /// Page cache in the guest (not coherent with the host).
    Loose,
}

impl NinePCache {
    fn as_str(self) -> &'static str {
        match self {
            NinePCache::None => "none",
            NinePCache::Mmap => "mmap",
            NinePCache::Loose => "loose",
        }
    }
}

/// Options of the 9p row.
#[derive(Clone, Copy, Debug)]
pub struct NinePOptions {
    /// `msize=` of the mount, bytes.
    pub msize: u32,
    /// `cache=` of the mount.
    pub cache: NinePCache,
}

/// A guest on 9p.
#[derive(Debug)]
pub struct NineP {
    info: RowInfo,
    guest: Guest,
    overlay: Overlay,
}

impl NineP {
    /// Overlay under `dir`, shared into a guest over virtio-9p.
    pub fn setup(dir: &Path, params: &FioParams, cfg: &GuestConfig, opts: NinePOptions) -> Result<NineP, Error> {
        let overlay = Overlay::new(dir, params.file_size)?;
        let mut spec = cfg.spec();
        spec.shares_9p.push(Share9p { tag: TAG.into(), path: overlay.merged().to_owned(), read_only: false });
        let mut guest = Guest::boot(cfg, &spec, &dir.join("vm"))?;
        let mount_opts = format!("trans=virtio,version=9p2000.L,msize={},cache={}", opts.msize, opts.cache.as_str());
        guest.mount("9p", &mount_opts, TAG, GUEST_MOUNT, Some((&guest_file(), params.file_size)))?;
        let setup = format!(
            "guest fio on 9p (QEMU virtio-9p-pci, local fsdev, security_model=none; mount -o {mount_opts}) of the host's {OVERLAY_SETUP}; QEMU ignores O_DIRECT on 9p, so the host side reads and writes through the host page cache (dropped before every job)"
        );
        let info = RowInfo { kind: RowKind::NineP, guest: Some(guest.info().clone()), setup, unavailable: None };
        Ok(NineP { info, guest, overlay })
    }
}

impl Row for NineP {
    fn info(&self) -> &RowInfo {
        &self.info
    }

    fn run(&mut self, job: &Job, params: &FioParams) -> Result<Measurement, Error> {
        self.guest.fio(job, params)
    }

    fn teardown(self: Box<Self>) -> Result<(), Error> {
        let NineP { guest, overlay, .. } = *self;
        let r = guest.shutdown();
        r.and(overlay.teardown())
    }
}

/// virtio-fs cache mode (virtiofsd's `cache`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VirtiofsCache {
    /// Metadata cached for a second, data as `always` unless opened with O_DIRECT.
    Auto,
    /// Everything cached in the guest.
    Always,
    /// Nothing cached in the guest (`never` for the Rust virtiofsd).
    None,
}

impl VirtiofsCache {
    /// The C daemon's name for it.
    fn as_str(self) -> &'static str {
        match self {
            VirtiofsCache::Auto => "auto",
            VirtiofsCache::Always => "always",
            VirtiofsCache::None => "none",
        }
    }
}

/// Which virtiofsd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Virtiofsd {
    /// QEMU's C daemon (`-o source=…` options), from qemu-system-common.
    C(PathBuf),
    /// The Rust daemon (`--shared-dir …`).
    Rust(PathBuf),
}

/// Where QEMU's C virtiofsd lives on Debian.
pub const C_VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";

impl Virtiofsd {
    /// `explicit`, else QEMU's C daemon, else a `virtiofsd` in `PATH` or
    /// `/usr/libexec`; which kind it is comes from its `--help`.
    pub fn find(explicit: Option<&Path>) -> Result<Virtiofsd, String> {
        let path = match explicit {
            Some(p) => p.to_owned(),
            None => std::iter::once(PathBuf::from(C_VIRTIOFSD))
                .chain(std::env::var_os("PATH").iter().flat_map(std::env::split_paths).map(|d| d.join("virtiofsd")))
                .chain(std::iter::once(PathBuf::from("/usr/libexec/virtiofsd")))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    format!("no virtiofsd: {C_VIRTIOFSD} (Debian's qemu-system-common) is absent and no virtiofsd is in PATH or /usr/libexec")
                })?,
        };
        let help = run_with_timeout(Command::new(&path).arg("--help"), Duration::from_secs(30), "virtiofsd --help")
            .map_err(|e| format!("{}: {}", path.display(), crate::chain(&e)))?;
        Ok(if help.contains("--shared-dir") { Virtiofsd::Rust(path) } else { Virtiofsd::C(path) })
    }

    fn path(&self) -> &Path {
        match self {
            Virtiofsd::C(p) | Virtiofsd::Rust(p) => p,
        }
    }

    /// The daemon's arguments.
    pub fn args(&self, socket: &Path, source: &Path, cache: VirtiofsCache, direct_io: bool) -> Vec<String> {
        match self {
            Virtiofsd::C(_) => {
                let mut a = vec![
                    format!("--socket-path={}", socket.display()),
                    "-o".into(),
                    format!("source={}", source.display()),
                    "-o".into(),
                    format!("cache={}", cache.as_str()),
                    "-o".into(),
                    "sandbox=chroot".into(),
                ];
                if direct_io {
                    a.extend(["-o".into(), "allow_direct_io".into()]);
                }
                a
            }
            Virtiofsd::Rust(_) => {
                let cache = match cache {
                    VirtiofsCache::Auto => "auto",
                    VirtiofsCache::Always => "always",
                    VirtiofsCache::None => "never",
                };
                let mut a = vec![
                    format!("--socket-path={}", socket.display()),
                    format!("--shared-dir={}", source.display()),
                    format!("--cache={cache}"),
                    "--sandbox=chroot".into(),
                ];
                if direct_io {
                    a.push("--allow-direct-io".into());
                }
                a
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Virtiofsd::C(p) => format!("QEMU's C virtiofsd ({})", p.display()),
            Virtiofsd::Rust(p) => format!("the Rust virtiofsd ({})", p.display()),
        }
    }
}

/// Options of the virtio-fs row.
#[derive(Clone, Debug)]
pub struct VirtiofsOptions {
    /// The daemon, or why there is none.
    pub daemon: Result<Virtiofsd, String>,
    /// Its cache mode.
    pub cache: VirtiofsCache,
    /// Whether it keeps the guest's O_DIRECT (else the host side is buffered).
    pub direct_io: bool,
}

/// A guest on virtio-fs.
#[derive(Debug)]
pub struct VirtioFsRow {
    info: RowInfo,
    // Drop order: the guest, then its daemon, then the directory.
    guest: Guest,
    daemon: Daemon,
    overlay: Overlay,
}

impl VirtioFsRow {
    /// Overlay under `dir`, virtiofsd on it, a guest on virtiofsd.
    pub fn setup(dir: &Path, params: &FioParams, cfg: &GuestConfig, opts: &VirtiofsOptions) -> Result<VirtioFsRow, Error> {
        let daemon_kind = opts.daemon.clone().map_err(Error::Unavailable)?;
        let overlay = Overlay::new(dir, params.file_size)?;
        let socket = dir.join("vfs.sock");
        let _ = std::fs::remove_file(&socket);
        let args = daemon_kind.args(&socket, overlay.merged(), opts.cache, opts.direct_io);
        let mut daemon = Daemon::spawn("virtiofsd", Command::new(daemon_kind.path()).args(&args), &dir.join("virtiofsd.log"))?;
        daemon.wait_for(&socket, Duration::from_secs(15))?;
        let mut spec = cfg.spec();
        spec.virtiofs.push(VirtioFs { tag: TAG.into(), socket: socket.clone() });
        let mut guest = Guest::boot(cfg, &spec, &dir.join("vm"))?;
        guest.mount("virtiofs", "", TAG, GUEST_MOUNT, Some((&guest_file(), params.file_size)))?;
        let setup = format!(
            "guest fio on virtio-fs (vhost-user-fs-pci; {} cache={}, sandbox=chroot{}) of the host's {OVERLAY_SETUP}; {}",
            daemon_kind.describe(),
            opts.cache.as_str(),
            if opts.direct_io { ", allow_direct_io" } else { "" },
            if opts.direct_io {
                "O_DIRECT kept on the host side (no host page cache)"
            } else {
                "the host side reads and writes through the host page cache (dropped before every job)"
            }
        );
        let info = RowInfo { kind: RowKind::VirtioFs, guest: Some(guest.info().clone()), setup, unavailable: None };
        Ok(VirtioFsRow { info, guest, daemon, overlay })
    }
}

impl Row for VirtioFsRow {
    fn info(&self) -> &RowInfo {
        &self.info
    }

    fn run(&mut self, job: &Job, params: &FioParams) -> Result<Measurement, Error> {
        self.guest.fio(job, params)
    }

    fn teardown(self: Box<Self>) -> Result<(), Error> {
        let VirtioFsRow { guest, daemon, overlay, .. } = *self;
        let r = guest.shutdown();
        drop(daemon);
        r.and(overlay.teardown())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtiofsd_arguments_per_daemon() {
        let c = Virtiofsd::C(C_VIRTIOFSD.into()).args(Path::new("/s.sock"), Path::new("/d"), VirtiofsCache::None, true).join(" ");
        assert_eq!(c, "--socket-path=/s.sock -o source=/d -o cache=none -o sandbox=chroot -o allow_direct_io");
        let r = Virtiofsd::Rust("/usr/libexec/virtiofsd".into()).args(Path::new("/s.sock"), Path::new("/d"), VirtiofsCache::None, false).join(" ");
        assert_eq!(r, "--socket-path=/s.sock --shared-dir=/d --cache=never --sandbox=chroot");
    }
}
