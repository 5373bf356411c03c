//! User logins with JWTs over real HTTP: the matrix (valid, expired, bad signature, wrong
//! room, wildcard room, missing) at both the front door and `POST /v1/login`, ES256 keys,
//! and the token's region as the placement hint.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{expect_error, heartbeat, TestRouter, SECRET};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use roomrouter::auth::TicketIssuer;
use roomrouter::config::{Config, JwtAlgorithm, UserAuth};

const JWT_SECRET: &str = "user-jwt-secret-0123456789-0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jwt_config() -> Config {
    let mut c = common::config();
    c.auth.users = UserAuth::Jwt;
    c.auth.jwt.secret = JWT_SECRET.into();
    c.auth.jwt.leeway = Duration::from_secs(5);
    c.placement.heartbeat_interval = Duration::from_secs(1);
    c.placement.heartbeat_timeout = Duration::from_secs(60);
    c.validate().unwrap();
    c
}

fn token(claims: serde_json::Value, key: &EncodingKey, alg: Algorithm) -> String {
    encode(&Header::new(alg), &claims, key).unwrap()
}

fn hs(claims: serde_json::Value) -> String {
    token(
        claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        Algorithm::HS256,
    )
}

async fn with_node(cfg: Config) -> TestRouter {
    let r = TestRouter::start(cfg).await;
    let resp = heartbeat(
        &r,
        "n1",
        serde_json::json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 0}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    r
}

/// A token, the error it must get (none: admitted), and the user the ticket must name.
type Case<'a> = (Option<&'a str>, Option<(u16, &'a str)>, &'a str);

/// The matrix, at the front door and at login.
#[tokio::test]
async fn the_jwt_matrix_holds_at_the_front_door_and_at_login() {
    let r = with_node(jwt_config()).await;
    let exp = now() + 300;
    let valid = hs(serde_json::json!({"sub": "alice", "exp": exp, "room": "Standup"}));
    let wildcard = hs(serde_json::json!({"sub": "bob", "exp": exp, "room": "*"}));
    let expired = hs(serde_json::json!({"sub": "alice", "exp": now() - 120, "room": "standup"}));
    // Not valid for another two minutes (the leeway is 5 s).
    let not_yet =
        hs(serde_json::json!({"sub": "alice", "exp": exp, "nbf": now() + 120, "room": "standup"}));
    let wrong_room = hs(serde_json::json!({"sub": "alice", "exp": exp, "room": "other"}));
    let bad_sig = token(
        serde_json::json!({"sub": "alice", "exp": exp, "room": "standup"}),
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-000"),
        Algorithm::HS256,
    );
    let cases: [Case<'_>; 7] = [
        (Some(&valid), None, "alice"),
        (Some(&wildcard), None, "bob"),
        (Some(&expired), Some((401, "unauthorized")), ""),
        (Some(&not_yet), Some((401, "unauthorized")), ""),
        (Some(&bad_sig), Some((401, "unauthorized")), ""),
        (Some(&wrong_room), Some((403, "forbidden")), ""),
        (None, Some((401, "unauthorized")), ""),
    ];
    let tickets = TicketIssuer::new(SECRET, Duration::from_secs(60));
    for (tok, err, user) in cases {
        // Front door (redirect mode).
        let mut req = r.get("/rooms/standup");
        if let Some(t) = tok {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        match err {
            Some((status, code)) => {
                expect_error(resp, status, code).await;
            }
            None => {
                assert_eq!(resp.status(), 307);
                let loc = resp.headers()["location"].to_str().unwrap().to_string();
                let t = loc.split("ticket=").nth(1).unwrap();
                assert_eq!(
                    tickets.verify(t).unwrap().sub,
                    user,
                    "ticket names the user"
                );
            }
        }
        // Login.
        let mut req = r
            .post("/v1/login")
            .json(&serde_json::json!({"room": "standup", "user": "mallory"}));
        if let Some(t) = tok {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        match err {
            Some((status, code)) => {
                expect_error(resp, status, code).await;
            }
            None => {
                assert_eq!(resp.status(), 200);
                let v: serde_json::Value = resp.json().await.unwrap();
                let c = tickets.verify(v["ticket"].as_str().unwrap()).unwrap();
                assert_eq!(c.sub, user, "the token's sub wins over the body's user");
            }
        }
    }
    // A token in the query (browser WebSockets cannot set headers).
    let resp = r
        .get(&format!("/rooms/standup?access_token={valid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);
    // ... also behind a site-wide proxy that adds its own Basic auth: that header is not
    // the user's token, the query's is.
    for (token, status) in [(valid.as_str(), 307), (wrong_room.as_str(), 403)] {
        let resp = r
            .get(&format!("/rooms/standup?access_token={token}"))
            .basic_auth("site", Some("proxy-password"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status);
    }
    let resp = r
        .get("/rooms/standup")
        .basic_auth("site", Some("proxy-password"))
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "unauthorized").await;
    r.stop().await;
}

/// The login token is the router's credential: a redirect never carries it to the node,
/// however its key is spelled, and the rest of the query goes as it came.
#[tokio::test]
async fn a_query_token_is_not_passed_on_in_the_redirect() {
    let r = with_node(jwt_config()).await;
    let t = hs(serde_json::json!({"sub": "alice", "exp": now() + 300, "room": "*"}));
    for query in [
        format!("lang=en&access_token={t}&x=1"),
        format!("access_token={t}&lang=en&x=1"),
        format!("lang=en&x=1&access%5Ftoken={t}"),
    ] {
        let resp = r
            .get(&format!("/rooms/standup?{query}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 307, "{query}");
        let loc = resp.headers()["location"].to_str().unwrap();
        assert!(!loc.contains(&t), "the token went to the node: {loc}");
        assert!(
            loc.starts_with("http://127.0.0.1:9/rooms/standup?lang=en&x=1&ticket="),
            "{loc}"
        );
    }
    r.stop().await;
}

/// With user JWTs, placement lookups (which place rooms and reserve their expected size)
/// are not open: a user token valid for the room (every room of a batch), a node token or
/// an admin token; without one `401`, and nothing is placed or reserved.
#[tokio::test]
async fn placement_lookups_need_a_token_when_the_front_door_does() {
    let r = with_node(jwt_config()).await;
    let reserved = || async {
        let n = common::admin_json(&r, "/v1/nodes/n1").await;
        n["reserved"].as_f64().unwrap()
    };
    let pinned = |room: &'static str| {
        let r = &r;
        async move {
            let resp = r
                .admin(reqwest::Method::GET, &format!("/v1/rooms/{room}"))
                .send()
                .await
                .unwrap();
            resp.status() == 200
        }
    };
    // No credential, or one that is nothing: 401, nothing placed.
    for bearer in [None, Some("not-a-token"), Some("test-node-token-012345678")] {
        let mut get = r.get("/v1/placement/fresh?size=10000");
        let mut batch = r
            .post("/v1/placement")
            .json(&serde_json::json!({"rooms": ["fresh", "fresh-2"]}));
        if let Some(b) = bearer {
            get = get.bearer_auth(b);
            batch = batch.bearer_auth(b);
        }
        expect_error(get.send().await.unwrap(), 401, "unauthorized").await;
        expect_error(batch.send().await.unwrap(), 401, "unauthorized").await;
    }
    assert!(!pinned("fresh").await && !pinned("fresh-2").await);
    assert_eq!(reserved().await, 0.0, "an unauthorized lookup reserved");
    let exp = now() + 300;
    let standup = hs(serde_json::json!({"sub": "alice", "exp": exp, "room": "Standup"}));
    let any = hs(serde_json::json!({"sub": "bot", "exp": exp, "room": "*"}));
    let lookup = |path: &'static str, token: String| {
        let r = &r;
        async move { r.get(path).bearer_auth(token).send().await.unwrap() }
    };
    // A user token: its room, not another (403, nothing placed).
    let resp = lookup("/v1/placement/standup", standup.clone()).await;
    assert_eq!(resp.status(), 200);
    let resp = lookup("/v1/placement/other", standup.clone()).await;
    expect_error(resp, 403, "forbidden").await;
    let resp = r
        .get(&format!(
            "/v1/placement/standup?create=false&access_token={standup}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "a token in the query");
    // A batch: every room must be the token's.
    let batch = |rooms: serde_json::Value, token: String| {
        let r = &r;
        async move {
            r.post("/v1/placement")
                .bearer_auth(token)
                .json(&serde_json::json!({ "rooms": rooms }))
                .send()
                .await
                .unwrap()
        }
    };
    let resp = batch(serde_json::json!(["standup", "other"]), standup.clone()).await;
    expect_error(resp, 403, "forbidden").await;
    assert!(!pinned("other").await, "a refused batch placed a room");
    let resp = batch(serde_json::json!(["STANDUP"]), standup.clone()).await;
    assert_eq!(resp.status(), 200);
    let resp = batch(
        serde_json::json!(["standup", "other", "bad/room"]),
        any.clone(),
    )
    .await;
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v[1]["node"], "n1", "{v}");
    assert_eq!(v[2]["error"], "invalid_room", "{v}");
    // Node and admin tokens look up any room.
    for t in [common::NODE_TOKEN, common::ADMIN] {
        assert_eq!(
            lookup("/v1/placement/ops-room", t.into()).await.status(),
            200
        );
        let resp = batch(serde_json::json!(["a", "b"]), t.into()).await;
        assert_eq!(resp.status(), 200);
    }
    // Open lookups with auth.users = "none", as before.
    let open = with_node(common::config()).await;
    assert_eq!(
        open.get("/v1/placement/x").send().await.unwrap().status(),
        200
    );
    open.stop().await;
    r.stop().await;
}

/// Hints a token's issuer got wrong (a negative or fractional `size`, an empty or overlong
/// `region`) are left out: the user, whose token is otherwise valid, is admitted and the room
/// placed as without them, not refused with `401` or blamed with `400 invalid_request`.
#[tokio::test]
async fn a_tokens_hint_claims_that_are_no_valid_hints_are_left_out() {
    let r = TestRouter::start(jwt_config()).await;
    let resp = heartbeat(
        &r,
        "n1",
        serde_json::json!({"url": "http://127.0.0.1:9", "capacity": 1000, "load": 0}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let bad = [
        serde_json::json!({"size": -3}),
        serde_json::json!({"size": 2.5}),
        serde_json::json!({"size": "ten"}),
        serde_json::json!({"region": ""}),
        serde_json::json!({"region": "r".repeat(65)}),
        serde_json::json!({"region": 7}),
    ];
    for (i, extra) in bad.iter().enumerate() {
        let mut claims = serde_json::json!({"sub": "u", "exp": now() + 300, "room": "*"});
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let t = hs(claims);
        let resp = r
            .get(&format!("/rooms/hinted-{i}"))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 307, "{extra}");
    }
    // A valid one is still taken (what it reserves: the next test).
    let t = hs(serde_json::json!({"sub": "u", "exp": now() + 300, "room": "*", "size": 7}));
    let resp = r
        .get("/v1/placement/sized")
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    r.stop().await;
}

/// A user token's `size` (signed) wins over the request's `?size=` (anyone's to write), at
/// the front door, on lookups (single and batch) and at login.
#[tokio::test]
async fn the_tokens_size_claim_wins_over_the_requests() {
    let r = TestRouter::start(jwt_config()).await;
    let resp = heartbeat(
        &r,
        "big",
        serde_json::json!({"url": "http://127.0.0.1:9", "capacity": 100000, "load": 0}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let reserved = || async {
        let n = common::admin_json(&r, "/v1/nodes/big").await;
        n["reserved"].as_f64().unwrap()
    };
    let t = hs(serde_json::json!({"sub": "u", "exp": now() + 300, "room": "*", "size": 3}));
    // A lookup reserves the token's 3, not the query's 5000.
    let resp = r
        .get("/v1/placement/one?size=5000")
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(reserved().await, 3.0);
    // A join reserves 3 and its user arrives: 2 more.
    let resp = r
        .get("/rooms/two?size=5000")
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);
    assert_eq!(reserved().await, 5.0);
    let resp = r
        .post("/v1/login")
        .bearer_auth(&t)
        .json(&serde_json::json!({"room": "three", "size": 5000}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(reserved().await, 7.0);
    // A token without a size leaves the request's hint.
    let plain = hs(serde_json::json!({"sub": "u", "exp": now() + 300, "room": "*"}));
    let resp = r
        .get("/rooms/four?size=40")
        .bearer_auth(&plain)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);
    assert_eq!(reserved().await, 46.0);
    // A batch lookup reserves the token's 3 for each new room, not the default guess.
    let resp = r
        .post("/v1/placement")
        .bearer_auth(&t)
        .json(&serde_json::json!({"rooms": ["five", "six"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(reserved().await, 52.0);
    r.stop().await;
}

/// A checked ES256 config whose public key is `users.pub.pem` in a fresh directory named
/// after `tag` (returned), and a token for every room signed with its private key.
fn es256_config(tag: &str) -> (Config, std::path::PathBuf, String) {
    let kp = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pub_path = dir.join("users.pub.pem");
    std::fs::write(&pub_path, kp.public_key_pem()).unwrap();
    let mut cfg = jwt_config();
    cfg.auth.jwt.algorithm = JwtAlgorithm::ES256;
    cfg.auth.jwt.public_key_file = Some(pub_path);
    cfg.validate().unwrap();
    let key = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    let good = token(
        serde_json::json!({"sub": "carol", "exp": now() + 60, "room": "*"}),
        &key,
        Algorithm::ES256,
    );
    (cfg, dir, good)
}

/// A key file that went away after the config was checked refuses every user token, and
/// the `401` says only that the router's key is unusable: not the file's path, nor why it
/// failed (those go to the router's log).
#[tokio::test]
async fn an_unusable_key_refuses_users_without_telling_them_its_path() {
    let (cfg, dir, good) = es256_config("rr-gone-key");
    std::fs::remove_file(dir.join("users.pub.pem")).unwrap();
    let r = with_node(cfg).await;
    for path in ["/rooms/any", "/v1/placement/any"] {
        let resp = r.get(path).bearer_auth(&good).send().await.unwrap();
        let body = expect_error(resp, 401, "unauthorized").await;
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("key is unusable"), "{path}: {body}");
        assert!(
            !message.contains("rr-gone-key") && !message.contains(".pem"),
            "{path} told the key's path: {body}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn es256_tokens_verify_with_a_public_key_file() {
    let (cfg, dir, good) = es256_config("rr-es256");
    let r = with_node(cfg).await;
    let resp = r.get("/rooms/any").bearer_auth(&good).send().await.unwrap();
    assert_eq!(resp.status(), 307);
    // An HS256 token is refused even when signed with something the server might accept.
    let hs_token = hs(serde_json::json!({"sub": "carol", "exp": now() + 60, "room": "*"}));
    let resp = r
        .get("/rooms/any")
        .bearer_auth(&hs_token)
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "unauthorized").await;
    r.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_region_claim_is_the_placement_hint() {
    let r = TestRouter::start(jwt_config()).await;
    for (id, region) in [("eu-1", "eu"), ("us-1", "us")] {
        let resp = heartbeat(
            &r,
            id,
            serde_json::json!({"url": "http://127.0.0.1:9", "capacity": 100, "load": 0, "region": region}),
        )
        .await;
        assert_eq!(resp.status(), 200);
    }
    for (i, region) in ["eu", "us", "eu", "us", "eu", "us"].iter().enumerate() {
        let t =
            hs(serde_json::json!({"sub": "u", "exp": now() + 60, "room": "*", "region": region}));
        let resp = r
            .get(&format!("/rooms/room-{i}"))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 307);
        assert_eq!(resp.headers()["x-room-node"], format!("{region}-1"));
    }
    r.stop().await;
}

/// With `auth.jwt.audience` and `issuer` set, the identity provider's tokens for another
/// service (same key, another `aud`) and tokens without the claims are `401` at the front
/// door and at login; the router's own pass.
#[tokio::test]
async fn an_audience_and_issuer_set_keep_other_services_tokens_out() {
    let mut cfg = jwt_config();
    cfg.auth.jwt.audience = vec!["roomrouter".into()];
    cfg.auth.jwt.issuer = vec!["https://idp.test".into()];
    cfg.validate().unwrap();
    let r = with_node(cfg).await;
    let exp = now() + 300;
    let claims = |aud: Option<&str>, iss: &str| {
        let mut c = serde_json::json!({"sub": "ann", "exp": exp, "room": "*", "iss": iss});
        if let Some(aud) = aud {
            c["aud"] = aud.into();
        }
        hs(c)
    };
    for (t, ok) in [
        (claims(Some("roomrouter"), "https://idp.test"), true),
        (claims(Some("billing"), "https://idp.test"), false),
        (claims(None, "https://idp.test"), false),
        (claims(Some("roomrouter"), "https://other.test"), false),
    ] {
        let door = r
            .get("/rooms/standup")
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        let login = r
            .post("/v1/login")
            .bearer_auth(&t)
            .json(&serde_json::json!({"room": "standup"}))
            .send()
            .await
            .unwrap();
        if ok {
            assert_eq!(door.status(), 307);
            assert_eq!(login.status(), 200);
        } else {
            expect_error(door, 401, "unauthorized").await;
            expect_error(login, 401, "unauthorized").await;
        }
    }
    // An empty value would match no token: refused when the config is checked.
    let mut bad = jwt_config();
    bad.auth.jwt.audience = vec![String::new()];
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.starts_with("auth.jwt.audience"), "{e}");
    r.stop().await;
}

#[test]
fn jwt_config_errors_name_the_key() {
    let mut c = common::config();
    c.auth.users = UserAuth::Jwt;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.starts_with("auth.jwt"), "{e}");
}

/// A key file that can never verify a token (a private key where the public one goes, a
/// key of the wrong curve) is refused when the config is checked, naming the key, rather
/// than accepted and then refusing every user with `401`.
#[test]
fn a_key_file_that_cannot_verify_tokens_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("rr-badkeys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let p256 = rcgen::KeyPair::generate().unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let cases = [
        (
            JwtAlgorithm::RS256,
            format!("{data}/users-rs256.key").into(),
        ),
        (
            JwtAlgorithm::RS256,
            write("p256.pub.pem", p256.public_key_pem()),
        ),
        (
            JwtAlgorithm::ES256,
            write("p384.pub.pem", p384.public_key_pem()),
        ),
        (
            JwtAlgorithm::ES256,
            format!("{data}/users-rs256.pub.pem").into(),
        ),
    ];
    for (alg, path) in cases {
        let mut cfg = jwt_config();
        cfg.auth.jwt.algorithm = alg;
        cfg.auth.jwt.public_key_file = Some(path);
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("public_key_file"), "{alg:?}: {e}");
    }
    // The right keys pass.
    let mut cfg = jwt_config();
    cfg.auth.jwt.algorithm = JwtAlgorithm::ES256;
    cfg.auth.jwt.public_key_file = Some(write("ok.pub.pem", p256.public_key_pem()));
    cfg.validate().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// RS256 with a static test key pair (tests/data; ring cannot generate RSA keys at run time).
#[tokio::test]
async fn rs256_tokens_verify_with_a_public_key_file() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
    let mut cfg = jwt_config();
    cfg.auth.jwt.algorithm = JwtAlgorithm::RS256;
    cfg.auth.jwt.public_key_file = Some(format!("{dir}/users-rs256.pub.pem").into());
    cfg.validate().unwrap();
    let r = with_node(cfg).await;
    let pem = std::fs::read(format!("{dir}/users-rs256.key")).unwrap();
    let key = EncodingKey::from_rsa_pem(&pem).unwrap();
    let claims = serde_json::json!({"sub": "dave", "exp": now() + 60, "room": "board"});
    let good = token(claims, &key, Algorithm::RS256);
    let resp = r
        .get("/rooms/board")
        .bearer_auth(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);
    let resp = r
        .get("/rooms/other")
        .bearer_auth(&good)
        .send()
        .await
        .unwrap();
    expect_error(resp, 403, "forbidden").await;
    // Tampered payload: the signature no longer matches.
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    parts[1] = hs(serde_json::json!({"sub": "eve", "exp": now() + 60, "room": "*"}))
        .split('.')
        .nth(1)
        .unwrap()
        .to_string();
    let resp = r
        .get("/rooms/board")
        .bearer_auth(parts.join("."))
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "unauthorized").await;
    r.stop().await;
}
