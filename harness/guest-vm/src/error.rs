use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Accel;

/// Errors of image building, booting and the guest console.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("run {tool}")]
    Spawn {
        tool: String,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool { tool: String, status: String, stderr: String },
    #[error("host tool {tool} not found (scripts/install-deps.sh --test installs it)")]
    MissingTool { tool: String },
    #[error("{binary}: library {library} not found")]
    MissingLibrary { binary: PathBuf, library: String },
    #[error("apt-cache names no linux-image package for linux-image-amd64")]
    NoKernelPackage,
    #[error("kernel {version} lacks CONFIG_PVH")]
    NoPvh { version: String },
    #[error("no xz-compressed ELF kernel inside {bzimage}")]
    NoElfKernel { bzimage: PathBuf },
    #[error("invalid VM spec: {0}")]
    Spec(String),
    #[error("socket path {0} is too long for a unix socket")]
    SocketPath(PathBuf),
    #[error("QEMU ({accel:?}) exited {status} during boot; qemu: {qemu_tail}; kernel: {kernel_tail}")]
    BootExited { accel: Accel, status: String, qemu_tail: String, kernel_tail: String },
    #[error("guest ({accel:?}) did not reach its shell within {timeout:?}; kernel: {kernel_tail}")]
    BootTimeout { accel: Accel, timeout: Duration, kernel_tail: String },
    #[error("guest command timed out after {timeout:?}; output so far: {tail}")]
    Timeout { timeout: Duration, tail: String },
    #[error("QEMU exited {status}; console: {tail}")]
    Exited { status: String, tail: String },
    #[error("a previous command timed out: the guest console is out of step")]
    Poisoned,
    #[error("guest script of {len} bytes exceeds the console limit of {max}")]
    ScriptTooLarge { len: usize, max: usize },
    #[error("guest command exited {status}: {output}")]
    Command { status: i32, output: String },
    #[error("console protocol: {0}")]
    Protocol(String),
    #[error("guest did not power off within {timeout:?}; killed")]
    ShutdownTimeout { timeout: Duration },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
        let path = path.to_owned();
        move |source| Error::Io { op, path, source }
    }

    /// Whether the error is a time limit (boot, command, shutdown) running out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::BootTimeout { .. } | Error::Timeout { .. } | Error::ShutdownTimeout { .. })
    }
}
