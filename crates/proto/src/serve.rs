//! Serving gRPC on a unix socket, as both Thinbox daemons do: the socket is
//! created mode 0660 (a stale one from a crash is replaced, a live one is
//! refused), and SIGTERM/SIGINT stop the server gracefully.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::Router;

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

/// Binds `address` and serves `router` until SIGTERM or SIGINT. Open
/// connections then get `grace` to finish (clients such as containerd never
/// close theirs, so the wait is bounded); the socket is removed on return.
pub async fn serve_unix(router: Router, address: &Path, grace: Duration) -> Result<(), ServeError> {
    // Handlers first: once the socket exists, a client may already ask us to stop.
    let mut term = signal(SignalKind::terminate()).map_err(|source| io("install SIGTERM handler", address, source))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| io("install SIGINT handler", address, source))?;
    let listener = bind(address)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
        let _ = stop_rx.await;
    }));
    let result = tokio::select! {
        r = &mut server => r,
        _ = term.recv() => { tracing::info!("SIGTERM: stopping"); stop(stop_tx, server, grace).await }
        _ = int.recv() => { tracing::info!("SIGINT: stopping"); stop(stop_tx, server, grace).await }
    };
    let _ = std::fs::remove_file(address);
    match result {
        Ok(r) => Ok(r?),
        // The server task was aborted after the grace period.
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(io("serve", address, std::io::Error::other(e))),
    }
}

async fn stop(
    stop_tx: tokio::sync::oneshot::Sender<()>,
    mut server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
) -> Result<Result<(), tonic::transport::Error>, tokio::task::JoinError> {
    let _ = stop_tx.send(());
    match tokio::time::timeout(grace, &mut server).await {
        Ok(r) => r,
        Err(_) => {
            tracing::info!(grace_s = grace.as_secs(), "clients still connected; closing");
            server.abort();
            server.await
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
