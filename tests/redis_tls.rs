//! TLS to Redis (`rediss://`): a private `redis-server` listening with TLS, certificates
//! made in the test (rcgen). The router trusts the CA `store.tls_ca_file` names, presents
//! `store.tls_cert_file`/`tls_key_file` when the server asks for a client certificate, and
//! refuses to start against a server it cannot authenticate.

mod redis_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use redis_support::*;
use roomrouter::config::Config;
use roomrouter::store;

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("rr-redis-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "test redis CA");
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let write = |name: &str, text: &str| {
            let f = dir.join(name);
            std::fs::write(&f, text).unwrap();
            f
        };
        let leaf = |names: Vec<String>, stem: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            (
                write(&format!("{stem}.pem"), &cert.pem()),
                write(&format!("{stem}.key"), &key.serialize_pem()),
            )
        };
        let server = leaf(vec!["127.0.0.1".into(), "localhost".into()], "server");
        let client = leaf(vec!["router".into()], "client");
        let ca = write("ca.pem", &issuer.pem());
        Pki {
            dir,
            ca,
            server,
            client,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private `redis-server` with a plain port (to look at its data) and a TLS port whose
/// certificate `pki` signed; the server asks for client certificates if `client_certs`.
struct TlsRedis {
    pki: Pki,
    redis: PrivateRedis,
    /// `rediss://127.0.0.1:<tls port>`.
    url: String,
}

impl TlsRedis {
    /// Starts one, or says SKIPPED (a failure in CI) and gives `None` without `redis-server`.
    fn start(test: &str, client_certs: bool) -> Option<TlsRedis> {
        let pki = Pki::new(test);
        let tls_port = free_port();
        let path = |p: &PathBuf| p.to_str().unwrap().to_string();
        let args = vec![
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            path(&pki.server.0),
            "--tls-key-file".into(),
            path(&pki.server.1),
            "--tls-ca-cert-file".into(),
            path(&pki.ca),
            "--tls-auth-clients".into(),
            if client_certs { "yes" } else { "no" }.into(),
        ];
        let Some(redis) = PrivateRedis::start_with(free_port(), args) else {
            skip(test, "no redis-server on PATH");
            return None;
        };
        Some(TlsRedis {
            pki,
            redis,
            url: format!("rediss://127.0.0.1:{tls_port}"),
        })
    }

    /// A router config for it under `prefix`, trusting `ca`, failing fast.
    fn config(&self, prefix: &str, ca: &Path) -> Config {
        let mut cfg = config(&self.url, prefix);
        cfg.store.tls_ca_file = Some(ca.to_path_buf());
        cfg.store.connect_timeout = Duration::from_millis(500);
        cfg.validate().unwrap();
        cfg
    }
}

/// Serves a router with `cfg`, registers one node and places `room`: the node it names.
async fn place_one(cfg: Config, room: &str) -> String {
    let r = serve(cfg).await;
    let c = client();
    heartbeat(&c, &r.base(), "media-1", 0.0, &[]).await;
    let node = place(&c, &r.base(), room).await.unwrap();
    r.stop().await;
    node
}

#[tokio::test]
async fn a_router_keeps_its_pins_in_a_redis_reached_over_tls() {
    let Some(t) = TlsRedis::start("tls-pins", false) else {
        return;
    };
    let prefix = prefix("tls");
    assert_eq!(
        place_one(t.config(&prefix, &t.pki.ca), "standup").await,
        "media-1"
    );
    // The pin is in that Redis (read back over its plain port).
    let pin = redis_pin(&t.redis.url(), &room_key(&prefix, "standup"))
        .await
        .expect("pin written over TLS");
    assert!(pin.starts_with("media-1|"), "{pin}");
}

#[tokio::test]
async fn a_server_certificate_the_router_cannot_verify_stops_it_from_starting() {
    let Some(t) = TlsRedis::start("tls-untrusted", false) else {
        return;
    };
    // Another CA than the one that signed the server's certificate.
    let other = Pki::new("tls-other-ca");
    let cfg = t.config(&prefix("tls-bad"), &other.ca);
    let e = store::open(&cfg)
        .await
        .err()
        .expect("an untrusted server is refused");
    let e = format!("{e:#}");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
}

#[tokio::test]
async fn a_redis_that_asks_for_a_client_certificate_gets_the_configured_one() {
    let Some(t) = TlsRedis::start("tls-mtls", true) else {
        return;
    };
    let mut cfg = t.config(&prefix("tls-mtls"), &t.pki.ca);
    assert!(
        store::open(&cfg).await.is_err(),
        "without a client certificate the server refuses the router"
    );
    cfg.store.tls_cert_file = Some(t.pki.client.0.clone());
    cfg.store.tls_key_file = Some(t.pki.client.1.clone());
    cfg.validate().unwrap();
    assert_eq!(place_one(cfg, "weekly").await, "media-1");
}
