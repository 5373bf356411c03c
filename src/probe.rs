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
//! router's own (routers sharing Redis each probe for themselves).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::cluster::{NodeEntry, NodeId};
use crate::http::resolve::Resolver;
use crate::http::App;
use crate::store::PinStore;

/// Opens (and closes at once) a TCP connection to `upstream`'s host and port within
/// `timeout`, a name looked up through `resolver`. The error says why not.
pub async fn probe(upstream: &str, resolver: &Resolver, timeout: Duration) -> Result<(), String> {
    let u = url::Url::parse(upstream).map_err(|e| format!("{upstream:?}: {e}"))?;
    let port = u
        .port_or_known_default()
        .ok_or_else(|| format!("{upstream:?}: no port"))?;
    let connect = async {
        let addrs: Vec<SocketAddr> = match u.host() {
            Some(url::Host::Ipv4(ip)) => vec![(ip, port).into()],
            Some(url::Host::Ipv6(ip)) => vec![(ip, port).into()],
            Some(url::Host::Domain(d)) => resolver
                .resolve(d)
                .await?
                .iter()
                .map(|a| SocketAddr::new(a.ip(), port))
                .collect(),
            None => return Err("no host".to_string()),
        };
        TcpStream::connect(&addrs[..])
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no connection within {timeout:?}")),
    }
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
            let (failed, marked) = (
                app.router.metrics.probe_failures.clone(),
                app.router.metrics.probe_marked_unhealthy.clone(),
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
            while let Some(done) = probes.join_next().await {
                let Ok((node, r)) = done else { continue };
                if let Err(why) = &r {
                    failed.inc();
                    tracing::debug!(node = %node.id, error = %why, "health probe failed");
                }
                if streaks.record(&node.id, r.is_ok(), h.failures) {
                    node.live.forget_heartbeat();
                    marked.inc();
                    tracing::warn!(
                        node = %node.id,
                        upstream = %node.info.upstream,
                        failures = h.failures,
                        "health probes failing: marked unhealthy until its next heartbeat"
                    );
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::parse(s).unwrap()
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
        assert!(!e.is_empty());
        let e = probe("not a url", &r, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(e.contains("not a url"), "{e}");
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
            e.contains("SERVFAIL") && e.contains("media-1.example"),
            "{e}"
        );
    }
}
