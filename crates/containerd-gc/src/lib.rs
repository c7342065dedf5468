//! Snapshots containerd has forgotten: which ones they are, for `thinboxctl gc
//! --containerd` and for the daemon's own sweep (`[snapshot.containerd_gc]`,
//! `thinbox_snapshotter::forgotten`).
//!
//! containerd (1.6) deletes a snapshot in two steps: its garbage collector
//! drops the record from its own metadata, then asks the snapshotter to
//! remove what no record names. If the snapshotter is unreachable at that
//! moment (say, the daemon is restarting), the pass gives up and is not
//! retried until some later deletion: the snapshots stay in the pool while
//! containerd no longer lists them. This module finds them and removes them.
//!
//! # Which snapshots containerd knows
//!
//! containerd's snapshots service does not expose the keys it uses with a
//! proxy snapshotter. Its metadata layer (containerd 1.6,
//! `metadata/snapshot.go`) keeps, per namespace and snapshotter, a record for
//! each user-facing key holding the backend key, and `List` answers with the
//! user-facing key and parent only. What makes the backend keys recoverable is
//! how they are made: `Prepare`, `View` and `Commit` all name the new backend
//! snapshot `createKey(sid, ns, key)` = `<ns>/<sid>/<key>`, where `<ns>` is the
//! namespace, `<sid>` the next number of a bolt sequence and `<key>` the
//! user-facing key (the committed name for `Commit`). The one exception is a
//! `Prepare` whose backend answers `AlreadyExists` for a snapshot carrying the
//! `containerd.io/snapshot.ref` target label (remote snapshotters; containerd
//! then adopts the backend's snapshot of that target, whatever its key);
//! Thinbox does no such thing: it
//! answers `AlreadyExists` only for a key it already holds, and containerd's
//! keys carry a fresh sequence number. So every backend key containerd holds
//! for `(ns, key)` is `<ns>/<some number>/<key>`.
//!
//! So a snapshot in our pool whose key parses as `<ns>/<digits>/<name>` is
//! *known* when containerd lists `name` in namespace `ns`, and every other
//! such snapshot is unknown to containerd. The rule errs towards keeping:
//!
//! * The number is not compared: if containerd removed `name` and made it
//!   again (an image pulled again), both `<ns>/3/<name>` and `<ns>/9/<name>`
//!   count as known, and the older one stays until containerd drops `name`.
//!   (The larger number is usually the live one, but a namespace deleted and
//!   made again restarts the sequence, so that is no rule.)
//! * Keys of another form (not made by containerd: the conformance suite,
//!   someone using the socket directly) are never touched.
//! * A namespace containerd does not list is left alone (it cannot delete a
//!   namespace that holds snapshots, so those are most likely another
//!   containerd's): reported, not removed.
//! * containerd writes its record *after* the backend made the snapshot
//!   (`Prepare`, `View`) or in a transaction that commits after the backend
//!   committed (`Commit`); containerd's own collector holds a lock that
//!   excludes these windows, which we cannot take. So a snapshot created or
//!   changed less than the minimum age (`--min-age`, `min_age_s`) before the
//!   listing started is kept: it may be one containerd is about to record.
//! * A snapshot with a child that stays, stays.
//! * Every proxy snapshotter of this containerd whose socket is ours counts
//!   (thinboxctl's `--snapshotter` must be one of them; several names on one
//!   socket are unusual but would share the pool), and a failing listing of
//!   any namespace or name stops everything before anything is removed.
//!
//! Removal goes children first, so a parent is removed only after every
//! child. [`plan`] is the pure part (what to remove, in which order);
//! [`Containerd`] reads containerd's view.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use thinbox_proto::containerd::services::introspection::v1::PluginsRequest;
use thinbox_proto::containerd::services::introspection::v1::introspection_client::IntrospectionClient;
use thinbox_proto::containerd::services::namespaces::v1::ListNamespacesRequest;
use thinbox_proto::containerd::services::namespaces::v1::namespaces_client::NamespacesClient;
use thinbox_proto::snapshots::snapshots_client::SnapshotsClient;
use thinbox_proto::snapshots::{Info, Kind, ListSnapshotsRequest};
use tonic::transport::Channel;
use tonic::{Request, Status};

/// containerd's plugin type for snapshotters.
const SNAPSHOTTER_PLUGIN: &str = "io.containerd.snapshotter.v1";
/// The gRPC header that selects a containerd namespace.
const NAMESPACE_HEADER: &str = "containerd-namespace";

/// A backend key of the form containerd's metadata store gives the snapshots
/// it creates: `<namespace>/<sequence number>/<user-facing key>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKey<'a> {
    /// The containerd namespace.
    pub namespace: &'a str,
    /// The user-facing key (may contain `/`).
    pub name: &'a str,
}

impl<'a> BackendKey<'a> {
    /// Parses `key`; `None` if it is not of containerd's form.
    pub fn parse(key: &'a str) -> Option<BackendKey<'a>> {
        let (namespace, rest) = key.split_once('/')?;
        let (sid, name) = rest.split_once('/')?;
        let is_sid = !sid.is_empty() && sid.bytes().all(|b| b.is_ascii_digit());
        (!namespace.is_empty() && is_sid && !name.is_empty()).then_some(BackendKey { namespace, name })
    }
}

/// What containerd lists: per namespace (every namespace it has, even one
/// without snapshots), the user-facing keys of its snapshots.
pub type Known = BTreeMap<String, BTreeSet<String>>;

/// One snapshot of our pool, as our `List` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSnapshot {
    /// Its key.
    pub key: String,
    /// Its parent's key; "" for none.
    pub parent: String,
    /// "active", "view", "committed" or "unknown".
    pub kind: String,
    /// When it was created or last changed, whichever is later.
    pub changed: SystemTime,
}

impl PoolSnapshot {
    /// From our `List` answer; a missing time counts as "now", so it is kept.
    pub fn from_info(info: Info, now: SystemTime) -> PoolSnapshot {
        let created = info.created_at.map_or(now, |t| system_time(t.seconds, t.nanos));
        let updated = info.updated_at.map_or(now, |t| system_time(t.seconds, t.nanos));
        let changed = created.max(updated);
        let kind = Kind::try_from(info.kind).unwrap_or(Kind::Unknown).as_str_name().to_ascii_lowercase();
        PoolSnapshot { key: info.name, parent: info.parent, kind, changed }
    }
}

/// A protobuf timestamp's time (before 1970 counts as 1970).
fn system_time(seconds: i64, nanos: i32) -> SystemTime {
    UNIX_EPOCH + Duration::new(u64::try_from(seconds).unwrap_or(0), u32::try_from(nanos).unwrap_or(0).min(999_999_999))
}

/// Why a snapshot containerd does not list is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepReason {
    /// Created or changed within the minimum age: containerd may be about to record it.
    Recent,
    /// Its namespace is not one containerd has.
    UnknownNamespace,
    /// A snapshot that stays is its child.
    ParentOfKept,
}

/// The outcome of [`plan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// To remove, each after all of its children.
    pub remove: Vec<PoolSnapshot>,
    /// Unknown to containerd, kept (sorted by key).
    pub kept: Vec<(PoolSnapshot, KeepReason)>,
    /// How many containerd knows.
    pub known: usize,
    /// How many containerd did not make (key not `<ns>/<n>/<name>`).
    pub other: usize,
}

/// The latest change time a snapshot may have for [`plan`] to remove it,
/// for a listing that starts now: `min_age` ago.
pub fn cutoff(min_age: Duration) -> SystemTime {
    SystemTime::now().checked_sub(min_age).unwrap_or(UNIX_EPOCH)
}

/// Decides which of `pool` to remove, given what containerd lists (`known`)
/// and the latest change time a removable snapshot may have (`cutoff`); see
/// the module documentation for the rule.
pub fn plan(known: &Known, pool: Vec<PoolSnapshot>, cutoff: SystemTime) -> Plan {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Verdict {
        Known,
        Other,
        Keep(KeepReason),
        Remove,
    }
    let mut out = Plan::default();
    let verdicts: Vec<Verdict> = pool
        .iter()
        .map(|s| match BackendKey::parse(&s.key) {
            None => Verdict::Other,
            Some(k) => match known.get(k.namespace) {
                None => Verdict::Keep(KeepReason::UnknownNamespace),
                Some(names) if names.contains(k.name) => Verdict::Known,
                Some(_) if s.changed > cutoff => Verdict::Keep(KeepReason::Recent),
                Some(_) => Verdict::Remove,
            },
        })
        .collect();
    out.known = verdicts.iter().filter(|v| **v == Verdict::Known).count();
    out.other = verdicts.iter().filter(|v| **v == Verdict::Other).count();

    // Children first: a snapshot is decided once all its children are; it is
    // removed only if it is removable and every child was removed.
    let index: BTreeMap<&str, usize> = pool.iter().enumerate().map(|(i, s)| (s.key.as_str(), i)).collect();
    let parent_of: Vec<Option<usize>> = pool.iter().map(|s| index.get(s.parent.as_str()).copied()).collect();
    let mut pending = vec![0usize; pool.len()];
    for p in parent_of.iter().flatten() {
        pending[*p] += 1;
    }
    let mut children_gone = vec![true; pool.len()];
    let mut ready: BTreeSet<&str> = pool.iter().enumerate().filter(|(i, _)| pending[*i] == 0).map(|(_, s)| s.key.as_str()).collect();
    let mut decided = vec![false; pool.len()];
    let mut removed = Vec::new();
    while let Some(key) = ready.pop_first() {
        let i = index[key];
        decided[i] = true;
        let gone = match verdicts[i] {
            Verdict::Remove if children_gone[i] => {
                removed.push(i);
                true
            }
            Verdict::Remove => {
                out.kept.push((pool[i].clone(), KeepReason::ParentOfKept));
                false
            }
            Verdict::Keep(reason) => {
                out.kept.push((pool[i].clone(), reason));
                false
            }
            Verdict::Known | Verdict::Other => false,
        };
        if let Some(p) = parent_of[i] {
            children_gone[p] &= gone;
            pending[p] -= 1;
            if pending[p] == 0 {
                ready.insert(pool[p].key.as_str());
            }
        }
    }
    // Only a cycle of parents (which no store can hold) is never ready: keep it.
    for (i, s) in pool.iter().enumerate() {
        if !decided[i] && verdicts[i] != Verdict::Known && verdicts[i] != Verdict::Other {
            out.kept.push((s.clone(), KeepReason::ParentOfKept));
        }
    }
    out.kept.sort_by(|a, b| a.0.key.cmp(&b.0.key));
    out.remove = removed.into_iter().map(|i| pool[i].clone()).collect();
    out
}

/// containerd could not give its view; nothing was removed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// Connecting to its socket failed.
    #[error("cannot reach containerd at {}", socket.display())]
    Connect {
        /// containerd's socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A request failed.
    #[error("containerd at {}: {what}: {} ({:?})", socket.display(), status.message(), status.code())]
    Request {
        /// containerd's socket.
        socket: PathBuf,
        /// The request.
        what: String,
        /// containerd's answer.
        status: Box<Status>,
    },
}

/// One of containerd's snapshotter plugins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshotter {
    /// Its name (`--snapshotter` of `ctr`).
    pub id: String,
    /// The socket of a proxy snapshotter (without `unix://`); `None` for a built-in one.
    pub address: Option<String>,
}

/// The names of the proxy snapshotters in `plugins` served at the socket
/// whose metadata is `ours` (the same file: device and inode), sorted.
pub fn served_at(plugins: &[Snapshotter], ours: &std::fs::Metadata) -> Vec<String> {
    let mut names: Vec<String> = plugins
        .iter()
        .filter(|p| {
            let m = p.address.as_deref().and_then(|a| std::fs::metadata(a).ok());
            m.is_some_and(|m| (m.dev(), m.ino()) == (ours.dev(), ours.ino()))
        })
        .map(|p| p.id.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A connection to containerd, whose requests fail with errors that name it.
#[derive(Debug)]
pub struct Containerd {
    socket: PathBuf,
    channel: Channel,
}

impl Containerd {
    /// Connects to containerd's socket; every request is bounded by `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Containerd, ContainerdError> {
        let channel =
            thinbox_proto::unix_channel(socket, timeout).await.map_err(|source| ContainerdError::Connect { socket: socket.to_owned(), source })?;
        Ok(Containerd { socket: socket.to_owned(), channel })
    }

    fn error(&self, what: String) -> impl FnOnce(Status) -> ContainerdError + '_ {
        move |status| ContainerdError::Request { socket: self.socket.clone(), what, status: Box::new(status) }
    }

    /// containerd's snapshotter plugins.
    pub async fn snapshotters(&self) -> Result<Vec<Snapshotter>, ContainerdError> {
        let plugins = IntrospectionClient::new(self.channel.clone())
            .plugins(PluginsRequest { filters: vec![format!("type=={SNAPSHOTTER_PLUGIN}")] })
            .await
            .map_err(self.error("list its snapshotter plugins".to_owned()))?
            .into_inner()
            .plugins;
        Ok(plugins
            .into_iter()
            .filter(|p| p.r#type == SNAPSHOTTER_PLUGIN)
            .map(|p| {
                let address = p.exports.get("address").map(|a| a.strip_prefix("unix://").unwrap_or(a).to_owned());
                Snapshotter { id: p.id, address }
            })
            .collect())
    }

    /// Every namespace, and in each the keys every one of `snapshotters` lists.
    pub async fn known(&self, snapshotters: &[String]) -> Result<Known, ContainerdError> {
        let namespaces = NamespacesClient::new(self.channel.clone())
            .list(ListNamespacesRequest { filter: String::new() })
            .await
            .map_err(self.error("list namespaces".to_owned()))?
            .into_inner()
            .namespaces;
        let mut client = SnapshotsClient::new(self.channel.clone());
        let mut known = Known::new();
        for ns in namespaces {
            let keys = known.entry(ns.name.clone()).or_default();
            for sn in snapshotters {
                let what = || format!("list the snapshots of {sn:?} in namespace {:?}", ns.name);
                let mut req = Request::new(ListSnapshotsRequest { snapshotter: sn.clone(), filters: vec![] });
                let header = ns.name.parse().map_err(|_| self.error(what())(Status::invalid_argument("not a valid header value")))?;
                req.metadata_mut().insert(NAMESPACE_HEADER, header);
                let mut stream = client.list(req).await.map_err(self.error(what()))?.into_inner();
                while let Some(batch) = stream.message().await.map_err(self.error(what()))? {
                    keys.extend(batch.info.into_iter().map(|i| i.name));
                }
            }
        }
        Ok(known)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn snap(key: &str, parent: &str, kind: &str) -> PoolSnapshot {
        PoolSnapshot { key: key.into(), parent: parent.into(), kind: kind.into(), changed: at(T0 - 3600) }
    }

    fn known(entries: &[(&str, &[&str])]) -> Known {
        entries.iter().map(|(ns, keys)| (ns.to_string(), keys.iter().map(|k| k.to_string()).collect())).collect()
    }

    fn keys(v: &[PoolSnapshot]) -> Vec<&str> {
        v.iter().map(|s| s.key.as_str()).collect()
    }

    fn kept(p: &Plan) -> Vec<(&str, KeepReason)> {
        p.kept.iter().map(|(s, r)| (s.key.as_str(), *r)).collect()
    }

    #[test]
    fn backend_keys_parse_as_containerd_makes_them() {
        assert_eq!(BackendKey::parse("default/12/sha256:abc"), Some(BackendKey { namespace: "default", name: "sha256:abc" }));
        assert_eq!(BackendKey::parse("k8s.io/3/extract-1-sha256:x/y"), Some(BackendKey { namespace: "k8s.io", name: "extract-1-sha256:x/y" }));
        for other in ["base", "default/x/key", "default//key", "/3/key", "default/3/", "default/3", "csi-vol-1", "default/-3/key", "default/3a/k"] {
            assert_eq!(BackendKey::parse(other), None, "{other}");
        }
    }

    #[test]
    fn removes_what_containerd_forgot_children_first() {
        // A forgotten image chain l1 <- l2 <- l3 with a forgotten container rootfs on l3.
        let pool = vec![
            snap("ns/1/sha256:l1", "", "committed"),
            snap("ns/2/sha256:l2", "ns/1/sha256:l1", "committed"),
            snap("ns/5/ctr", "ns/3/sha256:l3", "active"),
            snap("ns/3/sha256:l3", "ns/2/sha256:l2", "committed"),
            snap("ns/9/keep", "", "active"),
        ];
        let p = plan(&known(&[("ns", &["keep"])]), pool, at(T0));
        assert_eq!(keys(&p.remove), ["ns/5/ctr", "ns/3/sha256:l3", "ns/2/sha256:l2", "ns/1/sha256:l1"]);
        assert_eq!((p.known, p.other), (1, 0));
        assert!(p.kept.is_empty());
    }

    #[test]
    fn never_removes_what_containerd_lists_in_that_namespace() {
        let pool = vec![
            snap("a/1/sha256:l1", "", "committed"),
            snap("a/2/sha256:l2", "a/1/sha256:l1", "committed"),
            snap("b/1/sha256:l1", "", "committed"),
            snap("b/4/sha256:l2", "b/1/sha256:l1", "committed"),
            // containerd made "sha256:l2" again in b: both copies count as known.
            snap("b/7/sha256:l2", "b/1/sha256:l1", "committed"),
        ];
        // Namespace a lists the top layer, b nothing; a name known elsewhere does not count.
        let p = plan(&known(&[("a", &["sha256:l1", "sha256:l2"]), ("b", &[]), ("c", &["sha256:l1"])]), pool.clone(), at(T0));
        assert_eq!(keys(&p.remove), ["b/4/sha256:l2", "b/7/sha256:l2", "b/1/sha256:l1"]);
        assert_eq!(p.known, 2);

        let p = plan(&known(&[("a", &["sha256:l1", "sha256:l2"]), ("b", &["sha256:l2", "sha256:l1"])]), pool, at(T0));
        assert!(p.remove.is_empty(), "{:?}", p.remove);
        assert_eq!(p.known, 5);
    }

    #[test]
    fn a_parent_of_a_kept_snapshot_stays() {
        let pool = vec![
            snap("ns/1/sha256:l1", "", "committed"),
            snap("ns/2/sha256:l2", "ns/1/sha256:l1", "committed"),
            // Not containerd's: someone prepared it on the socket directly.
            snap("scratch", "ns/2/sha256:l2", "active"),
            snap("ns/3/sha256:m1", "", "committed"),
            snap("ns/4/ctr", "ns/3/sha256:m1", "active"),
        ];
        let p = plan(&known(&[("ns", &["ctr"])]), pool, at(T0));
        assert!(p.remove.is_empty(), "{:?}", p.remove);
        assert_eq!(
            kept(&p),
            [
                ("ns/1/sha256:l1", KeepReason::ParentOfKept),
                ("ns/2/sha256:l2", KeepReason::ParentOfKept),
                ("ns/3/sha256:m1", KeepReason::ParentOfKept)
            ]
        );
        assert_eq!((p.known, p.other), (1, 1));
    }

    #[test]
    fn recent_changes_and_unknown_namespaces_are_kept() {
        let mut fresh = snap("ns/8/sha256:new", "ns/1/sha256:l1", "committed");
        fresh.changed = at(T0 - 10);
        let pool = vec![
            snap("ns/1/sha256:l1", "", "committed"),
            fresh,
            snap("gone/1/sha256:l1", "", "committed"),
            snap("ns/2/old", "", "active"),
            snap("conformance-key", "", "active"),
        ];
        let p = plan(&known(&[("ns", &[])]), pool.clone(), at(T0 - 60));
        assert_eq!(keys(&p.remove), ["ns/2/old"]);
        assert_eq!(
            kept(&p),
            [
                ("gone/1/sha256:l1", KeepReason::UnknownNamespace),
                ("ns/1/sha256:l1", KeepReason::ParentOfKept),
                ("ns/8/sha256:new", KeepReason::Recent)
            ]
        );
        assert_eq!((p.known, p.other), (0, 1));

        // A cutoff after the change (--min-age shorter than its age): it goes, parent after it.
        let p = plan(&known(&[("ns", &[])]), pool, at(T0));
        assert_eq!(keys(&p.remove), ["ns/2/old", "ns/8/sha256:new", "ns/1/sha256:l1"]);
        assert_eq!(kept(&p), [("gone/1/sha256:l1", KeepReason::UnknownNamespace)]);
    }

    #[test]
    fn an_empty_view_removes_every_containerd_snapshot_of_listed_namespaces_only() {
        let pool = vec![snap("ns/1/a", "", "active"), snap("other/1/a", "", "active"), snap("plain", "", "committed")];
        let p = plan(&known(&[("ns", &[])]), pool.clone(), at(T0));
        assert_eq!(keys(&p.remove), ["ns/1/a"]);
        let p = plan(&Known::new(), pool, at(T0));
        assert!(p.remove.is_empty());
        assert_eq!(p.kept.len(), 2);
    }

    #[test]
    fn a_parent_cycle_is_kept_whole() {
        let pool = vec![snap("ns/1/a", "ns/2/b", "committed"), snap("ns/2/b", "ns/1/a", "committed"), snap("ns/3/c", "", "active")];
        let p = plan(&known(&[("ns", &[])]), pool, at(T0));
        assert_eq!(keys(&p.remove), ["ns/3/c"]);
        assert_eq!(kept(&p), [("ns/1/a", KeepReason::ParentOfKept), ("ns/2/b", KeepReason::ParentOfKept)]);
    }

    #[test]
    fn times_and_kinds_come_from_the_list_answer() {
        let now = at(T0);
        let mut info = Info {
            name: "ns/1/a".into(),
            parent: "ns/0/p".into(),
            kind: Kind::Committed as i32,
            created_at: Some(Default::default()),
            updated_at: Some(Default::default()),
            labels: Default::default(),
        };
        info.created_at.iter_mut().for_each(|t| t.seconds = (T0 - 100) as i64);
        info.updated_at.iter_mut().for_each(|t| (t.seconds, t.nanos) = ((T0 - 50) as i64, 0));
        let s = PoolSnapshot::from_info(info.clone(), now);
        assert_eq!((s.kind.as_str(), s.changed, s.parent.as_str()), ("committed", at(T0 - 50), "ns/0/p"));
        let s = PoolSnapshot::from_info(Info { updated_at: None, kind: 42, ..info }, now);
        assert_eq!((s.kind.as_str(), s.changed), ("unknown", now), "no time: as if just changed");
    }
}
