//! The management socket of a Kata sandbox's shim, for the volumes it holds:
//! growing one in the guest, and the guest's figures for one. The API is
//! Kata's (`src/runtime/pkg/containerd-shim-v2/shim_management.go`): HTTP
//! over `<sandboxes>/<id>/shim-monitor.sock`, where `<sandboxes>` is
//! `/run/vc/sbs` for the Go runtime and `/run/kata` for runtime-rs;
//! `POST /direct-volume/resize` with `{"VolumePath", "Size"}`, and
//! `GET /direct-volume/stats?path=<escaped volume path>`, which answers the
//! agent's `VolumeStatsResponse` as JSON.

use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};

/// Where the two Kata runtimes keep their sandboxes' sockets.
pub const SANDBOX_DIRS: [&str; 2] = ["/run/vc/sbs", "/run/kata"];
/// The socket's name in a sandbox's directory.
pub const SHIM_SOCKET: &str = "shim-monitor.sock";

/// Errors talking to a shim.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("no shim socket for sandbox {sandbox} under {dirs}")]
    NoSocket { sandbox: String, dirs: String },
    #[error("sandbox {sandbox}'s shim did not answer within {timeout:?}")]
    Timeout { sandbox: String, timeout: Duration },
    #[error("sandbox {sandbox}'s shim ({socket}): {what}")]
    Transport { sandbox: String, socket: PathBuf, what: String },
    #[error("sandbox {sandbox}'s shim refused: HTTP {status}: {body}")]
    Refused { sandbox: String, status: u16, body: String },
    #[error("sandbox {sandbox}'s shim answered what is not volume stats")]
    Corrupt {
        sandbox: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The body of a resize request (Kata's `ResizeRequest`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResizeRequest {
    #[serde(rename = "VolumePath")]
    pub volume_path: String,
    #[serde(rename = "Size")]
    pub size: u64,
}

/// The guest's figures for a volume (Kata agent's `VolumeStatsResponse`, as
/// Go's JSON encoding writes it: zero fields left out).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestStats {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<GuestUsage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_condition: Option<GuestCondition>,
}

/// One unit's figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestUsage {
    #[serde(default)]
    pub available: u64,
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub used: u64,
    /// 1 bytes, 2 inodes (0 unknown).
    #[serde(default)]
    pub unit: i32,
}

/// The guest's view of the volume's health.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestCondition {
    #[serde(default)]
    pub abnormal: bool,
    #[serde(default)]
    pub message: String,
}

/// One sandbox's shim.
#[derive(Clone, Debug)]
pub struct Shim {
    sandbox: String,
    socket: PathBuf,
}

impl Shim {
    /// The shim of `sandbox`: its socket under the first of `dirs` that has one.
    pub fn find(sandbox: &str, dirs: &[PathBuf]) -> Result<Shim, ShimError> {
        dirs.iter()
            .map(|d| d.join(sandbox).join(SHIM_SOCKET))
            .find(|s| s.exists())
            .map(|socket| Shim { sandbox: sandbox.to_owned(), socket })
            .ok_or_else(|| ShimError::NoSocket {
                sandbox: sandbox.to_owned(),
                dirs: dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" or "),
            })
    }

    /// The sandbox's id.
    pub fn sandbox(&self) -> &str {
        &self.sandbox
    }

    /// Asks the shim to grow `volume_path` (the publication's target) to
    /// `size` bytes in the guest: the hypervisor's disk, then the guest's
    /// filesystem. Ok only when the shim says it did.
    pub async fn resize(self, volume_path: PathBuf, size: u64, timeout: Duration) -> Result<(), ShimError> {
        let body = ResizeRequest { volume_path: volume_path.display().to_string(), size };
        let body = serde_json::to_vec(&body).map_err(|e| self.transport(e))?;
        self.call(Method::POST, "/direct-volume/resize".into(), body, timeout).await.map(|_| ())
    }

    /// The guest's figures for `volume_path`.
    pub async fn stats(self, volume_path: PathBuf, timeout: Duration) -> Result<GuestStats, ShimError> {
        let path = utf8_percent_encode(&volume_path.display().to_string(), NON_ALPHANUMERIC).to_string();
        let body = self.call(Method::GET, format!("/direct-volume/stats?path={path}"), Vec::new(), timeout).await?;
        serde_json::from_slice(&body).map_err(|source| ShimError::Corrupt { sandbox: self.sandbox.clone(), source })
    }

    async fn call(&self, method: Method, uri: String, body: Vec<u8>, timeout: Duration) -> Result<Bytes, ShimError> {
        let call = async {
            let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(|e| self.transport(e))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| self.transport(e))?;
            let conn = tokio::spawn(conn);
            let req = Request::builder()
                .method(method)
                .uri(uri)
                .header(hyper::header::HOST, "shim")
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| self.transport(e))?;
            let resp = sender.send_request(req).await.map_err(|e| self.transport(e))?;
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(|e| self.transport(e))?.to_bytes();
            conn.abort();
            if status != StatusCode::OK {
                let text = String::from_utf8_lossy(&body).chars().take(512).collect();
                return Err(ShimError::Refused { sandbox: self.sandbox.clone(), status: status.as_u16(), body: text });
            }
            Ok(body)
        };
        tokio::time::timeout(timeout, call).await.map_err(|_| ShimError::Timeout { sandbox: self.sandbox.clone(), timeout })?
    }

    fn transport(&self, e: impl std::fmt::Display) -> ShimError {
        ShimError::Transport { sandbox: self.sandbox.clone(), socket: self.socket.clone(), what: e.to_string() }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn stats_parse_as_go_writes_them() {
        // Go's encoding/json of the agent's VolumeStatsResponse: zero fields left out.
        let json = r#"{"usage":[{"available":4096,"total":8192,"used":4096,"unit":1},{"total":16,"used":3,"available":13,"unit":2}],"volume_condition":{"message":"ok"}}"#;
        let s: GuestStats = serde_json::from_str(json).unwrap();
        assert_eq!(s.usage.len(), 2);
        assert_eq!((s.usage[0].total, s.usage[1].unit), (8192, 2));
        assert_eq!(s.volume_condition, Some(GuestCondition { abnormal: false, message: "ok".into() }));
        assert_eq!(serde_json::from_str::<GuestStats>("{}").unwrap(), GuestStats::default());
    }

    #[test]
    fn resize_body_is_kata_s() {
        let body = serde_json::to_string(&ResizeRequest { volume_path: "/a b".into(), size: 7 }).unwrap();
        assert_eq!(body, r#"{"VolumePath":"/a b","Size":7}"#);
    }
}
