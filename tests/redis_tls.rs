//! TLS to Redis (`rediss://`): a private `redis-server` listening with TLS, certificates
//! made in the test (rcgen). The router trusts the CA `store.tls_ca_file` names, presents
//! `store.tls_cert_file`/`tls_key_file` when the server asks for a client certificate, and
//! refuses to start against a server it cannot authenticate.

mod redis_support;

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use redis_support::*;
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

/// A private `redis-server` with a plain port (to look at its data) and a TLS port.
fn tls_redis(pki: &Pki, client_certs: bool) -> Option<(PrivateRedis, u16)> {
    let tls_port = free_port();
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();
    let r = PrivateRedis::start_with(
        free_port(),
        vec![
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
        ],
    )?;
    Some((r, tls_port))
}

#[tokio::test]
async fn a_router_keeps_its_pins_in_a_redis_reached_over_tls() {
    let test = "a_router_keeps_its_pins_in_a_redis_reached_over_tls";
    let pki = Pki::new("pins");
    let Some((redis, tls_port)) = tls_redis(&pki, false) else {
        return skip(test, "no redis-server on PATH");
    };
    let prefix = prefix("tls");
    let mut cfg = config(&format!("rediss://127.0.0.1:{tls_port}"), &prefix);
    cfg.store.tls_ca_file = Some(pki.ca.clone());
    cfg.validate().unwrap();
    let r = serve(cfg).await;
    let c = client();
    heartbeat(&c, &r.base(), "media-1", 0.0, &[]).await;
    assert_eq!(place(&c, &r.base(), "standup").await.unwrap(), "media-1");
    // The pin is in that Redis (read back over its plain port).
    let pin = redis_pin(&redis.url(), &room_key(&prefix, "standup"))
        .await
        .expect("pin written over TLS");
    assert!(pin.starts_with("media-1|"), "{pin}");
    r.stop().await;
}

#[tokio::test]
async fn a_server_certificate_the_router_cannot_verify_stops_it_from_starting() {
    let test = "a_server_certificate_the_router_cannot_verify_stops_it_from_starting";
    let pki = Pki::new("untrusted");
    let Some((_redis, tls_port)) = tls_redis(&pki, false) else {
        return skip(test, "no redis-server on PATH");
    };
    // Another CA than the one that signed the server's certificate.
    let other = Pki::new("other-ca");
    let mut cfg = config(
        &format!("rediss://127.0.0.1:{tls_port}"),
        &prefix("tls-bad"),
    );
    cfg.store.tls_ca_file = Some(other.ca.clone());
    cfg.store.connect_timeout = Duration::from_millis(500);
    let e = store::open(&cfg)
        .await
        .err()
        .expect("an untrusted server is refused");
    let e = format!("{e:#}");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
}

#[tokio::test]
async fn a_redis_that_asks_for_a_client_certificate_gets_the_configured_one() {
    let test = "a_redis_that_asks_for_a_client_certificate_gets_the_configured_one";
    let pki = Pki::new("mtls");
    let Some((_redis, tls_port)) = tls_redis(&pki, true) else {
        return skip(test, "no redis-server on PATH");
    };
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let mut cfg = config(&url, &prefix("tls-mtls"));
    cfg.store.tls_ca_file = Some(pki.ca.clone());
    cfg.store.connect_timeout = Duration::from_millis(500);
    assert!(
        store::open(&cfg).await.is_err(),
        "without a client certificate the server refuses the router"
    );
    cfg.store.tls_cert_file = Some(pki.client.0.clone());
    cfg.store.tls_key_file = Some(pki.client.1.clone());
    cfg.validate().unwrap();
    let r = serve(cfg).await;
    let c = client();
    heartbeat(&c, &r.base(), "media-1", 0.0, &[]).await;
    assert_eq!(place(&c, &r.base(), "weekly").await.unwrap(), "media-1");
    r.stop().await;
}
