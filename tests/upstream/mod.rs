//! A tiny upstream meeting node for proxy tests: echoes WebSocket messages prefixed with its
//! name, streams POST bodies straight back (or, with `?collect=1`, answers their length once
//! the whole body is in), answers GETs with the headers it saw, and can be
//! told to hang (`/rooms/slow`), to hold its answer a while (`?hold=MS`, at most 2 s), to
//! answer with `?size=N` bytes (at most 64 MiB) or to close the connection after answering
//! (`?close=1`).
//! A `101` names the target it was asked for (`x-upgrade-path`) and the `Authorization` it
//! came with (`x-upgrade-authorization`).
//! Counts the connections it accepts. Registered with the router by hand-sent heartbeats.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type B = BoxBody<Bytes, hyper::Error>;

pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    pub url: String,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let n = name.to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            // Bounded: the test ends the task by aborting it.
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let n = n.clone();
                let svc = service_fn(move |req| {
                    let n = n.clone();
                    async move { Ok::<_, Infallible>(handle(req, n).await) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream {
            name: name.to_string(),
            addr,
            url: format!("http://{addr}"),
            accepted,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stops accepting (open connections end with their tasks' sockets).
    pub fn kill(&self) {
        self.task.abort();
    }

    /// The heartbeat body that registers this upstream.
    pub fn heartbeat(&self) -> serde_json::Value {
        serde_json::json!({"url": self.url, "capacity": 100, "load": 0})
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn full(b: impl Into<Bytes>) -> B {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

async fn handle(mut req: Request<Incoming>, name: String) -> Response<B> {
    if let Some(key) = req.headers().get("sec-websocket-key").cloned() {
        let on = hyper::upgrade::on(&mut req);
        let me = name.clone();
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await;
            // At most 1000 messages per socket: tests send a few.
            for _ in 0..1000 {
                match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let reply = Message::text(format!("{me}:{t}"));
                        match ws.send(reply).await {
                            Ok(()) => continue,
                            Err(_) => return,
                        }
                    }
                    Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Err(_) | Ok(Some(Err(_))) => {
                        return
                    }
                    _ => {}
                }
            }
        });
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        // The target the upgrade request named, for tests of the node's base path.
        h.insert(
            "x-upgrade-path",
            HeaderValue::from_str(&req.uri().to_string()).unwrap(),
        );
        // And its credentials, if any, for tests of what the router keeps to itself.
        if let Some(a) = req.headers().get(header::AUTHORIZATION) {
            h.insert("x-upgrade-authorization", a.clone());
        }
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(
            "sec-websocket-accept",
            HeaderValue::from_str(&derive_accept_key(key.as_bytes())).unwrap(),
        );
        return r;
    }
    if req.uri().path() == "/rooms/slow" {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let hold = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("hold="))
            .and_then(|ms| ms.parse::<u64>().ok())
    });
    if let Some(ms) = hold {
        tokio::time::sleep(Duration::from_millis(ms.min(2_000))).await;
    }
    let size = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("size="))
            .and_then(|n| n.parse::<usize>().ok())
    });
    if let Some(n) = size {
        return Response::new(full(vec![b'x'; n.min(64 << 20)]));
    }
    if req.method() == http::Method::POST && req.uri().query() == Some("collect=1") {
        // Answers only once the whole body is in: its length.
        return match req.into_body().collect().await {
            Ok(b) => Response::new(full(b.to_bytes().len().to_string())),
            Err(_) => Response::new(full("body failed")),
        };
    }
    if req.method() == http::Method::POST {
        // Streams the body straight back, frame by frame.
        let mut r = Response::new(req.into_body().boxed());
        r.headers_mut()
            .insert("x-upstream", HeaderValue::from_str(&name).unwrap());
        return r;
    }
    let seen: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
        .collect();
    let body = serde_json::json!({"node": name, "path": req.uri().to_string(), "headers": seen});
    let mut r = Response::new(full(body.to_string()));
    r.headers_mut()
        .insert("x-upstream", HeaderValue::from_str(&name).unwrap());
    r.headers_mut().insert(
        header::CONNECTION,
        HeaderValue::from_static("x-node-private"),
    );
    r.headers_mut()
        .insert("x-node-private", HeaderValue::from_static("1"));
    if req.uri().query().is_some_and(|q| q.contains("close=1")) {
        // hyper closes the connection after a response that says so.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}
