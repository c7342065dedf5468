//! Guests on Thinbox devices passed as virtio-blk (`cache.direct=on`), made
//! in-process by the same library code the daemons run:
//!
//! * rootfs: `thinbox_snapshotter::Snapshots` on the reflink backend with
//!   its embedded pool (a sparse XFS `reflink=1` image on a loop device with
//!   direct I/O). An image layer is prepared, gets the test file, and is
//!   committed; the rootfs is an active snapshot on it (a `FICLONE` of the
//!   layer's image on its own loop device), as containerd would make it.
//! * emptyDir: `thinbox_csi::Driver` publishes an inline ephemeral `file`
//!   volume for Kata (an ext4 device of the pool, as the daemon makes it);
//!   the guest gets the device named in the Kata direct-volume record and
//!   writes the test file itself, as a pod would fill its emptyDir.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rustix::mount::MountFlags;
use thinbox_block_passthrough::DirectVolumes;
use thinbox_blockstore::{BackendKind, Bytes, FsType, PoolConfig};
use thinbox_csi::controller::CreateRequest;
use thinbox_csi::node::AccessType;
use thinbox_csi::state::{Kind as VolumeKind, Sandbox};
use thinbox_guest_vm::BootDisk;
use thinbox_snapshotter::Snapshots;
use thinbox_snapshotter::config::SnapshotConfig;
use thinbox_snapshotter::meta::Kind;

use crate::Error;
use crate::fio::Measurement;
use crate::jobs::{FioParams, Job};
use crate::report::{RowInfo, RowKind, fmt_size};
use crate::rows::guest::{Guest, GuestConfig};
use crate::rows::{FILE_NAME, GUEST_MOUNT, Row, built, guest_file, volume_size};
use crate::sys::{Mounted, write_data_file};

const LAYER: &str = "fio-bench-layer";
const IMAGE: &str = "fio-bench-image";
const ROOTFS: &str = "fio-bench-rootfs";
const ROOTFS_SERIAL: &str = "thinbox-rootfs";
const EMPTYDIR_SERIAL: &str = "thinbox-emptydir";

fn snap_err(op: &'static str) -> impl FnOnce(thinbox_snapshotter::Error) -> Error {
    move |source| Error::Snapshotter { op, source: Box::new(source) }
}

fn csi_err(op: &'static str) -> impl FnOnce(thinbox_csi::error::Error) -> Error {
    move |source| Error::Csi { op, source: Box::new(source) }
}

/// A guest on a rootfs snapshot.
#[derive(Debug)]
pub struct Rootfs {
    info: RowInfo,
    guest: Option<Guest>,
    snapshots: Option<Snapshots>,
    root: PathBuf,
}

/// The embedded pool bypasses the host's page cache, as every other row's
/// storage does: a guest's reads must reach the disk, not the host's memory.
const NO_HOST_CACHE: bool = true;

impl Rootfs {
    /// Snapshotter state under `dir`, the layer, the rootfs, the guest.
    pub fn setup(dir: &Path, params: &FioParams, cfg: &GuestConfig) -> Result<Rootfs, Error> {
        let root = dir.join("snapshotter");
        std::fs::create_dir_all(&root).map_err(Error::io(format!("creating {}", root.display())))?;
        let size = volume_size(params.file_size);
        let pool = PoolConfig {
            backend: BackendKind::Reflink,
            embedded_size: Bytes((size.get() * 4).max(4 << 30)),
            embedded_direct_io: NO_HOST_CACHE,
            ..PoolConfig::default()
        };
        let snapshot = SnapshotConfig { default_size: size, filesystem: FsType::Ext4, ..SnapshotConfig::default() };
        let (snapshots, _) = Snapshots::open(&root, pool, snapshot).map_err(snap_err("opening the snapshotter"))?;
        // From here on, a failure tears down through `Rootfs`'s teardown.
        let row = Rootfs {
            info: RowInfo { kind: RowKind::ThinboxRootfs, guest: None, setup: String::new(), unavailable: None },
            guest: None,
            snapshots: Some(snapshots),
            root,
        };
        built(row, |row| row.build(dir, params, cfg, size))
    }

    fn build(&mut self, dir: &Path, params: &FioParams, cfg: &GuestConfig, size: Bytes) -> Result<(), Error> {
        let Some(snaps) = &self.snapshots else { return Err(Error::Config("snapshotter closed".into())) };
        let layer = snaps.prepare(Kind::Active, LAYER, "", BTreeMap::new()).map_err(snap_err("preparing the layer"))?;
        let node = PathBuf::from(&layer.first().ok_or_else(|| Error::Config("Prepare returned no mount".into()))?.source);
        // The image's content: written as an unpacker would, then committed.
        let m = Mounted::new(&node, &dir.join("layer"), "ext4", MountFlags::empty(), "")?;
        write_data_file(&m.path().join(FILE_NAME), params.file_size)?;
        m.unmount()?;
        snaps.commit(IMAGE, LAYER, BTreeMap::new(), "").map_err(snap_err("committing the layer"))?;
        let rootfs = snaps.prepare(Kind::Active, ROOTFS, IMAGE, BTreeMap::new()).map_err(snap_err("preparing the rootfs"))?;
        let device = PathBuf::from(&rootfs.first().ok_or_else(|| Error::Config("Prepare returned no mount".into()))?.source);
        let mut spec = cfg.spec();
        spec.disks.push(BootDisk { path: device.clone(), serial: ROOTFS_SERIAL.into(), read_only: false, cache_direct: true });
        let guest = self.guest.insert(Guest::boot(cfg, &spec, &dir.join("vm"))?);
        let vd = guest.disk(ROOTFS_SERIAL)?;
        guest.mount("ext4", "", &vd, GUEST_MOUNT, Some((&guest_file(), params.file_size)))?;
        self.info.guest = Some(guest.info().clone());
        self.info.setup = format!(
            "guest fio on ext4 on virtio-blk (cache.direct=on) of {}: a Thinbox rootfs snapshot made in-process by thinbox_snapshotter (reflink backend, embedded pool: sparse XFS reflink=1 image on a loop device with direct I/O; {} ext4 snapshot = FICLONE of the committed image layer holding the file, on its own loop device with direct I/O); writes unshare the layer's extents",
            device.display(),
            fmt_size(size.get())
        );
        Ok(())
    }
}

impl Row for Rootfs {
    fn info(&self) -> &RowInfo {
        &self.info
    }

    fn run(&mut self, job: &Job, params: &FioParams) -> Result<Measurement, Error> {
        self.guest.as_mut().ok_or_else(|| Error::Config("no guest".into()))?.fio(job, params)
    }

    fn teardown(mut self: Box<Self>) -> Result<(), Error> {
        let mut result = self.guest.take().map_or(Ok(()), Guest::shutdown);
        if let Some(snaps) = self.snapshots.take() {
            // Children first; Cleanup finishes the deletions Remove queued.
            for key in [ROOTFS, IMAGE, LAYER] {
                match snaps.remove(key) {
                    Ok(()) | Err(thinbox_snapshotter::Error::NotFound(_)) => {}
                    Err(e) => result = result.and(Err(snap_err("removing a snapshot")(e))),
                }
            }
            result = result.and(snaps.cleanup().map(drop).map_err(snap_err("cleaning up")));
            result = result.and(snaps.shutdown(true).map_err(snap_err("shutting down")));
        }
        if result.is_ok() {
            result = std::fs::remove_dir_all(&self.root).map_err(Error::io(format!("removing {}", self.root.display())));
        }
        result
    }
}

/// A guest on an emptyDir.
#[derive(Debug)]
pub struct EmptyDir {
    info: RowInfo,
    guest: Option<Guest>,
    driver: Option<thinbox_csi::Driver>,
    target: PathBuf,
    dirs: Vec<PathBuf>,
}

/// The inline volume's handle (what the kubelet would name it).
const HANDLE: &str = "csi-fio-bench-emptydir";

impl EmptyDir {
    /// Driver state under `dir`, the volume, the guest, the file.
    pub fn setup(dir: &Path, params: &FioParams, cfg: &GuestConfig) -> Result<EmptyDir, Error> {
        let (root, kubelet, direct) = (dir.join("csi"), dir.join("kubelet"), dir.join("direct-volumes"));
        for d in [&root, &kubelet, &direct] {
            std::fs::create_dir_all(d).map_err(Error::io(format!("creating {}", d.display())))?;
        }
        let config = thinbox_csi::CsiConfig {
            kubelet_dir: kubelet.clone(),
            default_sandbox: Sandbox::Kata,
            direct_volumes: direct.clone(),
            ..thinbox_csi::CsiConfig::default()
        };
        // The one volume is a device of the pool: room for it and the reserve.
        let embedded_size = Bytes(volume_size(params.file_size).get() + (1 << 30));
        let pool = PoolConfig {
            backend: BackendKind::Reflink,
            embedded_size,
            reserve: Bytes(64 << 20),
            embedded_direct_io: NO_HOST_CACHE,
            ..PoolConfig::default()
        };
        let driver = thinbox_csi::Driver::open(&root, "fio-bench", pool, config).map_err(csi_err("opening the CSI driver"))?;
        let target = kubelet.join("pods/fio-bench/volumes/kubernetes.io~csi/scratch/mount");
        // The kubelet makes the target's parent; the driver makes the target.
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(Error::io(format!("creating {}", parent.display())))?;
        }
        let row = EmptyDir {
            info: RowInfo { kind: RowKind::ThinboxEmptyDir, guest: None, setup: String::new(), unavailable: None },
            guest: None,
            driver: Some(driver),
            target,
            dirs: vec![root, kubelet, direct],
        };
        built(row, |row| row.build(dir, params, cfg))
    }

    fn build(&mut self, dir: &Path, params: &FioParams, cfg: &GuestConfig) -> Result<(), Error> {
        let Some(driver) = &self.driver else { return Err(Error::Config("driver closed".into())) };
        let size = volume_size(params.file_size);
        let req = CreateRequest {
            name: HANDLE.into(),
            required: size.get(),
            limit: 0,
            kind: VolumeKind::File,
            fs: Some(FsType::Ext4),
            sandbox: Some(Sandbox::Kata),
            ephemeral: true,
            parameters: BTreeMap::new(),
            source: None,
            encryption: None,
        };
        driver
            .publish_ephemeral(HANDLE, &self.target, req, &AccessType::Mount { fs: Some(FsType::Ext4), flags: Vec::new() }, false, None)
            .map_err(csi_err("publishing the inline volume"))?;
        let record = DirectVolumes::new(&self.dirs[2])
            .get(&self.target)
            .map_err(|e| Error::Config(format!("reading the direct-volume record: {}", crate::chain(&e))))?
            .ok_or_else(|| Error::Config("publish wrote no direct-volume record".into()))?;
        let device = PathBuf::from(&record.device);
        let mut spec = cfg.spec();
        spec.disks.push(BootDisk { path: device.clone(), serial: EMPTYDIR_SERIAL.into(), read_only: false, cache_direct: true });
        let guest = self.guest.insert(Guest::boot(cfg, &spec, &dir.join("vm"))?);
        let vd = guest.disk(EMPTYDIR_SERIAL)?;
        guest.mount(&record.fstype, &record.options.join(","), &vd, GUEST_MOUNT, None)?;
        guest.lay_out(&guest_file(), params.file_size)?;
        self.info.guest = Some(guest.info().clone());
        self.info.setup = format!(
            "guest fio on ext4 on virtio-blk (cache.direct=on) of {}: a Thinbox CSI inline ephemeral `file` volume published for Kata in-process by thinbox_csi::Driver ({} ext4 device of the pool: a reflinked image on a loop device with direct I/O, named in the Kata direct-volume record); the file written in the guest before the first job",
            device.display(),
            fmt_size(size.get())
        );
        Ok(())
    }
}

impl Row for EmptyDir {
    fn info(&self) -> &RowInfo {
        &self.info
    }

    fn run(&mut self, job: &Job, params: &FioParams) -> Result<Measurement, Error> {
        self.guest.as_mut().ok_or_else(|| Error::Config("no guest".into()))?.fio(job, params)
    }

    fn teardown(mut self: Box<Self>) -> Result<(), Error> {
        let mut result = self.guest.take().map_or(Ok(()), Guest::shutdown);
        if let Some(driver) = self.driver.take() {
            let unpublished = match driver.resolve(HANDLE) {
                Ok(Some(v)) => driver.unpublish(&v.id, &self.target).map_err(csi_err("unpublishing")),
                Ok(None) => Ok(()),
                Err(e) => Err(csi_err("looking up the volume")(e)),
            };
            result = result.and(unpublished).and(driver.shutdown(true).map_err(csi_err("shutting down the driver")));
        }
        if result.is_ok() {
            for d in &self.dirs {
                result = result.and(std::fs::remove_dir_all(d).map_err(Error::io(format!("removing {}", d.display()))));
            }
        }
        result
    }
}
