//! The open-loop engine: sends the schedule's joins at their planned times, follows the
//! redirects to the nodes, makes participants leave, adds or kills nodes, samples node
//! utilization, and collects everything into a [`LoadReport`].
//!
//! Open loop: every join has a planned send time and its latency is measured from that
//! time, so a slow router shows up as latency instead of as a lower send rate (no
//! coordinated omission). In-flight decisions are capped by the connection count; a join
//! waiting for a free connection is still timed from its planned time. Everything is
//! bounded: the schedule has at most `max_joins` entries, every request has a timeout,
//! participants leave only before the end of the run, and whatever is still running at
//! `duration + timeout + 1 s` is aborted. The joins that stop drops (not sent yet, or sent
//! and unanswered) are the most delayed of the run: they are counted as errors and the
//! report says its latency percentiles miss them.
//!
//! Redirect mode: a `3xx` with `Location` is a decision; following it is the join on the
//! node, and the participant later leaves at that node (`POST {node}/rooms/{room}/leave`,
//! `{node}` the node's URL, path included: the `Location` without the join's path and query).
//! Proxy mode: a `2xx` with `X-Room-Node` and no `Location` is the node's own answer to the
//! join the router carried there, so it is a decision and a join on that node at once. Its
//! participant leaves at the node directly when the harness knows the node's URL (from the
//! `GET /v1/nodes` of the router the join went through, which needs `--admin-token`), so that
//! the router does not see the leave; otherwise, or if that URL refuses the connection,
//! through the same router the way the join went (`POST {router}{--path}/leave`, proxied to
//! the room's node: the router counts it as a join of a new connection, so it adds to the
//! node's `pending` until its next heartbeat, and is refused at `join_limit`).
//!
//! Connections: a proxy-mode router takes a client connection for one participant (with
//! `proxy.one_join_per_connection`, its default, a connection's later requests for a room it
//! joined are that participant's session: not counted, not refused when the node is full).
//! So every request the harness sends to a proxy-mode router (each join, and each leave
//! through the router) goes on a connection of its own, closed after its answer, as
//! different users' requests would; a join that reused another participant's connection
//! would not be a join to the router. A redirect decision marks no connection, so joins to a
//! redirect-mode router share a keep-alive pool. The self-started cluster's mode is known; an
//! external router's is learned from its answers (a redirect: redirect mode; a proxied
//! `2xx`: proxy mode), and until one comes its joins go on connections of their own too (the
//! pool is empty at the start anyway).
//!
//! A join counts as answered once its whole answer is read within `--timeout` (as in
//! [`rate`](super::rate)): an answer whose body stalls past the timeout is a `timeout`, one
//! whose body fails or is over `ANSWER_MAX` (64 KiB) is the error [`BODY_FAILED`] or
//! [`BODY_TOO_LARGE`]. Only answers are timed (a refused connection fails in microseconds and
//! would pull the percentiles down), so a join with none, whatever its failure, is missing
//! from the latency figures, and the report says they are incomplete.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::pace::Pacer;
use super::report::{LoadReport, Percentiles, UtilSample, UtilSummary};
use super::split::SplitDetector;
use super::workload::{Join, WorkloadSpec};
use crate::capped;
use crate::config::FrontDoorMode;
use crate::demo::node::{DemoNode, DemoNodeConfig};

/// Largest answer read from a router or node for a join, a node join or a leave (they are
/// a few hundred bytes; the `error` code of a refusal is all the harness reads).
const ANSWER_MAX: usize = 64 * 1024;
/// Largest `GET /v1/nodes` answer read from an external router.
const NODES_MAX: usize = 8 * 1024 * 1024;
/// A proxy-mode leave for a node the directory does not know asks `GET /v1/nodes` again at
/// most this often.
const DIRECTORY_REFRESH: Duration = Duration::from_secs(1);
/// Error keys of the joins the hard stop dropped.
pub const NOT_SENT: &str = "not sent by the hard stop";
pub const NO_ANSWER: &str = "no answer by the hard stop";
/// Error key of a join with no whole answer (head and body) within `--timeout` (in both
/// modes).
pub const TIMEOUT: &str = "timeout";
/// Error key of a join whose answer's head came but whose body failed (the connection reset
/// or closed mid-body, say).
pub const BODY_FAILED: &str = "answer body failed";
/// Error key of a join whose answer's body was longer than `ANSWER_MAX` (64 KiB).
pub const BODY_TOO_LARGE: &str = "answer body too large";
/// Node error key of a leave the node answered `404` (it holds nobody of the room).
pub const LEAVE_404: &str = "leave 404";

/// The cluster the harness starts itself (router + demo nodes, in this process).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    pub nodes: usize,
    /// Capacity of each node; `None`: twice the steady participants, spread over the nodes.
    pub capacity: Option<f64>,
    /// Heartbeat interval (the timeout is three intervals).
    pub heartbeat: Duration,
    /// How the router sends joins on: a redirect the harness follows, or proxied to the
    /// node (the router's answer is the node's, and participants leave at the node).
    pub mode: FrontDoorMode,
    /// The router's active health probes (`health.probe_interval`; two failures mark a
    /// node), if any.
    pub probe: Option<Duration>,
    /// The router's `placement.new_room_reserve`; `None`: the workload's mean room size.
    pub new_room_reserve: Option<u32>,
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Router base URLs, used round-robin. Empty: start [`LoadConfig::cluster`].
    pub routers: Vec<String>,
    pub cluster: ClusterSpec,
    pub workload: WorkloadSpec,
    /// Most decisions in flight at once (and so connections to the routers), shared among
    /// the routers, at least one each: a router that stops answering holds only its share.
    pub connections: usize,
    pub timeout: Duration,
    /// Follow each redirect to the node (a real join), and leave after the stay (in proxy
    /// mode the router made the join already: only the leave).
    pub follow: bool,
    /// Send the session's size as `?size=`.
    pub size_hints: bool,
    /// Join path with one `{room}`, e.g. `/rooms/{room}`.
    pub path: String,
    /// Admin token for `/v1/nodes`: utilization of an external router's nodes, and where a
    /// proxy-mode participant leaves its node directly.
    pub admin_token: Option<String>,
    /// Self-started cluster: add a node at this run time.
    pub add_node_at: Option<Duration>,
    /// Self-started cluster: kill the first node at this run time.
    pub kill_node_at: Option<Duration>,
    pub sample_every: Duration,
    /// Print a progress line every second to stderr.
    pub progress: bool,
}

impl LoadConfig {
    /// The self-started router's `placement.new_room_reserve`: as given, else the
    /// workload's mean room size (rounded).
    pub fn own_new_room_reserve(&self) -> u32 {
        self.cluster
            .new_room_reserve
            .unwrap_or_else(|| self.workload.size.mean().round().max(1.0) as u32)
    }
}

/// A router and demo nodes started by the harness.
pub struct OwnCluster {
    pub url: String,
    pub admin_token: String,
    pub mode: FrontDoorMode,
    node_token: String,
    ticket_secret: String,
    ticket_leeway: Duration,
    heartbeat: Duration,
    capacity: f64,
    nodes: Arc<Mutex<Vec<(DemoNode, f64)>>>,
    next_id: usize,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl OwnCluster {
    /// Starts a router (memory store, as `spec` says) and `spec.nodes` demo nodes of
    /// `capacity` on loopback.
    pub async fn start(
        spec: &ClusterSpec,
        capacity: f64,
        new_room_reserve: u32,
    ) -> anyhow::Result<OwnCluster> {
        let (heartbeat, mode) = (spec.heartbeat, spec.mode);
        let mut cfg = crate::demo::demo_config("127.0.0.1:0".parse()?);
        cfg.front_door.mode = mode;
        if let Some(every) = spec.probe {
            cfg.health.probe_interval = every;
            cfg.health.probe_timeout = every;
        }
        cfg.placement.heartbeat_interval = heartbeat;
        cfg.placement.heartbeat_timeout = heartbeat * 3;
        cfg.placement.new_room_reserve = new_room_reserve;
        cfg.validate()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let admin_token = cfg.auth.admin_tokens[0].clone();
        let node_token = cfg.auth.node_token.clone();
        let (ticket_secret, ticket_leeway) = (cfg.tickets.secret.clone(), cfg.tickets.leeway);
        let app = crate::service::build(cfg, crate::store::MemoryStore::new());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(crate::service::run(app, listener, async {
            let _ = rx.await;
        }));
        let mut c = OwnCluster {
            url,
            admin_token,
            mode,
            node_token,
            ticket_secret,
            ticket_leeway,
            heartbeat,
            capacity,
            nodes: Arc::new(Mutex::new(Vec::new())),
            next_id: 1,
            stop: Some(tx),
            task,
        };
        for _ in 0..spec.nodes.max(1) {
            c.add_node().await?;
        }
        Ok(c)
    }

    /// Starts one more demo node; returns its id.
    pub async fn add_node(&mut self) -> anyhow::Result<String> {
        let id = format!("media-{}", self.next_id);
        self.next_id += 1;
        let node = DemoNode::start(DemoNodeConfig {
            id: id.clone(),
            routers: vec![self.url.clone()],
            listen: "127.0.0.1:0".parse()?,
            public_url: None,
            capacity: self.capacity,
            region: None,
            tags: vec![],
            node_token: self.node_token.clone(),
            ticket_secret: self.ticket_secret.clone(),
            ticket_leeway: self.ticket_leeway,
            heartbeat_interval: self.heartbeat,
        })
        .await
        .context("starting a demo node")?;
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((node, self.capacity));
        Ok(id)
    }

    /// Kills the oldest node (it stops answering and heartbeating at once); returns its
    /// [`node_key`] as the harness sees it in the router's answers (which name the node in
    /// either mode).
    pub fn kill_first(&mut self) -> Option<String> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if nodes.is_empty() {
            return None;
        }
        let (node, _) = nodes.remove(0);
        let key = node_key(Some(&node.id), Some(&node.url));
        node.kill();
        key
    }

    /// Stops the router and every node.
    pub async fn stop(mut self) {
        let nodes: Vec<(DemoNode, f64)> =
            std::mem::take(&mut *self.nodes.lock().unwrap_or_else(|p| p.into_inner()));
        for (n, _) in nodes {
            n.stop().await;
        }
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.task).await;
    }
}

fn util_sample(t_s: f64, loads: impl Iterator<Item = (f64, f64)>) -> Option<UtilSample> {
    let (mut n, mut max, mut sum, mut participants) = (0usize, 0.0f64, 0.0f64, 0.0f64);
    for (load, cap) in loads {
        if cap <= 0.0 {
            continue;
        }
        let u = load / cap;
        n += 1;
        max = max.max(u);
        sum += u;
        participants += load;
    }
    (n > 0).then(|| UtilSample {
        t_s,
        nodes: n,
        max,
        mean: sum / n as f64,
        participants: participants as u64,
    })
}

/// What request tasks tell the collector.
enum Event {
    Decided {
        room: u32,
        /// `Ok(status)` or `Err(transport failure)`.
        outcome: Result<u16, &'static str>,
        code: Option<String>,
        node: Option<String>,
        /// The answer is the node's own, carried by a proxy-mode router: the join happened.
        joined: bool,
        latency: Duration,
        service: Duration,
        at: Duration,
    },
    Joined {
        room: u32,
        node: String,
        at: Duration,
    },
    Left {
        room: u32,
        node: String,
        through_router: bool,
    },
    /// The node answered a leave `404`: it holds nobody of the room (the followed path was
    /// no join on the node, say), so whatever the harness counted there is not there.
    LeaveNotFound {
        room: u32,
        node: String,
    },
    /// A leave the node did not confirm (an error status, or no answer): `kind` as for
    /// [`Event::NodeError`]; the participant may or may not still be there.
    LeaveFailed {
        room: u32,
        node: String,
        kind: String,
    },
    NodeError(String),
    Killed(String, Duration),
    Added(String, Duration),
}

/// Counters the progress line reads.
#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    completed: AtomicU64,
    errors: AtomicU64,
    p99_us: AtomicU64,
}

/// What the harness knows of a router's front-door mode (see the module documentation).
const MODE_UNKNOWN: u8 = 0;
const MODE_REDIRECT: u8 = 1;
const MODE_PROXY: u8 = 2;

struct Ctx {
    /// Keep-alive connections, pooled: joins to a redirect-mode router, the nodes, and
    /// `GET /v1/nodes`.
    client: reqwest::Client,
    /// A connection of its own for each request, closed after its answer: joins to a
    /// proxy-mode router (or one whose mode is not known yet) and leaves through it, each a
    /// participant of its own to the router.
    fresh: reqwest::Client,
    routers: Vec<String>,
    /// Per router: its front-door mode as far as the harness knows (`MODE_*`).
    modes: Vec<AtomicU8>,
    /// Per router: its nodes' URLs, when an admin token lets the harness ask.
    directories: Vec<Option<NodeDirectory>>,
    rooms: Vec<String>,
    cfg: LoadConfig,
    start: Instant,
    end: Instant,
    events: mpsc::UnboundedSender<Event>,
    /// The [`node_key`]s of the nodes the harness killed: their participants went with them
    /// and send no leave.
    killed: Mutex<Vec<String>>,
}

impl Ctx {
    /// The client for a join through router `i`: the pool for a redirect-mode router, else
    /// a connection of the join's own (see the module documentation).
    fn join_client(&self, i: usize) -> &reqwest::Client {
        match self.modes[i % self.modes.len()].load(Ordering::Relaxed) {
            MODE_REDIRECT => &self.client,
            _ => &self.fresh,
        }
    }

    /// Router `i` answered a join the way a router in `mode` does: the first such answer
    /// settles what the harness knows of it (a router's mode does not change in a run).
    fn learn_mode(&self, i: usize, mode: u8) {
        let _ = self.modes[i % self.modes.len()].compare_exchange(
            MODE_UNKNOWN,
            mode,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn was_killed(&self, node: &str) -> bool {
        self.killed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|k| k == node)
    }

    /// Adds a node to the self-started cluster, or kills its oldest, and says so.
    async fn cluster_event(&self, c: &mut OwnCluster, add: bool) -> anyhow::Result<()> {
        let at = self.start.elapsed();
        let event = if add {
            Event::Added(c.add_node().await?, at)
        } else if let Some(key) = c.kill_first() {
            self.killed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(key.clone());
            Event::Killed(key, at)
        } else {
            return Ok(());
        };
        let _ = self.events.send(event);
        Ok(())
    }
}

/// Node id -> base URL: where a proxy-mode participant leaves its node directly.
enum NodeDirectory {
    /// An external router's nodes, from its `GET /v1/nodes`.
    Admin(AdminDirectory),
    /// The self-started cluster's nodes, as the harness started them.
    Own(Arc<Mutex<Vec<(DemoNode, f64)>>>),
}

impl NodeDirectory {
    async fn url_of(&self, client: &reqwest::Client, id: &str) -> Option<String> {
        match self {
            NodeDirectory::Admin(d) => d.url_of(client, id).await,
            NodeDirectory::Own(nodes) => nodes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|(n, _)| n.id == id)
                .map(|(n, _)| n.url.clone()),
        }
    }
}

/// Node id -> base URL from a router's `GET /v1/nodes`. Asked again (at most every
/// [`DIRECTORY_REFRESH`]) when a node it does not know shows up, as one added during the run
/// does.
struct AdminDirectory {
    router: String,
    token: String,
    known: Mutex<(HashMap<String, String>, Option<Instant>)>,
}

impl AdminDirectory {
    fn new(router: &str, token: &str) -> AdminDirectory {
        AdminDirectory {
            router: router.to_string(),
            token: token.to_string(),
            known: Mutex::new((HashMap::new(), None)),
        }
    }

    async fn url_of(&self, client: &reqwest::Client, id: &str) -> Option<String> {
        {
            let mut known = self.lock();
            if let Some(url) = known.0.get(id) {
                return Some(url.clone());
            }
            if known.1.is_some_and(|t| t.elapsed() < DIRECTORY_REFRESH) {
                return None;
            }
            known.1 = Some(Instant::now());
        }
        // Not held across the request: leaves of known nodes go on meanwhile, and those of
        // unknown ones go through the router (`None`) until the answer is in.
        let nodes = list_nodes(client, &self.router, &self.token).await;
        let mut known = self.lock();
        if let Some(nodes) = nodes {
            known.0 = nodes
                .iter()
                .filter_map(|n| {
                    Some((
                        n["id"].as_str()?.to_string(),
                        n["url"].as_str()?.to_string(),
                    ))
                })
                .map(|(id, url)| (id, url.trim_end_matches('/').to_string()))
                .collect();
        }
        known.0.get(id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, String>, Option<Instant>)> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Ctx {
    fn join_url(&self, i: usize, j: &Join) -> String {
        let mut url = format!(
            "{}{}",
            self.routers[i % self.routers.len()],
            self.cfg
                .path
                .replace("{room}", &encoded(&self.rooms[j.room as usize]))
        );
        if self.cfg.size_hints {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&format!("size={}", j.size));
        }
        url
    }

    /// The path part of the join of `room` (`--path` with the room, before any `?`): what
    /// the router puts after the node's URL in its redirect.
    fn join_path(&self, room: u32) -> String {
        let path = self.cfg.path.split('?').next().unwrap_or_default();
        path.replace("{room}", &encoded(&self.rooms[room as usize]))
    }

    /// A proxy-mode leave through router `i`: `--path` with `/leave` after its path part
    /// (`/rooms/{room}` -> `/rooms/{room}/leave`), so the router finds the room where it
    /// found the join's and carries the leave to the room's node.
    fn router_leave_url(&self, i: usize, room: u32) -> String {
        let enc = encoded(&self.rooms[room as usize]);
        let (path, query) = match self.cfg.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (self.cfg.path.as_str(), None),
        };
        let mut url = format!(
            "{}{}/leave",
            self.routers[i % self.routers.len()],
            path.replace("{room}", &enc)
        );
        if let Some(q) = query {
            url.push('?');
            url.push_str(&q.replace("{room}", &enc));
        }
        url
    }
}

fn encoded(room: &str) -> String {
    percent_encoding::utf8_percent_encode(room, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The URL of the node a redirect sent a join to, whose path part (`--path` with its room,
/// no query) was `join_path`. The router's `Location` is the node's registered `url`
/// followed by the join's path and query (`redirect_location`), so the node's URL is the
/// `Location` without its query and without `join_path` at the end of its path. A node
/// served under a path (`http://h:p/n1`, behind a reverse proxy that routes by path) keeps
/// it, and its participants leave where they joined (`/n1/rooms/{room}/leave`), not at the
/// host's `/rooms/{room}/leave`, which is no such node. A `Location` whose path does not end
/// with `join_path` (a router that rewrote the path) leaves only its origin,
/// `scheme://host:port`.
fn node_base(location: &str, join_path: &str) -> Option<String> {
    let origin = base_of(location)?;
    let path = url::Url::parse(location).ok()?.path().to_string();
    // The join's path as the URL parser writes it, as the `Location`'s is.
    let join_path = url::Url::parse(&format!("http://h/{}", join_path.trim_start_matches('/')))
        .ok()?
        .path()
        .to_string();
    Some(match path.strip_suffix(&join_path) {
        Some(prefix) => format!("{origin}{prefix}"),
        None => origin,
    })
}

/// `scheme://host:port` of a URL.
fn base_of(location: &str) -> Option<String> {
    let u = url::Url::parse(location).ok()?;
    let host = u.host_str()?;
    Some(match u.port() {
        Some(p) => format!("{}://{host}:{p}", u.scheme()),
        None => format!("{}://{host}", u.scheme()),
    })
}

/// How the detector names a node: its id from `X-Room-Node` when the answer names one, so a
/// redirect to a node (which also says where it is) and a proxied answer from it (which only
/// names it) are the same node, as they are to the routers (a node's id is its identity in
/// the cluster, its registered URL an attribute). Only without an id, the `host:port` of the
/// redirect's target. Independent clusters whose nodes share ids are therefore told apart
/// only by giving their nodes different ids.
pub fn node_key(id: Option<&str>, location: Option<&str>) -> Option<String> {
    if let Some(id) = id {
        return Some(id.to_string());
    }
    location
        .and_then(|l| url::Url::parse(l).ok())
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
}

/// The error key of a join whose answer's body could not be read (see [`TIMEOUT`],
/// [`BODY_FAILED`], [`BODY_TOO_LARGE`]).
fn body_failure(e: &capped::CappedError) -> &'static str {
    match e {
        capped::CappedError::Body(b) if b.is::<http_body_util::LengthLimitError>() => {
            BODY_TOO_LARGE
        }
        capped::CappedError::Body(b)
            if b.downcast_ref::<reqwest::Error>()
                .is_some_and(reqwest::Error::is_timeout) =>
        {
            TIMEOUT
        }
        _ => BODY_FAILED,
    }
}

fn transport_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        TIMEOUT
    } else if e.is_connect() {
        "connect"
    } else {
        "transport"
    }
}

/// `connections` shared over `routers` (joins go to them in turn): as evenly as they go,
/// at least one each.
fn slots_per_router(connections: usize, routers: usize) -> Vec<usize> {
    let routers = routers.max(1);
    (0..routers)
        .map(|r| (connections / routers + usize::from(r < connections % routers)).max(1))
        .collect()
}

async fn one_join(
    ctx: Arc<Ctx>,
    i: usize,
    join: Join,
    planned: Instant,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let url = ctx.join_url(i, &join);
    let sent = Instant::now();
    let resp = ctx.join_client(i).get(&url).send().await;
    // Latency counts from the planned time, or from the send if the timer woke early.
    let origin = planned.min(sent);
    let (outcome, code, node_id, location) = match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            let header = |n: &str| {
                r.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let node = header("x-room-node");
            let location = header("location");
            let ok = (200..400).contains(&status);
            // The answer is in once its body is: a body that stalls past the timeout, fails
            // or is too long is an error, not an answer (as in `rate`). The client's own
            // timeout covers the body too; this deadline does not depend on it.
            let body =
                tokio::time::timeout_at(sent + ctx.cfg.timeout, capped::bytes(r, ANSWER_MAX)).await;
            match body {
                Ok(Ok(body)) => {
                    let code = if ok {
                        None
                    } else {
                        serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| v["error"].as_str().map(str::to_string))
                    };
                    (Ok(status), code, node, location)
                }
                Ok(Err(e)) => (Err(body_failure(&e)), None, None, None),
                Err(_) => (Err(TIMEOUT), None, None, None),
            }
        }
        Err(e) => (Err(transport_kind(&e)), None, None, None),
    };
    let done = Instant::now();
    drop(permit);
    let ok = matches!(outcome, Ok(s) if (200..400).contains(&s));
    // Proxy mode: the router carried the join to the node and passes on the node's answer.
    let proxied = matches!(outcome, Ok(s) if (200..300).contains(&s))
        && location.is_none()
        && node_id.is_some();
    if proxied {
        ctx.learn_mode(i, MODE_PROXY);
    } else if matches!(outcome, Ok(s) if (300..400).contains(&s)) && location.is_some() {
        ctx.learn_mode(i, MODE_REDIRECT);
    }
    let node = node_key(node_id.as_deref(), location.as_deref());
    let _ = ctx.events.send(Event::Decided {
        room: join.room,
        outcome,
        code,
        node: node.clone(),
        joined: proxied,
        latency: done.saturating_duration_since(origin),
        service: done.saturating_duration_since(sent),
        at: done.saturating_duration_since(ctx.start),
    });
    if !(ok && ctx.cfg.follow) {
        return;
    }
    let Some(node) = node else {
        return;
    };
    let node_base = if proxied {
        None
    } else {
        let Some(location) = location else {
            return;
        };
        let Some(base) = node_base(&location, &ctx.join_path(join.room)) else {
            let _ = ctx
                .events
                .send(Event::NodeError("join: bad location".into()));
            return;
        };
        match ctx.client.get(&location).send().await {
            Ok(r) if r.status().is_success() => {
                let _ = capped::bytes(r, ANSWER_MAX).await;
                let _ = ctx.events.send(Event::Joined {
                    room: join.room,
                    node: node.clone(),
                    at: Instant::now().saturating_duration_since(ctx.start),
                });
            }
            Ok(r) => {
                let _ = ctx
                    .events
                    .send(Event::NodeError(format!("join {}", r.status().as_u16())));
                return;
            }
            Err(e) => {
                let _ = ctx
                    .events
                    .send(Event::NodeError(format!("join {}", transport_kind(&e))));
                return;
            }
        }
        Some(base)
    };
    let leave_at = planned + join.stay;
    if leave_at >= ctx.end {
        return;
    }
    tokio::time::sleep_until(leave_at).await;
    if ctx.was_killed(&node) {
        return;
    }
    leave(&ctx, i, join.room, node, node_id, node_base).await;
}

/// One participant of `room` leaves `node` (its [`node_key`]; `id` from `X-Room-Node`): at
/// `node_base` (the node's URL, from the redirect's target: [`node_base`]), or in proxy
/// mode (`None`) at the node's URL from the directory, else through router `i` (see the
/// module documentation).
async fn leave(
    ctx: &Ctx,
    i: usize,
    room: u32,
    node: String,
    id: Option<String>,
    node_base: Option<String>,
) {
    let proxied = node_base.is_none();
    let direct = match (node_base, &ctx.directories[i % ctx.directories.len()], id) {
        (Some(base), _, _) => Some(base),
        (None, Some(dir), Some(id)) => dir.url_of(&ctx.client, &id).await,
        _ => None,
    };
    // On a connection of its own, as the participant's join went: the router counts it as a
    // join (see the module documentation).
    let through_router = |ctx: &Ctx| ctx.fresh.post(ctx.router_leave_url(i, room)).send();
    let (mut resp, mut via_router) = match &direct {
        Some(base) => {
            let url = format!("{base}/rooms/{}/leave", encoded(&ctx.rooms[room as usize]));
            (ctx.client.post(url).send().await, false)
        }
        None => (through_router(ctx).await, true),
    };
    if proxied && !via_router && matches!(&resp, Err(e) if e.is_connect()) {
        if ctx.was_killed(&node) {
            // Killed as the leave went out: the participant went with the node.
            return;
        }
        // The router reaches the node; the harness does not (a private address, say).
        resp = through_router(ctx).await;
        via_router = true;
    }
    let event = match resp {
        Ok(r) if r.status().is_success() => {
            let _ = capped::bytes(r, ANSWER_MAX).await;
            Event::Left {
                room,
                node,
                through_router: via_router,
            }
        }
        Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
            let _ = capped::bytes(r, ANSWER_MAX).await;
            Event::LeaveNotFound { room, node }
        }
        Ok(r) => Event::LeaveFailed {
            room,
            node,
            kind: format!("leave {}", r.status().as_u16()),
        },
        Err(e) => Event::LeaveFailed {
            room,
            node,
            kind: format!("leave {}", transport_kind(&e)),
        },
    };
    let _ = ctx.events.send(event);
}

/// What the collector gathered.
struct Collected {
    /// Decisions that got an HTTP answer, from their planned time.
    latency: Histogram<u64>,
    /// The same, from their actual send.
    service: Histogram<u64>,
    /// Decisions that got an HTTP answer or a transport failure.
    completed: u64,
    /// Decisions that got an HTTP answer (any status).
    answered: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    node_errors: BTreeMap<String, u64>,
    node_joins: u64,
    leaves: u64,
    leaves_through_router: u64,
    /// Run time of the last HTTP answer to a decision.
    last_answer: Duration,
    detector: SplitDetector,
    events: Vec<String>,
}

/// Auto-resizing: `--duration` and `--timeout` take up to a day each, and a latency past a
/// fixed top (an hour, once) would be clamped to it without a word.
fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("valid histogram")
}

/// Records `d` in microseconds (at least 1), growing the histogram as needed.
fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record(d.as_micros().clamp(1, u64::MAX as u128) as u64);
}

async fn collect(
    mut rx: mpsc::UnboundedReceiver<Event>,
    rooms: Vec<String>,
    follow: bool,
    progress: Arc<Progress>,
) -> Collected {
    let mut c = Collected {
        latency: histogram(),
        service: histogram(),
        completed: 0,
        answered: 0,
        ok: 0,
        errors: BTreeMap::new(),
        node_errors: BTreeMap::new(),
        node_joins: 0,
        leaves: 0,
        leaves_through_router: 0,
        last_answer: Duration::ZERO,
        detector: SplitDetector::new(),
        events: Vec::new(),
    };
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Decided {
                room,
                outcome,
                code,
                node,
                joined,
                latency,
                service,
                at,
            } => {
                c.completed += 1;
                // Only answers are timed: a refused connection fails in microseconds and
                // would pull the percentiles down, a timeout is the timeout (as in `rate`).
                let outcome_answered = outcome.is_ok();
                if outcome_answered {
                    c.answered += 1;
                    c.last_answer = c.last_answer.max(at);
                    record(&mut c.latency, latency);
                    record(&mut c.service, service);
                }
                match outcome {
                    Ok(s) if (200..400).contains(&s) => {
                        c.ok += 1;
                        if let Some(node) = node {
                            let room = &rooms[room as usize];
                            // Without following, the decision is the participant; a proxied
                            // answer is a join on the node either way.
                            c.detector.decided(room, &node, at, !follow && !joined);
                            if joined {
                                c.node_joins += 1;
                                c.detector.joined(room, &node, at);
                            }
                        }
                    }
                    Ok(s) => {
                        let key = match code {
                            Some(code) => format!("{s} {code}"),
                            None => s.to_string(),
                        };
                        *c.errors.entry(key).or_default() += 1;
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(kind) => {
                        *c.errors.entry(kind.to_string()).or_default() += 1;
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                progress.completed.store(c.completed, Ordering::Relaxed);
                if outcome_answered && c.answered.is_multiple_of(256) {
                    progress
                        .p99_us
                        .store(c.latency.value_at_quantile(0.99), Ordering::Relaxed);
                }
            }
            Event::Joined { room, node, at } => {
                c.node_joins += 1;
                c.detector.joined(&rooms[room as usize], &node, at);
            }
            Event::Left {
                room,
                node,
                through_router,
            } => {
                c.leaves += 1;
                c.leaves_through_router += u64::from(through_router);
                c.detector.left(&rooms[room as usize], &node);
            }
            Event::LeaveNotFound { room, node } => {
                *c.node_errors.entry(LEAVE_404.into()).or_default() += 1;
                c.detector.left(&rooms[room as usize], &node);
            }
            Event::LeaveFailed { room, node, kind } => {
                *c.node_errors.entry(kind).or_default() += 1;
                c.detector.leave_failed(&rooms[room as usize], &node);
            }
            Event::NodeError(k) => *c.node_errors.entry(k).or_default() += 1,
            Event::Killed(node, at) => {
                c.detector.killed(&node);
                c.events
                    .push(format!("{:.3}s killed {node}", at.as_secs_f64()));
            }
            Event::Added(node, at) => {
                c.events
                    .push(format!("{:.3}s added {node}", at.as_secs_f64()));
            }
        }
    }
    c
}

/// The nodes of `GET /v1/nodes` on `router`.
async fn list_nodes(
    client: &reqwest::Client,
    router: &str,
    token: &str,
) -> Option<Vec<serde_json::Value>> {
    let resp = client
        .get(format!("{router}/v1/nodes"))
        .bearer_auth(token)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let mut v: serde_json::Value = capped::json(resp, NODES_MAX).await.ok()?;
    match v["nodes"].take() {
        serde_json::Value::Array(nodes) => Some(nodes),
        _ => None,
    }
}

/// Utilization of an external router's nodes from `GET /v1/nodes` (reported load).
async fn sample_external(
    client: &reqwest::Client,
    router: &str,
    token: &str,
    t_s: f64,
) -> Option<UtilSample> {
    let nodes = list_nodes(client, router, token).await?;
    util_sample(
        t_s,
        nodes
            .iter()
            .filter(|n| n["healthy"].as_bool() == Some(true))
            .map(|n| {
                (
                    n["load"].as_f64().unwrap_or(0.0),
                    n["capacity"].as_f64().unwrap_or(0.0),
                )
            }),
    )
}

/// The node capacity used when none is given: the steady participants (rate x mean stay)
/// twice over, spread over the nodes, so the mean utilization stays near one half.
pub fn auto_capacity(w: &WorkloadSpec, nodes: usize) -> f64 {
    let steady = w.rate * w.stay.mean().min(w.duration.as_secs_f64());
    let burst: f64 = w
        .bursts
        .iter()
        .map(|b| b.rooms as f64 * w.size.mean())
        .sum();
    ((2.0 * (steady + burst)) / nodes.max(1) as f64)
        .ceil()
        .max(20.0)
}

/// Moves ([`SplitDetector::moves_between`]) in the window of each cluster event of the run
/// (planned run times): from the event to the next one, the last one's to the end of
/// everything (late answers included), so a move is blamed on one event only: the latest
/// before it. Events at the same time: the kill's.
fn moves_after_events(
    d: &SplitDetector,
    add: Option<Duration>,
    kill: Option<Duration>,
) -> (Option<u64>, Option<u64>) {
    let window = |from: Duration, other: Option<Duration>| {
        let to = other.filter(|o| *o >= from).unwrap_or(Duration::MAX);
        d.moves_between(from, to)
    };
    (
        add.map(|a| window(a, kill)),
        kill.map(|k| window(k, add.filter(|a| *a > k))),
    )
}

/// Runs one load test.
pub async fn run(cfg: LoadConfig) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(cfg.connections > 0, "connections must be > 0");
    anyhow::ensure!(
        cfg.path.contains("{room}"),
        "--path needs a {{room}} placeholder"
    );
    let own = cfg.routers.is_empty();
    anyhow::ensure!(
        own || (cfg.add_node_at.is_none() && cfg.kill_node_at.is_none()),
        "--add-node-at and --kill-node-at need a cluster the harness starts (no --router)"
    );
    let schedule = cfg.workload.schedule();
    let mut cluster = if own {
        let cap = cfg
            .cluster
            .capacity
            .unwrap_or_else(|| auto_capacity(&cfg.workload, cfg.cluster.nodes));
        let reserve = cfg.own_new_room_reserve();
        eprintln!("self-started router: placement.new_room_reserve = {reserve}");
        Some(OwnCluster::start(&cfg.cluster, cap, reserve).await?)
    } else {
        None
    };
    let routers: Vec<String> = match &cluster {
        Some(c) => vec![c.url.clone()],
        None => cfg
            .routers
            .iter()
            .map(|r| r.trim_end_matches('/').to_string())
            .collect(),
    };
    let target = match &cluster {
        Some(c) => format!(
            "self-started {} router {} + {} demo nodes",
            match c.mode {
                FrontDoorMode::Redirect => "redirect-mode",
                FrontDoorMode::Proxy => "proxy-mode",
            },
            c.url,
            cfg.cluster.nodes
        ),
        None => routers.join(", "),
    };
    let client_with_pool = |max_idle: usize| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.timeout)
            .pool_max_idle_per_host(max_idle)
            .tcp_nodelay(true)
            .http1_only()
            .build()
    };
    let client = client_with_pool(cfg.connections)?;
    // No idle connection kept: each request on a connection of its own.
    let fresh = client_with_pool(0)?;
    let modes = routers
        .iter()
        .map(|_| {
            AtomicU8::new(match cluster.as_ref().map(|c| c.mode) {
                Some(FrontDoorMode::Redirect) => MODE_REDIRECT,
                Some(FrontDoorMode::Proxy) => MODE_PROXY,
                None => MODE_UNKNOWN,
            })
        })
        .collect();

    let (tx, rx) = mpsc::unbounded_channel();
    let progress = Arc::new(Progress::default());
    let collector = tokio::spawn(collect(
        rx,
        schedule.rooms.clone(),
        cfg.follow,
        progress.clone(),
    ));
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + cfg.workload.duration;
    let hard_end = end + cfg.timeout + Duration::from_secs(1);
    let directories = routers
        .iter()
        .map(|r| match (&cluster, &cfg.admin_token) {
            // A redirect says where the node is; a proxied answer only names it.
            (Some(c), _) if c.mode == FrontDoorMode::Proxy => {
                Some(NodeDirectory::Own(c.nodes.clone()))
            }
            (None, Some(token)) => Some(NodeDirectory::Admin(AdminDirectory::new(r, token))),
            _ => None,
        })
        .collect();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        fresh,
        routers: routers.clone(),
        modes,
        directories,
        rooms: schedule.rooms.clone(),
        cfg: cfg.clone(),
        start,
        end,
        events: tx.clone(),
        killed: Mutex::new(Vec::new()),
    });

    // Utilization sampler and progress line, until `stop` says so.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sampler = {
        let nodes = cluster.as_ref().map(|c| c.nodes.clone());
        let admin = cluster
            .as_ref()
            .map(|c| c.admin_token.clone())
            .or(cfg.admin_token.clone());
        let router = routers[0].clone();
        let client = client.clone();
        let every = cfg.sample_every.max(Duration::from_millis(50));
        // The run's own time only: afterwards participants whose stay outlasts it are still
        // counted on their nodes, and nobody joins to balance them.
        let until = cfg.workload.duration;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            let mut tick = tokio::time::interval_at(start, every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {},
                    _ = stop.changed() => break,
                }
                if start.elapsed() > until {
                    break;
                }
                let t_s = start.elapsed().as_secs_f64();
                let s = match (&nodes, &admin) {
                    (Some(nodes), _) => {
                        let nodes = nodes.lock().unwrap_or_else(|p| p.into_inner());
                        util_sample(t_s, nodes.iter().map(|(n, cap)| (n.load() as f64, *cap)))
                    }
                    (None, Some(token)) => sample_external(&client, &router, token, t_s).await,
                    (None, None) => break,
                };
                out.extend(s);
            }
            out
        })
    };
    let progress_task = cfg.progress.then(|| {
        let p = progress.clone();
        let total = schedule.joins.len();
        let dur = cfg.workload.duration.as_secs_f64();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {},
                    _ = stop.changed() => break,
                }
                let sent = p.sent.load(Ordering::Relaxed);
                let done = p.completed.load(Ordering::Relaxed);
                eprintln!(
                    "[{:>6.1}s/{dur:.0}s] sent {sent}/{total}  done {done}  errors {}  in flight {}  p99 {} µs",
                    start.elapsed().as_secs_f64(),
                    p.errors.load(Ordering::Relaxed),
                    sent.saturating_sub(done),
                    p.p99_us.load(Ordering::Relaxed),
                );
            }
        })
    });

    // Cluster events at their times (self-started cluster only).
    let mut cluster_events: Vec<(Duration, bool)> = Vec::new();
    if let Some(t) = cfg.add_node_at {
        cluster_events.push((t, true));
    }
    if let Some(t) = cfg.kill_node_at {
        cluster_events.push((t, false));
    }
    cluster_events.sort_by_key(|e| e.0);
    // In a task of their own: starting a node waits for its first heartbeat, and the joins
    // planned meanwhile must still leave on time (a dispatcher waiting on it would count the
    // wait as the router's latency).
    let events_task = {
        let ctx = ctx.clone();
        let mut cluster = cluster.take();
        tokio::spawn(async move {
            for (t, add) in cluster_events {
                if start + t >= end {
                    break;
                }
                tokio::time::sleep_until(start + t).await;
                if let Some(c) = cluster.as_mut() {
                    if let Err(e) = ctx.cluster_event(c, add).await {
                        return (cluster, Err(e));
                    }
                }
            }
            (cluster, Ok(()))
        })
    };

    // The dispatcher. Each router has its share of the connections (at least one): a router
    // that stops answering holds only its own until the joins time out, and the joins to the
    // others go on time. A join waits for its router's connection in a task of its own, so
    // the dispatcher never waits behind one (latency still counts from the planned time).
    let pools = slots_per_router(cfg.connections, ctx.routers.len());
    let sems: Vec<Arc<Semaphore>> = pools
        .into_iter()
        .map(|n| Arc::new(Semaphore::new(n)))
        .collect();
    let mut tasks = JoinSet::new();
    let pacer = Pacer::tokio();
    for (i, j) in schedule.joins.iter().enumerate() {
        let planned = start + j.at;
        if Instant::now() >= hard_end {
            break;
        }
        // Tokio's timer rounds deadlines up to the next millisecond; waking up to 1 ms early
        // keeps sends on schedule instead of systematically late (see `one_join`).
        pacer.until(planned).await;
        let (sem, ctx, progress, j) = (
            sems[i % sems.len()].clone(),
            ctx.clone(),
            progress.clone(),
            *j,
        );
        tasks.spawn(async move {
            let permit = tokio::select! {
                p = sem.acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                // Never sent: counted as such after the run.
                _ = tokio::time::sleep_until(hard_end) => return,
            };
            progress.sent.fetch_add(1, Ordering::Relaxed);
            one_join(ctx, i, j, planned, permit).await
        });
        while tasks.try_join_next().is_some() {}
    }
    // Events after the last join still happen (they are all before `end`), so the run sees
    // their effect on leaves.
    let (back, events) = events_task.await?;
    cluster = back;
    events?;
    let _ = tokio::time::timeout_at(hard_end, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let _ = stop_tx.send(true);
    let samples = sampler.await.unwrap_or_default();
    if let Some(p) = progress_task {
        let _ = p.await;
    }
    drop(ctx);
    drop(tx);
    let mut c = collector.await?;
    if let Some(own) = cluster.take() {
        own.stop().await;
    }

    // What the hard stop dropped: joins never sent, and joins sent but never answered (their
    // tasks aborted). Both are the run's most delayed joins, missing from the latency.
    let sent = progress.sent.load(Ordering::Relaxed);
    let not_sent = (schedule.joins.len() as u64).saturating_sub(sent);
    let aborted_at_stop = sent.saturating_sub(c.completed);
    for (key, n) in [(NOT_SENT, not_sent), (NO_ANSWER, aborted_at_stop)] {
        if n > 0 {
            *c.errors.entry(key.to_string()).or_default() += n;
        }
    }
    let timed_out = c.errors.get(TIMEOUT).copied().unwrap_or(0);
    let elapsed = c.last_answer.as_secs_f64().max(1e-9);
    let (moved_after_add, moved_after_kill) =
        moves_after_events(&c.detector, cfg.add_node_at, cfg.kill_node_at);
    let report = LoadReport {
        target,
        settings: serde_json::json!({
            "rate": cfg.workload.rate,
            "duration_s": cfg.workload.duration.as_secs_f64(),
            "max_requests": cfg.workload.max_joins,
            "connections": cfg.connections,
            "rooms": cfg.workload.rooms,
            "zipf_s": cfg.workload.zipf_s,
            "size": cfg.workload.size,
            "stay_s": cfg.workload.stay,
            "spread_s": cfg.workload.spread.as_secs_f64(),
            "bursts": cfg.workload.bursts,
            "seed": cfg.workload.seed,
            "follow": cfg.follow,
            "size_hints": cfg.size_hints,
            "path": cfg.path,
            "nodes": if own { Some(cfg.cluster.nodes) } else { None },
            "new_room_reserve": own.then(|| cfg.own_new_room_reserve()),
            "add_node_at_s": cfg.add_node_at.map(|d| d.as_secs_f64()),
            "kill_node_at_s": cfg.kill_node_at.map(|d| d.as_secs_f64()),
        }),
        scheduled: schedule.joins.len() as u64,
        completed: c.completed,
        answered: c.answered,
        ok: c.ok,
        not_sent,
        aborted_at_stop,
        timed_out,
        // Every join has a figure only if every one was answered: a failure took any time up
        // to the timeout, and a timeout or a join the hard stop dropped was the slowest.
        latency_complete: c.answered == schedule.joins.len() as u64,
        elapsed_s: elapsed,
        throughput_per_s: c.answered as f64 / elapsed,
        ok_per_s: c.ok as f64 / elapsed,
        latency_us: Percentiles::of(&c.latency),
        service_us: Percentiles::of(&c.service),
        errors: c.errors,
        node_joins: c.node_joins,
        leaves: c.leaves,
        leaves_through_router: c.leaves_through_router,
        node_errors: c.node_errors,
        rooms_seen: c.detector.rooms_seen(),
        split_rooms: c.detector.split_count(),
        possible_splits: c.detector.possible_split_count(),
        split_examples: c.detector.split_rooms(20),
        rooms_moved_after_add: moved_after_add,
        rooms_moved_after_kill: moved_after_kill,
        rooms_on_killed_node: cfg.kill_node_at.map(|_| c.detector.orphaned_count()),
        rooms_failed_over: cfg.kill_node_at.map(|_| c.detector.failed_over_count()),
        utilization: UtilSummary::of(samples),
        events: c.events,
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// A detector with room `r` on node a from 0 s, moved to b at each of `moves` (ms) and
    /// back to a at the next, alternately.
    fn moved_at(moves: &[u64]) -> SplitDetector {
        let mut d = SplitDetector::new();
        d.joined("r", "a", Duration::ZERO);
        for (k, t) in moves.iter().enumerate() {
            d.joined("r", ["b", "a"][k % 2], s(*t));
        }
        d
    }

    #[test]
    fn a_move_is_blamed_on_the_latest_cluster_event_before_it() {
        // Add at 1 s, kill at 2 s, the move at 3 s: the kill's, not the add's as well.
        let d = moved_at(&[3_000]);
        assert_eq!(
            moves_after_events(&d, Some(s(1_000)), Some(s(2_000))),
            (Some(0), Some(1))
        );
        // A move between the add and the kill is the add's only.
        let d = moved_at(&[1_500]);
        assert_eq!(
            moves_after_events(&d, Some(s(1_000)), Some(s(2_000))),
            (Some(1), Some(0))
        );
        // Kill first, add later: the add's window runs to the end.
        let d = moved_at(&[1_500, 2_500, 2_600]);
        assert_eq!(
            moves_after_events(&d, Some(s(2_000)), Some(s(1_000))),
            (Some(2), Some(1))
        );
        // A room that moves again after the add counts again; a single event gets everything
        // from its time on.
        let d = moved_at(&[500, 1_500, 2_500]);
        assert_eq!(
            moves_after_events(&d, Some(s(1_000)), None),
            (Some(2), None)
        );
        assert_eq!(
            moves_after_events(&d, None, Some(s(1_000))),
            (None, Some(2))
        );
    }

    fn run_collector(events: Vec<Event>, follow: bool) -> Collected {
        let (tx, rx) = mpsc::unbounded_channel();
        for e in events {
            tx.send(e).unwrap();
        }
        drop(tx);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(collect(
            rx,
            vec!["r".into(), "q".into()],
            follow,
            Arc::default(),
        ))
    }

    fn decided(room: u32, outcome: Result<u16, &'static str>, node: &str, joined: bool) -> Event {
        Event::Decided {
            room,
            outcome,
            code: None,
            node: Some(node.into()),
            joined,
            latency: s(2),
            service: s(1),
            at: s(10),
        }
    }

    #[test]
    fn a_leave_the_node_answers_404_takes_the_participant_off_the_detector() {
        // `--path "/status?room={room}"` with follow on: the node's 200 to the status page
        // looked like a join, and the leave finds nobody there.
        let c = run_collector(
            vec![
                decided(0, Ok(307), "a", false),
                Event::Joined {
                    room: 0,
                    node: "a".into(),
                    at: s(10),
                },
                Event::LeaveNotFound {
                    room: 0,
                    node: "a".into(),
                },
                // The room is empty as far as anyone can tell: coming back elsewhere is fine.
                decided(0, Ok(307), "b", false),
                Event::Joined {
                    room: 0,
                    node: "b".into(),
                    at: s(20),
                },
            ],
            true,
        );
        assert_eq!(c.detector.split_count(), 0);
        assert_eq!(c.node_errors.get(LEAVE_404), Some(&1));
        assert_eq!(c.leaves, 0);
    }

    #[test]
    fn a_failed_leave_is_a_node_error_and_makes_a_possible_split_not_a_split() {
        // The node may have taken the leave and lost the answer: its room then emptied, and
        // the router rightly placed it anew on b. Counted as a split, that was a false alarm
        // that failed the run.
        let c = run_collector(
            vec![
                decided(0, Ok(307), "a", false),
                Event::Joined {
                    room: 0,
                    node: "a".into(),
                    at: s(10),
                },
                Event::LeaveFailed {
                    room: 0,
                    node: "a".into(),
                    kind: "leave timeout".into(),
                },
                decided(0, Ok(307), "b", false),
                Event::Joined {
                    room: 0,
                    node: "b".into(),
                    at: s(20),
                },
            ],
            true,
        );
        assert_eq!(c.detector.split_count(), 0);
        assert_eq!(c.detector.possible_split_count(), 1);
        assert_eq!(c.node_errors.get("leave timeout"), Some(&1));
        assert_eq!(c.leaves, 0);
    }

    #[test]
    fn transport_failures_are_errors_not_latency() {
        let c = run_collector(
            vec![
                decided(0, Ok(307), "a", false),
                decided(1, Err("connect"), "a", false),
                decided(1, Ok(503), "a", false),
            ],
            false,
        );
        assert_eq!((c.completed, c.answered, c.ok), (3, 2, 1));
        assert_eq!(c.latency.len(), 2);
        assert_eq!(c.service.len(), 2);
        assert_eq!(c.errors.get("connect"), Some(&1));
        assert_eq!(c.errors.get("503"), Some(&1));
    }

    #[test]
    fn a_node_reached_by_a_redirect_and_by_a_proxied_join_is_one_node() {
        // One room, two routers of a cluster: one redirects to node A (the answer names A
        // and says where it is), the other carries the join to A (the answer only names it).
        let redirect =
            |id: &str| node_key(Some(id), Some("http://127.0.0.1:4001/rooms/r?ticket=t")).unwrap();
        let proxied = |id: &str| node_key(Some(id), None).unwrap();
        assert_eq!(redirect("A"), proxied("A"));
        for follow in [false, true] {
            let events = |second: &str| {
                let mut v = vec![decided(0, Ok(307), &redirect("A"), false)];
                if follow {
                    v.push(Event::Joined {
                        room: 0,
                        node: redirect("A"),
                        at: s(10),
                    });
                }
                v.push(decided(0, Ok(200), &proxied(second), true));
                v
            };
            let c = run_collector(events("A"), follow);
            assert_eq!(c.detector.split_count(), 0, "follow {follow}");
            assert_eq!(c.ok, 2);
            // Two different nodes for the room are still a split.
            let c = run_collector(events("B"), follow);
            assert_eq!(c.detector.split_count(), 1, "follow {follow}");
        }
        // Without an id, the redirect's target is all there is to tell nodes apart.
        assert_eq!(
            node_key(None, Some("http://127.0.0.1:4001/rooms/r")).as_deref(),
            Some("127.0.0.1:4001")
        );
        assert_eq!(node_key(None, None), None);
    }

    /// What `capped::bytes` says, within a client `timeout`, of the body of an answer whose
    /// head announces `length` bytes, of which a loopback server sends `sent` and then either
    /// holds the connection (up to 5 s) or closes it.
    async fn body_read(length: usize, sent: usize, hold: bool) -> &'static str {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut chunk = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
            }
            let mut answer =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n").into_bytes();
            answer.resize(answer.len() + sent, b'x');
            let _ = conn.write_all(&answer).await;
            if hold {
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk)).await;
            }
        });
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let r = client
            .get(format!("http://{addr}/"))
            .send()
            .await
            .expect("the head comes at once");
        let read = tokio::time::timeout(Duration::from_secs(5), capped::bytes(r, ANSWER_MAX))
            .await
            .expect("the client's timeout ends the read");
        server.abort();
        match read {
            Ok(_) => "read",
            Err(e) => body_failure(&e),
        }
    }

    #[tokio::test]
    async fn a_body_that_stalls_fails_or_is_too_long_has_its_own_error_key() {
        assert_eq!(body_read(10, 10, true).await, "read");
        assert_eq!(body_read(100, 10, true).await, TIMEOUT);
        assert_eq!(body_read(100, 10, false).await, BODY_FAILED);
        assert_eq!(
            body_read(ANSWER_MAX + 1, ANSWER_MAX + 1, true).await,
            BODY_TOO_LARGE
        );
    }

    #[test]
    fn a_latency_over_an_hour_is_recorded_not_clamped() {
        // `--duration` and `--timeout` take up to a day: a join planned early and answered
        // two hours later is two hours late.
        let two_hours = Duration::from_secs(7_200);
        let c = run_collector(
            vec![Event::Decided {
                room: 0,
                outcome: Ok(307),
                code: None,
                node: Some("a".into()),
                joined: false,
                latency: two_hours,
                service: two_hours,
                at: two_hours,
            }],
            false,
        );
        for h in [&c.latency, &c.service] {
            let max = Percentiles::of(h).max;
            assert!(
                (7_199_000_000..=7_210_000_000).contains(&max),
                "{max} µs, not 7 200 s"
            );
        }
    }

    /// A load config for `routers`: 20 joins/s for 1 s over 5 rooms, sessions of 2 arriving
    /// within 0.2 s, each participant staying 0.1 s (so all but the last few leave in the
    /// run).
    fn small_run(routers: Vec<String>) -> LoadConfig {
        LoadConfig {
            routers,
            cluster: ClusterSpec {
                nodes: 1,
                capacity: None,
                heartbeat: Duration::from_millis(500),
                mode: FrontDoorMode::Redirect,
                probe: None,
                new_room_reserve: None,
            },
            workload: WorkloadSpec {
                rate: 20.0,
                duration: Duration::from_secs(1),
                max_joins: 1_000,
                rooms: 5,
                zipf_s: 1.1,
                size: crate::load::Dist::Fixed { value: 2.0 },
                stay: crate::load::Dist::Fixed { value: 0.1 },
                spread: Duration::from_millis(200),
                bursts: vec![],
                seed: 1,
            },
            connections: 4,
            timeout: Duration::from_secs(2),
            follow: true,
            size_hints: false,
            path: "/rooms/{room}".into(),
            admin_token: None,
            add_node_at: None,
            kill_node_at: None,
            sample_every: Duration::from_secs(1),
            progress: false,
        }
    }

    async fn bounded(cfg: LoadConfig) -> LoadReport {
        tokio::time::timeout(Duration::from_secs(30), run(cfg))
            .await
            .expect("the run is bounded")
            .unwrap()
    }

    /// Serves `handle` on a loopback port (HTTP/1.1) until the returned task is aborted.
    async fn serve<F>(handle: F) -> (String, tokio::task::JoinHandle<()>)
    where
        F: Fn(http::Method, String) -> (u16, Vec<(&'static str, String)>)
            + Clone
            + Send
            + Sync
            + 'static,
    {
        use hyper::body::Incoming;
        use hyper_util::rt::TokioIo;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let handle = handle.clone();
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let (status, headers) = handle(req.method().clone(), req.uri().to_string());
                    async move {
                        let mut r = http::Response::builder().status(status);
                        for (k, v) in headers {
                            r = r.header(k, v);
                        }
                        Ok::<_, std::convert::Infallible>(
                            r.body(http_body_util::Full::new(bytes::Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (url, task)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_participant_leaves_a_node_served_under_a_path_where_it_joined() {
        // A node registered as `http://h:p/n1` (behind a reverse proxy that routes by path)
        // answers only under `/n1`: joins `GET /n1/rooms/{room}`, leaves `POST
        // /n1/rooms/{room}/leave` (404 for a room with nobody, as the demo node's).
        let participants: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let (node, node_task) = {
            let participants = participants.clone();
            serve(move |method, uri| {
                let path = uri.split('?').next().unwrap_or_default();
                let parts: Vec<&str> = path.split('/').collect();
                let mut rooms = participants.lock().unwrap();
                let status = match (method, parts.as_slice()) {
                    (http::Method::GET, ["", "n1", "rooms", room]) => {
                        *rooms.entry(room.to_string()).or_default() += 1;
                        200
                    }
                    (http::Method::POST, ["", "n1", "rooms", room, "leave"]) => {
                        match rooms.get_mut(*room).filter(|n| **n > 0) {
                            Some(n) => {
                                *n -= 1;
                                200
                            }
                            None => 404,
                        }
                    }
                    _ => 404,
                };
                (status, vec![])
            })
            .await
        };
        // A redirect-mode router's answer (`redirect_location`): the node's URL, the join's
        // path and query, a ticket.
        let node_url = format!("{node}/n1");
        let (router, router_task) = serve(move |_, uri| {
            let sep = if uri.contains('?') { '&' } else { '?' };
            let location = format!("{node_url}{uri}{sep}ticket=t");
            (
                307,
                vec![("location", location), ("x-room-node", "n1".into())],
            )
        })
        .await;
        let r = bounded(small_run(vec![router])).await;
        router_task.abort();
        node_task.abort();
        assert_eq!(r.node_joins, 20, "{}", r.table());
        assert!(r.node_errors.is_empty(), "{}", r.table());
        // The joins planned before 0.9 s leave within the run.
        assert_eq!(r.leaves, 18, "{}", r.table());
        let still_there: u32 = participants.lock().unwrap().values().sum();
        assert_eq!(u64::from(still_there), r.node_joins - r.leaves);
        assert_eq!(r.split_rooms, 0, "{}", r.table());
    }

    #[test]
    fn a_node_url_is_the_location_without_the_joins_path() {
        let base = |loc: &str, path: &str| node_base(loc, path).unwrap();
        assert_eq!(
            base("http://h:1/n1/rooms/r%2D1?ticket=t", "/rooms/r%2D1"),
            "http://h:1/n1"
        );
        assert_eq!(
            base("http://h:1/rooms/r?x=1&ticket=t", "/rooms/r"),
            "http://h:1"
        );
        // Another path than the join's: only the origin is known.
        assert_eq!(
            base("http://h:1/elsewhere?ticket=t", "/rooms/r"),
            "http://h:1"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn joins_that_fail_without_an_answer_leave_the_latency_incomplete() {
        // Nothing listens: every join is refused within microseconds. None is timed (that
        // would pull the percentiles down), so the figures miss every join, and say so.
        // Bound but not listening, and held to the end: connects are refused, and no other
        // test can be given the port meanwhile.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dead = socket.local_addr().unwrap();
        let mut cfg = small_run(vec![format!("http://{dead}")]);
        cfg.follow = false;
        let r = bounded(cfg).await;
        assert_eq!((r.completed, r.answered), (20, 0), "{}", r.table());
        assert_eq!(r.errors.get("connect"), Some(&20), "{}", r.table());
        assert_eq!((r.timed_out, r.not_sent, r.aborted_at_stop), (0, 0, 0));
        assert!(!r.latency_complete, "{}", r.table());
        assert!(
            r.table()
                .contains("20 joins have no figure (0 timed out, 20 failed"),
            "{}",
            r.table()
        );
    }

    #[test]
    fn a_proxied_answer_is_a_join_on_its_node() {
        // Proxy mode, following: the decision is no participant by itself, but the proxied
        // answer is the node's join, so a second node for the room is a split.
        let c = run_collector(
            vec![
                decided(0, Ok(200), "a", true),
                decided(0, Ok(200), "b", true),
            ],
            true,
        );
        assert_eq!(c.node_joins, 2);
        assert_eq!(c.detector.split_count(), 1);
    }
}
