//! `gc --containerd`: removes the snapshots containerd has forgotten, through
//! the daemon's socket. Which ones, and why only those:
//! [`thinbox_containerd_gc`], which the daemon's own sweep uses too.

use std::path::Path;
use std::time::{Duration, SystemTime};

use thinbox_containerd_gc::{Containerd, ContainerdError, PoolSnapshot, cutoff, plan, served_at};
use thinbox_proto::snapshots::snapshots_client::SnapshotsClient;
use thinbox_proto::snapshots::{ListSnapshotsRequest, RemoveSnapshotRequest};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::model::{ContainerdGc, GcSnapshot, KeptSnapshot};
use crate::{Cli, Error, GcArgs};

/// `gc --containerd`: reads containerd's view (refusing on any failure), lists
/// our pool, and removes what [`plan`] says unless `--dry-run`.
pub async fn run(cli: &Cli, args: &GcArgs, containerd: &Path) -> Result<ContainerdGc, Error> {
    let timeout = Duration::from_secs(cli.timeout);
    let cutoff = cutoff(Duration::from_secs(args.min_age));
    let view = async {
        let ctd = Containerd::connect(containerd, timeout).await?;
        let plugins = ctd.snapshotters().await?;
        Ok::<_, ContainerdError>((ctd, plugins))
    };
    let (ctd, plugins) = view.await.map_err(|e| containerd_error(e, cli.timeout))?;
    let snapshotters = snapshotters_at(&plugins, containerd, &cli.address, &args.snapshotter)?;
    let known = ctd.known(&snapshotters).await.map_err(|e| containerd_error(e, cli.timeout))?;

    let mut ours = crate::connect_snapshots(cli).await?;
    let pool = list_pool(cli, &mut ours).await?;
    let total = pool.len();
    let plan = plan(&known, pool, cutoff);

    let mut removed = Vec::with_capacity(plan.remove.len());
    for s in &plan.remove {
        if !args.dry_run {
            match ours.remove(RemoveSnapshotRequest { snapshotter: String::new(), key: s.key.clone() }).await {
                // Gone meanwhile (containerd's collector got to it): as good.
                Ok(_) => {}
                Err(st) if st.code() == Code::NotFound => {}
                Err(st) => return Err(Error::Remove { key: s.key.clone(), done: removed.len(), status: Box::new(st) }),
            }
        }
        removed.push(GcSnapshot { key: s.key.clone(), kind: s.kind.clone(), parent: (!s.parent.is_empty()).then(|| s.parent.clone()) });
    }
    Ok(ContainerdGc {
        dry_run: args.dry_run,
        min_age: args.min_age,
        snapshotters,
        namespaces: known.keys().cloned().collect(),
        snapshots: total,
        known: plan.known,
        other: plan.other,
        removed,
        kept: plan.kept.into_iter().map(|(s, reason)| KeptSnapshot { key: s.key, kind: s.kind, reason }).collect(),
    })
}

async fn list_pool(cli: &Cli, ours: &mut SnapshotsClient<Channel>) -> Result<Vec<PoolSnapshot>, Error> {
    let rpc = |st: Status| crate::snapshots_status(cli, st);
    let mut stream = ours.list(ListSnapshotsRequest { snapshotter: String::new(), filters: vec![] }).await.map_err(rpc)?.into_inner();
    let now = SystemTime::now();
    let mut pool = Vec::new();
    while let Some(batch) = stream.message().await.map_err(rpc)? {
        pool.extend(batch.info.into_iter().map(|i| PoolSnapshot::from_info(i, now)));
    }
    Ok(pool)
}

/// thinboxctl's error for a failed look at containerd's view: a hint to
/// connection failures, `--timeout` to timeouts.
fn containerd_error(e: ContainerdError, timeout: u64) -> Error {
    match e {
        ContainerdError::Connect { socket, source } => {
            Error::ContainerdConnect { reason: crate::connect_reason(&source, " (is containerd running? --containerd must name its socket)"), socket }
        }
        ContainerdError::Request { socket, what, status } => {
            let reason = match status.code() {
                Code::Cancelled if status.message() == tonic::TimeoutExpired(()).to_string() => {
                    format!("no answer within {timeout} s (--timeout)")
                }
                Code::DeadlineExceeded => format!("no answer within {timeout} s (--timeout)"),
                code => format!("{} ({code:?})", status.message()),
            };
            Error::Containerd { socket, what, reason }
        }
    }
}

/// The names of containerd's proxy snapshotters served at `address`;
/// `name` must be among them.
fn snapshotters_at(plugins: &[thinbox_containerd_gc::Snapshotter], containerd: &Path, address: &Path, name: &str) -> Result<Vec<String>, Error> {
    let ours = std::fs::metadata(address)
        .map_err(|e| Error::Connect { socket: address.to_owned(), reason: crate::connect_reason(&e, crate::DAEMON_HINT) })?;
    let at_ours = served_at(plugins, &ours);
    if at_ours.iter().any(|n| n == name) {
        return Ok(at_ours);
    }
    let found = match plugins.iter().find(|p| p.id == name) {
        None => "is not loaded".to_owned(),
        Some(p) => match &p.address {
            None => "is not a proxy snapshotter".to_owned(),
            Some(a) => format!("is served at {a}"),
        },
    };
    Err(Error::NotOurSnapshotter { containerd: containerd.to_owned(), name: name.to_owned(), found, address: address.to_owned() })
}
