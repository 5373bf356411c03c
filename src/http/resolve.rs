//! Node host names to addresses: the one place the router looks a name up, for the proxy's
//! upstream connections and the health probes.
//!
//! The system resolver (`getaddrinfo`) holds a blocking thread for as long as the DNS server
//! takes, seconds when it is down, and the timeout of the connection that asked does not
//! stop it. One lookup per new connection would then pile threads up during a DNS outage,
//! and stall every new connection to a node known by name. Here:
//! - a name is looked up by at most one thread at a time; whoever asks meanwhile waits for
//!   that same answer;
//! - an answer serves for [`FRESH`]; after that, the next ask starts a new lookup and,
//!   until it is answered (or if it fails), the last answer still serves for up to
//!   [`STALE`] more, so that a DNS outage does not stop new connections to nodes whose
//!   addresses were known;
//! - a failed lookup is remembered for [`NEGATIVE`]: meanwhile asks get the last answer if
//!   it still serves, else that failure, without asking the DNS server again (a name that
//!   does not resolve would otherwise cost one lookup per new connection); after it, the
//!   next ask tries again (one at a time).
//!
//! Addresses (`10.0.0.5`, `[::1]`) never get here: hyper's connector and the probe take
//! them as they are.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use hyper_util::client::legacy::connect::dns::Name;

/// How long an answer is used without asking again.
pub const FRESH: Duration = Duration::from_secs(5);
/// How long past [`FRESH`] an answer is still used while a new lookup runs or after it
/// failed.
pub const STALE: Duration = Duration::from_secs(300);
/// How long a failed lookup is remembered before the next ask tries again.
pub const NEGATIVE: Duration = Duration::from_secs(1);
/// Names kept at most; past it, those with neither a usable answer nor a lookup under way
/// are forgotten (names come from node registrations, so this is rarely reached).
const MAX_NAMES: usize = 4096;

/// A lookup's addresses (port 0: the caller sets the port), or why there are none.
type Answer = Result<Arc<[SocketAddr]>, String>;
/// What looks a name up (blocking): the system resolver, or a test's.
pub type Lookup = Arc<dyn Fn(&str) -> io::Result<Vec<SocketAddr>> + Send + Sync>;

/// Looks names up at most once at a time each, and keeps their answers (see the module
/// doc). Clones share the table.
#[derive(Clone)]
pub struct Resolver {
    names: Arc<Names>,
}

struct Names {
    table: Mutex<HashMap<Box<str>, Entry>>,
    lookup: Lookup,
    fresh: Duration,
    stale: Duration,
    negative: Duration,
}

#[derive(Default)]
struct Entry {
    /// The last answer, and when it came.
    known: Option<(Arc<[SocketAddr]>, Instant)>,
    /// The lookup under way, if any.
    pending: Option<Shared<BoxFuture<'static, Answer>>>,
    /// The last lookup's failure, and when it came (cleared by an answer).
    failed: Option<(String, Instant)>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("fresh", &self.names.fresh)
            .field("stale", &self.names.stale)
            .field("negative", &self.names.negative)
            .finish_non_exhaustive()
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::system()
    }
}

impl Resolver {
    /// The system resolver (`getaddrinfo`), with [`FRESH`], [`STALE`] and [`NEGATIVE`].
    pub fn system() -> Resolver {
        let lookup: Lookup = Arc::new(|name| Ok((name, 0).to_socket_addrs()?.collect()));
        Resolver::with_lookup(lookup, FRESH, STALE)
    }

    /// A resolver that looks names up with `lookup` (blocking; run on Tokio's blocking
    /// pool), keeping answers `fresh`, then `stale` more as a fallback, and failures
    /// [`NEGATIVE`].
    pub fn with_lookup(lookup: Lookup, fresh: Duration, stale: Duration) -> Resolver {
        Resolver::with_lookup_negative(lookup, fresh, stale, NEGATIVE)
    }

    /// As [`Resolver::with_lookup`], remembering failures for `negative`.
    pub fn with_lookup_negative(
        lookup: Lookup,
        fresh: Duration,
        stale: Duration,
        negative: Duration,
    ) -> Resolver {
        Resolver {
            names: Arc::new(Names {
                table: Mutex::new(HashMap::new()),
                lookup,
                fresh,
                stale,
                negative,
            }),
        }
    }

    /// `name`'s addresses, port 0. Waits for a lookup only when there is no usable answer.
    pub async fn resolve(&self, name: &str) -> Result<Arc<[SocketAddr]>, String> {
        let wait = {
            let mut table = self.names.lock();
            if table.len() >= MAX_NAMES && !table.contains_key(name) {
                let usable = self.names.fresh + self.names.stale;
                table.retain(|_, e| {
                    e.pending.is_some()
                        || e.failed
                            .as_ref()
                            .is_some_and(|(_, at)| at.elapsed() < self.names.negative)
                        || e.known
                            .as_ref()
                            .is_some_and(|(_, at)| at.elapsed() < usable)
                });
            }
            let entry = table.entry(name.into()).or_default();
            let known = (entry.known.as_ref()).map(|(addrs, at)| (addrs.clone(), at.elapsed()));
            if let Some((addrs, age)) = &known {
                if *age < self.names.fresh {
                    return Ok(addrs.clone());
                }
            }
            let usable = known
                .as_ref()
                .filter(|(_, age)| *age < self.names.fresh + self.names.stale);
            if entry.pending.is_none() {
                if let Some((why, at)) = &entry.failed {
                    if at.elapsed() < self.names.negative {
                        return match usable {
                            Some((addrs, _)) => Ok(addrs.clone()),
                            None => Err(why.clone()),
                        };
                    }
                }
            }
            let pending = match &entry.pending {
                Some(p) => p.clone(),
                None => {
                    let p = self.start(name);
                    entry.pending = Some(p.clone());
                    // Driven to its end even if every asker stops waiting: the answer lands
                    // in the table when it comes.
                    tokio::spawn(p.clone());
                    p
                }
            };
            match usable {
                Some((addrs, _)) => return Ok(addrs.clone()),
                None => pending,
            }
        };
        wait.await
    }

    /// Starts looking `name` up on the blocking pool; the returned future (which `resolve`
    /// spawns a task to drive) records the answer in the table.
    fn start(&self, name: &str) -> Shared<BoxFuture<'static, Answer>> {
        let names = self.names.clone();
        let key: Box<str> = name.into();
        let lookup = self.names.lookup.clone();
        let blocking = tokio::task::spawn_blocking({
            let key = key.clone();
            move || lookup(&key)
        });
        async move {
            let answer: Answer = match blocking.await {
                Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs.into()),
                Ok(Ok(_)) => Err(format!("{key}: no addresses")),
                Ok(Err(e)) => Err(format!("{key}: {e}")),
                Err(e) => Err(format!("{key}: lookup did not finish: {e}")),
            };
            let mut table = names.lock();
            let entry = table.entry(key.clone()).or_default();
            entry.pending = None;
            match &answer {
                Ok(addrs) => {
                    entry.known = Some((addrs.clone(), Instant::now()));
                    entry.failed = None;
                }
                Err(why) => {
                    match &entry.known {
                        Some(_) => tracing::warn!(error = %why, "looking a node up failed; using its last known addresses"),
                        None => tracing::debug!(error = %why, "looking a node up failed"),
                    }
                    entry.failed = Some((why.clone(), Instant::now()));
                }
            }
            answer
        }
        .boxed()
        .shared()
    }
}

impl Names {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One answer's addresses, in order, as hyper's connector takes them.
#[derive(Debug)]
pub struct Addrs {
    addrs: Arc<[SocketAddr]>,
    next: usize,
}

impl Iterator for Addrs {
    type Item = SocketAddr;

    fn next(&mut self) -> Option<SocketAddr> {
        let a = self.addrs.get(self.next).copied();
        self.next += 1;
        a
    }
}

/// hyper's connector asks through this (it sets the port on each address).
impl tower_service::Service<Name> for Resolver {
    type Response = Addrs;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let resolver = self.clone();
        Box::pin(async move {
            let addrs = resolver
                .resolve(name.as_str())
                .await
                .map_err(io::Error::other)?;
            Ok(Addrs { addrs, next: 0 })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A lookup that counts its calls, waits `delay` (a slow DNS server) and answers
    /// `127.0.0.N` for the Nth call, or fails while `failing` is set.
    struct Dns {
        calls: AtomicUsize,
        failing: std::sync::atomic::AtomicBool,
        delay: Duration,
    }

    fn resolver(delay: Duration, fresh: Duration, stale: Duration) -> (Resolver, Arc<Dns>) {
        let dns = Arc::new(Dns {
            calls: AtomicUsize::new(0),
            failing: Default::default(),
            delay,
        });
        let d = dns.clone();
        let lookup: Lookup = Arc::new(move |_name| {
            let n = d.calls.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::sleep(d.delay);
            if d.failing.load(Ordering::SeqCst) {
                return Err(io::Error::other("SERVFAIL"));
            }
            Ok(vec![SocketAddr::from(([127, 0, 0, n as u8], 0))])
        });
        (Resolver::with_lookup(lookup, fresh, stale), dns)
    }

    fn last_octet(a: &Arc<[SocketAddr]>) -> u8 {
        match a[0].ip() {
            std::net::IpAddr::V4(ip) => ip.octets()[3],
            ip => panic!("{ip}"),
        }
    }

    #[tokio::test]
    async fn many_asking_at_once_share_one_lookup_and_its_answer_is_kept() {
        let (r, dns) = resolver(Duration::from_millis(200), Duration::from_secs(60), STALE);
        let asks: Vec<_> = (0..50)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move { r.resolve("media-1.example").await })
            })
            .collect();
        for a in asks {
            assert_eq!(last_octet(&a.await.unwrap().unwrap()), 1);
        }
        assert_eq!(
            dns.calls.load(Ordering::SeqCst),
            1,
            "one lookup for 50 asks"
        );
        r.resolve("media-1.example").await.unwrap();
        assert_eq!(dns.calls.load(Ordering::SeqCst), 1, "the answer is kept");
        r.resolve("media-2.example").await.unwrap();
        assert_eq!(dns.calls.load(Ordering::SeqCst), 2, "each name has its own");
    }

    #[tokio::test]
    async fn past_its_freshness_an_answer_serves_while_the_next_lookup_runs() {
        let fresh = Duration::from_millis(50);
        let (r, dns) = resolver(Duration::from_millis(300), fresh, STALE);
        assert_eq!(last_octet(&r.resolve("n").await.unwrap()), 1);
        tokio::time::sleep(fresh * 2).await;
        // A slow DNS server: the old answer comes back at once, and one lookup runs.
        let t = Instant::now();
        for _ in 0..10 {
            assert_eq!(last_octet(&r.resolve("n").await.unwrap()), 1);
        }
        assert!(
            t.elapsed() < Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        // Once it is answered, its answer is the one used.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(last_octet(&r.resolve("n").await.unwrap()), 2);
        assert_eq!(
            dns.calls.load(Ordering::SeqCst),
            2,
            "one lookup for the ten asks"
        );
    }

    #[tokio::test]
    async fn a_failing_dns_server_leaves_the_last_answer_in_use_until_it_is_too_old() {
        let (fresh, stale) = (Duration::from_millis(50), Duration::from_millis(400));
        let (r, dns) = resolver(Duration::ZERO, fresh, stale);
        assert_eq!(last_octet(&r.resolve("n").await.unwrap()), 1);
        dns.failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(fresh * 2).await;
        assert_eq!(last_octet(&r.resolve("n").await.unwrap()), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(last_octet(&r.resolve("n").await.unwrap()), 1);
        // Past fresh + stale: the caller waits for a lookup, which fails.
        tokio::time::sleep(stale).await;
        let e = r.resolve("n").await.unwrap_err();
        assert!(e.contains("SERVFAIL"), "{e}");
        // Past the failure's NEGATIVE, the next ask looks up again, and it works again.
        dns.failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(NEGATIVE).await;
        let before = dns.calls.load(Ordering::SeqCst);
        r.resolve("n").await.unwrap();
        assert_eq!(dns.calls.load(Ordering::SeqCst), before + 1);
    }

    #[tokio::test]
    async fn a_failure_is_remembered_for_a_while_and_not_asked_again_meanwhile() {
        let dns = Arc::new(Dns {
            calls: AtomicUsize::new(0),
            failing: Default::default(),
            delay: Duration::ZERO,
        });
        dns.failing.store(true, Ordering::SeqCst);
        let d = dns.clone();
        let lookup: Lookup = Arc::new(move |_name| {
            d.calls.fetch_add(1, Ordering::SeqCst);
            Err(io::Error::other("NXDOMAIN"))
        });
        let negative = Duration::from_millis(300);
        let r = Resolver::with_lookup_negative(lookup, FRESH, STALE, negative);
        // A name that does not resolve, asked for by 100 new connections one after another:
        // one lookup, and each asker gets its failure.
        for _ in 0..100 {
            let e = r.resolve("typo.example").await.unwrap_err();
            assert!(e.contains("NXDOMAIN") && e.contains("typo.example"), "{e}");
        }
        assert_eq!(
            dns.calls.load(Ordering::SeqCst),
            1,
            "one lookup for 100 asks"
        );
        // Another name is its own.
        r.resolve("other.example").await.unwrap_err();
        assert_eq!(dns.calls.load(Ordering::SeqCst), 2);
        // After `negative`, the next ask tries again.
        tokio::time::sleep(negative + Duration::from_millis(50)).await;
        r.resolve("typo.example").await.unwrap_err();
        assert_eq!(dns.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn while_a_failure_is_remembered_the_last_answer_still_serves() {
        let (fresh, negative) = (Duration::from_millis(50), Duration::from_millis(400));
        let d = Arc::new(Dns {
            calls: AtomicUsize::new(0),
            failing: Default::default(),
            delay: Duration::ZERO,
        });
        let dns = d.clone();
        let lookup: Lookup = Arc::new(move |_name| {
            let n = d.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if d.failing.load(Ordering::SeqCst) {
                return Err(io::Error::other("SERVFAIL"));
            }
            Ok(vec![SocketAddr::from(([127, 0, 0, n as u8], 0))])
        });
        let r = Resolver::with_lookup_negative(lookup, fresh, STALE, negative);
        assert_eq!(last_octet(&r.resolve("n").await.unwrap()), 1);
        dns.failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(fresh * 2).await;
        // The first ask past freshness starts a lookup (which fails) and gets the old answer.
        assert_eq!(last_octet(&r.resolve("n").await.unwrap()), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(dns.calls.load(Ordering::SeqCst), 2);
        for _ in 0..50 {
            assert_eq!(last_octet(&r.resolve("n").await.unwrap()), 1);
        }
        assert_eq!(
            dns.calls.load(Ordering::SeqCst),
            2,
            "no lookup while the failure is remembered"
        );
        // Past it, a lookup runs again, and its answer is used once it comes.
        dns.failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(negative).await;
        assert_eq!(last_octet(&r.resolve("n").await.unwrap()), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(last_octet(&r.resolve("n").await.unwrap()), 3);
    }

    #[tokio::test]
    async fn an_unanswered_name_fails_its_asker_without_a_thread_per_ask() {
        let (r, dns) = resolver(Duration::from_secs(2), FRESH, STALE);
        dns.failing.store(true, Ordering::SeqCst);
        // Callers that give up (their connect timeout) leave the one lookup running, and
        // the next one waits for it.
        for _ in 0..20 {
            let gave_up = tokio::time::timeout(Duration::from_millis(10), r.resolve("down")).await;
            assert!(gave_up.is_err());
        }
        assert!(r.resolve("down").await.unwrap_err().contains("SERVFAIL"));
        assert_eq!(
            dns.calls.load(Ordering::SeqCst),
            1,
            "one lookup for 21 asks"
        );
    }

    #[tokio::test]
    async fn the_system_resolver_answers_localhost() {
        let a = Resolver::system().resolve("localhost").await.unwrap();
        assert!(a.iter().all(|a| a.ip().is_loopback()), "{a:?}");
    }
}
