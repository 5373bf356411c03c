//! The front door and the join path, end to end over HTTP with demo nodes.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use roomrouter::room::Normalization;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_join_of_a_room_lands_on_one_node_under_concurrency() {
    let r = TestRouter::start(config()).await;
    let nodes = vec![
        r.node("n1", 5_000.0).await,
        r.node("n2", 10_000.0).await,
        r.node("n3", 20_000.0).await,
    ];
    let mut tasks = Vec::new();
    for t in 0..32 {
        let url = r.url.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut seen = Vec::new();
            for i in 0..100 {
                let room = format!("room-{}", (i * 13 + t * 7) % 300);
                let resp = c.get(format!("{url}/join/{room}")).send().await.unwrap();
                assert_eq!(resp.status(), 307);
                let node = resp.headers()["x-room-node"].to_str().unwrap().to_string();
                let loc = resp.headers()["location"].to_str().unwrap().to_string();
                // Follow the redirect: the node verifies the ticket and counts the participant.
                let joined = c.get(&loc).send().await.unwrap();
                assert_eq!(joined.status(), 200, "node refused {loc}");
                seen.push((room, node));
            }
            seen
        }));
    }
    let mut by_room: HashMap<String, HashSet<String>> = HashMap::new();
    for t in tasks {
        for (room, node) in t.await.unwrap() {
            by_room.entry(room).or_default().insert(node);
        }
    }
    assert_eq!(by_room.len(), 300);
    let split: Vec<_> = by_room.iter().filter(|(_, n)| n.len() > 1).collect();
    assert!(split.is_empty(), "split rooms: {split:?}");
    // The nodes agree: no room has participants on two nodes, and all 3200 joins arrived.
    let mut owner: HashMap<String, String> = HashMap::new();
    let mut total = 0;
    for n in &nodes {
        for (room, count) in n.rooms() {
            total += count;
            if let Some(prev) = owner.insert(room.clone(), n.id.clone()) {
                panic!("room {room} on {prev} and {}", n.id);
            }
        }
    }
    assert_eq!(total, 3200);
    assert!(nodes.iter().all(|n| n.load() > 0), "every node got rooms");
}

#[tokio::test]
async fn redirect_carries_path_query_ticket_and_node() {
    let r = TestRouter::start(config()).await;
    let n = r.node("solo", 100.0).await;
    let resp = r
        .get("/rooms/Weekly%20Sync?lang=en&ticket=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);
    assert_eq!(resp.headers()["x-room-node"], "solo");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let loc = resp.headers()["location"].to_str().unwrap();
    assert!(
        loc.starts_with(&format!("{}/rooms/Weekly%20Sync?lang=en&ticket=", n.url)),
        "{loc}"
    );
    assert_eq!(
        loc.matches("ticket=").count(),
        1,
        "a client-sent ticket is dropped: {loc}"
    );
    let ticket = loc.rsplit("ticket=").next().unwrap();
    let claims = roomrouter::auth::TicketIssuer::new(SECRET, Duration::from_secs(60))
        .verify(ticket)
        .unwrap();
    assert_eq!(
        claims.room, "weekly sync",
        "the ticket names the normalized room"
    );
    assert_eq!(claims.node, "solo");
}

#[tokio::test]
async fn room_can_come_from_query_parameter_or_header() {
    let r = TestRouter::start(config()).await;
    let _n = r.node("solo", 100.0).await;
    let a = r.get("/meet?room=Alpha").send().await.unwrap();
    assert_eq!(a.status(), 307);
    let b = r
        .get("/anything")
        .header("x-room", "alpha")
        .send()
        .await
        .unwrap();
    assert_eq!(b.status(), 307);
    let pinned = r
        .admin(reqwest::Method::GET, "/v1/rooms/alpha")
        .send()
        .await
        .unwrap();
    assert_eq!(pinned.status(), 200);
    expect_error(r.get("/anything").send().await.unwrap(), 404, "not_found").await;
}

#[tokio::test]
async fn case_variants_of_a_room_share_one_node() {
    let r = TestRouter::start(config()).await;
    for i in 0..5 {
        r.node(&format!("n{i}"), 1000.0).await;
    }
    let mut nodes = HashSet::new();
    for name in ["Team-Room", "team-room", "TEAM-ROOM", "tEaM-rOoM"] {
        let resp = r.get(&format!("/rooms/{name}")).send().await.unwrap();
        nodes.insert(resp.headers()["x-room-node"].to_str().unwrap().to_string());
        let api: serde_json::Value = r.get(&format!("/v1/placement/{name}")).send_json().await;
        nodes.insert(api["node"].as_str().unwrap().to_string());
    }
    assert_eq!(nodes.len(), 1);
}

/// Titlecase letters (`ǅ` U+01C5, `ᾼ` U+1FBC) are not uppercase but lowercase: every
/// spelling of such a room is one key, so one pin and one node.
#[tokio::test]
async fn titlecase_spellings_of_a_room_share_one_pin() {
    for mode in ["lowercase", "nfkc_lowercase"] {
        let mut c = config();
        c.rooms.normalization = serde_json::from_value(json!(mode)).unwrap();
        let r = TestRouter::start(c).await;
        for i in 0..5 {
            heartbeat(
                &r,
                &format!("n{i}"),
                json!({"url": "http://127.0.0.1:9", "capacity": 1000, "load": 0}),
            )
            .await;
        }
        // "Aǅ" / "aǅ" / "aǆ", and "Xᾼ" / "xᾼ" / "xᾳ" (percent-encoded UTF-8).
        for spellings in [
            ["A%C7%85", "a%C7%85", "a%C7%86"],
            ["X%E1%BE%BC", "x%E1%BE%BC", "x%E1%BE%B3"],
        ] {
            let first = r
                .get(&format!("/rooms/{}", spellings[0]))
                .send()
                .await
                .unwrap();
            assert_eq!(first.status(), 307, "{mode}");
            let node = first.headers()["x-room-node"].clone();
            for s in &spellings[1..] {
                let resp = r.get(&format!("/rooms/{s}")).send().await.unwrap();
                assert_eq!(resp.headers()["x-room-node"], node, "{mode} {s}");
                let v: serde_json::Value = r
                    .get(&format!("/v1/placement/{s}?create=false"))
                    .send_json()
                    .await;
                assert_eq!(v["created"], false, "{mode} {s} is the pinned room: {v}");
                assert_eq!(v["node"], node.to_str().unwrap(), "{mode} {s}");
            }
        }
        let rooms = admin_json(&r, "/v1/rooms").await;
        let names: Vec<&str> = rooms["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["room"].as_str().unwrap())
            .collect();
        // NFKC also takes the digraph apart: "adž".
        let dz = if mode == "lowercase" {
            "a\u{01C6}"
        } else {
            "ad\u{017E}"
        };
        assert_eq!(names, [dz, "x\u{1FB3}"], "{mode}: one pin per room");
        r.stop().await;
    }
}

#[tokio::test]
async fn demo_nodes_refuse_users_who_skip_the_router() {
    let r = TestRouter::start(config()).await;
    let a = r.node("a", 100.0).await;
    let b = r.node("b", 100.0).await;
    let c = client();
    assert_eq!(
        c.get(format!("{}/rooms/x", a.url))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    // A ticket for node a is refused by node b.
    let loc = r.get("/rooms/x").send().await.unwrap().headers()["location"]
        .to_str()
        .unwrap()
        .to_string();
    let ticket = loc.rsplit("ticket=").next().unwrap();
    let target = if loc.starts_with(&a.url) { &b } else { &a };
    let wrong = c
        .get(format!("{}/rooms/x?ticket={ticket}", target.url))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    // A ticket for room x does not admit to room y on the same node, however y is spelled;
    // x's own ticket does, in any spelling the router would take for x.
    let home = if loc.starts_with(&a.url) { &a } else { &b };
    for (path, status) in [
        ("/rooms/y", 403),
        ("/join/y", 403),
        ("/rooms/X", 200),
        ("/rooms/x", 200),
    ] {
        let resp = c
            .get(format!("{}{path}?ticket={ticket}", home.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{path}");
    }
}

/// A demo node compares the room a ticket names with the path's room normalized as its
/// router does, and only so: under `none`, "Standup" is another room than "standup", and a
/// ticket for one does not admit to the other.
#[tokio::test]
async fn a_demo_node_compares_rooms_as_its_router_normalizes_them() {
    let mut c = config();
    c.rooms.normalization = Normalization::None;
    let r = TestRouter::start(c).await;
    let node = r
        .node_naming_rooms("exact", 100.0, Normalization::None)
        .await;
    let loc = r.get("/rooms/standup").send().await.unwrap().headers()["location"]
        .to_str()
        .unwrap()
        .to_string();
    let ticket = loc.rsplit("ticket=").next().unwrap();
    let other = client()
        .get(format!("{}/rooms/Standup?ticket={ticket}", node.url))
        .send()
        .await
        .unwrap();
    expect_error(other, 403, "forbidden").await;
    let own = client()
        .get(format!("{}/rooms/standup?ticket={ticket}", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    assert_eq!(node.counters().0, 1, "one join accepted");
}

#[tokio::test]
async fn login_answers_json_or_redirects_browsers() {
    let r = TestRouter::start(config()).await;
    let n = r.node("solo", 100.0).await;
    let resp = r
        .post("/v1/login")
        .json(&serde_json::json!({"room": "Board", "user": "ann", "display_name": "Ann"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["room"], "board");
    assert_eq!(body["node"], "solo");
    assert_eq!(body["url"], format!("{}/rooms/board", n.url));
    assert_eq!(body["expires_in"], 60);
    let claims = roomrouter::auth::TicketIssuer::new(SECRET, Duration::from_secs(60))
        .verify(body["ticket"].as_str().unwrap())
        .unwrap();
    assert_eq!(claims.sub, "ann");
    // A browser form post gets a 303 to the node with the ticket.
    let resp = r
        .post("/v1/login")
        .header("accept", "text/html")
        .form(&[("room", "board"), ("user", "bob")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["x-room-node"], "solo");
    let loc = resp.headers()["location"].to_str().unwrap();
    assert!(
        loc.starts_with(&format!("{}/rooms/board?ticket=", n.url)),
        "{loc}"
    );
    let joined = client().get(loc).send().await.unwrap();
    assert_eq!(joined.status(), 200);
    // A media type is case-insensitive, and may carry parameters.
    for ctype in [
        "Application/X-WWW-Form-Urlencoded",
        "application/x-www-form-urlencoded ; charset=UTF-8",
    ] {
        let resp = r
            .post("/v1/login")
            .header("content-type", ctype)
            .body("room=board&user=cy")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{ctype}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["room"], "board", "{ctype}");
        assert_eq!(body["node"], "solo", "{ctype}");
    }
    // An HTML form sends its optional inputs left blank: they count as absent.
    let resp = r
        .post("/v1/login")
        .header("accept", "text/html")
        .form(&[
            ("room", "board"),
            ("user", ""),
            ("display_name", ""),
            ("region", ""),
            ("size", ""),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let loc = resp.headers()["location"].to_str().unwrap();
    let ticket = loc.split("ticket=").nth(1).unwrap();
    let claims = roomrouter::auth::TicketIssuer::new(SECRET, Duration::from_secs(60))
        .verify(ticket)
        .unwrap();
    assert_eq!(claims.sub, "anonymous");
    // A size that is given must still be one.
    let resp = r
        .post("/v1/login")
        .form(&[("room", "board"), ("size", "large")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
}

#[tokio::test]
async fn tag_hints_only_place_rooms_on_nodes_carrying_every_tag() {
    let r = TestRouter::start(config()).await;
    for (id, tags) in [
        ("plain-1", json!([])),
        ("plain-2", json!([])),
        ("rec", json!(["recording"])),
        ("rec-gpu", json!(["recording", "gpu"])),
    ] {
        let resp = heartbeat(
            &r,
            id,
            json!({"url": format!("http://127.0.0.1:9/{id}"), "capacity": 1000, "load": 0, "tags": tags}),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let reply: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(reply["state"], "active");
        assert_eq!(reply["heartbeat_interval_ms"], 200, "config().placement");
        assert_eq!(reply["evict"], json!([]));
    }
    let lookup = |q: String| {
        let r = &r;
        async move {
            let v: serde_json::Value = r.get(&q).send_json().await;
            v["node"].as_str().unwrap_or_default().to_string()
        }
    };
    let mut with_rec = HashSet::new();
    for i in 0..40 {
        with_rec.insert(lookup(format!("/v1/placement/rec-{i}?tag=recording")).await);
        assert_eq!(
            lookup(format!("/v1/placement/both-{i}?tag=recording&tag=gpu")).await,
            "rec-gpu"
        );
    }
    assert_eq!(
        with_rec,
        HashSet::from(["rec".to_string(), "rec-gpu".to_string()]),
        "rooms needing a tag spread over the nodes carrying it, and only those"
    );
    // No node carries the tag: refused, not overflowed onto a node without it.
    let resp = r.get("/v1/placement/nowhere?tag=sip").send().await.unwrap();
    expect_error(resp, 503, "no_capacity").await;
    // The batch lookup takes the same hints for all its rooms, and `create: false`.
    let batch_lookup = |body: serde_json::Value| {
        let r = &r;
        async move {
            let resp = r.post("/v1/placement").json(&body).send().await.unwrap();
            resp.json::<serde_json::Value>().await.unwrap()
        }
    };
    let batch = batch_lookup(json!({"rooms": ["gpu-a", "gpu-b", "rec-0"], "tags": ["gpu"]})).await;
    assert_eq!(batch[0]["node"], "rec-gpu");
    assert_eq!(batch[1]["node"], "rec-gpu");
    assert_eq!(
        batch[2]["node"],
        lookup("/v1/placement/rec-0".into()).await,
        "pinned wins"
    );
    let batch = batch_lookup(json!({"rooms": ["gpu-a", "never-made"], "create": false})).await;
    assert_eq!(batch[0]["node"], "rec-gpu");
    assert_eq!(batch[1]["error"], "not_found", "{batch}");
    let resp = r
        .post("/v1/placement")
        .json(&json!({"rooms": ["x"], "tags": [""]}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_request").await;
}

#[tokio::test]
async fn placement_lookups_single_batch_and_without_create() {
    let r = TestRouter::start(config()).await;
    r.node("a", 1000.0).await;
    r.node("b", 1000.0).await;
    let miss = r
        .get("/v1/placement/ghost?create=false")
        .send()
        .await
        .unwrap();
    expect_error(miss, 404, "not_found").await;
    let first: serde_json::Value = r.get("/v1/placement/alpha?size=4").send_json().await;
    assert_eq!(first["created"], true);
    let again: serde_json::Value = r.get("/v1/placement/alpha").send_json().await;
    assert_eq!(again["created"], false);
    assert_eq!(again["node"], first["node"]);
    let batch: serde_json::Value = r
        .post("/v1/placement")
        .json(&serde_json::json!({"rooms": ["alpha", "beta", "bad/room", "gamma"]}))
        .send_json()
        .await;
    let items = batch.as_array().unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0]["node"], first["node"]);
    assert_eq!(items[1]["room"], "beta");
    assert_eq!(items[2]["error"], "invalid_room");
    assert_eq!(items[3]["room"], "gamma");
    let too_many: Vec<String> = (0..1001).map(|i| format!("r{i}")).collect();
    let resp = r
        .post("/v1/placement")
        .json(&serde_json::json!({ "rooms": too_many }))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_request").await;
}

/// A `HEAD` on the front door is safe (RFC 9110 9.2.1): a link checker's or a monitor's
/// opens no meeting and counts no join. A room not placed is `404`, and stays unplaced; a
/// placed one gets the `GET`'s redirect to its node, with the node's `pending` unchanged.
/// On both paths, in both modes.
#[tokio::test]
async fn a_head_on_the_front_door_places_nothing_and_counts_no_join() {
    use roomrouter::config::FrontDoorMode;
    for (mode, fast_path) in [
        (FrontDoorMode::Redirect, true),
        (FrontDoorMode::Redirect, false),
        (FrontDoorMode::Proxy, true),
        (FrontDoorMode::Proxy, false),
    ] {
        let what = format!("{mode:?}, fast path {fast_path}");
        let mut cfg = config();
        cfg.front_door.mode = mode;
        cfg.server.fast_path = fast_path;
        let r = TestRouter::start(cfg).await;
        let node = r.node("n1", 100.0).await;
        let pending = || async { admin_json(&r, "/v1/nodes/n1").await["pending"].clone() };
        let head = || async {
            client()
                .head(format!("{}/rooms/checked", r.url))
                .send()
                .await
                .unwrap()
        };
        let resp = head().await;
        assert_eq!(resp.status(), 404, "{what}");
        assert!(resp.headers().get("x-room-node").is_none(), "{what}");
        r.expect_admin_error(reqwest::Method::GET, "/v1/rooms/checked", 404, "not_found")
            .await;
        assert_eq!(pending().await, 0.0, "{what}");

        let resp = r.get("/rooms/checked").send().await.unwrap();
        let placed = if mode == FrontDoorMode::Redirect {
            307
        } else {
            200
        };
        assert_eq!(resp.status(), placed, "{what}");
        let joined = pending().await;
        assert!(
            joined.as_f64().is_some_and(|p| p >= 1.0),
            "{what}: {joined}"
        );

        // Proxied, the answer is the node's own to a HEAD (the demo node serves GET only).
        let resp = head().await;
        if mode == FrontDoorMode::Redirect {
            assert_eq!(resp.status(), 307, "{what}");
        }
        assert_eq!(resp.headers()["x-room-node"], "n1", "{what}");
        assert_eq!(pending().await, joined, "{what}: the HEAD counted a join");
        drop(node);
        r.stop().await;
    }
}

/// A ticket used again at the demo node (a reload, a retry, a replay) is the participant it
/// admitted, not one more: counted again, one ticket could make a room look as large as a
/// replayer liked, and the node full to the router. A second join's own ticket counts.
#[tokio::test]
async fn a_demo_node_counts_a_ticket_used_again_once() {
    let r = TestRouter::start(config()).await;
    let node = r.node("n1", 100.0).await;
    let c = client();
    let join = || async {
        let resp = r.get("/rooms/replayed").send().await.unwrap();
        assert_eq!(resp.status(), 307);
        resp.headers()["location"].to_str().unwrap().to_string()
    };
    let first = join().await;
    for _ in 0..3 {
        let resp = c.get(&first).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["participants"], 1, "{v}");
    }
    let second = join().await;
    let v: serde_json::Value = c.get(&second).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["participants"], 2, "{v}");
    assert_eq!(node.rooms().get("replayed"), Some(&2));
    r.stop().await;
}
