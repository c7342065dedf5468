//! The guest image: Debian's current kernel as a PVH ELF and an initramfs of
//! busybox, the kernel modules the tests need and a few host tools, built
//! once into a cache directory.
//!
//! Build steps (all host tools, run from here): `apt-cache depends
//! linux-image-amd64` names the current kernel package; `apt-get download`
//! fetches it and `dpkg -x` unpacks it (nothing is installed); `depmod -b`
//! makes its `modules.dep` and `modprobe --show-depends` gives each module's
//! load order; the ELF `vmlinux` is the xz stream inside the bzImage (booting
//! it through PVH skips the decompressor, ~5 s under TCG); binaries are
//! copied with the libraries `ldd` names. Everything is written to a private
//! directory and renamed into place, so a half-built image is never used.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use crate::Error;
use crate::cpio::{Archive, Entry};

/// Kernel modules loaded at boot, with their dependencies: the device
/// drivers (nothing else would load them: the guest has no udev), the
/// console (virtio-console), virtio-blk for disks, 9p and virtio-fs
/// transports, loop, device-mapper and its thin pool.
pub const BOOT_MODULES: &[&str] = &["virtio_pci", "virtio_console", "virtio_blk", "9pnet_virtio", "9p", "virtiofs", "loop", "dm-thin-pool"];

/// Modules in the image that load on first use: the kernel asks
/// `/sbin/modprobe` (busybox, reading the image's `modules.dep` and
/// `modules.alias`) for `fs-ext4` or `fs-xfs` at mount time. Loading them at
/// boot would cost about a second under TCG.
pub const ON_DEMAND_MODULES: &[&str] = &["ext4", "xfs"];

/// Host binaries copied into the guest's `/usr/local/bin` (ahead of
/// busybox's applets in `PATH`), with their libraries: fio (libaio and
/// io_uring engines are built in), mkfs for ext4 and xfs, dmsetup.
pub const TOOLS: &[&str] = &["fio", "mke2fs", "mkfs.xfs", "dmsetup", "blkid"];

const INIT: &str = include_str!("guest/init.sh");
const CONSOLE: &str = include_str!("guest/console.sh");
/// Bumped when the recipe changes in a way the lists above do not show.
const RECIPE_VERSION: u32 = 1;

/// A built guest: boot it with [`crate::Vm::boot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The uncompressed kernel ELF (PVH entry point), for QEMU's `-kernel`.
    pub kernel: PathBuf,
    /// The uncompressed newc cpio archive, for `-initrd`.
    pub initramfs: PathBuf,
    /// `uname -r` inside the guest, e.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
}

/// One build at a time per process; the lock file orders processes.
static BUILD: Mutex<()> = Mutex::new(());

impl GuestImage {
    /// `$THINBOX_GUEST_CACHE`, else `/var/cache/thinbox/guest`.
    pub fn default_cache_dir() -> PathBuf {
        std::env::var_os("THINBOX_GUEST_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/cache/thinbox/guest"))
    }

    /// The image for the current Debian kernel package under `cache_dir`
    /// (`<kernel-version>-<recipe hash>/`), built if missing. The hash covers
    /// the module and tool lists and the guest scripts, so a changed recipe
    /// builds anew beside the old image.
    pub fn ensure(cache_dir: &Path) -> Result<GuestImage, Error> {
        let package = current_kernel_package()?;
        let version = package.trim_start_matches("linux-image-").to_owned();
        let dir = cache_dir.join(format!("{version}-{:08x}", recipe_hash()));
        let image = GuestImage { kernel: dir.join("vmlinux"), initramfs: dir.join("initramfs.cpio"), kernel_version: version.clone() };
        if image.kernel.is_file() && image.initramfs.is_file() {
            return Ok(image);
        }
        let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        fs::create_dir_all(cache_dir).map_err(Error::io("create", cache_dir))?;
        let lock_path = cache_dir.join(".lock");
        let lock = File::create(&lock_path).map_err(Error::io("create", &lock_path))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(|e| Error::io("lock", &lock_path)(e.into()))?;
        // Another process may have finished it while we waited.
        if image.kernel.is_file() && image.initramfs.is_file() {
            return Ok(image);
        }
        // Holding the lock, any build directory is a dead build's. Images of
        // other recipes or kernels go once unused for two days (relatime
        // lags by up to one); until then a process still running an older
        // build may boot from its image.
        let unused = std::time::Duration::from_secs(2 * 24 * 3600);
        for e in fs::read_dir(cache_dir).map_err(Error::io("list", cache_dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = || {
                e.path()
                    .join("initramfs.cpio")
                    .metadata()
                    .and_then(|m| m.accessed())
                    .map(|t| t.elapsed().unwrap_or_default() > unused)
                    .unwrap_or(true)
            };
            if name.starts_with(".build-") || (e.path() != dir && e.path().is_dir() && !name.starts_with('.') && stale()) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        let started = Instant::now();
        let tmp = cache_dir.join(format!(".build-{}", std::process::id()));
        let result = build(&package, &version, &tmp).and_then(|()| {
            // Only the products move into place; the unpacked package is dropped.
            let out = tmp.join("out");
            fs::rename(&out, &dir).map_err(Error::io("rename into", &dir))
        });
        let _ = fs::remove_dir_all(&tmp);
        result?;
        tracing::info!(dir = %dir.display(), secs = started.elapsed().as_secs_f64(), "guest image built");
        Ok(image)
    }
}

/// FNV-1a over everything that shapes the image besides the kernel package.
fn recipe_hash() -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut feed = |b: &[u8]| {
        for &x in b.iter().chain(&[0u8]) {
            h ^= u32::from(x);
            h = h.wrapping_mul(0x0100_0193);
        }
    };
    feed(&RECIPE_VERSION.to_le_bytes());
    BOOT_MODULES.iter().chain(ON_DEMAND_MODULES).chain(TOOLS).for_each(|s| feed(s.as_bytes()));
    feed(INIT.as_bytes());
    feed(CONSOLE.as_bytes());
    h
}

/// Runs a tool; its stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> Result<String, Error> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.stdin(Stdio::null()).output().map_err(|source| Error::Spawn { tool: tool.clone(), source })?;
    if !out.status.success() {
        return Err(Error::Tool { tool, status: out.status.to_string(), stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `linux-image-6.1.0-N-amd64`, the package `linux-image-amd64` depends on.
fn current_kernel_package() -> Result<String, Error> {
    let out = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    parse_kernel_package(&out).ok_or(Error::NoKernelPackage)
}

fn parse_kernel_package(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && !p.contains('<'))
        .map(str::to_owned)
}

fn build(package: &str, version: &str, tmp: &Path) -> Result<(), Error> {
    let out = tmp.join("out");
    let root = tmp.join("pkg");
    fs::create_dir_all(&out).map_err(Error::io("create", &out))?;
    // The download runs as whoever we are: apt's `_apt` sandbox user could
    // not write into a root-only cache directory.
    run(Command::new("apt-get").args(["-q", "-o", "APT::Sandbox::User=root", "download", package]).current_dir(tmp))?;
    let deb = fs::read_dir(tmp)
        .map_err(Error::io("list", tmp))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| Error::Tool { tool: "apt-get".into(), status: "0".into(), stderr: format!("no .deb of {package} in {}", tmp.display()) })?;
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    let _ = fs::remove_file(&deb);

    let config = root.join(format!("boot/config-{version}"));
    let config_text = fs::read_to_string(&config).map_err(Error::io("read", &config))?;
    if !config_text.lines().any(|l| l == "CONFIG_PVH=y") {
        return Err(Error::NoPvh { version: version.to_owned() });
    }
    extract_vmlinux(&root.join(format!("boot/vmlinuz-{version}")), &out.join("vmlinux"))?;

    let mut archive = Archive::default();
    for d in ["proc", "sys", "dev", "tmp", "run", "mnt", "root", "etc/thinbox"] {
        archive.add(d, Entry::Dir);
    }
    archive.add("dev/console", Entry::CharDev { major: 5, minor: 1, mode: 0o600 });
    archive.add("init", Entry::Data { data: INIT.as_bytes().to_vec(), mode: 0o755 });
    archive.add("etc/thinbox/console", Entry::Data { data: CONSOLE.as_bytes().to_vec(), mode: 0o644 });
    archive.add("etc/thinbox/kernel-version", Entry::Data { data: format!("{version}\n").into_bytes(), mode: 0o644 });

    // Modules in load order, each once.
    run(Command::new("depmod").arg("-b").arg(&root).arg(version))?;
    let modules_root = root.join("lib/modules").join(version);
    let mut boot: Vec<String> = Vec::new();
    let mut included: BTreeSet<String> = BTreeSet::new();
    for (m, at_boot) in BOOT_MODULES.iter().map(|m| (m, true)).chain(ON_DEMAND_MODULES.iter().map(|m| (m, false))) {
        let deps = run(Command::new("modprobe").arg("-d").arg(&root).args(["-S", version, "--show-depends", m]))?;
        for line in deps.lines() {
            let Some(path) = line.strip_prefix("insmod ").map(|l| l.split_whitespace().next().unwrap_or("")) else {
                continue; // "builtin NAME": nothing to load
            };
            let rel = Path::new(path)
                .strip_prefix(&modules_root)
                .map_err(|_| Error::Tool {
                    tool: "modprobe".into(),
                    status: "0".into(),
                    stderr: format!("module outside {}: {path}", modules_root.display()),
                })?
                .to_string_lossy()
                .into_owned();
            if included.insert(rel.clone()) {
                archive.add(&format!("lib/modules/{version}/{rel}"), Entry::File { from: PathBuf::from(path), mode: 0o644 });
            }
            if at_boot && !boot.contains(&rel) {
                boot.push(rel);
            }
        }
    }
    let list: String = boot.iter().map(|m| format!("{version}/{m}\n")).collect();
    archive.add("etc/thinbox/modules", Entry::Data { data: list.into_bytes(), mode: 0o644 });
    // depmod's indexes, cut down to the modules the image holds.
    let (dep, alias) = (modules_root.join("modules.dep"), modules_root.join("modules.alias"));
    let dep_text = fs::read_to_string(&dep).map_err(Error::io("read", &dep))?;
    let alias_text = fs::read_to_string(&alias).map_err(Error::io("read", &alias))?;
    let (dep_text, alias_text) = filter_module_indexes(&dep_text, &alias_text, &included);
    archive.add(&format!("lib/modules/{version}/modules.dep"), Entry::Data { data: dep_text.into_bytes(), mode: 0o644 });
    archive.add(&format!("lib/modules/{version}/modules.alias"), Entry::Data { data: alias_text.into_bytes(), mode: 0o644 });

    // busybox and its applets; a link named busybox would point at itself.
    let busybox = find_tool("busybox")?;
    add_binary(&mut archive, &busybox, "bin/busybox")?;
    for applet in run(Command::new(&busybox).arg("--list-full"))?.lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet.ends_with("/busybox") || archive.contains(applet) {
            continue;
        }
        archive.add(applet, Entry::Symlink { target: "/bin/busybox".into() });
    }
    for tool in TOOLS {
        let path = find_tool(tool)?;
        add_binary(&mut archive, &path, &format!("usr/local/bin/{tool}"))?;
    }
    archive.add("usr/local/bin/mkfs.ext4", Entry::Symlink { target: "mke2fs".into() });

    let cpio = out.join("initramfs.cpio");
    let size = archive.write(&cpio).map_err(Error::io("write", &cpio))?;
    tracing::debug!(bytes = size, modules = included.len(), "initramfs written");
    File::open(&out).and_then(|d| d.sync_all()).map_err(Error::io("sync", &out))?;
    Ok(())
}

/// `modules.dep` and `modules.alias` lines of the `included` modules
/// (paths relative to the modules directory); alias targets use the module
/// name, where `-` and `_` are the same.
fn filter_module_indexes(dep: &str, alias: &str, included: &BTreeSet<String>) -> (String, String) {
    let name_of = |rel: &str| -> String {
        let file = rel.rsplit('/').next().unwrap_or(rel);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let names: BTreeSet<String> = included.iter().map(|r| name_of(r)).collect();
    let dep_out: String = dep.lines().filter(|l| l.split(':').next().is_some_and(|m| included.contains(m))).map(|l| format!("{l}\n")).collect();
    let alias_out: String = alias
        .lines()
        .filter(|l| l.split_whitespace().nth(2).is_some_and(|m| names.contains(&m.replace('-', "_"))))
        .map(|l| format!("{l}\n"))
        .collect();
    (dep_out, alias_out)
}

/// A tool in the usual system directories.
fn find_tool(name: &str) -> Result<PathBuf, Error> {
    ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::MissingTool { tool: name.to_owned() })
}

/// Copies `host` to `guest_path` with every library `ldd` names, each at the
/// path `ldd` printed (the dynamic loader's default directories).
fn add_binary(archive: &mut Archive, host: &Path, guest_path: &str) -> Result<(), Error> {
    archive.add(guest_path, Entry::File { from: host.to_owned(), mode: 0o755 });
    let out = Command::new("ldd").arg(host).stdin(Stdio::null()).output().map_err(|source| Error::Spawn { tool: "ldd".into(), source })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: ldd says so and exits non-zero.
        if text.contains("not a dynamic executable") || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable") {
            return Ok(());
        }
        return Err(Error::Tool {
            tool: format!("ldd {}", host.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    for lib in parse_ldd(&text).map_err(|missing| Error::MissingLibrary { binary: host.to_owned(), library: missing })? {
        if !archive.contains(&lib) {
            archive.add(&lib, Entry::File { from: PathBuf::from(&lib), mode: 0o755 });
        }
    }
    Ok(())
}

/// The library paths in `ldd` output; `Err(name)` for one not found.
fn parse_ldd(text: &str) -> Result<BTreeSet<String>, String> {
    let mut libs = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some((name, rest)) = line.split_once(" => ") {
            if rest.starts_with("not found") {
                return Err(name.to_owned());
            }
            if let Some(p) = rest.split_whitespace().next().filter(|p| p.starts_with('/')) {
                libs.insert(p.to_owned());
            }
        } else if let Some(p) = line.split_whitespace().next().filter(|p| p.starts_with('/')) {
            libs.insert(p.to_owned()); // the dynamic loader
        }
    }
    Ok(libs)
}

/// The ELF kernel inside a bzImage: the payload is one xz stream; `xz
/// --single-stream` ignores what follows it. The first magic that
/// decompresses to an ELF wins.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<(), Error> {
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
    let data = fs::read(bzimage).map_err(Error::io("read", bzimage))?;
    for start in data.windows(XZ_MAGIC.len()).enumerate().filter(|(_, w)| *w == XZ_MAGIC).map(|(i, _)| i) {
        let file = File::create(out).map_err(Error::io("create", out))?;
        let mut child = Command::new("xz")
            .args(["-dc", "--single-stream"])
            .stdin(Stdio::piped())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn { tool: "xz".into(), source })?;
        let mut stdin = child.stdin.take().ok_or(Error::Spawn { tool: "xz".into(), source: io::Error::other("no stdin") })?;
        // xz stops reading at the end of the stream: a broken pipe is expected.
        match stdin.write_all(&data[start..]) {
            Ok(()) | Err(_) => drop(stdin),
        }
        let status = child.wait().map_err(|source| Error::Spawn { tool: "xz".into(), source })?;
        let mut magic = [0u8; 4];
        let is_elf = File::open(out).and_then(|mut f| io::Read::read_exact(&mut f, &mut magic)).is_ok() && &magic == b"\x7fELF";
        if status.success() && is_elf {
            fs::set_permissions(out, fs::Permissions::from_mode(0o644)).map_err(Error::io("chmod", out))?;
            return Ok(());
        }
    }
    let _ = fs::remove_file(out);
    Err(Error::NoElfKernel { bzimage: bzimage.to_owned() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn kernel_package_from_apt_cache_depends() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(parse_kernel_package(out).as_deref(), Some("linux-image-6.1.0-56-amd64"));
        assert_eq!(parse_kernel_package("linux-image-amd64\n  Depends: <linux-image-6.1.0-1-amd64>\n"), None);
        assert_eq!(parse_kernel_package(""), None);
    }

    #[test]
    fn ldd_paths_loader_included_vdso_skipped_missing_named() {
        let out = "\tlinux-vdso.so.1 (0x00007f)\n\tlibaio.so.1 => /lib/x86_64-linux-gnu/libaio.so.1 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 (0x2)\n";
        let libs = parse_ldd(out).unwrap();
        assert_eq!(libs.into_iter().collect::<Vec<_>>(), ["/lib/x86_64-linux-gnu/libaio.so.1", "/lib64/ld-linux-x86-64.so.2"]);
        assert_eq!(parse_ldd("\tlibfoo.so.1 => not found\n"), Err("libfoo.so.1".to_owned()));
    }

    #[test]
    fn module_indexes_keep_only_included_modules() {
        let dep = "kernel/fs/xfs/xfs.ko: kernel/lib/libcrc32c.ko\nkernel/lib/libcrc32c.ko:\nkernel/fs/btrfs/btrfs.ko: kernel/lib/libcrc32c.ko\n";
        let alias = "alias fs-xfs xfs\nalias fs-btrfs btrfs\nalias devname:mapper/control dm_mod\n";
        let included: BTreeSet<String> = ["kernel/fs/xfs/xfs.ko", "kernel/lib/libcrc32c.ko", "kernel/drivers/md/dm-mod.ko"].map(String::from).into();
        let (d, a) = filter_module_indexes(dep, alias, &included);
        assert_eq!(d, "kernel/fs/xfs/xfs.ko: kernel/lib/libcrc32c.ko\nkernel/lib/libcrc32c.ko:\n");
        assert_eq!(a, "alias fs-xfs xfs\nalias devname:mapper/control dm_mod\n");
    }

    #[test]
    fn recipe_hash_is_stable_within_a_build() {
        assert_eq!(recipe_hash(), recipe_hash());
    }
}
