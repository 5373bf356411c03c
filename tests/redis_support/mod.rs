//! Test support for everything that needs a real Redis: finding one (REDIS_URL, the local
//! 127.0.0.1:6379, or a private `redis-server` started on a free port), private servers
//! (plain, replica or Sentinel) the test may stop and restart, unique key prefixes, pins
//! read straight from a server, and routers served on loopback. Without any Redis, tests
//! print a loud `SKIPPED:` line and return; `ROOMROUTER_REQUIRE_REDIS` makes that a failure.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roomrouter::config::{Config, StoreKind};
use roomrouter::http::App;
use roomrouter::store::{self, AnyStore};
use tokio::sync::oneshot;

pub const ADMIN: &str = "admin-token-0123456789";
pub const NODE: &str = "node-token-0123456789";

/// A key prefix no other test (or run) uses.
pub fn prefix(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "rrtest-{test}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    )
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
        return false;
    };
    redis::cmd("PING").query::<String>(&mut c).is_ok()
}

pub fn have_redis_server() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A test cannot run without something it needs: prints a loud `SKIPPED:` line, or fails
/// when `ROOMROUTER_REQUIRE_REDIS` is set (CI), so a missing Redis is never a silent pass.
pub fn skip(test: &str, why: &str) {
    if std::env::var_os("ROOMROUTER_REQUIRE_REDIS").is_some() {
        panic!("{test}: ROOMROUTER_REQUIRE_REDIS is set but {why}");
    }
    eprintln!("SKIPPED: {test}: {why}");
}

/// A `redis-server` this test owns (no persistence); killed on drop.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    /// Sentinel mode: the configuration file's text (written anew on every start).
    sentinel_conf: Option<String>,
}

impl PrivateRedis {
    /// Starts one on a free port, or `None` if `redis-server` is not on PATH.
    pub fn start() -> Option<PrivateRedis> {
        Self::start_with(free_port(), vec![])
    }

    pub fn start_with(port: u16, extra: Vec<String>) -> Option<PrivateRedis> {
        if !have_redis_server() {
            return None;
        }
        let mut r = PrivateRedis {
            port,
            child: None,
            extra,
            sentinel_conf: None,
        };
        r.restart();
        Some(r)
    }

    /// Starts a replica of `master` on a free port (it answers before it has synced).
    pub fn start_replica_of(master: &PrivateRedis) -> Option<PrivateRedis> {
        Self::start_with(
            free_port(),
            vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                master.port.to_string(),
            ],
        )
    }

    /// Starts a Sentinel on a free port that monitors `master` under `name` with a quorum
    /// of one, declares it down after 500 ms and may fail over every 5 s.
    pub fn start_sentinel(name: &str, master: &PrivateRedis) -> Option<PrivateRedis> {
        if !have_redis_server() {
            return None;
        }
        let mut r = PrivateRedis {
            port: free_port(),
            child: None,
            extra: vec![],
            sentinel_conf: Some(format!(
                "sentinel monitor {name} 127.0.0.1 {port} 1\n\
                 sentinel down-after-milliseconds {name} 500\n\
                 sentinel failover-timeout {name} 5000\n",
                port = master.port
            )),
        };
        r.restart();
        Some(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Restarts it (empty) with `extra` arguments from now on, such as
    /// `--min-replicas-to-write 1` for a server that refuses writes from its first command.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|a| a.to_string()).collect();
        self.restart();
    }

    /// Stops the server (its data is gone: it keeps nothing on disk).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("rr-redis-{}", self.port))
    }

    /// Starts it again on the same port and waits until it answers (at most 10 s).
    pub fn restart(&mut self) {
        self.stop();
        let dir = self.dir();
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        let mut cmd = Command::new("redis-server");
        if let Some(conf) = &self.sentinel_conf {
            // Sentinel rewrites its file, so it must be a file of its own: first argument.
            let file = dir.join("sentinel.conf");
            std::fs::write(&file, conf).expect("write sentinel.conf");
            cmd.arg(&file).arg("--sentinel");
        }
        let child = cmd
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                dir.to_str().unwrap(),
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if answers(&self.url()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("private redis-server on port {} did not start", self.port);
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir());
    }
}

/// A private server for a test that stops or restarts it; `None` (after a loud SKIPPED
/// line) without `redis-server` on PATH.
pub fn private_redis_for(test: &str) -> Option<PrivateRedis> {
    let p = PrivateRedis::start();
    if p.is_none() {
        skip(test, "no redis-server on PATH to start a private one");
    }
    p
}

/// A Redis URL for a test: REDIS_URL, else 127.0.0.1:6379 if it answers, else a private
/// server (returned so it lives as long as the test). `None` (after a loud SKIPPED line)
/// when there is no Redis at all.
pub fn redis_for(test: &str) -> Option<(String, Option<PrivateRedis>)> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        if !url.is_empty() {
            return Some((url, None));
        }
    }
    let local = "redis://127.0.0.1:6379".to_string();
    if answers(&local) {
        return Some((local, None));
    }
    match PrivateRedis::start() {
        Some(p) => Some((p.url(), Some(p))),
        None => {
            skip(
                test,
                "no Redis (REDIS_URL unset, nothing on 127.0.0.1:6379, no redis-server on PATH)",
            );
            None
        }
    }
}

/// A config for a Redis-backed router in tests.
pub fn config(url: &str, prefix: &str) -> Config {
    let mut cfg = Config::default();
    cfg.store.kind = StoreKind::Redis;
    cfg.store.url = url.to_string();
    cfg.store.key_prefix = prefix.to_string();
    cfg.store.resync_interval = Duration::from_secs(1);
    cfg.auth.admin_tokens = vec![ADMIN.into()];
    cfg.auth.node_token = NODE.into();
    cfg.tickets.secret = "s".repeat(40);
    cfg.validate().expect("test config is valid");
    cfg
}

/// One router served on a loopback port; `stop()` (or drop) shuts it down.
pub struct Served {
    pub addr: SocketAddr,
    pub app: Arc<App<AnyStore>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Served {
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The admin state (`active`, `draining`, `disabled`) this router knows node `id` in.
    pub fn node_state(&self, id: &str) -> Option<String> {
        let id = roomrouter::cluster::NodeId::parse(id).expect("a valid node id");
        self.app
            .router
            .node(&id)
            .map(|n| n.state.as_str().to_string())
    }

    /// How many nodes this router counts as healthy.
    pub fn healthy_nodes(&self) -> usize {
        self.app.router.nodes().iter().filter(|n| n.healthy).count()
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Opens the store `cfg` names, builds the router and serves it on 127.0.0.1:0 (the HTTP
/// server alone: no sweeper, so tests decide when rooms are swept).
pub async fn serve(cfg: Config) -> Served {
    start(cfg, false).await
}

/// Like [`serve`], but through `service::run`, as `roomrouter serve` runs: with the sweeper
/// and, when the config asks for it, the reservation sharer.
pub async fn serve_service(cfg: Config) -> Served {
    start(cfg, true).await
}

async fn start(mut cfg: Config, as_service: bool) -> Served {
    cfg.server.shutdown_grace = Duration::from_millis(200);
    let store = store::open(&cfg).await.expect("open store");
    let app = roomrouter::service::build(cfg, store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let a = app.clone();
    let task = tokio::spawn(async move {
        let stopped = async {
            let _ = rx.await;
        };
        let _ = if as_service {
            roomrouter::service::run(a, listener, stopped).await
        } else {
            roomrouter::http::server::serve(a, listener, stopped).await
        };
    });
    Served {
        addr,
        app,
        stop: Some(tx),
        task: Some(task),
    }
}

/// The Redis key of a room's pin under `prefix` (the store's data model).
pub fn room_key(prefix: &str, room: &str) -> String {
    format!("{prefix}:room:{{{room}}}")
}

/// A connection of the test's own to the server at `url` (to look at or tamper with keys).
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Posts an admin action (`drain`, `disable`, `enable`) on `node` to the router at `base`
/// and checks that it was taken.
pub async fn admin_action(c: &reqwest::Client, base: &str, node: &str, action: &str) {
    let r = c
        .post(format!("{base}/v1/nodes/{node}/{action}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{action} {node}: {}", r.status());
}

/// The admin state Redis holds for `node` under key prefix `prefix` (`None`: none stored,
/// or not readable as a hash).
pub async fn stored_admin_state(
    conn: &redis::aio::MultiplexedConnection,
    prefix: &str,
    node: &str,
) -> Option<String> {
    redis::cmd("HGET")
        .arg(format!("{{{prefix}}}:admin"))
        .arg(node)
        .query_async(&mut conn.clone())
        .await
        .unwrap_or(None)
}

/// Has the server refuse writes (`min-replicas-to-write n` with no replica, as a demoted or
/// new master may) or take them again (`n` = 0).
pub async fn refuse_writes(conn: &redis::aio::MultiplexedConnection, n: u32) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("min-replicas-to-write")
        .arg(n)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
}

/// The raw value of `key` on the server at `url` (`node|created_ms|confirmed_ms` for a pin).
pub async fn redis_pin(url: &str, key: &str) -> Option<String> {
    let mut c = redis_conn(url).await;
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// Sends a heartbeat for node `id` (url http://127.0.0.1:1/id) with `load` and `rooms`.
pub async fn heartbeat(
    c: &reqwest::Client,
    base: &str,
    id: &str,
    load: f64,
    rooms: &[(&str, u32)],
) -> serde_json::Value {
    let rooms: Vec<serde_json::Value> = rooms
        .iter()
        .map(|(r, p)| serde_json::json!({"room": r, "participants": p}))
        .collect();
    let r = c
        .post(format!("{base}/v1/nodes/{id}/heartbeat"))
        .bearer_auth(NODE)
        .json(&serde_json::json!({
            "url": format!("http://127.0.0.1:1/{id}"),
            "capacity": 100000,
            "load": load,
            "rooms": rooms,
        }))
        .send()
        .await
        .expect("heartbeat sent");
    assert!(r.status().is_success(), "heartbeat: {}", r.status());
    r.json().await.unwrap()
}

/// `GET /v1/placement/{room}`: the node id, or the error (status and body).
pub async fn place(c: &reqwest::Client, base: &str, room: &str) -> Result<String, String> {
    let r = c
        .get(format!("{base}/v1/placement/{room}"))
        .send()
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = r.status();
    let text = r.text().await.map_err(|e| format!("body: {e}"))?;
    if !status.is_success() {
        return Err(format!("{status}: {text}"));
    }
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    Ok(v["node"].as_str().unwrap_or_default().to_string())
}

/// `GET /v1/nodes/{id}` on the router at `base`, as the admin.
pub async fn node_json(c: &reqwest::Client, base: &str, id: &str) -> serde_json::Value {
    c.get(format!("{base}/v1/nodes/{id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls `f` every 50 ms until it is true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes every key of a test's prefix (best effort; pins would expire on their own, the
/// shared hashes and the index would not).
pub async fn cleanup(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let mut cursor = 0u64;
    for _ in 0..1000 {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("*{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&keys).query_async(&mut c).await;
        }
        cursor = next;
        if cursor == 0 {
            return;
        }
    }
}

/// A loopback TCP forwarder to a Redis server (or sentinel) that can be cut and restored (one router's own network
/// partition, while the others keep reaching Redis), or can silence the subscriptions
/// passing through it: their sockets stay open and nothing more arrives, as when a host
/// vanishes or a NAT entry expires.
pub struct Partition {
    pub addr: std::net::SocketAddr,
    open: Arc<AtomicBool>,
    /// Every connection silent, new ones too (`silence_all`).
    silent_all: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<Forwarded>>>,
    accept: tokio::task::JoinHandle<()>,
}

/// One forwarded connection: its two copy tasks, whether the client subscribed on it,
/// whether it is silenced, and its address as Redis sees it (`CLIENT LIST`'s `addr`).
struct Forwarded {
    tasks: [tokio::task::JoinHandle<()>; 2],
    subscribed: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    /// Redis's replies held back, the client's commands passed on (`silence_replies`).
    replies_silent: Arc<AtomicBool>,
    upstream: std::net::SocketAddr,
}

/// Copies `from` to `to` chunk by chunk; holds a chunk (and so everything after it) while
/// `silent` or `also_silent`; marks `subscribed` when a chunk carries a SUBSCRIBE command.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    subscribed: Option<Arc<AtomicBool>>,
    silent: Arc<AtomicBool>,
    also_silent: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    for _ in 0..10_000_000u64 {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(s) = &subscribed {
            if buf[..n]
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
            {
                s.store(true, AtomicOrdering::SeqCst);
            }
        }
        while silent.load(AtomicOrdering::SeqCst) || also_silent.load(AtomicOrdering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Partition {
    pub async fn to(upstream: String) -> Partition {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let silent_all = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (o, cs, quiet) = (open.clone(), conns.clone(), silent_all.clone());
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                if !o.load(AtomicOrdering::SeqCst) {
                    continue; // dropped: the connection is reset
                }
                let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let Ok(up_addr) = up.local_addr() else {
                    continue;
                };
                let ((dr, dw), (ur, uw)) = (down.into_split(), up.into_split());
                let subscribed = Arc::new(AtomicBool::new(false));
                let silent = Arc::new(AtomicBool::new(quiet.load(AtomicOrdering::SeqCst)));
                let replies_silent = Arc::new(AtomicBool::new(false));
                let never = Arc::new(AtomicBool::new(false));
                let tasks = [
                    tokio::spawn(forward(
                        dr,
                        uw,
                        Some(subscribed.clone()),
                        silent.clone(),
                        never,
                    )),
                    tokio::spawn(forward(
                        ur,
                        dw,
                        None,
                        silent.clone(),
                        replies_silent.clone(),
                    )),
                ];
                cs.lock().unwrap().push(Forwarded {
                    tasks,
                    subscribed,
                    silent,
                    replies_silent,
                    upstream: up_addr,
                });
            }
        });
        Partition {
            addr,
            open,
            silent_all,
            conns,
            accept,
        }
    }

    /// Redis goes silent without closing anything, as when its host freezes or the network
    /// between drops every packet: every connection open now, and every one made later,
    /// passes nothing on. `restore()` lets what they hold through.
    pub fn silence_all(&self) {
        self.silent_all.store(true, AtomicOrdering::SeqCst);
        for c in self.conns.lock().unwrap().iter() {
            c.silent.store(true, AtomicOrdering::SeqCst);
        }
    }

    pub fn cut(&self) {
        self.open.store(false, AtomicOrdering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.tasks.iter().for_each(|t| t.abort());
        }
    }

    pub fn restore(&self) {
        self.open.store(true, AtomicOrdering::SeqCst);
        if self.silent_all.swap(false, AtomicOrdering::SeqCst) {
            for c in self.conns.lock().unwrap().iter() {
                c.silent.store(false, AtomicOrdering::SeqCst);
            }
        }
    }

    /// Refuses new connections (they are reset) while the open ones keep working, as a
    /// Redis at `maxclients` does; `restore()` opens the door again.
    pub fn refuse_new_connections(&self) {
        self.open.store(false, AtomicOrdering::SeqCst);
    }

    /// The addresses Redis sees for the subscriptions open through here (to pick them out
    /// of `CLIENT LIST`, e.g. to kill only these with `CLIENT KILL ADDR`).
    pub fn subscription_addrs(&self) -> Vec<std::net::SocketAddr> {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .filter(|c| c.subscribed.load(AtomicOrdering::SeqCst) && !c.tasks[1].is_finished())
            .map(|c| c.upstream)
            .collect()
    }

    /// Silences the first `n` command connections (not subscriptions) open now, in the
    /// order they were made; the others, and connections made later, pass. Returns how
    /// many it silenced.
    pub fn silence_command_connections(&self, n: usize) -> usize {
        let conns = self.conns.lock().unwrap();
        let commands = conns
            .iter()
            .filter(|c| !c.subscribed.load(AtomicOrdering::SeqCst));
        commands
            .take(n)
            .map(|c| c.silent.store(true, AtomicOrdering::SeqCst))
            .count()
    }

    /// Holds back Redis's replies on the first `n` command connections open now whose
    /// replies pass, while their commands still reach Redis and run: what a client sees
    /// when a reply is lost on the way back. Returns how many.
    pub fn silence_replies_of_command_connections(&self, n: usize) -> usize {
        let conns = self.conns.lock().unwrap();
        let commands = conns.iter().filter(|c| {
            !c.subscribed.load(AtomicOrdering::SeqCst)
                && !c.replies_silent.load(AtomicOrdering::SeqCst)
                && !c.tasks[0].is_finished()
        });
        commands
            .take(n)
            .map(|c| c.replies_silent.store(true, AtomicOrdering::SeqCst))
            .count()
    }

    /// How many connections have been made through here since the last `cut`.
    pub fn connections_made(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Silences every subscription open now; connections made later pass.
    pub fn silence_subscriptions(&self) -> usize {
        let conns = self.conns.lock().unwrap();
        let subs = conns
            .iter()
            .filter(|c| c.subscribed.load(AtomicOrdering::SeqCst));
        subs.map(|c| c.silent.store(true, AtomicOrdering::SeqCst))
            .count()
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A loopback TCP forwarder whose command connections can be moved to another server
/// without closing them (`switch_commands_to`): the client's next command on each goes to
/// the new server, and no error tells it so, while its subscriptions stay where they were.
/// What a router sees when the server behind an address was replaced before anything it
/// holds failed: its replies come from a server it never caught up with.
pub struct Switchboard {
    pub addr: std::net::SocketAddr,
    target: Arc<std::sync::Mutex<String>>,
    generation: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Switchboard {
    pub async fn to(upstream: String) -> Switchboard {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(std::sync::Mutex::new(upstream));
        let generation = Arc::new(AtomicU64::new(0));
        let (t, g) = (target.clone(), generation.clone());
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                tokio::spawn(splice(down, t.clone(), g.clone()));
            }
        });
        Switchboard {
            addr,
            target,
            generation,
            accept,
        }
    }

    /// Every command connection, open or new, talks to `upstream` from its next command on.
    pub fn switch_commands_to(&self, upstream: String) {
        *self.target.lock().unwrap() = upstream;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for Switchboard {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Serves one client connection until either side closes: before each chunk the client
/// sends, a connection that has not subscribed follows the switchboard to its current
/// server (a new upstream connection, the old one dropped).
async fn splice(
    mut down: tokio::net::TcpStream,
    target: Arc<std::sync::Mutex<String>>,
    generation: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = |to: String| async move { tokio::net::TcpStream::connect(to).await.ok() };
    let mut at = generation.load(Ordering::SeqCst);
    let to = target.lock().unwrap().clone();
    let Some(mut up) = connect(to).await else {
        return;
    };
    let (mut from_client, mut from_server) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let mut subscribed = false;
    for _ in 0..10_000_000u64 {
        tokio::select! {
            n = down.read(&mut from_client) => {
                let n = match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let chunk = &from_client[..n];
                subscribed |= chunk.windows(9).any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"));
                let now = generation.load(Ordering::SeqCst);
                if !subscribed && now != at {
                    at = now;
                    let to = target.lock().unwrap().clone();
                    let Some(moved) = connect(to).await else {
                        return;
                    };
                    up = moved;
                }
                if up.write_all(chunk).await.is_err() {
                    return;
                }
            }
            n = up.read(&mut from_server) => {
                let n = match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if down.write_all(&from_server[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
