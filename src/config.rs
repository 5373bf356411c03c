//! Typed configuration: parsed once from TOML into these structs, validated with errors that
//! name the offending key, then handed down by reference. No component reads the file or the
//! environment again. Secrets may come from the environment instead of the file, and then
//! win over it (`ROOMROUTER_NODE_TOKEN`, `ROOMROUTER_TICKET_SECRET`, `ROOMROUTER_JWT_SECRET`;
//! `ROOMROUTER_ADMIN_TOKEN` adds one admin token to the file's).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::placement::reservation::SizeSource;
use crate::placement::{ChoiceRule, Params};
use crate::room::Normalization;

/// Durations in the file: humantime strings (`"250ms"`, `"6s"`, `"8days"`) up to
/// [`duration::MAX`]. A longer one is refused as the file is read: added to the present
/// (`Instant::now() + d`, as timeouts are), a duration of centuries overflows, and the
/// first request to use it would panic.
pub mod duration {
    use std::time::Duration;

    use serde::de::Error;
    use serde::Deserializer;

    /// Ten years: far beyond any timeout or lifetime, far below an overflow.
    pub const MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v: Duration = humantime_serde::deserialize(d)?;
        bounded(v).map_err(D::Error::custom)
    }

    /// A command-line duration (`"60s"`), bounded as the file's are (a `demo-node
    /// --ticket-leeway` of a century overflowed the ticket check: a panic, or every ticket
    /// refused).
    pub fn parse_arg(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s)
            .map_err(|e| e.to_string())
            .and_then(bounded)
    }

    fn bounded(v: Duration) -> Result<Duration, String> {
        if v > MAX {
            return Err(format!(
                "{} is longer than a duration may be ({})",
                humantime::format_duration(v),
                humantime::format_duration(MAX)
            ));
        }
        Ok(v)
    }

    /// An optional duration, as [`deserialize`] reads one.
    pub mod option {
        use std::time::Duration;

        use serde::Deserializer;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub front_door: FrontDoorConfig,
    pub rooms: RoomsConfig,
    pub placement: PlacementConfig,
    pub store: StoreConfig,
    pub tickets: TicketConfig,
    pub auth: AuthConfig,
    pub logging: LoggingConfig,
    /// Proxy mode: how the front door talks to node upstreams.
    pub proxy: ProxyConfig,
    /// Active health checks: the router's own probes of its nodes.
    pub health: HealthConfig,
    /// TLS on the front door, the plain-HTTP redirect listener and the mTLS node listener.
    pub tls: TlsConfig,
    /// Nodes known before their first heartbeat. They become healthy on their first heartbeat.
    pub nodes: Vec<StaticNode>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP listener binds.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes (larger: 413 payload_too_large).
    pub max_body_bytes: usize,
    /// Largest request head (request line + headers), in bytes.
    pub max_header_bytes: usize,
    /// Time a client has to send the request head.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// An HTTP/2 connection with no open stream for this long is shut down gracefully
    /// (GOAWAY). HTTP/1.1's idle wait is `header_read_timeout`'s.
    #[serde(with = "duration")]
    pub h2_idle_timeout: Duration,
    /// Longest a write to a client may wait for the client to take bytes (a response, a
    /// proxied body, a WebSocket message); longer and the connection is closed.
    #[serde(with = "duration")]
    pub send_timeout: Duration,
    /// Time a client has to send the request body.
    #[serde(with = "duration")]
    pub body_read_timeout: Duration,
    /// How long shutdown waits for open connections to finish.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Most connections served at once; more wait in the accept queue.
    pub max_connections: usize,
    /// Runtime worker threads for `roomrouter serve`. Default: one per CPU core. Fewer
    /// leaves cores to what shares the machine (media processes, a load generator).
    pub worker_threads: Option<usize>,
    /// How those threads serve the listener: see [`RuntimeModel`].
    pub runtime: RuntimeModel,
    /// Serve front-door requests on HTTP/1.1 through the fast path (`http::h1`): heads
    /// parsed once, bodies relayed as bytes. Off: hyper serves every request.
    pub fast_path: bool,
    /// Let the kernel back the router's memory with transparent huge pages. Off (the
    /// default), `roomrouter serve` opts its process out (`prctl(PR_SET_THP_DISABLE)`, Linux):
    /// the allocator asks for huge pages, and the first touch of a 2 MiB page stalls the
    /// event loop that touched it while the kernel zeroes (on a VM, also backs) the page: a
    /// fresh router's p99 was 3-4x its steady one (BENCHMARKS.md section 1, twenty-fourth
    /// session). On: the system's THP setting applies.
    pub transparent_huge_pages: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            max_body_bytes: 256 * 1024,
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(5),
            h2_idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            max_connections: 10_000,
            worker_threads: None,
            runtime: RuntimeModel::default(),
            fast_path: true,
            transparent_huge_pages: false,
        }
    }
}

impl ServerConfig {
    /// The threads `serve` runs: `worker_threads`, else one per core.
    pub fn threads(&self) -> usize {
        self.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    /// How many event loops accept and serve the front door's connections: one per thread
    /// with `runtime = "per_thread"`, else one (the shared runtime's).
    pub fn event_loops(&self) -> usize {
        match self.runtime {
            RuntimeModel::PerThread => self.threads(),
            RuntimeModel::Shared => 1,
        }
    }
}

/// How `serve`'s threads share the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeModel {
    /// One multi-threaded Tokio runtime: its workers share one I/O driver and steal each
    /// other's tasks.
    Shared,
    /// One single-threaded runtime per thread (an event loop, `http::loops`), each serving
    /// the connections it is given start to end with upstream connections of its own (as
    /// HAProxy's and nginx's threads do): no task or socket wake-up crosses threads. Loop 0
    /// accepts and hands each connection to the loop with the fewest open.
    #[default]
    PerThread,
}

/// How user requests reach their node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FrontDoorMode {
    /// 307 to the node's URL with a signed ticket.
    #[default]
    Redirect,
    /// Forward the request (and any WebSocket upgrade) to the node's upstream.
    Proxy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FrontDoorConfig {
    pub mode: FrontDoorMode,
    /// Path patterns with exactly one `{room}` segment.
    pub routes: Vec<String>,
    /// Query parameter that names the room on any path not matched by `routes` (empty: off).
    pub room_query_param: String,
    /// Header that names the room on any path not matched by `routes` (empty: off).
    pub room_header: String,
    /// Cookie that names the room (empty: off).
    pub room_cookie: String,
    /// Where the room is looked for, in order; the first source that names one wins.
    pub room_sources: Vec<RoomSource>,
    /// Per-route mode overrides: a pattern from `routes` -> `redirect` or `proxy`.
    pub route_modes: BTreeMap<String, FrontDoorMode>,
}

/// A place a front-door request can name its room in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomSource {
    Path,
    Query,
    Header,
    Cookie,
}

impl Default for FrontDoorConfig {
    fn default() -> Self {
        FrontDoorConfig {
            mode: FrontDoorMode::Redirect,
            routes: vec!["/rooms/{room}".into(), "/join/{room}".into()],
            room_query_param: "room".into(),
            room_header: "x-room".into(),
            room_cookie: String::new(),
            room_sources: vec![
                RoomSource::Path,
                RoomSource::Query,
                RoomSource::Header,
                RoomSource::Cookie,
            ],
            route_modes: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// `none`, `lowercase` (default) or `nfkc_lowercase`.
    pub normalization: Normalization,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    /// `least_loaded` (default), `top_two` or `rendezvous`.
    pub rule: ChoiceRule,
    pub new_room_limit: f64,
    pub join_limit: f64,
    /// Load units each join adds to the node's `pending` until its next heartbeat.
    pub join_cost: f64,
    /// Prefer nodes in the hinted region.
    pub region_affinity: bool,
    /// Interval told to nodes in heartbeat replies.
    #[serde(with = "duration")]
    pub heartbeat_interval: Duration,
    /// A node is unhealthy after this long without a heartbeat.
    #[serde(with = "duration")]
    pub heartbeat_timeout: Duration,
    /// A pin not confirmed by a join or a node report for this long is released.
    #[serde(with = "duration")]
    pub room_idle_ttl: Duration,
    /// Expected size (load units) of a new room with no hint and no history.
    pub new_room_reserve: u32,
    /// How long a reservation of that guess (`new_room_reserve`) lasts. Shorter than
    /// `reservation_ttl`: a guess covers the seconds before node reports show where new rooms
    /// went, and kept longer it is phantom load on rooms smaller than the guess.
    #[serde(with = "duration")]
    pub new_room_reserve_ttl: Duration,
    /// Largest size hint accepted; larger hints are clamped.
    pub max_size_hint: u32,
    /// How long a reservation of a hinted or learned size lasts at most.
    #[serde(with = "duration")]
    pub reservation_ttl: Duration,
    /// How long a room's learned size is remembered after its last session.
    #[serde(with = "duration")]
    pub history_ttl: Duration,
    /// `Retry-After` on 503 node_full / no_capacity.
    #[serde(with = "duration")]
    pub retry_after: Duration,
    /// Remove a node that drains itself (heartbeat `state = "draining"`) once it reports no
    /// rooms, at the second such report a heartbeat interval after the first.
    pub auto_remove_drained: bool,
    /// A node that registered itself by heartbeat (not from the config file, not put by an
    /// admin: those are the admin's to take out) and has not reported for this long, to this
    /// router or through the shared store, leaves the node table as if it had left
    /// (`DELETE /v1/nodes/{id}`): a node that crashed under an id of its own (a Kubernetes
    /// pod's name) would otherwise stay listed, unhealthy, for good, with its metrics
    /// series. Its admin state (drain, disable) is kept for its return; it comes back with
    /// its next heartbeat. 0: never. At least `heartbeat_timeout`.
    #[serde(with = "duration")]
    pub forget_node_after: Duration,
    /// Several routers on one Redis: each tells the others, within milliseconds, how much it
    /// has reserved on each node for new rooms' expected sizes, so that a burst of new rooms
    /// spread over the routers is placed as one router would place it. Unset: on with
    /// `store.kind = "redis"` (the simulator's winner for several routers), off with the
    /// memory store (one router has no one to share with); `true` needs Redis. Read it
    /// through [`Config::shares_reservations`].
    pub share_reservations: Option<bool>,
    /// With a store of its own (memory), how long after it starts the router places no new
    /// room: it knows no pin, and a node hosting a live room reports it only at its next
    /// heartbeat; a join placed before that could land elsewhere (a split, then the live
    /// room evicted). Rooms the nodes report are adopted and joinable at once. Unset:
    /// `heartbeat_timeout`, after which a node not heard from is dead anyway; 0 turns it
    /// off. Not with Redis, which keeps the pins. Read it through [`Config::startup_hold`].
    #[serde(with = "duration::option")]
    pub startup_hold: Option<Duration>,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            rule: ChoiceRule::LeastLoaded,
            new_room_limit: 0.80,
            join_limit: 1.00,
            join_cost: 1.0,
            region_affinity: true,
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(6),
            room_idle_ttl: Duration::from_secs(600),
            new_room_reserve: 10,
            new_room_reserve_ttl: Duration::from_secs(60),
            max_size_hint: 10_000,
            reservation_ttl: Duration::from_secs(300),
            history_ttl: Duration::from_secs(8 * 24 * 3600),
            retry_after: Duration::from_secs(5),
            auto_remove_drained: true,
            forget_node_after: Duration::from_secs(24 * 3600),
            share_reservations: None,
            startup_hold: None,
        }
    }
}

impl PlacementConfig {
    /// How long a new room's reservation of an expected size from `source` lasts.
    pub fn reservation_ttl_ms(&self, source: SizeSource) -> u64 {
        source.ttl_ms(
            self.reservation_ttl.as_millis() as u64,
            self.new_room_reserve_ttl.as_millis() as u64,
        )
    }

    /// The pure engine's parameters.
    pub fn params(&self) -> Params {
        Params {
            new_room_limit: self.new_room_limit,
            join_limit: self.join_limit,
            heartbeat_timeout_ms: self.heartbeat_timeout.as_millis() as u64,
            region_affinity: self.region_affinity,
            rule: self.rule,
        }
    }
}

/// Where pins live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// In this process (default): one router.
    #[default]
    Memory,
    /// Shared through Redis: several routers (see the Redis issue).
    Redis,
}

/// `[store]`: where pins and the shared node table live. Every key but `kind` and
/// `learned_file` (memory only) concerns `kind = "redis"` only. `Debug` hides passwords in
/// the URLs.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Redis URL (`redis://[user:pass@]host:port[/db]`, or `rediss://` for TLS, see
    /// `tls_ca_file`). Default `redis://127.0.0.1:6379`. With `sentinels`, only its user, password
    /// and db are used (for the master the sentinels name; `rediss://` is refused there);
    /// its host and port are not.
    pub url: String,
    /// Redis Cluster seed nodes; when non-empty, `url` is ignored and cluster mode is used.
    pub cluster_nodes: Vec<String>,
    /// Redis Sentinel addresses (`redis://[user:pass@]host:port`, the sentinels' own
    /// credentials). When non-empty, the store asks them for the master named
    /// `sentinel_master` and asks again on every reconnection, so it follows a failover.
    /// Excludes `cluster_nodes`.
    pub sentinels: Vec<String>,
    /// The master's name as the sentinels monitor it (`sentinel monitor <name> ...`).
    /// Required with `sentinels`.
    pub sentinel_master: String,
    /// Prefix of every key and channel, so several deployments can share one Redis.
    /// Default `roomrouter`; no `{`, `}` or whitespace.
    pub key_prefix: String,
    /// Connections the router keeps to Redis (multiplexed; 1-64). Default 2.
    pub pool_size: usize,
    /// Time allowed to establish a connection. Default 1 s.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Time allowed for one command. A failed command is followed by a PING (within
    /// `connect_timeout`): only if that fails too is the store unreachable (degraded mode).
    /// Default 250 ms.
    #[serde(with = "duration")]
    pub command_timeout: Duration,
    /// Full re-read of the shared node table (in case a message was lost). Default 10 s.
    #[serde(with = "duration")]
    pub resync_interval: Duration,
    /// How long a Redis outage keeps healthy the nodes this router cannot hear from itself
    /// (they may report to other routers), unless the router probes its nodes
    /// (`health.probe_interval`), which then keeps them for the whole outage. Default 60 s.
    #[serde(with = "duration")]
    pub outage_node_hold: Duration,
    /// `rediss://` only: PEM file of the CA(s) that signed the Redis server's certificate.
    /// Unset: the system's trusted roots.
    pub tls_ca_file: Option<PathBuf>,
    /// `rediss://` only: PEM certificate and key the router presents to a Redis that asks
    /// for client certificates (`tls-auth-clients yes`). Both or neither.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Memory store only: a file where learned room sizes are kept across restarts
    /// (written every 10 s when they changed, and at shutdown). Unset: they live and die
    /// with the process. Redis keeps them itself.
    pub learned_file: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Memory,
            url: "redis://127.0.0.1:6379".into(),
            cluster_nodes: Vec::new(),
            sentinels: Vec::new(),
            sentinel_master: String::new(),
            key_prefix: "roomrouter".into(),
            pool_size: 2,
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_millis(250),
            resync_interval: Duration::from_secs(10),
            outage_node_hold: Duration::from_secs(60),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            learned_file: None,
        }
    }
}

impl StoreConfig {
    /// Whether the store speaks TLS to Redis (`rediss://` in `url` or `cluster_nodes`).
    pub fn uses_tls(&self) -> bool {
        let tls = |u: &String| u.starts_with("rediss://");
        if self.cluster_nodes.is_empty() {
            tls(&self.url)
        } else {
            self.cluster_nodes.iter().any(tls)
        }
    }

    /// The TLS keys: only with `rediss://`, all nodes alike, files readable, cert and key
    /// together; Sentinel is plain only.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let files = [
            ("store.tls_ca_file", &self.tls_ca_file),
            ("store.tls_cert_file", &self.tls_cert_file),
            ("store.tls_key_file", &self.tls_key_file),
        ];
        if !self.sentinels.is_empty() {
            if let Some(i) = self
                .sentinels
                .iter()
                .position(|u| u.starts_with("rediss://"))
            {
                return Err(invalid(
                    &format!("store.sentinels[{i}]"),
                    "rediss:// is not supported for sentinels (Sentinel is plain only)",
                ));
            }
            if self.url.starts_with("rediss://") {
                return Err(invalid(
                    "store.url",
                    "rediss:// is not supported with store.sentinels (Sentinel is plain only)",
                ));
            }
            if let Some((key, _)) = files.iter().find(|(_, f)| f.is_some()) {
                return Err(invalid(key, "is not supported with store.sentinels"));
            }
            return Ok(());
        }
        let tls = self.uses_tls();
        if tls
            && self
                .cluster_nodes
                .iter()
                .any(|u| !u.starts_with("rediss://"))
        {
            return Err(invalid(
                "store.cluster_nodes",
                "mixes redis:// and rediss://: every node is TLS or none is",
            ));
        }
        for (key, file) in files {
            let Some(path) = file else { continue };
            if !tls {
                return Err(invalid(key, "needs a rediss:// URL (TLS to Redis)"));
            }
            std::fs::metadata(path)
                .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                "store.tls_cert_file",
                "store.tls_cert_file and store.tls_key_file go together",
            ));
        }
        // Parsed as the other TLS keys are: a file that is no PEM certificate passed here and
        // failed only at the handshake, in words that named neither key nor file.
        if let Some(ca) = &self.tls_ca_file {
            crate::http::tls::load_roots(ca).map_err(|m| invalid("store.tls_ca_file", m))?;
        }
        if let (Some(c), Some(k)) = (&self.tls_cert_file, &self.tls_key_file) {
            crate::http::tls::load_certified_key(c, k)
                .map_err(|m| invalid("store.tls_cert_file", m))?;
        }
        Ok(())
    }

    /// The Sentinel keys: both or neither, not with Cluster, every address a Redis URL.
    fn validate_sentinel(&self) -> Result<(), ConfigError> {
        if self.sentinels.is_empty() {
            if !self.sentinel_master.is_empty() {
                return Err(invalid(
                    "store.sentinels",
                    "must list at least one sentinel when store.sentinel_master is set",
                ));
            }
            return Ok(());
        }
        if !self.cluster_nodes.is_empty() {
            return Err(invalid(
                "store.sentinels",
                "cannot be combined with store.cluster_nodes: use Sentinel or Cluster, not both",
            ));
        }
        if self.sentinel_master.is_empty()
            || self
                .sentinel_master
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "store.sentinel_master",
                "must name the master the sentinels monitor (`sentinel monitor <name> ...`), without whitespace",
            ));
        }
        for (i, s) in self.sentinels.iter().enumerate() {
            let key = format!("store.sentinels[{i}]");
            check_redis_url(&key, s)?;
        }
        Ok(())
    }
}

/// Checks one Redis address: `redis://host[:port][/db]` or `rediss://` (TLS).
fn check_redis_url(key: &str, s: &str) -> Result<(), ConfigError> {
    let u = s
        .parse::<url::Url>()
        .map_err(|e| invalid(key, format!("not a redis:// URL: {e}")))?;
    if !matches!(u.scheme(), "redis" | "rediss") || u.host_str().is_none_or(str::is_empty) {
        return Err(invalid(key, "not a redis://host:port (or rediss://) URL"));
    }
    Ok(())
}

/// A Redis URL with its password replaced, for logs and `Debug`.
pub fn redact_url(s: &str) -> String {
    match s.parse::<url::Url>() {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        Ok(_) => s.to_string(),
        Err(_) => REDACTED.to_string(),
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls = |v: &[String]| v.iter().map(|u| redact_url(u)).collect::<Vec<_>>();
        f.debug_struct("StoreConfig")
            .field("kind", &self.kind)
            .field("learned_file", &self.learned_file)
            .field("url", &redact_url(&self.url))
            .field("cluster_nodes", &urls(&self.cluster_nodes))
            .field("sentinels", &urls(&self.sentinels))
            .field("sentinel_master", &self.sentinel_master)
            .field("key_prefix", &self.key_prefix)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("resync_interval", &self.resync_interval)
            .field("outage_node_hold", &self.outage_node_hold)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TicketConfig {
    /// HS256 secret shared with the nodes (or `ROOMROUTER_TICKET_SECRET`).
    pub secret: String,
    /// Ticket lifetime.
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// Query parameter the ticket is added as on redirects.
    pub query_param: String,
    /// Path on a node where a room is joined, for `/v1/login` answers (`{room}` is replaced).
    pub node_path: String,
    /// The clock skew nodes forgive past a ticket's `exp` when they verify it: an ended
    /// room keeps its pin until no ticket issued for it can be accepted any more.
    #[serde(with = "duration")]
    pub leeway: Duration,
}

impl Default for TicketConfig {
    fn default() -> Self {
        TicketConfig {
            secret: String::new(),
            ttl: Duration::from_secs(60),
            query_param: "ticket".into(),
            node_path: "/rooms/{room}".into(),
            leeway: crate::auth::ticket::DEFAULT_LEEWAY,
        }
    }
}

/// How users authenticate at the front door and `/v1/login`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UserAuth {
    #[default]
    None,
    /// Bearer JWTs verified with `auth.jwt`.
    Jwt,
}

#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Bearer tokens accepted for admin endpoints (or `ROOMROUTER_ADMIN_TOKEN`).
    pub admin_tokens: Vec<String>,
    /// One bearer token every node may use (or `ROOMROUTER_NODE_TOKEN`).
    pub node_token: String,
    /// Per-node bearer tokens: a node listed here must use its own token.
    pub node_tokens: BTreeMap<String, String>,
    pub users: UserAuth,
    /// How user JWTs are verified when `users = "jwt"`.
    pub jwt: JwtConfig,
}

// ---- proxy mode, TLS and user JWTs (issue 3) ----

/// JWT signature algorithms accepted for user tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum JwtAlgorithm {
    #[default]
    HS256,
    RS256,
    ES256,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret (or `ROOMROUTER_JWT_SECRET`).
    pub secret: String,
    /// RS256/ES256 public key, PEM.
    pub public_key_file: Option<PathBuf>,
    /// Clock-skew leeway for `exp`.
    #[serde(with = "duration")]
    pub leeway: Duration,
    /// Query parameter a token may come in when no `Authorization` header can be set
    /// (browser WebSockets); empty: header only.
    pub query_param: String,
    /// Accepted `aud` values; a token must name one of them. Empty: `aud` is not checked.
    /// With an identity provider shared by other services, its tokens for those services
    /// are signed with the same key: this is what tells the router's from theirs.
    pub audience: Vec<String>,
    /// Accepted `iss` values; a token must carry one of them. Empty: not checked.
    pub issuer: Vec<String>,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            algorithm: JwtAlgorithm::HS256,
            secret: String::new(),
            public_key_file: None,
            leeway: Duration::from_secs(30),
            query_param: "access_token".into(),
            audience: vec![],
            issuer: vec![],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Time to open a TCP (and TLS) connection to an upstream.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Time for an upstream to answer with a response head.
    #[serde(with = "duration")]
    pub response_timeout: Duration,
    /// A body (either direction) or WebSocket idle for this long is cut.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Largest request body forwarded, in bytes (larger: 413).
    pub max_request_body_bytes: u64,
    /// Consecutive failures after which a node is marked unhealthy until its next heartbeat.
    pub failures_to_unhealthy: u32,
    /// Idle upstream connections kept per node by each event loop, in each of its pools (the
    /// fast path's and the lanes'), and by the upgrades' shared pool. A connection over this
    /// many is closed when
    /// its exchange ends, and the next burst opens a new one: keep it above the proxied
    /// requests a node has in flight at once (HAProxy keeps every idle server connection by
    /// default, hyper's client too).
    pub pool_max_idle_per_host: usize,
    #[serde(with = "duration")]
    pub pool_idle_timeout: Duration,
    /// CA bundle (PEM) trusted for `https://` upstreams.
    pub ca_file: Option<PathBuf>,
    /// A client connection is one participant: only its first request for a room is a
    /// join (counted, refused at `join_limit`), its later ones that participant's session.
    /// Off when an HTTP proxy in front of the router carries many users' requests over
    /// each of its connections: then every proxied request is a join.
    pub one_join_per_connection: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            max_request_body_bytes: 64 * 1024 * 1024,
            failures_to_unhealthy: 3,
            pool_max_idle_per_host: 256,
            pool_idle_timeout: Duration::from_secs(60),
            ca_file: None,
            one_join_per_connection: true,
        }
    }
}

/// Active health checks. A node that crashes stops heartbeating, and the router sees it only
/// after `placement.heartbeat_timeout`; in redirect mode every user sent to it until then
/// finds nothing there. With probes on, the router also opens a TCP connection to each
/// healthy node's upstream every `probe_interval`, and a node that refuses or ignores
/// `failures` of them in a row is unhealthy until its next heartbeat (as proxy mode's
/// passive check does). Off by default: the upstream must be reachable from the router.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often each healthy node is probed; `0s`: never.
    #[serde(with = "duration")]
    pub probe_interval: Duration,
    /// Time a probe's connection has to open.
    #[serde(with = "duration")]
    pub probe_timeout: Duration,
    /// Failed probes in a row that mark a node unhealthy.
    pub failures: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            probe_interval: Duration::ZERO,
            probe_timeout: Duration::from_secs(1),
            failures: 2,
        }
    }
}

impl HealthConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.probe_interval.is_zero() {
            return Ok(());
        }
        if self.probe_interval < Duration::from_millis(100) {
            return Err(invalid(
                "health.probe_interval",
                "must be 0s (off) or at least 100ms",
            ));
        }
        if self.probe_timeout.is_zero() || self.probe_timeout > self.probe_interval {
            return Err(invalid(
                "health.probe_timeout",
                "must be > 0 and at most health.probe_interval",
            ));
        }
        if !(1..=100).contains(&self.failures) {
            return Err(invalid("health.failures", "must be 1-100"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificate chain (PEM); with `key_file`, `server.listen` speaks HTTPS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// How often the files are checked for changes (SIGHUP reloads at once).
    #[serde(with = "duration")]
    pub reload_interval: Duration,
    /// Plain-HTTP listener that answers every request with a redirect to HTTPS.
    pub redirect_listen: Option<SocketAddr>,
    /// Listener for nodes and admins that requires a client certificate from `client_ca_file`.
    pub node_listen: Option<SocketAddr>,
    pub client_ca_file: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            reload_interval: Duration::from_secs(10),
            redirect_listen: None,
            node_listen: None,
            client_ca_file: None,
        }
    }
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(invalid(
                "tls.key_file",
                "tls.cert_file and tls.key_file go together",
            ));
        }
        if let (Some(c), Some(k)) = (&self.cert_file, &self.key_file) {
            crate::http::tls::load_certified_key(c, k).map_err(|m| invalid("tls.cert_file", m))?;
        }
        if self.reload_interval.is_zero() {
            return Err(invalid("tls.reload_interval", "must be > 0"));
        }
        if self.redirect_listen.is_some() && !self.enabled() {
            return Err(invalid(
                "tls.redirect_listen",
                "needs tls.cert_file and tls.key_file",
            ));
        }
        if self.node_listen.is_some() {
            if !self.enabled() {
                return Err(invalid(
                    "tls.node_listen",
                    "needs tls.cert_file and tls.key_file",
                ));
            }
            let ca = self
                .client_ca_file
                .as_ref()
                .ok_or_else(|| invalid("tls.client_ca_file", "required with tls.node_listen"))?;
            crate::http::tls::load_roots(ca).map_err(|m| invalid("tls.client_ca_file", m))?;
        } else if self.client_ca_file.is_some() {
            // Only the node listener checks client certificates: set alone, it would turn
            // on nothing an operator could see.
            return Err(invalid(
                "tls.client_ca_file",
                "needs tls.node_listen (the listener that checks nodes' client certificates)",
            ));
        }
        Ok(())
    }
}

impl ProxyConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (k, v) in [
            ("proxy.connect_timeout", self.connect_timeout),
            ("proxy.response_timeout", self.response_timeout),
            ("proxy.idle_timeout", self.idle_timeout),
            // Zero would keep no idle connection at all (reuse needs an idle time under
            // it): every proxied request a new connection, silently.
            ("proxy.pool_idle_timeout", self.pool_idle_timeout),
        ] {
            if v.is_zero() {
                return Err(invalid(k, "must be > 0"));
            }
        }
        if self.failures_to_unhealthy == 0 {
            return Err(invalid("proxy.failures_to_unhealthy", "must be > 0"));
        }
        if let Some(ca) = &self.ca_file {
            crate::http::tls::load_roots(ca).map_err(|m| invalid("proxy.ca_file", m))?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("algorithm", &self.algorithm)
            .field("secret", &REDACTED)
            .field("public_key_file", &self.public_key_file)
            .field("leeway", &self.leeway)
            .field("query_param", &self.query_param)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl JwtConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, values) in [
            ("auth.jwt.audience", &self.audience),
            ("auth.jwt.issuer", &self.issuer),
        ] {
            if values.iter().any(|v| v.is_empty()) {
                return Err(invalid(key, "an empty value matches no token"));
            }
        }
        // JWT times are whole seconds; "500ms" would silently become no leeway at all.
        if self.leeway.subsec_nanos() != 0 {
            return Err(invalid(
                "auth.jwt.leeway",
                "must be whole seconds (JWT times are seconds)",
            ));
        }
        crate::auth::users::UserVerifier::from_config(self)
            .map(|_| ())
            .map_err(|m| invalid("auth.jwt", m))
    }
}

// ---- end of issue 3 block ----

/// Secrets never reach a log line, even through `{:?}`.
const REDACTED: &str = "<redacted>";

impl std::fmt::Debug for TicketConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketConfig")
            .field("secret", &REDACTED)
            .field("ttl", &self.ttl)
            .field("query_param", &self.query_param)
            .field("node_path", &self.node_path)
            .field("leeway", &self.leeway)
            .finish()
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "admin_tokens",
                &format_args!("[{} redacted]", self.admin_tokens.len()),
            )
            .field("node_token", &REDACTED)
            .field("node_tokens", &self.node_tokens.keys().collect::<Vec<_>>())
            .field("users", &self.users)
            .field("jwt", &self.jwt)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `roomrouter=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl LoggingConfig {
    /// Every directive of `level` must parse, and one without a target must be a level:
    /// `tracing` reads a bare word as a target name, so `level = "warning"` would log only
    /// events of a target called `warning` (nothing of ours, errors included).
    fn validate(&self) -> Result<(), ConfigError> {
        crate::telemetry::check_filter(&self.level).map_err(|m| invalid("logging.level", m))
    }
}

/// A node declared in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticNode {
    pub id: String,
    pub url: String,
    #[serde(default)]
    pub upstream: Option<String>,
    pub capacity: f64,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A configuration problem, naming the key. The message says it all: the underlying error
/// is part of it and not also given as the error's source, or a printed chain would say it
/// twice.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    /// Where the TOML went wrong and why, without the file's text: the line may hold a
    /// secret (`toml`'s own message quotes it, and serde's names the value it refused).
    #[error("{path}: line {line}, column {column}{key}: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        /// ` (table.key)` when the line assigns a key, else empty.
        key: String,
        message: String,
    },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

/// Whether `key` is a whole TOML key: dotted parts, each bare (`A-Za-z0-9_-`) or quoted
/// from end to end.
fn is_toml_key(key: &str) -> bool {
    let part_ok = |p: &str| {
        let p = p.trim();
        let quoted = p.len() >= 2
            && (p.starts_with('"') && p.ends_with('"') || p.starts_with('\'') && p.ends_with('\''));
        quoted
            || !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    !key.is_empty() && key.split('.').all(part_ok)
}

/// ` (table.key)` for the key the line starting at `line_start` assigns, under the last
/// `[table]` header before it: keys are never secret, the values after `=` may be.
///
/// Only a line that reads as an assignment counts: a whole key (bare, dotted, or quoted
/// from end to end) and, after the `=`, the start of a value. A line that continues a
/// multi-line array of tokens (`"c2VjcmV0...=",`) holds an `=` too, and what comes before
/// it there is a secret.
fn key_at(text: &str, line_start: usize) -> Option<String> {
    let line = text[line_start..].lines().next()?;
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    if !is_toml_key(key) {
        return None;
    }
    let starts_value =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '"' | '\'' | '[' | '{' | '-' | '+');
    if !value.trim_start().starts_with(starts_value) {
        return None;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|h| h.trim_matches(['[', ']']).trim());
    Some(match table {
        Some(t) => format!(" ({t}.{key})"),
        None => format!(" ({key})"),
    })
}

/// serde's "invalid type: string \"…\", expected …" (and "invalid value: …") quote the
/// value they refused, which may be a secret typed in the wrong form (`admin_tokens = "…"`
/// for a list): keep the kind of value, drop the value.
fn without_value(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let end = rest.find(", expected").unwrap_or(rest.len());
            let what = &rest[..end];
            let kind = what.split(['"', '`']).next().unwrap_or(what).trim_end();
            return format!("{prefix}{kind}{}", &rest[end..]);
        }
    }
    message.to_string()
}

impl Config {
    /// The query parameters the router reads or writes by name (`tickets.query_param`,
    /// `auth.jwt.query_param`, `front_door.room_query_param`): each goes into URLs and is
    /// looked for in them as it is, so it must be a plain token (`A-Za-z0-9-._~`, at most
    /// 64), and no two may be the same (the ticket would be read as the login token, the
    /// room as either). The last two may be empty (not read from the query).
    fn check_query_params(&self) -> Result<(), ConfigError> {
        let named = [
            ("tickets.query_param", &self.tickets.query_param),
            ("auth.jwt.query_param", &self.auth.jwt.query_param),
            (
                "front_door.room_query_param",
                &self.front_door.room_query_param,
            ),
        ];
        for (i, (key, v)) in named.iter().enumerate() {
            if v.is_empty() {
                continue;
            }
            let plain = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
            if v.len() > 64 || !v.bytes().all(plain) {
                return Err(invalid(
                    key,
                    "must be 1-64 of A-Za-z0-9-._~ (it goes into URLs as it is)",
                ));
            }
            if let Some((other, _)) = named[..i].iter().find(|(_, o)| o == v) {
                return Err(invalid(key, format!("must differ from {other} ({v:?})")));
            }
        }
        Ok(())
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

impl Config {
    /// Reads, parses and validates a file; secrets from the environment override the file's
    /// (`ROOMROUTER_ADMIN_TOKEN` adds an admin token to the file's).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.display().to_string(),
            cause,
        })?;
        let mut cfg = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse {
                line,
                column,
                key,
                message,
                ..
            } => ConfigError::Parse {
                path: path.display().to_string(),
                line,
                column,
                key,
                message,
            },
            other => other,
        })?;
        cfg.apply_env(|k| std::env::var(k).ok());
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether this router tells the others its reservations and counts theirs
    /// (`placement.share_reservations`; unset: with Redis, yes).
    pub fn shares_reservations(&self) -> bool {
        self.placement
            .share_reservations
            .unwrap_or(self.store.kind == StoreKind::Redis)
    }

    /// How long after it starts the router places no new room
    /// (`placement.startup_hold`; unset: `heartbeat_timeout`; never with Redis).
    pub fn startup_hold(&self) -> Duration {
        if self.store.kind == StoreKind::Redis {
            return Duration::ZERO;
        }
        self.placement
            .startup_hold
            .unwrap_or(self.placement.heartbeat_timeout)
    }

    /// Parses TOML text (no environment, no validation).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start.min(text.len()));
            let before = &text.as_bytes()[..at];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            ConfigError::Parse {
                path: "config".into(),
                line,
                column: at - line_start + 1,
                key: key_at(text, line_start).unwrap_or_default(),
                message: without_value(e.message().trim_end()),
            }
        })
    }

    /// Fills secrets from the environment: `ROOMROUTER_ADMIN_TOKEN` is added to the admin
    /// tokens; `ROOMROUTER_NODE_TOKEN` and `ROOMROUTER_TICKET_SECRET` replace the file's value.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(t) = get("ROOMROUTER_ADMIN_TOKEN").filter(|t| !t.is_empty()) {
            if !self.auth.admin_tokens.contains(&t) {
                self.auth.admin_tokens.push(t);
            }
        }
        if let Some(t) = get("ROOMROUTER_NODE_TOKEN").filter(|t| !t.is_empty()) {
            self.auth.node_token = t;
        }
        if let Some(t) = get("ROOMROUTER_TICKET_SECRET").filter(|t| !t.is_empty()) {
            self.tickets.secret = t;
        }
        if let Some(t) = get("ROOMROUTER_JWT_SECRET").filter(|t| !t.is_empty()) {
            self.auth.jwt.secret = t;
        }
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.logging.validate()?;
        self.health.validate()?;
        let s = &self.server;
        if s.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be > 0"));
        }
        // HTTP/2 takes the limit as a u32; far beyond any real head anyway.
        if !(1024..=16 * 1024 * 1024).contains(&s.max_header_bytes) {
            return Err(invalid("server.max_header_bytes", "must be 1024-16777216"));
        }
        if s.header_read_timeout.is_zero() {
            return Err(invalid("server.header_read_timeout", "must be > 0"));
        }
        if s.h2_idle_timeout.is_zero() {
            return Err(invalid("server.h2_idle_timeout", "must be > 0"));
        }
        if s.send_timeout.is_zero() {
            return Err(invalid("server.send_timeout", "must be > 0"));
        }
        if s.body_read_timeout.is_zero() {
            return Err(invalid("server.body_read_timeout", "must be > 0"));
        }
        if s.worker_threads.is_some_and(|n| !(1..=1024).contains(&n)) {
            return Err(invalid("server.worker_threads", "must be 1-1024"));
        }
        // The connection limit is a semaphore, which takes at most usize::MAX >> 3 permits.
        if !(1..=10_000_000).contains(&s.max_connections) {
            return Err(invalid("server.max_connections", "must be 1-10000000"));
        }
        // Two listeners on one address: the second bind fails at start, after check-config
        // passed. A wildcard address takes its port on every address of its family.
        let listeners = [
            ("server.listen", Some(s.listen)),
            ("tls.redirect_listen", self.tls.redirect_listen),
            ("tls.node_listen", self.tls.node_listen),
        ];
        for (i, (key, a)) in listeners.iter().enumerate() {
            for (other, b) in &listeners[i + 1..] {
                let (Some(a), Some(b)) = (a, b) else { continue };
                // `[::]` takes the port on IPv4 too (Linux's default dual stack).
                let covers = |w: &std::net::SocketAddr, o: &std::net::SocketAddr| {
                    w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4())
                };
                let clash = a.port() == b.port()
                    && a.port() != 0
                    && (a.ip() == b.ip() || covers(a, b) || covers(b, a));
                if clash {
                    return Err(invalid(
                        other,
                        format!("{b} is the address of {key} ({a}): each listener needs its own"),
                    ));
                }
            }
        }
        let f = &self.front_door;
        for r in f.route_modes.keys() {
            if !f.routes.contains(r) {
                return Err(invalid(
                    &format!("front_door.route_modes.{r:?}"),
                    "not one of front_door.routes",
                ));
            }
        }
        if f.room_sources.is_empty() {
            return Err(invalid(
                "front_door.room_sources",
                "must name at least one source",
            ));
        }
        // A source is off while what it reads by is empty: a list of only such sources
        // finds no room in any request (every front-door request a `404`).
        let on = |source: &RoomSource| match source {
            RoomSource::Path => !f.routes.is_empty(),
            RoomSource::Query => !f.room_query_param.is_empty(),
            RoomSource::Header => !f.room_header.is_empty(),
            RoomSource::Cookie => !f.room_cookie.is_empty(),
        };
        if !f.room_sources.iter().any(on) {
            return Err(invalid(
                "front_door.room_sources",
                "none of the listed sources is on: path needs front_door.routes, query \
                 front_door.room_query_param, header front_door.room_header, cookie \
                 front_door.room_cookie",
            ));
        }
        self.proxy.validate()?;
        self.tls.validate()?;
        for (i, r) in f.routes.iter().enumerate() {
            crate::http::routes::RoomPattern::parse(r)
                .map_err(|m| invalid(&format!("front_door.routes[{i}]"), m))?;
        }
        if !f.room_header.is_empty()
            && http::HeaderName::from_bytes(f.room_header.as_bytes()).is_err()
        {
            return Err(invalid("front_door.room_header", "not a valid header name"));
        }
        // A cookie name is a token (RFC 6265 section 4.1.1): with a space, `;` or `=` in it,
        // no cookie a browser sends could ever match.
        let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if !f.room_cookie.bytes().all(tchar) {
            return Err(invalid(
                "front_door.room_cookie",
                "not a cookie name (a token: letters, digits and !#$%&'*+-.^_`|~)",
            ));
        }
        let p = &self.placement;
        if !(p.join_limit.is_finite() && p.join_limit > 0.0) {
            return Err(invalid("placement.join_limit", "must be a number > 0"));
        }
        if !(p.new_room_limit.is_finite()
            && p.new_room_limit > 0.0
            && p.new_room_limit <= p.join_limit)
        {
            return Err(invalid(
                "placement.new_room_limit",
                "must be > 0 and <= placement.join_limit",
            ));
        }
        if !(p.join_cost.is_finite() && p.join_cost >= 0.0) {
            return Err(invalid("placement.join_cost", "must be a number >= 0"));
        }
        // Told to nodes in whole milliseconds: less than one would read as 0.
        if p.heartbeat_interval < Duration::from_millis(1) {
            return Err(invalid(
                "placement.heartbeat_interval",
                "must be at least 1ms",
            ));
        }
        if p.heartbeat_timeout <= p.heartbeat_interval {
            return Err(invalid(
                "placement.heartbeat_timeout",
                "must be longer than placement.heartbeat_interval",
            ));
        }
        // Forgotten, a node still counted alive would leave the table under its rooms.
        if !p.forget_node_after.is_zero() && p.forget_node_after < p.heartbeat_timeout {
            return Err(invalid(
                "placement.forget_node_after",
                "must be 0 (never) or at least placement.heartbeat_timeout",
            ));
        }
        // A node still counted alive must keep its rooms pinned between two of its reports:
        // a pin released in the gap is placed afresh by the next join, maybe elsewhere, and
        // the first node's next report is answered with an eviction of a meeting under way.
        if p.room_idle_ttl <= p.heartbeat_timeout {
            return Err(invalid(
                "placement.room_idle_ttl",
                "must be longer than placement.heartbeat_timeout (node reports keep a live room's pin)",
            ));
        }
        if p.new_room_reserve_ttl.is_zero() {
            return Err(invalid(
                "placement.new_room_reserve_ttl",
                "must be > 0 (new_room_reserve = 0 reserves nothing for a guess)",
            ));
        }
        if p.reservation_ttl < p.new_room_reserve_ttl {
            return Err(invalid(
                "placement.reservation_ttl",
                "must be at least placement.new_room_reserve_ttl (a size hint or learned size is better knowledge than the default guess)",
            ));
        }
        if p.max_size_hint == 0 {
            return Err(invalid("placement.max_size_hint", "must be > 0"));
        }
        if p.share_reservations == Some(true) && self.store.kind != StoreKind::Redis {
            return Err(invalid(
                "placement.share_reservations",
                "needs store.kind = \"redis\" (one router has no one to share with)",
            ));
        }
        if self.store.kind == StoreKind::Redis && self.store.learned_file.is_some() {
            return Err(invalid(
                "store.learned_file",
                "is for the memory store; Redis keeps learned room sizes itself",
            ));
        }
        if self.store.kind == StoreKind::Redis {
            let st = &self.store;
            if st.cluster_nodes.is_empty() {
                check_redis_url("store.url", &st.url)?;
            }
            for (i, n) in st.cluster_nodes.iter().enumerate() {
                check_redis_url(&format!("store.cluster_nodes[{i}]"), n)?;
            }
            st.validate_sentinel()?;
            st.validate_tls()?;
            if st.key_prefix.is_empty()
                || st
                    .key_prefix
                    .chars()
                    .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
            {
                return Err(invalid(
                    "store.key_prefix",
                    "must be non-empty, without braces or whitespace",
                ));
            }
            if !(1..=64).contains(&st.pool_size) {
                return Err(invalid("store.pool_size", "must be 1-64"));
            }
            if st.connect_timeout.is_zero() {
                return Err(invalid("store.connect_timeout", "must be > 0"));
            }
            if st.command_timeout.is_zero() {
                return Err(invalid("store.command_timeout", "must be > 0"));
            }
            // Each re-sync publishes a probe and waits for it until the next one: shorter
            // than a round of commands, every re-sync would find the subscription "silent".
            if st.resync_interval < Duration::from_millis(100) {
                return Err(invalid("store.resync_interval", "must be at least 100ms"));
            }
        }
        if self.tickets.ttl.is_zero() {
            return Err(invalid("tickets.ttl", "must be > 0"));
        }
        // The idle sweep releases a pin whose last join is `room_idle_ttl` old: a ticket issued
        // by that join must no longer be accepted, or its holder lands on a node the room has
        // left while the next join places it elsewhere.
        let window = crate::auth::ticket::accepted_for(self.tickets.ttl, self.tickets.leeway);
        if self.placement.room_idle_ttl < window {
            return Err(invalid(
                "placement.room_idle_ttl",
                format!(
                    "must be at least {}s: tickets.ttl + tickets.leeway + 1 s, how long after a join its ticket may still be accepted",
                    window.as_secs()
                ),
            ));
        }
        if self.tickets.query_param.is_empty() {
            return Err(invalid("tickets.query_param", "must not be empty"));
        }
        self.check_query_params()?;
        let path = &self.tickets.node_path;
        if !path.starts_with('/') || !path.contains("{room}") {
            return Err(invalid(
                "tickets.node_path",
                "must start with '/' and contain {room}",
            ));
        }
        // It goes into `Location` as it is, `?ticket=` after it.
        if !path
            .replace("{room}", "r")
            .bytes()
            .all(crate::http::routes::is_path_byte)
        {
            return Err(invalid(
                "tickets.node_path",
                "must be a plain URL path: no query ('?'), fragment ('#'), spaces or \
                 non-ASCII (percent-encode it)",
            ));
        }
        if self.auth.users == UserAuth::Jwt {
            self.auth.jwt.validate()?;
            // Every node holds the ticket secret: with the same HS256 secret any node could
            // sign itself user tokens, for room "*" too.
            if self.auth.jwt.algorithm == JwtAlgorithm::HS256
                && !self.tickets.secret.is_empty()
                && self.auth.jwt.secret == self.tickets.secret
            {
                return Err(invalid(
                    "auth.jwt.secret",
                    "must differ from tickets.secret (every node holds that one)",
                ));
            }
        }
        if self.auth.users == UserAuth::Jwt && self.auth.jwt.algorithm == JwtAlgorithm::HS256 {
            if !self.auth.node_token.is_empty() && self.auth.jwt.secret == self.auth.node_token {
                return Err(invalid(
                    "auth.jwt.secret",
                    "must differ from auth.node_token (every node holds that one)",
                ));
            }
            // A node holding its own token could sign itself user tokens with it.
            if let Some(node) = self
                .auth
                .node_tokens
                .iter()
                .find(|(_, t)| **t == self.auth.jwt.secret)
                .map(|(node, _)| node)
            {
                return Err(invalid(
                    "auth.jwt.secret",
                    format!("must differ from auth.node_tokens.{node} (that node holds it)"),
                ));
            }
        }
        for (i, t) in self.auth.admin_tokens.iter().enumerate() {
            if t.len() < 16 {
                return Err(invalid(
                    &format!("auth.admin_tokens[{i}]"),
                    "must be at least 16 characters",
                ));
            }
            // Every node holds these: any node could act as an admin.
            let held = [&self.auth.node_token, &self.tickets.secret];
            if held.contains(&t) || self.auth.node_tokens.values().any(|s| s == t) {
                return Err(invalid(
                    &format!("auth.admin_tokens[{i}]"),
                    "must differ from the node tokens and tickets.secret (nodes hold those)",
                ));
            }
        }
        if !self.auth.node_token.is_empty() && self.auth.node_token.len() < 16 {
            return Err(invalid("auth.node_token", "must be at least 16 characters"));
        }
        for (id, t) in &self.auth.node_tokens {
            crate::cluster::NodeId::parse(id)
                .map_err(|e| invalid(&format!("auth.node_tokens.{id}"), e.to_string()))?;
            if t.len() < 16 {
                return Err(invalid(
                    &format!("auth.node_tokens.{id}"),
                    "must be at least 16 characters",
                ));
            }
            // A node listed here must use a token of its own: one another node holds (the
            // shared token, or a second node's) would let that node act as this one.
            let shared = *t == self.auth.node_token;
            let twin = (self.auth.node_tokens.iter()).find(|(other, o)| *other != id && *o == t);
            if shared || twin.is_some() {
                let holder = twin.map_or("every node (auth.node_token)".to_string(), |(o, _)| {
                    format!("auth.node_tokens.{o}")
                });
                return Err(invalid(
                    &format!("auth.node_tokens.{id}"),
                    format!("must be a token of this node's own; {holder} holds it too"),
                ));
            }
        }
        if !self.tickets.secret.is_empty() && self.tickets.secret.len() < 32 {
            return Err(invalid("tickets.secret", "must be at least 32 characters"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let key = |k: &str| format!("nodes[{i}].{k}");
            crate::cluster::NodeId::parse(&n.id).map_err(|e| invalid(&key("id"), e.to_string()))?;
            if !seen.insert(n.id.clone()) {
                return Err(invalid(&key("id"), format!("duplicate node id {:?}", n.id)));
            }
            crate::cluster::check_url(&n.url).map_err(|m| invalid(&key("url"), m))?;
            if let Some(u) = &n.upstream {
                crate::cluster::check_url(u).map_err(|m| invalid(&key("upstream"), m))?;
            }
            if !(n.capacity > 0.0 && n.capacity <= crate::cluster::MAX_UNITS) {
                return Err(invalid(
                    &key("capacity"),
                    "must be a number > 0 and <= 1e12",
                ));
            }
            // As a heartbeat must carry them: one that leaves them out keeps these, and
            // would be refused for them, the node taken for dead.
            crate::cluster::check_region_and_tags(n.region.as_deref(), &n.tags).map_err(|m| {
                let k = if m.starts_with("region") {
                    "region"
                } else {
                    "tags"
                };
                invalid(&key(k), m)
            })?;
        }
        Ok(())
    }

    /// Refuses to serve without credentials: a router anyone can register a node with can be
    /// hijacked. The message says how to set them. The placeholders our examples ship
    /// (`change-me…`, `replace-with…`) are refused too: they are public.
    pub fn require_credentials(&self) -> Result<(), ConfigError> {
        let placeholder = |v: &str| {
            let v = v.to_ascii_lowercase();
            v.starts_with("change-me") || v.starts_with("replace-with")
        };
        let mut given: Vec<(String, &str)> = (self.auth.admin_tokens.iter().enumerate())
            .map(|(i, t)| (format!("auth.admin_tokens[{i}]"), t.as_str()))
            .collect();
        given.push(("auth.node_token".into(), &self.auth.node_token));
        given.extend(
            (self.auth.node_tokens.iter())
                .map(|(id, t)| (format!("auth.node_tokens.{id}"), t.as_str())),
        );
        given.push(("tickets.secret".into(), &self.tickets.secret));
        given.push(("auth.jwt.secret".into(), &self.auth.jwt.secret));
        if let Some((key, _)) = given.iter().find(|(_, v)| placeholder(v)) {
            return Err(invalid(
                key,
                "is the example's placeholder, which anyone can read: set a random value (openssl rand -hex 24)",
            ));
        }
        if self.auth.admin_tokens.is_empty() {
            return Err(invalid(
                "auth.admin_tokens",
                "no admin token: set auth.admin_tokens in the config or ROOMROUTER_ADMIN_TOKEN (16+ characters)",
            ));
        }
        if self.auth.node_token.is_empty() && self.auth.node_tokens.is_empty() {
            return Err(invalid(
                "auth.node_token",
                "no node credentials: set auth.node_token or auth.node_tokens in the config, or ROOMROUTER_NODE_TOKEN (16+ characters)",
            ));
        }
        if self.tickets.secret.is_empty() {
            return Err(invalid(
                "tickets.secret",
                "no ticket secret: set tickets.secret or ROOMROUTER_TICKET_SECRET (32+ characters, shared with the nodes)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error `text` fails validation with (it must parse).
    fn rejected(text: &str) -> String {
        Config::parse(text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_duration_too_long_to_add_to_the_present_is_refused_as_the_file_is_read() {
        // Centuries overflow `Instant::now() + d`: the first connection would panic.
        let e = Config::parse("[server]\nheader_read_timeout = \"300000000000y\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than a duration may be"), "{e}");
        assert!(e.contains("header_read_timeout"), "{e}");
        let c = Config::parse("[placement]\nhistory_ttl = \"3650days\"\n").unwrap();
        assert_eq!(c.placement.history_ttl, duration::MAX);
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.placement.new_room_limit, 0.80);
        assert_eq!(c.placement.heartbeat_timeout, Duration::from_secs(6));
        assert_eq!(c.front_door.routes, vec!["/rooms/{room}", "/join/{room}"]);
        assert!(!c.server.transparent_huge_pages);
        c.validate().unwrap();
        assert!(c.require_credentials().is_err());
    }

    /// Sources that are all off find no room in any request: refused, naming what each
    /// needs. One source on among others off (the default's empty cookie) is fine.
    #[test]
    fn room_sources_that_can_find_no_room_are_refused() {
        for text in [
            "[front_door]\nroom_sources = [\"cookie\"]\n",
            "[front_door]\nroutes = []\nroom_sources = [\"path\"]\n",
            "[front_door]\nroom_query_param = \"\"\nroom_header = \"\"\nroom_sources = [\"query\", \"header\"]\n",
        ] {
            let e = rejected(text);
            assert!(e.contains("front_door.room_sources"), "{text}: {e}");
            assert!(e.contains("none of the listed sources is on"), "{text}: {e}");
        }
        let c = Config::parse("[front_door]\nroom_sources = [\"cookie\", \"query\"]\n").unwrap();
        c.validate().unwrap();
        let c =
            Config::parse("[front_door]\nroom_cookie = \"room\"\nroom_sources = [\"cookie\"]\n")
                .unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn a_zero_pool_idle_timeout_is_refused() {
        let e = rejected("[proxy]\npool_idle_timeout = \"0s\"\n");
        assert!(e.contains("proxy.pool_idle_timeout"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse("[placement]\nnew_room_limt = 0.5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("new_room_limt"), "{e}");
    }

    /// A self-signed certificate and its key, as PEM files named after `tag` in the temp
    /// directory; they serve as a CA bundle too.
    fn pem_pair(tag: &str) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec!["h".to_string()]).unwrap();
        let dir = std::env::temp_dir();
        let cert = dir.join(format!("rr-cfg-{tag}-{}.pem", std::process::id()));
        let key = dir.join(format!("rr-cfg-{tag}-{}.key", std::process::id()));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn redis_urls_are_checked_and_hide_passwords_in_debug() {
        let (ca, key) = pem_pair("store");
        let (ca, key) = (ca.display(), key.display());
        let garbage =
            std::env::temp_dir().join(format!("rr-cfg-garbage-{}.pem", std::process::id()));
        std::fs::write(&garbage, "garbage").unwrap();
        let garbage = garbage.display();
        for (text, key) in [
            (
                "kind = \"redis\"\ncluster_nodes = [\"redis://h:7000\", \"ftp://h\"]\n",
                "store.cluster_nodes[1]",
            ),
            (
                "kind = \"redis\"\nsentinels = [\"redis://h:26379\"]\nsentinel_master = \"m\"\nurl = \"rediss://h\"\n",
                "store.url",
            ),
            (
                "kind = \"redis\"\nsentinels = [\"redis://h:26379\", \"rediss://h:26380\"]\nsentinel_master = \"m\"\n",
                "store.sentinels[1]",
            ),
            (
                "kind = \"redis\"\ncluster_nodes = [\"rediss://h:7000\", \"redis://h:7001\"]\n",
                "store.cluster_nodes",
            ),
            (
                &format!("kind = \"redis\"\nurl = \"redis://h\"\ntls_ca_file = \"{ca}\"\n"),
                "store.tls_ca_file",
            ),
            (
                "kind = \"redis\"\nurl = \"rediss://h\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n",
                "store.tls_ca_file",
            ),
            (
                &format!("kind = \"redis\"\nurl = \"rediss://h\"\ntls_cert_file = \"{ca}\"\n"),
                "store.tls_cert_file",
            ),
            // Files that are no PEM certificate (or key) are refused here, naming the key,
            // not at the first handshake.
            (
                &format!("kind = \"redis\"\nurl = \"rediss://h\"\ntls_ca_file = \"{garbage}\"\n"),
                "store.tls_ca_file",
            ),
            (
                &format!("kind = \"redis\"\nurl = \"rediss://h\"\ntls_cert_file = \"{ca}\"\ntls_key_file = \"{garbage}\"\n"),
                "store.tls_cert_file",
            ),
        ] {
            let c = Config::parse(&format!("[store]\n{text}")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with(key), "{key}: {e}");
        }
        for ok in [
            format!("url = \"rediss://h:6380\"\ntls_ca_file = \"{ca}\""),
            format!("cluster_nodes = [\"rediss://h:7000\", \"rediss://h:7001\"]\ntls_cert_file = \"{ca}\"\ntls_key_file = \"{key}\""),
            "url = \"rediss://h:6380\"".to_string(),
        ] {
            let c = Config::parse(&format!("[store]\nkind = \"redis\"\n{ok}\n")).unwrap();
            c.validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(c.store.uses_tls());
        }
        let c = Config::parse(
            "[store]\nkind = \"redis\"\nurl = \"redis://app:s3cret@h:6379/2\"\n\
             sentinels = [\"redis://:sentinel-pw@h:26379\"]\nsentinel_master = \"m\"\n",
        )
        .unwrap();
        let shown = format!("{:?}", c.store);
        assert!(
            !shown.contains("s3cret") && !shown.contains("sentinel-pw"),
            "{shown}"
        );
        assert!(shown.contains("redis://app:redacted@h:6379/2"), "{shown}");
    }

    #[test]
    fn a_guess_lapses_after_a_minute_by_default_and_never_at_once() {
        let p = Config::default().placement;
        assert_eq!(p.reservation_ttl_ms(SizeSource::Default), 60_000);
        assert_eq!(p.reservation_ttl_ms(SizeSource::Hint), 300_000);
        assert_eq!(p.reservation_ttl_ms(SizeSource::History), 300_000);
        let c = Config::parse("[placement]\nnew_room_reserve_ttl = \"90s\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.placement.reservation_ttl_ms(SizeSource::Default), 90_000);
        let e = rejected("[placement]\nnew_room_reserve_ttl = \"0s\"\n");
        assert!(e.starts_with("placement.new_room_reserve_ttl"), "{e}");
    }

    #[test]
    fn shared_reservations_need_a_shared_store() {
        assert!(!Config::default().shares_reservations());
        let e = rejected("[placement]\nshare_reservations = true\n");
        assert!(e.starts_with("placement.share_reservations"), "{e}");
        let c =
            Config::parse("[placement]\nshare_reservations = true\n[store]\nkind = \"redis\"\n")
                .unwrap();
        c.validate().unwrap();
        assert!(c.shares_reservations());
        // Unset, routers on Redis share; one can still turn it off.
        let redis = |extra: &str| {
            let c = Config::parse(&format!("{extra}[store]\nkind = \"redis\"\n")).unwrap();
            c.validate().unwrap();
            c.shares_reservations()
        };
        assert!(redis(""));
        assert!(!redis("[placement]\nshare_reservations = false\n"));
        let c = Config::parse("[placement]\nshare_reservations = false\n").unwrap();
        c.validate().unwrap();
        assert!(!c.shares_reservations());
    }

    #[test]
    fn a_learned_sizes_file_is_for_the_memory_store() {
        let c = Config::parse("[store]\nlearned_file = \"/var/lib/roomrouter/learned\"\n").unwrap();
        c.validate().unwrap();
        let e =
            rejected("[store]\nkind = \"redis\"\nlearned_file = \"/var/lib/roomrouter/learned\"\n");
        assert!(e.starts_with("store.learned_file"), "{e}");
    }

    #[test]
    fn the_runtime_is_per_thread_unless_set_to_shared() {
        let d = Config::default().server;
        assert_eq!(d.runtime, RuntimeModel::PerThread);
        assert_eq!(d.event_loops(), d.threads());
        let c = Config::parse("[server]\nruntime = \"shared\"\nworker_threads = 3\n").unwrap();
        assert_eq!(c.server.runtime, RuntimeModel::Shared);
        assert_eq!(c.server.event_loops(), 1);
        let c = Config::parse("[server]\nruntime = \"per_thread\"\nworker_threads = 3\n").unwrap();
        assert_eq!(c.server.event_loops(), 3);
        let e = Config::parse("[server]\nruntime = \"green\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("runtime"), "{e}");
    }

    #[test]
    fn worker_threads_default_to_one_per_core_and_are_bounded() {
        assert_eq!(Config::default().server.worker_threads, None);
        let c = Config::parse("[server]\nworker_threads = 1\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.server.worker_threads, Some(1));
        let e = rejected("[server]\nworker_threads = 0\n");
        assert!(e.starts_with("server.worker_threads"), "{e}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let c = Config::parse("[placement]\nnew_room_limit = 1.5\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("placement.new_room_limit"), "{e}");
        let c =
            Config::parse("[[nodes]]\nid = \"a b\"\nurl = \"http://x\"\ncapacity = 1\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("nodes[0].id"), "{e}");
        for cap in ["0", "-1", "2e12", "nan"] {
            let c = Config::parse(&format!(
                "[[nodes]]\nid = \"a\"\nurl = \"http://x\"\ncapacity = {cap}\n"
            ))
            .unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with("nodes[0].capacity"), "{cap}: {e}");
        }
        let c = Config::parse("[placement]\nheartbeat_timeout = \"1s\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("placement.heartbeat_timeout"));
        let c = Config::parse("[placement]\nforget_node_after = \"5s\"\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("placement.forget_node_after"), "{e}");
        for ok in ["0s", "6s", "1h"] {
            let c = Config::parse(&format!("[placement]\nforget_node_after = \"{ok}\"\n"));
            c.unwrap().validate().unwrap();
        }
        for key in ["h2_idle_timeout", "send_timeout"] {
            let c = Config::parse(&format!("[server]\n{key} = \"0s\"\n")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with(&format!("server.{key}")), "{e}");
        }
    }

    #[test]
    fn query_parameter_names_and_the_node_path_must_go_into_urls_as_they_are() {
        for (toml, key) in [
            (
                "[tickets]\nquery_param = \"t&admin=1\"",
                "tickets.query_param",
            ),
            ("[tickets]\nquery_param = \"tické\"", "tickets.query_param"),
            ("[tickets]\nquery_param = \"a b\"", "tickets.query_param"),
            ("[auth.jwt]\nquery_param = \"tok=\"", "auth.jwt.query_param"),
            (
                "[front_door]\nroom_query_param = \"r#\"",
                "front_door.room_query_param",
            ),
            // Two names the same: the ticket read as the login token, the room as either.
            (
                "[auth.jwt]\nquery_param = \"ticket\"",
                "auth.jwt.query_param",
            ),
            (
                "[front_door]\nroom_query_param = \"ticket\"",
                "front_door.room_query_param",
            ),
            (
                "[tickets]\nnode_path = \"/join?room={room}\"",
                "tickets.node_path",
            ),
            (
                "[tickets]\nnode_path = \"/räume/{room}\"",
                "tickets.node_path",
            ),
            (
                "[tickets]\nnode_path = \"/rooms/{room}#x\"",
                "tickets.node_path",
            ),
        ] {
            let e = rejected(toml);
            assert!(e.starts_with(key), "{toml}: {e}");
        }
        for ok in [
            "[tickets]\nquery_param = \"rr_ticket\"\nnode_path = \"/b/r%C3%A4ume/{room}/join\"",
            "[auth.jwt]\nquery_param = \"\"\n[front_door]\nroom_query_param = \"\"",
            "[front_door]\nroom_query_param = \"meetingID\"",
        ] {
            Config::parse(ok).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn a_static_nodes_region_and_tags_follow_the_heartbeats_rules() {
        // A heartbeat that leaves them out keeps these: one the API refuses would have every
        // such heartbeat refused, and the node taken for dead.
        let node = |extra: &str| {
            format!("[[nodes]]\nid = \"a\"\nurl = \"http://x\"\ncapacity = 1\n{extra}\n")
        };
        let tags = |n: usize| {
            (0..n)
                .map(|i| format!("\"t{i}\""))
                .collect::<Vec<_>>()
                .join(",")
        };
        for (extra, key) in [
            ("region = \"\"".to_string(), "nodes[0].region"),
            (
                format!("region = \"{}\"", "r".repeat(65)),
                "nodes[0].region",
            ),
            ("region = \"eu\\n\"".to_string(), "nodes[0].region"),
            ("tags = [\"\"]".to_string(), "nodes[0].tags"),
            (format!("tags = [\"{}\"]", "t".repeat(65)), "nodes[0].tags"),
            (format!("tags = [{}]", tags(33)), "nodes[0].tags"),
        ] {
            let e = rejected(&node(&extra));
            assert!(e.starts_with(key), "{extra}: {e}");
        }
        let ok = format!("region = \"{}\"\ntags = [{}]", "r".repeat(64), tags(32));
        Config::parse(&node(&ok)).unwrap().validate().unwrap();
    }

    #[test]
    fn health_probes_are_off_by_default_and_checked_when_on() {
        let c = Config::default();
        assert!(c.health.probe_interval.is_zero());
        c.validate().unwrap();
        let c = Config::parse("[health]\nprobe_interval = \"1s\"\n").unwrap();
        assert_eq!(c.health.probe_timeout, Duration::from_secs(1));
        c.validate().unwrap();
        for (text, key) in [
            ("probe_interval = \"10ms\"", "health.probe_interval"),
            (
                "probe_interval = \"1s\"\nprobe_timeout = \"2s\"",
                "health.probe_timeout",
            ),
            (
                "probe_interval = \"1s\"\nprobe_timeout = \"0s\"",
                "health.probe_timeout",
            ),
            ("probe_interval = \"1s\"\nfailures = 0", "health.failures"),
        ] {
            let c = Config::parse(&format!("[health]\n{text}\n")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with(key), "{text}: {e}");
        }
    }

    #[test]
    fn the_example_configs_use_only_known_keys() {
        // Every file in config/, so a new example cannot be forgotten here.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut checked = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            let c = Config::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            match name.as_str() {
                "proxy-tls.toml" => {
                    assert_eq!(c.front_door.mode, FrontDoorMode::Proxy);
                    assert!(c.tls.node_listen.is_some());
                }
                "redis-sentinel.toml" => {
                    assert_eq!(c.store.kind, StoreKind::Redis);
                    assert!(!c.store.sentinels.is_empty());
                    c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
                }
                _ => {}
            }
            checked.push(name);
        }
        for expected in [
            "router.toml",
            "proxy-tls.toml",
            "jwt.toml",
            "redis-sentinel.toml",
        ] {
            assert!(checked.iter().any(|n| n == expected), "{expected} checked");
        }
    }

    #[test]
    fn sentinel_keys_are_checked_and_named() {
        let redis = |extra: &str| {
            Config::parse(&format!("[store]\nkind = \"redis\"\n{extra}"))
                .unwrap()
                .validate()
                .map_err(|e| e.to_string())
        };
        redis("sentinels = [\"redis://127.0.0.1:26379\", \"redis://:pw@10.0.0.2:26379\"]\nsentinel_master = \"mymaster\"\n").unwrap();
        let e = redis("sentinels = [\"redis://127.0.0.1:26379\"]\n").unwrap_err();
        assert!(e.starts_with("store.sentinel_master"), "{e}");
        let e = redis("sentinel_master = \"mymaster\"\n").unwrap_err();
        assert!(e.starts_with("store.sentinels"), "{e}");
        let e =
            redis("sentinels = [\"redis://127.0.0.1:26379\"]\nsentinel_master = \"my master\"\n")
                .unwrap_err();
        assert!(e.starts_with("store.sentinel_master"), "{e}");
        let e = redis(
            "sentinels = [\"redis://127.0.0.1:26379\", \"10.0.0.2:26379\"]\nsentinel_master = \"m\"\n",
        )
        .unwrap_err();
        assert!(e.starts_with("store.sentinels[1]"), "{e}");
        let e = redis(
            "sentinels = [\"redis://127.0.0.1:26379\"]\nsentinel_master = \"m\"\ncluster_nodes = [\"redis://127.0.0.1:7000\"]\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("store.sentinels") && e.contains("store.cluster_nodes"),
            "{e}"
        );
        // The keys concern kind = "redis" only.
        Config::parse("[store]\nsentinels = [\"nonsense\"]\n")
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn tls_and_proxy_keys_are_checked() {
        let c = Config::parse("[tls]\ncert_file = \"/nonexistent.pem\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("tls.key_file"));
        let c = Config::parse(
            "[tls]\ncert_file = \"/nonexistent.pem\"\nkey_file = \"/nonexistent.key\"\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("tls.cert_file") && e.contains("/nonexistent.pem"),
            "{e}"
        );
        for bad in ["my cookie", "room;x", "a=b", "r\u{e4}um"] {
            let c = Config::parse(&format!("[front_door]\nroom_cookie = \"{bad}\"\n")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with("front_door.room_cookie"), "{bad:?}: {e}");
        }
        Config::parse("[front_door]\nroom_cookie = \"__Host-room.id\"\n")
            .unwrap()
            .validate()
            .unwrap();
        // Two listeners on one address (a wildcard one takes its port everywhere).
        for (listen, extra) in [
            ("127.0.0.1:8080", "redirect_listen = \"127.0.0.1:8080\""),
            ("127.0.0.1:8443", "redirect_listen = \"0.0.0.0:8443\""),
            ("0.0.0.0:8443", "redirect_listen = \"[::]:8443\""),
        ] {
            let c = Config::parse(&format!(
                "[server]\nlisten = \"{listen}\"\n[tls]\n{extra}\n"
            ))
            .unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.starts_with("tls.redirect_listen") && e.contains("server.listen"),
                "{e}"
            );
        }
        // A client CA without the listener that checks client certificates turns on nothing.
        let (ca, _) = pem_pair("client-ca");
        let c = Config::parse(&format!("[tls]\nclient_ca_file = \"{}\"\n", ca.display())).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("tls.client_ca_file") && e.contains("node_listen"),
            "{e}"
        );
        let c = Config::parse("[tls]\nnode_listen = \"127.0.0.1:1\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("tls.node_listen"));
        let c = Config::parse("[proxy]\nfailures_to_unhealthy = 0\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("proxy.failures_to_unhealthy"));
        let c = Config::parse("[front_door.route_modes]\n\"/x/{room}\" = \"proxy\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("front_door.route_modes"));
    }

    #[test]
    fn a_per_node_token_is_that_nodes_own() {
        let shared = "shared-node-token-0123456789";
        let e = rejected(&format!(
            "[auth]\nnode_token = \"{shared}\"\n[auth.node_tokens]\nmedia-1 = \"{shared}\"\n"
        ));
        assert!(e.starts_with("auth.node_tokens.media-1:"), "{e}");
        assert!(!e.contains(shared), "{e}");
        let twin = "per-node-token-0123456789";
        let e = rejected(&format!(
            "[auth.node_tokens]\nmedia-1 = \"{twin}\"\nmedia-2 = \"{twin}\"\n"
        ));
        assert!(e.contains("auth.node_tokens.media-"), "{e}");
        assert!(!e.contains(twin), "{e}");
    }

    #[test]
    fn a_heartbeat_interval_under_a_millisecond_is_refused() {
        let e = rejected("[placement]\nheartbeat_interval = \"500us\"\n");
        assert!(e.starts_with("placement.heartbeat_interval:"), "{e}");
    }

    #[test]
    fn a_parse_error_names_line_and_column_but_never_quotes_the_value() {
        for (text, line, says) in [
            // A list written as a string: serde's message would quote the token.
            (
                "[auth]\nadmin_tokens = \"admin-secret-token-0123456789\"\n",
                2,
                "invalid type: string, expected a sequence",
            ),
            // A number where a string goes: serde would quote the digits.
            (
                "[auth]\nnode_token = 987654321987654321\n",
                2,
                "invalid type: integer, expected a string",
            ),
            // A syntax error on a secret's line: toml would print the line with a caret.
            (
                "\n\n[tickets]\nsecret = \"ticket-secret-0123456789\n",
                4,
                "",
            ),
            // An unclosed token in a multi-line list: its `=` padding is no assignment, and
            // what comes before it is the secret.
            (
                "[auth]\nadmin_tokens = [\n  \"admin-secret-dG9rZW4tMDEyMzQ1Njc4OQ=,\n]\n",
                3,
                "",
            ),
        ] {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("config: line {line}, column ")),
                "{e}"
            );
            assert!(e.contains(says), "{e}");
            for secret in ["admin-secret", "987654321", "ticket-secret"] {
                assert!(!e.contains(secret), "{e}");
            }
        }
        // A key that does not exist is still named.
        let e = Config::parse("[server]\nlisten_adress = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2, column 1 (server.listen_adress)"), "{e}");
        let e = Config::parse("# secrets\n[[nodes]]\nid = 7\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3, column 6 (nodes.id): invalid type: integer"),
            "{e}"
        );
    }

    #[test]
    fn a_logging_level_that_is_not_a_level_is_refused() {
        // "" and "," name nothing: tracing would log errors only, not even the router's start.
        for bad in [
            "warning",
            "roomrouter=warning",
            "info,loud",
            "debug,[=",
            "",
            ",",
        ] {
            let e = rejected(&format!("[logging]\nlevel = {bad:?}\n"));
            assert!(e.starts_with("logging.level"), "{bad}: {e}");
        }
        for good in [
            "info",
            "WARN",
            "roomrouter=debug,info",
            "off",
            "hyper=warn, debug",
        ] {
            Config::parse(&format!("[logging]\nlevel = {good:?}\n"))
                .unwrap()
                .validate()
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[test]
    fn a_room_idle_ttl_a_live_node_could_outlast_is_refused() {
        // With the pin released between two reports, the next join places the room afresh.
        let e = rejected("[placement]\nroom_idle_ttl = \"1s\"\n");
        assert!(e.starts_with("placement.room_idle_ttl"), "{e}");
        let e = rejected("[placement]\nroom_idle_ttl = \"6s\"\n"); // = heartbeat_timeout
        assert!(e.contains("heartbeat_timeout"), "{e}");
        let c = Config::parse("[tickets]\nttl = \"1s\"\n[placement]\nroom_idle_ttl = \"62s\"\nheartbeat_timeout = \"61s\"\nheartbeat_interval = \"2s\"\n").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn a_room_idle_ttl_a_ticket_could_outlast_is_refused() {
        // tickets.ttl 60 s: a ticket may be accepted up to 121 s after its join.
        let e = rejected("[placement]\nroom_idle_ttl = \"120s\"\n");
        assert!(e.starts_with("placement.room_idle_ttl"), "{e}");
        assert!(e.contains("121s"), "{e}");
        let c = Config::parse("[placement]\nroom_idle_ttl = \"121s\"\n").unwrap();
        c.validate().unwrap();
        let e = rejected("[tickets]\nttl = \"10m\"\n");
        assert!(e.starts_with("placement.room_idle_ttl"), "{e}");
        // Nodes that verify with no leeway: a ticket is accepted up to ttl + 1 s.
        let strict = "[tickets]\nttl = \"10m\"\nleeway = \"0s\"\n[placement]\nroom_idle_ttl = ";
        let e = rejected(&format!("{strict}\"600s\"\n"));
        assert!(e.contains("601s"), "{e}");
        let c = Config::parse(&format!("{strict}\"601s\"\n")).unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn the_user_jwt_secret_must_not_be_the_ticket_secret() {
        let shared = "shared-secret-0123456789-0123456789";
        let text = format!(
            "[auth]\nusers = \"jwt\"\n[auth.jwt]\nsecret = \"{shared}\"\n[tickets]\nsecret = \"{shared}\"\n"
        );
        let e = rejected(&text);
        assert!(e.starts_with("auth.jwt.secret"), "{e}");
        let mut c = Config::parse(&text).unwrap();
        c.tickets.secret = "ticket-secret-0123456789-0123456789".into();
        c.validate().unwrap();
    }

    #[test]
    fn the_startup_hold_is_the_heartbeat_timeout_unless_set_and_never_with_redis() {
        let c = Config::parse("[placement]\nheartbeat_timeout = \"9s\"\n").unwrap();
        assert_eq!(c.startup_hold(), Duration::from_secs(9));
        let c = Config::parse("[placement]\nstartup_hold = \"0s\"\n").unwrap();
        assert_eq!(c.startup_hold(), Duration::ZERO);
        let c = Config::parse("[placement]\nstartup_hold = \"3s\"\n").unwrap();
        assert_eq!(c.startup_hold(), Duration::from_secs(3));
        let c = Config::parse(
            "[placement]\nstartup_hold = \"3s\"\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1\"\n",
        )
        .unwrap();
        assert_eq!(c.startup_hold(), Duration::ZERO, "Redis keeps the pins");
    }

    #[test]
    fn no_secret_every_node_holds_signs_user_tokens_or_admits_admins() {
        let node = "node-token-0123456789-0123456789";
        let e = rejected(&format!(
            "[auth]\nusers = \"jwt\"\nnode_token = \"{node}\"\n[auth.jwt]\nsecret = \"{node}\"\n"
        ));
        assert!(e.starts_with("auth.jwt.secret"), "{e}");
        assert!(e.contains("auth.node_token"), "{e}");
        let e = rejected(&format!(
            "[auth]\nusers = \"jwt\"\n[auth.node_tokens]\nn1 = \"{node}\"\n[auth.jwt]\nsecret = \"{node}\"\n"
        ));
        assert!(e.starts_with("auth.jwt.secret"), "{e}");
        assert!(e.contains("auth.node_tokens.n1"), "{e}");
        let e = rejected(&format!(
            "[auth]\nnode_token = \"{node}\"\nadmin_tokens = [\"admin-token-0123456789\", \"{node}\"]\n"
        ));
        assert!(e.starts_with("auth.admin_tokens[1]"), "{e}");
        let e = rejected("[auth]\nadmin_tokens = [\"own-node-0123456789\"]\n[auth.node_tokens]\nn1 = \"own-node-0123456789\"\n");
        assert!(e.starts_with("auth.admin_tokens[0]"), "{e}");
        let ticket = "ticket-secret-0123456789-0123456789";
        let e = rejected(&format!(
            "[auth]\nadmin_tokens = [\"{ticket}\"]\n[tickets]\nsecret = \"{ticket}\"\n"
        ));
        assert!(e.starts_with("auth.admin_tokens[0]"), "{e}");
        Config::parse(&format!(
            "[auth]\nnode_token = \"{node}\"\nadmin_tokens = [\"admin-token-0123456789\"]\n"
        ))
        .unwrap()
        .validate()
        .unwrap();
    }

    #[test]
    fn limits_a_runtime_cannot_honour_are_refused() {
        let e = rejected("[server]\nmax_connections = 9223372036854775807\n");
        assert!(e.starts_with("server.max_connections"), "{e}");
        let e = rejected("[server]\nmax_header_bytes = 4294967296\n");
        assert!(e.starts_with("server.max_header_bytes"), "{e}");
        let e = rejected("[store]\nkind = \"redis\"\nresync_interval = \"1ms\"\n");
        assert!(e.starts_with("store.resync_interval"), "{e}");
        Config::parse("[server]\nmax_connections = 10000000\nmax_header_bytes = 16777216\n[store]\nkind = \"redis\"\nresync_interval = \"100ms\"\n")
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn a_jwt_leeway_is_whole_seconds() {
        let jwt = |leeway: &str| {
            format!(
                "[auth]\nusers = \"jwt\"\n[auth.jwt]\nsecret = \"user-secret-0123456789-0123456789\"\nleeway = \"{leeway}\"\n"
            )
        };
        let e = rejected(&jwt("500ms"));
        assert!(e.starts_with("auth.jwt.leeway"), "{e}");
        let e = rejected(&jwt("1500ms"));
        assert!(e.starts_with("auth.jwt.leeway"), "{e}");
        Config::parse(&jwt("2s")).unwrap().validate().unwrap();
        Config::parse(&jwt("0s")).unwrap().validate().unwrap();
    }

    #[test]
    fn reservations_of_known_sizes_last_at_least_as_long_as_a_guess() {
        let e = rejected("[placement]\nreservation_ttl = \"0s\"\n");
        assert!(e.starts_with("placement.reservation_ttl"), "{e}");
        let e = rejected("[placement]\nnew_room_reserve_ttl = \"10m\"\n"); // > 5 min
        assert!(e.starts_with("placement.reservation_ttl"), "{e}");
        let c = Config::parse("[placement]\nreservation_ttl = \"60s\"\n").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn the_examples_placeholder_credentials_are_refused_at_serve() {
        let creds = |admin: &str, node: &str, ticket: &str| {
            let mut c = Config::default();
            c.auth.admin_tokens = vec![admin.into()];
            c.auth.node_token = node.into();
            c.tickets.secret = ticket.into();
            c.require_credentials().map_err(|e| e.to_string())
        };
        let (admin, node) = ("a-random-admin-token-0123", "a-random-node-token-0123");
        let ticket = "a-random-ticket-secret-0123456789abcdef";
        creds(admin, node, ticket).unwrap();
        let e = creds("change-me-admin-token-0000000000", node, ticket).unwrap_err();
        assert!(
            e.starts_with("auth.admin_tokens[0]") && e.contains("placeholder"),
            "{e}"
        );
        let e = creds(admin, node, "Change-Me-ticket-secret-000000000000000000").unwrap_err();
        assert!(e.starts_with("tickets.secret"), "{e}");
        let mut c =
            Config::parse("[auth.node_tokens]\nm1 = \"replace-with-a-long-random-token-1\"\n")
                .unwrap();
        c.auth.admin_tokens = vec![admin.into()];
        c.tickets.secret = ticket.into();
        let e = c.require_credentials().unwrap_err().to_string();
        assert!(e.starts_with("auth.node_tokens.m1"), "{e}");
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let mut c = Config::parse("[auth.node_tokens]\nmedia-1 = \"per-node-secret-0123456789\"\n")
            .unwrap();
        c.auth.admin_tokens = vec!["admin-secret-0123456789".into()];
        c.auth.node_token = "node-secret-0123456789".into();
        c.tickets.secret = "ticket-secret-0123456789-0123456789".into();
        c.auth.jwt.secret = "jwt-secret-0123456789-0123456789".into();
        let shown = format!("{c:?}");
        for s in [
            "jwt-secret",
            "admin-secret",
            "node-secret",
            "ticket-secret",
            "per-node-secret",
        ] {
            assert!(!shown.contains(s), "{s} leaked: {shown}");
        }
        assert!(shown.contains("media-1"));
    }

    #[test]
    fn env_secrets_fill_the_config() {
        let mut c = Config::parse("").unwrap();
        c.apply_env(|k| match k {
            "ROOMROUTER_ADMIN_TOKEN" => Some("a".repeat(20)),
            "ROOMROUTER_NODE_TOKEN" => Some("n".repeat(20)),
            "ROOMROUTER_TICKET_SECRET" => Some("s".repeat(40)),
            _ => None,
        });
        c.validate().unwrap();
        c.require_credentials().unwrap();
    }
}
