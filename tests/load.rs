//! The load harness end to end, in small bounded runs over loopback: a clean run finds no
//! split, and deliberately split rooms (two independent routers for the same rooms; a node
//! disabled while its rooms still have participants) are caught, in redirect and in proxy
//! mode; joins the hard stop drops, and timeouts, are accounted for without skewing the
//! figures.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use roomrouter::config::FrontDoorMode;
use roomrouter::load::engine::{OwnCluster, NOT_SENT, NO_ANSWER, TIMEOUT};
use roomrouter::load::{run, ClusterSpec, Dist, LoadConfig, LoadReport, WorkloadSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(rate: f64, secs: u64, rooms: u32) -> LoadConfig {
    LoadConfig {
        routers: vec![],
        cluster: ClusterSpec {
            nodes: 3,
            capacity: None,
            heartbeat: Duration::from_millis(200),
            mode: FrontDoorMode::Redirect,
            probe: None,
            new_room_reserve: None,
        },
        workload: WorkloadSpec {
            rate,
            duration: Duration::from_secs(secs),
            max_joins: 10_000,
            rooms,
            zipf_s: 1.1,
            size: Dist::Uniform { lo: 2.0, hi: 5.0 },
            stay: Dist::Exp { mean: 1.0 },
            spread: Duration::from_millis(500),
            bursts: vec![],
            seed: 3,
        },
        connections: 16,
        timeout: Duration::from_secs(5),
        follow: true,
        size_hints: false,
        path: "/rooms/{room}".into(),
        admin_token: None,
        add_node_at: None,
        kill_node_at: None,
        sample_every: Duration::from_millis(250),
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_started_run_with_scale_out_and_failure_splits_nothing() {
    let mut cfg = config(80.0, 3, 40);
    cfg.workload.bursts = vec![roomrouter::load::Burst::parse("1:40").unwrap()];
    cfg.add_node_at = Some(Duration::from_millis(800));
    cfg.kill_node_at = Some(Duration::from_millis(1_500));
    let r = tokio::time::timeout(Duration::from_secs(30), run(cfg))
        .await
        .expect("bounded")
        .unwrap();
    assert!(r.scheduled >= 240, "{}", r.table());
    assert_eq!(r.completed, r.scheduled, "{}", r.table());
    assert!(r.ok as f64 >= 0.95 * r.scheduled as f64, "{}", r.table());
    assert!(r.node_joins > 0 && r.leaves > 0, "{}", r.table());
    assert!(r.latency_us.count == r.completed && r.latency_us.p50 > 0);
    assert!(r.latency_us.p50 <= r.latency_us.p99 && r.latency_us.p99 <= r.latency_us.max);
    assert_eq!(r.split_rooms, 0, "{}", r.table());
    assert_eq!(r.rooms_moved_after_add, Some(0), "{}", r.table());
    assert_eq!(r.rooms_moved_after_kill, Some(0), "{}", r.table());
    assert!(r.rooms_on_killed_node.is_some());
    assert_eq!(r.events.len(), 2, "{:?}", r.events);
    let u = r.utilization.as_ref().expect("sampled the demo nodes");
    assert!(u.peak_max > 0.0 && !u.samples.is_empty());
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["split_rooms"], 0);
    assert!(json["latency_us"]["p99"].as_u64().is_some());
}

/// The same run through a proxy-mode router the harness starts: every join is the node's
/// own answer carried by the router, participants leave at the nodes (the harness asks the
/// router's admin API where they are, again for the node added mid-run), and neither the
/// new node nor the dead one moves a room in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_started_proxy_run_with_scale_out_and_failure_splits_nothing() {
    let mut cfg = config(80.0, 3, 40);
    cfg.cluster.mode = FrontDoorMode::Proxy;
    cfg.workload.stay = Dist::Exp { mean: 0.5 };
    cfg.workload.bursts = vec![roomrouter::load::Burst::parse("1:40").unwrap()];
    cfg.add_node_at = Some(Duration::from_millis(800));
    cfg.kill_node_at = Some(Duration::from_millis(1_500));
    let r = bounded(cfg).await;
    assert!(r.target.contains("proxy-mode"), "{}", r.table());
    assert!(r.scheduled >= 240, "{}", r.table());
    assert_eq!(r.completed, r.scheduled, "{}", r.table());
    // Joins to the killed node until its heartbeats time out (0.6 s) are the router's 502s.
    assert!(r.ok as f64 >= 0.8 * r.scheduled as f64, "{}", r.table());
    // Every proxied 2xx is a join on a node, nothing to follow.
    assert_eq!(r.node_joins, r.ok, "{}", r.table());
    assert!(r.leaves > 0, "{}", r.table());
    assert_eq!(r.leaves_through_router, 0, "{}", r.table());
    assert_eq!(r.split_rooms, 0, "{}", r.table());
    assert_eq!(r.rooms_moved_after_add, Some(0), "{}", r.table());
    assert_eq!(r.rooms_moved_after_kill, Some(0), "{}", r.table());
    assert!(
        r.rooms_on_killed_node.is_some_and(|n| n > 0),
        "the killed node is named as the answers name it: {}",
        r.table()
    );
    assert_eq!(r.events.len(), 2, "{:?}", r.events);
}

/// A redirect-mode router learns of a crash from its heartbeats timing out (3 s here, more
/// than the rest of the run): until then the harness follows redirects to the dead node and
/// finds nothing. With the router probing its nodes every 100 ms, it stops sending users
/// there within a few probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_cut_the_joins_a_redirect_mode_router_sends_to_a_dead_node() {
    let mut lost = Vec::new();
    for probe in [None, Some(Duration::from_millis(100))] {
        let mut cfg = config(80.0, 3, 40);
        cfg.cluster.heartbeat = Duration::from_secs(1);
        cfg.cluster.probe = probe;
        cfg.kill_node_at = Some(Duration::from_secs(1));
        let r = bounded(cfg).await;
        assert_eq!(r.split_rooms, 0, "{}", r.table());
        assert_eq!(r.rooms_moved_after_kill, Some(0), "{}", r.table());
        let connect = r.node_errors.get("join connect").copied().unwrap_or(0);
        lost.push((connect, r.table()));
    }
    let (without, with) = (&lost[0], &lost[1]);
    assert!(
        without.0 >= 20,
        "without probes the dead node gets its share of 2 s of joins: {}",
        without.1
    );
    assert!(
        with.0 * 3 <= without.0,
        "with probes: {} lost, without: {}\n{}",
        with.0,
        without.0,
        with.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_independent_routers_split_rooms_and_the_detector_says_so() {
    // Each router has its own memory store and its own nodes: the same room gets a node from
    // each, which is exactly a split room. The detector knows a node by its id, so the two
    // clusters' nodes have ids of their own.
    let (a, a_nodes) = cluster(common::config(), &["a-1", "a-2"]).await;
    let (b, b_nodes) = cluster(common::config(), &["b-1", "b-2"]).await;
    let mut cfg = config(100.0, 1, 10);
    cfg.routers = vec![a.url.clone(), b.url.clone()];
    cfg.follow = false;
    let r = bounded(cfg).await;
    for n in a_nodes.into_iter().chain(b_nodes) {
        n.stop().await;
    }
    a.stop().await;
    b.stop().await;
    assert_eq!(r.ok, 100, "{}", r.table());
    assert!(r.split_rooms >= 5, "{}", r.table());
    let s = &r.split_examples[0];
    assert!(
        s.nodes.iter().any(|n| n.starts_with("a-")) && s.nodes.iter().any(|n| n.starts_with("b-")),
        "{s:?}"
    );
    assert!(r.table().contains("SPLIT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_disabled_under_its_participants_shows_as_split() {
    let c = redirect_cluster().await;
    let mut cfg = config(40.0, 3, 6);
    cfg.routers = vec![c.url.clone()];
    cfg.workload.stay = Dist::Fixed { value: 60.0 }; // nobody leaves during the run
    let admin = c.admin_token.clone();
    let url = c.url.clone();
    let disable = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let r = reqwest::Client::new()
            .post(format!("{url}/v1/nodes/media-1/disable"))
            .bearer_auth(admin)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    });
    let r = tokio::time::timeout(Duration::from_secs(30), run(cfg))
        .await
        .expect("bounded")
        .unwrap();
    disable.await.unwrap();
    c.stop().await;
    assert!(r.split_rooms >= 1, "{}", r.table());
    assert!(
        r.split_examples.iter().all(|s| s.at_ms >= 1_200),
        "{:?}",
        r.split_examples
    );
    // Named by its id, as the router's answers name it.
    assert!(r.split_examples[0].nodes.iter().any(|n| n == "media-1"));
}

/// A redirect-mode cluster of the harness's own: two demo nodes of capacity 1000.
async fn redirect_cluster() -> OwnCluster {
    let mut spec = config(1.0, 1, 1).cluster;
    spec.nodes = 2;
    OwnCluster::start(&spec, 1000.0, 1).await.unwrap()
}

async fn bounded(cfg: LoadConfig) -> LoadReport {
    tokio::time::timeout(Duration::from_secs(30), run(cfg))
        .await
        .expect("bounded")
        .unwrap()
}

/// A router of config `c` with demo nodes `ids` of capacity 1000.
async fn cluster(
    c: roomrouter::config::Config,
    ids: &[&str],
) -> (common::TestRouter, Vec<roomrouter::demo::node::DemoNode>) {
    let r = common::TestRouter::start(c).await;
    let mut nodes = Vec::new();
    for id in ids {
        nodes.push(r.node(id, 1000.0).await);
    }
    (r, nodes)
}

/// A proxy-mode router (see `common::proxy_config`) with demo nodes `ids` of capacity 1000.
async fn proxy_cluster(
    ids: &[&str],
) -> (common::TestRouter, Vec<roomrouter::demo::node::DemoNode>) {
    cluster(common::proxy_config(), ids).await
}

/// One proxy-mode run of 2 s against one router with two nodes; participants stay 0.3 s on
/// average, so most leave during the run.
async fn proxy_run(admin_token: Option<&str>) {
    let (router, nodes) = proxy_cluster(&["media-1", "media-2"]).await;
    let mut cfg = config(40.0, 2, 10);
    cfg.routers = vec![router.url.clone()];
    cfg.workload.stay = Dist::Exp { mean: 0.3 };
    cfg.admin_token = admin_token.map(str::to_string);
    let r = bounded(cfg).await;
    let accepted: u64 = nodes.iter().map(|n| n.counters().0).sum();
    let still_there: u64 = nodes.iter().map(|n| n.load() as u64).sum();
    for n in nodes {
        n.stop().await;
    }
    router.stop().await;
    assert_eq!(r.scheduled, 80, "{}", r.table());
    assert_eq!(r.ok, r.scheduled, "{}", r.table());
    // Every proxied 200 is the node's own answer to a join: counted as one.
    assert_eq!(r.node_joins, r.ok, "{}", r.table());
    assert_eq!(accepted, r.node_joins, "{}", r.table());
    // Participants leave, so the nodes' load goes down again.
    assert!(r.leaves >= 20, "{}", r.table());
    assert!(r.node_errors.is_empty(), "{}", r.table());
    assert_eq!(still_there, r.node_joins - r.leaves, "{}", r.table());
    match admin_token {
        // The harness knows the nodes' URLs: the router never sees a leave.
        Some(_) => assert_eq!(r.leaves_through_router, 0, "{}", r.table()),
        None => assert_eq!(r.leaves_through_router, r.leaves, "{}", r.table()),
    }
    assert_eq!(r.split_rooms, 0, "{}", r.table());
    assert!(r.rooms_seen >= 5, "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_mode_joins_count_and_participants_leave_through_the_router() {
    proxy_run(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_mode_participants_leave_at_the_nodes_the_admin_api_lists() {
    proxy_run(Some(common::ADMIN)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_independent_proxy_routers_split_rooms_and_the_detector_says_so() {
    // As in redirect mode: each router places the same rooms on its own nodes. In proxy
    // mode the split shows in the joins the routers carried to the nodes (following on).
    let (a, a_nodes) = proxy_cluster(&["a-1", "a-2"]).await;
    let (b, b_nodes) = proxy_cluster(&["b-1", "b-2"]).await;
    let mut cfg = config(40.0, 1, 10);
    cfg.routers = vec![a.url.clone(), b.url.clone()];
    cfg.workload.stay = Dist::Fixed { value: 60.0 };
    let r = bounded(cfg).await;
    for n in a_nodes.into_iter().chain(b_nodes) {
        n.stop().await;
    }
    a.stop().await;
    b.stop().await;
    assert_eq!(r.ok, 40, "{}", r.table());
    assert!(r.split_rooms >= 3, "{}", r.table());
    assert_eq!(r.node_joins, 40, "{}", r.table());
    let s = &r.split_examples[0];
    assert!(
        s.nodes.iter().any(|n| n.starts_with("a-")) && s.nodes.iter().any(|n| n.starts_with("b-")),
        "{s:?}"
    );
}

/// A stand-in router on loopback for decisions-only runs: answers each request `307` (to a
/// node nobody follows) after `delay`; with `hang_first`, the very first request gets no
/// answer at all (the connection stays open until the client gives up). Bounded: at most
/// 1 000 connections, 10 s per read, 16 KiB per request head.
struct Scripted {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn scripted(delay: Duration, hang_first: bool) -> Scripted {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn(async move {
        for _ in 0..1_000 {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    if !read_head(&mut conn, &mut buf).await {
                        return;
                    }
                    if hang_first && requests.fetch_add(1, Ordering::SeqCst) == 0 {
                        // No answer: wait for the client to give up and close.
                        let mut chunk = [0u8; 64];
                        let _ =
                            tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
                                .await;
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    let answer = "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:9/rooms/x\r\nx-room-node: media-1\r\ncontent-length: 0\r\n\r\n";
                    if conn.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Scripted { url, task }
}

/// Reads one request head (GETs carry no body) from `conn` into `buf` and takes it out;
/// `false` if the client closed, 10 s passed without a byte, or the head is over 16 KiB.
async fn read_head(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 2048];
        match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 && buf.len() + n <= 16 * 1024 => buf.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    buf.drain(..end);
    true
}

/// A stand-in proxy-mode router whose answers stall: each request gets a `200` head naming
/// node `media-1` with a 100-byte body, of which only 10 bytes come; then nothing until
/// the client closes (or 10 s). Bounded: at most 100 connections.
async fn stalled_body() -> Scripted {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        for _ in 0..100 {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if !read_head(&mut conn, &mut buf).await {
                    return;
                }
                let answer = "HTTP/1.1 200 OK\r\nx-room-node: media-1\r\ncontent-length: 100\r\n\r\n0123456789";
                if conn.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                let mut chunk = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk)).await;
            });
        }
    });
    Scripted { url, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_whose_answer_body_stalls_past_the_timeout_is_a_timeout_not_an_answer() {
    // 5 joins; each answer's head comes at once, its body never ends: with a 1 s timeout,
    // every join times out. None is an answer, none enters the latency figures or the split
    // detector as a node's join, and the latency says it misses them.
    let server = stalled_body().await;
    let mut cfg = config(5.0, 1, 10);
    cfg.routers = vec![server.url.clone()];
    cfg.follow = false;
    cfg.timeout = Duration::from_secs(1);
    let r = bounded(cfg).await;
    assert_eq!(r.scheduled, 5, "{}", r.table());
    assert_eq!(r.completed, 5, "{}", r.table());
    assert_eq!(r.errors.get(TIMEOUT), Some(&5), "{}", r.table());
    assert_eq!((r.ok, r.answered, r.timed_out), (0, 0, 5), "{}", r.table());
    assert_eq!(r.latency_us.count, 0, "{}", r.table());
    assert_eq!(r.node_joins, 0, "{}", r.table());
    assert!(!r.latency_complete, "{}", r.table());
}

/// A proxy-mode router takes each client connection for one participant: a connection's
/// second request for a room it joined is that participant's session, never refused. The
/// harness's participants are different users, so each join is on a connection of its own:
/// one room on a node of capacity 5, 40 joins that all stay, one decision in flight at a
/// time (a shared keep-alive connection would carry them all): the node fills up and
/// refuses the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_mode_joins_are_each_a_participant_and_a_full_node_refuses_them() {
    let mut cfg = config(20.0, 2, 1);
    cfg.cluster.mode = FrontDoorMode::Proxy;
    cfg.cluster.nodes = 1;
    cfg.cluster.capacity = Some(5.0);
    cfg.connections = 1;
    cfg.workload.stay = Dist::Fixed { value: 60.0 };
    let r = bounded(cfg).await;
    assert_eq!(r.scheduled, 40, "{}", r.table());
    assert_eq!(r.completed, 40, "{}", r.table());
    let full = r.errors.get("503 node_full").copied().unwrap_or(0);
    assert!(full >= 30, "{}", r.table());
    assert_eq!(r.ok + full, 40, "{}", r.table());
    assert!(r.ok <= 6, "{}", r.table());
    assert_eq!(r.node_joins, r.ok, "{}", r.table());
    let u = r.utilization.as_ref().expect("sampled the demo node");
    assert!(u.peak_max <= 1.2, "{}", r.table());
    assert_eq!(r.split_rooms, 0, "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_the_hard_stop_drops_are_errors_and_the_latency_says_it_is_incomplete() {
    // One connection, 1.2 s per answer, 10 joins planned within 1 s, 2 s timeout: the hard
    // stop (1 + 2 + 1 s) comes while the 4th join waits for its answer and the rest were
    // never sent. They are the most delayed joins of the run.
    let server = scripted(Duration::from_millis(1_200), false).await;
    let mut cfg = config(10.0, 1, 10);
    cfg.routers = vec![server.url.clone()];
    cfg.follow = false;
    cfg.connections = 1;
    cfg.timeout = Duration::from_secs(2);
    let r = bounded(cfg).await;
    assert_eq!(r.scheduled, 10, "{}", r.table());
    assert!(r.not_sent >= 1, "{}", r.table());
    assert!(r.aborted_at_stop >= 1, "{}", r.table());
    assert_eq!(
        r.completed + r.not_sent + r.aborted_at_stop,
        r.scheduled,
        "{}",
        r.table()
    );
    assert_eq!(r.errors.get(NOT_SENT), Some(&r.not_sent), "{}", r.table());
    assert_eq!(
        r.errors.get(NO_ANSWER),
        Some(&r.aborted_at_stop),
        "{}",
        r.table()
    );
    assert!(!r.latency_complete);
    assert!(r.table().contains("latency INCOMPLETE"), "{}", r.table());
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["latency_complete"], false);
    assert_eq!(json["not_sent"], r.not_sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_after_the_run_neither_stretches_the_throughput_nor_enters_the_latency_figures() {
    // 20 joins within 1 s, all answered at once but the first, which times out 2 s later.
    let server = scripted(Duration::ZERO, true).await;
    let mut cfg = config(20.0, 1, 10);
    cfg.routers = vec![server.url.clone()];
    cfg.follow = false;
    cfg.timeout = Duration::from_secs(2);
    let r = bounded(cfg).await;
    assert_eq!((r.completed, r.answered), (20, 19), "{}", r.table());
    assert_eq!(r.errors.get("timeout"), Some(&1), "{}", r.table());
    // The timed-out join is the run's slowest, and has no figure: the latency says so.
    assert_eq!(r.timed_out, 1, "{}", r.table());
    assert!(!r.latency_complete, "{}", r.table());
    assert!(r.table().contains("1 timed out"), "{}", r.table());
    // Divided by the time to the last answer (~0.95 s), not by the timeout's end (~2 s).
    assert!(r.elapsed_s < 1.5, "{}", r.table());
    assert!(r.throughput_per_s > 15.0, "{}", r.table());
    // The timeout is an error, not a 2 s latency.
    assert_eq!(r.latency_us.count, 19, "{}", r.table());
    assert!(r.latency_us.max < 1_500_000, "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_errors_not_fast_latency() {
    // Half the joins go to an address nothing listens on: refused within microseconds.
    let server = scripted(Duration::from_millis(20), false).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = config(20.0, 1, 10);
    cfg.routers = vec![server.url.clone(), format!("http://{dead}")];
    cfg.follow = false;
    let r = bounded(cfg).await;
    assert_eq!(r.completed, 20, "{}", r.table());
    assert_eq!(r.errors.get("connect"), Some(&10), "{}", r.table());
    assert_eq!(r.latency_us.count, 10, "{}", r.table());
    assert_eq!(r.service_us.count, 10, "{}", r.table());
    // Every answer took the server's 20 ms: the refusals did not pull the median down.
    assert!(r.latency_us.p50 >= 20_000, "{}", r.table());
}

/// A cluster too small for the load refuses most joins (`503 no_capacity`, quick to give):
/// the answered rate counts them, the ok rate does not, and the report shows both, so a
/// run's throughput is not read as seats it did not give.
#[tokio::test]
async fn refusals_count_in_the_answered_rate_and_not_in_the_ok_rate() {
    let mut cfg = config(100.0, 1, 50);
    cfg.cluster.capacity = Some(4.0);
    let r = bounded(cfg).await;
    let refused = r.errors.get("503 no_capacity").copied().unwrap_or(0);
    assert!(refused > 0, "the cluster refused nothing: {}", r.table());
    assert!(r.ok < r.answered, "{}", r.table());
    assert!(r.ok_per_s < r.throughput_per_s, "{}", r.table());
    let expected = r.ok as f64 / r.elapsed_s;
    assert!((r.ok_per_s - expected).abs() < 1e-6, "{}", r.table());
    assert!(
        r.table().contains(&format!("{:.0} ok/s", r.ok_per_s)),
        "{}",
        r.table()
    );
}

/// A router that stops answering holds only its own share of the connections: the joins to
/// the other routers go out on time (a failure-injection run, one of three routers frozen
/// 10 s: 65 joins to the two healthy ones timed out behind the frozen one's, which held
/// every connection until their timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_stops_answering_does_not_hold_up_the_joins_to_the_others() {
    let good = scripted(Duration::ZERO, false).await;
    // Bound and never accepted: the kernel completes the connections, nobody reads.
    let frozen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(40.0, 2, 10);
    cfg.routers = vec![
        good.url.clone(),
        format!("http://{}", frozen.local_addr().unwrap()),
    ];
    cfg.follow = false;
    cfg.connections = 4;
    cfg.timeout = Duration::from_secs(3);
    let r = bounded(cfg).await;
    drop(frozen);
    assert_eq!(r.scheduled, 80, "{}", r.table());
    assert_eq!(
        r.ok,
        40,
        "every join to the answering router: {}",
        r.table()
    );
    assert_eq!(
        r.completed + r.not_sent + r.aborted_at_stop,
        80,
        "{}",
        r.table()
    );
}
