//! `placement.share_reservations` (unset: on with Redis): routers on one Redis tell each other
//! what they reserved for new rooms, so that a new room placed through one router counts on
//! the others at once (through the real HTTP surface and a real Redis; skipped loudly without
//! one).

mod redis_support;

use std::time::Duration;

use redis_support::*;
use roomrouter::cluster::{Live, NodeId};
use roomrouter::store::{PinStore, StoreHealth};

/// `share`: `placement.share_reservations` as the file would set it (`None`: not set).
fn config_sharing(url: &str, prefix: &str, share: Option<bool>) -> roomrouter::config::Config {
    let mut cfg = config(url, prefix);
    cfg.placement.share_reservations = share;
    cfg.validate().expect("valid");
    cfg
}

/// What `router` reads off node `id`'s live counters (-1 when it does not know the node).
fn live_on(s: &Served, id: &str, read: impl Fn(&Live) -> f64) -> f64 {
    let id = NodeId::parse(id).unwrap();
    s.app
        .router
        .cluster()
        .snapshot()
        .get(&id)
        .map_or(-1.0, |e| read(&e.live))
}

/// What `router` counts as reserved on node `id` by the other routers.
fn others_reserved(s: &Served, id: &str) -> f64 {
    live_on(s, id, Live::others_reserved_units)
}

/// Two routers on `prefix`, both seeing n1 (empty) and n2 (1% busy) through Redis.
async fn pair(url: &str, prefix: &str, share: Option<bool>) -> (Served, Served) {
    let a = serve_service(config_sharing(url, prefix, share)).await;
    let b = serve_service(config_sharing(url, prefix, share)).await;
    let c = client();
    heartbeat(&c, &a.base(), "n1", 0.0, &[]).await;
    heartbeat(&c, &a.base(), "n2", 1_000.0, &[]).await;
    assert!(
        eventually(Duration::from_secs(3), || async { b.healthy_nodes() == 2 }).await,
        "router B heard of both nodes"
    );
    (a, b)
}

/// Router `a` places a room of 5 000 units on n1; router `b` sees the reservation within 2 s.
async fn a_reserves_and_b_sees_it(c: &reqwest::Client, a: &Served, b: &Served) {
    assert_eq!(place(c, &a.base(), "big-a?size=5000").await.unwrap(), "n1");
    assert!(
        eventually(Duration::from_secs(2), || async {
            others_reserved(b, "n1") == 5_000.0
        })
        .await,
        "router B sees A's reservation: {}",
        others_reserved(b, "n1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_room_reserved_on_one_router_counts_on_the_others() {
    let Some((url, _private)) = redis_for("shared_reservations") else {
        return;
    };
    let c = client();

    // With sharing turned off, each router counts only its own: two big new rooms placed
    // through two routers land on the same, emptiest node.
    let p = prefix("unshared");
    let (a, b) = pair(&url, &p, Some(false)).await;
    assert_eq!(place(&c, &a.base(), "big-a?size=5000").await.unwrap(), "n1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(others_reserved(&b, "n1"), 0.0);
    assert_eq!(place(&c, &b.base(), "big-b?size=5000").await.unwrap(), "n1");
    a.stop().await;
    b.stop().await;
    cleanup(&url, &p).await;

    // With sharing (not set: the default on Redis), router B counts router A's 5 000 units
    // on n1 within milliseconds and sends the next big room to n2.
    let p = prefix("shared");
    let (a, b) = pair(&url, &p, None).await;
    a_reserves_and_b_sees_it(&c, &a, &b).await;
    assert_eq!(
        others_reserved(&a, "n1"),
        0.0,
        "a router does not count its own twice"
    );
    let shown = node_json(&c, &b.base(), "n1").await;
    assert_eq!(shown["reserved_by_others"], 5_000.0, "{shown}");
    assert_eq!(shown["reserved"], 0.0, "{shown}");
    let page = c
        .get(format!("{}/dashboard", b.base()))
        .basic_auth("admin", Some(ADMIN))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("0.0 + 5000.0 by other routers"), "{page}");
    assert_eq!(place(&c, &b.base(), "big-b?size=5000").await.unwrap(), "n2");
    assert!(
        eventually(Duration::from_secs(2), || async {
            others_reserved(&a, "n2") == 5_000.0
        })
        .await
    );

    // The participants arrive (n1 reports them to A): A's reservation is used up, and B
    // stops counting it.
    heartbeat(&c, &a.base(), "n1", 5_000.0, &[("big-a", 5_000)]).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            others_reserved(&b, "n1") == 0.0
        })
        .await,
        "released on B: {}",
        others_reserved(&b, "n1")
    );

    // A router that stops is forgotten after a full re-sync interval (1 s here) without
    // repeating its reservations.
    assert_eq!(place(&c, &a.base(), "later?size=3000").await.unwrap(), "n1");
    assert!(
        eventually(Duration::from_secs(2), || async {
            others_reserved(&b, "n1") == 3_000.0
        })
        .await
    );
    a.stop().await;
    assert!(
        eventually(Duration::from_secs(6), || async {
            others_reserved(&b, "n1") == 0.0
        })
        .await,
        "router B forgot the stopped router: {}",
        others_reserved(&b, "n1")
    );
    // Its own reservation (on n2) is still there, repeated: it is not forgotten.
    assert_eq!(b.app.router.nodes().len(), 2);
    let n2 = NodeId::parse("n2").unwrap();
    let snap = b.app.router.cluster().snapshot();
    assert_eq!(snap.get(&n2).unwrap().live.reserved_units(), 5_000.0);
    b.stop().await;
    cleanup(&url, &p).await;
}

/// What `router` has reserved itself on node `id`, in load units.
fn own_reserved(s: &Served, id: &str) -> f64 {
    live_on(s, id, Live::reserved_units)
}

/// Places new rooms ("probes") through router `a`, each after `before`, until what `a`
/// holds reserved on n1 is only its probes' (each reserves the default guess, 10), for at
/// most `within`. Returns whether it came to that, and after how many probes.
async fn until_only_probes_reserved<F, Fut>(
    c: &reqwest::Client,
    a: &Served,
    within: Duration,
    mut before: F,
) -> (bool, u32)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future,
{
    let mut probes = 0;
    let done = eventually(within, || {
        probes += 1;
        let (k, step) = (probes, before());
        async move {
            step.await;
            assert_eq!(
                place(c, &a.base(), &format!("probe-{k}")).await.unwrap(),
                "n1"
            );
            own_reserved(a, "n1") == 10.0 * f64::from(k)
        }
    })
    .await;
    (done, probes)
}

/// A room placed through router A whose node reports to router B only (heartbeats behind a
/// load balancer that pins them), and whose users join through B: A's reservation is
/// settled by the participants B's heartbeats report, as B's own would be, instead of
/// counting on top of them until `reservation_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_is_settled_by_participants_another_router_heard_of() {
    let Some((url, _private)) = redis_for("settled_elsewhere") else {
        return;
    };
    let c = client();
    let p = prefix("settled");
    let a = serve_service(config_sharing(&url, &p, None)).await;
    let b = serve_service(config_sharing(&url, &p, None)).await;
    heartbeat(&c, &b.base(), "n1", 0.0, &[]).await;
    assert!(
        eventually(Duration::from_secs(3), || async { a.healthy_nodes() == 1 }).await,
        "router A heard of n1"
    );
    assert_eq!(place(&c, &a.base(), "class?size=30").await.unwrap(), "n1");
    assert_eq!(own_reserved(&a, "n1"), 30.0);
    // The class comes in (through router B) and n1 tells router B.
    heartbeat(&c, &b.base(), "n1", 30.0, &[("class", 30)]).await;
    // Router A settles when it next places a new room (or sweeps).
    let (settled, probes) =
        until_only_probes_reserved(&c, &a, Duration::from_secs(3), || async {}).await;
    assert!(
        settled,
        "router A's reservation for the class settled: {} reserved after {probes} probes",
        own_reserved(&a, "n1"),
    );
    a.stop().await;
    b.stop().await;
    cleanup(&url, &p).await;
}

/// As above, but the class ends early (the teacher cancels it): its node stops listing it in
/// router B's heartbeats, and router A drops what it still held for it, instead of keeping
/// it reserved until `reservation_ttl` (five minutes with a hint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_is_released_when_another_router_hears_its_room_ended() {
    let Some((url, _private)) = redis_for("ended_elsewhere") else {
        return;
    };
    let c = client();
    let p = prefix("ended");
    let mut cfg = config_sharing(&url, &p, None);
    // A room's pin outlives its last listing by a ticket's life, a confirmation interval and
    // a heartbeat interval (a ticket another router issued may be on its way): short here.
    cfg.tickets.ttl = Duration::from_millis(300);
    cfg.tickets.leeway = Duration::ZERO;
    cfg.placement.room_idle_ttl = Duration::from_secs(8);
    cfg.placement.heartbeat_interval = Duration::from_millis(200);
    cfg.validate().expect("valid");
    let a = serve_service(cfg.clone()).await;
    let b = serve_service(cfg).await;
    heartbeat(&c, &b.base(), "n1", 0.0, &[]).await;
    assert!(
        eventually(Duration::from_secs(3), || async { a.healthy_nodes() == 1 }).await,
        "router A heard of n1"
    );
    assert_eq!(place(&c, &a.base(), "class?size=30").await.unwrap(), "n1");
    heartbeat(&c, &b.base(), "n1", 4.0, &[("class", 4)]).await;
    // Four came, then the class ended: n1 stops listing it. Router B releases the room once
    // no ticket for it can still arrive, and says so with its next report.
    let b_base = b.base();
    let (released, probes) = until_only_probes_reserved(&c, &a, Duration::from_secs(8), || {
        heartbeat(&c, &b_base, "n1", 0.0, &[])
    })
    .await;
    assert!(
        released,
        "router A's reservation for the ended class was released: {} reserved after {probes} probes",
        own_reserved(&a, "n1"),
    );
    a.stop().await;
    b.stop().await;
    cleanup(&url, &p).await;
}

/// Redis goes away, and with it every word of the other routers: what they had reserved
/// before (router A's, which has stopped meanwhile) is forgotten after a full re-sync
/// interval all the same, rather than counting on the nodes for as long as the outage lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_routers_reservation_is_forgotten_during_a_redis_outage_too() {
    let Some(mut redis) = private_redis_for("reserved_outage") else {
        return;
    };
    let c = client();
    let p = prefix("reserved-outage");
    let (a, b) = pair(&redis.url(), &p, None).await;
    a_reserves_and_b_sees_it(&c, &a, &b).await;
    redis.stop();
    a.stop().await;
    // n1 keeps heartbeating router B directly; B hears nothing from A (nor from Redis).
    let start = std::time::Instant::now();
    let mut forgotten = false;
    while start.elapsed() < Duration::from_secs(5) && !forgotten {
        heartbeat(&c, &b.base(), "n1", 0.0, &[]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        forgotten = others_reserved(&b, "n1") == 0.0;
    }
    assert!(
        b.app.router.store().health() != StoreHealth::Ok,
        "Redis is still away for router B"
    );
    assert!(
        forgotten,
        "router B forgot the silent router's reservation during the outage: {}",
        others_reserved(&b, "n1")
    );
    b.stop().await;
}
