//! A demo meeting node: a small HTTP stand-in for a media server.
//!
//! It verifies the router's tickets (a user who skips the router, lands on the wrong node, or
//! brings one room's ticket to another, is refused), counts participants per room (`join` /
//! `leave`), heartbeats its load and room list to the router, and ends rooms the router lists
//! under `evict`. Tests, benchmarks, the load harness and `roomrouter demo` all use it.
//!
//! It names rooms as the router does: every room in a path goes through
//! [`RoomKey::from_encoded`] under the router's `rooms.normalization`, which the node is told
//! ([`DemoNode::start_with_normalization`]). A ticket names its room normalized so; a room
//! compared any other way either admits a ticket at another room's path or cannot find the
//! room a join was counted under.
//!
//! Endpoints:
//! * `GET /rooms/{room}?ticket=T`, `GET /join/{room}?ticket=T`, `POST /rooms/{room}/join?ticket=T`
//!   (or the ticket in `X-Room-Ticket`, as proxy mode sends it): join (200 JSON with the
//!   participant count), 401 bad ticket, 403 ticket for another node or another room. A
//!   ticket used again (its `jti`) is the participant it admitted, not one more.
//! * `POST /rooms/{room}/leave`: one participant leaves (404 if the room has nobody here).
//! * `GET /status`: this node's rooms and load.
//! * `GET /healthz`.
//!
//! Stopping: [`DemoNode::stop`] is an operator's stop (it leaves the router, then lets the
//! requests in flight finish); [`DemoNode::kill`] is a crash.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
use crate::room::{Normalization, RoomKey};

/// Largest heartbeat reply read from the router: its evictions name at most the rooms this
/// node reported (at most 100 000, each id at most 256 bytes).
const HEARTBEAT_REPLY_MAX: usize = 32 * 1024 * 1024;
/// Largest error answer read from the router: enough for its `{"error", "message"}`.
const ERROR_REPLY_MAX: usize = 4096;
/// Connections a demo node serves at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 10_000;
/// Time a client has to send a request head (and to idle between requests).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time the router has to answer a heartbeat or a leave.
const ROUTER_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a stopping node gives the requests in flight (a demo node answers each at once, so
/// this only bounds a slow client) before it closes what is left.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// How a demo node is set up.
#[derive(Debug, Clone)]
pub struct DemoNodeConfig {
    pub id: String,
    /// Router base URLs, e.g. `http://127.0.0.1:8080` (at least one). Heartbeats go to the
    /// one that answered last; when it fails (no connection, a timeout, a 5xx), the next one
    /// is tried at once, so a router that crashes or hangs does not leave the node unheard
    /// for `placement.heartbeat_timeout`, which the other routers would take for the node's
    /// death (and move its live rooms). Routers sharing a Redis share what any of them hears.
    pub routers: Vec<String>,
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
    /// The tickets (`jti` -> `exp`) that admitted a participant, kept while they verify: a
    /// ticket used again (a reload, a retry, a replay) is the same participant, not one
    /// more. Counted again, one ticket could make a room look as large as a replayer
    /// liked, and the node full to the router.
    admitted: Mutex<HashMap<String, u64>>,
    joins: AtomicU64,
    refused: AtomicU64,
    evicted: AtomicU64,
    draining: AtomicBool,
}

/// How many admitting tickets a node keeps before it forgets those that no longer verify.
const ADMITTED_PRUNE_AT: usize = 4096;

/// Where a node is in its life, as its tasks and connections watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// A graceful stop: no new connection; open ones finish the request in flight and close.
    Closing,
    /// Every connection ends at once, as when the process is gone.
    Stopped,
}

/// A running demo node.
pub struct DemoNode {
    pub id: String,
    pub addr: SocketAddr,
    pub url: String,
    state: Arc<State>,
    phase: watch::Sender<Phase>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    router: RouterClient,
}

/// What a node sends the router: heartbeats, and its leave.
#[derive(Clone)]
struct RouterClient {
    client: reqwest::Client,
    /// `{router}/v1/nodes/{id}`, per router.
    nodes: Arc<[String]>,
    /// The router that answered last (an index into `nodes`).
    current: Arc<AtomicUsize>,
    token: String,
}

impl DemoNode {
    /// Binds, starts serving and heartbeating, for a router on the default
    /// `rooms.normalization` (`lowercase`); see [`DemoNode::start_with_normalization`].
    pub async fn start(cfg: DemoNodeConfig) -> std::io::Result<DemoNode> {
        Self::start_with_normalization(cfg, Normalization::default()).await
    }

    /// Binds, starts serving and heartbeating, naming rooms as a router with
    /// `rooms.normalization = rooms` does (its tickets name rooms so).
    ///
    /// The first heartbeat is sent before this returns. One the router refuses for good (a
    /// 4xx other than 408 and 429: a wrong node token, an id or capacity it never takes) is
    /// an error: the node would be refused at every heartbeat and never receive a user. Any
    /// other failure (the router not up yet, a 5xx) is logged and retried by the loop.
    pub async fn start_with_normalization(
        cfg: DemoNodeConfig,
        rooms: Normalization,
    ) -> std::io::Result<DemoNode> {
        if cfg.routers.is_empty() {
            return Err(std::io::Error::other("a demo node needs a router URL"));
        }
        let listener = TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let url = cfg
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        let state = Arc::new(State::default());
        let (phase, phase_rx) = watch::channel(Phase::Serving);
        let tickets = Arc::new(
            TicketIssuer::new(&cfg.ticket_secret, Duration::from_secs(60))
                .with_leeway(cfg.ticket_leeway),
        );
        let router = RouterClient {
            client: reqwest::Client::builder()
                .timeout(ROUTER_TIMEOUT)
                .build()
                .unwrap_or_default(),
            nodes: cfg
                .routers
                .iter()
                .map(|r| format!("{}/v1/nodes/{}", r.trim_end_matches('/'), cfg.id))
                .collect(),
            current: Arc::new(AtomicUsize::new(0)),
            token: cfg.node_token.clone(),
        };
        let server = tokio::spawn(serve(
            listener,
            state.clone(),
            tickets,
            Node {
                id: cfg.id.clone(),
                rooms,
            },
            phase.clone(),
        ));
        // From here on, an early return drops the node, which ends the server.
        let mut node = DemoNode {
            id: cfg.id.clone(),
            addr,
            url: url.clone(),
            state: state.clone(),
            phase,
            tasks: vec![server],
            router: router.clone(),
        };
        let hb = Heartbeater::new(&cfg, router, url, state);
        if let Err(e) = hb.beat().await {
            match e.downcast_ref::<Refused>() {
                Some(r) if r.is_permanent() => {
                    return Err(std::io::Error::other(format!(
                        "the router at {} refused node {}'s first heartbeat ({r}){}",
                        hb.router.current_base(),
                        cfg.id,
                        r.hint()
                    )))
                }
                _ => tracing::warn!(error = %e, "first heartbeat failed; retrying"),
            }
        }
        node.tasks
            .push(tokio::spawn(hb.run(cfg.heartbeat_interval, phase_rx)));
        Ok(node)
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
        self.phase.send_replace(Phase::Stopped);
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    /// Stops as an operator stops a node (SIGTERM, Ctrl-C), not as a crash: it takes no new
    /// connection, leaves the router (`DELETE /v1/nodes/{id}`), then gives the requests in
    /// flight 3 s (`STOP_GRACE`) to finish and closes what is left (idle connections at once).
    ///
    /// Without the leave the router would take the node for alive, and send it joins and new
    /// rooms it refuses, until `placement.heartbeat_timeout` passed. A leave that fails is
    /// logged: the router then finds out at that timeout, as after a crash.
    pub async fn stop(mut self) {
        self.phase.send_replace(Phase::Closing);
        // The accept loop and the heartbeats end before the leave: a heartbeat the router
        // applied after it would register the node again. A heartbeat in flight is let
        // finish (bounded by ROUTER_TIMEOUT), not dropped: the router may have it already.
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.router.leave(&self.id).await;
        // Each open connection holds a receiver until it closes.
        let _ = tokio::time::timeout(STOP_GRACE, self.phase.closed()).await;
        self.phase.send_replace(Phase::Stopped);
    }
}

impl Drop for DemoNode {
    fn drop(&mut self) {
        self.phase.send_replace(Phase::Stopped);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl RouterClient {
    /// `{router}/v1/nodes/{id}` of the router that answered last.
    fn node(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed);
        self.nodes.get(i).or(self.nodes.first()).map_or("", |n| n)
    }

    /// The base URL of the router that answered last (for messages).
    fn current_base(&self) -> &str {
        let n = self.node();
        n.find("/v1/nodes/").map_or(n, |i| &n[..i])
    }

    /// `DELETE /v1/nodes/{id}`: the router places nothing more here from now on (told to
    /// the router that answered last, or, if it fails, the next; with a shared store, every
    /// router learns it).
    async fn leave(&self, id: &str) {
        let (first, n) = (
            self.current.load(Ordering::Relaxed),
            self.nodes.len().max(1),
        );
        let mut sent = None;
        for k in 0..n {
            let Some(node) = self.nodes.get((first + k) % n) else {
                break;
            };
            let r = self
                .client
                .delete(node)
                .bearer_auth(&self.token)
                .send()
                .await;
            let next = match &r {
                Err(_) => true,
                Ok(resp) => resp.status().is_server_error(),
            };
            sent = Some(r);
            if !next {
                break;
            }
        }
        let Some(sent) = sent else { return };
        match sent {
            Ok(r) if r.status().is_success() => tracing::info!(node = %id, "left the router"),
            // Removed already (drained empty, or by an admin): nothing to leave.
            Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                tracing::info!(node = %id, "the router no longer lists this node")
            }
            Ok(r) => {
                let refused = Refused::read(r).await;
                tracing::warn!(node = %id, error = %refused, "the router refused this node's leave; it will take the node for dead at its heartbeat timeout")
            }
            Err(e) => {
                tracing::warn!(node = %id, error = %e, "could not tell the router this node leaves; it will take the node for dead at its heartbeat timeout")
            }
        }
    }
}

/// An error answer from the router.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
struct Refused {
    status: StatusCode,
    /// The router's `error: message`, or the body as it came.
    message: String,
}

impl Refused {
    async fn read(resp: reqwest::Response) -> Refused {
        #[derive(Deserialize)]
        struct ErrorBody {
            error: String,
            message: String,
        }
        let status = resp.status();
        let body = capped::bytes(resp, ERROR_REPLY_MAX)
            .await
            .unwrap_or_default();
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => format!("{}: {}", e.error, e.message),
            Err(_) => String::from_utf8_lossy(&body).trim().to_string(),
        };
        Refused { status, message }
    }

    /// Whether the router would answer every heartbeat so: a client error other than a
    /// timeout or a rate limit.
    fn is_permanent(&self) -> bool {
        self.status.is_client_error()
            && self.status != StatusCode::REQUEST_TIMEOUT
            && self.status != StatusCode::TOO_MANY_REQUESTS
    }

    /// What the operator of a node refused so likely has to fix.
    fn hint(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                ": check the node token (--node-token, ROOMROUTER_NODE_TOKEN) against the router's auth.node_tokens.<this node's id>, or its auth.node_token if it has none for this node"
            }
            StatusCode::NOT_FOUND => ": is the router URL a roomrouter?",
            _ => "",
        }
    }
}

/// Who a node is, as its request handler needs it.
#[derive(Debug, Clone)]
struct Node {
    id: String,
    /// The router's `rooms.normalization`.
    rooms: Normalization,
}

async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    tickets: Arc<TicketIssuer>,
    node: Node,
    phase: watch::Sender<Phase>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let builder = Arc::new(builder);
    let node = Arc::new(node);
    let mut accepting = phase.subscribe();
    let serve = move |stream: TcpStream| {
        let (state, tickets, node) = (state.clone(), tickets.clone(), node.clone());
        let svc = service_fn(move |req| {
            let (state, tickets, node) = (state.clone(), tickets.clone(), node.clone());
            async move { Ok::<_, Infallible>(handle(req, &state, &tickets, &node)) }
        });
        let builder = builder.clone();
        // Subscribed only once the connection is served: a stopping node waits for the
        // receivers of its open connections to go, not for sockets still being sniffed.
        let mut phase = phase.subscribe();
        async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                biased;
                _ = phase.wait_for(|p| *p != Phase::Serving) => {}
                _ = conn.as_mut() => return,
            }
            // A killed node ends its open connections too (dropping the connection closes
            // the socket, mid-request or idle), as a crashed process would: a keep-alive
            // client must not go on joining and leaving a node that is gone.
            if *phase.borrow() == Phase::Stopped {
                return;
            }
            // A stopping one lets the request in flight finish, then closes; an idle
            // connection closes now.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                biased;
                _ = phase.wait_for(|p| *p == Phase::Stopped) => {}
                _ = conn => {}
            }
        }
    };
    let stopped = async move {
        let _ = accepting.wait_for(|p| *p != Phase::Serving).await;
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

/// The key the router stores `raw`, a room as a request path has it, under; `None` if it is
/// no valid room id.
fn room_key(raw: &str, rooms: Normalization) -> Option<String> {
    RoomKey::from_encoded(raw, rooms)
        .ok()
        .map(|k| k.as_str().to_string())
}

fn handle(
    req: Request<Incoming>,
    state: &State,
    tickets: &TicketIssuer,
    node: &Node,
) -> Response<Full<Bytes>> {
    let id = node.id.as_str();
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
            // must not use the ticket for another room on the same node. The room is
            // compared as the router normalized the ticket's: under `none`, "Standup" is
            // another room than "standup".
            if room_key(room, node.rooms).as_deref() != Some(claims.room.as_str()) {
                state.refused.fetch_add(1, Ordering::Relaxed);
                return reply(
                    StatusCode::FORBIDDEN,
                    serde_json::json!({"error": "forbidden", "message": format!("ticket is for room {}", claims.room)}),
                );
            }
            let (n, fresh) = {
                let mut admitted = state.admitted.lock().unwrap_or_else(|p| p.into_inner());
                let fresh = admitted.insert(claims.jti.clone(), claims.exp).is_none();
                if fresh && admitted.len() > ADMITTED_PRUNE_AT {
                    // Those no longer verifying cannot come back: forget them.
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let leeway = tickets.leeway_secs();
                    admitted.retain(|_, exp| exp.saturating_add(leeway) >= now);
                }
                let mut rooms = state.rooms.lock().unwrap_or_else(|p| p.into_inner());
                let n = rooms.entry(claims.room.clone()).or_insert(0);
                if fresh {
                    *n += 1;
                }
                (*n, fresh)
            };
            if fresh {
                state.joins.fetch_add(1, Ordering::Relaxed);
            }
            reply(
                StatusCode::OK,
                serde_json::json!({"node": id, "room": claims.room, "user": claims.sub, "participants": n}),
            )
        }
        (&Method::POST, ["rooms" | "join", room, "leave"]) => {
            // The join counted the participant under the ticket's room, the path's room
            // normalized as the router does: the leave finds it under the same key.
            let mut rooms = state.rooms.lock().unwrap_or_else(|p| p.into_inner());
            let key = room_key(room, node.rooms);
            match key.as_ref().and_then(|k| Some((k, rooms.get_mut(k)?))) {
                Some((key, n)) => {
                    *n = n.saturating_sub(1);
                    let left = *n;
                    if left == 0 {
                        rooms.remove(key);
                    }
                    reply(
                        StatusCode::OK,
                        serde_json::json!({"room": key, "participants": left}),
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
    router: RouterClient,
    body_base: serde_json::Value,
    state: Arc<State>,
}

impl Heartbeater {
    fn new(
        cfg: &DemoNodeConfig,
        router: RouterClient,
        url: String,
        state: Arc<State>,
    ) -> Heartbeater {
        Heartbeater {
            router,
            body_base: serde_json::json!({
                "url": url,
                "capacity": cfg.capacity,
                "region": cfg.region,
                "tags": cfg.tags,
            }),
            state,
        }
    }

    /// Sends one heartbeat; applies evictions; returns the interval the router asks for. An
    /// error answer is a [`Refused`].
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
        // The router that answered last, then the others in turn: one that fails (no
        // connection, a timeout, a 5xx) must not leave the node unheard. A refusal that no
        // other router would change (a wrong token) ends the round.
        let (first, n) = (
            self.router.current.load(Ordering::Relaxed),
            self.router.nodes.len(),
        );
        let mut failed: Option<anyhow::Error> = None;
        let mut answered = None;
        for k in 0..n.max(1) {
            let i = (first + k) % n.max(1);
            let Some(node) = self.router.nodes.get(i) else {
                break;
            };
            let sent = self
                .router
                .client
                .post(format!("{node}/heartbeat"))
                .bearer_auth(&self.router.token)
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(resp) if resp.status().is_success() => {
                    self.router.current.store(i, Ordering::Relaxed);
                    answered = Some(resp);
                    break;
                }
                Ok(resp) => {
                    let refused = Refused::read(resp).await;
                    let permanent = refused.is_permanent();
                    failed = Some(refused.into());
                    if permanent {
                        break;
                    }
                }
                Err(e) => failed = Some(e.into()),
            }
            if k + 1 < n {
                let why = failed
                    .as_ref()
                    .map(|e| format!("{e:#}"))
                    .unwrap_or_default();
                tracing::warn!(router = %node, error = %why, "heartbeat failed; trying the next router");
            }
        }
        let Some(resp) = answered else {
            return Err(failed.unwrap_or_else(|| anyhow::anyhow!("no router to heartbeat to")));
        };
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

    async fn run(self, first: Duration, mut stop: watch::Receiver<Phase>) {
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

    /// A node whose router is not there: heartbeats (and a leave) fail fast, which is fine
    /// here.
    async fn node_without_router() -> DemoNode {
        let router = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        DemoNode::start(DemoNodeConfig {
            id: "media-1".into(),
            routers: vec![format!("http://{router}")],
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
        .unwrap()
    }

    /// An idle keep-alive connection (a pooled client's, the proxy's) is no request in
    /// flight: a stopping node closes it at once instead of waiting its grace out, and takes
    /// no new connection.
    #[tokio::test]
    async fn a_stopping_node_closes_idle_connections_without_waiting_out_its_grace() {
        let node = node_without_router().await;
        let addr = node.addr;
        let request = b"GET /status HTTP/1.1\r\nhost: node\r\n\r\n";
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(request).await.unwrap();
        let first = answer(&mut conn).await.expect("an answer before the stop");
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");

        let started = std::time::Instant::now();
        node.stop().await;
        assert!(
            started.elapsed() < STOP_GRACE,
            "the stop waited {:?} for an idle connection",
            started.elapsed()
        );
        let _ = conn.write_all(request).await;
        let after = answer(&mut conn).await;
        assert!(after.is_none(), "a stopped node still answered: {after:?}");
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }

    #[tokio::test]
    async fn a_killed_node_closes_its_open_keep_alive_connections() {
        let node = node_without_router().await;
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
