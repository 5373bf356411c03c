//! Bad input gets a clear error (status + stable `error` code), never a panic or a hang, and
//! a rejected request changes no state.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The observable state: nodes (minus timing fields) and pinned rooms.
async fn state(r: &TestRouter) -> (serde_json::Value, serde_json::Value) {
    let mut nodes: serde_json::Value = admin_json(r, "/v1/nodes").await;
    for n in nodes["nodes"].as_array_mut().unwrap() {
        n.as_object_mut().unwrap().remove("last_heartbeat_ms_ago");
    }
    let rooms: serde_json::Value = admin_json(r, "/v1/rooms?limit=1000").await;
    (nodes, rooms)
}

async fn router_with_a_node() -> TestRouter {
    let r = TestRouter::start(config()).await;
    let resp = heartbeat(
        &r,
        "n1",
        json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 1}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    r.get("/v1/placement/existing").send().await.unwrap();
    r
}

/// `GET /healthz` over HTTP/2 (prior knowledge) on a connection of its own.
async fn h2_healthz(r: &TestRouter) -> reqwest::Response {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(format!("{}/healthz", r.url))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn invalid_room_ids_are_refused_everywhere() {
    let r = router_with_a_node().await;
    let before = state(&r).await;
    let long = "x".repeat(257);
    for path in [
        "/rooms/a%2Fb".to_string(),
        "/rooms/a%00b".to_string(),
        "/rooms/%FF%FE".to_string(),
        format!("/rooms/{long}"),
        "/v1/placement/a%0Ab".to_string(),
        "/meet?room=".to_string(),
        // Not UTF-8 in the query either (a lossy decoding made %FF and %FE one room).
        "/meet?room=%FF".to_string(),
        "/meet?x=1&room=a%FEb".to_string(),
        // `*` is a user token's room claim for every room, never a room: a user who named a
        // room `*` and got a token for it would hold one for all rooms.
        "/rooms/%2A".to_string(),
        "/v1/placement/*".to_string(),
        "/meet?room=*".to_string(),
        // `.` and `..` are path segments: a node's room URL ending in one resolves to
        // another path (the node's `/`), and a browser sent there lands outside the room.
        "/meet?room=..".to_string(),
        "/meet?room=.".to_string(),
        "/meet?room=%2E%2E".to_string(),
        // An empty room in an API path: the endpoint exists, the room is what is wrong.
        "/v1/placement/".to_string(),
    ] {
        expect_error(r.get(&path).send().await.unwrap(), 400, "invalid_room").await;
    }
    for (method, path) in [
        (Method::GET, "/v1/rooms/"),
        (Method::DELETE, "/v1/rooms/"),
        (Method::GET, "/v1/placement//explain"),
    ] {
        r.expect_admin_error(method, path, 400, "invalid_room")
            .await;
    }
    let resp = r
        .post("/v1/login")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("room=%FF")
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_room").await;
    let resp = r
        .post("/v1/login")
        .json(&json!({"room": "a/b"}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_room").await;
    let resp = r
        .post("/v1/login")
        .header("accept", "text/html")
        .json(&json!({"room": ".."}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_room").await;
    assert_eq!(state(&r).await, before, "rejected requests changed state");
}

/// A node's heartbeat listing a room that is not a valid room id is not refused whole (the
/// node would be taken for dead, its rooms re-placed while it still hosts them): the room
/// is skipped, counted and named in the answer's `refused`, and the rest applies.
#[tokio::test]
async fn a_heartbeat_skips_the_rooms_it_cannot_take_and_applies_the_rest() {
    let r = router_with_a_node().await;
    let long = "x".repeat(300);
    let beat = json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 50, "rooms": [
        {"room": "ok", "participants": 1}, {"room": "bad\u{7}", "participants": 1},
        {"room": "a/b", "participants": 2}, {"room": long, "participants": 3}]});
    let resp = heartbeat(&r, "n1", beat.clone()).await;
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["state"], "active", "{v}");
    assert_eq!(v["evict"], json!([]), "{v}");
    let refused = v["refused"].as_array().unwrap();
    let rooms: Vec<&str> = refused
        .iter()
        .map(|e| e["room"].as_str().unwrap())
        .collect();
    assert_eq!(rooms, ["bad\u{7}", "a/b", &long[..260]], "{v}");
    assert!(refused
        .iter()
        .all(|e| e["error"] == "invalid_room"
            && e["message"].as_str().is_some_and(|m| !m.is_empty())));
    // The valid room is the node's, and its load is recorded.
    let room = admin_json(&r, "/v1/rooms/ok").await;
    assert_eq!(room["node"], "n1", "{room}");
    let node = admin_json(&r, "/v1/nodes/n1").await;
    assert_eq!(node["load"], 50.0, "{node}");
    let m = r.metrics().await;
    assert_eq!(sample(&m, "roomrouter_heartbeat_rooms_refused_total"), 3.0);
    assert_eq!(heartbeat(&r, "n1", beat).await.status(), 200);
    let m = r.metrics().await;
    assert_eq!(sample(&m, "roomrouter_heartbeat_rooms_refused_total"), 6.0);
    // A heartbeat with nothing to refuse has no `refused`.
    let resp = heartbeat(
        &r,
        "n1",
        json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 50,
               "rooms": [{"room": "ok", "participants": 1}]}),
    )
    .await;
    let v: serde_json::Value = resp.json().await.unwrap();
    assert!(v.get("refused").is_none(), "{v}");
}

/// A heartbeat room entry that is not `{"room": string, "participants": u32}` is skipped
/// and named as `invalid_request`, as a bad room id is: one node's bug in one entry (a
/// count of `-1`, a number for a room) does not make every heartbeat of it fail, the node
/// look dead and its rooms be re-placed while it hosts them.
#[tokio::test]
async fn a_heartbeat_skips_room_entries_of_the_wrong_shape_and_applies_the_rest() {
    let r = router_with_a_node().await;
    let beat = json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 40, "rooms": [
        {"room": "ok", "participants": 2},
        {"room": "neg", "participants": -1},
        {"room": "half", "participants": 1.5},
        {"room": "huge", "participants": 4294967296u64},
        {"room": "none", "participants": null},
        {"room": "missing"},
        {"room": 5, "participants": 1},
        {"participants": 1},
        "bare",
        [1, 2],
        null,
        {"room": "max", "participants": 4294967295u64, "other": {"deep": [1]}}]});
    let resp = heartbeat(&r, "n1", beat).await;
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    let refused = v["refused"].as_array().unwrap();
    let rooms: Vec<&str> = refused
        .iter()
        .map(|e| e["room"].as_str().unwrap())
        .collect();
    assert_eq!(
        rooms,
        [
            "neg",
            "half",
            "huge",
            "none",
            "missing",
            "5",
            "",
            r#""bare""#,
            "[...]",
            "null"
        ],
        "{v}"
    );
    assert!(refused
        .iter()
        .all(|e| e["error"] == "invalid_request"
            && e["message"].as_str().is_some_and(|m| !m.is_empty())));
    for room in ["ok", "max"] {
        let got = admin_json(&r, &format!("/v1/rooms/{room}")).await;
        assert_eq!(got["node"], "n1", "{got}");
    }
    let node = admin_json(&r, "/v1/nodes/n1").await;
    assert_eq!(node["load"], 40.0, "{node}");
    let m = r.metrics().await;
    assert_eq!(sample(&m, "roomrouter_heartbeat_rooms_refused_total"), 10.0);
}

/// Posts `body` as node `n1`'s heartbeat, as it is.
async fn raw_heartbeat(r: &TestRouter, body: impl Into<reqwest::Body>) -> reqwest::Response {
    r.post("/v1/nodes/n1/heartbeat")
        .bearer_auth(NODE_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// A heartbeat listing more rooms than a node may report is refused as it is read: entries
/// as small as `{}` fit the byte limit by the million, and were all kept before the count
/// was checked.
#[tokio::test]
async fn a_heartbeat_over_the_room_limit_is_refused() {
    let r = router_with_a_node().await;
    let limit = roomrouter::http::api::MAX_REPORTED_ROOMS;
    for (entries, status) in [(limit, 200), (limit + 1, 400)] {
        let body = format!(
            r#"{{"url": "http://127.0.0.1:9", "capacity": 100, "load": 1, "rooms": [{}{{}}]}}"#,
            "{},".repeat(entries - 1)
        );
        let resp = raw_heartbeat(&r, body).await;
        if status == 200 {
            assert_eq!(resp.status(), 200);
        } else {
            let v = expect_error(resp, 400, "invalid_request").await;
            let message = v["message"].as_str().unwrap();
            assert!(message.contains(&format!("at most {limit} rooms")), "{v}");
        }
    }
}

/// A heartbeat carries as many rooms as the router accepts: more than `server.max_body_bytes`
/// holds; a body beyond the heartbeat limit is still `413`.
#[tokio::test]
async fn a_heartbeat_may_list_more_rooms_than_the_general_body_limit_holds() {
    let r = router_with_a_node().await;
    let rooms: Vec<serde_json::Value> = (0..10_000)
        .map(|i| json!({"room": format!("{i:08x}-0000-4000-8000-000000000000"), "participants": 2}))
        .collect();
    let beat =
        json!({"url": "http://127.0.0.1:9", "capacity": 100_000, "load": 20_000, "rooms": rooms});
    let body = serde_json::to_vec(&beat).unwrap();
    assert!(body.len() > config().server.max_body_bytes);
    let resp = raw_heartbeat(&r, body).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    let room = admin_json(&r, "/v1/rooms/00002710-0000-4000-8000-000000000000").await;
    assert_eq!(room["error"], "not_found", "only the listed rooms: {room}");
    let room = admin_json(&r, "/v1/rooms/0000270f-0000-4000-8000-000000000000").await;
    assert_eq!(room["node"], "n1", "{room}");
    // One byte over the heartbeat limit, announced: refused before a byte of it is read.
    let over = roomrouter::http::api::MAX_HEARTBEAT_BODY_BYTES + 1;
    let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let head = format!(
        "POST /v1/nodes/n1/heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {NODE_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {over}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The answer, as far as its error code (the server may close or keep the connection).
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("payload_too_large") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 5 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
}

#[tokio::test]
async fn malformed_and_oversized_bodies() {
    let r = router_with_a_node().await;
    let before = state(&r).await;
    let bad = r
        .post("/v1/nodes/n1/heartbeat")
        .bearer_auth(NODE_TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_error(bad, 400, "invalid_request").await;
    for body in [
        json!({"url": "http://127.0.0.1:9", "capacity": 0, "load": 1}),
        json!({"url": "http://127.0.0.1:9", "capacity": -5, "load": 1}),
        json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": -1}),
        // Past any media server, and sums of them would overflow (a trillion is the most).
        json!({"url": "http://127.0.0.1:9", "capacity": 1e300, "load": 1}),
        json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 1e300}),
        json!({"url": "http://127.0.0.1:9", "capacity": 1.000001e12, "load": 1}),
        json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 1, "cpu": 1.5}),
        json!({"url": "ftp://127.0.0.1:9", "capacity": 100, "load": 1}),
        // A URL the router could not put in a redirect or a request line.
        json!({"url": "http://127.0.0.1:9\n", "capacity": 100, "load": 1}),
        json!({"url": "http://127.0.0.1:9/a b", "capacity": 100, "load": 1}),
        json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 1, "state": "disabled"}),
        json!({"url": "http://127.0.0.1:9", "capacity": "lots", "load": 1}),
        json!({"capacity": 100, "load": 1}),
    ] {
        expect_error(heartbeat(&r, "n1", body).await, 400, "invalid_request").await;
    }
    let huge = "x".repeat(300 * 1024);
    let resp = r
        .post("/v1/login")
        .header("content-type", "application/json")
        .body(format!("{{\"room\":\"{huge}\"}}"))
        .send()
        .await
        .unwrap();
    expect_error(resp, 413, "payload_too_large").await;
    let resp = r
        .post("/v1/placement")
        .json(&json!({"rooms": "not-a-list"}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_request").await;
    let resp = r.get("/v1/placement/x?size=-3").send().await.unwrap();
    expect_error(resp, 400, "invalid_request").await;
    let resp = r.get("/v1/placement/x?create=maybe").send().await.unwrap();
    expect_error(resp, 400, "invalid_request").await;
    let resp = r
        .admin(Method::GET, "/v1/rooms?limit=0")
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_request").await;
    assert_eq!(state(&r).await, before);
}

#[tokio::test]
async fn missing_or_wrong_tokens_are_refused_and_change_nothing() {
    let r = router_with_a_node().await;
    let before = state(&r).await;
    let hb = json!({"url": "http://127.0.0.1:66", "capacity": 999, "load": 0});
    let resp = r
        .post("/v1/nodes/n1/heartbeat")
        .json(&hb)
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "unauthorized").await;
    let resp = r
        .post("/v1/nodes/n1/heartbeat")
        .bearer_auth("wrong-token-wrong-token")
        .json(&hb)
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "unauthorized").await;
    // A token of the router's, where it may not act: the caller is known (403), and told so.
    let resp = r
        .post("/v1/nodes/n1/heartbeat")
        .bearer_auth(ADMIN)
        .json(&hb)
        .send()
        .await
        .unwrap();
    expect_error(resp, 403, "forbidden").await;
    for (m, p) in [
        (Method::GET, "/v1/nodes"),
        (Method::GET, "/v1/nodes/n1"),
        (Method::POST, "/v1/nodes/n1/disable"),
        (Method::DELETE, "/v1/rooms/existing"),
        (Method::GET, "/v1/rooms"),
    ] {
        let resp = client()
            .request(m.clone(), format!("{}{p}", r.url))
            .send()
            .await
            .unwrap();
        expect_error(resp, 401, "unauthorized").await;
        let resp = client()
            .request(m, format!("{}{p}", r.url))
            .bearer_auth(NODE_TOKEN)
            .send()
            .await
            .unwrap();
        expect_error(resp, 403, "forbidden").await;
    }
    let resp = client()
        .delete(format!("{}/v1/nodes/n1", r.url))
        .bearer_auth("nope-nope-nope-nope")
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "unauthorized").await;
    // Credentials are checked before the node id: without them a caller learns nothing,
    // not even that an id is malformed; with them the id's fault is named.
    let bad_id = "x".repeat(65);
    let resp = r
        .post(&format!("/v1/nodes/{bad_id}/heartbeat"))
        .json(&hb)
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "unauthorized").await;
    let resp = client()
        .delete(format!("{}/v1/nodes/{bad_id}", r.url))
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "unauthorized").await;
    let resp = r
        .post(&format!("/v1/nodes/{bad_id}/heartbeat"))
        .bearer_auth(NODE_TOKEN)
        .json(&hb)
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_request").await;
    let resp = client()
        .delete(format!("{}/v1/nodes/{bad_id}", r.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_request").await;
    assert_eq!(state(&r).await, before);
}

#[tokio::test]
async fn a_node_with_its_own_token_must_use_it_and_no_other_node_may() {
    let mut cfg = config();
    let own = "special-node-token-0123456789";
    cfg.auth
        .node_tokens
        .insert("special".to_string(), own.to_string());
    let r = TestRouter::start(cfg).await;
    let hb = json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 0});
    let send = |id: &'static str, token: &'static str| {
        let (r, hb) = (&r, hb.clone());
        async move {
            r.post(&format!("/v1/nodes/{id}/heartbeat"))
                .bearer_auth(token)
                .json(&hb)
                .send()
                .await
                .unwrap()
        }
    };
    expect_error(send("special", NODE_TOKEN).await, 403, "forbidden").await;
    expect_error(send("other", own).await, 403, "forbidden").await;
    assert_eq!(send("special", own).await.status(), 200);
    assert_eq!(send("other", NODE_TOKEN).await.status(), 200);
    let del = client()
        .delete(format!("{}/v1/nodes/special", r.url))
        .bearer_auth(NODE_TOKEN)
        .send()
        .await
        .unwrap();
    expect_error(del, 403, "forbidden").await;
    let del = client()
        .delete(format!("{}/v1/nodes/special", r.url))
        .bearer_auth(own)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
}

#[tokio::test]
async fn unknown_nodes_paths_and_wrong_methods() {
    let r = router_with_a_node().await;
    let before = state(&r).await;
    r.expect_admin_error(Method::GET, "/v1/nodes/ghost", 404, "not_found")
        .await;
    r.expect_admin_error(Method::DELETE, "/v1/nodes/ghost", 404, "not_found")
        .await;
    r.expect_admin_error(Method::GET, "/v1/nodes/bad%20id", 400, "invalid_request")
        .await;
    expect_error(
        r.admin(Method::GET, "/v1/frobnicate").send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    // The API's root is no front-door path: not a join of room x.
    expect_error(r.get("/v1?room=x").send().await.unwrap(), 404, "not_found").await;
    let resp = r
        .admin(Method::DELETE, "/v1/placement/x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["allow"], "GET");
    expect_error(resp, 405, "method_not_allowed").await;
    expect_error(
        r.get("/v1/login").send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    expect_error(
        r.get("/v1/nodes/n1/heartbeat").send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    expect_error(
        r.post("/healthz").send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    expect_error(
        r.post("/rooms/existing").send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    assert_eq!(state(&r).await, before);
}

/// `HEAD` on a read-only endpoint answers as `GET` would, without the body (RFC 9110
/// section 9.3.2): a monitor may probe the admin API with it. A placement lookup places a
/// room that has none, so `HEAD` there is refused and places nothing.
#[tokio::test]
async fn head_answers_what_get_would_on_read_only_endpoints_and_places_nothing() {
    let r = router_with_a_node().await;
    let before = state(&r).await;
    for path in [
        "/v1/nodes",
        "/v1/nodes/n1",
        "/v1/rooms",
        "/v1/rooms/existing",
        "/v1/placement/fresh/explain",
        "/healthz",
    ] {
        let get = r.admin(Method::GET, path).send().await.unwrap();
        assert_eq!(get.status(), 200, "GET {path}");
        let get_type = get.headers()["content-type"].clone();
        let get_len = get.bytes().await.unwrap().len();
        assert!(get_len > 0, "GET {path}");
        let answer = raw(
            &r,
            &format!(
                "HEAD {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
                 Connection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(status(&answer), 200, "HEAD {path}: {answer}");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, "", "HEAD {path} sent a body");
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains(&format!("content-length: {get_len}\r\n")),
            "HEAD {path}: {head}"
        );
        let get_type = get_type.to_str().unwrap().to_ascii_lowercase();
        assert!(
            head.contains(&format!("content-type: {get_type}")),
            "{head}"
        );
    }
    // The same rules for who may ask.
    let anon = raw(
        &r,
        "HEAD /v1/nodes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&anon), 401, "{anon}");
    let missing = raw(
        &r,
        &format!(
            "HEAD /v1/rooms/nowhere HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
             Connection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status(&missing), 404, "{missing}");
    assert!(missing.ends_with("\r\n\r\n"), "HEAD got a body: {missing}");

    let lookup = r
        .admin(Method::HEAD, "/v1/placement/fresh")
        .send()
        .await
        .unwrap();
    assert_eq!(lookup.status(), 405);
    assert_eq!(lookup.headers()["allow"], "GET");
    let node = r
        .admin(Method::OPTIONS, "/v1/nodes/n1")
        .send()
        .await
        .unwrap();
    assert_eq!(node.headers()["allow"], "GET, HEAD, PUT, DELETE");
    // Nothing was placed or changed: `fresh` has no node.
    assert_eq!(state(&r).await, before);
}

/// One raw request on a connection of its own; the whole answer (the router closes after a
/// 400, or the request said `Connection: close`).
async fn raw(r: &TestRouter, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("no answer within 5 s")
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

/// The status code of a raw answer (`HTTP/1.x NNN ...`).
fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_request_without_exactly_one_valid_host_is_a_400_on_either_path() {
    // RFC 9112 section 3.2: a server answers 400 to an HTTP/1.1 request with no `Host`, and
    // to any request with two or with an invalid one. A cache or proxy in front could read
    // another host than the router did.
    for fast_path in [true, false] {
        let mut cfg = config();
        cfg.server.fast_path = fast_path;
        let r = TestRouter::start(cfg).await;
        let hb = json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 1});
        assert_eq!(heartbeat(&r, "n1", hb).await.status(), 200);
        let before = state(&r).await;
        for request in [
            "GET /rooms/a HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /rooms/a HTTP/1.1\r\nConnection: close\r\nHost: r.example\r\nHost: evil.example\r\n\r\n",
            "GET /rooms/a HTTP/1.1\r\nConnection: close\r\nHost: r.example\r\nhost: r.example\r\n\r\n",
            "GET /rooms/a HTTP/1.1\r\nConnection: close\r\nHost: user@r.example\r\n\r\n",
            "GET /v1/placement/a HTTP/1.1\r\nConnection: close\r\nHost: r.example/x\r\n\r\n",
            "GET /v1/placement/a HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /rooms/a HTTP/1.0\r\nConnection: close\r\nHost: a\r\nHost: b\r\n\r\n",
        ] {
            let answer = raw(&r, request).await;
            assert!(
                status(&answer) == 400 && answer.contains("invalid_request"),
                "fast path {fast_path}, {request:?}: {answer}"
            );
        }
        // Nothing was placed or pinned by the refused requests.
        assert_eq!(state(&r).await, before, "fast path {fast_path}");
        // One valid `Host` is served; HTTP/1.0 may go without one.
        for request in [
            "GET /healthz HTTP/1.1\r\nHost: r.example:8080\r\nConnection: close\r\n\r\n",
            "GET /healthz HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n",
            "GET /healthz HTTP/1.0\r\n\r\n",
            "GET /v1/placement/b HTTP/1.1\r\nHost: r.example\r\nConnection: close\r\n\r\n",
        ] {
            let answer = raw(&r, request).await;
            assert!(
                status(&answer) == 200,
                "fast path {fast_path}, {request:?}: {answer}"
            );
        }
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let mut cfg = config();
    cfg.server.header_read_timeout = Duration::from_millis(300);
    let r = TestRouter::start(cfg).await;
    let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "connection still open after the header timeout"
    );
}

#[tokio::test]
async fn a_client_that_stalls_before_its_protocol_is_known_is_cut_off() {
    // hyper's protocol sniff (HTTP/1 or HTTP/2) has no timer of its own: a client that sends
    // a piece of the HTTP/2 preface, or nothing at all, must still lose its connection slot
    // after the header timeout.
    for (fast_path, first) in [
        (true, &b"PRI * HTTP/2.0\r\n"[..]),
        (false, &b""[..]),
        (false, &b"PRI * HTTP"[..]),
    ] {
        let mut cfg = config();
        cfg.server.header_read_timeout = Duration::from_millis(300);
        cfg.server.fast_path = fast_path;
        let r = TestRouter::start(cfg).await;
        let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
        s.write_all(first).await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "connection still open 5 s after a stall (fast path {fast_path}, sent {first:?})"
        );
        // The router still answers, HTTP/1 and, with the whole preface, HTTP/2.
        assert_eq!(r.get("/healthz").send().await.unwrap().status(), 200);
        let resp = h2_healthz(&r).await;
        assert_eq!(
            (resp.version(), resp.status().as_u16()),
            (reqwest::Version::HTTP_2, 200)
        );
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_body_gets_a_timeout() {
    let mut cfg = config();
    cfg.server.body_read_timeout = Duration::from_millis(300);
    let r = TestRouter::start(cfg).await;
    let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"POST /v1/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"room\":")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("no answer")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let r = router_with_a_node().await;
    let big = "a".repeat(64 * 1024);
    let resp = r.get("/healthz").header("x-big", big).send().await;
    match resp {
        Ok(resp) => assert_eq!(resp.status(), 431),
        Err(e) => assert!(
            e.is_request() || e.is_connect() || e.to_string().contains("connection"),
            "{e}"
        ),
    }
    // The router still serves.
    assert_eq!(r.get("/healthz").send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let mut cfg = config();
    cfg.server.header_read_timeout = Duration::from_millis(300);
    let r = TestRouter::start(cfg).await;
    let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Now idle: the router must close the connection on its own.
    let started = std::time::Instant::now();
    let rest = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(rest.is_ok(), "idle keep-alive connection left open");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn an_idle_http2_connection_is_shut_down_but_a_busy_one_is_not() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    // HTTP/2 keep-alive pings keep a silent connection alive; without an idle timeout it
    // would hold its connection slot for good.
    // (long enough that a busy test machine's stall between two requests stays below it)
    let limit = Duration::from_millis(1500);
    let mut cfg = config();
    cfg.server.h2_idle_timeout = limit;
    let r = TestRouter::start(cfg).await;
    let tcp = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // Busy: a request every 100 ms for twice the limit.
    let busy_until = tokio::time::Instant::now() + limit * 2;
    let mut last_answer = std::time::Instant::now();
    while tokio::time::Instant::now() < busy_until {
        let req = http::Request::get(format!("{}/healthz", r.url))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send
            .send_request(req)
            .await
            .expect("busy connection closed");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        last_answer = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!conn.is_finished(), "a busy HTTP/2 connection was closed");
    // Idle: the router ends it on its own (GOAWAY, then close), and says so.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(ended.is_ok(), "idle HTTP/2 connection left open");
    // (The router's idle clock started when it dropped the last response, a little before
    // the client had read it.)
    let idle = last_answer.elapsed();
    assert!(
        idle >= limit - Duration::from_millis(100),
        "closed {idle:?} after the last answer, before the idle limit"
    );
    assert!(send.is_closed());
    // And the router still serves HTTP/2.
    let resp = h2_healthz(&r).await;
    assert_eq!(
        (resp.version(), resp.status().as_u16()),
        (reqwest::Version::HTTP_2, 200)
    );
}

#[tokio::test]
async fn demo_nodes_and_the_benchmark_ceiling_cut_off_a_client_that_stalls() {
    // Both serve HTTP/1.1 and HTTP/2 through hyper-util's protocol sniff, which has no timer
    // of its own: a stalled client must still lose its connection (5 s header timeout).
    let r = TestRouter::start(config()).await;
    let node = r.node("n1", 10.0).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ceiling = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(roomrouter::load::ceiling::serve_bare_307(
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    let targets = [("demo node", node.addr), ("ceiling", ceiling)];
    let mut stalls = tokio::task::JoinSet::new();
    for (what, addr) in targets {
        for first in [&b"PRI * HTTP"[..], &b""[..]] {
            stalls.spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(first).await.unwrap();
                let mut buf = Vec::new();
                let read =
                    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await;
                assert!(
                    read.is_ok(),
                    "{what}: connection still open 15 s after a stall (sent {first:?})"
                );
            });
        }
    }
    while let Some(stall) = stalls.join_next().await {
        stall.unwrap();
    }
    for (what, addr) in targets {
        // Still serving.
        let resp = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
            .get(format!("http://{addr}/rooms/x"))
            .send()
            .await
            .unwrap();
        assert!(resp.status().as_u16() < 500, "{what}: {}", resp.status());
    }
    let _ = stop.send(());
    server.await.unwrap();
}
