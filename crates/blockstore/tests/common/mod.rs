//! Helpers shared by the block engine's host and UML tiers.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use thinbox_blockstore::{Access, Bytes, CreateSpec, DeviceId, DeviceState, Devices, FsType, Pool};

pub fn tmp() -> tempfile::TempDir {
    assert!(rustix::process::geteuid().is_root(), "host-tier tests need root: run `sudo tests/run.sh host`");
    tempfile::Builder::new().prefix("thinbox-bs-").tempdir().unwrap()
}

pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Creates and builds a device in one go.
pub fn create(pool: &Pool, spec: CreateSpec) -> (DeviceId, Option<PathBuf>) {
    let txn = pool.store().write().unwrap();
    let rec = pool.plan_create(&mut Devices::open(&txn).unwrap(), spec).unwrap();
    txn.commit().unwrap();
    let node = pool.build(&rec).unwrap();
    let txn = pool.store().write().unwrap();
    {
        let mut devs = Devices::open(&txn).unwrap();
        let mut r = devs.require(rec.id).unwrap();
        r.state = DeviceState::Ready;
        devs.put(&r).unwrap();
    }
    txn.commit().unwrap();
    (rec.id, node)
}

pub fn with_mounted<T>(node: &Path, fs: FsType, dir: &Path, f: impl FnOnce(&Path) -> T) -> T {
    std::fs::create_dir_all(dir).unwrap();
    let opts = if fs == FsType::Xfs { "nouuid" } else { "defaults" };
    sh("mount", &["-t", fs.as_str(), "-o", opts, node.to_str().unwrap(), dir.to_str().unwrap()]);
    let out = f(dir);
    sh("umount", &[dir.to_str().unwrap()]);
    out
}

pub fn spec(size: u64, origin: Option<DeviceId>, access: Option<Access>) -> CreateSpec {
    CreateSpec { size: Bytes(size), origin, fs: Some(FsType::Ext4), access }
}

/// Snapshot, write, read back, delete: on `pool`.
pub fn exercise(pool: &Pool, work: &Path) {
    let (base, node) = create(pool, spec(512 << 20, None, Some(Access::ReadWrite)));
    let node = node.unwrap();
    with_mounted(&node, FsType::Ext4, &work.join("base"), |m| {
        assert!(!m.join("lost+found").exists(), "a fresh filesystem is empty");
        std::fs::write(m.join("f"), "base").unwrap();
    });
    pool.deactivate(base).unwrap();
    assert!(pool.node(base).is_none());
    let (child, cnode) = create(pool, spec(512 << 20, Some(base), Some(Access::ReadWrite)));
    let content = with_mounted(&cnode.unwrap(), FsType::Ext4, &work.join("child"), |m| {
        assert_eq!(std::fs::read_to_string(m.join("f")).unwrap(), "base", "the child starts as a copy of its origin");
        std::fs::write(m.join("f"), "child").unwrap();
        std::fs::read_to_string(m.join("f")).unwrap()
    });
    assert_eq!(content, "child");
    let (view, vnode) = create(pool, spec(512 << 20, Some(base), Some(Access::ReadOnly)));
    assert_eq!(std::fs::read_to_string(format!("/sys/block/{}/ro", vnode.unwrap().file_name().unwrap().to_str().unwrap())).unwrap().trim(), "1");
    for id in [view, child, base] {
        destroy(pool, id);
    }
    assert!(pool.store().devices().unwrap().is_empty());
}

/// Marks a device for deletion and deletes it.
pub fn destroy(pool: &Pool, id: DeviceId) {
    let txn = pool.store().write().unwrap();
    pool.plan_delete(&mut Devices::open(&txn).unwrap(), id).unwrap();
    txn.commit().unwrap();
    pool.destroy(id).unwrap();
}
