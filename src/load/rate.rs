//! Constant-rate latency mode (`roomrouter load --constant-rate R`): wrk2-style, open loop,
//! free of coordinated omission, and lean enough to load a router at tens of thousands of
//! requests per second from the same small machine.
//!
//! The main harness ([`super::engine`]) models users (sessions, stays, redirects followed,
//! leaves) with reqwest and a task per join, which caps it at a few thousand joins/s. This
//! mode measures one thing only, decision latency at a fixed offered rate, and does as little
//! as possible per request: `connections` tasks, each owning one HTTP/1.1 connection
//! (`hyper::client::conn::http1` over a `TcpStream` with `TCP_NODELAY`, driven inline by the
//! same task: no pool, no extra task per request), each sending `GET`s for random rooms at
//! its own evenly spaced planned times. Request `n` of the run is planned at `n / R` and
//! belongs to connection `n mod C`, so the connections are staggered and together offer
//! exactly `R` per second. Redirects are never followed.
//!
//! Latency counts from the **planned** time: a server that stalls delays every request
//! planned behind the stall on that connection, and all of that delay is measured (wrk2's
//! correction), whereas the service time (from the actual send, what a closed-loop tool
//! reports) is kept next to it for comparison. Sends are paced by a [`Pacer`]: by default
//! Tokio's millisecond timer, which may send up to 1 ms early (its latency then counts from
//! the actual send, so nothing is hidden and the average rate is unchanged); with
//! `--pacing wheel` a 100 µs timer wheel, for sub-millisecond figures; with `--pacing spin`
//! a 10 µs wheel on a runtime that never sleeps, for a load tool with a core of its own.
//! The report says which one paced the run.
//!
//! With `--warmup W` the run first sends at the same rate for `W` seconds and leaves those
//! requests out of every latency figure and of the late sends, as wrk2 does with its
//! calibration period: fresh connections, cold caches and the load tool's own start-up
//! (tens of milliseconds in which it falls behind) are not the server's steady state.
//!
//! Bounded everywhere: each connection sends at most its share of `floor(R x (warmup +
//! duration))` requests, every connect and exchange has a timeout, and nothing is sent or
//! awaited after the hard stop at `warmup + duration + timeout`; requests not sent by then
//! are counted as such.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::FutureExt as _;
use hdrhistogram::Histogram;
use http::header::HOST;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rand_distr::{Distribution as _, Zipf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::pace::{Pacer, Pacing};
use super::report::{Percentiles, RateReport};

/// A send this long after its planned time counts as late (`late_sends`): the client fell
/// behind, or the connection waited for a slow answer.
pub const LATE: Duration = Duration::from_millis(1);

/// Most requests one run may plan (memory and time stay bounded whatever the flags say).
pub const MAX_PLANNED: u64 = 100_000_000;

/// Longest warm-up `--warmup` accepts.
pub const MAX_WARMUP: Duration = Duration::from_secs(3600);

/// Everything a constant-rate run needs.
#[derive(Debug, Clone, PartialEq)]
pub struct RateConfig {
    /// Base URLs (`http://host:port[/prefix]`); connection `c` uses `targets[c % len]`.
    pub targets: Vec<String>,
    /// Requests per second over all connections.
    pub rate: f64,
    /// How long the measured part of the run lasts.
    pub duration: Duration,
    /// Sent at `rate` before `duration` and not measured (see the module docs).
    pub warmup: Duration,
    /// Persistent connections (and tasks); each carries `rate / connections` per second.
    pub connections: usize,
    /// Per-request timeout (connect, or send to end of body); also the grace after
    /// `duration` before the hard stop.
    pub timeout: Duration,
    /// Rooms `{room_prefix}1 ..= {room_prefix}{rooms}`.
    pub rooms: u32,
    /// What room names start with (`r` matches the compare script's wrk requests).
    pub room_prefix: String,
    /// Zipf exponent of room popularity; 0 = uniform (what wrk's rooms.lua does).
    pub zipf_s: f64,
    /// Request path with one `{room}`, appended to the target's path.
    pub path: String,
    /// Refuse to plan more than this many requests.
    pub max_requests: u64,
    pub seed: u64,
    /// Print a progress line every second to stderr.
    pub progress: bool,
    /// What paces the sends (`--pacing`).
    pub pacing: Pacing,
}

/// One checked target: where to connect and what to send.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    url: String,
    /// `host:port`, resolved at the start of the run.
    authority: String,
    /// The URL's path without a trailing `/`, put before every request path.
    base_path: String,
}

impl Target {
    fn parse(s: &str) -> anyhow::Result<Target> {
        let u = url::Url::parse(s)
            .with_context(|| format!("{s:?} is not a URL (expected http://HOST:PORT)"))?;
        anyhow::ensure!(
            u.scheme() == "http",
            "{s:?}: only http:// targets are supported in constant-rate mode"
        );
        let host = u
            .host_str()
            .with_context(|| format!("{s:?}: the URL has no host"))?;
        let port = u.port_or_known_default().unwrap_or(80);
        anyhow::ensure!(
            u.query().is_none() && u.fragment().is_none(),
            "{s:?}: give the query in --path, not in the URL"
        );
        Ok(Target {
            url: s.to_string(),
            authority: format!("{host}:{port}"),
            base_path: u.path().trim_end_matches('/').to_string(),
        })
    }
}

impl RateConfig {
    /// Requests the run plans: `floor(rate x (warmup + duration))`.
    pub fn planned(&self) -> u64 {
        (self.rate * (self.warmup + self.duration).as_secs_f64()).floor() as u64
    }

    /// The first requests of the plan, sent during the warm-up and not measured.
    pub fn warmup_planned(&self) -> u64 {
        ((self.rate * self.warmup.as_secs_f64()).floor() as u64).min(self.planned())
    }

    /// Checks every setting; the errors name the flag to change.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.rate.is_finite() && self.rate > 0.0 && self.rate <= 10_000_000.0,
            "--constant-rate must be in (0, 10000000] requests/s (got {})",
            self.rate
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.connections),
            "--connections must be in 1..=10000 (got {})",
            self.connections
        );
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be > 0");
        anyhow::ensure!(
            self.warmup <= MAX_WARMUP,
            "--warmup must be at most {} s",
            MAX_WARMUP.as_secs()
        );
        anyhow::ensure!(!self.timeout.is_zero(), "--timeout must be > 0");
        anyhow::ensure!(
            (1..=10_000_000).contains(&self.rooms),
            "--rooms must be in 1..=10000000"
        );
        anyhow::ensure!(
            self.zipf_s.is_finite() && self.zipf_s >= 0.0,
            "--zipf must be >= 0 (0 = uniform)"
        );
        anyhow::ensure!(
            self.path.starts_with('/') && self.path.matches("{room}").count() == 1,
            "--path must start with / and hold one {{room}} placeholder (got {:?})",
            self.path
        );
        anyhow::ensure!(
            !self.targets.is_empty(),
            "--constant-rate needs a target: --url http://HOST:PORT (it starts no cluster)"
        );
        for t in &self.targets {
            let t = Target::parse(t).context("--url")?;
            let example =
                PathTemplate::new(&t.base_path, &self.path, &self.room_prefix).for_room(self.rooms);
            http::Uri::try_from(example.as_str())
                .with_context(|| format!("--path gives {example:?}, which is not a valid path"))?;
        }
        let planned = self.planned();
        anyhow::ensure!(
            planned > self.warmup_planned(),
            "--constant-rate {} for {} s plans no request to measure: raise the rate or the duration",
            self.rate,
            self.duration.as_secs_f64()
        );
        let cap = self.max_requests.min(MAX_PLANNED);
        anyhow::ensure!(
            planned <= cap,
            "--constant-rate {} for {} s (with --warmup {} s) plans {planned} requests, more than --max-requests {cap}",
            self.rate,
            self.duration.as_secs_f64(),
            self.warmup.as_secs_f64()
        );
        Ok(())
    }
}

/// How room numbers (`1..=rooms`) are drawn.
#[derive(Debug, Clone, Copy)]
enum RoomPick {
    Uniform(u32),
    Zipf(Zipf<f64>, u32),
}

impl RoomPick {
    fn new(rooms: u32, s: f64) -> RoomPick {
        match Zipf::new(rooms as f64, s) {
            Ok(z) if s > 0.0 => RoomPick::Zipf(z, rooms),
            _ => RoomPick::Uniform(rooms),
        }
    }

    fn sample(&self, rng: &mut StdRng) -> u32 {
        match self {
            RoomPick::Uniform(n) => rng.random_range(1..=*n),
            RoomPick::Zipf(z, n) => (z.sample(rng) as u32).clamp(1, *n),
        }
    }
}

/// Builds request paths from the template without re-parsing it per request.
#[derive(Debug, Clone)]
struct PathTemplate {
    /// Everything up to the room number: base path, template head, room prefix.
    head: String,
    tail: String,
}

impl PathTemplate {
    fn new(base_path: &str, template: &str, room_prefix: &str) -> PathTemplate {
        let (h, t) = template.split_once("{room}").unwrap_or((template, ""));
        PathTemplate {
            head: format!("{base_path}{h}{room_prefix}"),
            tail: t.to_string(),
        }
    }

    fn for_room(&self, room: u32) -> String {
        format!("{}{room}{}", self.head, self.tail)
    }
}

/// Counters the progress line reads.
#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    answered: AtomicU64,
    errors: AtomicU64,
}

/// What one connection measured.
struct ConnStats {
    latency: Histogram<u64>,
    service: Histogram<u64>,
    sent: u64,
    /// Of `sent`, those planned during the warm-up (not measured).
    warmup_sent: u64,
    answered: u64,
    ok: u64,
    late_sends: u64,
    connects: u64,
    retried: u64,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<&'static str, u64>,
    last_done: Duration,
}

impl ConnStats {
    fn new() -> ConnStats {
        ConnStats {
            // Auto-resizing: a connection that only sees sub-millisecond answers stays small.
            latency: Histogram::new(3).expect("valid histogram"),
            service: Histogram::new(3).expect("valid histogram"),
            sent: 0,
            warmup_sent: 0,
            answered: 0,
            ok: 0,
            late_sends: 0,
            connects: 0,
            retried: 0,
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            last_done: Duration::ZERO,
        }
    }

    fn error(&mut self, kind: &'static str, n: u64) {
        if n > 0 {
            *self.errors.entry(kind).or_default() += n;
        }
    }

    fn merge(&mut self, o: ConnStats) {
        let _ = self.latency.add(&o.latency);
        let _ = self.service.add(&o.service);
        self.sent += o.sent;
        self.warmup_sent += o.warmup_sent;
        self.answered += o.answered;
        self.ok += o.ok;
        self.late_sends += o.late_sends;
        self.connects += o.connects;
        self.retried += o.retried;
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.last_done = self.last_done.max(o.last_done);
    }
}

type Body = Empty<Bytes>;

/// One open HTTP/1.1 connection, driven by the task that owns it.
struct Conn {
    sender: http1::SendRequest<Body>,
    driver: http1::Connection<TokioIo<TcpStream>, Body>,
}

/// Why an exchange failed (the error-by-kind key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Connect,
    Timeout,
    /// The server closed the connection before answering.
    Closed,
    /// The connection was reset (the server closed it with the request unread).
    Reset,
    /// Anything else hyper reports (a malformed answer, ...).
    Transport,
}

impl Failure {
    fn kind(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => super::engine::TIMEOUT,
            Failure::Closed => "closed",
            Failure::Reset => "reset",
            Failure::Transport => "transport",
        }
    }

    fn of(e: &hyper::Error) -> Failure {
        use std::error::Error as _;
        let reset = e
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                )
            });
        if reset {
            Failure::Reset
        } else if e.is_closed() || e.is_canceled() || e.is_incomplete_message() {
            Failure::Closed
        } else {
            Failure::Transport
        }
    }
}

async fn connect(addr: SocketAddr, deadline: Instant) -> Result<Conn, Failure> {
    let stream = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| Failure::Timeout)?
        .map_err(|_| Failure::Connect)?;
    stream.set_nodelay(true).map_err(|_| Failure::Connect)?;
    let (sender, driver) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| Failure::Connect)?;
    Ok(Conn { sender, driver })
}

/// Sends `req` on `conn` and reads the whole answer; returns the status and whether the
/// connection is still usable. The connection is polled in the same task while waiting.
async fn exchange(conn: &mut Conn, req: Request<Body>) -> (Result<u16, Failure>, bool) {
    let Conn { sender, driver } = conn;
    let request = async {
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            frame?;
        }
        Ok::<u16, hyper::Error>(status)
    };
    let mut request = std::pin::pin!(request);
    tokio::select! {
        biased;
        r = &mut request => (r.map_err(|e| Failure::of(&e)), true),
        // The connection ended (closed or failed): the request has its answer now or never.
        _ = &mut *driver => match request.as_mut().now_or_never() {
            Some(r) => (r.map_err(|e| Failure::of(&e)), false),
            None => (Err(Failure::Closed), false),
        },
    }
}

/// Everything a connection task needs.
struct Lane {
    index: usize,
    connections: u64,
    planned: u64,
    /// Requests numbered below this are the warm-up's.
    warmup_planned: u64,
    rate: f64,
    addr: SocketAddr,
    host: HeaderValue,
    path: PathTemplate,
    rooms: RoomPick,
    seed: u64,
    timeout: Duration,
    start: Instant,
    hard_end: Instant,
    pacer: Pacer,
}

impl Lane {
    /// Requests this connection carries: every `connections`-th from its index.
    fn count(&self) -> u64 {
        let c = self.index as u64;
        if c >= self.planned {
            0
        } else {
            (self.planned - c).div_ceil(self.connections)
        }
    }

    /// The number of this connection's `k`-th request in the whole run's plan.
    fn number(&self, k: u64) -> u64 {
        self.index as u64 + k * self.connections
    }

    fn planned_at(&self, k: u64) -> Instant {
        self.start + Duration::from_secs_f64(self.number(k) as f64 / self.rate)
    }
}

/// One connection's whole run.
async fn drive(lane: Lane, mut conn: Option<Conn>, progress: Arc<Progress>) -> ConnStats {
    let mut st = ConnStats::new();
    let mut rng =
        StdRng::seed_from_u64(lane.seed ^ (lane.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let count = lane.count();
    for k in 0..count {
        let planned = lane.planned_at(k);
        if Instant::now() >= lane.hard_end {
            st.error(super::engine::NOT_SENT, count - k);
            break;
        }
        lane.pacer.until(planned).await;
        let sent = Instant::now();
        let deadline = (sent + lane.timeout).min(lane.hard_end);
        let measured = lane.number(k) >= lane.warmup_planned;
        if !measured {
            st.warmup_sent += 1;
        } else if sent > planned + LATE {
            st.late_sends += 1;
        }
        st.sent += 1;
        progress.sent.fetch_add(1, Ordering::Relaxed);
        // A kept connection the server closed while it idled (its keep-alive timeout) is not
        // this request's failure: polled once, its driver has ended, and a new one is opened
        // (counted in `reconnects`), as a browser would.
        if let Some(c) = conn.as_mut() {
            if (&mut c.driver).now_or_never().is_some() {
                conn = None;
            }
        }
        let path = lane.path.for_room(lane.rooms.sample(&mut rng));
        // A connection that idled (kept after an answer, or opened ahead of the run) can
        // still be closed by the server just as this request goes out (its FIN not yet seen
        // above): a request it closed or reset unanswered is sent once more on a new
        // connection, as browsers do for an idempotent GET. It is counted (`retried`), not
        // hidden; a connection opened for the request gets no second try.
        let mut retry = true;
        let (c, outcome) = loop {
            let idled = conn.is_some();
            let mut c = match conn.take() {
                Some(c) => c,
                None => match connect(lane.addr, deadline).await {
                    Ok(c) => {
                        st.connects += 1;
                        c
                    }
                    Err(f) => break (None, Ok((Err(f), false))),
                },
            };
            let req = Request::get(path.clone())
                .header(HOST, lane.host.clone())
                .body(Empty::new())
                .expect("check() made sure every room gives a valid path");
            let outcome = tokio::time::timeout_at(deadline, exchange(&mut c, req)).await;
            if idled && retry && matches!(outcome, Ok((Err(Failure::Closed | Failure::Reset), _))) {
                retry = false;
                st.retried += 1;
                continue;
            }
            break (Some(c), outcome);
        };
        let done = Instant::now();
        match outcome {
            Ok((Ok(status), reusable)) => {
                if measured {
                    record(
                        &mut st.latency,
                        done.saturating_duration_since(planned.min(sent)),
                    );
                    record(&mut st.service, done.saturating_duration_since(sent));
                }
                st.answered += 1;
                if (200..400).contains(&status) {
                    st.ok += 1;
                }
                *st.statuses.entry(status).or_default() += 1;
                st.last_done = done.saturating_duration_since(lane.start);
                progress.answered.fetch_add(1, Ordering::Relaxed);
                if reusable {
                    conn = c;
                }
            }
            Ok((Err(f), _)) => {
                st.error(f.kind(), 1);
                progress.errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                st.error(Failure::Timeout.kind(), 1);
                progress.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    st
}

/// This process's CPU time so far (all threads, user and system), where the platform tells.
#[cfg(target_os = "linux")]
fn own_cpu() -> Option<Duration> {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Some(Duration::new(
        t.tv_sec.try_into().ok()?,
        t.tv_nsec.try_into().ok()?,
    ))
}

#[cfg(not(target_os = "linux"))]
fn own_cpu() -> Option<Duration> {
    None
}

/// Records `d` in microseconds (at least 1), growing the histogram as needed
/// (`saturating_record` would clamp to its current range instead).
fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record(d.as_micros().clamp(1, u64::MAX as u128) as u64);
}

/// Resolves a target's `host:port` to one address.
async fn resolve(t: &Target) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(&t.authority)
        .await
        .with_context(|| format!("cannot resolve {}", t.authority))?
        .next()
        .with_context(|| format!("{} resolves to no address", t.authority))
}

/// Runs one constant-rate measurement. Fails before sending anything when the settings are
/// bad or a target does not accept connections.
pub async fn run(cfg: RateConfig) -> anyhow::Result<RateReport> {
    cfg.check()?;
    let targets: Vec<Target> = cfg
        .targets
        .iter()
        .map(|t| Target::parse(t))
        .collect::<anyhow::Result<_>>()?;
    let mut addrs = Vec::with_capacity(targets.len());
    for t in &targets {
        addrs.push(resolve(t).await?);
    }
    let planned = cfg.planned();
    let connections = (cfg.connections as u64).min(planned) as usize;

    // Open every connection before the clock starts, so the first requests do not pay for
    // the handshakes; a target that refuses is a clear error, not a run full of failures.
    let mut conns = Vec::with_capacity(connections);
    for c in 0..connections {
        let (t, addr) = (&targets[c % targets.len()], addrs[c % targets.len()]);
        let deadline = Instant::now() + cfg.timeout;
        match connect(addr, deadline).await {
            Ok(conn) => conns.push(conn),
            Err(f) => anyhow::bail!("cannot connect to {} ({addr}): {}", t.url, f.kind()),
        }
    }

    let progress = Arc::new(Progress::default());
    // Read before the clock starts: scanning /proc takes a few milliseconds.
    let kernel_from = super::kthreads::Snapshot::take();
    let start = Instant::now() + Duration::from_millis(20);
    let hard_end = start + cfg.warmup + cfg.duration + cfg.timeout;
    let rooms = RoomPick::new(cfg.rooms, cfg.zipf_s);
    let pacer = Pacer::new(cfg.pacing);
    let paced_by = pacer.kind();
    let cpu_from = (Instant::now(), own_cpu());
    let mut tasks = tokio::task::JoinSet::new();
    for (c, conn) in conns.into_iter().enumerate() {
        let t = &targets[c % targets.len()];
        let lane = Lane {
            index: c,
            connections: connections as u64,
            planned,
            warmup_planned: cfg.warmup_planned(),
            rate: cfg.rate,
            addr: addrs[c % targets.len()],
            host: HeaderValue::from_str(&t.authority).context("the URL's host")?,
            path: PathTemplate::new(&t.base_path, &cfg.path, &cfg.room_prefix),
            rooms,
            seed: cfg.seed,
            timeout: cfg.timeout,
            start,
            hard_end,
            pacer: pacer.clone(),
        };
        tasks.spawn(drive(lane, Some(conn), progress.clone()));
    }

    let ticker = cfg.progress.then(|| {
        let p = progress.clone();
        let dur = cfg.duration.as_secs_f64();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
            let mut last = 0;
            while Instant::now() < hard_end {
                tick.tick().await;
                let answered = p.answered.load(Ordering::Relaxed);
                eprintln!(
                    "[{:>6.1}s/{dur:.0}s] sent {}/{planned}  answered {answered}  errors {}  last second {}/s",
                    start.elapsed().as_secs_f64(),
                    p.sent.load(Ordering::Relaxed),
                    p.errors.load(Ordering::Relaxed),
                    answered - last,
                );
                last = answered;
            }
        })
    });

    let mut total = ConnStats::new();
    let mut aborted = 0u64;
    // Every lane stops by `hard_end`; the extra second only guards against a bug.
    let _ = tokio::time::timeout_at(hard_end + Duration::from_secs(1), async {
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(st) => total.merge(st),
                Err(_) => aborted += 1,
            }
        }
    })
    .await;
    aborted += tasks.len() as u64;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some(t) = ticker {
        t.abort();
    }
    total.error("connection task aborted", aborted);
    let load_tool_cores = match (cpu_from.1, own_cpu()) {
        (Some(a), Some(b)) => {
            Some(b.saturating_sub(a).as_secs_f64() / cpu_from.0.elapsed().as_secs_f64().max(1e-9))
        }
        _ => None,
    };

    let kernel_threads = kernel_from.and_then(|k| k.since());

    let elapsed = total.last_done.as_secs_f64().max(1e-9);
    Ok(RateReport {
        target: targets
            .iter()
            .map(|t| t.url.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        settings: serde_json::json!({
            "rate": cfg.rate,
            "duration_s": cfg.duration.as_secs_f64(),
            "warmup_s": cfg.warmup.as_secs_f64(),
            "connections": connections,
            "timeout_s": cfg.timeout.as_secs_f64(),
            "rooms": cfg.rooms,
            "room_prefix": cfg.room_prefix,
            "zipf_s": cfg.zipf_s,
            "path": cfg.path,
            "seed": cfg.seed,
        }),
        target_rate: cfg.rate,
        connections,
        planned,
        sent: total.sent,
        warmup_sent: total.warmup_sent,
        answered: total.answered,
        ok: total.ok,
        elapsed_s: elapsed,
        achieved_per_s: total.answered as f64 / elapsed,
        late_sends: total.late_sends,
        // Every connection shares the one pacer: a wheel whose timer failed mid-run paced
        // part of it.
        pacing: match pacer.kind() {
            now if now == paced_by => now,
            _ => "mixed",
        }
        .to_string(),
        load_tool_cores,
        kernel_threads,
        reconnects: total.connects,
        retried: total.retried,
        latency_us: Percentiles::of(&total.latency),
        service_us: Percentiles::of(&total.service),
        statuses: total.statuses,
        // Every measured request has a figure only if every one was answered: a failure took
        // any time up to the timeout, and a timeout or a request not sent was the slowest.
        latency_complete: total.latency.len() == planned - cfg.warmup_planned(),
        errors: total
            .errors
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http::Response;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    /// A loopback HTTP/1.1 server that answers `204`, counts requests, records their
    /// paths, and can stall request number `stall_at` (1-based) for `stall`.
    struct TestServer {
        url: String,
        requests: Arc<AtomicU64>,
        paths: Arc<Mutex<HashSet<String>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl TestServer {
        async fn start(stall_at: Option<u64>, stall: Duration) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let requests = Arc::new(AtomicU64::new(0));
            let paths = Arc::new(Mutex::new(HashSet::new()));
            let (n, p) = (requests.clone(), paths.clone());
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (n, p) = (n.clone(), p.clone());
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let k = n.fetch_add(1, Ordering::SeqCst) + 1;
                        p.lock().unwrap().insert(req.uri().to_string());
                        async move {
                            if Some(k) == stall_at {
                                tokio::time::sleep(stall).await;
                            }
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = http::StatusCode::NO_CONTENT;
                            Ok::<_, Infallible>(r)
                        }
                    });
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
            TestServer {
                url,
                requests,
                paths,
                task,
            }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn config(url: &str, rate: f64, secs: f64, connections: usize) -> RateConfig {
        RateConfig {
            targets: vec![url.to_string()],
            rate,
            duration: Duration::from_secs_f64(secs),
            warmup: Duration::ZERO,
            connections,
            timeout: Duration::from_secs(5),
            rooms: 100,
            room_prefix: "room-".into(),
            zipf_s: 1.1,
            path: "/rooms/{room}".into(),
            max_requests: 1_000_000,
            seed: 1,
            progress: false,
            pacing: Pacing::Tokio,
        }
    }

    async fn bounded(cfg: RateConfig) -> anyhow::Result<RateReport> {
        tokio::time::timeout(Duration::from_secs(30), run(cfg))
            .await
            .expect("the run is bounded")
    }

    /// A server that answers `204` to the first `answered` requests on each connection and
    /// closes it unanswered on the next, or once it idled for `idle` (a keep-alive timeout,
    /// as the router's `header_read_timeout`).
    async fn closing_server(
        answered: usize,
        idle: Duration,
    ) -> (String, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..answered {
                        match tokio::time::timeout(idle, s.read(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => {}
                            _ => return,
                        }
                        let answer = b"HTTP/1.1 204 No Content\r\n\r\n";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    let _ = tokio::time::timeout(idle, s.read(&mut buf)).await;
                });
            }
        });
        (url, task)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_a_kept_connection_dropped_unanswered_is_sent_once_more_on_a_new_one() {
        let (url, server) = closing_server(1, Duration::from_secs(30)).await;
        // 2 connections, 20 requests: each connection's second request finds it closed.
        let r = bounded(config(&url, 20.0, 1.0, 2)).await.unwrap();
        server.abort();
        assert_eq!((r.planned, r.answered, r.ok), (20, 20, 20), "{}", r.table());
        assert!(r.errors.is_empty(), "{}", r.table());
        assert_eq!(
            r.retried,
            18,
            "all but each connection's first: {}",
            r.table()
        );
        assert_eq!(r.reconnects, 18, "the retries' connections: {}", r.table());
        assert!(r.table().contains("retried sends 18"), "{}", r.table());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_connection_dropped_unanswered_is_an_error_not_retried() {
        let (url, server) = closing_server(0, Duration::from_secs(30)).await;
        let r = bounded(config(&url, 20.0, 0.5, 2)).await.unwrap();
        server.abort();
        assert_eq!((r.planned, r.answered), (10, 0), "{}", r.table());
        assert_eq!(r.errors.get("closed"), Some(&10), "{}", r.table());
        // The two connections opened ahead of the run idled until their first request, which
        // is retried once; the connections opened after are not.
        assert_eq!((r.retried, r.reconnects), (2, 10), "{}", r.table());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_that_fail_without_an_answer_leave_the_latency_incomplete() {
        // Every connection is closed unanswered: no request is timed out or left unsent, yet
        // none has a figure (a failure may take any time up to the timeout), and the report
        // says the latency misses them.
        let (url, server) = closing_server(0, Duration::from_secs(30)).await;
        let r = bounded(config(&url, 20.0, 0.5, 2)).await.unwrap();
        server.abort();
        assert_eq!((r.planned, r.answered), (10, 0), "{}", r.table());
        assert!(!r.errors.contains_key(super::super::engine::TIMEOUT));
        assert!(!r.errors.contains_key(super::super::engine::NOT_SENT));
        assert_eq!(r.latency_us.count, 0);
        assert!(!r.latency_complete, "{}", r.table());
        assert!(r.table().contains("latency INCOMPLETE"), "{}", r.table());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_the_server_closed_while_idle_is_reopened_not_counted_as_an_error() {
        let (url, server) = closing_server(usize::MAX, Duration::from_millis(20)).await;
        // 4 connections at 10/s: each idles 400 ms between its requests, and is closed after
        // 20. A send that races the close on a busy machine is retried, not lost.
        let r = bounded(config(&url, 10.0, 2.0, 4)).await.unwrap();
        server.abort();
        assert_eq!((r.planned, r.answered), (20, 20), "{}", r.table());
        assert!(r.errors.is_empty(), "{}", r.table());
        assert!(
            r.reconnects >= 12,
            "each request after the first on a connection reopened it: {}",
            r.table()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn against_the_ceiling_it_sends_exactly_the_plan_at_the_rate() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(super::super::ceiling::serve_bare_307(listener, async {
            let _ = stopped.await;
        }));
        // 1 000/s over 8 connections: a rate a debug build keeps on a machine busy with
        // other work (a test run beside a build), so the band below tests the pacing.
        let r = bounded(config(&url, 1_000.0, 2.0, 8)).await.unwrap();
        let _ = stop.send(());
        let _ = server.await;

        assert_eq!(r.planned, 2_000, "{}", r.table());
        assert_eq!(
            (r.sent, r.answered, r.ok),
            (2_000, 2_000, 2_000),
            "{}",
            r.table()
        );
        assert_eq!(r.statuses, BTreeMap::from([(307, 2_000)]), "{}", r.table());
        assert!(r.errors.is_empty(), "{}", r.table());
        assert_eq!(r.reconnects, 0, "keep-alive: no connection was reopened");
        assert!(
            (750.0..=1_250.0).contains(&r.achieved_per_s),
            "achieved {} /s\n{}",
            r.achieved_per_s,
            r.table()
        );
        assert_eq!(r.latency_us.count, 2_000);
        assert!(r.latency_us.p50 <= r.latency_us.p99 && r.latency_us.p99 <= r.latency_us.max);
        if cfg!(target_os = "linux") {
            let cores = r
                .load_tool_cores
                .expect("Linux tells a process its CPU time");
            assert!(cores > 0.0 && cores < 64.0, "{}", r.table());
            assert!(r.table().contains("cores busy"), "{}", r.table());
        }
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["statuses"]["307"], 2_000);
        assert!(json["latency_us"]["p999"].as_u64().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_planned_request_reaches_the_server_once_with_a_room_from_the_template() {
        let server = TestServer::start(None, Duration::ZERO).await;
        let mut cfg = config(&format!("{}/prefix/", server.url), 500.0, 1.0, 3);
        cfg.path = "/status?room={room}".into();
        cfg.rooms = 10;
        cfg.zipf_s = 0.0;
        let r = bounded(cfg).await.unwrap();
        assert_eq!((r.planned, r.answered), (500, 500), "{}", r.table());
        assert_eq!(server.requests.load(Ordering::SeqCst), 500);
        let paths = server.paths.lock().unwrap().clone();
        let expected: HashSet<String> = (1..=10)
            .map(|i| format!("/prefix/status?room=room-{i}"))
            .collect();
        assert_eq!(paths, expected, "uniform over 10 rooms hits all of them");
    }

    /// Coordinated omission: one answer stalls for 300 ms. Every request planned behind it
    /// on that connection waits, and from the plan that wait is latency, so p99 is of the
    /// stall's order. Timed from the actual send (what a closed loop reports), only one
    /// request in 1 500 was slow and p99 stays small. The same whatever paces the sends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stall_shows_in_latency_from_the_plan_but_not_in_service_time() {
        for pacing in [Pacing::Tokio, Pacing::Wheel, Pacing::Spin] {
            a_stall_shows_paced_by(pacing).await;
        }
    }

    async fn a_stall_shows_paced_by(pacing: Pacing) {
        let stall = Duration::from_millis(300);
        let server = TestServer::start(Some(300), stall).await;
        let mut cfg = config(&server.url, 1_000.0, 1.5, 1);
        cfg.pacing = pacing;
        let r = bounded(cfg).await.unwrap();
        let expected = match pacing {
            Pacing::Spin => "spin",
            Pacing::Wheel if cfg!(target_os = "linux") => "wheel",
            _ => "tokio",
        };
        assert_eq!(r.pacing, expected, "{}", r.table());
        assert_eq!((r.planned, r.answered), (1_500, 1_500), "{}", r.table());
        assert_eq!(server.requests.load(Ordering::SeqCst), 1_500);
        assert!(r.latency_us.max >= 300_000, "{}", r.table());
        assert!(r.latency_us.p99 >= 250_000, "{}", r.table());
        assert!(r.latency_us.p90 >= 50_000, "{}", r.table());
        assert!(r.service_us.max >= 300_000, "the stalled answer itself");
        assert!(r.service_us.p99 < 100_000, "{}", r.table());
        assert!(
            r.late_sends >= 250,
            "sends queued behind the stall: {}",
            r.table()
        );
        assert!(
            r.table().contains("of sends left more than 1 ms late"),
            "the table points at the late sends: {}",
            r.table()
        );
    }

    /// A 600 ms stall on the very first request, inside a 1.5 s warm-up: the ~120 requests
    /// queued behind it leave late and are answered, but none of them is measured (nor the
    /// stalled answer's service time), and the measured half after the warm-up starts with
    /// the connection caught up (it had 0.9 s to send them). At 200/s on one connection the
    /// margins hold on a machine busy with other work: measured, the queue's latencies from
    /// the plan would reach ~600 ms, and the stalled answer's service time 600 ms.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stall_during_the_warm_up_is_answered_but_not_measured() {
        let stall = Duration::from_millis(600);
        let server = TestServer::start(Some(1), stall).await;
        let mut cfg = config(&server.url, 200.0, 1.5, 1);
        cfg.warmup = Duration::from_millis(1_500);
        cfg.pacing = Pacing::Wheel;
        let r = bounded(cfg).await.unwrap();
        assert_eq!((r.planned, r.answered), (600, 600), "{}", r.table());
        assert_eq!(server.requests.load(Ordering::SeqCst), 600);
        assert_eq!(r.warmup_sent, 300, "{}", r.table());
        assert_eq!(r.statuses, BTreeMap::from([(204, 600)]), "{}", r.table());
        assert_eq!(r.latency_us.count, 300, "only what followed the warm-up");
        assert_eq!(r.service_us.count, 300);
        assert!(
            r.latency_us.max < 300_000,
            "the stall's queue stayed in the warm-up: {}",
            r.table()
        );
        assert!(
            r.service_us.max < 300_000,
            "the stalled answer stayed in the warm-up: {}",
            r.table()
        );
        assert!(r.table().contains("the first 300 sent are not measured"));
        assert!(r.latency_complete, "every measured request answered");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["warmup_sent"], 300);
        assert_eq!(json["settings"]["warmup_s"], 1.5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_never_answers_ends_in_timeouts_by_the_hard_stop() {
        // Accepts connections (the kernel's backlog does) and never reads or answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut cfg = config(&url, 20.0, 0.5, 2);
        cfg.timeout = Duration::from_millis(200);
        let began = std::time::Instant::now();
        let r = bounded(cfg).await.unwrap();
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "{:?}",
            began.elapsed()
        );
        drop(listener);
        assert_eq!(r.planned, 10);
        assert_eq!(r.answered, 0, "{}", r.table());
        assert!(
            r.errors.get("timeout").copied().unwrap_or(0) >= 2,
            "{}",
            r.table()
        );
        let unanswered: u64 = r.errors.values().sum();
        assert_eq!(
            unanswered, r.planned,
            "every planned request is accounted for"
        );
        assert_eq!(
            r.sent
                + r.errors
                    .get("not sent by the hard stop")
                    .copied()
                    .unwrap_or(0),
            10
        );
        assert!(!r.latency_complete, "timeouts are the slowest requests");
        assert!(r.table().contains("latency INCOMPLETE"), "{}", r.table());
    }

    #[tokio::test]
    async fn bad_settings_are_clear_errors_before_anything_is_sent() {
        let ok = config("http://127.0.0.1:9", 100.0, 1.0, 4);
        ok.check().unwrap();
        let cases: Vec<(RateConfig, &str)> = vec![
            (
                RateConfig {
                    rate: 0.0,
                    ..ok.clone()
                },
                "--constant-rate must be in",
            ),
            (
                RateConfig {
                    rate: f64::NAN,
                    ..ok.clone()
                },
                "--constant-rate must be in",
            ),
            (
                RateConfig {
                    connections: 0,
                    ..ok.clone()
                },
                "--connections must be in",
            ),
            (
                RateConfig {
                    targets: vec![],
                    ..ok.clone()
                },
                "needs a target",
            ),
            (
                RateConfig {
                    targets: vec!["not a url".into()],
                    ..ok.clone()
                },
                "not a URL",
            ),
            (
                RateConfig {
                    targets: vec!["https://127.0.0.1:9".into()],
                    ..ok.clone()
                },
                "only http://",
            ),
            (
                RateConfig {
                    path: "/rooms".into(),
                    ..ok.clone()
                },
                "{room}",
            ),
            (
                RateConfig {
                    path: "/rooms/{room} now".into(),
                    ..ok.clone()
                },
                "not a valid path",
            ),
            (
                RateConfig {
                    rate: 0.5,
                    ..ok.clone()
                },
                "plans no request",
            ),
            (
                RateConfig {
                    max_requests: 10,
                    ..ok.clone()
                },
                "more than --max-requests",
            ),
            (
                RateConfig {
                    zipf_s: -1.0,
                    ..ok.clone()
                },
                "--zipf",
            ),
            (
                RateConfig {
                    warmup: MAX_WARMUP + Duration::from_secs(1),
                    ..ok.clone()
                },
                "--warmup must be at most",
            ),
            (
                // 100/s for 1 s is 100 requests, and the warm-up's 95 more pass the cap.
                RateConfig {
                    warmup: Duration::from_secs_f64(0.95),
                    max_requests: 150,
                    ..ok.clone()
                },
                "(with --warmup 0.95 s) plans 195 requests, more than --max-requests 150",
            ),
        ];
        for (cfg, want) in cases {
            let e = format!("{:#}", run(cfg.clone()).await.unwrap_err());
            assert!(e.contains(want), "{cfg:?}: {e:?} lacks {want:?}");
        }
    }

    #[tokio::test]
    async fn a_target_that_refuses_connections_fails_the_run_at_once() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = bounded(config(&format!("http://127.0.0.1:{port}"), 100.0, 1.0, 2))
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("cannot connect to"), "{e:#}");
    }

    #[test]
    fn the_cli_flags_build_the_config_and_refuse_bad_values() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            load: super::super::LoadArgs,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("load").chain(args.iter().copied())).map(|c| c.load)
        };
        let a = parse(&[
            "--constant-rate",
            "5000",
            "--url",
            "http://127.0.0.1:1",
            "--zipf",
            "0",
            "--room-prefix",
            "r",
        ])
        .unwrap();
        let cfg = a.rate_config().unwrap().expect("constant-rate mode");
        assert_eq!((cfg.rate, cfg.connections, cfg.zipf_s), (5000.0, 64, 0.0));
        assert_eq!(cfg.warmup, Duration::ZERO, "no warm-up unless asked for");
        let warm = parse(&[
            "--constant-rate",
            "1000",
            "--url",
            "http://127.0.0.1:1",
            "--duration",
            "2",
            "--warmup",
            "0.5",
        ])
        .unwrap()
        .rate_config()
        .unwrap()
        .unwrap();
        assert_eq!(warm.warmup, Duration::from_millis(500));
        assert_eq!((warm.planned(), warm.warmup_planned()), (2_500, 500));
        assert!(
            parse(&["--warmup", "1"]).is_err(),
            "--warmup belongs to the constant-rate mode"
        );
        assert_eq!(cfg.targets, vec!["http://127.0.0.1:1".to_string()]);
        assert_eq!(cfg.room_prefix, "r");
        assert!(
            parse(&["--room-prefix", "r"]).is_err(),
            "--room-prefix belongs to the constant-rate mode"
        );
        assert!(parse(&["--url", "http://127.0.0.1:1"])
            .unwrap()
            .rate_config()
            .unwrap()
            .is_none());

        let err = |args: &[&str]| format!("{:#}", parse(args).unwrap().rate_config().unwrap_err());
        assert!(err(&["--constant-rate", "0", "--url", "http://x:1"]).contains("--constant-rate"));
        assert!(err(&[
            "--constant-rate",
            "10",
            "--connections",
            "0",
            "--url",
            "http://x:1"
        ])
        .contains("--connections"));
        assert!(err(&["--constant-rate", "10", "--url", "ftp://x"]).contains("http://"));
        assert!(err(&["--constant-rate", "10"]).contains("needs a target"));
        assert!(parse(&["--constant-rate", "fast"]).is_err(), "not a number");
        assert!(
            parse(&["--constant-rate", "10", "--rate", "5"]).is_err(),
            "--rate belongs to the other mode"
        );
    }
}
