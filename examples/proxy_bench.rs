//! Proxy-mode and TLS benchmarks (issue 3 targets), over loopback:
//!
//! 1. throughput and latency percentiles of `GET /status?room=bench` sent directly to a demo
//!    node and through the router in proxy mode to the same node, with the same keep-alive
//!    clients and load, and the router's added latency (p50/p99 difference);
//! 2. TLS handshakes per second completed by a front door confined to one core (a
//!    current-thread runtime on its own thread), ECDSA P-256 certificate, TLS 1.3.
//!
//! Run: `cargo run --release --example proxy_bench [connections] [seconds] [req/s]`
//! (defaults 8, 5, 2000). Everything shares the machine's cores: clients, router, node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use roomrouter::config::FrontDoorMode;
use roomrouter::demo::node::{DemoNode, DemoNodeConfig};
use roomrouter::http::tls;
use roomrouter::store::MemoryStore;
use tokio::net::{TcpListener, TcpStream};

const ADMIN: &str = "bench-admin-token-0123456789";
const NODE: &str = "bench-node-token-0123456789";
const SECRET: &str = "bench-ticket-secret-0123456789-0123456789";
/// The demo node's status page, which needs no ticket, so that the same request goes to the
/// node directly and through the router (whose front door takes the room from `?room=`).
const PATH: &str = "/status?room=bench";

/// The router in proxy mode and one demo node (`roomrouter demo-node`'s implementation)
/// registered with it by its own first heartbeat: the router's address and the node.
async fn cluster() -> (SocketAddr, DemoNode) {
    let mut cfg = roomrouter::config::Config::default();
    cfg.auth.admin_tokens = vec![ADMIN.into()];
    cfg.auth.node_token = NODE.into();
    cfg.tickets.secret = SECRET.into();
    cfg.front_door.mode = FrontDoorMode::Proxy;
    cfg.placement.startup_hold = Some(std::time::Duration::ZERO);
    cfg.placement.join_limit = 1e9;
    cfg.placement.new_room_limit = 1e9;
    cfg.validate().unwrap();
    let app = roomrouter::service::build(cfg, MemoryStore::new());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(roomrouter::service::run(app, l, std::future::pending()));
    let node = DemoNode::start(DemoNodeConfig {
        id: "bench-node".into(),
        routers: vec![format!("http://{addr}")],
        listen: "127.0.0.1:0".parse().unwrap(),
        public_url: None,
        capacity: 1e9,
        region: None,
        tags: vec![],
        node_token: NODE.into(),
        ticket_secret: SECRET.into(),
        ticket_leeway: roomrouter::auth::ticket::DEFAULT_LEEWAY,
        heartbeat_interval: Duration::from_secs(1),
    })
    .await
    .unwrap();
    let ready = format!("http://{addr}/readyz");
    for _ in 0..100 {
        if reqwest::get(&ready)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return (addr, node);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the demo node never made the router ready");
}

/// `conns` keep-alive connections for `secs`, each sending requests back to back
/// (`rate` = None: saturation) or paced so that all together send `rate` requests/s, the
/// connections' schedules staggered across one interval.
async fn load(addr: SocketAddr, conns: usize, secs: u64, rate: Option<f64>) -> (f64, Vec<u32>) {
    let gap = rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..conns {
        // Paced connections start spread over one gap, so that together they send evenly
        // instead of in bursts of `conns` simultaneous requests.
        let offset = gap.map_or(Duration::ZERO, |g| g * c as u32 / conns as u32);
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut lat = Vec::with_capacity(100_000);
            let mut next = tokio::time::Instant::now() + offset;
            while Instant::now() < deadline {
                if let Some(g) = gap {
                    next += g;
                    tokio::time::sleep_until(next).await;
                }
                let req = Request::get(PATH)
                    .header("host", "bench")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let t = Instant::now();
                let resp = send.send_request(req).await.unwrap();
                assert!(resp.status().is_success(), "{}", resp.status());
                resp.into_body().collect().await.unwrap();
                lat.push(t.elapsed().as_micros() as u32);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    (all.len() as f64 / secs as f64, all)
}

fn pct(v: &[u32], p: f64) -> u32 {
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn handshakes_per_second(secs: u64) -> f64 {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("rr-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    let sc = tls::server_config(tls::CertReloader::new(&c, &k).unwrap(), None).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // The server: one core.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(sc);
            loop {
                let (s, _) = l.accept().await.unwrap();
                let a = acceptor.clone();
                tokio::spawn(async move {
                    let _ = a.accept(s).await;
                });
            }
        });
    });
    let addr = rx.recv().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let cc = Arc::new(
        rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let n = rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let cc = cc.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                let connector = tokio_rustls::TlsConnector::from(cc);
                while Instant::now() < deadline {
                    let s = TcpStream::connect(addr).await.unwrap();
                    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                    if connector.connect(name, s).await.is_ok() {
                        n += 1;
                    }
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    });
    let _ = std::fs::remove_dir_all(dir);
    n as f64 / secs as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let conns: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(8);
    let secs: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let rate: f64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(2000.0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (via, node) = cluster().await;
        let up = node.addr;
        let _ = load(via, conns, 1, None).await; // warm-up
        for (label, r) in [
            (format!("moderate load, {rate} req/s"), Some(rate)),
            ("saturation".to_string(), None),
        ] {
            let (d_rps, d) = load(up, conns, secs, r).await;
            let (p_rps, p) = load(via, conns, secs, r).await;
            println!("{label}: {conns} keep-alive connections, {secs} s, GET {PATH}");
            for (name, rps, v) in [("direct", d_rps, &d), ("proxy", p_rps, &p)] {
                println!(
                    "{name:>7}: {rps:>9.0} req/s  p50 {:>5} us  p99 {:>5} us  p99.9 {:>5} us",
                    pct(v, 0.5),
                    pct(v, 0.99),
                    pct(v, 0.999)
                );
            }
            println!(
                "  added by the router: p50 {} us, p99 {} us",
                pct(&p, 0.5) as i64 - pct(&d, 0.5) as i64,
                pct(&p, 0.99) as i64 - pct(&d, 0.99) as i64
            );
        }
        node.stop().await;
    });
    drop(rt);
    println!(
        "TLS 1.3 handshakes/s, server on one core (ECDSA P-256): {:.0}",
        handshakes_per_second(secs)
    );
}
