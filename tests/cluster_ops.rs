//! Node lifecycle and admin operations over HTTP: headroom, drain/disable/enable, failover,
//! split eviction, rooms and nodes endpoints, health, metrics and the dashboard.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use roomrouter::room::Normalization;
use serde_json::json;

async fn healthy(r: &TestRouter, id: &str) -> bool {
    admin_json(r, &format!("/v1/nodes/{id}")).await["healthy"] == true
}

async fn node_of(r: &TestRouter, room: &str) -> String {
    let resp = r.get(&format!("/rooms/{room}")).send().await.unwrap();
    assert_eq!(resp.status(), 307, "join {room}");
    resp.headers()["x-room-node"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn new_rooms_respect_headroom_then_overflow_then_refuse() {
    let r = TestRouter::start(config()).await;
    // "hot" reports 85% load: above new_room_limit (80%) but below join_limit.
    heartbeat(
        &r,
        "hot",
        json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 85}),
    )
    .await;
    heartbeat(
        &r,
        "cool",
        json!({"url": "http://127.0.0.1:9", "capacity": 1000, "load": 0}),
    )
    .await;
    for i in 0..20 {
        let v: serde_json::Value = r
            .get(&format!("/v1/placement/h{i}?size=1"))
            .send_json()
            .await;
        assert_eq!(v["node"], "cool", "room h{i}");
    }
    // cool goes full: new rooms overflow onto hot (below join_limit).
    heartbeat(
        &r,
        "cool",
        json!({"url": "http://127.0.0.1:9", "capacity": 1000, "load": 1000}),
    )
    .await;
    let v: serde_json::Value = r.get("/v1/placement/overflow?size=1").send_json().await;
    assert_eq!(v["node"], "hot");
    // Everything full: 503 no_capacity with Retry-After.
    heartbeat(
        &r,
        "hot",
        json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 100}),
    )
    .await;
    let resp = r.get("/v1/placement/nowhere").send().await.unwrap();
    assert_eq!(resp.headers()["retry-after"], "5");
    expect_error(resp, 503, "no_capacity").await;
    // A pinned room whose node is full is refused, never sent elsewhere.
    let resp = r.get("/rooms/h1").send().await.unwrap();
    assert!(resp.headers().contains_key("retry-after"));
    let body = expect_error(resp, 503, "node_full").await;
    assert_eq!(body["node"], "cool");
}

/// A lookup is not a join: a pinned room's node is the answer even at `join_limit`, from a
/// holding pin and from one due for confirmation (the general path), singly and in a batch,
/// and it counts nothing. New rooms still need headroom; joins are still refused.
#[tokio::test]
async fn a_lookup_names_a_pinned_rooms_full_node_and_counts_nothing() {
    let mut c = config();
    // Joins and lookups confirm a pin at most every 1 s (room_idle_ttl / 8, and room_idle_ttl
    // must outlast a ticket: 1 s + no leeway + 1 s); the node, heard from at the start, stays
    // healthy for heartbeat_timeout, which room_idle_ttl must exceed.
    c.tickets.ttl = Duration::from_secs(1);
    c.tickets.leeway = Duration::ZERO;
    c.placement.heartbeat_timeout = Duration::from_secs(6);
    c.placement.room_idle_ttl = Duration::from_secs(8);
    c.validate().unwrap();
    let r = TestRouter::start(c).await;
    let beat = |load: u32| {
        json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": load,
                                  "rooms": [{"room": "busy", "participants": 10}]})
    };
    assert_eq!(heartbeat(&r, "a", beat(0)).await.status(), 200);
    assert_eq!(node_of(&r, "busy").await, "a");
    assert_eq!(heartbeat(&r, "a", beat(100)).await.status(), 200);
    let counters = || async {
        let n = admin_json(&r, "/v1/nodes/a").await;
        (
            n["pending"].clone(),
            n["reserved"].clone(),
            n["utilization"].clone(),
        )
    };
    let before = counters().await;
    let resp = r.get("/rooms/busy").send().await.unwrap();
    expect_error(resp, 503, "node_full").await;
    for round in ["holding pin", "pin due for confirmation"] {
        for path in ["/v1/placement/busy", "/v1/placement/BUSY?create=false"] {
            let resp = r.get(path).send().await.unwrap();
            let status = resp.status();
            if status != 200 {
                panic!("{round}: {path}: {status} {}", resp.text().await.unwrap());
            }
            assert_eq!(resp.headers()["x-room-node"], "a");
            let v: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(v["node"], "a", "{round}: {v}");
            assert_eq!(v["created"], false, "{round}: {v}");
        }
        for create in [true, false] {
            let batch: serde_json::Value = r
                .post("/v1/placement")
                .json(&json!({"rooms": ["busy", "fresh"], "create": create}))
                .send_json()
                .await;
            assert_eq!(batch[0]["node"], "a", "{round}: {batch}");
            let fresh = if create { "no_capacity" } else { "not_found" };
            assert_eq!(batch[1]["error"], fresh, "{round}: {batch}");
        }
        assert_eq!(counters().await, before, "{round}: lookups counted");
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    }
    let resp = r.get("/v1/placement/fresh").send().await.unwrap();
    expect_error(resp, 503, "no_capacity").await;
    let resp = r.get("/rooms/busy").send().await.unwrap();
    expect_error(resp, 503, "node_full").await;
    assert_eq!(counters().await, before);
}

#[tokio::test]
async fn drain_disable_enable_through_the_admin_api() {
    let r = TestRouter::start(config()).await;
    let _a = r.node("a", 100_000.0).await;
    let _b = r.node("b", 100_000.0).await;
    let mut on_a = Vec::new();
    for i in 0..40 {
        if node_of(&r, &format!("r{i}")).await == "a" {
            on_a.push(format!("r{i}"));
        }
    }
    assert!(!on_a.is_empty());
    let resp = r
        .admin(Method::POST, "/v1/nodes/a/drain")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let st: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(st["state"], "draining");
    for room in &on_a {
        assert_eq!(node_of(&r, room).await, "a", "draining keeps its rooms");
    }
    for i in 0..30 {
        assert_eq!(
            node_of(&r, &format!("new{i}")).await,
            "b",
            "draining takes no new rooms"
        );
    }
    // The node's own heartbeats do not lift the drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st: serde_json::Value = admin_json(&r, "/v1/nodes/a").await;
    assert_eq!(st["state"], "draining");
    assert_eq!(st["admin_state"], "draining");
    r.admin(Method::POST, "/v1/nodes/a/disable")
        .send()
        .await
        .unwrap();
    for room in &on_a {
        assert_eq!(
            node_of(&r, room).await,
            "b",
            "disabled: rooms re-placed on their next join"
        );
    }
    r.admin(Method::POST, "/v1/nodes/a/enable")
        .send()
        .await
        .unwrap();
    let mut back = 0;
    for i in 0..40 {
        if node_of(&r, &format!("later{i}")).await == "a" {
            back += 1;
        }
    }
    assert!(back > 0);
    r.expect_admin_error(Method::POST, "/v1/nodes/ghost/drain", 404, "not_found")
        .await;
    // A node that left disabled (removed, or forgotten for its silence) comes back disabled;
    // the admin may clear that before it does, though it is not listed.
    let hb = json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 0});
    assert_eq!(heartbeat(&r, "gone", hb.clone()).await.status(), 200);
    let disable = r.admin(Method::POST, "/v1/nodes/gone/disable").send();
    assert_eq!(disable.await.unwrap().status(), 200);
    let del = r.admin(Method::DELETE, "/v1/nodes/gone").send();
    assert_eq!(del.await.unwrap().status(), 200);
    r.expect_admin_error(Method::GET, "/v1/nodes/gone", 404, "not_found")
        .await;
    let resp = r
        .admin(Method::POST, "/v1/nodes/gone/enable")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let st: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        st,
        json!({"id": "gone", "listed": false, "admin_state": "active"})
    );
    assert_eq!(heartbeat(&r, "gone", hb).await.status(), 200);
    assert_eq!(admin_json(&r, "/v1/nodes/gone").await["state"], "active");
    // Cleared, the state is no longer kept: the id is unknown again once it leaves.
    let del = r.admin(Method::DELETE, "/v1/nodes/gone").send();
    assert_eq!(del.await.unwrap().status(), 200);
    r.expect_admin_error(Method::POST, "/v1/nodes/gone/drain", 404, "not_found")
        .await;
}

#[tokio::test]
async fn a_dead_node_fails_over_after_heartbeat_timeout_and_only_its_rooms_move() {
    let r = TestRouter::start(config()).await;
    let a = r.node("a", 100_000.0).await;
    let _b = r.node("b", 100_000.0).await;
    let _c = r.node("c", 100_000.0).await;
    let mut before = Vec::new();
    for i in 0..60 {
        before.push(node_of(&r, &format!("r{i}")).await);
    }
    assert!(before.iter().any(|n| n == "a"));
    a.kill();
    // heartbeat_timeout is 1 s in tests.
    eventually(
        "node a marked unhealthy",
        Duration::from_secs(5),
        || async {
            let st: serde_json::Value = admin_json(&r, "/v1/nodes/a").await;
            st["healthy"] == false
        },
    )
    .await;
    for (i, old) in before.iter().enumerate() {
        let now = node_of(&r, &format!("r{i}")).await;
        if old == "a" {
            assert_ne!(now, "a", "room r{i} still sent to the dead node");
        } else {
            assert_eq!(&now, old, "room r{i} moved though its node is alive");
        }
    }
}

/// A node that crashed stops heartbeating, but the router would wait out
/// `heartbeat_timeout` (a minute here) before it stopped sending users there. With health
/// probes on, its closed port marks it unhealthy after `health.failures` probes, its room
/// moves to the live node at the next join, and its next heartbeat brings it back. With
/// probes off (the default) nothing changes over the same time.
#[tokio::test]
async fn a_node_whose_port_is_closed_fails_its_probes_and_its_rooms_move_before_the_timeout() {
    // A port that listens (the live node) and one that nobody listens on any more.
    let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (live_url, gone_url) = (
        format!("http://{}", live.local_addr().unwrap()),
        format!("http://{}", gone.local_addr().unwrap()),
    );
    drop(gone);
    for probes in [false, true] {
        let mut cfg = config();
        cfg.placement.heartbeat_interval = Duration::from_secs(10);
        cfg.placement.heartbeat_timeout = Duration::from_secs(60);
        if probes {
            cfg.health.probe_interval = Duration::from_millis(100);
            cfg.health.probe_timeout = Duration::from_millis(100);
            cfg.health.failures = 2;
        }
        cfg.validate().unwrap();
        let r = TestRouter::start(cfg).await;
        // "gone" reports far more headroom, so new rooms go there while it looks alive.
        let beat = |url: &str, load: u32| json!({"url": url, "capacity": 100, "load": load});
        heartbeat(&r, "gone", beat(&gone_url, 0)).await;
        heartbeat(&r, "live", beat(&live_url, 50)).await;
        assert_eq!(node_of(&r, "standup").await, "gone");
        if !probes {
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert!(
                healthy(&r, "gone").await,
                "without probes it waits for the timeout"
            );
            assert_eq!(node_of(&r, "standup").await, "gone");
            r.stop().await;
            continue;
        }
        eventually(
            "the closed port's node is unhealthy",
            Duration::from_secs(5),
            || async { !healthy(&r, "gone").await },
        )
        .await;
        assert!(
            healthy(&r, "live").await,
            "the listening node passes its probes"
        );
        assert_eq!(node_of(&r, "standup").await, "live", "the room moved");
        assert_eq!(node_of(&r, "retro").await, "live");
        let m = r.metrics().await;
        assert!(
            sample(&m, "roomrouter_health_probe_failures_total") >= 2.0,
            "{m}"
        );
        assert!(sample(&m, "roomrouter_health_probe_nodes_marked_unhealthy_total") >= 1.0);
        // Its next heartbeat brings it back (until its probes fail again).
        heartbeat(&r, "gone", beat(&gone_url, 0)).await;
        assert!(healthy(&r, "gone").await);
        r.stop().await;
    }
}

#[tokio::test]
async fn a_split_room_is_evicted_from_the_wrong_node() {
    let r = TestRouter::start(config()).await;
    let a = r.node("a", 1000.0).await;
    let b = r.node("b", 1000.0).await;
    // Put a participant in the room through the router.
    let loc = r.get("/rooms/split-me").send().await.unwrap().headers()["location"]
        .to_str()
        .unwrap()
        .to_string();
    client().get(&loc).send().await.unwrap();
    let (home, other) = if a.rooms().contains_key("split-me") {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(home.rooms()["split-me"], 1);
    // The other node claims the room too (as if users reached it directly).
    let resp = heartbeat(
        &r,
        &other.id,
        json!({"url": other.url, "capacity": 1000, "load": 2, "rooms": [{"room": "split-me", "participants": 2}]}),
    )
    .await;
    let reply: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(reply["evict"], json!(["split-me"]));
    assert_eq!(node_of(&r, "split-me").await, home.id);
    let metrics = r.metrics().await;
    assert!(
        metrics.contains("roomrouter_splits_detected_total 1"),
        "{metrics}"
    );
}

/// A node that reports one room the router cannot take as a room id (a `/` in it) stays
/// healthy past `heartbeat_timeout`: its heartbeats apply without that room, its rooms stay
/// on it, and it is still told what to evict.
#[tokio::test]
async fn a_node_reporting_an_invalid_room_stays_alive_and_keeps_its_rooms() {
    let r = TestRouter::start(config()).await;
    let beat = |rooms: serde_json::Value| json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 10, "rooms": rooms});
    let ok = heartbeat(
        &r,
        "a",
        beat(json!([{"room": "standup", "participants": 5}])),
    )
    .await;
    assert_eq!(ok.status(), 200);
    let ok = heartbeat(
        &r,
        "b",
        beat(json!([{"room": "elsewhere", "participants": 3}])),
    )
    .await;
    assert_eq!(ok.status(), 200);
    // Past heartbeat_timeout (1 s), "a" listing a room with a '/' (and one that is b's).
    let with_bad = beat(json!([{"room": "standup", "participants": 5},
                               {"room": "team/a", "participants": 2},
                               {"room": "elsewhere", "participants": 1}]));
    for _ in 0..8 {
        let resp = heartbeat(&r, "a", with_bad.clone()).await;
        assert_eq!(resp.status(), 200);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["evict"], json!(["elsewhere"]), "{v}");
        assert_eq!(v["refused"][0]["room"], "team/a", "{v}");
        let ok = heartbeat(
            &r,
            "b",
            beat(json!([{"room": "elsewhere", "participants": 3}])),
        )
        .await;
        assert_eq!(ok.status(), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(admin_json(&r, "/v1/nodes/a").await["healthy"], true);
    assert_eq!(
        node_of(&r, "standup").await,
        "a",
        "the room stayed on its node"
    );
    assert_eq!(node_of(&r, "elsewhere").await, "b");
}

#[tokio::test]
async fn rooms_end_when_their_node_stops_listing_them() {
    // The pin outlives the room for as long as the last ticket issued for it may be accepted
    // (someone may still be on the way): keep that short here, 1 s + no leeway + 1 s.
    let mut cfg = config();
    cfg.tickets.ttl = Duration::from_secs(1);
    cfg.tickets.leeway = Duration::ZERO;
    let r = TestRouter::start(cfg).await;
    let n = r.node("a", 1000.0).await;
    let loc = r.get("/rooms/short").send().await.unwrap().headers()["location"]
        .to_str()
        .unwrap()
        .to_string();
    client().get(&loc).send().await.unwrap();
    eventually("node reports the room", Duration::from_secs(3), || async {
        admin_json(&r, "/v1/nodes/a").await["rooms"] == 1
    })
    .await;
    let left = client()
        .post(format!("{}/rooms/short/leave", n.url))
        .send()
        .await
        .unwrap();
    assert_eq!(left.status(), 200);
    eventually(
        "pin released after the room emptied",
        Duration::from_secs(6),
        || async {
            r.admin(Method::GET, "/v1/rooms/short")
                .send()
                .await
                .unwrap()
                .status()
                == 404
        },
    )
    .await;
}

/// The join counts a participant under the room as the router normalized it; the leave, at
/// the same path, finds that room: a name the router keeps in capitals (`none`), or one
/// Rust's `to_lowercase` folds otherwise than the router (`ΑΣ`, `Aǅ`), included.
#[tokio::test]
async fn a_participant_leaves_the_room_it_joined_under_every_normalization() {
    for (rooms, path, key) in [
        (Normalization::None, "Standup", "Standup"),
        (Normalization::Lowercase, "%CE%91%CE%A3", "ασ"),
        (Normalization::NfkcLowercase, "A%C7%85", "ad\u{17E}"),
    ] {
        let normalization = format!("{rooms:?}");
        let mut cfg = config();
        cfg.rooms.normalization = rooms;
        let r = TestRouter::start(cfg).await;
        let n = r.node_naming_rooms("a", 1000.0, rooms).await;
        let redirect = r.get(&format!("/rooms/{path}")).send().await.unwrap();
        assert_eq!(redirect.status(), 307, "{normalization}");
        let joined: serde_json::Value = client()
            .get(redirect.headers()["location"].to_str().unwrap())
            .send_json()
            .await;
        assert_eq!(joined["participants"], 1, "{normalization}: {joined}");
        assert_eq!(n.rooms().get(key), Some(&1), "{normalization}");
        let left = client()
            .post(format!("{}/rooms/{path}/leave", n.url))
            .send()
            .await
            .unwrap();
        assert_eq!(left.status(), 200, "{normalization}: leave {path}");
        let left: serde_json::Value = left.json().await.unwrap();
        assert_eq!(left["participants"], 0, "{normalization}: {left}");
        assert!(n.rooms().is_empty(), "{normalization}: {:?}", n.rooms());
        r.stop().await;
    }
}

/// An admin's action on a node the router neither lists nor keeps a state for is `404` and
/// changes nothing; one on a node removed under an admin's disable answers what it did to
/// the state the node comes back with (the answer says what happened, either way).
#[tokio::test]
async fn an_admin_action_on_a_removed_node_says_what_it_changed() {
    let r = TestRouter::start(config()).await;
    let beat = json!({"url": "http://127.0.0.1:7001", "capacity": 100, "load": 0});
    assert_eq!(heartbeat(&r, "n1", beat.clone()).await.status(), 200);
    let act = |id: &'static str, action: &'static str| {
        client()
            .post(format!("{}/v1/nodes/{id}/{action}", r.url))
            .bearer_auth(ADMIN)
            .send()
    };
    assert_eq!(act("n1", "disable").await.unwrap().status(), 200);
    let gone = client()
        .delete(format!("{}/v1/nodes/n1", r.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 200);
    let drained = act("n1", "drain").await.unwrap();
    assert_eq!(drained.status(), 200);
    let body: serde_json::Value = drained.json().await.unwrap();
    assert_eq!(body["listed"], false);
    assert_eq!(heartbeat(&r, "n1", beat.clone()).await.status(), 200);
    let n = admin_json(&r, "/v1/nodes/n1").await;
    assert_eq!(n["admin_state"], "draining", "{n}");
    // Never known here: not found, and it joins active.
    expect_error(act("n2", "disable").await.unwrap(), 404, "not_found").await;
    assert_eq!(heartbeat(&r, "n2", beat).await.status(), 200);
    let n = admin_json(&r, "/v1/nodes/n2").await;
    assert_eq!(n["admin_state"], "active", "{n}");
    r.stop().await;
}

/// A heartbeat that leaves out `upstream`, `region` or `tags` keeps the ones the router
/// has (an operator's `PUT` here): a node reporting only its url, capacity and load must
/// not send proxied sessions to its public url or lose the tags rooms are placed by.
#[tokio::test]
async fn a_heartbeat_keeps_the_upstream_region_and_tags_it_leaves_out() {
    let r = TestRouter::start(config()).await;
    let registered = client()
        .put(format!("{}/v1/nodes/n1", r.url))
        .bearer_auth(ADMIN)
        .json(
            &json!({"url": "http://127.0.0.1:7001", "upstream": "http://127.0.0.2:8080",
                      "capacity": 100, "region": "eu", "tags": ["rec"]}),
        )
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success(), "{}", registered.status());
    let beat = |body: serde_json::Value| async {
        assert_eq!(heartbeat(&r, "n1", body).await.status(), 200);
        admin_json(&r, "/v1/nodes/n1").await
    };
    let n = beat(json!({"url": "http://127.0.0.1:7001", "capacity": 100, "load": 3})).await;
    assert_eq!(n["upstream"], "http://127.0.0.2:8080", "{n}");
    assert_eq!(
        (n["region"].clone(), n["tags"].clone()),
        (json!("eu"), json!(["rec"]))
    );
    assert_eq!(n["load"], 3.0);
    // What it does send replaces: tags cleared, another region.
    let n = beat(
        json!({"url": "http://127.0.0.1:7001", "capacity": 100, "load": 3,
                        "region": "us", "tags": []}),
    )
    .await;
    assert_eq!(
        (n["region"].clone(), n["tags"].clone()),
        (json!("us"), json!([]))
    );
    assert_eq!(n["upstream"], "http://127.0.0.2:8080", "{n}");
    // An upstream that was only the url follows the url.
    let n = beat(
        json!({"url": "http://127.0.0.1:7003", "upstream": "http://127.0.0.1:7003",
                        "capacity": 100, "load": 0}),
    )
    .await;
    let n2 = beat(json!({"url": "http://127.0.0.1:7004", "capacity": 100, "load": 0})).await;
    assert_eq!(n["upstream"], "http://127.0.0.1:7003");
    assert_eq!(n2["upstream"], "http://127.0.0.1:7004", "{n2}");
    r.stop().await;
}

#[tokio::test]
async fn rooms_and_nodes_admin_endpoints() {
    let r = TestRouter::start(config()).await;
    let resp = r
        .admin(Method::PUT, "/v1/nodes/static-1")
        .json(&json!({"url": "http://127.0.0.1:7000/", "capacity": 50, "region": "eu", "tags": ["rec", "rec"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let st: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(st["url"], "http://127.0.0.1:7000");
    assert_eq!(st["tags"], json!(["rec"]));
    assert_eq!(
        st["healthy"], false,
        "healthy only after its first heartbeat"
    );
    // The same PUT again updates it (200); without the admin token it changes nothing.
    let resp = r
        .admin(Method::PUT, "/v1/nodes/static-1")
        .json(&json!({"url": "http://127.0.0.1:7001", "capacity": 80, "region": "us"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let st: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (st["url"].as_str(), st["capacity"].as_f64()),
        (Some("http://127.0.0.1:7001"), Some(80.0))
    );
    assert_eq!(st["region"], "us");
    for (token, status, code) in [
        (None, 401, "unauthorized"),
        (Some(NODE_TOKEN), 403, "forbidden"),
    ] {
        let mut req = client()
            .put(format!("{}/v1/nodes/static-1", r.url))
            .json(&json!({"url": "http://127.0.0.1:7002", "capacity": 1}));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        expect_error(req.send().await.unwrap(), status, code).await;
    }
    assert_eq!(admin_json(&r, "/v1/nodes/static-1").await["capacity"], 80.0);
    let _n = r.node("live", 1000.0).await;
    for i in 0..25 {
        r.get(&format!("/v1/placement/room-{i:02}"))
            .send()
            .await
            .unwrap();
    }
    let page: serde_json::Value = admin_json(&r, "/v1/rooms?limit=10").await;
    assert_eq!(page["rooms"].as_array().unwrap().len(), 10);
    assert_eq!(page["rooms"][0]["room"], "room-00");
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let page2: serde_json::Value =
        admin_json(&r, &format!("/v1/rooms?limit=10&cursor={cursor}")).await;
    assert_eq!(page2["rooms"][0]["room"], "room-10");
    let one: serde_json::Value = admin_json(&r, "/v1/rooms/room-03").await;
    assert_eq!(one["node"], "live");
    let del = r
        .admin(Method::DELETE, "/v1/rooms/room-03")
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    r.expect_admin_error(Method::GET, "/v1/rooms/room-03", 404, "not_found")
        .await;
    r.expect_admin_error(Method::DELETE, "/v1/rooms/room-03", 404, "not_found")
        .await;
    let list: serde_json::Value = admin_json(&r, "/v1/nodes").await;
    assert_eq!(list["nodes"].as_array().unwrap().len(), 2);
    // A node may remove itself with its own token.
    let gone = r.post("/v1/nodes/static-1").send().await.unwrap();
    assert_eq!(gone.status(), 405);
    let gone = client()
        .delete(format!("{}/v1/nodes/static-1", r.url))
        .bearer_auth(NODE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 200);
    r.expect_admin_error(Method::GET, "/v1/nodes/static-1", 404, "not_found")
        .await;
}

#[tokio::test]
async fn readiness_health_metrics_and_dashboard() {
    let r = TestRouter::start(config()).await;
    assert_eq!(r.get("/healthz").send().await.unwrap().status(), 200);
    let body = expect_error(r.get("/readyz").send().await.unwrap(), 503, "not_ready").await;
    assert_eq!(body["reasons"], json!(["no healthy node"]));
    // A probe's 503 is an answer, not an error users met: not counted as one.
    let m = r.metrics().await;
    assert!(
        !m.contains("roomrouter_http_errors_total{code=\"not_ready\"}"),
        "{m}"
    );
    let _n = r.node("a", 100.0).await;
    assert_eq!(r.get("/readyz").send().await.unwrap().status(), 200);
    r.get("/rooms/m").send().await.unwrap();
    let m = r.metrics().await;
    assert!(
        m.contains("roomrouter_decisions_total{outcome=\"placed\"} 1"),
        "{m}"
    );
    assert!(m.contains("roomrouter_nodes_healthy 1"), "{m}");
    assert!(m.contains("roomrouter_pins 1"), "{m}");
    assert!(m.contains("roomrouter_learned_rooms 0"), "{m}");
    let d = r.get("/dashboard").send().await.unwrap();
    assert_eq!(d.status(), 401);
    assert!(d.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    let m = r.metrics().await;
    assert!(
        m.contains("roomrouter_http_errors_total{code=\"unauthorized\"} 1"),
        "the dashboard's 401 is counted like every other error: {m}"
    );
    let d = client()
        .get(format!("{}/dashboard", r.url))
        .basic_auth("admin", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(d.status(), 200);
    let html = d.text().await.unwrap();
    assert!(html.contains("<td>a</td>"), "{html}");
}

#[tokio::test]
async fn decisions_that_needed_more_than_a_holding_pin_are_timed_in_a_histogram() {
    let r = TestRouter::start(config()).await;
    let _n = r.node("a", 100.0).await;
    let name = "roomrouter_decision_slow_path_seconds";
    // Three new rooms, then joins and lookups of rooms whose pin holds: those are decided
    // from the pin and not timed.
    for room in ["t1", "t2", "t3", "t1", "t2", "t3", "t1"] {
        assert_eq!(node_of(&r, room).await, "a");
        let lookup = r.get(&format!("/v1/placement/{room}")).send();
        assert_eq!(lookup.await.unwrap().status(), 200);
    }
    // A lookup that may not create, of a room nobody placed: the store had to be asked.
    expect_error(
        r.get("/v1/placement/nobody?create=false")
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    let m = metrics(&client(), &r.url).await;
    assert!(m.contains(&format!("# TYPE {name} histogram")), "{m}");
    assert_eq!(sample(&m, &format!("{name}_count")), 4.0, "{m}");
    assert_eq!(sample(&m, &format!("{name}_bucket{{le=\"+Inf\"}}")), 4.0);
    let sum = sample(&m, &format!("{name}_sum"));
    assert!(
        sum > 0.0 && sum < 4.0,
        "four decisions on loopback took {sum} s"
    );
    assert_eq!(
        sample(&m, "roomrouter_decisions_total{outcome=\"placed\"}"),
        3.0
    );
}

#[tokio::test]
async fn applied_heartbeats_are_timed_and_refused_ones_are_not() {
    let r = TestRouter::start(config()).await;
    let name = "roomrouter_heartbeat_seconds";
    let beat = json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 3,
                      "rooms": [{"room": "x", "participants": 3}]});
    for _ in 0..3 {
        assert_eq!(heartbeat(&r, "hb", beat.clone()).await.status(), 200);
    }
    let refused = r.post("/v1/nodes/hb/heartbeat").json(&beat).send().await;
    expect_error(refused.unwrap(), 401, "unauthorized").await;
    let m = metrics(&client(), &r.url).await;
    assert_eq!(sample(&m, &format!("{name}_count")), 3.0, "{m}");
    assert_eq!(sample(&m, "roomrouter_heartbeats_total"), 3.0, "{m}");
    assert!(sample(&m, &format!("{name}_sum")) > 0.0, "{m}");
}

#[tokio::test]
async fn explain_lists_every_node_with_its_verdict() {
    let r = TestRouter::start(config()).await;
    let _a = r.node("a", 100.0).await;
    let _b = r.node("b", 100.0).await;
    r.admin(Method::POST, "/v1/nodes/b/drain")
        .send()
        .await
        .unwrap();
    expect_error(
        r.get("/v1/placement/x/explain").send().await.unwrap(),
        401,
        "unauthorized",
    )
    .await;
    let e: serde_json::Value = admin_json(&r, "/v1/placement/x/explain").await;
    assert_eq!(e["decision"], "place");
    assert_eq!(e["node"], "a");
    let rows = e["nodes"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["verdict"], "chosen");
    assert_eq!(rows[1]["verdict"], "draining");
    // What the room would reserve, why and for how long: no hint and no history, the
    // default guess for new_room_reserve_ttl.
    assert_eq!(e["expected_size"], 10);
    assert_eq!(e["size_source"], "default");
    assert_eq!(e["reserved_for_ms"], 60_000);
    let e: serde_json::Value = admin_json(&r, "/v1/placement/x/explain?size=25").await;
    assert_eq!(
        (
            e["expected_size"].as_u64(),
            e["size_source"].as_str(),
            e["reserved_for_ms"].as_u64()
        ),
        (Some(25), Some("hint"), Some(300_000))
    );
    // Explaining has no side effects.
    expect_error(
        r.admin(Method::GET, "/v1/rooms/x").send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
}

/// Nodes of unequal size: a new room counts its expected size on each candidate, so a big
/// class goes to the node it fills least rather than to whichever is emptier now. (Counting
/// only the load already there, the second room would go to the empty small node and fill
/// it to 80% while the big one sat at 20%.)
#[tokio::test]
async fn a_big_room_goes_to_the_node_it_fills_least() {
    let r = TestRouter::start(config()).await;
    let _small = r.node("small", 50.0).await;
    let _big = r.node("big", 200.0).await;
    for class in ["class-1", "class-2", "class-3"] {
        let resp = r
            .get(&format!("/v1/placement/{class}?size=40"))
            .send()
            .await;
        let placed: serde_json::Value = resp.unwrap().json().await.unwrap();
        assert_eq!(placed["node"], "big", "{class}: {placed}");
    }
    // Three rooms of 40 reserved on the big node: it is at 60%, and a fourth room of 40
    // would take it to 80%, the small one to 80% too. The explanation shows both figures.
    let e: serde_json::Value = admin_json(&r, "/v1/placement/class-4/explain?size=40").await;
    let rows = e["nodes"].as_array().unwrap();
    let row = |id: &str| rows.iter().find(|n| n["node"] == id).unwrap().clone();
    assert_eq!(row("big")["utilization"], 0.6, "{e}");
    assert_eq!(row("big")["utilization_with_room"], 0.8, "{e}");
    assert_eq!(row("small")["utilization"], 0.0, "{e}");
    assert_eq!(row("small")["utilization_with_room"], 0.8, "{e}");
    // A small room still goes to the small node, which it fills least.
    let e: serde_json::Value = admin_json(&r, "/v1/placement/chat/explain?size=2").await;
    assert_eq!(e["node"], "small", "{e}");
}

#[tokio::test]
async fn a_node_draining_itself_with_no_rooms_leaves_the_cluster() {
    let r = TestRouter::start(config()).await;
    let n = r.node("leaving", 100.0).await;
    let _other = r.node("staying", 100.0).await;
    n.set_draining(true);
    eventually(
        "self-drained empty node removed",
        Duration::from_secs(3),
        || async {
            r.admin(Method::GET, "/v1/nodes/leaving")
                .send()
                .await
                .unwrap()
                .status()
                == 404
        },
    )
    .await;
}

/// Leaving does not lift an admin's disable: a disabled node that drains itself empty is
/// removed, and when it comes back under its id (a restart) it is still disabled until an
/// admin enables it.
#[tokio::test]
async fn a_disabled_node_that_leaves_and_comes_back_is_still_disabled() {
    let r = TestRouter::start(config()).await;
    let hb = |state: &str| json!({"url": "http://127.0.0.1:9", "capacity": 10000, "load": 0, "state": state, "rooms": []});
    assert_eq!(heartbeat(&r, "a", hb("active")).await.status(), 200);
    assert_eq!(heartbeat(&r, "b", hb("active")).await.status(), 200);
    let resp = r
        .admin(Method::POST, "/v1/nodes/a/disable")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // It drains itself empty: removed at its second such report, a heartbeat interval
    // (200 ms here) after the first.
    assert_eq!(heartbeat(&r, "a", hb("draining")).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(heartbeat(&r, "a", hb("draining")).await.status(), 200);
    r.expect_admin_error(Method::GET, "/v1/nodes/a", 404, "not_found")
        .await;
    assert_eq!(heartbeat(&r, "a", hb("active")).await.status(), 200);
    let st: serde_json::Value = admin_json(&r, "/v1/nodes/a").await;
    assert_eq!(
        (st["state"].as_str(), st["admin_state"].as_str()),
        (Some("disabled"), Some("disabled"))
    );
    for i in 0..20 {
        assert_eq!(
            node_of(&r, &format!("d{i}")).await,
            "b",
            "a disabled node takes nothing"
        );
    }
    let resp = r
        .admin(Method::POST, "/v1/nodes/a/enable")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let st: serde_json::Value = admin_json(&r, "/v1/nodes/a").await;
    assert_eq!(st["state"], "active");
}

#[tokio::test]
async fn a_guessed_reservation_lapses_before_a_hinted_one() {
    let mut cfg = config();
    cfg.placement.new_room_reserve_ttl = Duration::from_millis(300);
    cfg.validate().unwrap();
    let r = TestRouter::start(cfg).await;
    heartbeat(
        &r,
        "n1",
        json!({"url": "http://127.0.0.1:9", "capacity": 1000, "load": 0}),
    )
    .await;
    for path in ["/v1/placement/hinted?size=30", "/v1/placement/guessed"] {
        let resp = r.get(path).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    let reserved = || async { admin_json(&r, "/v1/nodes/n1").await["reserved"].as_f64() };
    assert_eq!(
        reserved().await,
        Some(40.0),
        "30 hinted + the 10-unit guess"
    );
    // The guess goes with the next sweep after its 300 ms; the hint stays (5 min).
    eventually("the guess lapsed", Duration::from_secs(10), || async {
        reserved().await == Some(30.0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(reserved().await, Some(30.0));
}

/// A router with a store of its own knows no pin when it (re)starts: for
/// `placement.startup_hold` a new room gets `503 not_ready` with `Retry-After` (placed at
/// once it could split a room whose node has not reported yet), `/readyz` says it is
/// starting, and rooms the nodes report are joined where they are. Through the fast path
/// and the placement API alike; after the hold, new rooms are placed.
#[tokio::test]
async fn a_starting_router_sends_reported_rooms_home_and_holds_new_ones() {
    let mut cfg = config();
    cfg.placement.startup_hold = Some(Duration::from_millis(1_500));
    let r = TestRouter::start(cfg).await;
    let node = |rooms: serde_json::Value| json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 0, "rooms": rooms});
    heartbeat(&r, "a", node(json!([]))).await;
    heartbeat(&r, "b", node(json!([{"room": "live", "participants": 5}]))).await;
    assert_eq!(node_of(&r, "live").await, "b");
    for path in ["/rooms/fresh", "/v1/placement/fresh"] {
        let resp = r.get(path).send().await.unwrap();
        assert_eq!(resp.status(), 503, "{path}");
        let wait: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=2).contains(&wait), "{path}: Retry-After {wait}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["error"], "not_ready", "{v}");
    }
    let ready = r.get("/readyz").send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let v: serde_json::Value = ready.json().await.unwrap();
    assert!(v.to_string().contains("starting"), "{v}");
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    heartbeat(&r, "a", node(json!([]))).await;
    heartbeat(&r, "b", node(json!([{"room": "live", "participants": 5}]))).await;
    assert_eq!(r.get("/readyz").send().await.unwrap().status(), 200);
    node_of(&r, "fresh").await;
    assert_eq!(node_of(&r, "live").await, "b");
}

/// A browser logged in to `/dashboard` with Basic sends that login with every request to
/// the router, another site's included: a form there posting to an admin endpoint must not
/// act with it (cross-site request forgery). Reading stays open, and tools that send no
/// browser headers, and Bearer tokens (never sent by a browser on its own), pass.
#[tokio::test]
async fn a_cross_site_request_cannot_act_with_a_browsers_basic_login() {
    let r = TestRouter::start(config()).await;
    let _n = r.node("a", 100.0).await;
    let basic = |m: Method, path: &str| {
        client()
            .request(m, format!("{}{path}", r.url))
            .basic_auth("admin", Some(ADMIN))
    };
    let host = r.url.trim_start_matches("http://").to_string();
    let forged = [
        ("sec-fetch-site", "cross-site".to_string()),
        ("sec-fetch-site", "same-site".to_string()),
        ("origin", "https://evil.example".to_string()),
        ("origin", "null".to_string()),
    ];
    for (name, value) in &forged {
        for (m, path) in [
            (Method::POST, "/v1/nodes/a/disable"),
            (Method::POST, "/v1/nodes/a/drain"),
            (Method::DELETE, "/v1/nodes/a"),
            (Method::DELETE, "/v1/rooms/r1"),
        ] {
            let resp = basic(m.clone(), path)
                .header(*name, value)
                .send()
                .await
                .unwrap();
            let v = expect_error(resp, 403, "forbidden").await;
            assert!(
                v["message"].as_str().unwrap().contains("Bearer"),
                "{name}: {value}: {m} {path}: {v}"
            );
        }
        // Reading is not acting: the dashboard and the node list still answer.
        let resp = basic(Method::GET, "/v1/nodes")
            .header(*name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{name}: {value}");
    }
    assert_eq!(admin_json(&r, "/v1/nodes/a").await["admin_state"], "active");

    // The router's own page (same origin), a tool sending no browser headers, and a Bearer
    // token from anywhere act as before.
    let resp = basic(Method::POST, "/v1/nodes/a/drain")
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = basic(Method::POST, "/v1/nodes/a/enable")
        .header("origin", format!("http://{host}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = basic(Method::POST, "/v1/nodes/a/drain")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = r
        .admin(Method::POST, "/v1/nodes/a/enable")
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(admin_json(&r, "/v1/nodes/a").await["admin_state"], "active");
}

/// A placement lookup is a `GET` that places its room (and reserves `?size=`): with user
/// tokens on, an admin's Basic login a browser sends on its own must not let another
/// site's `<img src=".../v1/placement/x?size=...">` place rooms. Refused as a cross-site
/// `POST` is; the router's own page, tools and Bearer tokens pass.
#[tokio::test]
async fn a_cross_site_lookup_cannot_place_rooms_with_a_browsers_basic_login() {
    let mut cfg = config();
    cfg.auth.users = roomrouter::config::UserAuth::Jwt;
    cfg.auth.jwt.secret = "user-jwt-secret-0123456789-0123456789".into();
    let r = TestRouter::start(cfg).await;
    let _n = r.node("a", 100.0).await;
    let basic = |path: &str| {
        client()
            .get(format!("{}{path}", r.url))
            .basic_auth("admin", Some(ADMIN))
    };
    let resp = basic("/v1/placement/forged?size=50")
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    expect_error(resp, 403, "forbidden").await;
    r.expect_admin_error(Method::GET, "/v1/rooms/forged", 404, "not_found")
        .await;
    let resp = basic("/v1/placement/own")
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        basic("/v1/placement/tool").send().await.unwrap().status(),
        200
    );
    let resp = r
        .admin(Method::GET, "/v1/placement/bearer")
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// A node agent given several routers (sharing a Redis, in production) heartbeats to the
/// next one when the one it uses fails: a router's crash or hang must not leave the node
/// unheard for `placement.heartbeat_timeout`, which the other routers would take for the
/// node's death and move its live rooms (a failure-injection run: a router paused 10 s
/// had 20 rooms of a healthy node moved). Here the first router is not up at start, and
/// the one the node then uses stops.
#[tokio::test]
async fn a_node_with_several_routers_heartbeats_to_the_next_when_one_fails() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (a, b) = (
        TestRouter::start(config()).await,
        TestRouter::start(config()).await,
    );
    let mut cfg = a.node_config("media-1", 100.0);
    cfg.routers = vec![format!("http://{dead}"), a.url.clone(), b.url.clone()];
    let node = roomrouter::demo::node::DemoNode::start(cfg).await.unwrap();
    assert!(
        healthy(&a, "media-1").await,
        "the first router that answers takes the node"
    );
    let b_list = admin_json(&b, "/v1/nodes").await;
    assert_eq!(b_list["nodes"].as_array().unwrap().len(), 0, "{b_list}");
    a.stop().await;
    // Heartbeats every 200 ms: b hears the node within a few.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !healthy(&b, "media-1").await {
        assert!(
            std::time::Instant::now() < deadline,
            "b never heard the node"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.stop().await;
    // The leave went to the router the node used last.
    let b_list = admin_json(&b, "/v1/nodes").await;
    assert_eq!(b_list["nodes"].as_array().unwrap().len(), 0, "{b_list}");
}
