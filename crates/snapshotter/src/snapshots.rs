//! containerd snapshot semantics on top of blockstore devices.
//!
//! Each snapshot owns one device: a fresh device with an empty filesystem when it
//! has no parent, otherwise a copy-on-write snapshot of its parent's device.
//! Active snapshots are attached read-write, views read-only; committing
//! detaches. Every operation writes the snapshot record and the device intent in
//! one transaction before touching the kernel (Prepare through the engine's
//! intent discipline, [`Engine::create`]), so the engine's reconciliation
//! can converge any crash: [`SnapshotRecords`] drops a snapshot whose device
//! never became ready, and the pool deletes devices nobody references.
//!
//! Remove is the one operation that leaves kernel work for later: it marks the
//! device `Deleting` and the engine's background deleter destroys it;
//! `Cleanup` finishes pending deletions at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thinbox_blockstore::redb::{ReadableDatabase, ReadableMultimapTable, ReadableTable, WriteTransaction};
use thinbox_blockstore::{
    Access, Bytes, Consumer, CreateSpec, Creation, DeviceId, DeviceRecord, DeviceState, Devices, Engine, ErrorKind, Points, Pool, PoolConfig,
    ReconcileReport, fault,
};
use thinbox_proto::Mount;
use thinbox_proto::snapshots::{Info, Kind as ProtoKind};

use crate::config::{MIN_SNAPSHOT_SIZE, SnapshotConfig};
use crate::error::{Error, Result};
use crate::filter::{Fields, Filter};
use crate::meta::{self, CHILDREN, Kind, Record, SNAPSHOTS};

/// Label that sets a snapshot's size in bytes.
pub const MAX_SIZE_LABEL: &str = "containerd.io/snapshot/max-size";
/// containerd's limit on a label's key plus value.
pub const MAX_LABEL_BYTES: usize = 4096;
/// Our limit on a key's length.
pub const MAX_KEY_BYTES: usize = 4096;

/// Space and inodes a snapshot holds beyond its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Bytes.
    pub size: u64,
    /// Inodes.
    pub inodes: u64,
}

/// Crash-test points of Prepare's steps.
const PREPARE_POINTS: Points =
    Points { after_intent: "prepare.after_intent", after_build: "prepare.after_build", after_ready: "prepare.after_ready" };

/// Prepare's part in the engine's intent discipline: the snapshot record
/// beside its device's (a snapshot's state is its device's).
struct Preparation<'a> {
    cfg: &'a SnapshotConfig,
    kind: Kind,
    key: &'a str,
    parent: &'a str,
    labels: BTreeMap<String, String>,
    requested: Option<Bytes>,
    /// The device's filesystem (its parent's, for a child).
    fs: thinbox_blockstore::FsType,
}

impl Creation for Preparation<'_> {
    type Error = Error;

    fn plan(&mut self, txn: &WriteTransaction) -> Result<Vec<CreateSpec>> {
        let snaps = txn.open_table(SNAPSHOTS)?;
        if snaps.get(self.key)?.is_some() {
            return Err(Error::AlreadyExists(self.key.to_owned()));
        }
        let origin = if self.parent.is_empty() {
            None
        } else {
            let p = meta::get(&snaps, self.parent)?.ok_or_else(|| Error::ParentNotFound(self.parent.to_owned()))?;
            if p.kind != Kind::Committed {
                return Err(Error::ParentNotCommitted(self.parent.to_owned()));
            }
            Some(Devices::open(txn)?.require(p.device)?)
        };
        let size = match (&origin, self.requested) {
            // A view never writes, so it keeps its parent's size.
            (Some(o), _) if self.kind == Kind::View => o.size,
            (_, Some(size)) => size,
            (Some(o), None) => o.size.max(self.cfg.default_size),
            (None, None) => self.cfg.default_size,
        };
        let access = if self.kind == Kind::View { Access::ReadOnly } else { Access::ReadWrite };
        Ok(vec![CreateSpec { size, origin: origin.map(|o| o.id), fs: Some(self.cfg.filesystem), access: Some(access) }])
    }

    fn record(&mut self, txn: &WriteTransaction, devices: &[DeviceRecord]) -> Result<()> {
        let dev = devices.first().ok_or_else(|| Error::NotAttached(self.key.to_owned()))?;
        self.fs = dev.fs.ok_or_else(|| Error::Unformatted(self.key.to_owned()))?;
        let now = meta::now();
        let rec = Record {
            kind: self.kind,
            parent: self.parent.to_owned(),
            labels: std::mem::take(&mut self.labels),
            created: now,
            updated: now,
            device: dev.id,
        };
        txn.open_table(SNAPSHOTS)?.insert(self.key, meta::encode(self.key, &rec)?.as_slice())?;
        if !self.parent.is_empty() {
            txn.open_multimap_table(CHILDREN)?.insert(self.parent, self.key)?;
        }
        Ok(())
    }

    fn build(&mut self, engine: &Engine, devices: &[DeviceRecord]) -> Result<Option<PathBuf>> {
        let dev = devices.first().ok_or_else(|| Error::NotAttached(self.key.to_owned()))?;
        Ok(engine.pool().build(dev)?)
    }

    fn undo(&mut self, txn: &WriteTransaction) -> Result<()> {
        tracing::warn!(key = self.key, "prepare failed; undoing");
        remove_record(txn, self.key, self.parent)
    }

    fn ready(&mut self, _txn: &WriteTransaction) -> Result<()> {
        // The record needs no change: a snapshot is ready when its device is.
        Ok(())
    }
}

/// The snapshotter: a pool plus snapshot records.
#[derive(Debug)]
pub struct Snapshots {
    engine: Arc<Engine>,
    cfg: SnapshotConfig,
}

impl Snapshots {
    /// Opens the state under `root` as the pool's only consumer and converges
    /// it with the kernel, before anything is served.
    pub fn open(root: &Path, pool: PoolConfig, cfg: SnapshotConfig) -> Result<(Snapshots, ReconcileReport)> {
        let engine = Arc::new(Engine::open(root, pool, vec![Box::new(SnapshotRecords)])?);
        let report = engine.reconcile()?;
        Ok((Snapshots::new(engine, cfg), report))
    }

    /// The snapshot front end over an engine that lists [`SnapshotRecords`]
    /// among its consumers (reconciled by its owner).
    pub fn new(engine: Arc<Engine>, cfg: SnapshotConfig) -> Snapshots {
        Snapshots { engine, cfg }
    }

    /// The device pool.
    pub fn pool(&self) -> &Pool {
        self.engine.pool()
    }

    /// The engine under this front end.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Creates an active snapshot (or a view) `key` on `parent` ("" for none).
    ///
    /// A pool too full for it while removed snapshots' devices are still being
    /// deleted (or just were) waits for the deleter and tries once more: a
    /// client that removes to make room must not fail because of our deferral.
    pub fn prepare(&self, kind: Kind, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<Mount>> {
        self.engine.with_room(|e: &Error| e.kind() == ErrorKind::ResourceExhausted, || self.prepare_once(kind, key, parent, labels.clone()))
    }

    fn prepare_once(&self, kind: Kind, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<Mount>> {
        let _g = self.shared();
        validate_key(key)?;
        validate_labels(&labels)?;
        let requested = size_label(&labels)?;
        let mut making = Preparation { cfg: &self.cfg, kind, key, parent, labels, requested, fs: self.cfg.filesystem };
        let node = self.engine.create(&mut making, PREPARE_POINTS)?.ok_or_else(|| Error::NotAttached(key.to_owned()))?;
        Ok(vec![mount(&node, making.fs, kind)])
    }

    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let rec = self.record(key)?;
        if rec.kind == Kind::Committed {
            return Err(Error::Committed(key.to_owned()));
        }
        let node = self.engine.pool().node(rec.device).ok_or_else(|| Error::NotAttached(key.to_owned()))?;
        let dev = self.engine.pool().store().device(rec.device)?.ok_or(thinbox_blockstore::Error::DeviceNotFound(rec.device))?;
        Ok(vec![mount(&node, dev.fs.ok_or_else(|| Error::Unformatted(key.to_owned()))?, rec.kind)])
    }

    /// Commits active snapshot `key` as `name`; its device is detached.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>, rebase_parent: &str) -> Result<()> {
        let _g = self.shared();
        validate_key(name)?;
        validate_labels(&labels)?;
        let txn = self.engine.pool().store().write()?;
        let (active, access) = {
            let snaps = txn.open_table(SNAPSHOTS)?;
            let rec = meta::get(&snaps, key)?.ok_or_else(|| Error::NotFound(key.to_owned()))?;
            if rec.kind != Kind::Active {
                return Err(Error::NotActive(key.to_owned()));
            }
            if !rebase_parent.is_empty() && rebase_parent != rec.parent {
                return Err(Error::Rebase { key: key.to_owned(), parent: rebase_parent.to_owned() });
            }
            if snaps.get(name)?.is_some() {
                return Err(Error::AlreadyExists(name.to_owned()));
            }
            let access = Devices::open(&txn)?.require(rec.device)?.access;
            (rec, access)
        };
        let now = meta::now();
        let committed = Record { kind: Kind::Committed, labels, created: now, updated: now, ..active.clone() };
        rename(&txn, key, name, &committed, None)?;
        let device = active.device;
        // The record and the layer's data must both be durable before the
        // reply, neither before the other (a crash between them leaves a
        // commit the client never heard of), so their flushes overlap.
        let pool = self.engine.pool();
        let (recorded, flushed) = std::thread::scope(|s| {
            let flushing = s.spawn(|| pool.flush(device));
            (txn.commit(), flushing.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        });
        recorded?;
        if let Err(e) = flushed {
            // The layer may not be durable, and the client hears of a
            // failure: the snapshot goes back to being active (its device is
            // still attached), so that a retry or a Remove finds it.
            let undone = pool.store().write().map_err(Error::from).and_then(|txn| {
                rename(&txn, name, key, &active, access)?;
                Ok(txn.commit()?)
            });
            if let Err(u) = undone {
                tracing::warn!(name, key, error = %crate::error::chain(&u), "undoing a commit whose flush failed; the snapshot stays committed");
            }
            return Err(e.into());
        }
        fault::point("commit.after_record");
        // The commit is durable now; a failed detach is converged by the next
        // reconciliation and must not make the client retry a done commit.
        if let Err(e) = pool.detach(device) {
            tracing::warn!(name, device = %device, error = %crate::error::chain(&e), "detach after commit failed; left for reconciliation");
        }
        fault::point("commit.after_detach");
        Ok(())
    }

    /// Removes a snapshot without children. Its device is marked `Deleting` in
    /// the same transaction and destroyed by the background deleter after this
    /// returns.
    pub fn remove(&self, key: &str) -> Result<()> {
        let _g = self.shared();
        // Not flushed: the deleter makes it durable before it deletes the
        // device. A crash before that undoes the Remove whole; containerd's
        // garbage collector removes a snapshot it no longer knows again.
        let txn = self.engine.pool().store().write_lazy()?;
        self.remove_in(txn, key)
    }

    /// [`Snapshots::remove`] if it need not wait, else `None` (nothing done):
    /// where it would wait for the gate or for another write transaction. A
    /// Remove changes the store in memory only, so an async caller can run it
    /// in place rather than hand it to a thread and back.
    pub fn try_remove(&self, key: &str) -> Option<Result<()>> {
        let _g = self.engine.try_shared()?;
        match self.engine.pool().store().try_write_lazy() {
            Ok(Some(txn)) => Some(self.remove_in(txn, key)),
            Ok(None) => None,
            Err(e) => Some(Err(e.into())),
        }
    }

    /// Remove's work, under the shared gate, in a lazy transaction.
    fn remove_in(&self, txn: WriteTransaction, key: &str) -> Result<()> {
        let device = {
            let rec = meta::get(&txn.open_table(SNAPSHOTS)?, key)?.ok_or_else(|| Error::NotFound(key.to_owned()))?;
            if txn.open_multimap_table(CHILDREN)?.get(key)?.next().is_some() {
                return Err(Error::HasChildren(key.to_owned()));
            }
            remove_record(&txn, key, &rec.parent)?;
            self.engine.plan_forget(&txn, rec.device)?;
            rec.device
        };
        txn.commit()?;
        fault::point("remove.after_record");
        // The snapshot is gone for good and the device marked `Deleting`: from
        // here a crash, a stop or a failing destroy all leave it to
        // reconciliation. Queued under the gate, so an exclusive path sees the
        // queue and the store agree.
        self.engine.forget(device);
        Ok(())
    }

    /// Info of one snapshot.
    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(info(key, &self.record(key)?))
    }

    /// Changes labels (field paths `labels` or `labels.<key>`; none: all labels).
    pub fn update(&self, new: Info, paths: &[String]) -> Result<Info> {
        let _g = self.shared();
        let key = new.name.as_str();
        validate_labels(&new.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())?;
        let mut changes: Vec<(String, Option<String>)> = Vec::new();
        let mut replace_all = paths.is_empty();
        for p in paths {
            if p == "labels" {
                replace_all = true;
            } else if let Some(label) = p.strip_prefix("labels.") {
                changes.push((label.to_owned(), new.labels.get(label).cloned()));
            } else {
                return Err(Error::ImmutableField(p.clone()));
            }
        }
        let txn = self.engine.pool().store().write()?;
        let rec = {
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            let mut rec = meta::get(&snaps, key)?.ok_or_else(|| Error::NotFound(key.to_owned()))?;
            if replace_all {
                rec.labels = new.labels.into_iter().collect();
            }
            for (label, value) in changes {
                match value {
                    Some(v) if !v.is_empty() => rec.labels.insert(label, v),
                    _ => rec.labels.remove(&label),
                };
            }
            rec.updated = meta::now();
            snaps.insert(key, meta::encode(key, &rec)?.as_slice())?;
            rec
        };
        txn.commit()?;
        Ok(info(key, &rec))
    }

    /// Every snapshot matching `filters` (containerd filter syntax; any string matches).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filter = Filter::parse(filters)?;
        let txn = self.engine.pool().store().db().begin_read()?;
        let snaps = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for row in snaps.iter()? {
            let (k, v) = row?;
            let rec = meta::decode(k.value(), v.value())?;
            if filter.matches(&Matchable { name: k.value(), rec: &rec }) {
                out.push(info(k.value(), &rec));
            }
        }
        Ok(out)
    }

    /// Bytes and inodes a snapshot holds beyond its parent.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self.record(key)?;
        let dev = self.engine.pool().store().device(rec.device)?.ok_or(thinbox_blockstore::Error::DeviceNotFound(rec.device))?;
        let u = self.engine.pool().usage(&dev)?;
        Ok(Usage { size: u.bytes.get(), inodes: u.inodes })
    }

    /// Every snapshot's key, kind and the device holding its content, in one
    /// consistent read (no lock): what the admin API and the gauges report by
    /// consumer (committed snapshots are image layers, active ones and views
    /// container rootfs).
    pub fn devices(&self) -> Result<Vec<(String, Kind, DeviceId)>> {
        let txn = self.engine.pool().store().db().begin_read()?;
        let mut out = Vec::new();
        for row in txn.open_table(SNAPSHOTS)?.iter()? {
            let (k, v) = row?;
            let rec = meta::decode(k.value(), v.value())?;
            out.push((k.value().to_owned(), rec.kind, rec.device));
        }
        Ok(out)
    }

    /// Reclaims space now: finishes every pending deletion of every consumer
    /// of the pool, synchronously, failures included (see
    /// [`Engine::finish_deletions`]).
    pub fn cleanup(&self) -> Result<ReconcileReport> {
        Ok(self.engine.finish_deletions()?)
    }

    /// Called on exit by a daemon that serves snapshots alone; see [`Engine::shutdown`].
    pub fn shutdown(&self, release: bool) -> Result<()> {
        Ok(self.engine.shutdown(release)?)
    }

    fn record(&self, key: &str) -> Result<Record> {
        let txn = self.engine.pool().store().db().begin_read()?;
        meta::get(&txn.open_table(SNAPSHOTS)?, key)?.ok_or_else(|| Error::NotFound(key.to_owned()))
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.engine.shared()
    }
}

/// The snapshot records, as a consumer of the pool.
#[derive(Debug)]
pub struct SnapshotRecords;

impl Consumer for SnapshotRecords {
    fn name(&self) -> &'static str {
        "snapshots"
    }

    /// Drops snapshot records whose device never became ready.
    fn settle(&self, txn: &WriteTransaction) -> thinbox_blockstore::Result<HashSet<DeviceId>> {
        let mut referenced = HashSet::new();
        let devs = Devices::open(txn)?;
        let mut snaps = txn.open_table(SNAPSHOTS)?;
        let mut children = txn.open_multimap_table(CHILDREN)?;
        let mut dropped = Vec::new();
        for row in snaps.iter()? {
            let (k, v) = row?;
            let rec: Record =
                serde_json::from_slice(v.value()).map_err(|source| thinbox_blockstore::Error::Corrupt { key: k.value().to_owned(), source })?;
            match devs.get(rec.device)? {
                Some(d) if d.state == DeviceState::Ready => {
                    referenced.insert(rec.device);
                }
                _ => dropped.push((k.value().to_owned(), rec.parent)),
            }
        }
        for (key, parent) in dropped {
            tracing::info!(key, "dropping snapshot whose device was never completed");
            snaps.remove(key.as_str())?;
            children.remove(parent.as_str(), key.as_str())?;
        }
        Ok(referenced)
    }
}

/// Moves the record of snapshot `from` to `to` as `rec`, with its parent's
/// link to it, and sets its device's `access`.
fn rename(txn: &WriteTransaction, from: &str, to: &str, rec: &Record, access: Option<Access>) -> Result<()> {
    let mut snaps = txn.open_table(SNAPSHOTS)?;
    snaps.remove(from)?;
    snaps.insert(to, meta::encode(to, rec)?.as_slice())?;
    if !rec.parent.is_empty() {
        let mut children = txn.open_multimap_table(CHILDREN)?;
        children.remove(rec.parent.as_str(), from)?;
        children.insert(rec.parent.as_str(), to)?;
    }
    let mut devs = Devices::open(txn)?;
    let mut d = devs.require(rec.device)?;
    d.access = access;
    devs.put(&d)?;
    Ok(())
}

fn remove_record(txn: &WriteTransaction, key: &str, parent: &str) -> Result<()> {
    txn.open_table(SNAPSHOTS)?.remove(key)?;
    if !parent.is_empty() {
        txn.open_multimap_table(CHILDREN)?.remove(parent, key)?;
    }
    Ok(())
}

fn mount(node: &Path, fs: thinbox_blockstore::FsType, kind: Kind) -> Mount {
    // noatime: with relatime the first read of each file of a fresh clone
    // writes its inode (its times are the unpack's), which unshares blocks of
    // the layer and leaves the unmount a journal to commit.
    let mut options = vec![if kind == Kind::View { "ro" } else { "rw" }.to_owned(), "noatime".to_owned()];
    if fs == thinbox_blockstore::FsType::Xfs {
        // Clones share their origin's UUID.
        options.push("nouuid".to_owned());
    }
    Mount { r#type: fs.as_str().to_owned(), source: PathBuf::from(node).display().to_string(), target: String::new(), options }
}

fn info(name: &str, rec: &Record) -> Info {
    let kind = match rec.kind {
        Kind::View => ProtoKind::View,
        Kind::Active => ProtoKind::Active,
        Kind::Committed => ProtoKind::Committed,
    };
    Info {
        name: name.to_owned(),
        parent: rec.parent.clone(),
        kind: kind as i32,
        created_at: Some(meta::timestamp(rec.created)),
        updated_at: Some(meta::timestamp(rec.updated)),
        labels: rec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<HashMap<_, _>>(),
    }
}

struct Matchable<'a> {
    name: &'a str,
    rec: &'a Record,
}

impl Fields for Matchable<'_> {
    fn field(&self, path: &[String]) -> Option<&str> {
        match path {
            [f] if f == "name" => Some(self.name),
            [f] if f == "parent" => Some(&self.rec.parent),
            [f] if f == "kind" => Some(self.rec.kind.as_str()),
            [f, rest @ ..] if f == "labels" && !rest.is_empty() => self.rec.labels.get(&rest.join(".")).map(String::as_str),
            _ => None,
        }
    }
}

/// Keys are opaque to us but must be usable: non-empty, bounded, no NUL.
pub fn validate_key(key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        "empty"
    } else if key.len() > MAX_KEY_BYTES {
        "longer than 4096 bytes"
    } else if key.contains('\0') {
        "contains NUL"
    } else {
        return Ok(());
    };
    Err(Error::InvalidKey { key: key.chars().take(64).collect(), reason })
}

/// containerd's rule: a label's key and value together fit in 4 KiB.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    match labels.iter().find(|(k, v)| k.len() + v.len() > MAX_LABEL_BYTES) {
        Some((k, _)) => Err(Error::LabelTooLarge { key: k.chars().take(64).collect(), max: MAX_LABEL_BYTES }),
        None => Ok(()),
    }
}

fn size_label(labels: &BTreeMap<String, String>) -> Result<Option<Bytes>> {
    let Some(v) = labels.get(MAX_SIZE_LABEL) else { return Ok(None) };
    let bad = |reason: String| Error::BadLabel { label: MAX_SIZE_LABEL, value: v.clone(), reason };
    let n: u64 = v.trim().parse().map_err(|e| bad(format!("not a byte count: {e}")))?;
    if n < MIN_SNAPSHOT_SIZE.get() {
        return Err(bad(format!("below the minimum {MIN_SNAPSHOT_SIZE}")));
    }
    Ok(Some(Bytes(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn keys() {
        assert!(validate_key("default/3/sha256:abc").is_ok());
        assert!(validate_key("/tmp/work/preparing").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key("a\0b").is_err());
        assert!(validate_key(&"k".repeat(4097)).is_err());
    }

    #[test]
    fn label_limits() {
        assert!(validate_labels(&labels(&[("a", &"v".repeat(4095))])).is_ok());
        let err = validate_labels(&labels(&[("a", &"v".repeat(4096))])).expect_err("too large");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn size_labels() {
        assert_eq!(size_label(&labels(&[])).expect("none"), None);
        assert_eq!(size_label(&labels(&[(MAX_SIZE_LABEL, "1073741824")])).expect("1GiB"), Some(Bytes(1 << 30)));
        for bad in ["1GiB", "-1", "1000"] {
            let e = size_label(&labels(&[(MAX_SIZE_LABEL, bad)])).expect_err(bad);
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn filter_fields() {
        let rec = Record {
            kind: Kind::Active,
            parent: "p".into(),
            labels: labels(&[("containerd.io/gc.root", "x"), ("l", "2")]),
            created: 0,
            updated: 0,
            device: thinbox_blockstore::DeviceId(1),
        };
        let m = Matchable { name: "a", rec: &rec };
        let f = |s: &str| Filter::parse(&[s]).expect("valid").matches(&m);
        assert!(f("kind==active"));
        assert!(!f("kind==committed"));
        assert!(f("parent==p"));
        assert!(f(r#"labels."containerd.io/gc.root"==x"#));
        assert!(f("labels.l==2,name==a"));
        assert!(!f("labels.l==2,name==b"));
    }
}
