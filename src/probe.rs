//! Active health checks (`[health]`): the router's own look at its nodes.
//!
//! Heartbeats say a node is alive; their absence says it only after
//! `placement.heartbeat_timeout`. A redirect-mode router cannot see a crash before then: it
//! keeps sending users to the dead node (the load harness lost 3.4-4.9% of a run's joins that
//! way with a 1.5 s timeout, 0.5-0.9% with probes every 100 ms: BENCHMARKS.md section 2).
//! With `health.probe_interval` set, a task opens a TCP connection to every healthy node's
//! upstream that often, all nodes at once, each within `probe_timeout`; a node that fails
//! `failures` probes in a row is marked unhealthy until its next heartbeat, exactly as proxy
//! mode's passive check marks a node whose requests fail. The next join of one of its rooms
//! then places the room on a live node.
//!
//! The probe is a connection, not a request: it proves the process listens, which is what a
//! crash or a lost machine takes away, and costs a node nothing to answer. Marks are this
//! router's own (routers sharing Redis each probe for themselves). A connection the router
//! cannot open for want of its own resources (file descriptors, local ports, memory) says
//! nothing about the node: it counts neither way, and the router warns about itself.
//!
//! A node known by a name with several addresses is probed as the proxy's connector reaches
//! it (Happy Eyeballs): one address after another, each started `ATTEMPT_DELAY` after the
//! one before (or as soon as it fails) while the earlier ones keep trying, the first
//! connection wins. Tried strictly in turn, an address that drops packets (a black-holed
//! IPv6 path, a dead first A record) took the whole timeout: every probe failed and the
//! node flapped between healthy and not, while the proxy reached it fine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::cluster::{NodeEntry, NodeId};
use crate::http::resolve::Resolver;
use crate::http::upstream::is_local_shortage;
use crate::http::App;
use crate::store::PinStore;

/// Addresses of one name a probe tries at most: a name is a node, whatever a misconfigured
/// DNS record lists.
const MAX_ADDRS: usize = 8;
/// How long an address has alone before the next one is tried alongside it, as RFC 8305's
/// Connection Attempt Delay (and hyper-util's connector); shortened so that all the
/// addresses tried start within the probe's timeout.
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Why a probe failed.
#[derive(Debug)]
pub struct ProbeFailed {
    /// The router, not the node, ran short: out of file descriptors, local ports or memory
    /// (`is_local_shortage`). Such a failure says nothing about the node, and is held
    /// against none, as in proxy mode (`LaneError::Local`).
    pub local: bool,
    pub why: String,
}

impl ProbeFailed {
    fn node(why: String) -> ProbeFailed {
        ProbeFailed { local: false, why }
    }
}

/// Opens (and closes at once) a TCP connection to `upstream`'s host and port within
/// `timeout`, a name looked up through `resolver`. The error says why not.
pub async fn probe(
    upstream: &str,
    resolver: &Resolver,
    timeout: Duration,
) -> Result<(), ProbeFailed> {
    let u =
        url::Url::parse(upstream).map_err(|e| ProbeFailed::node(format!("{upstream:?}: {e}")))?;
    let port = u
        .port_or_known_default()
        .ok_or_else(|| ProbeFailed::node(format!("{upstream:?}: no port")))?;
    let connect = async {
        let addrs: Vec<SocketAddr> = match u.host() {
            Some(url::Host::Ipv4(ip)) => vec![(ip, port).into()],
            Some(url::Host::Ipv6(ip)) => vec![(ip, port).into()],
            Some(url::Host::Domain(d)) => resolver
                .resolve(d)
                .await
                .map_err(ProbeFailed::node)?
                .iter()
                .map(|a| SocketAddr::new(a.ip(), port))
                .collect(),
            None => return Err(ProbeFailed::node("no host".to_string())),
        };
        connect_any(&addrs, timeout).await
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProbeFailed::node(format!(
            "no connection within {timeout:?}"
        ))),
    }
}

/// Connects to the first of `addrs` (at most [`MAX_ADDRS`]) that answers, trying them in
/// order, staggered: the next starts [`ATTEMPT_DELAY`] (at most `timeout` shared out among
/// them) after the last, or at once when an attempt fails; the attempts still under way are
/// dropped once one connects. Unbounded in time: the caller's timeout bounds it. Fails with
/// every address's error once all have failed (a local failure if every one of them was:
/// the router could not try any address).
async fn connect_any(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, ProbeFailed> {
    let addrs = &addrs[..addrs.len().min(MAX_ADDRS)];
    let delay = ATTEMPT_DELAY.min(timeout / addrs.len().max(1) as u32);
    let attempt = |addr: SocketAddr| async move { (addr, TcpStream::connect(addr).await) };
    let mut untried = addrs.iter().copied();
    let mut racing = FuturesUnordered::new();
    racing.extend(untried.next().map(attempt));
    let mut errors = Vec::new();
    // Local only if every attempt was: one address the router cannot use (IPv6 off in a
    // container) must not excuse a refusal at the next.
    let mut local = true;
    let next_start = tokio::time::sleep(delay);
    tokio::pin!(next_start);
    while !racing.is_empty() {
        tokio::select! {
            Some((addr, r)) = racing.next() => match r {
                Ok(stream) => return Ok(stream),
                Err(e) => {
                    local &= is_local_shortage(&e);
                    errors.push(format!("{addr}: {e}"));
                    racing.extend(untried.next().map(attempt));
                    next_start.as_mut().reset(tokio::time::Instant::now() + delay);
                }
            },
            () = &mut next_start, if untried.len() > 0 => {
                racing.extend(untried.next().map(attempt));
                next_start.as_mut().reset(tokio::time::Instant::now() + delay);
            }
        }
    }
    if errors.is_empty() {
        return Err(ProbeFailed::node("no addresses".to_string()));
    }
    Err(ProbeFailed {
        local,
        why: errors.join("; "),
    })
}

/// Failed probes in a row, per node.
#[derive(Debug, Default)]
pub struct Streaks {
    failed: HashMap<NodeId, u32>,
}

impl Streaks {
    /// Records one probe of `node`; `true` when this failure is the `limit`-th in a row (the
    /// streak then starts again, so a node still failing after its next heartbeat needs
    /// `limit` more).
    pub fn record(&mut self, node: &NodeId, ok: bool, limit: u32) -> bool {
        if ok {
            self.failed.remove(node);
            return false;
        }
        let n = self.failed.entry(node.clone()).or_insert(0);
        *n += 1;
        if *n >= limit {
            self.failed.remove(node);
            return true;
        }
        false
    }

    /// Forgets the streaks of nodes not probed this round (unhealthy, removed): a node
    /// starts from nothing when it comes back.
    pub fn keep_only(&mut self, probed: &[NodeId]) {
        self.failed.retain(|id, _| probed.contains(id));
    }
}

/// With `health.probe_interval` set: probes the nodes until the app is dropped by everyone
/// else.
pub fn spawn_prober<S: PinStore>(app: &Arc<App<S>>) -> Option<tokio::task::JoinHandle<()>> {
    let h = app.cfg.health.clone();
    if h.probe_interval.is_zero() {
        return None;
    }
    let weak = Arc::downgrade(app);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(h.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut streaks = Streaks::default();
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { break };
            // Taken before the probes start: a report later than this outdates their failures.
            let now = app.router.now();
            let healthy: Vec<NodeEntry> = app
                .router
                .cluster()
                .snapshot()
                .nodes()
                .iter()
                .filter(|n| app.router.is_healthy(n, now))
                .cloned()
                .collect();
            let (failed, marked, skipped) = (
                app.router.metrics.probe_failures.clone(),
                app.router.metrics.probe_marked_unhealthy.clone(),
                app.router.metrics.probes_short.clone(),
            );
            let resolver = app.proxy.resolver().clone();
            // Not held while the probes run: a router shutting down stops the task.
            drop(app);
            streaks.keep_only(&healthy.iter().map(|n| n.id.clone()).collect::<Vec<_>>());
            let mut probes = JoinSet::new();
            for node in healthy {
                let resolver = resolver.clone();
                probes.spawn(async move {
                    let r = probe(&node.info.upstream, &resolver, h.probe_timeout).await;
                    (node, r)
                });
            }
            let mut short = None;
            while let Some(done) = probes.join_next().await {
                let Ok((node, r)) = done else { continue };
                match &r {
                    Err(f) if f.local => {
                        // Neither a success nor a failure of the node: its streak stands.
                        skipped.inc();
                        short = Some(f.why.clone());
                        continue;
                    }
                    Err(f) => {
                        failed.inc();
                        tracing::debug!(node = %node.id, error = %f.why, "health probe failed");
                    }
                    Ok(()) => {}
                }
                if !streaks.record(&node.id, r.is_ok(), h.failures) {
                    continue;
                }
                // Unless the node reported in while the probes ran (a rebooting node back
                // within the timeout): that report is newer news than their failure.
                if node.live.forget_heartbeat_if_not_after(now) {
                    marked.inc();
                    tracing::warn!(
                        node = %node.id,
                        upstream = %node.info.upstream,
                        failures = h.failures,
                        "health probes failing: marked unhealthy until its next heartbeat"
                    );
                } else {
                    tracing::debug!(node = %node.id, "health probes failed, but the node reported in since they began: not marked");
                }
            }
            if let Some(why) = short {
                tracing::warn!(error = %why, "health probes not made: the router is short of sockets or memory (raise its open-files limit?); no node is blamed");
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    use crate::cluster::NodeInfo;
    use crate::config::Config;
    use crate::http::resolve::Lookup;
    use crate::placement::AdminState;
    use crate::router::{Clock, Heartbeat, Router};
    use crate::store::MemoryStore;

    fn id(s: &str) -> NodeId {
        NodeId::parse(s).unwrap()
    }

    /// A listener at `addr` (port 0: any) that never accepts, its accept queue filled, so
    /// that the kernel drops further SYNs and a connect to it hangs, as to an address that
    /// black-holes packets. Returned with the connections filling it, which must live as long
    /// as it does; checked to hang, or the tests built on it would prove nothing.
    async fn black_hole(addr: SocketAddr) -> (tokio::net::TcpListener, Vec<TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(addr).unwrap();
        let l = socket.listen(1).unwrap();
        let addr = l.local_addr().unwrap();
        let mut filling = Vec::new();
        for _ in 0..8 {
            let c = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr));
            match c.await {
                Ok(Ok(c)) => filling.push(c),
                Ok(Err(e)) => panic!("{addr}: {e}"),
                Err(_) => return (l, filling),
            }
        }
        panic!("{addr} still takes connections: no black hole to test with");
    }

    /// Waits (at most 5 s) for `counter` to reach `n`.
    async fn counted(counter: &prometheus_client::metrics::counter::Counter, n: u64) {
        let t = std::time::Instant::now();
        while counter.get() < n {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{} of {n}",
                counter.get()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn a_node_is_marked_at_the_limit_of_failures_in_a_row_and_a_success_resets_it() {
        let mut s = Streaks::default();
        let a = id("a");
        assert!(!s.record(&a, false, 3));
        assert!(!s.record(&a, false, 3));
        assert!(!s.record(&a, true, 3), "a success ends the streak");
        assert!(!s.record(&a, false, 3));
        assert!(!s.record(&a, false, 3));
        assert!(s.record(&a, false, 3), "the third in a row marks it");
        assert!(!s.record(&a, false, 3), "and the count starts again");
        assert!(s.record(&id("b"), false, 1), "a limit of 1 marks at once");
    }

    #[test]
    fn nodes_not_probed_lose_their_streak() {
        let mut s = Streaks::default();
        let (a, b) = (id("a"), id("b"));
        s.record(&a, false, 2);
        s.record(&b, false, 2);
        s.keep_only(std::slice::from_ref(&b));
        assert!(!s.record(&a, false, 2), "a starts from nothing");
        assert!(s.record(&b, false, 2));
    }

    #[tokio::test]
    async fn a_probe_connects_or_says_why_not() {
        let r = Resolver::system();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}");
        probe(&url, &r, Duration::from_secs(1)).await.unwrap();
        // A node known by name: looked up, then connected to.
        let named = format!("http://localhost:{port}");
        let l6 = tokio::net::TcpListener::bind(("::1", port)).await;
        probe(&named, &r, Duration::from_secs(1)).await.unwrap();
        drop((l, l6));
        let e = probe(&url, &r, Duration::from_secs(1)).await.unwrap_err();
        assert!(!e.why.is_empty() && !e.local, "{e:?}");
        let e = probe("not a url", &r, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(e.why.contains("not a url"), "{e:?}");
    }

    #[tokio::test]
    async fn a_name_whose_first_address_drops_packets_is_reached_at_the_next() {
        // Both addresses with the port of the URL, as a name's A records are.
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = live.local_addr().unwrap().port();
        let (_hole, _filling) = black_hole(([127, 0, 0, 2], port).into()).await;
        let lookup: Lookup =
            Arc::new(|_| Ok(vec![([127, 0, 0, 2], 0).into(), ([127, 0, 0, 1], 0).into()]));
        let r = Resolver::with_lookup(lookup, Duration::from_secs(5), Duration::from_secs(300));
        let timeout = Duration::from_secs(2);
        let t = std::time::Instant::now();
        probe(&format!("http://media-1.example:{port}"), &r, timeout)
            .await
            .unwrap();
        assert!(
            t.elapsed() < ATTEMPT_DELAY * 3,
            "the next address is tried {ATTEMPT_DELAY:?} after the first, not once the \
             timeout is spent: {:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn a_heartbeat_while_a_probe_fails_keeps_the_node_and_a_failure_after_it_marks_it() {
        const T0: u64 = 1_700_000_000_000;
        let (hole, _filling) = black_hole(([127, 0, 0, 1], 0).into()).await;
        let every = Duration::from_millis(500);
        let mut cfg = Config::default();
        cfg.placement.startup_hold = Some(Duration::ZERO);
        cfg.health.probe_interval = every;
        cfg.health.probe_timeout = every;
        cfg.health.failures = 1;
        let router = Router::new(&cfg, MemoryStore::new(), Clock::Manual(AtomicU64::new(T0)));
        let app = Arc::new(App::new(cfg, router));
        let node = id("media-1");
        let upstream = format!("http://{}", hole.local_addr().unwrap());
        let beat = || async {
            let info = NodeInfo {
                url: upstream.clone(),
                upstream: upstream.clone(),
                capacity: 100.0,
                region: None,
                tags: vec![],
            };
            let hb = Heartbeat {
                info,
                load: 0.0,
                cpu: None,
                state: AdminState::Active,
                rooms: None,
            };
            app.router.heartbeat(&node, hb).await.unwrap();
        };
        beat().await;
        let entry = app.router.cluster().snapshot().get(&node).unwrap().clone();
        let metrics = &app.router.metrics;
        let prober = spawn_prober(&app).unwrap();

        // The first round starts at T0; its probe hangs on the black hole while the node,
        // back up, reports in.
        tokio::time::sleep(every / 5).await;
        app.router.clock().advance(100);
        beat().await;
        counted(&metrics.probe_failures, 1).await;
        assert_eq!(
            entry.live.last_heartbeat(),
            Some(T0 + 100),
            "the report made while the probe ran stands"
        );
        assert_eq!(metrics.probe_marked_unhealthy.get(), 0);

        // The next round starts after that report: its failure marks the node.
        counted(&metrics.probe_failures, 2).await;
        assert_eq!(entry.live.last_heartbeat(), None);
        assert_eq!(metrics.probe_marked_unhealthy.get(), 1);
        prober.abort();
    }

    #[tokio::test]
    async fn a_name_that_cannot_be_looked_up_fails_the_probe_and_says_so() {
        let lookup: crate::http::resolve::Lookup =
            Arc::new(|_| Err(std::io::Error::other("SERVFAIL")));
        let r = Resolver::with_lookup(lookup, Duration::from_secs(5), Duration::from_secs(300));
        let e = probe("http://media-1.example:8080", &r, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            e.why.contains("SERVFAIL") && e.why.contains("media-1.example") && !e.local,
            "{e:?}"
        );
    }
}
