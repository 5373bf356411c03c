//! The real binary: configuration checks, the credential guard, serve + demo-node as separate
//! processes, and the one-command demo.

mod common;
mod upstream;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, expected_size, heartbeat_at, SendJson, ADMIN, NODE_TOKEN, SECRET};

const BIN: &str = env!("CARGO_BIN_EXE_roomrouter");

struct Reaper(Child);
impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An address for a child process to listen on: a port free on a random loopback address
/// (all of 127.0.0.0/8 is loopback). The port is let go before the child binds it; on an
/// address of its own, another test's child cannot take it in between (on 127.0.0.1 one
/// did, and the test then talked to the other test's router).
fn free_addr() -> std::net::SocketAddr {
    use rand::Rng;
    let mut rng = rand::rng();
    let ip = std::net::Ipv4Addr::new(
        127,
        rng.random_range(1..255),
        rng.random(),
        rng.random_range(1..255),
    );
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

fn clean_env(c: &mut Command) -> &mut Command {
    c.env_remove("ROOMROUTER_ADMIN_TOKEN")
        .env_remove("ROOMROUTER_NODE_TOKEN")
        .env_remove("ROOMROUTER_TICKET_SECRET")
        .env("RUST_LOG", "warn")
}

#[test]
fn serve_refuses_to_start_without_credentials_and_says_how_to_set_them() {
    let out = clean_env(&mut Command::new(BIN))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ROOMROUTER_ADMIN_TOKEN"), "{err}");
}

#[test]
fn check_config_accepts_the_shipped_examples_and_names_bad_keys() {
    for example in [
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/router.toml"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/redis-sentinel.toml"),
    ] {
        let ok = clean_env(&mut Command::new(BIN))
            .args(["check-config", example])
            .env("ROOMROUTER_ADMIN_TOKEN", ADMIN)
            .env("ROOMROUTER_NODE_TOKEN", NODE_TOKEN)
            .env("ROOMROUTER_TICKET_SECRET", SECRET)
            .output()
            .unwrap();
        assert!(
            ok.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
    }
    let dir = std::env::temp_dir().join(format!("rr-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[placement]\njoin_limit = 0.5\nnew_room_limit = 0.8\n",
    )
    .unwrap();
    let out = clean_env(&mut Command::new(BIN))
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("placement.new_room_limit"));
    std::fs::write(&bad, "[placement]\nnew_room_limit = \"high\"\n").unwrap();
    let out = clean_env(&mut Command::new(BIN))
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("new_room_limit"));
    // Room sources that are all off (the cookie's name is empty by default) would make
    // every front-door request a 404.
    std::fs::write(&bad, "[front_door]\nroom_sources = [\"cookie\"]\n").unwrap();
    let out = clean_env(&mut Command::new(BIN))
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("front_door.room_sources"));
    // A timeout of centuries would overflow the first time it is added to the present (a
    // panic on the first connection): refused, and said once.
    std::fs::write(&bad, "[server]\nheader_read_timeout = \"300000000000y\"\n").unwrap();
    let out = clean_env(&mut Command::new(BIN))
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        said.matches("longer than a duration may be").count(),
        1,
        "{said}"
    );
    // A learned-sizes file `serve` could not keep (its directory missing: under systemd's
    // `ProtectSystem=strict`, any directory outside the unit's own) fails the check, as it
    // would fail the start; one in a directory that takes it passes.
    let check_learned = |file: &std::path::Path| {
        std::fs::write(
            &bad,
            format!("[store]\nlearned_file = {:?}\n", file.to_str().unwrap()),
        )
        .unwrap();
        clean_env(&mut Command::new(BIN))
            .args(["check-config", bad.to_str().unwrap()])
            .env("ROOMROUTER_ADMIN_TOKEN", ADMIN)
            .env("ROOMROUTER_NODE_TOKEN", NODE_TOKEN)
            .env("ROOMROUTER_TICKET_SECRET", SECRET)
            .output()
            .unwrap()
    };
    let out = check_learned(&dir.join("missing").join("learned.txt"));
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("store.learned_file"), "{said}");
    let out = check_learned(&dir.join("learned.txt"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.join("learned.txt").exists(), "the check wrote nothing");
}

async fn wait_http(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if client()
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never answered");
}

#[tokio::test]
async fn serve_and_demo_node_processes_route_a_join_end_to_end() {
    let (_router, router_url) = serve_with(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/router.toml"
    )));
    wait_http(&format!("{router_url}/healthz")).await;
    let node = demo_node(&router_url, "proc-node", 50);
    wait_http(&format!("{router_url}/readyz")).await;
    // A benchmark's stand-in node opts out of transparent huge pages, as the router does.
    assert_ne!(thp_enabled(node.0.id()), Some(true));
    let resp = client()
        .get(format!("{router_url}/rooms/e2e"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);
    assert_eq!(resp.headers()["x-room-node"], "proc-node");
    let joined: serde_json::Value = client()
        .get(resp.headers()["location"].to_str().unwrap())
        .send_json()
        .await;
    assert_eq!(joined["participants"], 1);
    assert_eq!(joined["node"], "proc-node");
}

/// `roomrouter serve` with the test credentials on a free port, logging JSON at `level` to
/// a file: `(router, its URL, the log file)`.
async fn serve_logging_to_a_file(level: &str) -> (Reaper, String, PathBuf) {
    let addr = free_addr();
    let url = format!("http://{addr}");
    let log =
        (std::env::temp_dir()).join(format!("rr-log-{}-{}.log", std::process::id(), addr.port()));
    let file = std::fs::File::create(&log).unwrap();
    // The tests register their node before any join: no startup hold.
    let config = log.with_extension("toml");
    std::fs::write(&config, "[placement]\nstartup_hold = \"0s\"\n").unwrap();
    let router = Reaper(
        clean_env(&mut Command::new(BIN))
            .args([
                "serve",
                "--listen",
                &addr.to_string(),
                "--log-json",
                "--config",
            ])
            .arg(&config)
            .env("ROOMROUTER_ADMIN_TOKEN", ADMIN)
            .env("ROOMROUTER_NODE_TOKEN", NODE_TOKEN)
            .env("ROOMROUTER_TICKET_SECRET", SECRET)
            .env("RUST_LOG", level)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap(),
    );
    wait_http(&format!("{url}/healthz")).await;
    (router, url, log)
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let (router, url, log) = serve_logging_to_a_file("trace").await;
    let hb = serde_json::json!({"url": "http://127.0.0.1:9", "capacity": 10, "load": 0});
    let c = client();
    heartbeat_at(&url, NODE_TOKEN, "n1", &hb).await;
    heartbeat_at(&url, "wrong-token-0123456789", "n1", &hb).await;
    c.get(format!("{url}/v1/nodes"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    let login: serde_json::Value = c
        .post(format!("{url}/v1/login"))
        .json(&serde_json::json!({"room": "r"}))
        .send_json()
        .await;
    let ticket = login["ticket"].as_str().unwrap().to_string();
    drop(router);
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(text.contains("node joined"), "the log was captured: {text}");
    for secret in [
        ADMIN,
        NODE_TOKEN,
        SECRET,
        "wrong-token-0123456789",
        ticket.as_str(),
    ] {
        assert!(!text.contains(secret), "a secret reached the log");
    }
}

/// `RUST_LOG=warning` (not a level: `tracing` would read it as a target and log nothing,
/// errors included) is not used: the router logs at its configured level and says why.
#[tokio::test]
async fn a_rust_log_that_is_not_a_filter_is_refused_aloud_and_the_configured_level_logs() {
    let (router, url, log) = serve_logging_to_a_file("warning").await;
    let hb = serde_json::json!({"url": "http://127.0.0.1:9", "capacity": 10, "load": 0});
    heartbeat_at(&url, NODE_TOKEN, "n1", &hb).await;
    drop(router);
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(
        text.contains("RUST_LOG ignored") && text.contains("\"warning\""),
        "the operator is told: {text}"
    );
    assert!(
        text.contains("node joined"),
        "the configured level (info) logs: {text}"
    );
}

/// Every placement is logged once, with where the room went and what it reserves; joins of
/// a placed room are not (a log line per join would be a flood at 100 000 joins/s).
#[tokio::test]
async fn placements_are_logged_once_per_room_with_their_reservation() {
    let (_router, url, log) = serve_logging_to_a_file("info").await;
    let c = client();
    let hb = serde_json::json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 0});
    heartbeat_at(&url, NODE_TOKEN, "n1", &hb).await;
    for _ in 0..3 {
        let resp = c.get(format!("{url}/rooms/standup")).send().await.unwrap();
        assert_eq!(resp.status(), 307);
    }
    let resp = c.get(format!("{url}/rooms/lesson?size=25")).send().await;
    assert_eq!(resp.unwrap().status(), 307);
    // The writer thread writes the lines soon after, not before the answers.
    let placed = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["message"] == "room placed")
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while placed().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = placed();
    let _ = std::fs::remove_file(&log);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let of = |room: &str| lines.iter().find(|l| l["room"] == room).unwrap().clone();
    let standup = of("standup");
    assert_eq!(
        (
            &standup["node"],
            &standup["expected_size"],
            &standup["size_source"]
        ),
        (&"n1".into(), &10.into(), &"default".into()),
        "{standup}"
    );
    let lesson = of("lesson");
    assert_eq!(
        (
            &lesson["expected_size"],
            &lesson["size_source"],
            &lesson["level"]
        ),
        (&25.into(), &"hint".into(), &"INFO".into()),
        "{lesson}"
    );
}

/// `roomrouter demo-node` heartbeating to `router` with the test credentials.
fn demo_node(router: &str, id: &str, capacity: u32) -> Reaper {
    Reaper(
        clean_env(&mut Command::new(BIN))
            .args(["demo-node", "--router", router, "--id", id])
            .args(["--capacity", &capacity.to_string()])
            .env("ROOMROUTER_NODE_TOKEN", NODE_TOKEN)
            .env("ROOMROUTER_TICKET_SECRET", SECRET)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A demo node stopped by its operator (SIGTERM) leaves its router before it exits: the
/// router lists it no more and sends no join or new room its way, at once rather than at
/// `placement.heartbeat_timeout` (6 s), as it would after a crash.
#[tokio::test]
async fn a_demo_node_stopped_by_sigterm_leaves_its_router_at_once() {
    let dir = std::env::temp_dir().join(format!("rr-leave-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("router.toml");
    std::fs::write(&config, "[placement]\nstartup_hold = \"0s\"\n").unwrap();
    let (_router, url) = serve_with(&config);
    wait_http(&format!("{url}/healthz")).await;
    let mut node = demo_node(&url, "media-1", 100);
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n: serde_json::Value = c
            .get(format!("{url}/v1/nodes/media-1"))
            .bearer_auth(ADMIN)
            .send_json()
            .await;
        if n["healthy"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node never became healthy: {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped_at = Instant::now();
    assert!(terminate(&mut node.0).await, "the node exits 0 on SIGTERM");
    let listed = c
        .get(format!("{url}/v1/nodes/media-1"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    common::expect_error(listed, 404, "not_found").await;
    let join = c
        .get(format!("{url}/rooms/after-stop"))
        .send()
        .await
        .unwrap();
    common::expect_error(join, 503, "no_capacity").await;
    assert!(
        stopped_at.elapsed() < Duration::from_secs(3),
        "the leave took {:?}",
        stopped_at.elapsed()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `GET /v1/nodes/{id}` on the router at `url`: whether the node is listed, and healthy.
async fn listed(url: &str, id: &str) -> Option<bool> {
    let r = client()
        .get(format!("{url}/v1/nodes/{id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    if r.status() == 404 {
        return None;
    }
    let n: serde_json::Value = r.json().await.unwrap();
    Some(n["healthy"] == true)
}

/// A node that crashes (no leave) under an id of its own, as a Kubernetes pod does, leaves
/// the node table once silent for `placement.forget_node_after`; a static node that never
/// reported stays; the crashed node's next heartbeat brings it back.
#[tokio::test]
async fn a_crashed_node_silent_for_forget_node_after_is_forgotten_and_comes_back() {
    let dir =
        std::env::temp_dir().join(format!("rr-forget-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("router.toml");
    std::fs::write(
        &config,
        "[placement]\nstartup_hold = \"0s\"\nheartbeat_interval = \"500ms\"\n\
         heartbeat_timeout = \"2s\"\nforget_node_after = \"3s\"\n\
         [[nodes]]\nid = \"fixed\"\nurl = \"http://127.0.0.1:1\"\ncapacity = 10\n",
    )
    .unwrap();
    let (_router, url) = serve_with(&config);
    wait_http(&format!("{url}/healthz")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut node = demo_node(&url, "pod-7f9c", 100);
    while listed(&url, "pod-7f9c").await != Some(true) {
        assert!(Instant::now() < deadline, "the node never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.0.kill().unwrap();
    node.0.wait().unwrap();
    assert!(
        listed(&url, "pod-7f9c").await.is_some(),
        "forgotten before its time"
    );
    let killed = Instant::now();
    while listed(&url, "pod-7f9c").await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the crashed node is still listed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(killed.elapsed() >= Duration::from_millis(2_000));
    assert_eq!(
        listed(&url, "fixed").await,
        Some(false),
        "the static node stays"
    );
    let _back = demo_node(&url, "pod-7f9c", 100);
    while listed(&url, "pod-7f9c").await != Some(true) {
        assert!(Instant::now() < deadline, "the node did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A node the router refuses at its first heartbeat (a wrong node token here) would be
/// refused at every one, forever: `demo-node` exits non-zero and says why.
#[tokio::test]
async fn a_demo_node_its_router_refuses_exits_and_says_why() {
    let dir =
        std::env::temp_dir().join(format!("rr-refused-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("router.toml");
    std::fs::write(&config, "[logging]\nlevel = \"warn\"\n").unwrap();
    let (_router, url) = serve_with(&config);
    wait_http(&format!("{url}/healthz")).await;
    let mut node = Reaper(
        clean_env(&mut Command::new(BIN))
            .args(["demo-node", "--router", &url, "--id", "media-1"])
            .env("ROOMROUTER_NODE_TOKEN", "not-the-node-token")
            .env("ROOMROUTER_TICKET_SECRET", SECRET)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = node.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "a refused demo node kept running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut node.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("refused") && err.contains("401") && err.contains("node token"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An id or a capacity the router refuses at every heartbeat, or a ticket leeway past the
/// config's bound, is refused before the node starts, naming the flag.
#[test]
fn demo_node_refuses_an_id_or_a_capacity_its_router_never_takes() {
    let base = [
        "--router",
        "http://127.0.0.1:9",
        "--node-token",
        "t",
        "--ticket-secret",
        "test-ticket-secret-0123456789-0123456789",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().chain(extra).copied().collect()
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (with(&["--id", "n1", "--capacity", "0"]), "--capacity"),
        (with(&["--id", "n1", "--capacity", "-5"]), "--capacity"),
        (with(&["--id", "n1", "--capacity", "NaN"]), "--capacity"),
        (with(&["--id", "n1", "--capacity", "inf"]), "--capacity"),
        (with(&["--id", "n1", "--capacity", "2e12"]), "--capacity"),
        (with(&["--id", "a/b"]), "--id"),
        (
            with(&["--id", "n1", "--room-normalization", "upper"]),
            "--room-normalization",
        ),
        // A leeway of a century overflowed the ticket check (a panic in a debug build).
        (
            with(&["--id", "n1", "--ticket-leeway", "100y"]),
            "--ticket-leeway",
        ),
        // A secret the router cannot have (it takes 32 characters or more): every ticket
        // would be refused at the node.
        (
            vec![
                "--router",
                "http://127.0.0.1:9",
                "--node-token",
                "t",
                "--id",
                "n1",
                "--ticket-secret",
                "short",
            ],
            "--ticket-secret",
        ),
    ];
    let cases: Vec<(&[&str], &str)> = cases.iter().map(|(a, s)| (a.as_slice(), *s)).collect();
    refuses("demo-node", &cases);
}

/// `roomrouter serve --config CONFIG` on a free port with the test credentials.
fn serve_with(config: &std::path::Path) -> (Reaper, String) {
    let addr = free_addr();
    let router = Reaper(
        with_credentials(
            Command::new(BIN)
                .args(["serve", "--config"])
                .arg(config)
                .args(["--listen", &addr.to_string()]),
        )
        .spawn()
        .unwrap(),
    );
    (router, format!("http://{addr}"))
}

/// `c` in a clean environment with the test credentials, its stdout dropped: a router as
/// the tests run it.
fn with_credentials(c: &mut Command) -> &mut Command {
    clean_env(c)
        .env("ROOMROUTER_ADMIN_TOKEN", ADMIN)
        .env("ROOMROUTER_NODE_TOKEN", NODE_TOKEN)
        .env("ROOMROUTER_TICKET_SECRET", SECRET)
        .stdout(Stdio::null())
}

#[tokio::test]
async fn learned_room_sizes_survive_a_restart_with_the_memory_store() {
    let dir =
        std::env::temp_dir().join(format!("rr-learned-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("learned.txt");
    let config = dir.join("router.toml");
    std::fs::write(
        &config,
        // No startup hold: the restart below is about learned sizes, and the hold has tests
        // of its own.
        format!(
            "[store]\nlearned_file = {:?}\n[placement]\nstartup_hold = \"0s\"\n",
            file.to_str().unwrap()
        ),
    )
    .unwrap();

    let (mut router, url) = serve_with(&config);
    wait_http(&format!("{url}/healthz")).await;
    let c = client();
    let beat = |rooms: serde_json::Value| {
        let url = url.clone();
        async move {
            let hb = serde_json::json!({
                "url": "http://127.0.0.1:9", "capacity": 1000, "load": 0, "rooms": rooms,
            });
            let r = heartbeat_at(&url, NODE_TOKEN, "n1", &hb).await;
            assert_eq!(r.status(), 200);
        }
    };
    beat(serde_json::json!([])).await;
    let placed = c
        .get(format!("{url}/v1/placement/class-7b"))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 200);
    // A lesson of 40 that ends.
    beat(serde_json::json!([{"room": "class-7b", "participants": 40}])).await;
    beat(serde_json::json!([{"room": "class-7b", "participants": 0}])).await;
    assert_eq!(
        expected_size(&c, &url, ADMIN, "class-7b").await,
        (40, "history".into())
    );

    // A graceful stop (SIGTERM) writes the file; a restart reads it.
    assert!(terminate(&mut router.0).await, "a clean exit");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("\tclass-7b"), "{text}");
    let (_router, url) = serve_with(&config);
    wait_http(&format!("{url}/healthz")).await;
    assert_eq!(
        expected_size(&c, &url, ADMIN, "class-7b").await,
        (40, "history".into())
    );
    let metrics = common::metrics(&c, &url).await;
    assert!(metrics.contains("roomrouter_learned_rooms 1"), "{metrics}");
    assert_eq!(
        expected_size(&c, &url, ADMIN, "other").await,
        (10, "default".into())
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_hangup_signal_does_not_stop_a_router_without_tls() {
    // SIGHUP's default action ends a process; `Restart=on-failure` would not bring it back.
    let dir = std::env::temp_dir().join(format!("rr-hup-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("router.toml");
    std::fs::write(&config, "[logging]\nlevel = \"warn\"\n").unwrap();
    let (mut router, url) = serve_with(&config);
    wait_http(&format!("{url}/healthz")).await;
    for _ in 0..2 {
        let sent = Command::new("kill")
            .args(["-HUP", &router.0.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            router.0.try_wait().unwrap().is_none(),
            "SIGHUP ended the router"
        );
        let r = client().get(format!("{url}/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(
        terminate(&mut router.0).await,
        "SIGTERM still drains and exits 0"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Whether transparent huge pages are enabled for process `pid` (`THP_enabled` in
/// /proc/PID/status, Linux 5.0 and later); `None` where the kernel does not say.
fn thp_enabled(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim() == "1")
}

#[tokio::test]
async fn the_router_opts_out_of_transparent_huge_pages_unless_its_config_allows_them() {
    let Some(ours) = thp_enabled(std::process::id()) else {
        eprintln!("SKIPPED: this kernel does not report THP_enabled in /proc/PID/status");
        return;
    };
    let dir = std::env::temp_dir().join(format!("rr-thp-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    // Allowed, the router keeps what it inherited (this test's own setting); by default it
    // opts out.
    for (server, expected) in [("", false), ("transparent_huge_pages = true\n", ours)] {
        let config = dir.join("router.toml");
        std::fs::write(
            &config,
            format!("[server]\n{server}[logging]\nlevel = \"warn\"\n"),
        )
        .unwrap();
        let (mut router, url) = serve_with(&config);
        wait_http(&format!("{url}/healthz")).await;
        assert_eq!(
            thp_enabled(router.0.id()),
            Some(expected),
            "THP_enabled with [server] {server:?}"
        );
        assert!(terminate(&mut router.0).await);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sends SIGTERM and waits (bounded) for the process to exit; returns whether it exited 0.
async fn terminate(child: &mut Child) -> bool {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        assert!(
            Instant::now() < deadline,
            "the router did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Proxy mode through the real binary under each runtime model: concurrent clients all
/// reach their room's node, and SIGTERM stops every thread.
#[tokio::test]
async fn both_runtime_models_proxy_concurrent_joins_and_stop_on_sigterm() {
    for runtime in ["per_thread", "shared"] {
        let dir = std::env::temp_dir().join(format!(
            "rr-runtime-{runtime}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("router.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nruntime = \"{runtime}\"\nworker_threads = 3\n\
                 [front_door]\nmode = \"proxy\"\n"
            ),
        )
        .unwrap();
        let (mut router, url) = serve_with(&config);
        wait_http(&format!("{url}/healthz")).await;
        let _node = demo_node(&url, "n1", 1000);
        wait_http(&format!("{url}/readyz")).await;
        #[cfg(target_os = "linux")]
        {
            let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", router.0.id()))
                .unwrap()
                .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap())
                .map(|name| name.trim().to_string())
                .collect();
            let loops = threads
                .iter()
                .filter(|n| n.starts_with("roomrouter-loop"))
                .count();
            let workers = threads.iter().filter(|n| n.starts_with("tokio-")).count();
            match runtime {
                // Loop 0 is the main thread; loops 1 and 2 have threads of their own.
                "per_thread" => assert_eq!((loops, workers), (2, 0), "{threads:?}"),
                _ => assert_eq!((loops, workers), (0, 3), "{threads:?}"),
            }
        }
        // 24 clients, each with its own keep-alive connection, 5 joins each.
        let mut clients = tokio::task::JoinSet::new();
        for c in 0..24 {
            let url = url.clone();
            clients.spawn(async move {
                let http = client();
                for j in 0..5 {
                    let resp = http
                        .get(format!("{url}/rooms/room-{}", (c + j) % 7))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), 200);
                    assert_eq!(resp.headers()["x-room-node"], "n1");
                    let joined: serde_json::Value = resp.json().await.unwrap();
                    assert_eq!(joined["node"], "n1");
                }
            });
        }
        while let Some(done) = clients.join_next().await {
            done.unwrap();
        }
        assert!(terminate(&mut router.0).await, "{runtime}: exit status");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[tokio::test]
async fn the_one_command_demo_serves_joins() {
    let addr = free_addr();
    let mut child = clean_env(&mut Command::new(BIN))
        .args(["demo", "--listen", &addr.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let pid = child.id();
    let _reaper = Reaper(child);
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains(&addr.to_string()), "{first}");
    // Its router runs on the defaults: no transparent huge pages.
    assert_ne!(thp_enabled(pid), Some(true));
    let url = format!("http://{addr}");
    wait_http(&format!("{url}/readyz")).await;
    let resp = client()
        .get(format!("{url}/rooms/demo-room"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);
    assert!(resp.headers()["x-room-node"]
        .to_str()
        .unwrap()
        .starts_with("media-"));
    // It prints the admin token as the README's examples use it (`$ADMIN`), and it works.
    let admin = loop {
        let line = lines.next().expect("an export ADMIN= line").unwrap();
        if let Some(t) = line.trim().strip_prefix("export ADMIN=") {
            break t.to_string();
        }
    };
    let nodes = client()
        .get(format!("{url}/v1/nodes"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(nodes.status(), 200);
}

#[test]
fn the_demo_refuses_a_node_count_it_cannot_run() {
    refuses(
        "demo",
        &[
            (&["--nodes", "0"], "--nodes"),
            (&["--nodes", "65"], "1..=64"),
            (&["--listen", "nowhere"], "--listen"),
        ],
    );
}

/// The standard output of a run that must have succeeded (else both outputs, in the panic).
fn stdout_of_success(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Runs `roomrouter SUBCOMMAND ARGS...` for each case and checks that it fails with a message
/// containing the expected text, never a panic. Bounded (30 s): a command that takes what it
/// should refuse may well run on (a demo node heartbeating to nobody), and fails the case.
fn refuses(subcommand: &str, cases: &[(&[&str], &str)]) {
    for (args, says) in cases {
        let mut child = clean_env(&mut Command::new(BIN))
            .arg(subcommand)
            .args(*args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?}: still running after 30 s, not refused");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = reader.join().unwrap();
        assert!(!status.success(), "{args:?}");
        assert!(
            err.contains(says) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn load_constant_rate_measures_the_ceiling_and_refuses_bad_flags_without_panicking() {
    refuses(
        "load",
        &[
            (
                &["--constant-rate", "0", "--url", "http://127.0.0.1:9"],
                "--constant-rate must be in",
            ),
            (
                &[
                    "--constant-rate",
                    "100",
                    "--connections",
                    "0",
                    "--url",
                    "http://127.0.0.1:9",
                ],
                "--connections",
            ),
            (
                &["--constant-rate", "100", "--url", "127.0.0.1:9"],
                "http://",
            ),
            (&["--constant-rate", "100"], "needs a target"),
            (
                &[
                    "--constant-rate",
                    "100",
                    "--pacing",
                    "often",
                    "--url",
                    "http://127.0.0.1:9",
                ],
                "often",
            ),
            (
                &[
                    "--constant-rate",
                    "100",
                    "--warmup",
                    "7200",
                    "--url",
                    "http://127.0.0.1:9",
                ],
                "--warmup must be at most",
            ),
        ],
    );

    let addr = free_addr();
    let _ceiling = Reaper(
        clean_env(&mut Command::new(BIN))
            .args(["load", "--ceiling-server", &addr.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://{addr}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "the ceiling server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The wheel is Linux's (a timerfd) and falls back to Tokio's timer elsewhere; spin
    // paces on any platform.
    let wheel = if cfg!(target_os = "linux") {
        "wheel"
    } else {
        "tokio"
    };
    // The spin-paced run also warms up for half a second: 250 more requests, sent and
    // answered, none of them measured.
    for (pacing, paced_by, warmup) in [("wheel", wheel, 0), ("spin", "spin", 250)] {
        let json =
            std::env::temp_dir().join(format!("roomrouter-rate-{}-{pacing}.json", addr.port()));
        let out = clean_env(&mut Command::new(BIN))
            .args([
                "load",
                "--constant-rate",
                "500",
                "--duration",
                "1",
                "--connections",
                "4",
                "--pacing",
                pacing,
                "--warmup",
                if warmup > 0 { "0.5" } else { "0" },
            ])
            .args(["--url", &url, "--quiet", "--json", json.to_str().unwrap()])
            // As in the compare scripts, which set it for the routers they start: a
            // credential in the environment is no flag the constant rate refuses.
            .env("ROOMROUTER_ADMIN_TOKEN", "admin-token-of-the-shell")
            .output()
            .unwrap();
        let table = stdout_of_success(&out);
        assert!(
            table.contains("from plan (constant)")
                && table.contains(&format!("307: {}", 500 + warmup)),
            "{table}"
        );
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let _ = std::fs::remove_file(&json);
        assert_eq!(
            (r["planned"].as_u64(), r["ok"].as_u64()),
            (Some(500 + warmup), Some(500 + warmup)),
            "{r}"
        );
        assert_eq!(
            (r["warmup_sent"].as_u64(), r["latency_us"]["count"].as_u64()),
            (Some(warmup), Some(500)),
            "{r}"
        );
        assert_eq!(r["pacing"], paced_by, "{r}");
        if cfg!(target_os = "linux") {
            assert!(
                r["load_tool_cores"].as_f64().is_some_and(|c| c > 0.0),
                "{r}"
            );
        }
        // The kernel's threads over the run: a figure wherever /proc shows them (not in a
        // PID namespace of its own), and then in the table too.
        let k = &r["kernel_threads"];
        if std::fs::read_to_string("/proc/2/stat").is_ok_and(|s| s.contains("(kthreadd)")) {
            assert!(
                k["threads"].as_u64().is_some_and(|n| n > 0)
                    && k["run_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
                "{r}"
            );
            assert!(table.contains("kernel     its threads ran"), "{table}");
        } else {
            assert!(k.is_null(), "{r}");
        }
    }
}

/// `roomrouter load` on a cluster it starts itself, in either front-door mode: the binary
/// runs the router and demo nodes, kills one mid-run, prints its table, writes its JSON and
/// exits 0 with no room split.
#[test]
fn load_runs_a_self_started_cluster_in_either_mode_and_refuses_bad_flags() {
    refuses(
        "load",
        &[
            (&["--mode", "sideways"], "expected redirect or proxy"),
            (&["--probe-ms", "50"], "--probe-ms"),
            (
                &["--duration", "2", "--kill-node-at", "2"],
                "--kill-node-at must be before the end of the run",
            ),
            (
                &["--duration", "2", "--add-node-at", "5"],
                "--add-node-at must be before the end of the run",
            ),
            (&["--burst", "1e20:5"], "SECS in 0..=86400"),
            (
                // The open-loop workload's knobs mean nothing to a constant rate: refused,
                // not silently ignored.
                &[
                    "--constant-rate",
                    "10",
                    "--url",
                    "http://127.0.0.1:9",
                    "--stay",
                    "exp:1",
                ],
                "cannot be used with",
            ),
            (
                &["--mode", "proxy", "--router", "http://127.0.0.1:9"],
                "cannot be used with",
            ),
            (
                &[
                    "--mode",
                    "proxy",
                    "--constant-rate",
                    "10",
                    "--url",
                    "http://127.0.0.1:9",
                ],
                "cannot be used with",
            ),
        ],
    );
    // The redirect-mode router also probes its nodes.
    for (mode, probe) in [("redirect", "100"), ("proxy", "0")] {
        let json = std::env::temp_dir().join(format!(
            "roomrouter-load-{mode}-{}.json",
            std::process::id()
        ));
        let out = clean_env(&mut Command::new(BIN))
            .args(["load", "--mode", mode, "--rate", "60", "--duration", "2"])
            .args(if probe == "0" {
                vec![]
            } else {
                vec!["--probe-ms", probe]
            })
            .args([
                "--rooms",
                "20",
                "--stay",
                "exp:0.5",
                "--heartbeat-ms",
                "100",
            ])
            .args([
                "--kill-node-at",
                "1",
                "--quiet",
                "--json",
                json.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let table = stdout_of_success(&out);
        assert!(
            table.contains(&format!("self-started {mode}-mode router")),
            "{table}"
        );
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let _ = std::fs::remove_file(&json);
        assert_eq!(r["scheduled"], 120, "{r}");
        assert_eq!(r["split_rooms"], 0, "{r}");
        assert!(r["node_joins"].as_u64().is_some_and(|n| n > 60), "{r}");
        assert!(r["leaves"].as_u64().is_some_and(|n| n > 0), "{r}");
        assert_eq!(r["rooms_moved_after_kill"], 0, "{r}");
    }
}

#[test]
fn simulate_reports_the_mean_over_seeds_and_refuses_bad_flags_without_panicking() {
    refuses(
        "simulate",
        &[
            (&["--seeds", "0"], "--seeds"),
            (&["--seeds", "2", "--trace", "t.txt"], "--trace"),
            (&["--workload", "rush-hour"], "rush-hour"),
            (&["--capacity", "inf"], "--capacity"),
            // A huge node or router count panicked allocating one entry for each.
            (&["--nodes", "100000000000000"], "--nodes"),
            (&["--nodes", "0"], "--nodes"),
            (&["--routers", "0"], "--routers"),
            (&["--routers", "100000000000000"], "--routers"),
            (&["--heartbeat-ms", "0"], "--heartbeat-ms"),
            (
                &["--heartbeat-ms", "18446744073709551615"],
                "--heartbeat-ms",
            ),
        ],
    );

    let json = std::env::temp_dir().join(format!("roomrouter-sim-{}.json", std::process::id()));
    let out = clean_env(&mut Command::new(BIN))
        .args([
            "simulate",
            "--quick",
            "--workload",
            "small-rooms",
            "--hints",
            "exact",
        ])
        .args([
            "--nodes",
            "6",
            "--capacity",
            "60",
            "--routers",
            "2",
            "--seed",
            "5",
        ])
        .args(["--seeds", "2", "--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    let table = stdout_of_success(&out);
    assert!(
        table.contains("seeds 5-6 (utilization figures: means"),
        "{table}"
    );
    assert!(table.contains("checked on each seed alone"), "{table}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let seeds = report["per_seed"].as_array().unwrap();
    assert_eq!(seeds.len(), 2);
    // The top-level figures are the seeds' mean.
    let peak = |r: &serde_json::Value| {
        r["workloads"][0]["results"][0]["peak_utilization"]
            .as_f64()
            .unwrap()
    };
    let mean = (peak(&seeds[0]) + peak(&seeds[1])) / 2.0;
    assert!((peak(&report) - mean).abs() < 1e-9, "{report}");
    assert!(seeds[1]["setup"].as_str().unwrap().ends_with("seed 6"));
}

/// A router run as `roomrouter serve` under `ulimit -n 64` with `config` (a file in a
/// directory named after `tag`), and node n1 (a live upstream) reporting to it: the node,
/// the process, the router's URL and the directory, for the caller to remove.
async fn short_of_sockets(
    tag: &str,
    config: &str,
) -> (upstream::Upstream, Reaper, String, std::path::PathBuf) {
    let up = upstream::Upstream::start("n1").await;
    let addr = free_addr();
    let dir = std::env::temp_dir().join(format!("rr-{tag}-{}-{}", std::process::id(), addr.port()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("router.toml");
    std::fs::write(&file, config).unwrap();
    let script = format!(
        "ulimit -n 64 && exec {BIN} serve --config {} --listen {addr}",
        file.display()
    );
    let router = Reaper(
        with_credentials(Command::new("sh").args(["-c", &script]))
            .spawn()
            .unwrap(),
    );
    let url = format!("http://{addr}");
    wait_http(&format!("{url}/healthz")).await;
    let hb = serde_json::json!({"url": up.url, "capacity": 1000, "load": 0});
    heartbeat_at(&url, NODE_TOKEN, "n1", &hb).await;
    (up, router, url, dir)
}

/// A router short of file descriptors (here `ulimit -n 64`) cannot open connections to a
/// node for an HTTP/2 client's many streams at once. Those requests fail (`502`), but the
/// node is not to blame: it is not marked unhealthy, and the requests after the burst reach
/// it. Before, every failed connect counted against the node, which was taken for dead and
/// its meetings' joins refused (a review's finding).
#[tokio::test]
async fn a_router_short_of_sockets_does_not_blame_the_node() {
    let (_up, _router, url, dir) = short_of_sockets(
        "short",
        "[front_door]\nmode = \"proxy\"\n[placement]\nstartup_hold = \"0s\"\n\
         [proxy]\nfailures_to_unhealthy = 2\n[server]\nworker_threads = 1\n",
    )
    .await;
    // One HTTP/2 connection, 150 streams each held 1 s by the node: one upstream connection
    // each, far more than 64 descriptors.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..150 {
        let (h2, url) = (h2.clone(), url.clone());
        burst.spawn(async move {
            let r = h2
                .get(format!("{url}/rooms/busy?hold=1000&i={i}"))
                .send()
                .await;
            r.map(|r| r.status().as_u16()).unwrap_or(0)
        });
    }
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    while let Some(s) = burst.join_next().await {
        *statuses.entry(s.unwrap()).or_default() += 1;
    }
    assert!(
        statuses.get(&502).is_some_and(|n| *n > 0),
        "the limit was not reached (nothing to show): {statuses:?}"
    );
    let node: serde_json::Value = client()
        .get(format!("{url}/v1/nodes/n1"))
        .bearer_auth(ADMIN)
        .send_json()
        .await;
    assert_eq!(node["healthy"], true, "the node was blamed: {statuses:?}");
    let m = client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("roomrouter_proxy_nodes_marked_unhealthy_total 0"),
        "{m}"
    );
    let after = client()
        .get(format!("{url}/rooms/busy"))
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 200);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same for the active health check: a router out of file descriptors (`ulimit -n 64`,
/// its slots taken by idle client connections) cannot open its probes' connections. That
/// says nothing about the node, which is not marked (before, two rounds of such probes
/// marked every node unhealthy, and a router short of sockets refused every room: a
/// review's finding); the probes not made are counted.
#[tokio::test]
async fn a_router_short_of_sockets_does_not_fail_its_health_probes() {
    let (_up, _router, url, dir) = short_of_sockets(
        "probe-short",
        "[placement]\nstartup_hold = \"0s\"\nheartbeat_timeout = \"30s\"\n\
         [health]\nprobe_interval = \"100ms\"\nprobe_timeout = \"100ms\"\nfailures = 2\n\
         [server]\nworker_threads = 1\n",
    )
    .await;
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    // Idle connections take every descriptor the router has left, for 1.5 s (15 rounds).
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(idle);
    // The router serves again once they are gone (its header timeout closes the rest).
    let metric = |m: &str, name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(-1.0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let m = loop {
        let got = client().get(format!("{url}/metrics")).send().await;
        if let Ok(r) = got {
            break r.text().await.unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the router does not serve again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        metric(&m, "roomrouter_health_probes_short_total") > 0.0,
        "the limit was not reached (nothing to show): {m}"
    );
    assert_eq!(
        metric(&m, "roomrouter_health_probe_nodes_marked_unhealthy_total"),
        0.0,
        "{m}"
    );
    let node: serde_json::Value = client()
        .get(format!("{url}/v1/nodes/n1"))
        .bearer_auth(ADMIN)
        .send_json()
        .await;
    assert_eq!(node["healthy"], true, "the node was blamed");
    let _ = std::fs::remove_dir_all(&dir);
}
