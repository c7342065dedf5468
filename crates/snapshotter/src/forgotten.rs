//! The daemon's sweep of the snapshots containerd forgot
//! (`[snapshot.containerd_gc]`): `thinboxctl gc --containerd`, on a timer.
//! Which snapshots, and why only those: [`thinbox_containerd_gc`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use thinbox_containerd_gc::{Containerd, ContainerdError, Plan, PoolSnapshot, cutoff, plan, served_at};

use crate::Snapshots;

/// What one [`sweep`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// containerd's snapshotters served by this daemon (none: the sweep did nothing).
    pub snapshotters: Vec<String>,
    /// How many it removed.
    pub removed: usize,
    /// Unknown to containerd but kept.
    pub kept: usize,
}

/// The daemon's pass: asks the containerd at `containerd` for its view and
/// removes from `snapshots` what [`plan`] says. Does nothing (and says so in
/// [`Swept::snapshotters`]) when no proxy snapshotter of that containerd is
/// served at `ours`, the daemon's snapshot socket.
pub async fn sweep(snapshots: &Arc<Snapshots>, containerd: &Path, ours: &Path, min_age: Duration, timeout: Duration) -> Result<Swept, SweepError> {
    let cutoff = cutoff(min_age);
    let ctd = Containerd::connect(containerd, timeout).await?;
    let ours = std::fs::metadata(ours).map_err(|source| SweepError::Socket { path: ours.to_owned(), source })?;
    let snapshotters = served_at(&ctd.snapshotters().await?, &ours);
    if snapshotters.is_empty() {
        return Ok(Swept::default());
    }
    let known = ctd.known(&snapshotters).await?;
    let s = snapshots.clone();
    let plan = tokio::task::spawn_blocking(move || -> Result<Plan, crate::Error> {
        let now = SystemTime::now();
        let pool = s.list(&[])?.into_iter().map(|i| PoolSnapshot::from_info(i, now)).collect();
        let plan = plan(&known, pool, cutoff);
        for snap in &plan.remove {
            match s.remove(&snap.key) {
                Ok(()) => tracing::info!(key = %snap.key, kind = %snap.kind, "removed a snapshot containerd no longer lists"),
                // Gone meanwhile (containerd's collector got to it): as good.
                Err(crate::Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(plan)
    })
    .await
    .map_err(crate::Error::from)??;
    Ok(Swept { snapshotters, removed: plan.remove.len(), kept: plan.kept.len() })
}

/// A [`sweep`] that failed.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// containerd's view could not be read; nothing was removed.
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    /// The daemon's own socket is not there.
    #[error("cannot stat the snapshot socket {}", path.display())]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Listing or removing in the pool failed (what went before it stays removed).
    #[error(transparent)]
    Snapshots(#[from] crate::Error),
}
