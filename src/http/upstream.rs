//! Upstream connections for proxy mode: a pool of HTTP/1.1 "lanes" per node, each lane one
//! connection that is driven by the task of the request using it.
//!
//! hyper-util's pooled client runs every upstream connection in a task of its own: a
//! forwarded request hands its head to that task, the task wakes to write it, wakes again to
//! read the response, and hands the head and every body chunk back through channels — four
//! or more cross-task wake-ups per request, which on a busy proxy cost more than the HTTP
//! work itself (scheduler and futex time in profiles). A lane has no task: whoever holds it
//! polls its connection, first while waiting for the response head ([`Lane::exchange`]) and
//! then from the response body ([`LaneBody`]), so the downstream connection's task does the
//! upstream I/O itself and a request costs no wake-up beyond the sockets' own.
//!
//! Ownership is the invariant: a lane is either in the pool (idle, nobody polls it) or owned
//! by exactly one request. A response body that ends cleanly gives its lane back; one dropped
//! early closes the connection (its state is unknown). An idle lane is checked before reuse
//! (its connection polled once: a node that closed it shows up then) and dropped after
//! `proxy.pool_idle_timeout`; a reaper prunes idle lanes of nodes that get no traffic.
//!
//! With several event loops (`server.runtime = "per_thread"`) the pool has a shard per loop:
//! a connection is registered with the loop that opened it, so it goes back to that loop's
//! shard and only that loop's requests take it; no socket's readiness crosses threads.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::{Request, Response, Uri};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use super::resolve::Resolver;
use super::Body;

/// What opens upstream connections: TCP (node names through [`Resolver`]), then TLS for
/// `https://` upstreams.
pub(crate) type Connector = HttpsConnector<HttpConnector<Resolver>>;

pub(crate) type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// Why a lane could not be had or did not answer.
#[derive(Debug)]
pub enum LaneError {
    /// No connection to the node (refused, unreachable, TLS failure, timeout).
    Connect(String),
    /// No connection because the router itself ran short (file descriptors, local ports,
    /// socket buffers, memory): not the node's failure, and not counted against it.
    Local(String),
    /// The exchange failed after the connection was open.
    Exchange(hyper::Error),
}

/// One HTTP/1.1 connection to a node and the handle that sends requests on it. Large (the
/// connection's buffers and state are inline), so it moves between pool, request and body
/// boxed.
pub struct Lane {
    send: http1::SendRequest<Body>,
    /// `None` once the connection has ended (it must not be polled again).
    conn: Option<http1::Connection<Io, Body>>,
    /// The pool key of the node it belongs to.
    key: Arc<str>,
    /// The event loop that opened it (its pool shard).
    shard: usize,
    /// Came out of the pool (a failure before the request was written may be retried).
    reused: bool,
}

impl Lane {
    /// Drives the connection's I/O; false once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        drive(&mut self.conn, cx)
    }

    /// Whether the lane can carry a new request now: its connection still open (polled once,
    /// without a waker that matters) and ready for the next request.
    fn reusable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx) && matches!(self.send.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    /// Sends `req` and waits for the response head, driving the connection meanwhile. On a
    /// failure before the request was written, the request comes back for another lane.
    pub async fn exchange(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, (hyper::Error, Option<Request<Body>>)> {
        let mut sent = std::pin::pin!(self.send.try_send_request(req));
        let r = std::future::poll_fn(|cx| {
            drive(&mut self.conn, cx);
            sent.as_mut().poll(cx)
        })
        .await;
        r.map_err(|mut e| {
            let req = e.take_message();
            (e.into_error(), req)
        })
    }
}

/// Polls `conn` once; sets it to `None` when it has ended (it must not be polled again).
/// False once it has ended.
fn drive(conn: &mut Option<http1::Connection<Io, Body>>, cx: &mut Context<'_>) -> bool {
    if let Some(c) = conn {
        if let Poll::Ready(r) = Pin::new(c).poll(cx) {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upstream connection ended");
            }
            *conn = None;
        }
    }
    conn.is_some()
}

/// A connection an [`Idle`] pool can hold: it knows its node and can tell whether it may
/// carry another request.
pub(crate) trait Pooled {
    /// The pool key of the node it belongs to (its upstream base URL).
    fn key(&self) -> &Arc<str>;
    /// The event loop it was opened on: the pool shard it goes back to.
    fn shard(&self) -> usize;
    /// Whether it can carry a new request now. May read from the socket, never blocks.
    fn reusable(&mut self) -> bool;
    /// It came out of the pool (a failure before the request was written may be retried).
    fn mark_reused(&mut self);
}

impl Pooled for Lane {
    fn key(&self) -> &Arc<str> {
        &self.key
    }

    fn shard(&self) -> usize {
        self.shard
    }

    fn reusable(&mut self) -> bool {
        Lane::reusable(self)
    }

    fn mark_reused(&mut self) {
        self.reused = true;
    }
}

/// Idle connections per event loop and node, most recently used last (so oldest first:
/// each list is in the order its connections went idle). Shared by the lanes here and the
/// fast path's raw connections (`h1::pool`).
pub(crate) struct Idle<T> {
    /// One map per event loop: node -> its idle connections.
    shards: Box<[IdleLists<T>]>,
    max_per_node: usize,
    timeout: Duration,
}

/// Idle connections by node URL: taken and returned on every proxied request, so hashed with
/// foldhash rather than SipHash (see [`RoomMap`](crate::room::RoomMap); about 170
/// instructions a request).
type IdleLists<T> = DashMap<Arc<str>, Vec<(Box<T>, Instant)>, foldhash::fast::RandomState>;

impl<T: Pooled + Send + Sync + 'static> Idle<T> {
    /// A pool for `loops` event loops keeping at most `max_per_node` idle connections per
    /// loop and node, each for at most `timeout`. Inside a runtime, also starts the reaper
    /// (it stops with the pool).
    pub(crate) fn new(loops: usize, max_per_node: usize, timeout: Duration) -> Arc<Idle<T>> {
        let idle = Arc::new(Idle {
            shards: (0..loops.max(1)).map(|_| DashMap::default()).collect(),
            max_per_node,
            timeout,
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let period = (timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
            rt.spawn(reap(Arc::downgrade(&idle), period));
        }
        idle
    }

    pub(crate) fn put(&self, lane: Box<T>) {
        if self.max_per_node == 0 {
            return;
        }
        let shard = &self.shards[lane.shard() % self.shards.len()];
        let mut v = shard.entry(lane.key().clone()).or_default();
        // Read under the node's lock, so each list stays in the order its connections went
        // idle: the expired ones are a prefix, dropped without looking at the rest (this
        // runs after every proxied request, with up to `max_per_node` entries).
        let now = Instant::now();
        let expired = v.partition_point(|(_, since)| now.duration_since(*since) >= self.timeout);
        v.drain(..expired);
        if v.len() < self.max_per_node {
            v.push((lane, now));
        }
    }

    /// An idle connection to `key` opened by event loop `shard`.
    pub(crate) fn take(&self, shard: usize, key: &str) -> Option<Box<T>> {
        let now = Instant::now();
        let lists = &self.shards[shard % self.shards.len()];
        loop {
            // One connection at a time out of the map, checked outside its lock (the check
            // reads from the socket).
            let (mut lane, since) = lists.get_mut(key)?.pop()?;
            if now.duration_since(since) < self.timeout && lane.reusable() {
                lane.mark_reused();
                return Some(lane);
            }
        }
    }

    /// Drops expired and closed connections; forgets nodes with none left.
    fn prune(&self) {
        let now = Instant::now();
        for lists in &self.shards {
            lists.retain(|_, v| {
                v.retain_mut(|(lane, since)| {
                    now.duration_since(*since) < self.timeout && lane.reusable()
                });
                !v.is_empty()
            });
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .flat_map(|lists| lists.iter().map(|e| e.value().len()))
            .sum()
    }
}

/// The lane pool: hands out idle lanes or opens new ones.
pub struct Lanes {
    connector: Connector,
    connect_timeout: Duration,
    idle: Arc<Idle<Lane>>,
}

impl Lanes {
    /// A pool for `loops` event loops keeping at most `max_idle_per_node` idle lanes per loop
    /// and node, each for at most `idle_timeout`. Inside a runtime, also starts the reaper
    /// (it stops with the pool).
    pub fn new(
        connector: Connector,
        connect_timeout: Duration,
        loops: usize,
        max_idle_per_node: usize,
        idle_timeout: Duration,
    ) -> Lanes {
        let idle = Idle::new(loops, max_idle_per_node, idle_timeout);
        Lanes {
            connector,
            connect_timeout,
            idle,
        }
    }

    /// An idle lane of event loop `shard` to `upstream` (a base URL such as
    /// `http://10.0.0.5:8080`), or a new one.
    pub async fn get(&self, shard: usize, upstream: &str) -> Result<Box<Lane>, LaneError> {
        if let Some(lane) = self.idle.take(shard, upstream) {
            return Ok(lane);
        }
        self.connect(shard, upstream).await
    }

    /// Opens a new lane to `upstream` on event loop `shard` (the caller's).
    pub async fn connect(&self, shard: usize, upstream: &str) -> Result<Box<Lane>, LaneError> {
        let open = async {
            let io = open(&self.connector, upstream).await?;
            http1::Builder::new()
                .handshake::<_, Body>(io)
                .await
                .map_err(|e| LaneError::Connect(e.to_string()))
        };
        let (send, conn) = tokio::time::timeout(self.connect_timeout, open)
            .await
            .map_err(|_| LaneError::Connect("connect timed out".into()))??;
        Ok(Box::new(Lane {
            send,
            conn: Some(conn),
            key: Arc::from(upstream),
            shard,
            reused: false,
        }))
    }

    /// Wraps a response body so that it drives `lane` and gives it back when it ends.
    /// The response body `inner` that arrived on `lane`, for a request whose body, if it had
    /// one, is `upload`.
    pub fn body(
        &self,
        inner: Incoming,
        lane: Box<Lane>,
        upload: Option<Arc<dyn Uploaded>>,
    ) -> LaneBody {
        LaneBody {
            inner,
            lane: Some(lane),
            home: Arc::downgrade(&self.idle),
            upload,
        }
    }

    /// Idle lanes in the pool (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.idle.len()
    }
}

impl Lane {
    /// Whether this lane came out of the pool rather than being opened for this request.
    pub fn reused(&self) -> bool {
        self.reused
    }
}

/// Opens a connection to `upstream` (a base URL such as `http://10.0.0.5:8080`): TCP, and
/// TLS for `https://`. The caller bounds it in time.
pub(crate) async fn open(connector: &Connector, upstream: &str) -> Result<Io, LaneError> {
    let uri: Uri = upstream
        .parse()
        .map_err(|_| LaneError::Connect(format!("bad upstream URL {upstream:?}")))?;
    let mut connector = connector.clone();
    std::future::poll_fn(|cx| connector.poll_ready(cx))
        .await
        .map_err(|e| LaneError::Connect(e.to_string()))?;
    connector.call(uri).await.map_err(|e| {
        let why = e.to_string();
        if is_local_shortage(&*e) {
            LaneError::Local(why)
        } else {
            LaneError::Connect(why)
        }
    })
}

/// Whether `e`, or an error it was caused by, is the router's own shortage rather than the
/// node's refusal: out of file descriptors (`EMFILE`, `ENFILE`), local ports
/// (`EADDRNOTAVAIL`), socket buffers (`ENOBUFS`) or memory. A burst of such connects (an
/// HTTP/2 client's 256 streams at once under a low `ulimit -n`) must not mark a healthy
/// node unhealthy and send its meetings' joins elsewhere.
pub(crate) fn is_local_shortage(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind;
            if matches!(
                io.kind(),
                ErrorKind::AddrNotAvailable | ErrorKind::OutOfMemory
            ) {
                return true;
            }
            #[cfg(target_os = "linux")]
            {
                use rustix::io::Errno;
                let short = [Errno::MFILE, Errno::NFILE, Errno::NOBUFS];
                if short
                    .iter()
                    .any(|s| io.raw_os_error() == Some(s.raw_os_error()))
                {
                    return true;
                }
            }
        }
        cur = err.source();
    }
    false
}

async fn reap<T: Pooled + Send + Sync + 'static>(idle: Weak<Idle<T>>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        match idle.upgrade() {
            Some(idle) => idle.prune(),
            None => return,
        }
    }
}

/// How far a request's body has gone to the node: whether all of it was sent.
pub trait Uploaded: Send + Sync {
    fn whole(&self) -> bool;
}

/// A response body that drives its lane's connection while it is read and returns the lane
/// to the pool once it has ended.
pub struct LaneBody {
    inner: Incoming,
    lane: Option<Box<Lane>>,
    home: Weak<Idle<Lane>>,
    /// The request's body, if it had one.
    upload: Option<Arc<dyn Uploaded>>,
}

impl LaneBody {
    /// Gives the lane back, unless the node answered before it had the whole request body
    /// (an early `401` or `413`): the connection is still sending it, and in the pool
    /// nobody would drive it, so the client's upload (and its connection) would hang until
    /// the lane was taken or pruned. Dropped instead: the node connection closes, and so,
    /// after the answer, does the client's, whose unread body is still on it.
    fn release(&mut self) {
        let lane = self.lane.take();
        if self.upload.as_ref().is_some_and(|u| !u.whole()) {
            return;
        }
        if let (Some(lane), Some(home)) = (lane, self.home.upgrade()) {
            home.put(lane);
        }
    }
}

impl HttpBody for LaneBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        // Ask first: the connection hands body data over only once the body has asked for
        // it, so driving it before asking would cost a second trip through the scheduler.
        let mut r = Pin::new(&mut this.inner).poll_frame(cx);
        if r.is_pending() {
            if let Some(lane) = &mut this.lane {
                lane.drive(cx);
                r = Pin::new(&mut this.inner).poll_frame(cx);
            }
        }
        match &r {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.lane = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LaneBody {
    /// A body dropped once it has ended (hyper drops bodies it knows are over without
    /// polling them) gives its lane back; one dropped midway closes the connection.
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in connection: its node, a name, and whether it is still open.
    struct Fake {
        key: Arc<str>,
        shard: usize,
        name: &'static str,
        open: bool,
    }

    impl Pooled for Fake {
        fn key(&self) -> &Arc<str> {
            &self.key
        }
        fn shard(&self) -> usize {
            self.shard
        }
        fn reusable(&mut self) -> bool {
            self.open
        }
        fn mark_reused(&mut self) {}
    }

    fn conn(node: &str, name: &'static str) -> Box<Fake> {
        Box::new(Fake {
            key: Arc::from(node),
            shard: 0,
            name,
            open: true,
        })
    }

    #[test]
    fn the_connection_used_last_goes_out_first_and_only_to_its_own_node() {
        let idle = Idle::new(1, 8, Duration::from_secs(60));
        idle.put(conn("n1", "a"));
        idle.put(conn("n1", "b"));
        idle.put(conn("n2", "c"));
        assert_eq!(idle.take(0, "n1").unwrap().name, "b");
        assert_eq!(idle.take(0, "n1").unwrap().name, "a");
        assert!(idle.take(0, "n1").is_none());
        assert_eq!(idle.take(0, "n2").unwrap().name, "c");
    }

    #[test]
    fn a_node_keeps_at_most_its_cap_and_a_closed_connection_is_never_handed_out() {
        let idle = Idle::new(1, 2, Duration::from_secs(60));
        idle.put(conn("n1", "a"));
        let mut closed = conn("n1", "b");
        closed.open = false;
        idle.put(closed);
        idle.put(conn("n1", "over the cap"));
        assert_eq!(idle.len(), 2);
        assert_eq!(idle.take(0, "n1").unwrap().name, "a", "b was closed");
        assert!(idle.take(0, "n1").is_none());
    }

    #[test]
    fn expired_connections_give_up_their_places_under_the_cap() {
        let idle = Idle::new(1, 2, Duration::from_millis(200));
        idle.put(conn("n1", "old 1"));
        idle.put(conn("n1", "old 2"));
        std::thread::sleep(Duration::from_millis(250));
        // Both old ones have expired: the new ones take their places instead of being
        // turned away by a full list.
        idle.put(conn("n1", "new 1"));
        idle.put(conn("n1", "new 2"));
        assert_eq!(idle.len(), 2);
        assert_eq!(idle.take(0, "n1").unwrap().name, "new 2");
        assert_eq!(idle.take(0, "n1").unwrap().name, "new 1");
        assert!(idle.take(0, "n1").is_none());
    }

    #[test]
    fn a_connection_goes_back_to_the_event_loop_that_opened_it_and_only_that_one_takes_it() {
        let idle = Idle::new(3, 2, Duration::from_secs(60));
        let mut on_loop_2 = conn("n1", "opened by loop 2");
        on_loop_2.shard = 2;
        idle.put(on_loop_2);
        idle.put(conn("n1", "opened by loop 0"));
        assert!(idle.take(1, "n1").is_none(), "loop 1 opened none");
        assert_eq!(idle.take(2, "n1").unwrap().name, "opened by loop 2");
        assert!(idle.take(2, "n1").is_none());
        assert_eq!(idle.take(0, "n1").unwrap().name, "opened by loop 0");
        // The cap counts per loop: each loop keeps its own.
        for shard in 0..3 {
            for _ in 0..3 {
                let mut c = conn("n1", "x");
                c.shard = shard;
                idle.put(c);
            }
        }
        assert_eq!(idle.len(), 6);
    }
}
