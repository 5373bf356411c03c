//! The Redis store behind Redis Sentinel: each test starts its own master, replica and
//! sentinel on loopback (skipped with a printed reason, or failed under
//! `ROOMROUTER_REQUIRE_REDIS`, when `redis-server` is missing). Routers configured with
//! `store.sentinels` find the master through the sentinel, and follow it through a
//! failover, whether the sentinel is asked to fail over or the master dies.

mod redis_support;

use std::collections::HashMap;
use std::time::Duration;

use redis_support::*;
use roomrouter::config::Config;
use roomrouter::store::{self, AnyStore, PinStore, StoreHealth};

const MASTER: &str = "mymaster";

/// A master, a replica in sync with it, and a sentinel that knows both. Every process is
/// killed when this is dropped, also when the test fails.
struct Topology {
    master: PrivateRedis,
    replica: PrivateRedis,
    sentinel: PrivateRedis,
}

async fn query<T: redis::FromRedisValue>(url: &str, cmd: &redis::Cmd) -> Option<T> {
    let client = redis::Client::open(url).ok()?;
    let mut c = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut c))
        .await
        .ok()?
        .ok()
}

impl Topology {
    /// Starts the three processes and waits (bounded) until the replica has synced and the
    /// sentinel has found it. `None` (after `skip`) without `redis-server`.
    async fn start(test: &str) -> Option<Topology> {
        if !have_redis_server() {
            skip(
                test,
                "no redis-server on PATH to start a master, a replica and a sentinel",
            );
            return None;
        }
        let master = PrivateRedis::start().expect("master starts");
        let replica = PrivateRedis::start_replica_of(&master).expect("replica starts");
        assert!(
            eventually(Duration::from_secs(15), || async {
                query::<String>(&replica.url(), redis::cmd("INFO").arg("replication"))
                    .await
                    .is_some_and(|i| i.contains("master_link_status:up"))
            })
            .await,
            "the replica synced with the master"
        );
        let sentinel = PrivateRedis::start_sentinel(MASTER, &master).expect("sentinel starts");
        // The sentinel reads INFO from the replica every 10 s, and refuses a failover while
        // its last read is older than 5 s; every 100 ms keeps the test short. A Redis
        // before 7.0 refuses SENTINEL DEBUG, and the waits below are long enough without
        // it. The demotion of an old master that is still up keeps its default (about 8 s
        // after the switch), which the failover test relies on.
        let _ = query::<String>(
            &sentinel.url(),
            redis::cmd("SENTINEL")
                .arg("DEBUG")
                .arg("info-period")
                .arg(100),
        )
        .await;
        let t = Topology {
            master,
            replica,
            sentinel,
        };
        assert!(
            eventually(Duration::from_secs(20), || async {
                query::<Vec<HashMap<String, String>>>(
                    &t.sentinel.url(),
                    redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER),
                )
                .await
                .is_some_and(|r| {
                    r.iter()
                        .any(|r| r.get("port") == Some(&t.replica.port.to_string()))
                })
            })
            .await,
            "the sentinel found the replica"
        );
        Some(t)
    }

    /// The port of the master the sentinel names now.
    async fn sentinel_names(&self) -> Option<u16> {
        let addr: Vec<String> = query(
            &self.sentinel.url(),
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER),
        )
        .await?;
        addr.get(1)?.parse().ok()
    }

    /// Asks the sentinel to fail over and waits until it names the replica as master, asking
    /// again while it does not: it refuses while its last word from the replica is too old,
    /// and a failover it accepted can still fail (on a busy machine its view of the replica
    /// may be stale when it picks one; it gives up after the failover timeout, 5 s). At most
    /// a minute in all.
    async fn fail_over(&self) {
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < until {
            let _ = query::<String>(
                &self.sentinel.url(),
                redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER),
            )
            .await;
            if eventually(Duration::from_secs(7), || async {
                self.sentinel_names().await == Some(self.replica.port)
            })
            .await
            {
                return;
            }
        }
        panic!("the sentinel names the replica as master");
    }

    /// A router configuration that knows only the sentinel.
    fn config(&self, prefix: &str) -> Config {
        let mut cfg = config("redis://127.0.0.1:6379", prefix);
        cfg.store.sentinels = vec![self.sentinel.url()];
        cfg.store.sentinel_master = MASTER.into();
        cfg.validate().expect("sentinel config is valid");
        cfg
    }
}

/// What the server says it is (`master`, `slave`).
async fn role(server: &PrivateRedis) -> Option<String> {
    let role: Vec<redis::Value> = query(&server.url(), &redis::cmd("ROLE")).await?;
    match role.first()? {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Where the router's store sends its commands now (`host:port`).
fn server_of(s: &Served) -> String {
    match s.app.router.store() {
        AnyStore::Redis(r) => r.server(),
        AnyStore::Memory(_) => panic!("the router runs on the memory store"),
    }
}

fn at(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

async fn heartbeats(c: &reqwest::Client, routers: &[&Served]) {
    for r in routers {
        for n in ["n1", "n2", "n3"] {
            heartbeat(c, &r.base(), n, 0.0, &[]).await;
        }
    }
}

/// After `t.fail_over()`: the router follows the new master while the old one, still up,
/// has not been demoted yet (the sentinel does that about 8 s after the switch, and cuts
/// the old master's clients then, which any router would notice); `late` says what it
/// means if it had.
async fn follows_before_demotion(t: &Topology, router: &Served, late: &str) {
    assert!(
        follows(router, t.replica.port).await,
        "the router follows the new master (sends to {}, health {:?})",
        server_of(router),
        router.app.router.store().health()
    );
    assert_eq!(role(&t.master).await.as_deref(), Some("master"), "{late}");
}

/// Waits (at most 30 s) until the router sends its commands to the server on `port` and
/// is healthy again.
async fn follows(router: &Served, port: u16) -> bool {
    eventually(Duration::from_secs(30), || async {
        server_of(router) == at(port) && router.app.router.store().health() == StoreHealth::Ok
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_finds_the_master_through_the_sentinel_and_pins_land_there() {
    let Some(t) = Topology::start("sentinel_find_master").await else {
        return;
    };
    let p = prefix("sentinel-find");
    let a = serve(t.config(&p)).await;
    assert_eq!(
        server_of(&a),
        at(t.master.port),
        "commands go to the master"
    );
    let c = client();
    heartbeats(&c, &[&a]).await;
    let mut placed = HashMap::new();
    for i in 0..20 {
        let room = format!("room-{i}");
        let node = place(&c, &a.base(), &room).await.expect("placed");
        placed.insert(room, node);
    }
    for (room, node) in &placed {
        let stored = redis_pin(&t.master.url(), &room_key(&p, room)).await;
        assert!(
            stored
                .as_deref()
                .is_some_and(|v| v.starts_with(&format!("{node}|"))),
            "{room}: pinned to {node} in the master, found {stored:?}"
        );
        assert_eq!(
            &place(&c, &a.base(), room).await.unwrap(),
            node,
            "{room} stays put"
        );
    }

    // A master name the sentinel does not monitor stops the router at start, naming it.
    let mut wrong = t.config(&prefix("sentinel-wrong"));
    wrong.store.sentinel_master = "not-monitored".into();
    wrong.store.connect_timeout = Duration::from_millis(500);
    let e = match store::open(&wrong).await {
        Ok(_) => panic!("a router started on a master nobody monitors"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("store.sentinels") && e.contains("not-monitored"),
        "{e}"
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sentinel_failover_the_router_follows_the_new_master() {
    let Some(t) = Topology::start("sentinel_failover").await else {
        return;
    };
    let p = prefix("sentinel-failover");
    let a = serve(t.config(&p)).await;
    let c = client();
    heartbeats(&c, &[&a]).await;
    let mut before = HashMap::new();
    for i in 0..30 {
        let room = format!("old-{i}");
        before.insert(room.clone(), place(&c, &a.base(), &room).await.unwrap());
    }

    t.fail_over().await;
    // It moved on the sentinel's announcement: the old master, still up, has not yet been
    // told to become a replica, so it would still have taken writes.
    follows_before_demotion(&t, &a, "the router moved before the old master was demoted").await;

    heartbeats(&c, &[&a]).await;
    let node = place(&c, &a.base(), "new-after-failover").await.unwrap();
    let stored = redis_pin(&t.replica.url(), &room_key(&p, "new-after-failover")).await;
    assert!(
        stored
            .as_deref()
            .is_some_and(|v| v.starts_with(&format!("{node}|"))),
        "the new room is pinned in the new master: {stored:?}"
    );
    for (room, node) in &before {
        assert_eq!(&place(&c, &a.base(), room).await.unwrap(), node, "{room}");
    }
    // A router started now knows only what the new master holds: the old pins are there.
    let b = serve(t.config(&p)).await;
    assert_eq!(server_of(&b), at(t.replica.port));
    heartbeats(&c, &[&b]).await;
    for (room, node) in &before {
        assert_eq!(
            &place(&c, &b.base(), room).await.unwrap(),
            node,
            "{room} via a router started after the failover"
        );
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_master_dies_the_router_reconnects_to_the_replica_the_sentinel_promotes() {
    let Some(mut t) = Topology::start("sentinel_master_dies").await else {
        return;
    };
    let p = prefix("sentinel-dies");
    let a = serve(t.config(&p)).await;
    let c = client();
    heartbeats(&c, &[&a]).await;
    let mut before = HashMap::new();
    for i in 0..30 {
        let room = format!("old-{i}");
        before.insert(room.clone(), place(&c, &a.base(), &room).await.unwrap());
    }

    t.master.stop();
    // The router notices and serves from its cache; new rooms are decided locally.
    assert!(
        eventually(Duration::from_secs(10), || async {
            matches!(a.app.router.store().health(), StoreHealth::Degraded(_))
        })
        .await,
        "the router noticed the master is gone"
    );
    for (room, node) in &before {
        assert_eq!(&place(&c, &a.base(), room).await.unwrap(), node, "{room}");
    }
    let during = place(&c, &a.base(), "new-during-failover").await.unwrap();

    assert!(
        eventually(Duration::from_secs(30), || async {
            t.sentinel_names().await == Some(t.replica.port)
        })
        .await,
        "the sentinel promoted the replica"
    );
    assert!(
        follows(&a, t.replica.port).await,
        "the router reconnects to the promoted replica, not the dead address (sends to {}, health {:?})",
        server_of(&a),
        a.app.router.store().health()
    );
    heartbeats(&c, &[&a]).await;
    let after = place(&c, &a.base(), "new-after-failover").await.unwrap();
    for (room, node) in [
        ("new-during-failover", &during),
        ("new-after-failover", &after),
    ] {
        let stored = redis_pin(&t.replica.url(), &room_key(&p, room)).await;
        assert!(
            stored
                .as_deref()
                .is_some_and(|v| v.starts_with(&format!("{node}|"))),
            "{room} is pinned in the new master: {stored:?}"
        );
    }
    for (room, node) in &before {
        let stored = redis_pin(&t.replica.url(), &room_key(&p, room)).await;
        assert!(
            stored
                .as_deref()
                .is_some_and(|v| v.starts_with(&format!("{node}|"))),
            "{room} is still pinned in the new master: {stored:?}"
        );
        assert_eq!(&place(&c, &a.base(), room).await.unwrap(), node, "{room}");
    }
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_announced_while_the_watch_was_deaf_is_still_followed_at_once() {
    // The router reaches the sentinel through a forwarder that then silences its failover
    // subscription: the socket stays open and the announcement never arrives, as when a
    // NAT entry expires. The watch's ping finds it deaf; the new subscription asks where the
    // master is, so the router still moves before the old master is demoted (about 8 s
    // after the switch, when the sentinel would also cut its clients).
    let Some(t) = Topology::start("sentinel_deaf_watch").await else {
        return;
    };
    let p = prefix("sentinel-deaf-watch");
    let forwarder = Partition::to(at(t.sentinel.port)).await;
    let mut cfg = t.config(&p);
    cfg.store.sentinels = vec![format!("redis://{}", forwarder.addr)];
    cfg.store.resync_interval = Duration::from_millis(500);
    cfg.validate().unwrap();
    let a = serve(cfg).await;
    assert_eq!(server_of(&a), at(t.master.port));
    assert!(
        eventually(Duration::from_secs(10), || async {
            forwarder.silence_subscriptions() > 0
        })
        .await,
        "the router subscribed to the sentinel's announcements"
    );
    t.fail_over().await;
    follows_before_demotion(
        &t,
        &a,
        "the router moved only when the old master was demoted: the deaf watch went unnoticed",
    )
    .await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_turned_replica_holds_new_rooms_instead_of_deciding_them_alone() {
    // The master is demoted by hand while the sentinel is gone, so the router cannot find
    // the new master: the server it talks to answers, as a replica, and refuses writes.
    // Other routers may well reach the new master, so new rooms wait (503) rather than
    // being decided here alone (a room could then be split); rooms the router knows are
    // still served. Before, a replica's answer counted as no answer at all, and the router
    // placed new rooms on its own.
    let Some(mut t) = Topology::start("sentinel_replica_verdict").await else {
        return;
    };
    let p = prefix("sentinel-replica");
    let a = serve(t.config(&p)).await;
    let c = client();
    heartbeats(&c, &[&a]).await;
    let known = place(&c, &a.base(), "known").await.unwrap();

    t.sentinel.stop();
    let _: Option<String> = query(
        &t.replica.url(),
        redis::cmd("REPLICAOF").arg("NO").arg("ONE"),
    )
    .await;
    let _: Option<String> = query(
        &t.master.url(),
        redis::cmd("REPLICAOF").arg("127.0.0.1").arg(t.replica.port),
    )
    .await;
    assert_eq!(role(&t.master).await.as_deref(), Some("slave"));
    assert!(
        eventually(Duration::from_secs(10), || async {
            matches!(a.app.router.store().health(), StoreHealth::Degraded(_))
        })
        .await,
        "the router noticed its server is a replica now"
    );
    heartbeats(&c, &[&a]).await;
    let refused = place(&c, &a.base(), "new-while-demoted").await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.starts_with("503") && e.contains("store_unavailable")),
        "a new room waits for the new master: {refused:?}"
    );
    assert_eq!(place(&c, &a.base(), "known").await.unwrap(), known);
    a.stop().await;
}
