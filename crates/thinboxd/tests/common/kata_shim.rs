//! A stand-in for a Kata sandbox's shim (Kata itself cannot run here),
//! written from Kata's API: `src/runtime/pkg/containerd-shim-v2/shim_management.go`
//! serves `POST /direct-volume/resize` (JSON `{"VolumePath", "Size"}`;
//! 200 and an empty body when the sandbox resized the volume, 500 and the
//! error text when it did not) and `GET /direct-volume/stats?path=<escaped>`
//! (400 without `path`; the agent's `VolumeStatsResponse` as JSON) on
//! `<sandboxes>/<id>/shim-monitor.sock`. It records every request and answers
//! as it is told: accept, refuse, or never answer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use thinbox_block_passthrough::kata_shim::{GuestStats, ResizeRequest};

/// How the shim answers.
#[derive(Clone, Debug)]
pub enum Answer {
    /// As a sandbox that did what it was asked.
    Accept,
    /// HTTP 500 with this text, as Kata does when the sandbox fails.
    Refuse(String),
    /// Never (a hung shim).
    Silent,
}

/// A request the shim got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Got {
    Resize(ResizeRequest),
    Stats(String),
}

#[derive(Debug)]
struct State {
    answer: Answer,
    stats: GuestStats,
    got: Vec<Got>,
}

/// One sandbox's shim, served until dropped.
pub struct TestShim {
    pub socket: PathBuf,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl TestShim {
    /// Serves sandbox `id`'s socket under `sandboxes`.
    pub fn start(sandboxes: &Path, id: &str) -> TestShim {
        let dir = sandboxes.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("shim-monitor.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let state = Arc::new(Mutex::new(State { answer: Answer::Accept, stats: GuestStats::default(), got: Vec::new() }));
        let shared = state.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| serve(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        TestShim { socket, state, server }
    }

    pub fn answer(&self, answer: Answer) {
        self.state.lock().unwrap().answer = answer;
    }

    pub fn stats(&self, stats: GuestStats) {
        self.state.lock().unwrap().stats = stats;
    }

    /// What it was asked, oldest first; forgets it.
    pub fn got(&self) -> Vec<Got> {
        std::mem::take(&mut self.state.lock().unwrap().got)
    }
}

impl Drop for TestShim {
    fn drop(&mut self) {
        self.server.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn serve(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let body = req.into_body().collect().await?.to_bytes();
    let answer = state.lock().unwrap().answer.clone();
    let reply = |status: StatusCode, body: Vec<u8>| Ok(Response::builder().status(status).body(Full::new(Bytes::from(body))).unwrap());
    match (method.as_str(), uri.path()) {
        ("POST", "/direct-volume/resize") => {
            let Ok(asked) = serde_json::from_slice::<ResizeRequest>(&body) else {
                return reply(StatusCode::INTERNAL_SERVER_ERROR, b"failed to unmarshal the http request body".to_vec());
            };
            state.lock().unwrap().got.push(Got::Resize(asked));
        }
        ("GET", "/direct-volume/stats") => {
            let path =
                uri.query().and_then(|q| q.strip_prefix("path=")).map(|p| percent_encoding::percent_decode_str(p).decode_utf8_lossy().into_owned());
            let Some(path) = path.filter(|p| !p.is_empty()) else {
                return reply(StatusCode::BAD_REQUEST, b"Required parameter path not found".to_vec());
            };
            state.lock().unwrap().got.push(Got::Stats(path));
        }
        _ => return reply(StatusCode::NOT_FOUND, b"404 page not found\n".to_vec()),
    }
    match answer {
        Answer::Silent => std::future::pending().await,
        Answer::Refuse(why) => reply(StatusCode::INTERNAL_SERVER_ERROR, why.into_bytes()),
        Answer::Accept if uri.path() == "/direct-volume/stats" => reply(StatusCode::OK, serde_json::to_vec(&state.lock().unwrap().stats).unwrap()),
        Answer::Accept => reply(StatusCode::OK, Vec::new()),
    }
}
