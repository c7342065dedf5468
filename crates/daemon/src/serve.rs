//! Serving gRPC on a unix socket, as every Thinbox front door does: the socket
//! is bound before the daemon opens any state (so a path another daemon
//! serves fails the start before anything is touched), created mode 0660 (a
//! stale one from a crash is replaced, a live one refused), and served until
//! a shutdown future fires; open connections then get a bounded grace.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::Router;

/// Errors of binding and serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is served by another running process: stop it, or give this daemon another socket path")]
    InUse { path: String },
    #[error("serve gRPC")]
    Transport(#[from] tonic::transport::Error),
}

/// A bound unix socket, not yet served. Dropping it removes the socket file.
#[derive(Debug)]
pub struct Bound {
    listener: Option<std::os::unix::net::UnixListener>,
    path: PathBuf,
}

impl Bound {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `address` (mode 0660), creating its directory. A socket file that
/// still answers belongs to a live daemon and is refused; one that does not is
/// a crash's leftover and replaced.
pub fn bind_unix(address: &Path) -> Result<Bound, ServeError> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).map_err(|source| io("create", dir, source))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(address)
        && meta.file_type().is_socket()
    {
        if std::os::unix::net::UnixStream::connect(address).is_ok() {
            return Err(ServeError::InUse { path: address.display().to_string() });
        }
        std::fs::remove_file(address).map_err(|source| io("remove stale socket", address, source))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(address).map_err(|source| io("bind", address, source))?;
    let bound = Bound { listener: Some(listener), path: address.to_owned() };
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o660)).map_err(|source| io("chmod", address, source))?;
    Ok(bound)
}

/// Resolves on the first SIGTERM or SIGINT. Install it before serving: once a
/// socket exists, a client may already ask the daemon to stop.
pub fn shutdown_signal() -> Result<impl Future<Output = ()>, ServeError> {
    let mut term = signal(SignalKind::terminate()).map_err(|source| io("install SIGTERM handler", Path::new("-"), source))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| io("install SIGINT handler", Path::new("-"), source))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    })
}

/// Serves `router` on `bound` until `shutdown` resolves. Open connections then
/// get `grace` to finish (clients such as containerd never close theirs, so
/// the wait is bounded); the socket is removed on return.
pub async fn serve_unix(router: Router, mut bound: Bound, grace: Duration, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let path = bound.path.clone();
    let std_listener = bound.listener.take().ok_or_else(|| io("serve", &path, std::io::Error::other("socket already served")))?;
    std_listener.set_nonblocking(true).map_err(|source| io("set non-blocking", &path, source))?;
    let listener = tokio::net::UnixListener::from_std(std_listener).map_err(|source| io("register", &path, source))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
        let _ = stop_rx.await;
    }));
    let result = tokio::select! {
        r = &mut server => r,
        () = shutdown => stop(stop_tx, server, grace).await,
    };
    let _ = std::fs::remove_file(&path);
    match result {
        Ok(r) => Ok(r?),
        // The server task was aborted after the grace period.
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(io("serve", &path, std::io::Error::other(e))),
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

fn io(op: &'static str, path: &Path, source: std::io::Error) -> ServeError {
    ServeError::Io { op, path: path.display().to_string(), source }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d/s.sock");
        let first = bind_unix(&path).unwrap();
        let e = bind_unix(&path).unwrap_err();
        assert!(matches!(e, ServeError::InUse { .. }), "{e}");
        assert!(crate::chain(&e).contains("stop it, or give this daemon another socket path"));
        drop(first);
        // A socket file nobody listens on any more: a crash's leftover.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let again = bind_unix(&path).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(again.path()).is_ok(), "the new socket listens");
    }

    #[test]
    fn dropping_an_unserved_socket_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(bind_unix(&path).unwrap());
        assert!(!path.exists());
    }
}
