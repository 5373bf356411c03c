//! The ceiling for benchmarks: a bare hyper server that answers every request with the same
//! `307` (fixed `Location`, `X-Room-Node`), on the same server stack the router uses
//! (hyper-util auto builder, HTTP/1.1 + HTTP/2, Tokio). The router's redirect mode does this
//! plus a placement lookup and a signed ticket, so the ratio of the two is what the lookup costs.
//! Since the fifteenth session its connections are capped and their first bytes read under
//! a timer (`http::sniff`), which costs nothing per request. It sets no per-request timer
//! (hyper's `header_read_timeout` would add about 1 700 instructions to its 7 600 per
//! request, callgrind), so it stays the bare ceiling the router is measured against; an
//! idle keep-alive connection holds one of its slots until the client closes it.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};

use crate::http::sniff;

/// Connections served at once (the router's default `server.max_connections`).
const MAX_CONNECTIONS: usize = 10_000;
/// Time a client has to send its first bytes (the router's default
/// `server.header_read_timeout`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Where every answer points.
pub const LOCATION: &str = "http://127.0.0.1:9/rooms/room?ticket=fixed";

fn answer() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    let h = r.headers_mut();
    h.insert(
        http::header::LOCATION,
        http::HeaderValue::from_static(LOCATION),
    );
    h.insert("x-room-node", http::HeaderValue::from_static("media-1"));
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

/// Serves the fixed `307` on `listener` until `shutdown` resolves.
pub async fn serve_bare_307(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let serve = move |stream: TcpStream| {
        let builder = builder.clone();
        async move {
            let _ = stream.set_nodelay(true);
            let svc = service_fn(|_req| async { Ok::<_, Infallible>(answer()) });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        }
    };
    sniff::accept_sniffed(listener, MAX_CONNECTIONS, HEADER_TIMEOUT, shutdown, serve).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_a_fixed_307() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_bare_307(listener, async {
            let _ = rx.await;
        }));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        for path in ["/rooms/a", "/anything?room=b"] {
            let r = client
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 307);
            assert_eq!(r.headers()["location"], LOCATION);
            assert_eq!(r.headers()["x-room-node"], "media-1");
        }
        tx.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
