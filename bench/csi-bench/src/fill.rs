//! Fills a daemon as a busy node would: image layers and container rootfs
//! over snapshots.v1, and block volumes over CSI. Nothing is removed: the
//! daemon and its root are thrown away after the measurement.

use std::path::Path;
use std::time::Duration;

use thinbox_proto::csi_v1::controller_client::ControllerClient;
use thinbox_proto::snapshots::snapshots_client::SnapshotsClient;
use thinbox_proto::snapshots::{CommitSnapshotRequest, PrepareSnapshotRequest};

use crate::Error;
use crate::calls::block_volume_request;

/// What the snapshot fill makes: `images` chains of `layers` committed
/// layers each, and active snapshots (container rootfs) on the images' tops,
/// round robin, up to `total` snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPlan {
    /// Snapshots alive at the end, committed and active.
    pub total: usize,
    /// Layer chains.
    pub images: usize,
    /// Committed layers per chain.
    pub layers: usize,
}

impl SnapshotPlan {
    /// Active snapshots the plan prepares on top of the images.
    pub fn containers(&self) -> Result<usize, Error> {
        let committed = self.images * self.layers;
        if self.images == 0 || self.layers == 0 || committed >= self.total {
            return Err(Error::Config(format!(
                "{} images of {} layers leave no room for containers in {} snapshots",
                self.images, self.layers, self.total
            )));
        }
        Ok(self.total - committed)
    }
}

fn rpc(what: String) -> impl FnOnce(tonic::Status) -> Error {
    move |status| Error::Rpc { what, status: Box::new(status) }
}

async fn connect(socket: &Path, timeout: Duration) -> Result<tonic::transport::Channel, Error> {
    thinbox_proto::unix_channel(socket, timeout).await.map_err(|source| Error::Connect { socket: socket.to_owned(), source: Box::new(source) })
}

/// Makes the plan's snapshots on the snapshots.v1 service at `socket`, keys
/// prefixed with `prefix`.
pub async fn snapshots(socket: &Path, plan: SnapshotPlan, prefix: &str, timeout: Duration) -> Result<(), Error> {
    let containers = plan.containers()?;
    let mut client = SnapshotsClient::new(connect(socket, timeout).await?);
    let mut tops = Vec::with_capacity(plan.images);
    for image in 0..plan.images {
        let mut parent = String::new();
        for layer in 0..plan.layers {
            let name = format!("{prefix}-i{image}-l{layer}");
            let key = format!("{name}-extract");
            let prepare = PrepareSnapshotRequest { key: key.clone(), parent: parent.clone(), ..Default::default() };
            client.prepare(prepare).await.map_err(rpc(format!("Prepare {key}")))?;
            let commit = CommitSnapshotRequest { name: name.clone(), key, ..Default::default() };
            client.commit(commit).await.map_err(rpc(format!("Commit {name}")))?;
            parent = name;
        }
        tops.push(parent);
    }
    tracing::info!(committed = plan.images * plan.layers, "image layers committed");
    for c in 0..containers {
        let key = format!("{prefix}-c{c}");
        let parent = tops[c % tops.len()].clone();
        client.prepare(PrepareSnapshotRequest { key: key.clone(), parent, ..Default::default() }).await.map_err(rpc(format!("Prepare {key}")))?;
    }
    tracing::info!(active = containers, "container snapshots prepared");
    Ok(())
}

/// Makes `count` block volumes of `bytes` each (ext4, not published) on the
/// CSI service at `socket`.
pub async fn volumes(socket: &Path, count: usize, bytes: u64, prefix: &str, timeout: Duration) -> Result<(), Error> {
    let mut client = ControllerClient::new(connect(socket, timeout).await?);
    let required = i64::try_from(bytes).map_err(|_| Error::Config(format!("volume size {bytes} is too large")))?;
    for v in 0..count {
        let name = format!("{prefix}-v{v}");
        client.create_volume(block_volume_request(&name, required)).await.map_err(rpc(format!("CreateVolume {name}")))?;
    }
    tracing::info!(volumes = count, "block volumes created");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan() {
        assert_eq!(SnapshotPlan { total: 1000, images: 10, layers: 10 }.containers().expect("fits"), 900);
        assert!(SnapshotPlan { total: 100, images: 10, layers: 10 }.containers().is_err());
        assert!(SnapshotPlan { total: 100, images: 0, layers: 10 }.containers().is_err());
    }
}
