//! Host tier for the block engine's reflink backend: real loop devices, real
//! XFS and btrfs pools, reconciliation of what a crash can leave. Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;

use common::*;
use thinbox_blockstore::{Access, BackendKind, Bytes, DeviceId, Devices, ErrorKind, Orphan, Pool, PoolConfig, Repair, scan_loops};

/// A device's image file (reflink backend).
fn image(pool: &Pool, id: DeviceId) -> PathBuf {
    PathBuf::from(pool.status().unwrap().location).join(format!("{}.img", id.0))
}

fn small() -> PoolConfig {
    PoolConfig { backend: BackendKind::Reflink, embedded_size: Bytes(1 << 30), reserve: Bytes(64 << 20), ..PoolConfig::default() }
}

#[test]
fn embedded_xfs_pool_round_trip() {
    let dir = tmp();
    let pool = Pool::open(&dir.path().join("state"), small()).unwrap();
    exercise(&pool, &dir.path().join("work"));
    assert_eq!(std::fs::read_dir(image(&pool, DeviceId(1)).parent().unwrap()).unwrap().count(), 1, "only the lock file is left");
    pool.shutdown(true).unwrap();
    assert!(scan_loops(dir.path()).unwrap().is_empty(), "release leaves no loop");
    assert!(!sh("findmnt", &["-rn", "-o", "TARGET"]).contains(dir.path().to_str().unwrap()));
}

/// The embedded pool's own loop goes through the host's page cache (clones
/// of a layer share its pages) unless told otherwise; device loops do direct
/// I/O either way, so no block is cached twice.
#[test]
fn embedded_pool_caches_its_blocks_once() {
    for (embedded_direct_io, pool_dio) in [(false, "0"), (true, "1")] {
        let dir = tmp();
        let state = dir.path().join("state");
        let pool = Pool::open(&state, PoolConfig { embedded_direct_io, ..small() }).unwrap();
        let (id, node) = create(&pool, spec(512 << 20, None, Some(Access::ReadWrite)));
        let dio = |node: &std::path::Path| {
            let name = node.file_name().unwrap().to_str().unwrap();
            std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap().trim().to_owned()
        };
        let loops = scan_loops(&state).unwrap();
        let pool_loop = loops.iter().find(|l| l.backing == state.join("pool.img")).expect("the pool image's loop");
        assert_eq!(dio(&pool_loop.node), pool_dio, "pool loop, embedded_direct_io = {embedded_direct_io}");
        assert_eq!(dio(&node.unwrap()), "1", "device loop, embedded_direct_io = {embedded_direct_io}");
        destroy(&pool, id);
        pool.shutdown(true).unwrap();
    }
}

/// A device loop that someone else has open when it is detached (a tool
/// looking for a free loop, say) keeps its image, and so the pool, busy
/// until that opener closes it: releasing the pool waits for that.
#[test]
fn release_waits_for_a_detached_loop_held_a_moment_longer() {
    let dir = tmp();
    let pool = Pool::open(&dir.path().join("state"), small()).unwrap();
    let (id, node) = create(&pool, spec(512 << 20, None, Some(Access::ReadWrite)));
    let held = std::fs::File::open(node.unwrap()).unwrap();
    destroy(&pool, id);
    let closer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(held);
    });
    pool.shutdown(true).unwrap();
    closer.join().unwrap();
    assert!(!sh("findmnt", &["-rn", "-o", "TARGET"]).contains(dir.path().to_str().unwrap()), "the pool was left mounted");
    assert!(scan_loops(dir.path()).unwrap().is_empty(), "release leaves no loop");
}

#[test]
fn btrfs_pool_directory_round_trip() {
    let dir = tmp();
    let img = dir.path().join("btrfs.img");
    std::fs::File::create(&img).unwrap().set_len(1 << 30).unwrap();
    sh("mkfs.btrfs", &["-q", img.to_str().unwrap()]);
    let mnt = dir.path().join("btrfs");
    std::fs::create_dir_all(&mnt).unwrap();
    sh("mount", &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()]);
    let result = std::panic::catch_unwind(|| {
        let pool = Pool::open(&dir.path().join("state"), PoolConfig { dir: Some(mnt.clone()), ..small() }).unwrap();
        let other = Pool::open(&dir.path().join("state2"), PoolConfig { dir: Some(mnt.clone()), ..small() }).unwrap_err();
        assert_eq!(other.kind(), ErrorKind::FailedPrecondition, "a second daemon on the same pool directory: {other}");
        exercise(&pool, &dir.path().join("work"));
        pool.shutdown(true).unwrap();
    });
    sh("umount", &[mnt.to_str().unwrap()]);
    result.unwrap();
}

#[test]
fn a_directory_without_reflink_is_refused() {
    // The host's root filesystem here is ext4: no reflink.
    let dir = tempfile::Builder::new().prefix("thinbox-bs-").tempdir_in("/var/tmp").unwrap();
    let cfg = PoolConfig { dir: Some(dir.path().to_owned()), ..small() };
    let err = Pool::open(&dir.path().join("state"), cfg).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
}

#[test]
fn reconcile_removes_what_a_crash_left_and_reattaches_active_devices() {
    let dir = tmp();
    let root = dir.path().join("state");
    let (kept, half_made, deleting, unreferenced, stray_loop);
    {
        let pool = Pool::open(&root, small()).unwrap();
        kept = create(&pool, spec(512 << 20, None, Some(Access::ReadWrite))).0;
        unreferenced = create(&pool, spec(512 << 20, None, None)).0;
        deleting = create(&pool, spec(512 << 20, None, None)).0;
        let txn = pool.store().write().unwrap();
        {
            let mut devs = Devices::open(&txn).unwrap();
            pool.plan_delete(&mut devs, deleting).unwrap();
            // Intent written, kernel never touched: as if the daemon died here.
            half_made = pool.plan_create(&mut devs, spec(512 << 20, Some(kept), Some(Access::ReadWrite))).unwrap().id;
        }
        txn.commit().unwrap();
        std::fs::write(image(&pool, DeviceId(999)), "orphan").unwrap();
        std::fs::File::create(image(&pool, DeviceId(998))).unwrap().set_len(64 << 20).unwrap();
        stray_loop = PathBuf::from(sh("losetup", &["-f", "--show", image(&pool, DeviceId(998)).to_str().unwrap()]));
        // A reboot: every device loop goes, the pool stays mounted.
        pool.shutdown(false).unwrap();
        for l in scan_loops(image(&pool, kept).parent().unwrap()).unwrap() {
            if l.node != stray_loop {
                sh("losetup", &["-d", l.node.to_str().unwrap()]);
            }
        }
    }
    // An xfs grow interrupted while its scratch mount was up.
    let scratch = root.join("tmp/77");
    std::fs::create_dir_all(&scratch).unwrap();
    sh("mount", &["-t", "tmpfs", "none", scratch.to_str().unwrap()]);
    let pool = Pool::open(&root, small()).unwrap();
    assert!(!scratch.exists(), "leftover scratch mount cleared");
    let report = pool.reconcile(&HashSet::from([kept, half_made, deleting])).unwrap();
    let mut removed = report.devices_removed.clone();
    removed.sort();
    let mut want = vec![unreferenced, deleting, half_made];
    want.sort();
    assert_eq!(removed, want, "half-made, half-deleted and unreferenced devices go");
    assert_eq!(report.reattached, vec![kept], "the active device is attached again");
    let mut loops = Vec::new();
    let mut files = Vec::new();
    for o in &report.orphans {
        match o {
            Orphan::Loop(node) => loops.push(node.clone()),
            Orphan::File(path) => files.push(path.file_name().unwrap().to_owned()),
            other => panic!("a reflink pool has no {other:?}"),
        }
    }
    files.sort();
    assert_eq!(loops, vec![stray_loop.clone()]);
    assert_eq!(files, vec!["998.img", "999.img"]);
    let ids: Vec<_> = pool.store().devices().unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(ids, vec![kept]);
    assert!(pool.node(kept).is_some());
    // Converged: a second pass has nothing to do.
    let again = pool.reconcile(&HashSet::from([kept])).unwrap();
    assert_eq!(again, Default::default());
    pool.shutdown(true).unwrap();
    assert!(scan_loops(dir.path()).unwrap().is_empty());
}

/// Makes files immutable (`chattr +i`: every open for writing and every
/// unlink fail with EPERM, as on a damaged or locked-down filesystem) until
/// dropped.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(files: &[PathBuf]) -> Immutable {
        for f in files {
            sh("chattr", &["+i", f.to_str().unwrap()]);
        }
        Immutable(files.to_vec())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::process::Command::new("chattr").args(["-i", f.to_str().unwrap()]).status();
        }
    }
}

/// One device or orphan that cannot be repaired must not keep the pool, and
/// so a daemon start, from converging: it is reported and left as it was (a
/// device's storage kept for its record, not taken for an orphan), and the
/// rest is repaired. Once the cause is gone the next pass repairs it.
#[test]
fn a_device_or_orphan_that_cannot_be_repaired_is_reported_and_the_rest_converge() {
    let dir = tmp();
    let root = dir.path().join("state");
    let (stuck_active, active, stuck_unreferenced, unreferenced);
    {
        let pool = Pool::open(&root, small()).unwrap();
        stuck_active = create(&pool, spec(512 << 20, None, Some(Access::ReadWrite))).0;
        active = create(&pool, spec(512 << 20, None, Some(Access::ReadWrite))).0;
        stuck_unreferenced = create(&pool, spec(512 << 20, None, None)).0;
        unreferenced = create(&pool, spec(512 << 20, None, None)).0;
        // A reboot: every loop goes.
        pool.shutdown(true).unwrap();
    }
    let pool = Pool::open(&root, small()).unwrap();
    let (stuck_orphan, orphan) = (image(&pool, DeviceId(999)), image(&pool, DeviceId(998)));
    std::fs::write(&stuck_orphan, "orphan").unwrap();
    std::fs::write(&orphan, "orphan").unwrap();
    let stuck = [image(&pool, stuck_active), image(&pool, stuck_unreferenced)];
    let lock = Immutable::set(&[stuck.as_slice(), std::slice::from_ref(&stuck_orphan)].concat());
    let referenced = HashSet::from([stuck_active, active]);
    let report = pool.reconcile(&referenced).unwrap();
    assert_eq!(report.reattached, vec![active], "the other active device is attached again");
    assert_eq!(report.devices_removed, vec![unreferenced], "the other unreferenced device goes");
    let failed: Vec<_> = report.failed.iter().map(|f| (f.id, f.repair)).collect();
    assert_eq!(failed, [(stuck_active, Repair::Reattach), (stuck_unreferenced, Repair::Remove)]);
    for (f, img) in report.failed.iter().zip(&stuck) {
        assert!(f.error.contains(img.to_str().unwrap()), "the error names the image: {}", f.error);
    }
    assert_eq!(report.orphans, vec![Orphan::File(orphan)], "a device's storage is not an orphan while its record stands");
    let failed: Vec<_> = report.orphans_failed.iter().map(|f| &f.orphan).collect();
    assert_eq!(failed, [&Orphan::File(stuck_orphan.clone())]);
    assert!(stuck_orphan.exists());
    let ids: Vec<_> = pool.store().devices().unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(ids, vec![stuck_active, active, stuck_unreferenced], "the stuck devices keep their records");
    assert!(stuck.iter().all(|img| img.exists()), "and their images");
    assert!(pool.node(stuck_active).is_none() && pool.node(active).is_some());

    drop(lock);
    let report = pool.reconcile(&referenced).unwrap();
    assert_eq!(report.reattached, vec![stuck_active]);
    assert_eq!(report.devices_removed, vec![stuck_unreferenced]);
    assert_eq!(report.orphans, vec![Orphan::File(stuck_orphan)]);
    assert_eq!((report.failed, report.orphans_failed), (vec![], vec![]));
    assert_eq!(pool.reconcile(&referenced).unwrap(), Default::default(), "converged");
    destroy(&pool, stuck_active);
    destroy(&pool, active);
    pool.shutdown(true).unwrap();
    assert!(scan_loops(dir.path()).unwrap().is_empty());
}

#[test]
fn a_pool_below_its_reserve_refuses_new_devices() {
    let dir = tmp();
    let cfg = PoolConfig { embedded_size: Bytes(600 << 20), reserve: Bytes(300 << 20), ..small() };
    let pool = Pool::open(&dir.path().join("state"), cfg).unwrap();
    let (id, _) = create(&pool, spec(512 << 20, None, None));
    // Eat the free space with a plain file on the pool's filesystem.
    let hog = image(&pool, id).parent().unwrap().parent().unwrap().join("hog");
    let free = pool.status().unwrap().free.get();
    let f = std::fs::File::create(&hog).unwrap();
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, free - (200 << 20)).unwrap();
    let txn = pool.store().write().unwrap();
    let err = pool.plan_create(&mut Devices::open(&txn).unwrap(), spec(512 << 20, Some(id), None)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
    drop(txn);
    assert_eq!(pool.store().devices().unwrap().len(), 1, "nothing recorded for the refused device");
    drop(f);
    std::fs::remove_file(&hog).unwrap();
    pool.shutdown(true).unwrap();
    assert!(scan_loops(dir.path()).unwrap().is_empty(), "release leaves no loop");
}

#[test]
fn a_mount_point_whose_name_has_a_space_is_one() {
    use thinbox_blockstore::{embedded, mountinfo};
    let dir = tmp();
    let mp = dir.path().canonicalize().unwrap().join("a dir\twith space");
    std::fs::create_dir(&mp).unwrap();
    assert!(!mountinfo::is_mount_point(&mp).unwrap());
    sh("mount", &["-t", "tmpfs", "-o", "size=1m", "thinbox test", mp.to_str().unwrap()]);
    let result = std::panic::catch_unwind(|| {
        assert!(mountinfo::is_mount_point(&mp).unwrap(), "{mp:?} is mounted: {:#?}", mountinfo::read().unwrap());
        assert!(embedded::is_mountpoint(&mp).unwrap());
        let m = mountinfo::mount_at(&mp).unwrap().unwrap();
        assert_eq!((m.fs_type.as_str(), m.source.as_str()), ("tmpfs", "thinbox test"));
        assert_eq!(mountinfo::mounts_under(dir.path()).unwrap(), vec![mp.clone()]);
    });
    sh("umount", &[mp.to_str().unwrap()]);
    result.unwrap();
    assert!(!mountinfo::is_mount_point(&mp).unwrap());
}
