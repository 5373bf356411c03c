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

#[tokio::test]
async fn es256_tokens_verify_with_a_public_key_file() {
    let kp = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256
    let dir = std::env::temp_dir().join(format!("rr-es256-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pub_path = dir.join("users.pub.pem");
    std::fs::write(&pub_path, kp.public_key_pem()).unwrap();
    let mut cfg = jwt_config();
    cfg.auth.jwt.algorithm = JwtAlgorithm::ES256;
    cfg.auth.jwt.public_key_file = Some(pub_path);
    cfg.validate().unwrap();
    let r = with_node(cfg).await;
    let key = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    let good = token(
        serde_json::json!({"sub": "carol", "exp": now() + 60, "room": "*"}),
        &key,
        Algorithm::ES256,
    );
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

#[test]
fn jwt_config_errors_name_the_key() {
    let mut c = common::config();
    c.auth.users = UserAuth::Jwt;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.starts_with("auth.jwt"), "{e}");
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
