//! TLS over real loopback sockets with certificates made in the test (rcgen): handshake and
//! ALPN, certificate reload without dropping an open connection (on a file change in process,
//! and on SIGHUP to the real binary), the HTTP -> HTTPS redirect
//! listener, mTLS node authentication (accept, wrong id, no or foreign certificate), and
//! proxying to an `https://` upstream trusted through `proxy.ca_file`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use roomrouter::config::{Config, FrontDoorMode};
use roomrouter::http::{server, tls, App};
use roomrouter::store::MemoryStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A CA that issues leaf certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        Ca {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf for `names` (DNS names or IPs): (cert PEM, key PEM, cert DER).
    fn leaf(&self, names: &[&str]) -> (String, String, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(self.issuer.der().clone()).unwrap();
        r
    }
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "rr-tls-{tag}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn write_pair(dir: &Path, cert: &str, key: &str) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

struct TlsRouter {
    addr: SocketAddr,
    app: Arc<App<MemoryStore>>,
    _stop: oneshot::Sender<()>,
}

async fn start_tls(cfg: Config, sc: Arc<rustls::ServerConfig>) -> TlsRouter {
    let app = roomrouter::service::build(cfg, MemoryStore::new());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server::serve_tls(app.clone(), l, sc, async {
        let _ = rx.await;
    }));
    TlsRouter {
        addr,
        app,
        _stop: tx,
    }
}

fn client_config(roots: RootCertStore, alpn: &[&[u8]]) -> ClientConfig {
    let mut c = ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    c
}

async fn connect(addr: SocketAddr, cfg: ClientConfig) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))?
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn h1(stream: TlsStream<TcpStream>) -> H1 {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn send(
    h: &mut H1,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(StatusCode, String), hyper::Error> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), h.send_request(req))
        .await
        .expect("answer in time")?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// GETs `uri` over HTTP/2 (ALPN h2 negotiated on `s`): the status and the body.
async fn h2_get(s: TlsStream<TcpStream>, uri: &str) -> (StatusCode, Bytes) {
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = h2
        .send_request(Request::get(uri).body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

fn front_door(ca: &Ca, tag: &str) -> (Arc<tls::CertReloader>, PathBuf) {
    let dir = tempdir(tag);
    let (cert, key, _) = ca.leaf(&["localhost", "127.0.0.1"]);
    let (c, k) = write_pair(&dir, &cert, &key);
    (tls::CertReloader::new(&c, &k).unwrap(), dir)
}

#[tokio::test]
async fn handshakes_negotiate_h2_or_http11_over_tls12_and_tls13() {
    let ca = Ca::new("front CA");
    let (certs, dir) = front_door(&ca, "alpn");
    let r = start_tls(common::config(), tls::server_config(certs, None).unwrap()).await;

    let s = connect(r.addr, client_config(ca.roots(), &[b"h2"]))
        .await
        .unwrap();
    assert_eq!(h2_get(s, "https://localhost/healthz").await.0, 200);

    let s = connect(r.addr, client_config(ca.roots(), &[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let (status, _) = send(&mut h1(s).await, "GET", "/healthz", "").await.unwrap();
    assert_eq!(status, 200);

    let tls12 = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    let s = connect(r.addr, tls12).await.unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );

    // A client that trusts another CA does not get through.
    let other = Ca::new("other CA");
    assert!(connect(r.addr, client_config(other.roots(), &[]))
        .await
        .is_err());
    let _ = std::fs::remove_dir_all(dir);
    drop(r);
}

/// A connection still without its TLS handshake when the server stops (no ClientHello
/// yet) is closed at once, and the stop does not wait for it: not for the handshake
/// timeout (`server.header_read_timeout`), nor for the grace.
#[tokio::test]
async fn shutdown_does_not_wait_for_a_connection_that_never_said_hello() {
    use tokio::io::AsyncReadExt;
    for loops in [1, 2] {
        let ca = Ca::new("front CA");
        let (certs, dir) = front_door(&ca, "hello");
        let mut cfg = common::config();
        cfg.server.worker_threads = Some(loops);
        cfg.server.header_read_timeout = Duration::from_secs(30);
        cfg.server.shutdown_grace = Duration::from_secs(30);
        cfg.validate().unwrap();
        let app = roomrouter::service::build(cfg, MemoryStore::new());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let sc = tls::server_config(certs, None).unwrap();
        let served = tokio::spawn(server::serve_tls(app, l, sc, async {
            let _ = rx.await;
        }));
        let mut silent = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = tx.send(());
        let mut b = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut b)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "{loops} loops: closed at shutdown: {read:?}"
        );
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the stop does not wait for a handshake that never began")
            .unwrap()
            .unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A renewal written over the old files with the same sizes and the old modification time
/// (`cp -p`, `rsync -a`, `install -p` keep it) is still noticed by the file check.
#[test]
fn a_renewal_of_the_same_size_with_the_old_modification_time_is_noticed() {
    let ca = Ca::new("front CA");
    let dir = tempdir("same-size");
    let (cert, key, _) = ca.leaf(&["localhost"]);
    let (c, k) = write_pair(&dir, &cert, &key);
    let certs = tls::CertReloader::new(&c, &k).unwrap();
    let kept = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let (cert_time, key_time) = (kept(&c), kept(&k));
    // A renewed certificate of the same length (an ECDSA signature's length varies by a
    // byte or two: draw until one matches), and a key of the same length.
    let (new_cert, new_key, new_der) = (0..64)
        .map(|_| ca.leaf(&["localhost"]))
        .find(|(c2, k2, _)| c2.len() == cert.len() && k2.len() == key.len())
        .expect("a renewal of the same length within 64 draws");
    // Past the filesystem clock's tick, as a renewal days later would be.
    std::thread::sleep(Duration::from_millis(50));
    write_pair(&dir, &new_cert, &new_key);
    for (p, t) in [(&c, cert_time), (&k, key_time)] {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    assert_eq!(kept(&c), cert_time);
    assert_eq!(certs.reload_if_changed(), Ok(true));
    assert_eq!(certs.current().cert[0], new_der);
    assert_eq!(certs.reload_if_changed(), Ok(false), "once");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_reloaded_certificate_serves_new_connections_and_keeps_open_ones() {
    let ca = Ca::new("front CA");
    let (certs, dir) = front_door(&ca, "reload");
    let r = start_tls(
        common::config(),
        tls::server_config(certs.clone(), None).unwrap(),
    )
    .await;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    certs.clone().watch(Duration::from_millis(50), async {
        let _ = stop_rx.await;
    });
    let s = connect(r.addr, client_config(ca.roots(), &[b"http/1.1"]))
        .await
        .unwrap();
    let first = s.get_ref().1.peer_certificates().unwrap()[0].clone();
    let mut open = h1(s).await;
    assert_eq!(send(&mut open, "GET", "/healthz", "").await.unwrap().0, 200);

    let (cert, key, new_der) = ca.leaf(&["localhost"]);
    write_pair(&dir, &cert, &key);
    common::eventually(
        "the new certificate is served",
        Duration::from_secs(5),
        || {
            let (addr, cfg, want) = (r.addr, client_config(ca.roots(), &[]), new_der.clone());
            async move {
                let s = connect(addr, cfg).await.unwrap();
                s.get_ref().1.peer_certificates().unwrap()[0] == want
            }
        },
    )
    .await;
    assert_ne!(first, new_der);
    // The connection opened before the reload still works.
    assert_eq!(send(&mut open, "GET", "/healthz", "").await.unwrap().0, 200);

    // A broken file is refused and the current certificate stays in service.
    std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
    assert!(certs.reload().is_err());
    let s = connect(r.addr, client_config(ca.roots(), &[]))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.peer_certificates().unwrap()[0], new_der);
    let _ = stop_tx.send(());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_plain_listener_redirects_to_https() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (_tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server::serve_https_redirect(
        l,
        8443,
        common::config().server,
        async {
            let _ = rx.await;
        },
    ));
    let resp = common::client()
        .get(format!("http://{addr}/rooms/x?y=1"))
        .header("host", "meet.example:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers()["location"],
        "https://meet.example:8443/rooms/x?y=1"
    );
}

fn with_client_cert(
    roots: RootCertStore,
    cert: CertificateDer<'static>,
    key_pem: &str,
) -> ClientConfig {
    ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![cert],
            rustls::pki_types::pem::PemObject::from_pem_slice(key_pem.as_bytes())
                .map(|k: PrivateKeyDer<'static>| k)
                .unwrap(),
        )
        .unwrap()
}

/// A router serving only an mTLS node listener: its certificate from `front_ca`, client
/// certificates from `node_ca`.
struct Mtls {
    r: TlsRouter,
    front_ca: Ca,
    node_ca: Ca,
    dir: PathBuf,
}

impl Mtls {
    async fn start(cfg: Config, tag: &str) -> Mtls {
        let front_ca = Ca::new("front CA");
        let node_ca = Ca::new("node CA");
        let (certs, dir) = front_door(&front_ca, tag);
        let sc = tls::server_config(certs, Some(node_ca.roots())).unwrap();
        let r = start_tls(cfg, sc).await;
        Mtls {
            r,
            front_ca,
            node_ca,
            dir,
        }
    }

    /// An HTTP/1.1 connection presenting a certificate `node_ca` issued for `names`.
    async fn as_node(&self, names: &[&str]) -> H1 {
        let (_, key, der) = self.node_ca.leaf(names);
        let s = connect(
            self.r.addr,
            with_client_cert(self.front_ca.roots(), der, &key),
        )
        .await
        .unwrap();
        h1(s).await
    }
}

#[tokio::test]
async fn the_node_listener_takes_the_node_id_from_the_client_certificate() {
    let m = Mtls::start(common::config(), "mtls").await;
    let (r, front_ca) = (&m.r, &m.front_ca);
    let hb = r#"{"url": "http://127.0.0.1:9", "capacity": 10, "load": 0}"#;

    let mut h = m.as_node(&["node-a"]).await;
    let (status, body) = send(&mut h, "POST", "/v1/nodes/node-a/heartbeat", hb)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let id = roomrouter::cluster::NodeId::parse("node-a").unwrap();
    assert!(r.app.router.node(&id).is_some());
    // Another node's id with this certificate: refused, and nothing about node-b changes.
    let (status, body) = send(&mut h, "POST", "/v1/nodes/node-b/heartbeat", hb)
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("\"forbidden\""), "{body}");
    let b = roomrouter::cluster::NodeId::parse("node-b").unwrap();
    assert!(r.app.router.node(&b).is_none());
    // Not even with node-b's valid bearer token on that connection.
    let req = Request::post("/v1/nodes/node-b/heartbeat")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {}", common::NODE_TOKEN))
        .body(Full::new(Bytes::from(hb)))
        .unwrap();
    assert_eq!(h.send_request(req).await.unwrap().status(), 403);

    // No client certificate, or one from another CA: no HTTP at all.
    for cfg in [client_config(front_ca.roots(), &[]), {
        let rogue = Ca::new("rogue CA");
        let (_, k, d) = rogue.leaf(&["node-a"]);
        with_client_cert(front_ca.roots(), d, &k)
    }] {
        let refused = match connect(r.addr, cfg).await {
            Err(_) => true,
            // TLS 1.3: the server's refusal arrives after the client's handshake ends.
            Ok(s) => {
                let (mut h, conn) =
                    hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(s))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                send(&mut h, "POST", "/v1/nodes/node-a/heartbeat", hb)
                    .await
                    .is_err()
            }
        };
        assert!(
            refused,
            "a connection without a trusted client certificate was served"
        );
    }
    let _ = std::fs::remove_dir_all(&m.dir);
}

/// A certificate names its node exactly: node ids are compared byte for byte, so the
/// matching a server name gets (ASCII case folded, a trailing dot, a wildcard) must not let
/// `node-a`'s certificate act as `NODE-A` or `node-a.`, nor `*.nodes.example` act as every
/// node under it. Each is refused and no such node appears.
#[tokio::test]
async fn a_client_certificate_names_its_node_exactly() {
    let m = Mtls::start(common::config(), "mtls-exact").await;
    let hb = r#"{"url": "http://127.0.0.1:9", "capacity": 10, "load": 0}"#;
    for (san, id) in [
        ("node-a", "NODE-A"),
        ("node-a", "Node-a"),
        ("node-a", "node-a."),
        ("*.nodes.example", "x.nodes.example"),
    ] {
        let mut h = m.as_node(&[san]).await;
        let (status, body) = send(&mut h, "POST", &format!("/v1/nodes/{id}/heartbeat"), hb)
            .await
            .unwrap();
        assert!(
            status == 403 && body.contains("\"forbidden\""),
            "{san} acting as {id}: {status} {body}"
        );
        if let Ok(id) = roomrouter::cluster::NodeId::parse(id) {
            assert!(m.r.app.router.node(&id).is_none(), "{san} made {id}");
        }
    }
    let _ = std::fs::remove_dir_all(&m.dir);
}

/// A node's certificate limits what that node may do, not what an operator may: on the mTLS
/// listener an admin token still removes any node (api.md: `DELETE /v1/nodes/{id}` takes node
/// or admin auth), while the certificate alone removes only the node it names.
#[tokio::test]
async fn an_admin_token_removes_any_node_on_the_node_listener() {
    let m = Mtls::start(common::config(), "mtls-admin").await;
    let r = &m.r;
    let mut h = m.as_node(&["node-a"]).await;
    let admin = |method: &str, path: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", common::ADMIN))
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let put = admin(
        "PUT",
        "/v1/nodes/node-b",
        r#"{"url": "http://127.0.0.1:9", "capacity": 10}"#,
    );
    assert_eq!(h.send_request(put).await.unwrap().status(), 201);
    let b = roomrouter::cluster::NodeId::parse("node-b").unwrap();
    assert!(r.app.router.node(&b).is_some());

    // node-a's certificate alone may not remove node-b...
    let (status, body) = send(&mut h, "DELETE", "/v1/nodes/node-b", "")
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(
        r.app.router.node(&b).is_some(),
        "a refused delete changed nothing"
    );
    // ...nor may a wrong bearer token...
    let mut wrong = admin("DELETE", "/v1/nodes/node-b", "");
    wrong.headers_mut().insert(
        "authorization",
        "Bearer not-the-admin-token-0123".parse().unwrap(),
    );
    assert_eq!(h.send_request(wrong).await.unwrap().status(), 403);
    // ...but the admin token on the same connection does.
    let resp = h
        .send_request(admin("DELETE", "/v1/nodes/node-b", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(r.app.router.node(&b).is_none(), "node-b was removed");
    let _ = std::fs::remove_dir_all(&m.dir);
}

/// With user JWTs, placement lookups need a credential; a node's client certificate on the
/// mTLS listener is one (no token needed), as it is for its heartbeats.
#[tokio::test]
async fn a_nodes_client_certificate_lets_it_look_placements_up_under_user_jwts() {
    let mut cfg = common::config();
    cfg.auth.users = roomrouter::config::UserAuth::Jwt;
    cfg.auth.jwt.secret = "user-jwt-secret-0123456789-0123456789".into();
    cfg.validate().unwrap();
    let m = Mtls::start(cfg, "mtls-lookup").await;
    let r = &m.r;
    let mut h = m.as_node(&["node-a"]).await;
    let hb = r#"{"url": "http://127.0.0.1:9", "capacity": 10, "load": 0}"#;
    let (status, body) = send(&mut h, "POST", "/v1/nodes/node-a/heartbeat", hb)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // On a connection of its own, the lookup first: the HTTP/1.1 fast path answers it.
    let mut fresh = m.as_node(&["node-b"]).await;
    let fast = || r.app.router.metrics.fast_requests.get();
    let before = fast();
    let (status, body) = send(&mut fresh, "GET", "/v1/placement/standup", "")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"node\":\"node-a\""), "{body}");
    assert_eq!(fast(), before + 1, "the fast path answered the lookup");
    let (status, body) = send(&mut h, "GET", "/v1/placement/standup", "")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(&mut h, "POST", "/v1/placement", r#"{"rooms": ["a", "b"]}"#)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let _ = std::fs::remove_dir_all(&m.dir);
}

/// An HTTPS upstream answering "secure" to everything.
async fn https_upstream(ca: &Ca) -> SocketAddr {
    let (cert, key, _) = ca.leaf(&["localhost"]);
    let dir = tempdir("upstream");
    let (c, k) = write_pair(&dir, &cert, &key);
    let certs = tls::CertReloader::new(&c, &k).unwrap();
    let sc = tls::server_config(certs, None).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(sc);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..100 {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(s) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        "secure",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_upstreams_are_trusted_through_the_configured_ca_file() {
    let ca = Ca::new("node CA");
    let up = https_upstream(&ca).await;
    let dir = tempdir("ca");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.issuer.pem()).unwrap();
    for (trust, want) in [(Some(ca_file.clone()), 200), (None, 502)] {
        let mut cfg = common::config();
        cfg.front_door.mode = FrontDoorMode::Proxy;
        cfg.placement.heartbeat_timeout = Duration::from_secs(60);
        cfg.proxy.ca_file = trust;
        cfg.validate().unwrap();
        let r = common::TestRouter::start(cfg).await;
        let url = format!("https://localhost:{}", up.port());
        let resp = common::heartbeat(
            &r,
            "secure-node",
            serde_json::json!({"url": url, "capacity": 10, "load": 0}),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let resp = r.get("/rooms/x").send().await.unwrap();
        assert_eq!(resp.status(), want);
        if want == 200 {
            assert_eq!(resp.text().await.unwrap(), "secure");
        }
        r.stop().await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn the_configured_service_serves_https_the_redirect_and_the_node_listener() {
    let front_ca = Ca::new("front CA");
    let node_ca = Ca::new("node CA");
    let dir = tempdir("service");
    let (cert, key, _) = front_ca.leaf(&["localhost"]);
    let (c, k) = write_pair(&dir, &cert, &key);
    let ca_file = dir.join("nodes-ca.pem");
    std::fs::write(&ca_file, node_ca.issuer.pem()).unwrap();
    let mut cfg = common::config();
    cfg.tls.cert_file = Some(c);
    cfg.tls.key_file = Some(k);
    cfg.tls.redirect_listen = Some(free_port());
    cfg.tls.node_listen = Some(free_port());
    cfg.tls.client_ca_file = Some(ca_file);
    cfg.validate().unwrap();
    let (redirect, nodes) = (
        cfg.tls.redirect_listen.unwrap(),
        cfg.tls.node_listen.unwrap(),
    );
    let main = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = main.local_addr().unwrap();
    let app = roomrouter::service::build(cfg, MemoryStore::new());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(roomrouter::service::run(app, main, async {
        let _ = rx.await;
    }));

    // The listeners come up as the service starts: retry for up to 5 s.
    let (_, nk, nd) = node_ca.leaf(&["node-z"]);
    let mut stream = None;
    for _ in 0..100 {
        if let Ok(s) = connect(nodes, with_client_cert(front_ca.roots(), nd.clone(), &nk)).await {
            stream = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut h = h1(stream.expect("the node listener is up")).await;
    let hb = r#"{"url": "http://127.0.0.1:9", "capacity": 10, "load": 0}"#;
    let (status, body) = send(&mut h, "POST", "/v1/nodes/node-z/heartbeat", hb)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    let s = connect(addr, client_config(front_ca.roots(), &[]))
        .await
        .unwrap();
    assert_eq!(
        send(&mut h1(s).await, "GET", "/healthz", "")
            .await
            .unwrap()
            .0,
        200
    );
    let resp = common::client()
        .get(format!("http://{redirect}/rooms/a"))
        .header("host", "localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers()["location"].to_str().unwrap(),
        format!("https://localhost:{}/rooms/a", addr.port())
    );
    let _ = tx.send(());
    let r = tokio::time::timeout(Duration::from_secs(15), task).await;
    assert!(matches!(r, Ok(Ok(Ok(())))), "{r:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Kills the child process when the test ends, passed or not.
struct Reaper(std::process::Child);
impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn sighup_makes_the_real_binary_reload_its_certificate_and_keep_open_connections() {
    let ca = Ca::new("front CA");
    let dir = tempdir("sighup");
    let (cert, key, first) = ca.leaf(&["localhost"]);
    let (c, k) = write_pair(&dir, &cert, &key);
    let addr = free_port();
    let config = dir.join("router.toml");
    // A file check once an hour: only the signal can explain a reload within the test.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{addr}\"\n[tls]\ncert_file = {c:?}\nkey_file = {k:?}\n\
             reload_interval = \"1h\"\n"
        ),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_roomrouter"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("ROOMROUTER_ADMIN_TOKEN", common::ADMIN)
        .env("ROOMROUTER_NODE_TOKEN", common::NODE_TOKEN)
        .env("ROOMROUTER_TICKET_SECRET", common::SECRET)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let router = Reaper(child);
    let mut open = None;
    for _ in 0..200 {
        if let Ok(s) = connect(addr, client_config(ca.roots(), &[b"http/1.1"])).await {
            open = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open = open.expect("the router serves HTTPS within 10 s");
    assert_eq!(open.get_ref().1.peer_certificates().unwrap()[0], first);
    let mut open = h1(open).await;
    assert_eq!(send(&mut open, "GET", "/healthz", "").await.unwrap().0, 200);

    let (cert, key, second) = ca.leaf(&["localhost"]);
    write_pair(&dir, &cert, &key);
    let s = connect(addr, client_config(ca.roots(), &[])).await.unwrap();
    assert_eq!(
        s.get_ref().1.peer_certificates().unwrap()[0],
        first,
        "no reload before the signal"
    );
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &router.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    common::eventually(
        "the new certificate is served after SIGHUP",
        Duration::from_secs(10),
        || {
            let (cfg, want) = (client_config(ca.roots(), &[]), second.clone());
            async move {
                let s = connect(addr, cfg).await.unwrap();
                s.get_ref().1.peer_certificates().unwrap()[0] == want
            }
        },
    )
    .await;
    // The process is still running, and the connection opened before the reload still works.
    assert_eq!(send(&mut open, "GET", "/healthz", "").await.unwrap().0, 200);
    drop(router);
    let _ = std::fs::remove_dir_all(dir);
}

/// A proxy-mode router on TLS (a front-door certificate from `ca`) with one node, `n1`, a
/// plain upstream at `up`, registered. The directory holds the certificate files.
async fn proxy_over_tls(ca: &Ca, tag: &str, up: SocketAddr) -> (TlsRouter, PathBuf) {
    use roomrouter::cluster::{NodeId, NodeInfo};
    use roomrouter::placement::AdminState;
    let (certs, dir) = front_door(ca, tag);
    let mut cfg = common::config();
    cfg.front_door.mode = FrontDoorMode::Proxy;
    cfg.placement.heartbeat_timeout = Duration::from_secs(60);
    cfg.validate().unwrap();
    let r = start_tls(cfg, tls::server_config(certs, None).unwrap()).await;
    let url = format!("http://{up}");
    let hb = roomrouter::router::Heartbeat {
        info: NodeInfo {
            url: url.clone(),
            upstream: url,
            capacity: 100.0,
            region: None,
            tags: vec![],
        },
        load: 0.0,
        cpu: None,
        state: AdminState::Active,
        rooms: None,
    };
    r.app
        .router
        .heartbeat(&NodeId::parse("n1").unwrap(), hb)
        .await
        .unwrap();
    (r, dir)
}

#[tokio::test]
async fn http11_over_tls_is_proxied_on_the_fast_path_and_h2_through_hyper() {
    // A plain upstream that names the scheme the router told it.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..10 {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| {
                    let proto = req.headers()["x-forwarded-proto"].clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::copy_from_slice(proto.as_bytes()),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let ca = Ca::new("front CA");
    let (r, dir) = proxy_over_tls(&ca, "fast-tls", up).await;
    let fast = || r.app.router.metrics.fast_requests.get();

    let s = connect(r.addr, client_config(ca.roots(), &[b"http/1.1"]))
        .await
        .unwrap();
    let mut h = h1(s).await;
    for _ in 0..2 {
        let (status, body) = send(&mut h, "GET", "/rooms/secure", "").await.unwrap();
        assert_eq!((status.as_u16(), body.as_str()), (200, "https"));
    }
    assert_eq!(fast(), 2, "HTTP/1.1 over TLS takes the fast path");

    let s = connect(r.addr, client_config(ca.roots(), &[b"h2"]))
        .await
        .unwrap();
    let (status, body) = h2_get(s, "https://localhost/rooms/secure").await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"https"[..]));
    assert_eq!(fast(), 2, "HTTP/2 is hyper's");
    let _ = std::fs::remove_dir_all(dir);
}

/// Over TLS the fast path's writes to the client may leave the last bytes in rustls's
/// buffer (it takes them before the socket does). Each relayed piece is flushed, so a client
/// that reads slowly still gets all the node sent while the node says nothing more (a long
/// poll, an event stream), not only when the next piece comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tls_client_gets_all_the_node_sent_before_the_node_sends_more() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // More than the kernel's socket buffers hold, so the router's writes back up.
    const HALF: usize = 8 << 20;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        let (mut head, mut buf) = (Vec::new(), vec![0u8; 16 * 1024]);
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 2 * HALF);
        s.write_all(answer.as_bytes()).await.unwrap();
        s.write_all(&vec![b'a'; HALF]).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(20), go_rx).await;
        let _ = s.write_all(&vec![b'b'; HALF]).await;
        let _ = s.read(&mut buf).await;
    });
    let ca = Ca::new("front CA");
    let (r, dir) = proxy_over_tls(&ca, "slow-tls", up).await;
    // A small receive buffer of fixed size (no autotuning): the client stays slower than
    // the router, whose last writes of the first half then meet a full socket.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(32 * 1024).unwrap();
    let tcp = sock.connect(r.addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls_client = TlsConnector::from(Arc::new(client_config(ca.roots(), &[b"http/1.1"])));
    let mut s = tls_client.connect(name, tcp).await.unwrap();
    s.write_all(b"GET /rooms/slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    // Reads nothing for a while: the router's socket fills up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut got, mut buf, mut reads) = (Vec::new(), vec![0u8; 4 * 1024], 0u64);
    let body_at = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if got.len() - (i + 4) >= HALF {
                break i + 4;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "stuck: {} bytes of the first half held back",
                    HALF + 100 - got.len()
                )
            })
            .unwrap();
        assert!(n > 0, "the router closed");
        got.extend_from_slice(&buf[..n]);
        reads += 1;
        if reads % 16 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    assert!(got.starts_with(b"HTTP/1.1 200"));
    assert!(got[body_at..].iter().all(|&b| b == b'a'));
    assert_eq!(r.app.router.metrics.fast_requests.get(), 1);
    let _ = go_tx.send(());
    let mut rest = got.len() - body_at - HALF;
    while rest < HALF {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        rest += n;
    }
    let _ = std::fs::remove_dir_all(dir);
}
