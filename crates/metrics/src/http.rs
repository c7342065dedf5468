//! `GET /metrics` over HTTP/1.1 (hyper): one task per connection, one request
//! per connection, every connection bounded in time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE as CONTENT_TYPE_HEADER, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::{Error, Metrics};

/// What `GET /metrics` answers with: prometheus-client's text encoder writes
/// OpenMetrics (`# EOF`, `_total` counters, `# UNIT`), which Prometheus
/// parses by this content type, whatever it asked for.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A client has this long to send its request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection is closed after this long, answered or not (a client that
/// does not read its response holds nothing longer).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// After a failed accept (out of file descriptors…), before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Binds the endpoint's address; done before serving anything else, so that a
/// bad or busy address fails the daemon's start.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(address).await.map_err(|source| Error::Bind { address, source })
}

/// Serves `GET /metrics` on `listener` until the future is dropped (or its
/// task aborted). Other paths are 404, other methods 405. Each connection is
/// its own task and carries one request (no keep-alive: a scrape every few
/// seconds gains nothing from an idle connection, and none is left open).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(address = %address, "serving Prometheus metrics at /metrics");
    }
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, metrics.clone()));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics endpoint: connection"),
                Err(_) => tracing::debug!("metrics endpoint: connection timed out"),
            }
        });
    }
}

async fn respond(req: Request<Incoming>, metrics: Arc<Metrics>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(status(StatusCode::NOT_FOUND));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = status(StatusCode::METHOD_NOT_ALLOWED);
        resp.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }
    // Collectors may read the disk: off the async threads.
    let body = match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics endpoint: encode");
            return Ok(status(StatusCode::INTERNAL_SERVER_ERROR));
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics endpoint: encode task");
            return Ok(status(StatusCode::INTERNAL_SERVER_ERROR));
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(CONTENT_TYPE_HEADER, HeaderValue::from_static(CONTENT_TYPE));
    Ok(resp)
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = code;
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::Api;

    /// One request, the whole response (the server closes the connection).
    async fn request(address: SocketAddr, head: &str) -> String {
        let mut s = TcpStream::connect(address).await.unwrap();
        s.write_all(format!("{head}\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await.expect("response and close").unwrap();
        out
    }

    async fn start() -> SocketAddr {
        let metrics = Arc::new(Metrics::new());
        metrics.observe(Api::Snapshots, "prepare", true, Duration::from_millis(3));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, metrics));
        address
    }

    #[tokio::test]
    async fn get_metrics_and_nothing_else() {
        let address = start().await;
        let ok = request(address, "GET /metrics HTTP/1.1").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(&format!("\r\ncontent-type: {CONTENT_TYPE}\r\n")), "{ok}");
        assert!(ok.contains("\nthinbox_operations_total{api=\"snapshots\",op=\"prepare\",result=\"ok\"} 1\n"), "{ok}");
        assert!(ok.ends_with("# EOF\n"), "{ok}");
        // A query string is still the metrics.
        assert!(request(address, "GET /metrics?x=1 HTTP/1.1").await.starts_with("HTTP/1.1 200 OK\r\n"));
        let head = request(address, "HEAD /metrics HTTP/1.1").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && !head.contains("# EOF"), "{head}");

        let missing = request(address, "GET /x HTTP/1.1").await;
        assert!(missing.starts_with("HTTP/1.1 404 Not Found\r\n"), "{missing}");
        let post = request(address, "POST /metrics HTTP/1.1\r\nContent-Length: 0").await;
        assert!(post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{post}");
        assert!(post.contains("\r\nallow: GET, HEAD\r\n"), "{post}");
        // Not HTTP at all: refused, and the server goes on.
        let junk = request(address, "hello").await;
        assert!(junk.is_empty() || junk.starts_with("HTTP/1.1 400"), "{junk}");
        assert!(request(address, "GET /metrics HTTP/1.1").await.starts_with("HTTP/1.1 200 OK\r\n"));
    }

    #[tokio::test]
    async fn a_silent_client_blocks_no_one_and_is_dropped() {
        let address = start().await;
        let mut silent = TcpStream::connect(address).await.unwrap();
        silent.write_all(b"GET /metr").await.unwrap();
        let ok = request(address, "GET /metrics HTTP/1.1").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        // Past the header timeout the server hangs up (answering 408 or not).
        let mut rest = Vec::new();
        let read = tokio::time::timeout(HEADER_TIMEOUT * 2, silent.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the connection is still open after {:?}", HEADER_TIMEOUT * 2);
    }
}
