//! UML tier: the dm-thin backend on a real kernel thin pool. Runs inside
//! user-mode Linux (`tests/uml/run-in-uml.sh`); fails loudly where the kernel
//! has no device-mapper. Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use common::*;
use thinbox_blockstore::{Access, BackendKind, Bytes, Devices, DmThin, Engine, ErrorKind, Orphan, Pool, PoolConfig, ReconcileReport, ThinConfig};

/// A thin pool of `size` that does not grow.
fn cfg(size: u64) -> PoolConfig {
    assert!(DmThin::available(), "no /dev/mapper/control: this is the uml tier (tests/run.sh uml)");
    PoolConfig { backend: BackendKind::DmThin, embedded_size: Bytes(size), reserve: Bytes(64 << 20), grow_step: Bytes(0), ..PoolConfig::default() }
}

/// `auto` takes device-mapper for what answers as device-mapper, not for a
/// node at its path: `/dev/mapper/control` as `dmsetup` leaves it on a
/// kernel without it (here `/dev/null` bound over it, which opens but knows
/// no device-mapper ioctl) does not count. The check runs in a child of this
/// test in a mount namespace of its own; this binary runs one test at a time
/// (`--test-threads=1` in the tier), so the namespace holds no other test's
/// mounts.
#[test]
fn only_a_control_node_that_answers_is_device_mapper() {
    const CHILD: &str = "THINBOX_TEST_STALE_DM_CHILD";
    if std::env::var_os(CHILD).is_some() {
        rustix::mount::mount_bind("/dev/null", "/dev/mapper/control").unwrap();
        assert!(std::fs::File::open("/dev/mapper/control").is_ok(), "the node opens");
        assert!(!DmThin::available(), "a node that opens but does not answer is not device-mapper");
        return;
    }
    assert!(DmThin::available(), "no device-mapper: this is the uml tier (tests/run.sh uml)");
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "only_a_control_node_that_answers_is_device_mapper", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("1 passed"), "the child: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(DmThin::available(), "this namespace's node is untouched");
}

fn dd(dir: &std::path::Path, file: &str, mib: u32) -> bool {
    std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", &format!("count={mib}"), "conv=fsync"])
        .arg(format!("of={}", dir.join(file).display()))
        .output()
        .unwrap()
        .status
        .success()
}

/// Names of dm devices whose name contains `needle`.
fn dm_devices(needle: &str) -> Vec<String> {
    sh("dmsetup", &["ls"]).lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.contains(needle)).map(str::to_owned).collect()
}

/// Thin ids the pool holds.
fn thin_ids(pool: &Pool) -> Vec<u64> {
    let name = pool.status().unwrap().location;
    // The metadata device from the pool's table; no udev here, so its node
    // comes from sysfs.
    let table = sh("dmsetup", &["table", &name]);
    let meta = table.split_whitespace().nth(3).unwrap();
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{meta}/uevent")).unwrap();
    let node = format!("/dev/{}", uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")).unwrap());
    sh("dmsetup", &["message", &name, "0", "reserve_metadata_snap"]);
    let out = sh("thin_ls", &["--metadata-snap", "--no-headers", "-o", "DEV", &node]);
    sh("dmsetup", &["message", &name, "0", "release_metadata_snap"]);
    let mut ids: Vec<u64> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
    ids.sort_unstable();
    ids
}

#[test]
fn thin_devices_round_trip_and_release_leaves_nothing() {
    let dir = tmp();
    let pool = Pool::open(&dir.path().join("state"), cfg(2 << 30)).unwrap();
    let status = pool.status().unwrap();
    assert_eq!(status.backend, "dm-thin");
    let prefix = status.location.trim_end_matches("-pool").to_owned();
    exercise(&pool, &dir.path().join("work"));
    assert_eq!(thin_ids(&pool), Vec::<u64>::new(), "every thin id deleted");
    pool.shutdown(true).unwrap();
    assert_eq!(dm_devices(&prefix), Vec::<String>::new(), "release removes pool, linear and thin devices");
}

#[test]
fn reconcile_after_a_reboot_restores_active_devices_and_drops_the_rest() {
    let dir = tmp();
    let root = dir.path().join("state");
    let (kept, unreferenced, half_made, prefix);
    {
        let pool = Pool::open(&root, cfg(2 << 30)).unwrap();
        prefix = pool.status().unwrap().location.trim_end_matches("-pool").to_owned();
        let (k, node) = create(&pool, spec(256 << 20, None, Some(Access::ReadWrite)));
        kept = k;
        with_mounted(&node.unwrap(), thinbox_blockstore::FsType::Ext4, &dir.path().join("m"), |m| std::fs::write(m.join("f"), "kept").unwrap());
        unreferenced = create(&pool, spec(256 << 20, None, None)).0;
        let txn = pool.store().write().unwrap();
        // Intent written, kernel never touched: as if the daemon died here.
        half_made = pool.plan_create(&mut Devices::open(&txn).unwrap(), spec(256 << 20, Some(unreferenced), Some(Access::ReadWrite))).unwrap().id;
        txn.commit().unwrap();
        // A thin id nobody recorded.
        sh("dmsetup", &["message", &format!("{prefix}-pool"), "0", "create_thin 777"]);
        // Reboot: every dm device and loop goes; the files stay.
        pool.shutdown(true).unwrap();
        assert!(dm_devices(&prefix).is_empty());
    }
    let pool = Pool::open(&root, cfg(2 << 30)).unwrap();
    let report = pool.reconcile(&HashSet::from([kept, half_made])).unwrap();
    let mut removed = report.devices_removed.clone();
    removed.sort();
    assert_eq!(removed, vec![unreferenced, half_made]);
    assert_eq!(report.reattached, vec![kept]);
    assert_eq!(report.orphans, vec![Orphan::ThinId(777)]);
    assert_eq!(thin_ids(&pool), vec![kept.0]);
    let node = pool.node(kept).unwrap();
    let content = with_mounted(&node, thinbox_blockstore::FsType::Ext4, &dir.path().join("m"), |m| std::fs::read_to_string(m.join("f")).unwrap());
    assert_eq!(content, "kept", "data survives the reboot");
    assert_eq!(pool.reconcile(&HashSet::from([kept])).unwrap(), Default::default(), "converged");
    destroy(&pool, kept);
    pool.shutdown(true).unwrap();
    assert!(dm_devices(&prefix).is_empty());
}

#[test]
fn a_full_thin_pool_fails_writes_and_new_devices_but_keeps_the_rest() {
    let dir = tmp();
    let pool = Pool::open(&dir.path().join("state"), cfg(512 << 20)).unwrap();
    let (base, node) = create(&pool, spec(1 << 30, None, Some(Access::ReadWrite)));
    let m = dir.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    sh("mount", &[node.unwrap().to_str().unwrap(), m.to_str().unwrap()]);
    std::fs::write(m.join("keep"), "safe").unwrap();
    assert!(!dd(&m, "fill", 700), "the writer gets an I/O error when the pool is full");
    let _ = std::process::Command::new("umount").arg(&m).status();
    let txn = pool.store().write().unwrap();
    let err = pool.plan_create(&mut Devices::open(&txn).unwrap(), spec(256 << 20, None, None)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
    drop(txn);
    assert_eq!(pool.store().devices().unwrap().len(), 1);
    destroy(&pool, base);
    assert!(pool.status().unwrap().free > Bytes(400 << 20), "deleting the device frees its blocks");
    pool.shutdown(true).unwrap();
}

#[test]
fn a_file_backed_pool_running_low_grows_and_writers_carry_on() {
    let dir = tmp();
    let cfg = PoolConfig { grow_step: Bytes(512 << 20), max_size: Some(Bytes(1 << 30)), ..cfg(512 << 20) };
    let pool = Pool::open(&dir.path().join("state"), cfg).unwrap();
    let before = pool.status().unwrap().total;
    let (base, node) = create(&pool, spec(1 << 30, None, Some(Access::ReadWrite)));
    let m = dir.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    sh("mount", &[node.unwrap().to_str().unwrap(), m.to_str().unwrap()]);
    assert!(dd(&m, "a", 400), "400MiB fit in the 512MiB pool");
    let st = pool.maintain().unwrap();
    assert!(st.total > before, "the pool grew: {before} -> {}", st.total);
    assert!(st.total <= Bytes(1 << 30), "up to its ceiling");
    assert!(dd(&m, "b", 300), "the writer carries on after the growth");
    assert_eq!(std::fs::metadata(m.join("a")).unwrap().len(), 400 << 20);
    sh("umount", &[m.to_str().unwrap()]);
    // At the ceiling: no more growth, new devices are refused below the reserve.
    assert_eq!(pool.maintain().unwrap().total, st.total);
    destroy(&pool, base);
    pool.shutdown(true).unwrap();
}

/// A sparse file of `size` on a loop device; detached when dropped.
struct LoopFile(String);

impl LoopFile {
    fn new(path: &std::path::Path, size: u64) -> LoopFile {
        std::fs::File::create(path).unwrap().set_len(size).unwrap();
        LoopFile(sh("losetup", &["--find", "--show", path.to_str().unwrap()]))
    }
}

impl Drop for LoopFile {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A thin pool made outside Thinbox, as an operator would (dmsetup), with its
/// loop devices; removed when dropped.
struct OperatorPool {
    name: String,
    _loops: (LoopFile, LoopFile),
}

impl OperatorPool {
    fn new(dir: &std::path::Path, name: &str) -> OperatorPool {
        let meta = LoopFile::new(&dir.join("op-meta.img"), 16 << 20);
        let data = LoopFile::new(&dir.join("op-data.img"), 1 << 30);
        let table = format!("0 {} thin-pool {} {} 128 1638 1 error_if_no_space", (1u64 << 30) / 512, meta.0, data.0);
        sh("dmsetup", &["create", name, "--table", &table]);
        OperatorPool { name: name.to_owned(), _loops: (meta, data) }
    }
}

impl Drop for OperatorPool {
    fn drop(&mut self) {
        let _ = std::process::Command::new("dmsetup").args(["remove", &self.name]).status();
    }
}

fn thin_cfg(thin: ThinConfig) -> PoolConfig {
    PoolConfig { thin, ..cfg(1 << 30) }
}

#[test]
fn an_existing_pool_is_used_and_left_in_place() {
    let dir = tmp();
    let op = OperatorPool::new(dir.path(), "thinbox-test-existing");
    let thin = ThinConfig { pool_name: Some(op.name.clone()), ..ThinConfig::default() };
    let pool = Pool::open(&dir.path().join("state"), thin_cfg(thin.clone())).unwrap();
    let status = pool.status().unwrap();
    assert_eq!(status.location, op.name);
    assert_eq!(status.total, Bytes(1 << 30));
    assert_eq!(status.mode.as_deref(), Some("rw"));
    exercise(&pool, &dir.path().join("work"));
    assert_eq!(thin_ids(&pool), Vec::<u64>::new(), "every thin id deleted");
    pool.shutdown(true).unwrap();
    assert_eq!(dm_devices("thinbox-"), vec![op.name.clone()], "release leaves the operator's pool, and only it");

    // Another root may not take over a pool that holds devices it did not make.
    sh("dmsetup", &["message", &op.name, "0", "create_thin 77"]);
    let err = Pool::open(&dir.path().join("other"), thin_cfg(thin)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("1 thin devices"), "{err}");
    sh("dmsetup", &["message", &op.name, "0", "delete 77"]);
}

#[test]
fn a_missing_or_wrong_pool_is_a_clear_error() {
    let dir = tmp();
    let thin = ThinConfig { pool_name: Some("thinbox-test-absent".into()), ..ThinConfig::default() };
    let err = Pool::open(&dir.path().join("state"), thin_cfg(thin)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("no such dm device"), "{err}");
}

#[test]
fn a_pool_on_given_devices_is_created_then_torn_down_and_the_root_keeps_to_it() {
    let dir = tmp();
    let meta = LoopFile::new(&dir.path().join("meta.img"), 8 << 20);
    let data = LoopFile::new(&dir.path().join("data.img"), 1 << 30);
    let thin = ThinConfig { metadata_device: Some(meta.0.clone().into()), data_device: Some(data.0.clone().into()), ..ThinConfig::default() };
    let root = dir.path().join("state");
    let pool = Pool::open(&root, thin_cfg(thin.clone())).unwrap();
    let status = pool.status().unwrap();
    let prefix = status.location.trim_end_matches("-pool").to_owned();
    assert_eq!(status.total, Bytes(1 << 30));
    assert_eq!(status.metadata.unwrap().total, Bytes(8 << 20));
    assert_eq!(status.low_water, Some(Bytes((1 << 30) / 10 / 65536 * 65536)));
    let (kept, _) = create(&pool, spec(256 << 20, None, None));
    pool.shutdown(true).unwrap();
    drop(pool);
    assert_eq!(dm_devices(&prefix), Vec::<String>::new(), "release tears down the pool Thinbox created");

    // The same devices again: the pool's metadata is still there.
    let pool = Pool::open(&root, thin_cfg(thin)).unwrap();
    assert_eq!(thin_ids(&pool), vec![kept.0]);
    destroy(&pool, kept);
    pool.shutdown(true).unwrap();
    drop(pool);
    // A root stays with its pool: its thin ids live there.
    let err = Pool::open(&root, cfg(1 << 30)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(dm_devices(&prefix).is_empty());
}

#[test]
fn metadata_past_its_limit_refuses_new_devices_before_running_out() {
    let dir = tmp();
    let meta = LoopFile::new(&dir.path().join("meta.img"), 2 << 20);
    let data = LoopFile::new(&dir.path().join("data.img"), 1 << 30);
    let thin = ThinConfig {
        metadata_device: Some(meta.0.clone().into()),
        data_device: Some(data.0.clone().into()),
        metadata_limit_percent: 1,
        ..ThinConfig::default()
    };
    let pool = Pool::open(&dir.path().join("state"), thin_cfg(thin)).unwrap();
    let used = pool.status().unwrap().metadata.unwrap();
    assert!(used.used > Bytes(0) && used.used.get() * 100 >= used.total.get(), "a fresh pool already uses over 1%: {used:?}");
    let txn = pool.store().write().unwrap();
    let err = pool.plan_create(&mut Devices::open(&txn).unwrap(), spec(256 << 20, None, None)).unwrap_err();
    drop(txn);
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
    assert!(err.to_string().contains("metadata"), "{err}");
    assert!(pool.store().devices().unwrap().is_empty(), "nothing recorded");
    assert_eq!(pool.status().unwrap().mode.as_deref(), Some("rw"), "the pool itself is fine");
    pool.shutdown(true).unwrap();
}

#[test]
fn a_deleted_device_gives_its_blocks_back_to_the_embedded_data_file() {
    let dir = tmp();
    // The embedded pool discards before it deletes unless told otherwise.
    let cfg = thin_cfg(ThinConfig::default());
    let root = dir.path().join("state");
    let pool = Pool::open(&root, cfg).unwrap();
    let allocated = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(root.join("thin/data.img")).unwrap()) * 512;
    let (dev, node) = create(&pool, spec(512 << 20, None, Some(Access::ReadWrite)));
    with_mounted(&node.unwrap(), thinbox_blockstore::FsType::Ext4, &dir.path().join("m"), |m| assert!(dd(m, "f", 128)));
    let before = allocated();
    assert!(before >= 128 << 20, "the data file holds the writes: {before}");
    destroy(&pool, dev);
    let after = allocated();
    assert!(after + (100 << 20) < before, "discard punched the device's blocks out of the data file: {before} -> {after}");
    assert_eq!(thin_ids(&pool), Vec::<u64>::new());
    pool.shutdown(true).unwrap();
}

/// A crash between the pool's `delete` and the dropping of the record leaves
/// a record whose thin id the pool no longer holds. Attaching it is NotFound,
/// not an internal device-mapper failure; deleting it again (as recovery
/// does, with discard on) finishes without a warning or a dm device left.
#[test]
fn a_record_whose_thin_id_is_gone_is_not_found_and_deletes_quietly() {
    let dir = tmp();
    let pool = Pool::open(&dir.path().join("state"), thin_cfg(ThinConfig::default())).unwrap();
    let pool_name = pool.status().unwrap().location;
    let (dev, _) = create(&pool, spec(256 << 20, None, None));
    sh("dmsetup", &["message", &pool_name, "0", &format!("delete {}", dev.0)]);
    let thin_dev = format!("{}-{}", pool_name.trim_end_matches("-pool"), dev.0);

    let err = pool.activate(dev, Access::ReadWrite).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(!dm_devices(&thin_dev).contains(&thin_dev), "the failed activation left no dm device");

    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt().with_max_level(tracing::Level::WARN).with_ansi(false).with_writer(move || Sink(sink.clone())).finish();
    tracing::subscriber::with_default(subscriber, || destroy(&pool, dev));
    let log = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    assert_eq!(log, "", "deleting a device whose thin id is gone warns of nothing");
    assert!(pool.store().devices().unwrap().is_empty(), "record dropped");
    assert!(!dm_devices(&thin_dev).contains(&thin_dev));
    assert_eq!(thin_ids(&pool), Vec::<u64>::new());
    pool.shutdown(true).unwrap();
}

/// The kernel refuses to delete a thin device that is still open (a VMM
/// holding it after its Remove). Its destroy fails and keeps the record for
/// the deleter's retry, rather than dropping the record and leaking the thin
/// id; once the holder closes it, it goes.
#[test]
fn a_device_still_open_keeps_its_record_until_it_is_really_deleted() {
    let dir = tmp();
    let pool = Pool::open(&dir.path().join("state"), thin_cfg(ThinConfig::default())).unwrap();
    let (dev, node) = create(&pool, spec(256 << 20, None, Some(Access::ReadWrite)));
    // As QEMU opens a disk: read-write, not exclusive.
    let holder = std::fs::OpenOptions::new().read(true).write(true).open(node.unwrap()).unwrap();
    let txn = pool.store().write().unwrap();
    pool.plan_delete(&mut Devices::open(&txn).unwrap(), dev).unwrap();
    txn.commit().unwrap();

    let err = pool.destroy(dev).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(pool.store().device(dev).unwrap().is_some(), "the record keeps the id: {err}");
    assert_eq!(thin_ids(&pool), vec![dev.0], "the thin id is still the pool's");
    let check = pool.check(&HashSet::new()).unwrap();
    assert_eq!(check, ReconcileReport { held: vec![dev], ..Default::default() }, "check offers nothing that gc would not do");
    // Reconciliation (every start, Cleanup) keeps it too, and carries on.
    let report = pool.reconcile(&HashSet::new()).unwrap();
    assert_eq!((report.devices_removed, report.held), (Vec::new(), vec![dev]));
    assert_eq!(report.orphans, Vec::new(), "its thin id is no orphan");
    assert_eq!(thin_ids(&pool), vec![dev.0]);

    drop(holder);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(e) = pool.destroy(dev) {
        assert!(std::time::Instant::now() < deadline, "still not deleted 10 s after its last close: {e}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(pool.store().devices().unwrap().is_empty(), "record dropped");
    assert_eq!(thin_ids(&pool), Vec::<u64>::new());
    pool.shutdown(true).unwrap();
}

/// The same through the engine, as a front end's delete goes: the deleter
/// keeps retrying a device still open, past its usual attempts and past a
/// reconciliation, which finds it open too, without making every `Cleanup`
/// reconcile; once let go, it goes with no one asking.
#[test]
fn the_deleter_retries_a_device_still_open_until_it_is_let_go() {
    let dir = tmp();
    let engine = Engine::open(&dir.path().join("state"), thin_cfg(ThinConfig::default()), Vec::new()).unwrap();
    let pool = engine.pool();
    let (dev, node) = create(pool, spec(256 << 20, None, Some(Access::ReadWrite)));
    let holder = std::fs::OpenOptions::new().read(true).write(true).open(node.unwrap()).unwrap();
    let txn = pool.store().write().unwrap();
    pool.plan_delete(&mut Devices::open(&txn).unwrap(), dev).unwrap();
    txn.commit().unwrap();
    engine.deleter().push(dev);

    // Tried once and found open: not left behind, so no reconciliation.
    assert_eq!(engine.finish_deletions().unwrap(), Default::default());
    assert_eq!(engine.deleter().progress().pending, 1, "queued for a retry");
    assert_eq!(engine.reconcile().unwrap().devices_removed, Vec::new());
    assert_eq!(engine.deleter().progress().pending, 1, "still queued after a reconciliation");
    assert!(pool.store().device(dev).unwrap().is_some());
    assert_eq!(thin_ids(pool), vec![dev.0]);

    drop(holder);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while pool.store().device(dev).unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "still recorded 30 s after its last close");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(thin_ids(pool), Vec::<u64>::new());
    assert_eq!(engine.deleter().progress().pending, 0);
    engine.shutdown(true).unwrap();
}

/// A device whose record is gone (an orphan) but which something still holds
/// open: reconciliation, which every start runs, removes the other orphans
/// and carries on instead of failing on its EBUSY, and deletes it once it is
/// closed.
#[test]
fn an_orphan_still_open_does_not_stop_reconciliation() {
    let dir = tmp();
    let pool = Pool::open(&dir.path().join("state"), thin_cfg(ThinConfig::default())).unwrap();
    let prefix = pool.status().unwrap().location.trim_end_matches("-pool").to_owned();
    let (held, node) = create(&pool, spec(256 << 20, None, Some(Access::ReadWrite)));
    let holder = std::fs::OpenOptions::new().read(true).write(true).open(node.unwrap()).unwrap();
    let txn = pool.store().write().unwrap();
    Devices::open(&txn).unwrap().delete(held).unwrap();
    txn.commit().unwrap();
    sh("dmsetup", &["message", &format!("{prefix}-pool"), "0", "create_thin 777"]);

    let check = pool.check(&HashSet::new()).unwrap();
    let dm = Orphan::DmDevice(format!("{prefix}-{}", held.0));
    assert_eq!((check.orphans, check.orphans_held), (vec![dm, Orphan::ThinId(777)], vec![Orphan::ThinId(held.0)]), "check finds what gc will do");
    let report = pool.reconcile(&HashSet::new()).unwrap();
    assert_eq!(
        report.orphans,
        vec![Orphan::DmDevice(format!("{prefix}-{}", held.0)), Orphan::ThinId(777)],
        "the free orphan goes, the held one is not claimed"
    );
    assert_eq!(report.orphans_held, vec![Orphan::ThinId(held.0)]);
    assert!(!report.converged(), "a held orphan is left for a later pass");
    assert_eq!(thin_ids(&pool), vec![held.0]);

    drop(holder);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while thin_ids(&pool) != Vec::<u64>::new() {
        assert!(std::time::Instant::now() < deadline, "still in the pool 10 s after its last close");
        std::thread::sleep(std::time::Duration::from_millis(50));
        pool.reconcile(&HashSet::new()).unwrap();
    }
    pool.shutdown(true).unwrap();
    assert!(dm_devices(&prefix).is_empty());
}

/// The same through the engine, with no one asking: the daemon's maintenance
/// loop calls `heal`, which reconciles again (after a back-off) while a pass
/// has kept a held orphan, and removes it once let go.
#[test]
fn an_orphan_still_open_goes_once_let_go_with_no_one_asking() {
    let dir = tmp();
    let engine = Engine::open(&dir.path().join("state"), thin_cfg(ThinConfig::default()), Vec::new()).unwrap();
    let pool = engine.pool();
    let (held, node) = create(pool, spec(256 << 20, None, Some(Access::ReadWrite)));
    let holder = std::fs::OpenOptions::new().read(true).write(true).open(node.unwrap()).unwrap();
    let txn = pool.store().write().unwrap();
    Devices::open(&txn).unwrap().delete(held).unwrap();
    txn.commit().unwrap();

    assert_eq!(engine.reconcile().unwrap().orphans_held, vec![Orphan::ThinId(held.0)]);
    assert!(engine.heal().is_none(), "the retry waits a second");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let report = engine.heal().expect("a retry is due").unwrap();
    assert_eq!(report.orphans_held, vec![Orphan::ThinId(held.0)], "still open: kept again");
    assert_eq!(thin_ids(pool), vec![held.0]);

    drop(holder);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let report = loop {
        if let Some(report) = engine.heal() {
            let report = report.unwrap();
            if report.converged() {
                break report;
            }
        }
        assert!(std::time::Instant::now() < deadline, "still kept 30 s after its last close");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(report.orphans, vec![Orphan::ThinId(held.0)]);
    assert_eq!(thin_ids(pool), Vec::<u64>::new());
    assert!(engine.heal().is_none(), "a converged pass ends the retries");
    engine.shutdown(true).unwrap();
}

/// Collects a test's log lines.
struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn crossing_the_low_water_mark_wakes_the_pool_watch() {
    let dir = tmp();
    let pool = Pool::open(&dir.path().join("state"), cfg(512 << 20)).unwrap();
    let (dev, node) = create(&pool, spec(1 << 30, None, Some(Access::ReadWrite)));
    let m = dir.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    sh("mount", &[node.unwrap().to_str().unwrap(), m.to_str().unwrap()]);
    let limit = std::time::Duration::from_secs(300);
    let (woke, waited) = std::thread::scope(|s| {
        let watch = s.spawn(|| {
            let start = std::time::Instant::now();
            (pool.maintain_and_wait(limit).unwrap(), start.elapsed())
        });
        // The watch arms at once; the writer then crosses the mark (10% free).
        std::thread::sleep(std::time::Duration::from_secs(1));
        assert!(dd(&m, "fill", 480), "480MiB fit in the 512MiB pool");
        watch.join().unwrap()
    });
    sh("umount", &[m.to_str().unwrap()]);
    assert!(woke && waited < limit, "the low-water event woke the watch (after {waited:?})");
    destroy(&pool, dev);
    pool.shutdown(true).unwrap();
}
