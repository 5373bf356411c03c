//! Redis Sentinel: where the Redis store's master is now.
//!
//! It owns asking the sentinels of `store.sentinels` which server is the master named
//! `store.sentinel_master`, and watching them for failovers (`+switch-master`). Every
//! sentinel is asked at once, each within its own timeout, and the first master that a
//! sentinel names and that confirms its role (`ROLE`, checked by the `redis` crate) wins, so
//! one unreachable sentinel costs nothing while another answers. It never opens the store's
//! connections: the Redis store opens them, and its subscription, with the client this
//! hands back, and asks again whenever it reconnects.

use std::time::Duration;

use anyhow::Context;
use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{ConnectionAddr, IntoConnectionInfo, TlsMode};
use tokio::sync::{watch, Mutex};

use crate::config::StoreConfig;

/// The channel on which every sentinel announces a new master:
/// `<name> <old ip> <old port> <new ip> <new port>`.
const SWITCH_MASTER: &str = "+switch-master";

/// One sentinel: its address for messages, a client for the failover watch, and the lookup
/// state of the `redis` crate (which caches its connection to the sentinel).
struct One {
    /// `host:port`, without credentials.
    addr: String,
    client: redis::Client,
    lookup: Mutex<Sentinel>,
}

/// The sentinels of one master. See the module documentation.
pub struct Sentinels {
    master: String,
    sentinels: Vec<One>,
    /// How to reach the master a sentinel names: user, password, db and TLS of `store.url`.
    node: SentinelNodeConnectionInfo,
    /// Bound on one lookup: it opens two connections (the sentinel, then the master).
    lookup_timeout: Duration,
    connect_timeout: Duration,
    /// How often the failover watch pings its sentinel (`store.resync_interval`), and how
    /// long the answer may take (`store.command_timeout`).
    probe_interval: Duration,
    probe_timeout: Duration,
}

impl Sentinels {
    /// Reads `store.sentinels`, `store.sentinel_master` and the credentials of `store.url`.
    /// Opens nothing.
    pub fn new(cfg: &StoreConfig) -> anyhow::Result<Sentinels> {
        let data = cfg
            .url
            .as_str()
            .into_connection_info()
            .context("store.url (credentials and db for the master the sentinels name)")?;
        let mut node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(data.redis_settings().clone());
        if let ConnectionAddr::TcpTls { insecure, .. } = data.addr() {
            node = node.set_tls_mode(if *insecure {
                TlsMode::Insecure
            } else {
                TlsMode::Secure
            });
        }
        let mut sentinels = Vec::with_capacity(cfg.sentinels.len());
        for (i, url) in cfg.sentinels.iter().enumerate() {
            let key = || format!("store.sentinels[{i}]");
            let info = url.as_str().into_connection_info().with_context(key)?;
            sentinels.push(One {
                addr: info.addr().to_string(),
                client: redis::Client::open(info.clone()).with_context(key)?,
                lookup: Mutex::new(Sentinel::build(vec![info]).with_context(key)?),
            });
        }
        anyhow::ensure!(!sentinels.is_empty(), "store.sentinels: none listed");
        Ok(Sentinels {
            master: cfg.sentinel_master.clone(),
            sentinels,
            node,
            lookup_timeout: cfg.connect_timeout * 2,
            connect_timeout: cfg.connect_timeout,
            probe_interval: cfg.resync_interval,
            probe_timeout: cfg.command_timeout,
        })
    }

    /// The master's name as the sentinels know it.
    pub fn master_name(&self) -> &str {
        &self.master
    }

    /// A client for the current master. Asks every sentinel at once (each within twice
    /// `connect_timeout`); the first that names a master which confirms it is one wins. The
    /// error lists what each sentinel answered.
    pub async fn master(&self) -> anyhow::Result<redis::Client> {
        let mut asks: FuturesUnordered<_> = self
            .sentinels
            .iter()
            .map(|s| async move {
                let found = tokio::time::timeout(self.lookup_timeout, async {
                    let mut lookup = s.lookup.lock().await;
                    lookup
                        .async_master_for(&self.master, Some(&self.node))
                        .await
                })
                .await;
                (s.addr.as_str(), found)
            })
            .collect();
        let mut failures = Vec::new();
        while let Some((addr, found)) = asks.next().await {
            match found {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e)) => failures.push(format!("sentinel {addr}: {e}")),
                Err(_) => failures.push(format!(
                    "sentinel {addr}: no answer within {:?}",
                    self.lookup_timeout
                )),
            }
        }
        anyhow::bail!(
            "no sentinel named a reachable master {:?} ({})",
            self.master,
            failures.join("; ")
        )
    }

    /// Watches the sentinels for failovers of our master until `stop`: calls `on_switch`
    /// with the new master's `host:port` each time one is announced, and with the current
    /// master's each time the watch (re)subscribes (a failover announced while nobody
    /// listened is caught then; `on_switch` ignores a master it already uses). Listens to
    /// one sentinel at a time (each announces every failover it takes part in or hears of)
    /// and moves to the next when it cannot reach it, the subscription ends, or a ping on it
    /// (every `store.resync_interval`) is not answered within `store.command_timeout`: a
    /// socket that died without closing would otherwise leave the watch deaf for good.
    pub async fn watch(&self, mut stop: watch::Receiver<bool>, on_switch: impl Fn(String)) {
        let mut backoff = Duration::from_millis(100);
        for s in self.sentinels.iter().cycle() {
            if *stop.borrow() {
                return;
            }
            match self.subscribe(s).await {
                Ok((mut sink, mut events)) => {
                    backoff = Duration::from_millis(100);
                    match self.master().await {
                        Ok(m) => on_switch(m.get_connection_info().addr().to_string()),
                        Err(e) => tracing::debug!(error = %e, "no master named on (re)subscribing"),
                    }
                    let start = tokio::time::Instant::now() + self.probe_interval;
                    let mut probe = tokio::time::interval_at(start, self.probe_interval);
                    loop {
                        tokio::select! {
                            _ = stop.changed() => return,
                            _ = probe.tick() => {
                                let pong = tokio::time::timeout(self.probe_timeout, sink.ping::<redis::Value>());
                                if !matches!(pong.await, Ok(Ok(_))) {
                                    tracing::warn!(sentinel = %s.addr, "failover watch silent; subscribing again");
                                    break;
                                }
                            }
                            m = events.next() => match m {
                                Some(m) => {
                                    let payload = String::from_utf8_lossy(m.get_payload_bytes());
                                    if let Some(to) = switched_to(&payload, &self.master) {
                                        on_switch(to);
                                    }
                                }
                                None => break,
                            },
                        }
                    }
                    tracing::debug!(sentinel = %s.addr, "failover watch ended; trying the next sentinel");
                }
                Err(e) => {
                    tracing::debug!(sentinel = %s.addr, error = %e, "cannot watch this sentinel for failovers");
                }
            }
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// A subscription to `s`'s announcements: the side that sends (pings) and the messages.
    async fn subscribe(
        &self,
        s: &One,
    ) -> anyhow::Result<(redis::aio::PubSubSink, redis::aio::PubSubStream)> {
        let mut ps = tokio::time::timeout(self.connect_timeout, s.client.get_async_pubsub())
            .await
            .map_err(|_| anyhow::anyhow!("connect timed out"))??;
        tokio::time::timeout(self.connect_timeout, ps.subscribe(SWITCH_MASTER))
            .await
            .map_err(|_| anyhow::anyhow!("subscribe timed out"))??;
        Ok(ps.split())
    }
}

/// The new master's `host:port` if `payload` (a `+switch-master` message) is about `master`.
fn switched_to(payload: &str, master: &str) -> Option<String> {
    let parts: Vec<&str> = payload.split_whitespace().collect();
    match parts.as_slice() {
        [name, _, _, ip, port] if *name == master && port.parse::<u16>().is_ok() => {
            Some(format!("{ip}:{port}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_names_the_new_master_only_for_our_master() {
        assert_eq!(
            switched_to("mymaster 10.0.0.1 6379 10.0.0.2 6380", "mymaster").as_deref(),
            Some("10.0.0.2:6380")
        );
        assert_eq!(
            switched_to("other 10.0.0.1 6379 10.0.0.2 6380", "mymaster"),
            None
        );
        assert_eq!(switched_to("mymaster 10.0.0.1 6379", "mymaster"), None);
        assert_eq!(
            switched_to("mymaster 10.0.0.1 6379 10.0.0.2 port", "mymaster"),
            None
        );
    }

    #[test]
    fn sentinels_are_read_without_connecting_and_bad_ones_are_named() {
        let mut cfg = StoreConfig {
            sentinels: vec![
                "redis://127.0.0.1:1".into(),
                "redis://:secret@127.0.0.1:2".into(),
            ],
            sentinel_master: "mymaster".into(),
            url: "redis://user:pw@ignored-host:6379/3".into(),
            ..StoreConfig::default()
        };
        let s = Sentinels::new(&cfg).unwrap();
        assert_eq!(s.master_name(), "mymaster");
        // Messages name sentinels without their credentials.
        assert_eq!(s.sentinels[1].addr, "127.0.0.1:2");
        cfg.sentinels.push("http://nope".into());
        let e = format!("{:#}", Sentinels::new(&cfg).err().unwrap());
        assert!(e.starts_with("store.sentinels[2]"), "{e}");
    }
}
