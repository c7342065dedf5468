//! Host tier: the real daemon (`thinboxd`, snapshot socket only) on real loop
//! devices and a real XFS pool, driven over its socket. Every error path
//! answers with the right gRPC code and leaves nothing behind. Needs root.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Immutable;
use common::snapshots::*;
use thinbox_proto::admin::GcRequest;
use thinbox_proto::snapshots::{CleanupRequest, Info, UpdateSnapshotRequest, UsageRequest};
use tonic::Code;

const SMALL: &str = "[pool]\nembedded_size = \"4GiB\"\nreserve = \"64MiB\"\n[snapshot]\ndefault_size = \"512MiB\"\n";

fn tmp() -> tempfile::TempDir {
    require_root();
    tempfile::Builder::new().prefix("thinbox-host-").tempdir().unwrap()
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("expected an error").code()
}

/// Files in the pool and attached loops match the records: nothing leaked.
/// Removed snapshots' devices are deleted in the background: waits for that first.
async fn assert_no_leaks(c: &mut Client, d: &Daemon, active_or_view: usize) {
    d.settle().await;
    let all = list(c, &[]).await.unwrap();
    let inv = d.inventory();
    assert_eq!(inv.stored.as_ref().map_or(usize::MAX, |s| s.len()), all.len(), "one device per snapshot: {inv:?} vs {all:?}");
    assert_eq!(inv.attached.len(), active_or_view, "one attached device per active snapshot or view");
}

#[tokio::test]
async fn error_paths_have_the_right_codes_and_leak_nothing() {
    let dir = tmp();
    let (d, mut c) = Daemon::start(dir.path(), Some(SMALL), &[]).await;
    let work = dir.path().join("work");
    layer(&mut c, &work, "base", "", &[("hello", "world")]).await;
    prepare(&mut c, "active", "base", HashMap::new()).await.unwrap();
    view(&mut c, "view", "base").await.unwrap();

    // NOT_FOUND
    assert_eq!(code(stat(&mut c, "missing").await), Code::NotFound);
    assert_eq!(code(remove(&mut c, "missing").await), Code::NotFound);
    assert_eq!(code(commit(&mut c, "x", "missing").await), Code::NotFound);
    assert_eq!(code(prepare(&mut c, "k", "missing", HashMap::new()).await), Code::NotFound);
    assert_eq!(code(c.mounts(thinbox_proto::snapshots::MountsRequest { snapshotter: String::new(), key: "missing".into() }).await), Code::NotFound);
    assert_eq!(code(c.usage(UsageRequest { snapshotter: String::new(), key: "missing".into() }).await), Code::NotFound);
    // ALREADY_EXISTS
    assert_eq!(code(prepare(&mut c, "active", "base", HashMap::new()).await), Code::AlreadyExists);
    assert_eq!(code(prepare(&mut c, "base", "", HashMap::new()).await), Code::AlreadyExists);
    prepare(&mut c, "active2", "base", HashMap::new()).await.unwrap();
    assert_eq!(code(commit(&mut c, "base", "active2").await), Code::AlreadyExists);
    // FAILED_PRECONDITION
    assert_eq!(code(prepare(&mut c, "k", "active", HashMap::new()).await), Code::FailedPrecondition);
    assert_eq!(code(view(&mut c, "k", "view").await), Code::FailedPrecondition);
    assert_eq!(code(remove(&mut c, "base").await), Code::FailedPrecondition);
    assert_eq!(code(commit(&mut c, "x", "view").await), Code::FailedPrecondition);
    assert_eq!(code(commit(&mut c, "x", "base").await), Code::FailedPrecondition);
    assert_eq!(
        code(c.mounts(thinbox_proto::snapshots::MountsRequest { snapshotter: String::new(), key: "base".into() }).await),
        Code::FailedPrecondition
    );
    // INVALID_ARGUMENT
    assert_eq!(code(prepare(&mut c, "", "", HashMap::new()).await), Code::InvalidArgument);
    assert_eq!(code(prepare(&mut c, "a\0b", "", HashMap::new()).await), Code::InvalidArgument);
    let big = "v".repeat(4096);
    assert_eq!(code(prepare(&mut c, "k", "", labels(&[("l", &big)])).await), Code::InvalidArgument);
    assert_eq!(code(prepare(&mut c, "k", "", labels(&[("containerd.io/snapshot/max-size", "lots")])).await), Code::InvalidArgument);
    assert_eq!(code(prepare(&mut c, "k", "", labels(&[("containerd.io/snapshot/max-size", "4096")])).await), Code::InvalidArgument);
    assert_eq!(code(list(&mut c, &["name=="]).await), Code::InvalidArgument);
    assert_eq!(code(list(&mut c, &["labels.\"open"]).await), Code::InvalidArgument);
    let update = |paths: &[&str]| UpdateSnapshotRequest {
        snapshotter: String::new(),
        info: Some(Info { name: "base".into(), parent: "elsewhere".into(), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: paths.iter().map(|s| s.to_string()).collect() }),
    };
    assert_eq!(code(c.update(update(&["parent"])).await), Code::InvalidArgument);
    assert_eq!(code(c.update(update(&["kind"])).await), Code::InvalidArgument);
    let mut no_info = update(&["labels"]);
    no_info.info = None;
    assert_eq!(code(c.update(no_info).await), Code::InvalidArgument);

    // Nothing failed half-way: the committed data is intact and nothing leaked.
    assert_eq!(stat(&mut c, "base").await.unwrap().parent, "");
    assert_eq!(read_through_view(&mut c, &work, "base", "hello").await, "world");
    assert_no_leaks(&mut c, &d, 3).await;
    d.release().await;
}

#[tokio::test]
async fn size_label_sets_size_and_a_larger_child_grows_its_filesystem() {
    for fs in ["ext4", "xfs"] {
        let dir = tmp();
        let cfg = format!("{SMALL}filesystem = \"{fs}\"\n");
        let (d, mut c) = Daemon::start(dir.path(), Some(&cfg), &[]).await;
        let work = dir.path().join("work");
        let m = prepare(&mut c, "base-a", "", labels(&[("containerd.io/snapshot/max-size", "536870912")])).await.unwrap();
        assert_eq!(m[0].r#type, fs);
        assert_eq!(m[0].options.contains(&"nouuid".to_string()), fs == "xfs");
        assert!(m[0].options.contains(&"noatime".to_string()), "{fs}: {:?}", m[0].options);
        mount(&m, &work.join("b"));
        std::fs::write(work.join("b/keep"), "kept").unwrap();
        umount(&work.join("b"));
        commit(&mut c, "base", "base-a").await.unwrap();

        let m = prepare(&mut c, "big", "base", labels(&[("containerd.io/snapshot/max-size", "1073741824")])).await.unwrap();
        let mp = work.join("big");
        mount(&m, &mp);
        let st = rustix::fs::statvfs(&mp).unwrap();
        let total = st.f_blocks * st.f_frsize;
        assert!(total > 900 << 20, "{fs}: filesystem grew to fill 1GiB, has {total} bytes");
        assert_eq!(std::fs::read_to_string(mp.join("keep")).unwrap(), "kept");
        umount(&mp);
        assert_eq!(
            code(prepare(&mut c, "small", "base", labels(&[("containerd.io/snapshot/max-size", "400000000")])).await),
            Code::InvalidArgument,
            "{fs}: a child smaller than its parent is refused"
        );
        assert_no_leaks(&mut c, &d, 1).await;
        d.release().await;
    }
}

#[tokio::test]
async fn usage_counts_only_what_the_child_wrote() {
    let dir = tmp();
    let (d, mut c) = Daemon::start(dir.path(), Some(SMALL), &[]).await;
    let work = dir.path().join("work");
    let blob = "x".repeat(8 << 20);
    layer(&mut c, &work, "base", "", &[("big", &blob)]).await;
    let m = prepare(&mut c, "child", "base", HashMap::new()).await.unwrap();
    let mp = work.join("child");
    mount(&m, &mp);
    for i in 0..4 {
        std::fs::write(mp.join(format!("f{i}")), "y".repeat(1 << 20)).unwrap();
    }
    umount(&mp);
    let u = c.usage(UsageRequest { snapshotter: String::new(), key: "child".into() }).await.unwrap().into_inner();
    assert!(u.size >= 4 << 20, "child wrote 4MiB, usage {}", u.size);
    assert!(u.size < 8 << 20, "the parent's 8MiB are shared, usage {}", u.size);
    assert!(u.inodes >= 4, "4 new inodes, usage {}", u.inodes);
    let base = c.usage(UsageRequest { snapshotter: String::new(), key: "base".into() }).await.unwrap().into_inner();
    assert!(base.size >= 8 << 20, "a layer without parent holds all its data, usage {}", base.size);
    d.release().await;
}

#[tokio::test]
async fn restart_keeps_devices_attached_and_reboot_reattaches_them() {
    let dir = tmp();
    let (mut d, mut c) = Daemon::start(dir.path(), Some(SMALL), &[]).await;
    let work = dir.path().join("work");
    layer(&mut c, &work, "base", "", &[("a", "1")]).await;
    let m = prepare(&mut c, "ctr", "base", labels(&[("team", "x")])).await.unwrap();
    let mp = work.join("ctr");
    mount(&m, &mp);
    std::fs::write(mp.join("b"), "2").unwrap();

    // A daemon restart while the container runs: the device stays, same node.
    assert!(d.stop().success());
    assert!(std::fs::read_to_string(mp.join("b")).is_ok(), "rootfs still usable while the daemon is down");
    let mut c = d.spawn(&[]).await;
    let again =
        c.mounts(thinbox_proto::snapshots::MountsRequest { snapshotter: String::new(), key: "ctr".into() }).await.unwrap().into_inner().mounts;
    assert_eq!(again[0].source, m[0].source);
    assert_eq!(stat(&mut c, "ctr").await.unwrap().labels.get("team").map(String::as_str), Some("x"));
    umount(&mp);

    // A reboot: loops and the pool mount are gone; start-up re-attaches.
    d.release().await;
    assert!(thinbox_blockstore::scan_loops(dir.path()).unwrap().is_empty());
    let (d, mut c) = Daemon::start(dir.path(), Some(SMALL), &[]).await;
    let m = c.mounts(thinbox_proto::snapshots::MountsRequest { snapshotter: String::new(), key: "ctr".into() }).await.unwrap().into_inner().mounts;
    mount(&m, &mp);
    assert_eq!(std::fs::read_to_string(mp.join("a")).unwrap(), "1");
    assert_eq!(std::fs::read_to_string(mp.join("b")).unwrap(), "2");
    umount(&mp);
    assert_eq!(list(&mut c, &["kind==active"]).await.unwrap(), vec!["ctr"]);
    d.release().await;
}

/// A full pool refuses new snapshots; removing one makes room again even
/// though its device is deleted in the background: a Prepare that finds the
/// pool full while deletions are pending waits for them and tries once more.
/// On the reflink backend the pool's filesystem is frozen across the Remove,
/// so the Prepare certainly finds the space not yet freed (seen in the log)
/// and must wait; on a thin pool it may or may not, and must succeed either way.
#[tokio::test]
async fn a_full_pool_refuses_new_snapshots_and_keeps_serving() {
    let dir = tmp();
    let cfg = "[pool]\nembedded_size = \"1GiB\"\nreserve = \"128MiB\"\n[snapshot]\ndefault_size = \"2GiB\"\n";
    let (d, mut c) = Daemon::start_logged(dir.path(), Some(cfg), &[]).await;
    let work = dir.path().join("work");
    layer(&mut c, &work, "base", "", &[("keep", "safe")]).await;
    let m = prepare(&mut c, "hog", "base", HashMap::new()).await.unwrap();
    let mp = work.join("hog");
    mount(&m, &mp);
    // The device is larger than the pool: writing runs the pool out of space.
    let out = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=1400", "conv=fsync"])
        .arg(format!("of={}", mp.join("fill").display()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the writer must see an I/O error or ENOSPC");
    let _ = std::process::Command::new("umount").arg(&mp).status();
    assert_eq!(code(prepare(&mut c, "next", "base", HashMap::new()).await), Code::ResourceExhausted);
    assert_eq!(stat(&mut c, "base").await.unwrap().name, "base", "the daemon keeps serving");
    assert!(!d.log_text().contains(WAITING_FOR_DELETIONS), "nothing pending: refused at once");

    let frozen = (d.inventory().backend == "reflink").then(|| Frozen::new(&d.root.join("pool")));
    remove(&mut c, "hog").await.unwrap();
    let next = tokio::spawn({
        let mut c = c.clone();
        async move { prepare(&mut c, "next", "base", HashMap::new()).await }
    });
    if let Some(frozen) = frozen {
        let deadline = Instant::now() + DELETION_DEADLINE;
        while !d.log_text().contains(WAITING_FOR_DELETIONS) {
            assert!(!next.is_finished(), "Prepare finished while the pool was frozen and full");
            assert!(Instant::now() < deadline, "Prepare never waited for the pending deletion");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(frozen);
    }
    next.await.unwrap().expect("Prepare after Remove on a full pool");
    assert_eq!(read_through_view(&mut c, &work, "base", "keep").await, "safe", "committed data survives");
    assert_no_leaks(&mut c, &d, 1).await;
    d.release().await;
}

/// What the daemon logs when a Prepare waits for the deleter.
const WAITING_FOR_DELETIONS: &str = "pool full while deletions are pending";

/// A filesystem frozen with `fsfreeze` until dropped: every write to it,
/// unlinking a file included, blocks meanwhile.
struct Frozen(PathBuf);

impl Frozen {
    fn new(mountpoint: &Path) -> Frozen {
        let out = Command::new("fsfreeze").arg("-f").arg(mountpoint).output().unwrap();
        assert!(out.status.success(), "fsfreeze -f {}: {}", mountpoint.display(), String::from_utf8_lossy(&out.stderr));
        Frozen(mountpoint.to_owned())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let out = Command::new("fsfreeze").arg("-u").arg(&self.0).output().unwrap();
        if !std::thread::panicking() {
            assert!(out.status.success(), "fsfreeze -u {}: {}", self.0.display(), String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// Remove returns once the snapshot's record is gone and its device marked
/// for deletion; the device goes afterwards, in the background. On the
/// reflink backend the pool's filesystem is frozen across the Removes, so no
/// deletion can finish: Removes that return anyway, with every device still
/// recorded and its image still there, prove they do not wait. A thin pool
/// has no such lever; there the test checks the outcome.
#[tokio::test]
async fn remove_returns_before_its_device_is_deleted() {
    let dir = tmp();
    let (d, mut c) = Daemon::start(dir.path(), Some(SMALL), &[]).await;
    let work = dir.path().join("work");
    layer(&mut c, &work, "base", "", &[("a", "1")]).await;
    layer(&mut c, &work, "top", "base", &[("b", "2")]).await;
    prepare(&mut c, "ctr", "top", HashMap::new()).await.unwrap();
    assert_eq!(d.device_records().await, 3);

    let frozen = (d.inventory().backend == "reflink").then(|| Frozen::new(&d.root.join("pool")));
    remove(&mut c, "ctr").await.unwrap();
    remove(&mut c, "top").await.unwrap();
    assert_eq!(list(&mut c, &[]).await.unwrap(), ["base"], "the snapshots are gone at once");
    assert_eq!(code(stat(&mut c, "top").await), Code::NotFound);
    if let Some(frozen) = frozen {
        assert_eq!(d.device_records().await, 3, "both devices still recorded (deleting)");
        assert_eq!(d.inventory().stored.map(|s| s.len()), Some(3), "both images still in the pool");
        drop(frozen);
    }
    d.settle().await;
    assert_eq!(d.device_records().await, 1, "the deleter deleted both devices");
    assert_eq!(read_through_view(&mut c, &work, "base", "a").await, "1");
    assert_no_leaks(&mut c, &d, 0).await;
    d.release().await;
}

/// The service runs a Remove in place (no thread hand-off) only when it need
/// not wait. While another write transaction holds the store, `try_remove`
/// does nothing at all, and `remove` (what the service falls back to, on a
/// thread) waits for that transaction and then removes. In process, on the
/// library.
#[test]
fn remove_in_place_never_waits_for_the_store() {
    use std::collections::BTreeMap;
    use thinbox_snapshotter::meta::Kind;
    use thinbox_snapshotter::{Error, Snapshots};

    let dir = tmp();
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(&cfg_path, format!("release_on_exit = true\n{SMALL}")).unwrap();
    let cfg = thinboxd::Config::load(&cfg_path).unwrap();
    let (s, _) = Snapshots::open(&dir.path().join("root"), cfg.pool, cfg.snapshot).unwrap();
    for key in ["a", "b"] {
        s.prepare(Kind::Active, key, "", BTreeMap::new()).unwrap();
    }

    let busy = s.pool().store().write().unwrap();
    assert!(s.try_remove("a").is_none(), "the store is busy: not done in place");
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| s.remove("a"));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!waiting.is_finished(), "remove waits for the other transaction");
        drop(busy);
        waiting.join().unwrap().unwrap();
    });
    assert!(matches!(s.try_remove("a"), Some(Err(Error::NotFound(_)))), "removed once, by the waiting remove");
    s.try_remove("b").expect("the store is free: done in place").unwrap();
    assert!(s.list(&[]).unwrap().is_empty());
    s.cleanup().unwrap();
    assert!(s.pool().store().devices().unwrap().is_empty(), "both devices deleted");
    s.shutdown(cfg.release_on_exit).unwrap();
}

/// Cleanup's usual case, where no deletion has failed, runs the queued
/// deletions and nothing more: containerd calls it after every garbage
/// collection, while the next containers start, so it does not audit the
/// whole pool under the exclusive gate (start-up and `thinboxctl gc` do).
/// An image planted in the pool without a record stays through Cleanup, and
/// gc removes it.
#[tokio::test]
async fn cleanup_runs_the_queued_deletions_without_auditing_the_pool() {
    let dir = tmp();
    let (d, mut c) = Daemon::start(dir.path(), Some(SMALL), &[]).await;
    let work = dir.path().join("work");
    layer(&mut c, &work, "base", "", &[("a", "1")]).await;
    let keys: Vec<String> = (0..4).map(|i| format!("ctr{i}")).collect();
    for k in &keys {
        prepare(&mut c, k, "base", HashMap::new()).await.unwrap();
    }
    for k in &keys {
        remove(&mut c, k).await.unwrap();
    }
    let stray = (d.inventory().backend == "reflink").then(|| {
        let p = d.root.join("pool/devices/987654321.img");
        std::fs::File::create(&p).unwrap();
        p
    });
    c.cleanup(CleanupRequest { snapshotter: "thinbox".into() }).await.unwrap();
    assert_eq!(d.device_records().await, 1, "Cleanup returned with the queued deletions done");
    if let Some(stray) = &stray {
        assert!(stray.exists(), "Cleanup audited the pool");
        let report = d.admin().await.gc(GcRequest {}).await.unwrap().into_inner().report;
        assert!(!stray.exists(), "gc removes the stray image: {report:?}");
    }
    assert_eq!(read_through_view(&mut c, &work, "base", "a").await, "1");
    assert_no_leaks(&mut c, &d, 0).await;
    d.release().await;
}

/// Cleanup (containerd's "reclaim now", also `thinboxctl gc`) finishes every
/// pending deletion before it returns. On the reflink backend the pool's
/// image directory is made immutable first, so every background attempt
/// fails and the deletions are certainly still pending (waiting for their
/// retry) when Cleanup runs; a Cleanup while it still is fails (the space is
/// not back), and the next one, once the directory is writable, finishes
/// them.
#[tokio::test]
async fn cleanup_finishes_pending_deletions_at_once() {
    let dir = tmp();
    let (d, mut c) = Daemon::start(dir.path(), Some(SMALL), &[]).await;
    let work = dir.path().join("work");
    layer(&mut c, &work, "base", "", &[("a", "1")]).await;
    let keys: Vec<String> = (0..6).map(|i| format!("ctr{i}")).collect();
    for k in &keys {
        prepare(&mut c, k, "base", HashMap::new()).await.unwrap();
    }
    assert_eq!(d.device_records().await, 7);

    let immutable = (d.inventory().backend == "reflink").then(|| Immutable::new(&d.root.join("pool/devices")));
    for k in &keys {
        remove(&mut c, k).await.unwrap();
    }
    assert_eq!(list(&mut c, &[]).await.unwrap(), ["base"]);
    if let Some(immutable) = immutable {
        assert_eq!(d.device_records().await, 7, "no deletion can succeed yet");
        // Nor can Cleanup's reconciliation: it must not answer success.
        let err = c.cleanup(CleanupRequest { snapshotter: "thinbox".into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{err:?}");
        assert!(err.message().contains("6 removed device(s) could not be deleted"), "{}", err.message());
        assert_eq!(d.device_records().await, 7);
        drop(immutable);
    }
    c.cleanup(CleanupRequest { snapshotter: "thinbox".into() }).await.unwrap();
    assert_eq!(d.device_records().await, 1, "Cleanup returned with every pending deletion done");
    let inv = d.inventory();
    assert_eq!(inv.stored.map(|s| s.len()), Some(1), "only base's storage is left: {:?}", inv.attached);
    assert!(inv.attached.is_empty(), "no removed device is attached: {:?}", inv.attached);
    assert_eq!(read_through_view(&mut c, &work, "base", "a").await, "1");
    assert_no_leaks(&mut c, &d, 0).await;
    d.release().await;
}

#[tokio::test]
async fn socket_is_0660_and_a_second_daemon_on_the_same_root_is_refused() {
    let dir = tmp();
    let (d, mut c) = Daemon::start(dir.path(), Some(SMALL), &[]).await;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let other = dir.path().join("other.sock");
    let out = common::thinboxd().arg("--root").arg(&d.root).arg("--snapshotter-address").arg(&other).arg("--no-csi").output().unwrap();
    assert!(!out.status.success(), "a second daemon on the same root must fail");
    let errors = common::error_lines(&out.stderr);
    assert_eq!(errors.len(), 1, "one error line: {errors:#?}");
    assert!(!other.exists(), "the refused daemon's socket is gone with it");
    assert_eq!(list(&mut c, &[]).await.unwrap(), Vec::<String>::new(), "the first daemon keeps serving");
    d.release().await;
}

#[tokio::test]
async fn bad_config_is_refused_at_start() {
    let dir = tmp();
    let p = dir.path().join("bad.toml");
    // A parse error names the file, line and column; a bad value, its key.
    let at = format!("config {}, line 2, column 1: unknown field `size`", p.display());
    for (cfg, says) in [
        ("[pool]\nsize = 1\n", at.as_str()),
        ("[snapshot]\ndefault_size = \"1MiB\"\n", "snapshot.default_size 1MiB is below the minimum"),
        ("[pool]\ndir = \"relative/path\"\n", "invalid configuration: pool: "),
    ] {
        std::fs::write(&p, cfg).unwrap();
        let out = common::thinboxd()
            .arg("--root")
            .arg(dir.path().join("state"))
            .arg("--snapshotter-address")
            .arg(dir.path().join("s.sock"))
            .arg("--no-csi")
            .arg("--config")
            .arg(&p)
            .output()
            .unwrap();
        assert!(!out.status.success(), "config {cfg:?} must be refused");
        let errors = common::error_lines(&out.stderr);
        assert_eq!(errors.len(), 1, "config {cfg:?}: one error line: {errors:#?}");
        assert!(errors[0].contains(says), "config {cfg:?}: {:?} should say {says:?}", errors[0]);
    }
    assert!(!dir.path().join("state").exists() && !dir.path().join("s.sock").exists(), "refused before anything was made");
    assert!(thinbox_blockstore::scan_loops(dir.path()).unwrap().is_empty());
}

/// The daemon's sweep ([snapshot.containerd_gc]) with no containerd to ask:
/// every sweep fails, removes nothing (not even a snapshot named as
/// containerd names them, which an empty view would remove), and counts as
/// an error. (containerd-gc.sh checks a sweep that removes, with a real one.)
#[tokio::test]
async fn a_sweep_without_containerd_removes_nothing_and_counts_an_error() {
    let dir = tmp();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let missing = dir.path().join("no-containerd.sock");
    let cfg = format!("{SMALL}[snapshot.containerd_gc]\ninterval_s = 1\nmin_age_s = 0\naddress = {:?}\n", missing.display().to_string());
    let (d, mut c) = Daemon::start_with_args(dir.path(), Some(&cfg), &["--metrics-address", &address]).await;
    prepare(&mut c, "ns/1/forgotten", "", HashMap::new()).await.unwrap();
    let errors = "\nthinbox_operations_total{api=\"snapshots\",op=\"containerd_gc\",result=\"error\"} ";
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = scrape(port).await;
        if text.contains(errors) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(text.contains(errors), "no failed sweep counted in 30 s:\n{text}");
    assert!(!text.contains("op=\"containerd_gc\",result=\"ok\""), "{text}");
    assert!(stat(&mut c, "ns/1/forgotten").await.is_ok(), "a sweep that could not ask containerd removed a snapshot");
    d.release().await;
}

/// The pool's gauges, and a removed device still open, as a VMM holds a disk:
/// dm-thin cannot delete it until it is closed, and the deleting gauge and
/// `status` say so meanwhile; on reflink it goes at once (its loop detaches
/// at the close). Once closed, nobody has to ask for it to go.
#[tokio::test]
async fn pool_gauges_count_devices_and_those_still_being_deleted() {
    let dir = tmp();
    let port = free_port();
    let (d, mut c) = Daemon::start_with_args(dir.path(), Some(SMALL), &["--metrics-address", &format!("127.0.0.1:{port}")]).await;
    prepare(&mut c, "base-active", "", HashMap::new()).await.unwrap();
    commit(&mut c, "base", "base-active").await.unwrap();
    let mounts = prepare(&mut c, "ctr", "base", HashMap::new()).await.unwrap();
    let holder = std::fs::OpenOptions::new().read(true).write(true).open(&mounts[0].source).unwrap();
    remove(&mut c, "ctr").await.unwrap();
    c.cleanup(CleanupRequest { snapshotter: "thinbox".into() }).await.unwrap();

    let held = u64::from(d.inventory().backend == "dm-thin");
    let st = d.pool_status().await;
    assert_eq!((st.devices, st.deleting), (1 + held, held));
    let text = scrape(port).await;
    for want in [
        "\nthinbox_pool_devices{consumer=\"image_layers\"} 1\n".to_owned(),
        "\nthinbox_pool_devices{consumer=\"container_rootfs\"} 0\n".to_owned(),
        "\n# TYPE thinbox_pool_deleting_devices gauge\n".to_owned(),
        format!("\nthinbox_pool_deleting_devices {held}\n"),
    ] {
        assert!(text.contains(&want), "metrics lack {want:?}:\n{text}");
    }

    drop(holder);
    d.settle().await;
    assert!(scrape(port).await.contains("\nthinbox_pool_deleting_devices 0\n"));
    assert_eq!(d.device_records().await, 1);
    assert_no_leaks(&mut c, &d, 0).await;
    d.release().await;
}

#[tokio::test]
async fn metrics_count_every_snapshots_call() {
    let dir = tmp();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let (d, mut c) = Daemon::start_with_args(dir.path(), Some(SMALL), &["--metrics-address", &address]).await;
    prepare(&mut c, "base-active", "", HashMap::new()).await.unwrap();
    commit(&mut c, "base", "base-active").await.unwrap();
    prepare(&mut c, "child", "base", HashMap::new()).await.unwrap();
    remove(&mut c, "child").await.unwrap();
    assert_eq!(code(remove(&mut c, "missing").await), Code::NotFound);
    assert_eq!(code(stat(&mut c, "missing").await), Code::NotFound);

    let text = scrape(port).await;
    let ops = |op: &str, result: &str, n: u64| format!("\nthinbox_operations_total{{api=\"snapshots\",op=\"{op}\",result=\"{result}\"}} {n}\n");
    for want in [
        "\r\ncontent-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n".to_owned(),
        ops("prepare", "ok", 2),
        ops("commit", "ok", 1),
        ops("remove", "ok", 1),
        ops("remove", "error", 1),
        ops("stat", "error", 1),
        "\nthinbox_operation_duration_seconds_count{api=\"snapshots\",op=\"prepare\",result=\"ok\"} 2\n".to_owned(),
        "\nthinbox_operation_duration_seconds_bucket{le=\"+Inf\",api=\"snapshots\",op=\"commit\",result=\"ok\"} 1\n".to_owned(),
    ] {
        assert!(text.contains(&want), "metrics lack {want:?}:\n{text}");
    }
    for absent in ["op=\"prepare\",result=\"error\"", "op=\"commit\",result=\"error\"", "api=\"csi\""] {
        assert!(!text.contains(absent), "metrics have {absent:?}:\n{text}");
    }
    assert!(text.ends_with("\n# EOF\n"), "{text}");

    // A second daemon on the same metrics address fails its start before it
    // touches its state.
    let other = dir.path().join("other");
    let out = common::thinboxd()
        .arg("--root")
        .arg(other.join("state"))
        .arg("--snapshotter-address")
        .arg(other.join("s.sock"))
        .arg("--no-csi")
        .args(["--metrics-address", &address])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a busy metrics address must fail the start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("bind metrics endpoint {address}")), "{stderr}");
    assert!(!other.join("state").exists(), "state made before the bind failed");
    assert!(!other.join("s.sock").exists(), "the socket bound before the metrics address is gone with the daemon");

    assert_no_leaks(&mut c, &d, 0).await;
    d.release().await;
}
