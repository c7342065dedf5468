//! Crash safety (crash tier, `fault-injection` build): `thinboxd`, serving its
//! snapshot socket, aborts, like `kill -9`, at each step of Prepare, Commit and
//! Remove. After a restart, Stat and List agree with what is on disk and in the
//! kernel, committed data is intact, the interrupted operation either happened
//! entirely or not at all, and no image file or loop device is leaked. Needs
//! root.
//!
//! Remove hands the device to the background deleter, so the last point
//! (`destroy.after_unlink`) is reached after Remove has returned, in the
//! deleter: there the client may see success or the crash, whichever comes
//! first, and the daemon must still abort at the point and converge after it.
//! Remove's commit is not flushed (the deleter makes it durable before it
//! touches the device), so a crash right after it may undo the Remove whole;
//! once the deletion has begun, the Remove must have stuck.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use common::snapshots::*;
use thinbox_proto::snapshots::{Kind, MountsRequest};

const CFG: &str = "[pool]\nembedded_size = \"4GiB\"\nreserve = \"64MiB\"\n[snapshot]\ndefault_size = \"512MiB\"\n";

#[derive(Clone, Copy, Debug)]
enum Op {
    Prepare,
    Commit,
    Remove,
}

/// Where a point is reached relative to the call that leads to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reached {
    /// Inside the call: the client sees the crash.
    InCall,
    /// In the background deleter, after the call committed and returned.
    Background,
}

/// Every injection point, the operation that reaches it, and where.
const POINTS: &[(&str, Op, Reached)] = &[
    ("prepare.after_intent", Op::Prepare, Reached::InCall),
    ("create.after_image", Op::Prepare, Reached::InCall),
    ("create.after_attach", Op::Prepare, Reached::InCall),
    ("prepare.after_build", Op::Prepare, Reached::InCall),
    ("prepare.after_ready", Op::Prepare, Reached::InCall),
    ("commit.after_record", Op::Commit, Reached::InCall),
    ("commit.after_detach", Op::Commit, Reached::InCall),
    ("remove.after_record", Op::Remove, Reached::InCall),
    ("destroy.after_unlink", Op::Remove, Reached::Background),
];

/// base (committed, hello=world) ← act (active, wrote mine=1), leaf (committed).
async fn setup(c: &mut Client, work: &Path) {
    layer(c, work, "base", "", &[("hello", "world")]).await;
    layer(c, work, "leaf", "base", &[("leafy", "yes")]).await;
    let m = prepare(c, "act", "base", HashMap::new()).await.unwrap();
    mount(&m, &work.join("act"));
    std::fs::write(work.join("act/mine"), "1").unwrap();
    umount(&work.join("act"));
}

async fn run_op(c: &mut Client, op: Op) -> Result<(), tonic::Status> {
    match op {
        Op::Prepare => prepare(c, "new", "base", HashMap::new()).await.map(|_| ()),
        Op::Commit => commit(c, "act-done", "act").await,
        Op::Remove => remove(c, "leaf").await,
    }
}

/// The store, the pool's files and the kernel's loops tell the same story
/// (once the background deleter has finished what Removes left it).
async fn assert_consistent(c: &mut Client, d: &Daemon) -> Vec<String> {
    d.settle().await;
    let names = list(c, &[]).await.unwrap();
    for n in &names {
        assert_eq!(&stat(c, n).await.unwrap().name, n, "Stat agrees with List");
    }
    let inv = d.inventory();
    assert_eq!(inv.stored.as_ref().map_or(usize::MAX, |s| s.len()), names.len(), "one device per snapshot, no orphans: {inv:?} vs {names:?}");
    let mut expected = BTreeSet::new();
    for n in &names {
        if stat(c, n).await.unwrap().kind != Kind::Committed as i32 {
            let m = c.mounts(MountsRequest { snapshotter: String::new(), key: n.clone() }).await.unwrap().into_inner().mounts;
            expected.insert(std::path::PathBuf::from(&m[0].source));
        }
    }
    let attached: BTreeSet<_> = inv.attached.into_values().collect();
    assert_eq!(attached, expected, "exactly the active snapshots and views are attached");
    names
}

#[tokio::test]
async fn every_step_of_prepare_commit_and_remove_survives_a_crash() {
    require_root();
    for &(point, op, reached) in POINTS {
        let dir = tempfile::Builder::new().prefix("thinbox-crash-").tempdir().unwrap();
        let work = dir.path().join("work");
        let (mut d, mut c) = Daemon::start(dir.path(), Some(CFG), &[]).await;
        setup(&mut c, &work).await;
        assert!(d.stop().success());

        let mut c = d.spawn(&[("THINBOX_FAULT", point)]).await;
        let result = run_op(&mut c, op).await;
        if reached == Reached::InCall {
            assert!(result.is_err(), "{point}: the client sees the crash");
        }
        let status = d.wait();
        assert_eq!(status.signal(), Some(libc_sigabrt()), "{point}: the daemon aborted at the injected fault ({status})");

        let mut c = d.spawn(&[]).await;
        let names = assert_consistent(&mut c, &d).await;
        assert_eq!(read_through_view(&mut c, &work, "base", "hello").await, "world", "{point}: committed data intact");
        match op {
            Op::Prepare => {
                // All or nothing; either way the key can be used afterwards.
                if names.contains(&"new".to_string()) {
                    let m = c.mounts(MountsRequest { snapshotter: String::new(), key: "new".into() }).await.unwrap().into_inner().mounts;
                    mount(&m, &work.join("new"));
                    assert_eq!(std::fs::read_to_string(work.join("new/hello")).unwrap(), "world");
                    umount(&work.join("new"));
                } else {
                    prepare(&mut c, "new", "base", HashMap::new()).await.unwrap();
                }
            }
            Op::Commit => {
                let done = names.contains(&"act-done".to_string());
                assert_ne!(done, names.contains(&"act".to_string()), "{point}: exactly one of act / act-done: {names:?}");
                if !done {
                    commit(&mut c, "act-done", "act").await.unwrap();
                }
                assert_eq!(read_through_view(&mut c, &work, "act-done", "mine").await, "1", "{point}: committed writes kept");
            }
            Op::Remove => {
                if reached == Reached::Background {
                    assert!(!names.contains(&"leaf".to_string()), "{point}: the deletion began, so the Remove is durable: {names:?}");
                }
                if names.contains(&"leaf".to_string()) {
                    assert_eq!(read_through_view(&mut c, &work, "leaf", "leafy").await, "yes", "{point}: an undone Remove leaves the snapshot whole");
                    remove(&mut c, "leaf").await.unwrap();
                }
                assert!(!list(&mut c, &[]).await.unwrap().contains(&"leaf".to_string()));
            }
        }
        assert_consistent(&mut c, &d).await;
        drop(c);
        d.release().await;
    }
}

fn libc_sigabrt() -> i32 {
    rustix::process::Signal::ABORT.as_raw()
}

/// A Commit whose layer cannot be made durable (an injected `EIO` from its
/// flush) fails and leaves the snapshot as it was: active, attached and
/// whole, so that a retry commits it.
#[tokio::test]
async fn a_commit_whose_flush_fails_leaves_the_snapshot_active() {
    require_root();
    let dir = tempfile::Builder::new().prefix("thinbox-crash-").tempdir().unwrap();
    let work = dir.path().join("work");
    let (mut d, mut c) = Daemon::start(dir.path(), Some(CFG), &[]).await;
    setup(&mut c, &work).await;
    assert!(d.stop().success());

    let mut c = d.spawn(&[("THINBOX_FAULT", "pool.flush")]).await;
    let failed = commit(&mut c, "act-done", "act").await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Internal, "{failed:?}");
    assert!(failed.message().contains("flush device"), "{}", failed.message());
    let names = assert_consistent(&mut c, &d).await;
    assert!(names.contains(&"act".to_string()) && !names.contains(&"act-done".to_string()), "{names:?}");
    assert_eq!(stat(&mut c, "act").await.unwrap().kind, Kind::Active as i32);
    assert!(d.stop().success());

    let mut c = d.spawn(&[]).await;
    commit(&mut c, "act-done", "act").await.unwrap();
    assert_eq!(read_through_view(&mut c, &work, "act-done", "mine").await, "1");
    assert_consistent(&mut c, &d).await;
    drop(c);
    d.release().await;
}
