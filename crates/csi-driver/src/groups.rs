//! VolumeGroupSnapshots: snapshots of several volumes cut at one instant of
//! them all, made, read and deleted as one.
//!
//! On dm-thin every origin in use is suspended, then each thin snapshot made,
//! then all resumed: no write reaches any of them in between. On reflink the
//! clones are made one after another while every host-mounted member is
//! frozen; a member no freeze reaches (a Kata guest's, a raw block
//! publication) keeps writing, so at most one of those is allowed: the others
//! stand still around its clone. A member a Kata guest holds is copied
//! crash-consistent, as a power cut would leave it.

use std::path::PathBuf;

use thinbox_blockstore::redb::{ReadableDatabase, WriteTransaction};
use thinbox_blockstore::{CreateSpec, Creation, DeviceRecord, Engine, Points, fault};

use crate::controller::snapshot_wanted;
use crate::driver::Driver;
use crate::error::{Error, Result, invalid};
use crate::state::{self, GROUP_NAMES, GROUPS, Group, Mode, SNAPSHOT_NAMES, SNAPSHOTS, Snapshot, State, Volume};

/// Crash-test points of CreateVolumeGroupSnapshot's steps.
const GROUP_POINTS: Points =
    Points { after_intent: "csi.group.after_intent", after_build: "csi.group.after_build", after_ready: "csi.group.after_ready" };

/// CreateVolumeGroupSnapshot's part in the engine's intent discipline: the
/// group's record and one snapshot record per source, with their devices,
/// all planned, built and made ready together.
struct MakeGroup<'a> {
    driver: &'a Driver,
    group: Group,
    sources: &'a [Volume],
    snaps: Vec<Snapshot>,
}

impl Creation for MakeGroup<'_> {
    type Error = Error;

    fn plan(&mut self, txn: &WriteTransaction) -> Result<Vec<CreateSpec>> {
        self.group.id = format!("tb-group-{}", state::next_number(txn, "group")?);
        let mut specs = Vec::new();
        for vol in self.sources {
            // Members have no name of the CO's: their group's names them.
            let name = format!("{}/{}", self.group.id, vol.id);
            let mut snap = Snapshot::of(vol, name, self.group.created, Some(self.group.id.clone()));
            snap.id = format!("tb-snap-{}", state::next_number(txn, "snapshot")?);
            specs.extend(self.driver.snapshot_storage().spec(&snapshot_wanted(&snap, vol)));
            self.snaps.push(snap);
        }
        Ok(specs)
    }

    fn record(&mut self, txn: &WriteTransaction, devices: &[DeviceRecord]) -> Result<()> {
        if devices.len() != self.snaps.len() {
            return Err(Error::GroupPlan { planned: devices.len(), members: self.snaps.len() });
        }
        let mut snaps = txn.open_table(SNAPSHOTS)?;
        for (snap, dev) in self.snaps.iter_mut().zip(devices) {
            snap.device = Some(dev.id);
            state::put(&mut snaps, &snap.id, snap)?;
        }
        self.group.members = self.snaps.iter().map(|s| s.id.clone()).collect();
        state::put(&mut txn.open_table(GROUPS)?, &self.group.id, &self.group)?;
        txn.open_table(GROUP_NAMES)?.insert(self.group.name.as_str(), self.group.id.as_str())?;
        Ok(())
    }

    fn build(&mut self, engine: &Engine, devices: &[DeviceRecord]) -> Result<Option<PathBuf>> {
        // Thawed when dropped, after the last clone (or a failure).
        let _frozen = self.sources.iter().map(|v| self.driver.freeze(Some(v))).collect::<Result<Vec<_>>>()?;
        engine.pool().build_group(devices)?;
        Ok(None)
    }

    fn undo(&mut self, txn: &WriteTransaction) -> Result<()> {
        tracing::warn!(group = %self.group.id, "group snapshot failed; rolling back");
        for snap in &self.snaps {
            state::remove_named(txn, SNAPSHOTS, SNAPSHOT_NAMES, &snap.id, &snap.name)?;
        }
        state::remove_named(txn, GROUPS, GROUP_NAMES, &self.group.id, &self.group.name)
    }

    fn ready(&mut self, txn: &WriteTransaction) -> Result<()> {
        let mut snaps = txn.open_table(SNAPSHOTS)?;
        for snap in &mut self.snaps {
            snap.state = State::Ready;
            state::put(&mut snaps, &snap.id, snap)?;
        }
        self.group.state = State::Ready;
        state::put(&mut txn.open_table(GROUPS)?, &self.group.id, &self.group)
    }
}

impl Driver {
    /// CreateVolumeGroupSnapshot: idempotent by name. Every source is a
    /// volume of this node with snapshots, named once.
    pub fn create_group_snapshot(&self, name: &str, sources: &[String]) -> Result<(Group, Vec<Snapshot>)> {
        self.engine.with_room(|e: &Error| e.code() == tonic::Code::ResourceExhausted, || self.create_group_once(name, sources))
    }

    fn create_group_once(&self, name: &str, sources: &[String]) -> Result<(Group, Vec<Snapshot>)> {
        if sources.is_empty() {
            return Err(invalid("source_volume_ids is required"));
        }
        let asked = sorted(sources);
        if let Some(w) = asked.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(format!("source_volume_ids names volume {} twice", w[0])));
        }
        let _s = self.serial();
        if let Some(id) = self.group_by_name(name)? {
            let (group, members) = self.require_group(&id)?;
            if sorted(&group.sources) != asked {
                return Err(Error::AlreadyExists(format!("group snapshot {name:?} exists for volumes {:?}", group.sources)));
            }
            return Ok((group, members));
        }
        let vols = sources.iter().map(|id| self.snapshot_source(id)).collect::<Result<Vec<_>>>()?;
        self.check_one_instant(&vols)?;
        let group = Group {
            id: String::new(),
            name: name.to_owned(),
            sources: sources.to_vec(),
            members: Vec::new(),
            state: State::Creating,
            created: state::now(),
        };
        let mut make = MakeGroup { driver: self, group, sources: &vols, snaps: Vec::new() };
        self.engine.create(&mut make, GROUP_POINTS)?;
        tracing::info!(group = %make.group.id, name, sources = ?sources, members = ?make.group.members, "group snapshot created");
        Ok((make.group, make.snaps))
    }

    /// Where the pool's snapshot cannot stop writers (reflink), at most one
    /// member may have a writer no freeze reaches: the rest stand still
    /// around its clone. Two would be copied at two instants.
    fn check_one_instant(&self, vols: &[Volume]) -> Result<()> {
        if self.pool().snapshot_suspends_origin() {
            return Ok(());
        }
        let mut unfrozen = Vec::new();
        for vol in vols {
            if self.publications_of(&vol.id)?.iter().any(|p| p.mode != Mode::HostMount && !p.readonly) {
                unfrozen.push(vol.id.as_str());
            }
        }
        if unfrozen.len() > 1 {
            return Err(Error::FailedPrecondition(format!(
                "volumes {} are written where this host cannot freeze them (a Kata guest, or raw block), and this pool's \
                 copies are made one after another: they cannot be cut at one instant; group at most one of them",
                unfrozen.join(", ")
            )));
        }
        Ok(())
    }

    fn group_by_name(&self, name: &str) -> Result<Option<String>> {
        let txn = self.pool().store().db().begin_read()?;
        Ok(txn.open_table(GROUP_NAMES)?.get(name)?.map(|v| v.value().to_owned()))
    }

    /// A group snapshot and its member snapshots, in order, if it exists
    /// (in any state).
    pub(crate) fn group(&self, id: &str) -> Result<Option<(Group, Vec<Snapshot>)>> {
        let txn = self.pool().store().db().begin_read()?;
        let Some(group) = state::get::<Group>(&txn.open_table(GROUPS)?, id)? else { return Ok(None) };
        let snaps = txn.open_table(SNAPSHOTS)?;
        let members = group.members.iter().filter_map(|m| state::get::<Snapshot>(&snaps, m).transpose()).collect::<Result<Vec<_>>>()?;
        Ok(Some((group, members)))
    }

    /// Every group snapshot, in any state.
    pub(crate) fn groups(&self) -> Result<Vec<Group>> {
        let txn = self.pool().store().db().begin_read()?;
        state::all(&txn.open_table(GROUPS)?)
    }

    fn require_group(&self, id: &str) -> Result<(Group, Vec<Snapshot>)> {
        match self.group(id)? {
            Some((g, members)) if g.state == State::Ready => Ok((g, members)),
            _ => Err(Error::NotFound(format!("group snapshot {id:?} does not exist"))),
        }
    }

    /// GetVolumeGroupSnapshot: `snapshot_ids`, when given, must be exactly
    /// its members.
    pub fn get_group_snapshot(&self, id: &str, snapshot_ids: &[String]) -> Result<(Group, Vec<Snapshot>)> {
        let (group, members) = self.require_group(id)?;
        same_members(&group, snapshot_ids)?;
        Ok((group, members))
    }

    /// DeleteVolumeGroupSnapshot: idempotent; the group and every member go
    /// together. Volumes restored from a member keep their content.
    pub fn delete_group_snapshot(&self, id: &str, snapshot_ids: &[String]) -> Result<()> {
        let _s = self.serial();
        let Some((group, members)) = self.group(id)? else { return Ok(()) };
        same_members(&group, snapshot_ids)?;
        self.forget_group(&group, &members)
    }

    /// Removes a group and its members the way [`Driver::forget`] removes one
    /// record: all marked `Deleting` with their devices in one transaction
    /// (reconciliation finishes from there), the devices handed to the
    /// deleter, then the records.
    pub(crate) fn forget_group(&self, group: &Group, members: &[Snapshot]) -> Result<()> {
        let txn = self.pool().store().write()?;
        {
            let mut snaps = txn.open_table(SNAPSHOTS)?;
            for snap in members {
                state::put(&mut snaps, &snap.id, &Snapshot { state: State::Deleting, ..snap.clone() })?;
                if let Some(dev) = snap.device {
                    self.engine.plan_forget(&txn, dev)?;
                }
            }
            state::put(&mut txn.open_table(GROUPS)?, &group.id, &Group { state: State::Deleting, ..group.clone() })?;
        }
        txn.commit()?;
        fault::point("csi.group.delete.after_mark");
        for dev in members.iter().filter_map(|s| s.device) {
            self.engine.forget(dev);
        }
        let txn = self.pool().store().write()?;
        for snap in members {
            state::remove_named(&txn, SNAPSHOTS, SNAPSHOT_NAMES, &snap.id, &snap.name)?;
        }
        state::remove_named(&txn, GROUPS, GROUP_NAMES, &group.id, &group.name)?;
        txn.commit()?;
        tracing::info!(group = %group.id, members = ?group.members, "group snapshot deleted");
        Ok(())
    }
}

/// `asked` (a request's snapshot ids) is empty or the group's members.
fn same_members(group: &Group, asked: &[String]) -> Result<()> {
    if asked.is_empty() {
        return Ok(());
    }
    let (asked, members) = (sorted(asked), sorted(&group.members));
    if asked != members {
        return Err(invalid(format!("snapshot_ids {asked:?} are not group snapshot {}'s members {members:?}", group.id)));
    }
    Ok(())
}

/// Ids in order, to compare lists as sets (and find one named twice).
fn sorted(ids: &[String]) -> Vec<&String> {
    let mut v: Vec<&String> = ids.iter().collect();
    v.sort();
    v
}
