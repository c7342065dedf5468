//! The node's side of the driver: publications (host mounts, raw block
//! bind mounts, Kata direct-volume records), node expansion and statistics.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use rustix::mount::{MountFlags, UnmountFlags, mount, mount_bind, mount_remount, unmount};
use thinbox_block_passthrough::kata_shim::GuestStats;
use thinbox_block_passthrough::{MountInfo, metadata as kata};
use thinbox_blockstore::{Bytes, FsType, embedded, fault, image, mountinfo};

use crate::controller::CreateRequest;
use crate::driver::{Driver, SHIM_TIMEOUT};
use crate::error::{Error, Result, invalid};
use crate::ownership;
use crate::state::{self, Mode, PUBLICATIONS, Publication, Sandbox, Volume};
use crate::storage::Shape;

/// How to publish, already decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessType {
    /// A filesystem, with mount flags.
    Mount { fs: Option<FsType>, flags: Vec<String> },
    /// The raw device.
    Block,
}

/// Usage figures of a published volume, and its condition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Capacity in bytes.
    pub total: u64,
    /// Bytes in use (filesystem) or allocated (direct volume).
    pub used: u64,
    /// Bytes available (filesystem only).
    pub available: u64,
    /// Inode figures (filesystem only): total, used, free.
    pub inodes: Option<(u64, u64, u64)>,
    /// Its condition (VOLUME_CONDITION).
    pub condition: Condition,
}

/// A published volume's condition, as NodeGetVolumeStats reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Condition {
    /// Something is wrong with it.
    pub abnormal: bool,
    /// What, or where the figures come from.
    pub message: String,
}

impl Condition {
    fn from_wrong(wrong: Option<String>) -> Condition {
        match wrong {
            Some(message) => Condition { abnormal: true, message },
            None => Condition { abnormal: false, message: "healthy".into() },
        }
    }
}

impl Driver {
    /// NodePublishVolume. `target` has been checked (see [`crate::paths`]);
    /// `group` (a pod's fsGroup) comes to own the filesystem's files.
    pub fn publish(&self, id: &str, target: &Path, access: &AccessType, readonly: bool, sandbox: Option<Sandbox>, group: Option<u32>) -> Result<()> {
        let _s = self.serial();
        let vol = self.require(id)?;
        let sandbox = sandbox.or(vol.sandbox).unwrap_or(self.cfg.default_sandbox);
        let directory = self.storage(vol.kind).shape() == Shape::Directory;
        let (mode, flags) = match (access, sandbox) {
            // A directory is shared as it is: bind-mounted on the host, and over
            // virtio-fs into a Kata guest.
            (AccessType::Mount { flags, .. }, _) if directory => (Mode::HostMount, flags.clone()),
            (AccessType::Block, _) if directory => {
                return Err(invalid(format!("volume {id} is a directory; it has no block device")));
            }
            (AccessType::Block, Sandbox::Runc) => (Mode::HostBlock, Vec::new()),
            (AccessType::Block, Sandbox::Kata) => (Mode::Kata, Vec::new()),
            (AccessType::Mount { fs, flags }, sandbox) => {
                let Some(vol_fs) = vol.fs else {
                    return Err(Error::FailedPrecondition(format!("volume {id} is a raw block volume; it has no filesystem to mount")));
                };
                if fs.is_some_and(|f| f != vol_fs) {
                    return Err(invalid(format!("volume {id} holds {}, not {}", vol_fs.as_str(), fs.map(FsType::as_str).unwrap_or_default())));
                }
                (if sandbox == Sandbox::Kata { Mode::Kata } else { Mode::HostMount }, flags.clone())
            }
        };
        if let Some(enc) = vol.encryption
            && (mode != Mode::Kata || *access == AccessType::Block)
        {
            return Err(invalid(format!(
                "volume {id} is encrypted ({}) by a Kata guest, which formats it: it is published to a Kata sandbox with filesystem access only",
                enc.as_str()
            )));
        }
        // A raw device has no files to own.
        let group = group.filter(|_| *access != AccessType::Block);
        let wanted = Publication { volume: id.to_owned(), target: target.to_owned(), mode, readonly, flags, group };
        if let Some(existing) = self.publication(target)? {
            if existing == wanted {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "{} is already published differently ({} as {:?})",
                target.display(),
                existing.volume,
                existing.mode
            )));
        }
        // Never mounted on the host while a guest has it, and the reverse.
        if let Some(other) = self.publications_of(id)?.into_iter().find(|p| (p.mode == Mode::Kata) != (mode == Mode::Kata)) {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is published at {} for a {} sandbox; a filesystem is never in a guest and on the host at once",
                other.target.display(),
                if other.mode == Mode::Kata { "Kata" } else { "runC" }
            )));
        }
        let txn = self.pool().store().write()?;
        state::put(&mut txn.open_table(PUBLICATIONS)?, &target.to_string_lossy(), &wanted)?;
        txn.commit()?;
        fault::point("csi.publish.after_record");
        let done = self.storage(vol.kind).attach(&vol.held()).and_then(|node| {
            fault::point("csi.publish.after_attach");
            self.make_target(&vol, &wanted, &node)
        });
        if let Err(e) = done {
            tracing::warn!(volume = %id, target = %target.display(), error = %crate::error::chain(&e), "publish failed; undoing");
            let _ = self.undo_publication(&vol, &wanted);
            return Err(e);
        }
        tracing::info!(volume = %id, target = %target.display(), mode = ?mode, readonly, "published");
        Ok(())
    }

    fn make_target(&self, vol: &Volume, p: &Publication, node: &Path) -> Result<()> {
        let fs_name = vol.fs.map(FsType::as_str).unwrap_or_default();
        match p.mode {
            Mode::HostMount if self.storage(vol.kind).shape() == Shape::Directory => {
                mkdir(&p.target)?;
                if !is_mountpoint(&p.target)? {
                    mount_bind(node, &p.target).map_err(|e| Error::io("bind-mount", node)(e.into()))?;
                    if let Some(gid) = p.group {
                        ownership::set_group(&p.target, gid)?;
                    }
                    let (mut flags, _) = mount_options(&p.flags);
                    if p.readonly {
                        flags |= MountFlags::RDONLY;
                    }
                    if !flags.is_empty() {
                        // Flags of a bind mount change only by remounting it.
                        mount_remount(&p.target, flags | MountFlags::BIND, c"").map_err(|e| Error::io("remount", &p.target)(e.into()))?;
                    }
                }
                Ok(())
            }
            Mode::HostMount => {
                mkdir(&p.target)?;
                let (mut flags, mut data) = mount_options(&p.flags);
                flags |= MountFlags::NOSUID | MountFlags::NODEV;
                // Files get their group on a writable mount, made read-only after.
                let readonly_after = p.readonly && p.group.is_some();
                if p.readonly && !readonly_after {
                    flags |= MountFlags::RDONLY;
                }
                if vol.fs == Some(FsType::Xfs) {
                    data.push("nouuid".into());
                }
                if !is_mountpoint(&p.target)? {
                    let data = std::ffi::CString::new(data.join(",")).map_err(|_| invalid("mount flags must not contain NUL"))?;
                    mount(node, &p.target, fs_name, flags, data.as_c_str()).map_err(|e| Error::io("mount", node)(e.into()))?;
                    if let Some(gid) = p.group {
                        ownership::set_group(&p.target, gid)?;
                    }
                    if readonly_after {
                        mount_remount(&p.target, flags | MountFlags::RDONLY, data.as_c_str())
                            .map_err(|e| Error::io("remount", &p.target)(e.into()))?;
                    }
                }
                Ok(())
            }
            Mode::HostBlock => {
                if !p.target.exists() {
                    fs::File::create(&p.target).map_err(Error::io("create", &p.target))?;
                }
                if !is_mountpoint(&p.target)? {
                    mount_bind(node, &p.target).map_err(|e| Error::io("bind-mount", node)(e.into()))?;
                }
                Ok(())
            }
            Mode::Kata => {
                // The runtime looks the target up; the host leaves it empty.
                mkdir(&p.target)?;
                let mut options = p.flags.clone();
                if p.readonly && !options.iter().any(|o| o == "ro") {
                    options.push("ro".into());
                }
                let mut metadata = BTreeMap::from([("thinbox.io/volume".to_owned(), vol.id.clone())]);
                if let Some(enc) = vol.encryption {
                    metadata.insert(kata::ENCRYPTION_KEY.into(), enc.as_str().into());
                    metadata.insert(kata::CREATE_FILESYSTEM.into(), "true".into());
                }
                if let Some(gid) = p.group {
                    metadata.insert(kata::FS_GROUP.into(), gid.to_string());
                }
                let info = MountInfo {
                    volume_type: "block".into(),
                    device: node.display().to_string(),
                    fstype: vol.fs.map(FsType::as_str).unwrap_or_default().to_owned(),
                    metadata,
                    options,
                };
                Ok(self.direct.add(&p.target, &info)?)
            }
        }
    }

    /// NodeUnpublishVolume: idempotent.
    pub fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        let _s = self.serial();
        let Some(p) = self.publication(target)? else {
            // Not ours (or already done): only make sure nothing of ours is left there.
            if is_mountpoint(target)? {
                return Err(Error::FailedPrecondition(format!("{} is mounted, but not by volume {id}", target.display())));
            }
            return Ok(());
        };
        if p.volume != id {
            return Err(Error::NotFound(format!("volume {id} is not published at {}", target.display())));
        }
        let vol = self.volume(id)?.ok_or_else(|| Error::NotFound(format!("volume {id:?} does not exist")))?;
        self.undo_publication(&vol, &p)?;
        if vol.ephemeral {
            self.forget_volume(&vol)?;
        }
        tracing::info!(volume = %id, target = %target.display(), "unpublished");
        Ok(())
    }

    /// Unmounts (or removes the direct-volume record), removes the target,
    /// forgets the publication and detaches the device if nothing else uses it.
    fn undo_publication(&self, vol: &Volume, p: &Publication) -> Result<()> {
        match p.mode {
            Mode::HostMount | Mode::HostBlock => {
                while is_mountpoint(&p.target)? {
                    unmount(&p.target, UnmountFlags::empty()).map_err(|e| Error::io("unmount", &p.target)(e.into()))?;
                }
            }
            Mode::Kata => {
                self.direct.remove(&p.target)?;
            }
        }
        fault::point("csi.unpublish.after_unmount");
        remove_target(&p.target)?;
        let txn = self.pool().store().write()?;
        txn.open_table(PUBLICATIONS)?.remove(p.target.to_string_lossy().as_ref())?;
        txn.commit()?;
        if self.publications_of(&vol.id)?.is_empty() {
            self.storage(vol.kind).detach(&vol.held())?;
        }
        Ok(())
    }

    /// NodePublishVolume of an inline ephemeral volume: made here, named by the
    /// kubelet's volume id, gone at unpublish.
    pub fn publish_ephemeral(
        &self,
        handle: &str,
        target: &Path,
        req: CreateRequest,
        access: &AccessType,
        readonly: bool,
        group: Option<u32>,
    ) -> Result<()> {
        let existing = self.publication(target)?;
        let vol = match self.by_name(handle)? {
            Some(v) => v,
            None => self.create(&CreateRequest { name: handle.to_owned(), ephemeral: true, ..req })?,
        };
        if existing.is_some_and(|p| p.volume != vol.id) {
            return Err(Error::AlreadyExists(format!("{} is already published for another volume", target.display())));
        }
        let sandbox = vol.sandbox;
        match self.publish(&vol.id, target, access, readonly, sandbox, group) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Half-way: the volume must not outlive the failed publish.
                if self.publications_of(&vol.id)?.is_empty() {
                    let _s = self.serial();
                    self.forget_volume(&vol)?;
                }
                Err(e)
            }
        }
    }

    /// The volume published at `target`, by the id the CO uses for it (ours, or
    /// the kubelet's handle of an ephemeral volume).
    pub fn resolve(&self, handle: &str) -> Result<Option<Volume>> {
        match self.volume(handle)? {
            Some(v) => Ok(Some(v)),
            None => self.by_name(handle).map(|v| v.filter(|v| v.ephemeral)),
        }
    }

    /// NodeExpandVolume: grows the volume to the range (if the controller
    /// side has not already: in a cluster one resizer serves every node, so
    /// the node does both), then its filesystem: mounted at `path` on the
    /// host, grown online; held by a Kata sandbox, grown in the guest by the
    /// sandbox's shim (see [`Driver::grow`]); published for Kata with no
    /// sandbox holding it, grown here while nothing uses it. A raw block
    /// volume has none.
    pub fn expand_on_node(&self, id: &str, path: &Path, required: u64, limit: u64) -> Result<Bytes> {
        let p = self.publication(path)?.filter(|p| p.volume == id);
        let p = p.ok_or_else(|| Error::NotFound(format!("volume {id} is not published at {}", path.display())))?;
        self.grow(id, required, limit)?;
        let _s = self.serial();
        let vol = self.require(id)?;
        // A guest-encrypted volume's filesystem is inside LUKS, the guest's.
        let Some(fs) = vol.host_fs() else { return Ok(vol.size) };
        match p.mode {
            Mode::HostMount => {
                let node = self.storage(vol.kind).attach(&vol.held())?;
                image::grow_mounted_fs(fs, &node, path)?;
                tracing::info!(volume = %id, target = %path.display(), "filesystem grown");
            }
            Mode::Kata if self.direct.sandbox(path)?.is_none() => {
                let node = self.storage(vol.kind).attach(&vol.held())?;
                image::grow_unmounted_fs(fs, &node, &self.scratch.join(id))?;
                tracing::info!(volume = %id, target = %path.display(), "filesystem grown while no Kata sandbox holds it");
            }
            Mode::Kata | Mode::HostBlock => {}
        }
        Ok(vol.size)
    }

    /// NodeGetVolumeStats.
    pub fn stats(&self, id: &str, path: &Path) -> Result<Stats> {
        let vol = self.require(id)?;
        let Some(p) = self.publication(path)? else {
            return Err(Error::NotFound(format!("volume {id} is not published at {}", path.display())));
        };
        let condition = Condition::from_wrong(self.condition(&vol, &p));
        if p.mode == Mode::Kata
            && !condition.abnormal
            && let Some(sandbox) = self.direct.sandbox(path)?
        {
            let target = path.to_owned();
            match self.shim(id, &sandbox, |shim| shim.stats(target, SHIM_TIMEOUT)) {
                Ok(guest) => return Ok(guest_stats(guest, &sandbox)),
                Err(e) => {
                    let message = format!("host-side figures: the guest's are not to be had ({})", crate::error::chain(&e));
                    let used = self.allocated(&vol)?;
                    let condition = Condition { abnormal: false, message };
                    return Ok(Stats { total: vol.size.get(), used, available: vol.size.get().saturating_sub(used), inodes: None, condition });
                }
            }
        }
        match p.mode {
            Mode::HostMount => {
                let st = rustix::fs::statvfs(path).map_err(|e| Error::io("statvfs", path)(e.into()))?;
                let total = st.f_blocks * st.f_frsize;
                let available = st.f_bavail * st.f_frsize;
                Ok(Stats {
                    total,
                    used: total - st.f_bfree * st.f_frsize,
                    available,
                    inodes: Some((st.f_files, st.f_files - st.f_ffree, st.f_favail)),
                    condition,
                })
            }
            Mode::HostBlock | Mode::Kata => {
                let used = self.allocated(&vol)?;
                Ok(Stats { total: vol.size.get(), used, available: vol.size.get().saturating_sub(used), inodes: None, condition })
            }
        }
    }

    /// What is wrong with a publication, if anything: its storage gone or
    /// detached, its mount or Kata record gone, or (ext4 mounted here) the
    /// filesystem counting errors.
    fn condition(&self, vol: &Volume, p: &Publication) -> Option<String> {
        if let Some(wrong) = self.storage(vol.kind).condition(&vol.held()) {
            return Some(wrong);
        }
        let mounted = match p.mode {
            Mode::Kata => {
                return match self.direct.get(&p.target) {
                    Ok(Some(_)) => None,
                    Ok(None) => Some("its Kata direct-volume record is gone".into()),
                    Err(e) => Some(format!("its Kata direct-volume record cannot be read: {}", crate::error::chain(&e))),
                };
            }
            Mode::HostMount | Mode::HostBlock => match mountinfo::mount_at(&p.target) {
                Ok(Some(m)) => m,
                Ok(None) => return Some(format!("nothing is mounted at {}", p.target.display())),
                Err(e) => return Some(format!("the mounts cannot be read: {e}")),
            },
        };
        let errors = (mounted.fs_type == "ext4").then(|| ext4_errors(Path::new(&mounted.source))).flatten().filter(|&n| n > 0);
        errors.map(|n| format!("its ext4 filesystem has counted {n} error(s) since it was made (see the kernel log)"))
    }
}

/// The guest's figures, as the shim of `sandbox` gave them (Kata agent's
/// units: 1 bytes, 2 inodes).
fn guest_stats(guest: GuestStats, sandbox: &str) -> Stats {
    let of = |unit| guest.usage.iter().find(|u| u.unit == unit);
    let bytes = of(1).cloned().unwrap_or_default();
    let condition = match guest.volume_condition {
        Some(c) if c.abnormal => Condition { abnormal: true, message: format!("in Kata sandbox {sandbox}: {}", c.message) },
        _ => Condition { abnormal: false, message: format!("healthy (figures from Kata sandbox {sandbox})") },
    };
    Stats { total: bytes.total, used: bytes.used, available: bytes.available, inodes: of(2).map(|i| (i.total, i.used, i.available)), condition }
}

/// The error count ext4 keeps for the filesystem on `node` while it is
/// mounted (`/sys/fs/ext4/<device>/errors_count`).
fn ext4_errors(node: &Path) -> Option<u64> {
    let dev = node.file_name()?.to_str()?;
    std::fs::read_to_string(format!("/sys/fs/ext4/{dev}/errors_count")).ok()?.trim().parse().ok()
}

/// Splits CSI mount flags into the kernel's generic flags and the options
/// the filesystem parses itself.
fn mount_options(flags: &[String]) -> (MountFlags, Vec<String>) {
    let mut out = MountFlags::empty();
    let mut data = Vec::new();
    for f in flags {
        match f.as_str() {
            "ro" => out |= MountFlags::RDONLY,
            "rw" | "defaults" | "relatime" => {}
            "noatime" => out |= MountFlags::NOATIME,
            "nodiratime" => out |= MountFlags::NODIRATIME,
            "strictatime" => out |= MountFlags::STRICTATIME,
            "lazytime" => out |= MountFlags::LAZYTIME,
            "nosuid" => out |= MountFlags::NOSUID,
            "nodev" => out |= MountFlags::NODEV,
            "noexec" => out |= MountFlags::NOEXEC,
            "sync" => out |= MountFlags::SYNCHRONOUS,
            "dirsync" => out |= MountFlags::DIRSYNC,
            other => data.push(other.to_owned()),
        }
    }
    (out, data)
}

fn mkdir(p: &Path) -> Result<()> {
    match fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => Ok(()),
        Err(e) => Err(Error::io("create", p)(e)),
    }
}

pub(crate) fn remove_target(p: &Path) -> Result<()> {
    let removed = match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir(p),
        Ok(_) => fs::remove_file(p),
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", p)(e)),
    }
}

/// Whether `p` is a mount point (a device or bind mount on it).
fn is_mountpoint(p: &Path) -> Result<bool> {
    Ok(embedded::is_mountpoint(p)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn mount_flags_split_into_kernel_flags_and_fs_options() {
        let flags: Vec<String> = ["noatime", "ro", "discard", "data=ordered"].map(String::from).to_vec();
        let (f, data) = mount_options(&flags);
        assert_eq!(f, MountFlags::NOATIME | MountFlags::RDONLY);
        assert_eq!(data, vec!["discard", "data=ordered"]);
    }
}
