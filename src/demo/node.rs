//! A demo meeting node: a small HTTP stand-in for a media server.
//!
//! It verifies the router's tickets (a user who skips the router, lands on the wrong node, or
//! brings one room's ticket to another, is refused), counts participants per room (`join` /
//! `leave`), heartbeats its load and room list to the router, and ends rooms the router lists
//! under `evict`. Tests, benchmarks, the load harness and `roomrouter demo` all use it.
//!
//! Endpoints:
//! * `GET /rooms/{room}?ticket=T`, `GET /join/{room}?ticket=T`, `POST /rooms/{room}/join?ticket=T`
//!   (or the ticket in `X-Room-Ticket`, as proxy mode sends it): join (200 JSON with the
//!   participant count), 401 bad ticket, 403 ticket for another node or another room.
//! * `POST /rooms/{room}/leave`: one participant leaves.
//! * `GET /status`: this node's rooms and load.
//! * `GET /healthz`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::auth::TicketIssuer;
use crate::capped;
use crate::http::sniff;

/// Largest heartbeat reply read from the router: its evictions name at most the rooms this
/// node reported (at most 100 000, each id at most 256 bytes).
const HEARTBEAT_REPLY_MAX: usize = 32 * 1024 * 1024;
/// Connections a demo node serves at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 10_000;
/// Time a client has to send a request head (and to idle between requests).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How a demo node is set up.
#[derive(Debug, Clone)]
pub struct DemoNodeConfig {
    pub id: String,
    /// Router base URL, e.g. `http://127.0.0.1:8080`.
    pub router: String,
    pub listen: SocketAddr,
    /// URL users reach this node at; defaults to `http://{bound address}`.
    pub public_url: Option<String>,
    pub capacity: f64,
    pub region: Option<String>,
    pub tags: Vec<String>,
    /// Bearer token for heartbeats.
    pub node_token: String,
    /// Shared ticket secret.
    pub ticket_secret: String,
    /// Clock skew forgiven past a ticket's `exp` (the router's `tickets.leeway`).
    pub ticket_leeway: Duration,
    /// First heartbeat interval; the router's reply sets the next ones.
    pub heartbeat_interval: Duration,
}

#[derive(Debug, Default)]
struct State {
    rooms: Mutex<HashMap<String, u32>>,
    joins: AtomicU64,
    refused: AtomicU64,
    evicted: AtomicU64,
    draining: AtomicBool,
}

/// A running demo node.
pub struct DemoNode {
    pub id: String,
    pub addr: SocketAddr,
    pub url: String,
    state: Arc<State>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DemoNode {
    /// Binds, starts serving and heartbeating. The first heartbeat is sent before this returns
    /// (errors are logged and retried by the loop).
    pub async fn start(cfg: DemoNodeConfig) -> std::io::Result<DemoNode> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let url = cfg
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        let state = Arc::new(State::default());
        let (stop, stop_rx) = watch::channel(false);
        let tickets = Arc::new(
            TicketIssuer::new(&cfg.ticket_secret, Duration::from_secs(60))
                .with_leeway(cfg.ticket_leeway),
        );
        let server = tokio::spawn(serve(
            listener,
            state.clone(),
            tickets,
            cfg.id.clone(),
            stop_rx.clone(),
        ));
        let hb = Heartbeater::new(&cfg, url.clone(), state.clone());
        hb.beat().await.ok();
        let beats = tokio::spawn(hb.run(cfg.heartbeat_interval, stop_rx));
        Ok(DemoNode {
            id: cfg.id,
            addr,
            url,
            state,
            stop,
            tasks: vec![server, beats],
        })
    }

    /// Participants per room right now.
    pub fn rooms(&self) -> HashMap<String, u32> {
        self.state
            .rooms
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    pub fn load(&self) -> u32 {
        self.rooms().values().sum()
    }

    /// Joins accepted, joins refused (bad or foreign ticket), rooms ended by eviction.
    pub fn counters(&self) -> (u64, u64, u64) {
        (
            self.state.joins.load(Ordering::Relaxed),
            self.state.refused.load(Ordering::Relaxed),
            self.state.evicted.load(Ordering::Relaxed),
        )
    }

    /// Starts reporting `state = "draining"` (as a node shutting down would).
    pub fn set_draining(&self, on: bool) {
        self.state.draining.store(on, Ordering::Relaxed);
    }

    /// Stops serving and heartbeating at once (a crash, as far as the router and its users
    /// can tell): the accept loop and the heartbeats end, and so do the open connections,
    /// idle keep-alive ones included.
    pub fn kill(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    /// Stops, waiting for the tasks to end (open connections are closed as by [`kill`]).
    ///
    /// [`kill`]: DemoNode::kill
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for DemoNode {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    tickets: Arc<TicketIssuer>,
    id: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let builder = Arc::new(builder);
    let conn_stop = stop.clone();
    let serve = move |stream: TcpStream| {
        let (state, tickets, id) = (state.clone(), tickets.clone(), id.clone());
        let svc = service_fn(move |req| {
            let (state, tickets, id) = (state.clone(), tickets.clone(), id.clone());
            async move { Ok::<_, Infallible>(handle(req, &state, &tickets, &id)) }
        });
        let builder = builder.clone();
        let mut stop = conn_stop.clone();
        async move {
            // A stopped or killed node ends its open connections too (dropping the connection
            // closes the socket, mid-request or idle), as a crashed process would: a
            // keep-alive client must not go on joining and leaving a node that is gone.
            tokio::select! {
                biased;
                _ = stop.wait_for(|stopped| *stopped) => {}
                _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc) => {}
            }
        }
    };
    let stopped = async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    sniff::accept_sniffed(listener, MAX_CONNECTIONS, HEADER_TIMEOUT, stopped, serve).await;
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Whether `raw`, a room as the request path has it, is the ticket's room. The ticket names
/// the room as the router normalized it (`rooms.normalization`), which this node is not
/// told: any of the router's normalizations will do.
fn names_room(raw: &str, ticket_room: &str) -> bool {
    use crate::room::{Normalization, RoomKey};
    [
        Normalization::None,
        Normalization::Lowercase,
        Normalization::NfkcLowercase,
    ]
    .into_iter()
    .any(|n| RoomKey::from_encoded(raw, n).is_ok_and(|k| k.as_str() == ticket_room))
}

fn handle(
    req: Request<Incoming>,
    state: &State,
    tickets: &TicketIssuer,
    id: &str,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Redirect mode brings the ticket in the query; proxy mode in the X-Room-Ticket header.
    // Read only by the join routes: every proxied request carries one, and `/status` (what
    // the side-by-side benchmarks fetch) has no use for a copy of it.
    let ticket = || {
        req.uri()
            .query()
            .and_then(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "ticket")
                    .map(|(_, v)| v.into_owned())
            })
            .or_else(|| {
                req.headers()
                    .get("x-room-ticket")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            })
    };
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["healthz"]) => reply(StatusCode::OK, serde_json::json!({"status": "ok"})),
        (&Method::GET, ["status"]) => {
            let rooms = state.rooms.lock().map(|r| r.clone()).unwrap_or_default();
            let load: u32 = rooms.values().sum();
            reply(
                StatusCode::OK,
                serde_json::json!({"id": id, "load": load, "rooms": rooms}),
            )
        }
        (&Method::GET, ["rooms" | "join", room])
        | (&Method::POST, ["rooms" | "join", room, "join"]) => {
            let Some(t) = ticket() else {
                state.refused.fetch_add(1, Ordering::Relaxed);
                return reply(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "unauthorized", "message": "ticket required"}),
                );
            };
            let claims = match tickets.verify(&t) {
                Ok(c) => c,
                Err(e) => {
                    state.refused.fetch_add(1, Ordering::Relaxed);
                    return reply(
                        StatusCode::UNAUTHORIZED,
                        serde_json::json!({"error": "unauthorized", "message": e.to_string()}),
                    );
                }
            };
            if claims.node != id {
                state.refused.fetch_add(1, Ordering::Relaxed);
                return reply(
                    StatusCode::FORBIDDEN,
                    serde_json::json!({"error": "forbidden", "message": format!("ticket is for node {}", claims.node)}),
                );
            }
            // A ticket admits to its own room only: a user the router let into one room
            // must not use the ticket for another room on the same node.
            if !names_room(room, &claims.room) {
                state.refused.fetch_add(1, Ordering::Relaxed);
                return reply(
                    StatusCode::FORBIDDEN,
                    serde_json::json!({"error": "forbidden", "message": format!("ticket is for room {}", claims.room)}),
                );
            }
            let n = {
                let mut rooms = state.rooms.lock().unwrap_or_else(|p| p.into_inner());
                let n = rooms.entry(claims.room.clone()).or_insert(0);
                *n += 1;
                *n
            };
            state.joins.fetch_add(1, Ordering::Relaxed);
            reply(
                StatusCode::OK,
                serde_json::json!({"node": id, "room": claims.room, "user": claims.sub, "participants": n}),
            )
        }
        (&Method::POST, ["rooms" | "join", room, "leave"]) => {
            let room = percent_encoding::percent_decode_str(room)
                .decode_utf8_lossy()
                .to_lowercase();
            let mut rooms = state.rooms.lock().unwrap_or_else(|p| p.into_inner());
            match rooms.get_mut(&room) {
                Some(n) => {
                    *n = n.saturating_sub(1);
                    let left = *n;
                    if left == 0 {
                        rooms.remove(&room);
                    }
                    reply(
                        StatusCode::OK,
                        serde_json::json!({"room": room, "participants": left}),
                    )
                }
                None => reply(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": "not_found", "message": "no such room"}),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found", "message": "no such endpoint"}),
        ),
    }
}

#[derive(Deserialize)]
struct HeartbeatReply {
    #[serde(default)]
    evict: Vec<String>,
    heartbeat_interval_ms: Option<u64>,
}

struct Heartbeater {
    client: reqwest::Client,
    endpoint: String,
    node_token: String,
    body_base: serde_json::Value,
    state: Arc<State>,
}

impl Heartbeater {
    fn new(cfg: &DemoNodeConfig, url: String, state: Arc<State>) -> Heartbeater {
        Heartbeater {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            endpoint: format!(
                "{}/v1/nodes/{}/heartbeat",
                cfg.router.trim_end_matches('/'),
                cfg.id
            ),
            node_token: cfg.node_token.clone(),
            body_base: serde_json::json!({
                "url": url,
                "capacity": cfg.capacity,
                "region": cfg.region,
                "tags": cfg.tags,
            }),
            state,
        }
    }

    /// Sends one heartbeat; applies evictions; returns the interval the router asks for.
    async fn beat(&self) -> anyhow::Result<Option<Duration>> {
        let (load, rooms) = {
            let rooms = self.state.rooms.lock().unwrap_or_else(|p| p.into_inner());
            let list: Vec<serde_json::Value> = rooms
                .iter()
                .map(|(k, v)| serde_json::json!({"room": k, "participants": v}))
                .collect();
            (rooms.values().sum::<u32>(), list)
        };
        let mut body = self.body_base.clone();
        body["load"] = load.into();
        body["rooms"] = rooms.into();
        if self.state.draining.load(Ordering::Relaxed) {
            body["state"] = "draining".into();
        }
        let resp = self
            .client
            .post(&self.endpoint)
            .bearer_auth(&self.node_token)
            .json(&body)
            .send()
            .await?;
        if !resp.status().is_success() {
            tracing::warn!(status = %resp.status(), "heartbeat refused");
            return Ok(None);
        }
        let r: HeartbeatReply = capped::json(resp, HEARTBEAT_REPLY_MAX).await?;
        if !r.evict.is_empty() {
            let mut rooms = self.state.rooms.lock().unwrap_or_else(|p| p.into_inner());
            for room in &r.evict {
                if rooms.remove(room).is_some() {
                    self.state.evicted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(r.heartbeat_interval_ms.map(Duration::from_millis))
    }

    async fn run(self, first: Duration, mut stop: watch::Receiver<bool>) {
        let mut every = first;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {},
                _ = stop.changed() => break,
            }
            match self.beat().await {
                Ok(Some(d)) if !d.is_zero() => every = d.min(Duration::from_secs(60)),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One HTTP/1.1 answer read off `conn` (head and `content-length` body), or `None` if the
    /// server closed or reset the connection first. Bounded: 3 s, 64 KiB.
    async fn answer(conn: &mut TcpStream) -> Option<String> {
        let read = async {
            let mut buf = Vec::new();
            loop {
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        return Some(text);
                    }
                }
                assert!(buf.len() < 64 * 1024, "answer too long");
                let mut chunk = [0u8; 4096];
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(3), read)
            .await
            .expect("the node neither answered nor closed the connection")
    }

    #[tokio::test]
    async fn a_killed_node_closes_its_open_keep_alive_connections() {
        // Nothing listens at the router's address: heartbeats fail fast, which is fine here.
        let router = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let node = DemoNode::start(DemoNodeConfig {
            id: "media-1".into(),
            router: format!("http://{router}"),
            listen: "127.0.0.1:0".parse().unwrap(),
            public_url: None,
            capacity: 10.0,
            region: None,
            tags: vec![],
            node_token: "node-token".into(),
            ticket_secret: "ticket-secret-0123456789-0123456789".into(),
            ticket_leeway: crate::auth::ticket::DEFAULT_LEEWAY,
            heartbeat_interval: Duration::from_secs(60),
        })
        .await
        .unwrap();
        let request = b"GET /status HTTP/1.1\r\nhost: node\r\n\r\n";
        let mut conn = TcpStream::connect(node.addr).await.unwrap();
        conn.write_all(request).await.unwrap();
        let first = answer(&mut conn).await.expect("an answer before the kill");
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");

        node.kill();
        // The same keep-alive connection, as a load test's pooled client would reuse it: a
        // crashed node answers nothing more on it.
        let _ = conn.write_all(request).await;
        let after = answer(&mut conn).await;
        assert!(after.is_none(), "a killed node still answered: {after:?}");
    }
}
