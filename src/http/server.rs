//! The accept loop: connection limit, TLS handshake timeout, header size, read and write
//! timeouts, HTTP/1.1 and HTTP/2 (idle HTTP/2 connections closed), graceful shutdown.
//! Everything a client can hold open is bounded in size and time. Plain (`serve`), TLS
//! (`serve_tls`, also the mTLS node listener) and the HTTP-to-HTTPS redirect listener share
//! it; `serve_configured` starts the listeners the config asks for. The front door's
//! connections are served on `server.event_loops()` event loops (`loops`: loop 0 accepts and
//! hands each to the loop with the fewest open), under one count of connection slots; the
//! other listeners run on one.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_io_timeout::TimeoutStream;
use tokio_rustls::TlsAcceptor;

use super::h1::{self, BoxIo, Outcome, Rewind};
use super::idle::Streams;
use super::loops::{self, Handed, Handoff, Inbox, Open, Stop};
use super::sniff;
use super::{handle, tls, ApiError, App, Body};
use crate::config::ServerConfig as ServerLimits;
use crate::room::RoomKey;
use crate::store::PinStore;

/// What the accept loop knows about a connection; handlers find it in the request's
/// extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's address as a header value (proxy mode's `X-Forwarded-For`), made once per
    /// connection.
    pub peer_ip: HeaderValue,
    /// The connection is TLS (the front door's scheme is `https`).
    pub tls: bool,
    /// The client's verified end-entity certificate (mTLS listener only).
    pub client_cert: Option<CertificateDer<'static>>,
    /// The connection's slot under `server.max_connections`; a WebSocket tunnel keeps it
    /// after the HTTP connection has handed its socket over.
    pub slot: Option<Arc<OwnedSemaphorePermit>>,
    /// The event loop serving the connection (`loops`; 0 with the shared runtime): the
    /// shard of the proxy's connection pools its requests use.
    pub event_loop: usize,
    /// The room a proxied join was last admitted for on this connection, shared by the
    /// connection's requests.
    pub joined: Arc<JoinedRoom>,
    /// The end of the shutdown grace: a WebSocket tunnel the connection hands its socket to
    /// closes then too.
    pub grace_over: GraceOver,
}

/// The end of `server.shutdown_grace` as one event loop's connections hear it: whatever is
/// still open then (a connection mid-response, a WebSocket tunnel) is closed, so that a
/// drained server holds no connection on. Held for as long as what it closes lives: the
/// drain waits, up to the grace, until none is left.
#[derive(Debug, Clone)]
pub struct GraceOver(watch::Receiver<bool>);

impl GraceOver {
    /// Resolves when the grace is over, or when the loop that served the connection is gone.
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|over| *over).await;
    }
}

/// The room a connection's last admitted proxied join was for, as a hash keyed by the
/// connection's own random key: not the room's placement hash, which anyone can compute, so
/// that no one can name a second room that passes for the first (a 64-bit hash pair is
/// within reach of a birthday search) and have its joins skip `join_limit` as the first
/// room's session.
#[derive(Debug, Default)]
pub struct JoinedRoom {
    key: std::hash::RandomState,
    /// The keyed hash with its low bit set; 0: none yet.
    hash: AtomicU64,
}

impl JoinedRoom {
    fn tag(&self, room: &RoomKey) -> u64 {
        use std::hash::BuildHasher;
        self.key.hash_one(room.as_str()) | 1
    }
}

impl ConnInfo {
    /// Whether this connection already carried an admitted proxied join for `room`: its
    /// later requests (a page's assets, polls, a reload on the same keep-alive connection)
    /// are the same participant's session, not new joins.
    pub fn joined(&self, room: &RoomKey) -> bool {
        self.joined.hash.load(Ordering::Relaxed) == self.joined.tag(room)
    }

    /// Records that a proxied join for `room` was admitted on this connection.
    pub fn set_joined(&self, room: &RoomKey) {
        self.joined
            .hash
            .store(self.joined.tag(room), Ordering::Relaxed);
    }
}

type BoxFut = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
/// A request handler shared by every connection of a listener.
type Handler = Arc<dyn Fn(Request<Incoming>, ConnInfo) -> BoxFut + Send + Sync>;

/// What a connection's fast phase hands back: the connection, and how the phase ended.
type FastEnd = (BoxIo, ConnInfo, Outcome);
/// The HTTP/1.1 fast path (`h1`) a listener runs each connection through before hyper.
type FastPath = Arc<
    dyn Fn(BoxIo, ConnInfo, watch::Receiver<bool>) -> Pin<Box<dyn Future<Output = FastEnd> + Send>>
        + Send
        + Sync,
>;

/// What every accept loop of one listener shares: how a connection is served, and the
/// listener's connection slots (`server.max_connections` counts across all its loops).
#[derive(Clone)]
struct Front {
    tls: Option<TlsAcceptor>,
    handler: Handler,
    fast: Option<FastPath>,
    slots: Arc<Semaphore>,
}

impl Front {
    fn new(
        tls: Option<TlsAcceptor>,
        handler: Handler,
        fast: Option<FastPath>,
        cfg: &ServerLimits,
    ) -> Front {
        let slots = Arc::new(Semaphore::new(cfg.max_connections));
        Front {
            tls,
            handler,
            fast,
            slots,
        }
    }

    fn for_app<S: PinStore>(app: &Arc<App<S>>, tls: Option<TlsAcceptor>) -> Front {
        let fast = app_fast_path(app);
        Front::new(tls, app_handler(app.clone()), fast, &app.cfg.server)
    }
}

/// Serves `app` on `listener` (plain HTTP) until `shutdown` resolves, then lets open
/// connections finish for up to `server.shutdown_grace`.
pub async fn serve<S: PinStore>(
    app: Arc<App<S>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let limits = app.cfg.server.clone();
    let front = Front::for_app(&app, None);
    on_loops(listener, limits.event_loops(), limits, front, shutdown).await
}

/// Serves `app` over TLS with `config` (see [`tls::server_config`]) as the front door.
pub async fn serve_tls<S: PinStore>(
    app: Arc<App<S>>,
    listener: TcpListener,
    config: Arc<ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let limits = app.cfg.server.clone();
    let front = Front::for_app(&app, Some(TlsAcceptor::from(config)));
    on_loops(listener, limits.event_loops(), limits, front, shutdown).await
}

/// Runs `front`'s accept loop for `listener` on `loops` event loops: loop 0 accepts and
/// hands each connection to the loop with the fewest open ones (`loops`).
async fn on_loops(
    listener: TcpListener,
    loops: usize,
    limits: ServerLimits,
    front: Front,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    if loops <= 1 {
        return accept_loop(listener, &limits, front, None, shutdown).await;
    }
    let (l0, f0) = (limits.clone(), front.clone());
    loops::run(
        loops,
        shutdown,
        move |handoff, stop| async move {
            accept_loop(listener, &l0, f0, Some(handoff), stop.wait()).await
        },
        move |inbox, index, stop| {
            let (limits, front) = (limits.clone(), front.clone());
            async move { serve_handed(inbox, &limits, front, index, stop).await }
        },
    )
    .await
}

/// Answers every plain-HTTP request with `308` to the same host and path over HTTPS on
/// `https_port`.
pub async fn serve_https_redirect(
    listener: TcpListener,
    https_port: u16,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let handler: Handler = Arc::new(move |req, _| {
        let r = https_redirect(&req, https_port).unwrap_or_else(ApiError::into_response);
        Box::pin(async move { r })
    });
    let front = Front::new(None, handler, None, &limits);
    accept_loop(listener, &limits, front, None, shutdown).await
}

fn https_redirect(req: &Request<Incoming>, port: u16) -> Result<Response<Body>, ApiError> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .ok_or_else(|| ApiError::InvalidRequest("a Host header is required".into()))?;
    let authority: http::uri::Authority = host
        .parse()
        .map_err(|_| ApiError::InvalidRequest("invalid Host header".into()))?;
    let mut loc = format!("https://{}", authority.host());
    if port != 443 {
        loc.push_str(&format!(":{port}"));
    }
    loc.push_str(
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/"),
    );
    let mut r = Response::new(super::full(bytes::Bytes::new()));
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    r.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&loc)
            .map_err(|_| ApiError::InvalidRequest("unrepresentable location".into()))?,
    );
    Ok(r)
}

fn app_handler<S: PinStore>(app: Arc<App<S>>) -> Handler {
    Arc::new(move |mut req, info| {
        let app = app.clone();
        let peer = info.peer;
        req.extensions_mut().insert(info);
        Box::pin(handle(app, req, peer))
    })
}

/// The fast path for `app`'s listeners, unless `server.fast_path` turns it off.
fn app_fast_path<S: PinStore>(app: &Arc<App<S>>) -> Option<FastPath> {
    if !app.cfg.server.fast_path {
        return None;
    }
    let app = app.clone();
    Some(Arc::new(move |mut io, info, stop| {
        let app = app.clone();
        Box::pin(async move {
            let outcome = h1::serve(&app, &mut io, &info, stop).await;
            (io, info, outcome)
        })
    }))
}

fn builder(cfg: &ServerLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Accepts connections on `listener` until `shutdown`, serving each in a task of its own
/// on this event loop (0) or, with a `handoff`, on the loop that has the fewest open; then
/// drains this loop's connections for up to `server.shutdown_grace`.
async fn accept_loop(
    listener: TcpListener,
    cfg: &ServerLimits,
    front: Front,
    handoff: Option<Handoff>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = front.slots.clone();
    let here = LoopServer::new(cfg, front, 0);
    tokio::pin!(shutdown);
    // The stop comes first: an unbiased `select!` could still take a waiting connection
    // after it, and hand it to a loop that takes no more (it would come back here).
    loop {
        let permit = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Some(handoff) = &handoff else {
            here.spawn(stream, peer, permit, None);
            continue;
        };
        let to = handoff.pick();
        let open = handoff.opened(to);
        if to == 0 {
            here.spawn(stream, peer, permit, Some(open));
            continue;
        }
        let handed = match stream.into_std() {
            Ok(stream) => handoff.send(
                to,
                Handed {
                    stream,
                    peer,
                    permit,
                    open,
                },
            ),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection lost before its hand-over");
                continue;
            }
        };
        // That loop has ended (it failed; everything stops soon) or is stopping (this one is
        // too, then): serve it here.
        if let Err(back) = handed {
            here.adopt(back);
        }
    }
    drop(listener);
    here.drain(cfg.shutdown_grace).await;
    Ok(())
}

/// Event loop `index` (1..): serves the connections loop 0 hands it until `stop`, then
/// drains them for up to `server.shutdown_grace`.
///
/// Connections still in the inbox at the stop are served too, and drained with the rest:
/// as any connection whose request the stop finds unread, they are closed at once (see
/// `serve_io`). Left in the inbox, they were closed only when the drain ended, their clients
/// having waited as long as the drain's busiest connection. The inbox is closed first, so
/// that a connection loop 0 hands over later comes back to it, to be served there.
async fn serve_handed(
    mut inbox: Inbox,
    cfg: &ServerLimits,
    front: Front,
    index: usize,
    stop: Stop,
) -> std::io::Result<()> {
    let here = LoopServer::new(cfg, front, index);
    let stop = stop.wait();
    tokio::pin!(stop);
    loop {
        let handed = tokio::select! {
            h = inbox.recv() => match h { Some(h) => h, None => break },
            () = &mut stop => break,
        };
        here.adopt(handed);
    }
    inbox.close();
    // Until `None`: a hand-over under way when the inbox closed still arrives.
    while let Some(handed) = inbox.recv().await {
        here.adopt(handed);
    }
    here.drain(cfg.shutdown_grace).await;
    Ok(())
}

/// How long the drain waits, after the grace, for the connections it closed to be gone.
const CLOSING: Duration = Duration::from_secs(1);

/// One event loop's side of serving connections: each in a task of this loop, which all
/// stop together at the drain.
struct LoopServer {
    front: Front,
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// Counts the connections for the drain to wait on: each holds a watcher from the start.
    graceful: GracefulShutdown,
    /// Tells connections to stop between requests, in their fast phase and in hyper's (which
    /// shuts them down gracefully: see `close_when_stopped` and `close_when_idle`).
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    /// Tells every connection, and every tunnel, still open when the grace is over to close;
    /// its receivers count them, for the drain to wait on.
    grace_over: watch::Sender<bool>,
    event_loop: usize,
    timeouts: ConnTimeouts,
}

/// The time limits `server` sets on each connection beyond hyper's own.
#[derive(Debug, Clone, Copy)]
struct ConnTimeouts {
    /// `server.header_read_timeout`: for the TLS handshake and for the first bytes, until
    /// the protocol is known.
    first_bytes: Duration,
    /// `server.h2_idle_timeout`.
    h2_idle: Duration,
    /// `server.send_timeout`: the fast path bounds each write to the client with it; under
    /// hyper, every write goes through a [`TimeoutStream`] with this write timeout.
    send: Duration,
}

impl LoopServer {
    fn new(cfg: &ServerLimits, front: Front, event_loop: usize) -> LoopServer {
        let (stop_tx, stop_rx) = watch::channel(false);
        LoopServer {
            front,
            builder: Arc::new(builder(cfg)),
            graceful: GracefulShutdown::new(),
            stop_tx,
            stop_rx,
            grace_over: watch::channel(false).0,
            event_loop,
            timeouts: ConnTimeouts {
                first_bytes: cfg.header_read_timeout,
                h2_idle: cfg.h2_idle_timeout,
                send: cfg.send_timeout,
            },
        }
    }

    /// Serves `stream` in a task of this loop; `open` counts it as this loop's while it lasts.
    fn spawn(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        open: Option<Open>,
    ) {
        let (builder, watcher) = (self.builder.clone(), self.graceful.watcher());
        let (tls, handler) = (self.front.tls.clone(), self.front.handler.clone());
        let (fast, stop) = (self.front.fast.clone(), self.stop_rx.clone());
        let (timeouts, event_loop) = (self.timeouts, self.event_loop);
        let grace_over = GraceOver(self.grace_over.subscribe());
        let cut = grace_over.clone();
        let serve = async move {
            let mut info = ConnInfo {
                peer,
                // An IPv4 client of a dual-stack (`[::]`) listener as IPv4 (`::ffff:10.0.0.7`
                // is `10.0.0.7`): nodes' allow-lists and logs know it that way.
                peer_ip: HeaderValue::try_from(peer.ip().to_canonical().to_string())
                    .expect("an IP address is a valid header value"),
                tls: tls.is_some(),
                client_cert: None,
                slot: Some(Arc::new(permit)),
                event_loop,
                joined: Arc::default(),
                grace_over,
            };
            match tls {
                None => {
                    let io = (stream, timeouts);
                    serve_io(&builder, io, info, handler, watcher, fast, stop).await
                }
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    let handshake = tokio::time::timeout(timeouts.first_bytes, handshake);
                    // A connection that has not finished its handshake when the server
                    // stops has asked for nothing yet: closed, not waited for.
                    let mut stopping = stop.clone();
                    let shook = tokio::select! {
                        biased;
                        r = handshake => r,
                        _ = stopping.wait_for(|s| *s) => return,
                    };
                    match shook {
                        Ok(Ok(s)) => {
                            info.client_cert = s
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| c.clone().into_owned());
                            // HTTP/2 (by ALPN) is hyper's alone.
                            let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                            let fast = fast.filter(|_| !h2);
                            let io = (s, timeouts);
                            serve_io(&builder, io, info, handler, watcher, fast, stop).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        };
        tokio::spawn(async move {
            let _open = open;
            tokio::select! {
                () = serve => {}
                () = cut.wait() => tracing::debug!(%peer, "grace period over; connection closed"),
            }
        });
    }

    /// Serves a connection loop 0 handed over, registering its socket with this loop's
    /// driver.
    fn adopt(&self, h: Handed) {
        match TcpStream::from_std(h.stream) {
            Ok(stream) => self.spawn(stream, h.peer, h.permit, Some(h.open)),
            Err(e) => tracing::warn!(peer = %h.peer, error = %e, "cannot serve a connection"),
        }
    }

    /// Stops this loop's connections between requests and waits up to `grace` for them and
    /// for the WebSocket tunnels they opened; then closes those still open.
    async fn drain(self, grace: Duration) {
        let _ = self.stop_tx.send(true);
        let event_loop = self.event_loop;
        tracing::info!(event_loop, "shutting down: waiting for open connections");
        // Every connection task and every tunnel holds a `GraceOver` while it lives.
        let grace_over = self.grace_over;
        let all_closed = async {
            self.graceful.shutdown().await;
            grace_over.closed().await;
        };
        tokio::pin!(all_closed);
        tokio::select! {
            () = &mut all_closed => tracing::info!(event_loop, "all connections closed"),
            () = tokio::time::sleep(grace) => {
                tracing::warn!(event_loop, "grace period over; closing remaining connections");
                grace_over.send_replace(true);
                // Each closes when its task next runs: at once, unless the loop is starved.
                if tokio::time::timeout(CLOSING, all_closed).await.is_err() {
                    tracing::warn!(event_loop, "connections still closing; not waiting for them");
                }
            }
        }
    }
}

/// A connection's own socket: what [`reset`] needs once the connection is boxed.
trait Socket {
    #[cfg(unix)]
    fn raw_socket(&self) -> std::os::fd::RawFd;
}

impl Socket for TcpStream {
    #[cfg(unix)]
    fn raw_socket(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

impl Socket for tokio_rustls::server::TlsStream<TcpStream> {
    #[cfg(unix)]
    fn raw_socket(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self.get_ref().0)
    }
}

/// An HTTP/1 connection on hyper's path that lingers when it closes over unread bytes, as
/// the fast path does ([`h1::linger`]): hyper answers a request it refused before reading
/// its body (a `413`, a `401`) and closes, and Linux resets a socket closed with unread
/// bytes, so a client still sending its body got `ECONNRESET` instead of the answer. On
/// drop, a connection whose client has not closed its side (no read has met the end of
/// the stream) is handed to a task that shuts its write side and reads on, within
/// [`h1::linger`]'s bounds, holding the connection's slot; one the client closed, or
/// whose writes failed (a client that stopped reading, cut by the send timeout), closes at
/// once. Whether bytes are waiting at that instant (`FIONREAD`) is no test: hyper may just
/// have drained them, and the client's next write then met a closed socket and a reset.
#[cfg(unix)]
struct Lingering {
    io: Option<BoxIo>,
    /// The connection's slot under `server.max_connections`, held while the socket
    /// lingers: else lingering sockets, slot-free, would grow with the accept rate (2 s of
    /// accepts, in descriptors and buffers) whatever the limit says.
    slot: Option<Arc<OwnedSemaphorePermit>>,
    send: Duration,
    /// A read met the end of the stream: the client closed its side and sends nothing more.
    eof: bool,
    /// A write failed (timed out: a client that stopped reading; or the peer is gone):
    /// such a connection is cut, not lingered over.
    broken: bool,
}

#[cfg(unix)]
impl Lingering {
    fn io(&mut self) -> Pin<&mut BoxIo> {
        Pin::new(self.io.as_mut().expect("taken only on drop"))
    }

    /// Notes a write side's failure ([`Lingering::broken`]).
    fn wrote<T>(&mut self, polled: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if matches!(polled, Poll::Ready(Err(_))) {
            self.broken = true;
        }
        polled
    }
}

#[cfg(unix)]
impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let (before, room) = (buf.filled().len(), buf.remaining());
        let polled = self.io().poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && room > 0 && buf.filled().len() == before {
            self.eof = true;
        }
        polled
    }
}

#[cfg(unix)]
impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = self.io().poll_write(cx, buf);
        self.wrote(polled)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = self.io().poll_write_vectored(cx, bufs);
        self.wrote(polled)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let polled = self.io().poll_flush(cx);
        self.wrote(polled)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let polled = self.io().poll_shutdown(cx);
        self.wrote(polled)
    }
}

#[cfg(unix)]
impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut io) = self.io.take() else {
            return;
        };
        if self.eof || self.broken {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let send = self.send;
        let slot = self.slot.take();
        rt.spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _slot = slot;
            // hyper may have shut the write side already; a second shutdown's error, or
            // one that cannot finish (a TLS close the client does not read), still leaves
            // the bytes in flight to be read and dropped. Bounded as the linger is: a
            // closing socket holds its slot a moment, not a whole send timeout more.
            let _ = tokio::time::timeout(send.min(h1::LINGER), io.shutdown()).await;
            h1::linger(&mut io).await;
        });
    }
}

/// Closes `io`, whose socket is `socket`, with a reset (`SO_LINGER` 0) rather than a FIN.
#[cfg(unix)]
fn reset(io: BoxIo, socket: std::os::fd::RawFd) {
    // SAFETY: `socket` is the descriptor of the socket `io` owns, open until `io` is
    // dropped below.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(socket) };
    if let Err(e) = rustix::net::sockopt::set_socket_linger(fd, Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "could not set the socket to reset on close");
    }
    drop(io);
}

/// Serves one connection, `(io, timeouts)`: the fast path first when there is one, then
/// hyper once the protocol is known (see [`sniff`]); an HTTP/2 connection is shut
/// down once idle (see [`idle`](super::idle)).
async fn serve_io<I>(
    builder: &auto::Builder<TokioExecutor>,
    (io, timeouts): (I, ConnTimeouts),
    info: ConnInfo,
    handler: Handler,
    watcher: Watcher,
    fast: Option<FastPath>,
    stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + Socket + 'static,
{
    #[cfg(unix)]
    let socket = io.raw_socket();
    let mut io: BoxIo = Box::new(io);
    let mut info = info;
    let mut prefix = Bytes::new();
    if let Some(fast) = fast {
        match fast(io, info, stop.clone()).await {
            (_, _, Outcome::Closed) => return,
            #[cfg(unix)]
            (io, _, Outcome::Cut) => return reset(io, socket),
            #[cfg(not(unix))]
            (_, _, Outcome::Cut) => return,
            (i, inf, Outcome::Handoff(p)) => (io, info, prefix) = (i, inf, p),
        }
    }
    // As in the handshake: a connection that has not told its protocol when the server
    // stops is closed, not waited for.
    let mut stopping = stop.clone();
    let sniffed = tokio::select! {
        biased;
        p = sniff::protocol_bytes(&mut io, prefix, timeouts.first_bytes) => p,
        _ = stopping.wait_for(|s| *s) => return,
    };
    let Some(prefix) = sniffed else {
        tracing::debug!(peer = %info.peer, "no request within the header timeout; closed");
        return;
    };
    let peer = info.peer;
    // hyper has no write timeout: a client that stops reading would keep its connection.
    let mut io = TimeoutStream::new(io);
    io.set_write_timeout(Some(timeouts.send));
    let io: BoxIo = Box::new(Box::pin(io));
    // HTTP/2 (prior knowledge, or TLS with ALPN `h2`: both open with the preface) counts its
    // open streams; HTTP/1.1's idle time is hyper's header timeout.
    let streams = sniff::is_h2(&prefix).then(Streams::new);
    #[cfg(unix)]
    let io: BoxIo = match streams {
        Some(_) => io,
        None => Box::new(Lingering {
            io: Some(io),
            slot: info.slot.clone(),
            send: timeouts.send,
            eof: false,
            broken: false,
        }),
    };
    let counted = streams.clone();
    let draining = stop.clone();
    let svc = service_fn(move |req| {
        let stream = counted.as_ref().map(Streams::open);
        let fut = handler(req, info.clone());
        let draining = draining.clone();
        async move {
            let mut resp = fut.await;
            // Once the drain has begun, an HTTP/1 answer says `connection: close`, as hyper's
            // graceful shutdown makes it do: also one written before that shutdown reaches
            // its connection (one the fast path handed over after the drain began, answered
            // within hyper's first poll: see `close_when_stopped`).
            if stream.is_none()
                && *draining.borrow()
                && resp.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                let close = HeaderValue::from_static("close");
                resp.headers_mut().insert(header::CONNECTION, close);
            }
            Ok::<_, Infallible>(match stream {
                Some(guard) => resp.map(|body| Streams::hold(guard, body)),
                None => resp,
            })
        }
    });
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(Rewind::new(io, prefix)), svc)
        .into_owned();
    let ended = match streams {
        None => {
            // Counted by the drain while it lives; the drain's signal comes through `stop`.
            let _watcher = watcher;
            let shut_down = |c: Pin<&mut _>| auto::UpgradeableConnection::graceful_shutdown(c);
            close_when_stopped(conn, shut_down, stop).await
        }
        Some(streams) => {
            // Counted by the drain while it lives; the drain's signal comes through `stop`.
            let _watcher = watcher;
            let shut_down = |c: Pin<&mut _>| auto::UpgradeableConnection::graceful_shutdown(c);
            let limits = (timeouts.h2_idle, timeouts.send);
            close_when_idle(conn, shut_down, &streams, limits, stop, peer).await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Drives an HTTP/1 connection to its end, shutting it down gracefully (the request it is
/// reading is answered with `connection: close`; an idle connection closes) when the server
/// drains (`stop`), but never before its first poll: hyper-util's `auto` connection starts
/// by telling the protocol from the bytes [`sniff`] read, and a shutdown before then
/// cancels it outright. hyper-util's watcher (`Watcher::watch`) did that to a connection
/// handed over after the drain began (the fast path's, with a head that was still arriving
/// when it began): its client got a close and no answer. The first poll reads the protocol
/// from bytes already there, and may answer a request whole before the shutdown: the
/// service adds the `connection: close` then.
async fn close_when_stopped<C, E>(
    conn: C,
    shut_down: impl Fn(Pin<&mut C>),
    mut stop: watch::Receiver<bool>,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    let first = std::future::poll_fn(|cx| Poll::Ready(conn.as_mut().poll(cx))).await;
    if let Poll::Ready(r) = first {
        return r;
    }
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => return r,
            r = stop.wait_for(|s| *s), if !closing => {
                let _ = r;
                closing = true;
                shut_down(conn.as_mut());
            }
        }
    }
}

/// Drives an HTTP/2 connection to its end, shutting it down gracefully (GOAWAY; open
/// streams finish) when `streams` has been idle for `idle_limit` or the server drains
/// (`stop`). Dropped outright (`send` = `server.send_timeout`) when a stream's client has
/// taken nothing for `send` ([`Streams::stalled`]: HTTP/2's flow control stalls a response
/// without blocking a write, so the write timeout cannot tell), or when an idle connection
/// shut down gracefully has not closed `send` later (h2 closes once its shutdown PING is
/// answered, and a client that never answers it, yet answers keep-alive PINGs, would keep
/// the connection and may still open streams).
async fn close_when_idle<C, E>(
    conn: C,
    shut_down: impl Fn(Pin<&mut C>),
    streams: &Streams,
    (idle_limit, send): (Duration, Duration),
    mut stop: watch::Receiver<bool>,
    peer: SocketAddr,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    let idle = streams.idle(idle_limit);
    tokio::pin!(idle);
    let stalled = streams.stalled(send);
    tokio::pin!(stalled);
    // Armed when an idle connection is shut down.
    let overdue = tokio::time::sleep(send);
    tokio::pin!(overdue);
    let (mut closing, mut idled) = (false, false);
    loop {
        tokio::select! {
            r = conn.as_mut() => return r,
            () = &mut stalled => {
                tracing::debug!(%peer, "an HTTP/2 client took nothing of a response for the send timeout; connection closed");
                return Ok(());
            }
            () = &mut overdue, if idled => {
                tracing::debug!(%peer, "an idle HTTP/2 connection did not close after GOAWAY; closed");
                return Ok(());
            }
            () = &mut idle, if !closing => {
                tracing::debug!(%peer, "HTTP/2 connection idle; shutting it down");
                closing = true;
                idled = true;
                overdue.as_mut().reset(tokio::time::Instant::now() + send);
                shut_down(conn.as_mut());
            }
            r = stop.wait_for(|s| *s), if !closing => {
                let _ = r;
                closing = true;
                shut_down(conn.as_mut());
            }
        }
    }
}

/// Serves `app` on the bound `main` listener and starts every other listener the config asks
/// for, until `shutdown` resolves: `main` speaks HTTPS when `tls.cert_file` is set (else
/// HTTP); `tls.redirect_listen` redirects HTTP to HTTPS; `tls.node_listen` requires client
/// certificates (nodes and admins). The certificate reloads on SIGHUP and when its files
/// change.
pub async fn serve_configured<S: PinStore>(
    app: Arc<App<S>>,
    main: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let cfg = app.cfg.clone();
    let (Some(cert), Some(key)) = (&cfg.tls.cert_file, &cfg.tls.key_file) else {
        return serve(app, main, shutdown).await;
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = move || {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    };
    let certs = tls::CertReloader::new(cert, key).map_err(std::io::Error::other)?;
    certs.clone().watch(cfg.tls.reload_interval, stop());
    let mut tasks = tokio::task::JoinSet::new();
    let https_port = main.local_addr()?.port();
    let sc = tls::server_config(certs.clone(), None).map_err(std::io::Error::other)?;
    tasks.spawn(serve_tls(app.clone(), main, sc, stop()));
    if let Some(addr) = cfg.tls.redirect_listen {
        let l = bind_for("tls.redirect_listen", addr).await?;
        tracing::info!(addr = %l.local_addr()?, "redirecting HTTP to HTTPS");
        tasks.spawn(serve_https_redirect(
            l,
            https_port,
            cfg.server.clone(),
            stop(),
        ));
    }
    if let (Some(addr), Some(ca)) = (cfg.tls.node_listen, &cfg.tls.client_ca_file) {
        let roots = tls::load_roots(ca).map_err(std::io::Error::other)?;
        let sc = tls::server_config(certs, Some(roots)).map_err(std::io::Error::other)?;
        let l = bind_for("tls.node_listen", addr).await?;
        tracing::info!(addr = %l.local_addr()?, "node listener (client certificates required)");
        // The node listener is light (heartbeats): one loop.
        let front = Front::for_app(&app, Some(TlsAcceptor::from(sc)));
        tasks.spawn(on_loops(l, 1, cfg.server.clone(), front, stop()));
    }
    // Every listener stops when `shutdown` resolves; an error in one stops the rest.
    tokio::pin!(shutdown);
    let mut result = Ok(());
    loop {
        tokio::select! {
            _ = &mut shutdown, if !*tx.borrow() => { let _ = tx.send(true); }
            r = tasks.join_next() => match r {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => { result = result.and(Err(e)); let _ = tx.send(true); }
                Some(Err(e)) => { result = result.and(Err(std::io::Error::other(e))); let _ = tx.send(true); }
            },
        }
    }
    result
}

/// Binds the listener `key` configures, an error naming both (a bare "address in use" left
/// an operator guessing which of the router's listeners it was).
async fn bind_for(key: &str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({key}): {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listener_that_cannot_bind_says_which_it_is() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let e = bind_for("tls.redirect_listen", addr).await.unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("tls.redirect_listen") && m.contains(&addr.to_string()),
            "{m}"
        );
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    /// A front door (hyper's path) that answers `200 ok`, but holds `GET /busy` until `go`
    /// turns true; it tells `asked` each path it is asked for.
    fn holding_front(
        go: watch::Receiver<bool>,
        asked: mpsc::UnboundedSender<String>,
        cfg: &ServerLimits,
    ) -> Front {
        let handler: Handler = Arc::new(move |req, _info| {
            let (mut go, asked) = (go.clone(), asked.clone());
            let path = req.uri().path().to_string();
            Box::pin(async move {
                let busy = path == "/busy";
                let _ = asked.send(path);
                if busy {
                    let _ = go.wait_for(|go| *go).await;
                }
                Response::new(crate::http::full(Bytes::from_static(b"ok")))
            })
        });
        Front::new(None, handler, None, cfg)
    }

    /// A client that sent `GET path`, and its connection as loop 0 accepted it.
    async fn asking(
        listener: &TcpListener,
        path: &str,
    ) -> (TcpStream, (std::net::TcpStream, SocketAddr)) {
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: router.test\r\n\r\n");
        client.write_all(request.as_bytes()).await.unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        (client, (accepted.into_std().unwrap(), peer))
    }

    /// All the server sends until it closes the connection (a reset is a close), lowercase.
    async fn until_closed(client: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got).await;
        String::from_utf8_lossy(&got).to_lowercase()
    }

    fn answered_with_close(said: &str) -> bool {
        said.starts_with("http/1.1 200") && said.contains("connection: close")
    }

    /// Connections loop 0 handed to a loop that are still in its inbox when it is told to
    /// stop are served and drained with the rest: they are done at once, not held unanswered
    /// for as long as the drain waits for a busy connection. A connection handed over after
    /// that comes back to loop 0 (which serves it).
    #[tokio::test]
    async fn connections_still_in_a_loops_inbox_when_it_stops_are_served_with_the_rest() {
        const QUEUED: usize = 20;
        let cfg = ServerLimits {
            shutdown_grace: Duration::from_secs(30),
            ..ServerLimits::default()
        };
        let (go_tx, go) = watch::channel(false);
        let (asked_tx, mut asked) = mpsc::unbounded_channel();
        let front = holding_front(go, asked_tx, &cfg);
        let slots = front.slots.clone();
        let (handoff, mut inboxes) = Handoff::new(2);
        let hand = |(stream, peer)| Handed {
            stream,
            peer,
            permit: slots.clone().try_acquire_owned().unwrap(),
            open: handoff.opened(1),
        };
        let (stop_tx, stop) = Stop::by_hand();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let serving = serve_handed(inboxes.remove(0), &cfg, front, 1, stop);
        let clients = async {
            // A request still being answered when the stop comes: the drain waits for it.
            let (mut busy, accepted) = asking(&listener, "/busy").await;
            assert!(handoff.send(1, hand(accepted)).is_ok());
            let first = tokio::time::timeout(Duration::from_secs(5), asked.recv()).await;
            assert_eq!(first.unwrap().as_deref(), Some("/busy"));
            // Handed over, then the stop, before loop 1 runs again.
            let (mut waiting, mut accepted) = (Vec::new(), Vec::new());
            for _ in 0..QUEUED {
                let (client, a) = asking(&listener, "/queued").await;
                waiting.push(client);
                accepted.push(a);
            }
            for a in accepted {
                assert!(handoff.send(1, hand(a)).is_ok());
            }
            stop_tx.send_replace(true);
            for (i, client) in waiting.iter_mut().enumerate() {
                let said = tokio::time::timeout(Duration::from_secs(5), until_closed(client))
                    .await
                    .unwrap_or_else(|_| panic!("queued connection {i} left waiting"));
                // Answered if its request was read before the stop reached it, else closed
                // as one that had asked for nothing yet (see `serve_io`).
                assert!(said.is_empty() || answered_with_close(&said), "{said}");
            }
            let (_late, accepted) = asking(&listener, "/late").await;
            assert!(
                handoff.send(1, hand(accepted)).is_err(),
                "a stopped loop takes no more connections"
            );
            go_tx.send_replace(true);
            let said = until_closed(&mut busy).await;
            assert!(answered_with_close(&said), "{said}");
        };
        let both = async { tokio::join!(serving, clients) };
        let (served, ()) = tokio::time::timeout(Duration::from_secs(20), both)
            .await
            .expect("the loop ends once its connections are done");
        served.unwrap();
    }

    /// Once told to stop, loop 0 takes no more connections, not even one already waiting:
    /// it would hand it to a loop that stopped taking any.
    #[tokio::test]
    async fn a_stopped_accept_loop_takes_no_more_connections() {
        let cfg = ServerLimits::default();
        let (_go_tx, go) = watch::channel(true);
        let (asked_tx, _asked) = mpsc::unbounded_channel();
        // An unbiased `select!` took the waiting connection one time in four: 32 tries.
        for _ in 0..32 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            // One accepted first: the listener is known to be ready when the loop starts.
            let _first = TcpStream::connect(addr).await.unwrap();
            let _accepted = listener.accept().await.unwrap();
            let _waiting = TcpStream::connect(addr).await.unwrap();
            let (handoff, mut inboxes) = Handoff::new(2);
            // Loop 0 is the busier: what it accepts goes to loop 1.
            let _busy = handoff.opened(0);
            let front = holding_front(go.clone(), asked_tx.clone(), &cfg);
            let stopped = std::future::ready(());
            accept_loop(listener, &cfg, front, Some(handoff), stopped)
                .await
                .unwrap();
            assert!(
                inboxes[0].try_recv().is_err(),
                "a connection was accepted after the stop"
            );
        }
    }

    /// An idle HTTP/2 connection shut down gracefully whose client never lets it close
    /// (h2 waits for its shutdown PING's answer) is dropped `send_timeout` after the GOAWAY.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_that_does_not_close_after_goaway_is_dropped() {
        let streams = Streams::new();
        let (_stop_tx, stop) = watch::channel(false);
        let shut_downs = std::sync::atomic::AtomicUsize::new(0);
        let never = std::future::pending::<Result<(), ()>>();
        let limits = (Duration::from_secs(1), Duration::from_secs(5));
        let t0 = tokio::time::Instant::now();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let ended = tokio::time::timeout(
            Duration::from_secs(60),
            close_when_idle(
                never,
                |_| {
                    shut_downs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                },
                &streams,
                limits,
                stop,
                peer,
            ),
        )
        .await;
        assert_eq!(ended, Ok(Ok(())), "still open after a minute");
        assert_eq!(shut_downs.into_inner(), 1, "shut down gracefully first");
        assert_eq!(t0.elapsed(), Duration::from_secs(6), "idle 1 s, then 5 s");
    }

    /// A stream whose body handed hyper a frame and was not asked for the next one (its
    /// client grants no window) for `send_timeout` drops the connection; one asked again in
    /// time does not.
    #[tokio::test(start_paused = true)]
    async fn a_stream_its_client_stopped_taking_drops_the_connection() {
        use http_body_util::BodyExt;
        let streams = Streams::new();
        let body: Body = http_body_util::Full::new(bytes::Bytes::from_static(b"hello"))
            .map_err(|never| match never {})
            .boxed();
        let mut held = Streams::hold(streams.open(), body);
        let frame = held.frame().await;
        assert!(frame.is_some_and(|f| f.is_ok()));
        // Not asked again: stalled after the limit, not before.
        let limit = Duration::from_secs(4);
        let t0 = tokio::time::Instant::now();
        streams.stalled(limit).await;
        let took = t0.elapsed();
        assert!(took >= limit && took <= limit + limit / 4, "{took:?}");
        // Asked again: no longer waiting.
        assert!(held.frame().await.is_none());
        let again = tokio::time::timeout(Duration::from_secs(20), streams.stalled(limit)).await;
        assert!(again.is_err(), "a body that was asked again is no stall");
    }
}
