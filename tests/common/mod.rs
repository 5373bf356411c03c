//! Test harness: a real router served over loopback HTTP, real demo nodes, and a client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use roomrouter::config::Config;
use roomrouter::demo::node::{DemoNode, DemoNodeConfig};
use roomrouter::http::App;
use roomrouter::store::MemoryStore;
use tokio::sync::oneshot;

/// Sends a request and reads its answer as JSON: for tests that look only at the body.
pub trait SendJson {
    fn send_json(self) -> impl std::future::Future<Output = serde_json::Value> + Send;
}

impl SendJson for reqwest::RequestBuilder {
    async fn send_json(self) -> serde_json::Value {
        self.send().await.unwrap().json().await.unwrap()
    }
}

pub const ADMIN: &str = "test-admin-token-0123456789";
pub const NODE_TOKEN: &str = "test-node-token-0123456789";
pub const SECRET: &str = "test-ticket-secret-0123456789-0123456789";

/// A config with test credentials and fast heartbeats.
pub fn config() -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.auth.admin_tokens = vec![ADMIN.into()];
    c.auth.node_token = NODE_TOKEN.into();
    c.tickets.secret = SECRET.into();
    c.placement.heartbeat_interval = Duration::from_millis(200);
    c.placement.heartbeat_timeout = Duration::from_millis(1_000);
    // Tests register their nodes themselves before any join (the hold has its own tests).
    c.placement.startup_hold = Some(Duration::ZERO);
    // A test that stops its router with a WebSocket still open waits this out.
    c.server.shutdown_grace = Duration::from_secs(1);
    c.validate().unwrap();
    c
}

/// `config()` in proxy mode, for nodes registered by hand-sent heartbeats: they stay healthy
/// for the whole test, and a node that does not answer fails within seconds.
pub fn proxy_config() -> Config {
    let mut c = config();
    c.front_door.mode = roomrouter::config::FrontDoorMode::Proxy;
    c.placement.heartbeat_interval = Duration::from_secs(1);
    c.placement.heartbeat_timeout = Duration::from_secs(60);
    c.proxy.response_timeout = Duration::from_secs(3);
    c.proxy.connect_timeout = Duration::from_secs(1);
    c.validate().unwrap();
    c
}

/// `c` served by one event loop (`server.runtime = "per_thread"` with one thread): for tests
/// that count the proxy's upstream connections, which every loop keeps a pool of its own of.
pub fn one_loop(mut c: Config) -> Config {
    c.server.worker_threads = Some(1);
    c.validate().unwrap();
    c
}

/// A router served on a loopback port; stops when dropped.
pub struct TestRouter {
    pub addr: SocketAddr,
    pub url: String,
    pub app: Arc<App<MemoryStore>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestRouter {
    pub async fn start(cfg: Config) -> TestRouter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestRouter::start_on(cfg, listener).await
    }

    /// As [`TestRouter::start`], serving `listener` (its URL: the listener's address).
    pub async fn start_on(cfg: Config, listener: tokio::net::TcpListener) -> TestRouter {
        let addr = listener.local_addr().unwrap();
        let app = roomrouter::service::build(cfg, MemoryStore::new());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(roomrouter::service::run(app.clone(), listener, async {
            let _ = rx.await;
        }));
        TestRouter {
            addr,
            url: format!("http://{addr}"),
            app,
            stop: Some(tx),
            task,
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.task).await;
    }

    /// Starts a demo node heartbeating to this router.
    pub async fn node(&self, id: &str, capacity: f64) -> DemoNode {
        DemoNode::start(self.node_config(id, capacity))
            .await
            .unwrap()
    }

    /// Starts a demo node that names rooms as a router with `rooms.normalization = rooms`.
    pub async fn node_naming_rooms(
        &self,
        id: &str,
        capacity: f64,
        rooms: roomrouter::room::Normalization,
    ) -> DemoNode {
        DemoNode::start_with_normalization(self.node_config(id, capacity), rooms)
            .await
            .unwrap()
    }

    /// A demo node of this router's: its token, secret and a 200 ms heartbeat.
    pub fn node_config(&self, id: &str, capacity: f64) -> DemoNodeConfig {
        DemoNodeConfig {
            id: id.into(),
            routers: vec![self.url.clone()],
            listen: "127.0.0.1:0".parse().unwrap(),
            public_url: None,
            capacity,
            region: None,
            tags: vec![],
            node_token: NODE_TOKEN.into(),
            ticket_secret: SECRET.into(),
            ticket_leeway: roomrouter::auth::ticket::DEFAULT_LEEWAY,
            heartbeat_interval: Duration::from_millis(200),
        }
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        client().get(format!("{}{path}", self.url))
    }
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        client().post(format!("{}{path}", self.url))
    }
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        client()
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(ADMIN)
    }

    /// Sends an admin request with no body and checks that it fails with `status` and the
    /// stable error `code` (see [`expect_error`]).
    pub async fn expect_admin_error(
        &self,
        method: reqwest::Method,
        path: &str,
        status: u16,
        code: &str,
    ) -> serde_json::Value {
        let resp = self.admin(method, path).send().await.unwrap();
        expect_error(resp, status, code).await
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// What the router at `url` would reserve for a new session of `room`, and why
/// (`expected_size`, `size_source` of `GET /v1/placement/{room}/explain`, as `admin`).
pub async fn expected_size(
    c: &reqwest::Client,
    url: &str,
    admin: &str,
    room: &str,
) -> (u64, String) {
    let e: serde_json::Value = c
        .get(format!("{url}/v1/placement/{room}/explain"))
        .bearer_auth(admin)
        .send_json()
        .await;
    (
        e["expected_size"].as_u64().unwrap_or(0),
        e["size_source"].as_str().unwrap_or("").to_string(),
    )
}

/// The Prometheus text of the router at `url`.
pub async fn metrics(c: &reqwest::Client, url: &str) -> String {
    c.get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the sample `name` (with its labels, as the exposition writes them) in a
/// Prometheus text exposition.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

/// A client that does not follow redirects, with a timeout.
pub fn client() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(64)
                .build()
                .unwrap()
        })
        .clone()
}

/// Asserts a stable error: status and `error` code.
pub async fn expect_error(resp: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "expected {status} {code}");
    let body: serde_json::Value = resp.json().await.expect("error body is JSON");
    assert_eq!(body["error"], code, "body: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "body: {body}"
    );
    body
}

/// Waits (bounded) until `f` holds.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a heartbeat by hand.
pub async fn heartbeat(r: &TestRouter, id: &str, body: serde_json::Value) -> reqwest::Response {
    heartbeat_at(&r.url, NODE_TOKEN, id, &body).await
}

/// Sends a heartbeat by hand to the router at `url` (one this harness did not start), with
/// `token` as the node's bearer token.
pub async fn heartbeat_at(
    url: &str,
    token: &str,
    id: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    client()
        .post(format!("{url}/v1/nodes/{id}/heartbeat"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// `GET path` with the admin token, as JSON (any status).
pub async fn admin_json(r: &TestRouter, path: &str) -> serde_json::Value {
    r.admin(reqwest::Method::GET, path).send_json().await
}
