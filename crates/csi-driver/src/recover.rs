//! Reconciliation at start-up, on the volumes' side.

use std::collections::HashSet;
use std::path::Path;

use thinbox_blockstore::embedded;
use thinbox_blockstore::redb::ReadableDatabase;

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::node::remove_target;
use crate::state::{self, Kind, Mode, PUBLICATIONS, Publication, SNAPSHOTS, Snapshot, State, VOLUMES, Volume};

impl Driver {
    /// Rolls back half-made volumes and snapshots, finishes half-deleted
    /// ones, drops publications whose target is gone, detaches what nothing
    /// publishes, and removes inline volumes whose publication is gone and
    /// directories no volume names. Devices no record names are the engine's
    /// reconciliation's, which runs next.
    pub(crate) fn recover(&self, root: &Path) -> Result<()> {
        refuse_images_outside_the_pool(root)?;
        let txn = self.pool().store().db().begin_read()?;
        let all: Vec<Volume> = state::all(&txn.open_table(VOLUMES)?)?;
        let pubs: Vec<Publication> = state::all(&txn.open_table(PUBLICATIONS)?)?;
        let snaps: Vec<Snapshot> = state::all(&txn.open_table(SNAPSHOTS)?)?;
        drop(txn);
        if let Some(v) = all.iter().find(|v| v.kind != Kind::Dir && v.device.is_none()) {
            return Err(outside_the_pool(&format!("volume {} ({}) is an image outside the pool", v.id, v.name)));
        }
        for snap in snaps.iter().filter(|s| s.state != State::Ready) {
            tracing::info!(snapshot = %snap.id, state = ?snap.state, "finishing interrupted snapshot change");
            self.forget_snapshot(snap)?;
        }
        // A group's members change state with it, in one transaction: those
        // of a half-made or half-deleted group went just above.
        for group in self.groups()?.into_iter().filter(|g| g.state != State::Ready) {
            tracing::info!(group = %group.id, state = ?group.state, "finishing interrupted group snapshot change");
            let members = self.group(&group.id)?.map(|(_, m)| m).unwrap_or_default();
            self.forget_group(&group, &members)?;
        }
        let mut known = HashSet::new();
        for vol in all {
            if vol.state != State::Ready {
                tracing::info!(volume = %vol.id, state = ?vol.state, "finishing interrupted volume change");
                self.forget_volume(&vol)?;
                continue;
            }
            known.insert(vol.id);
        }
        let mut published = HashSet::new();
        for p in pubs {
            let live = match p.mode {
                Mode::HostMount | Mode::HostBlock => embedded::is_mountpoint(&p.target)?,
                Mode::Kata => self.direct.get(&p.target)?.is_some(),
            };
            if live {
                published.insert(p.volume.clone());
                continue;
            }
            tracing::info!(target = %p.target.display(), "dropping publication whose target is gone");
            let txn = self.pool().store().write()?;
            txn.open_table(PUBLICATIONS)?.remove(p.target.to_string_lossy().as_ref())?;
            txn.commit()?;
            // A publish cut short may have made the target directory or file;
            // one that cannot be removed is the kubelet's, and must not keep
            // the daemon (both doors) down.
            let removed = embedded::is_mountpoint(&p.target).map_err(Error::from).and_then(|m| if m { Ok(()) } else { remove_target(&p.target) });
            if let Err(e) = removed {
                tracing::warn!(target = %p.target.display(), error = %crate::error::chain(&e), "leaving the target of a dropped publication");
            }
        }
        // What nothing publishes is detached; an inline volume whose
        // publication is gone is gone too.
        for vol in self.volumes()? {
            if published.contains(&vol.id) {
                continue;
            }
            if vol.ephemeral {
                tracing::info!(volume = %vol.id, "removing inline volume without a publication");
                known.remove(&vol.id);
                self.forget_volume(&vol)?;
                continue;
            }
            self.storage(vol.kind).detach(&vol.held())?;
        }
        self.storage(Kind::Dir).sweep(&known)?;
        tracing::info!("volumes recovered");
        Ok(())
    }
}

fn outside_the_pool(what: &str) -> Error {
    Error::FailedPrecondition(format!(
        "{what}: it was made by a thinboxd from before file volumes moved into the pool, which this one cannot serve; \
         copy its data out with that thinboxd and delete it there, then start this one"
    ))
}

/// A root where a thinboxd from before file volumes moved into the pool kept
/// their images (`<root>/files`, `<root>/snapshots`) is refused rather than
/// adopted half-way; empty directories of it are removed.
fn refuse_images_outside_the_pool(root: &Path) -> Result<()> {
    for dir in ["files", "snapshots"].map(|d| root.join(d)) {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("list", &dir)(e)),
        };
        if let Some(entry) = entries.into_iter().next() {
            let path = entry.map_err(Error::io("list", &dir))?.path();
            return Err(outside_the_pool(&format!("{} holds {}", dir.display(), path.display())));
        }
        std::fs::remove_dir(&dir).map_err(Error::io("remove", &dir))?;
    }
    Ok(())
}
