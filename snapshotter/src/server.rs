//! Serving on a unix socket: mode 0660, graceful stop on SIGTERM/SIGINT. The
//! socket carries containerd's snapshot service and Thinbox's admin service
//! (`thinboxctl`), so one path and one permission govern both.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use thinbox_proto::admin::admin_server::AdminServer;
use thinbox_proto::snapshots::snapshots_server::SnapshotsServer;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

use crate::admin::Admin;
use crate::service::Service;
use crate::snapshots::Snapshots;

/// Errors of the server loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is in use by another process")]
    InUse { path: String },
    #[error("serve gRPC")]
    Transport(#[from] tonic::transport::Error),
}

/// How long open connections get to finish after SIGTERM. containerd keeps its
/// connection open forever, so the wait must be bounded; operations in flight
/// are waited for separately (see [`Snapshots::shutdown`]).
const GRACE: Duration = Duration::from_secs(2);

/// Binds `address`, serves until SIGTERM or SIGINT, then returns.
pub async fn serve(snapshots: Arc<Snapshots>, address: &Path) -> Result<(), ServeError> {
    // Handlers first: once the socket exists, a client may already ask us to stop.
    let mut term = signal(SignalKind::terminate()).map_err(|source| io("install SIGTERM handler", address, source))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| io("install SIGINT handler", address, source))?;
    let listener = bind(address)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tracing::info!(address = %address.display(), "serving containerd.services.snapshots.v1 and thinbox.admin.v1");
    let maintenance = tokio::spawn(maintain(snapshots.clone()));
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SnapshotsServer::new(Service::new(snapshots.clone())))
            .add_service(AdminServer::new(Admin::new(snapshots)))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = stop_rx.await;
            }),
    );
    let result = tokio::select! {
        r = &mut server => r,
        _ = term.recv() => { tracing::info!("SIGTERM: stopping"); stop(stop_tx, server).await }
        _ = int.recv() => { tracing::info!("SIGINT: stopping"); stop(stop_tx, server).await }
    };
    maintenance.abort();
    let _ = std::fs::remove_file(address);
    match result {
        Ok(r) => Ok(r?),
        // The server task panicked or was aborted after the grace period.
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(io("serve", address, std::io::Error::other(e))),
    }
}

async fn stop(
    stop_tx: tokio::sync::oneshot::Sender<()>,
    mut server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) -> Result<Result<(), tonic::transport::Error>, tokio::task::JoinError> {
    let _ = stop_tx.send(());
    match tokio::time::timeout(GRACE, &mut server).await {
        Ok(r) => r,
        Err(_) => {
            tracing::info!(grace_s = GRACE.as_secs(), "clients still connected; closing");
            server.abort();
            server.await
        }
    }
}

/// How often, at least, the pool's free space is checked (running containers
/// consume it); a device-mapper event wakes the check sooner.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// Grows the pool ahead of need where the backend can.
async fn maintain(snapshots: Arc<Snapshots>) {
    loop {
        let s = snapshots.clone();
        // Blocks until a device-mapper event (the thin pool crossing its
        // low-water mark) or MAINTAIN_EVERY; aborting the task at shutdown
        // lets the current round finish.
        match tokio::task::spawn_blocking(move || s.pool().maintain_and_wait(MAINTAIN_EVERY)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::error::chain(&e), "pool maintenance");
                tokio::time::sleep(MAINTAIN_EVERY).await;
            }
            Err(e) => tracing::warn!(error = %e, "pool maintenance task"),
        }
    }
}

fn bind(address: &Path) -> Result<UnixListener, ServeError> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).map_err(|source| io("create", dir, source))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(address)
        && meta.file_type().is_socket()
    {
        // A live peer means another daemon; a dead one is a leftover of a crash.
        if std::os::unix::net::UnixStream::connect(address).is_ok() {
            return Err(ServeError::InUse { path: address.display().to_string() });
        }
        std::fs::remove_file(address).map_err(|source| io("remove stale socket", address, source))?;
    }
    let listener = UnixListener::bind(address).map_err(|source| io("bind", address, source))?;
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o660)).map_err(|source| io("chmod", address, source))?;
    Ok(listener)
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> ServeError {
    ServeError::Io { op, path: path.display().to_string(), source }
}
