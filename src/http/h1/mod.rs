//! The HTTP/1.1 fast path for front-door requests: parse the head (httparse), admit and
//! place it through the same `front_door::admit` as every other path, and either answer
//! the redirect or relay the request and the node's response byte for byte over a pooled
//! upstream connection, all in the connection's own task.
//!
//! Why it exists: in proxy mode a request crossing hyper's server and hyper's client costs
//! about as many instructions in hyper alone as HAProxy spends on the whole request
//! (BENCHMARKS.md). A relay that parses each head once and copies bodies as bytes does the
//! same job for the common request, the way HAProxy and Pingora do.
//!
//! What it carries, and nothing else: HTTP/1.1 requests to front-door paths whose body, if
//! any, has one `Content-Length` (no `Transfer-Encoding`, no `Expect`, no upgrade), and
//! placement lookups (`GET /v1/placement/{room}`, answered by the API's own handler).
//! Anything else (the rest of the API, WebSocket upgrades, chunked uploads, HTTP/1.0, HTTP/2, a malformed head)
//! is handed with every unread byte to hyper ([`Outcome::Handoff`]), which serves the rest
//! of the connection exactly as it would have without this path. A connection's fast phase
//! is bounded like hyper's: `server.header_read_timeout` for each head (idle keep-alive
//! included), `server.max_header_bytes`, `server.send_timeout` for each write to the client,
//! and `proxy.*` for everything upstream.
//!
//! Invariants: a request is answered once; a response is relayed whole or its connection is
//! closed; a client connection is reused only when its request body was consumed; an upstream
//! connection is pooled only after a response that ended where its framing said.

pub mod chunked;
pub mod head;
pub mod pool;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::Method;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use self::chunked::ChunkedEnd;
use self::head::{BadResponse, ClientHead, Forwarded, Framing, Parse, RequestHead, ResponseHead};
use self::pool::Conn;
use super::front_door::{self, Admission};
use super::routes::{self, Route};
use super::server::ConnInfo;
use super::upstream::LaneError;
use super::{api, proxy, ApiError, App};
use crate::config::FrontDoorMode;
use crate::store::PinStore;

/// A byte stream a listener accepted (TCP, or TLS over it).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection as the accept loop hands it over.
pub type BoxIo = Box<dyn Io>;

/// How a connection's fast phase ended.
pub enum Outcome {
    /// The connection is over.
    Closed,
    /// The connection is over and must end with a reset, not a FIN: a response framed by
    /// the end of the connection was cut, and a clean close would tell the client it had
    /// all of it.
    Cut,
    /// hyper serves the rest of the connection, starting with these bytes (read, not used).
    Handoff(Bytes),
}

/// Serves front-door requests on `io` until the connection ends or a request the fast path
/// does not carry arrives. Stops between requests once `stop` turns true (shutdown).
pub async fn serve<S: PinStore>(
    app: &App<S>,
    io: &mut BoxIo,
    info: &ConnInfo,
    mut stop: watch::Receiver<bool>,
) -> Outcome {
    let limits = &app.cfg.server;
    let mut c = Client {
        io,
        buf: BytesMut::with_capacity(8 * 1024),
        out: Vec::with_capacity(4 * 1024),
        answer: Vec::with_capacity(4 * 1024),
        idle: app.proxy.cfg().idle_timeout,
        send: limits.send_timeout,
        cut: false,
        linger: false,
    };
    let timer = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(timer);
    loop {
        // A whole head, or hand the connection over.
        timer
            .as_mut()
            .reset(Instant::now() + limits.header_read_timeout);
        let plan = loop {
            match head::parse_request(&c.buf) {
                // One read can complete a head past the limit (the buffer grows): hyper
                // answers it 431, as it would had the head come on its path.
                Parse::Head(p) if p.len > limits.max_header_bytes => {
                    return handoff(app, c.buf.split().freeze())
                }
                Parse::Head(p) => break p,
                Parse::Other => return handoff(app, c.buf.split().freeze()),
                // Too large for this path: hyper answers 431.
                Parse::Partial if c.buf.len() >= limits.max_header_bytes => {
                    return handoff(app, c.buf.split().freeze())
                }
                Parse::Partial => {}
            }
            let idle = c.buf.is_empty();
            if idle && *stop.borrow() {
                return Outcome::Closed;
            }
            c.buf.reserve(4096);
            let read = tokio::select! {
                biased;
                r = c.io.read_buf(&mut c.buf) => r,
                _ = &mut timer => return Outcome::Closed,
                _ = stop.changed(), if idle => return Outcome::Closed,
            };
            match read {
                Ok(0) | Err(_) => return Outcome::Closed,
                Ok(_) => {}
            }
        };
        let head = c.buf.split_to(plan.len).freeze();
        let Some(req) = plan.build(&head) else {
            let mut all = BytesMut::from(&head[..]);
            all.extend_from_slice(&c.buf);
            return handoff(app, all.freeze());
        };
        app.router.metrics.fast_requests.inc();
        let close = req.close || *stop.borrow();
        if !c.request(app, info, req, close).await || close {
            if c.cut {
                return Outcome::Cut;
            }
            let shut = within(c.send, c.io.shutdown()).await;
            if c.linger && shut.is_ok() {
                linger(c.io).await;
            }
            return Outcome::Closed;
        }
    }
}

fn handoff<S: PinStore>(app: &App<S>, unread: Bytes) -> Outcome {
    app.router.metrics.fast_handoffs.inc();
    Outcome::Handoff(unread)
}

/// The client side of a connection in its fast phase.
struct Client<'a> {
    io: &'a mut BoxIo,
    /// Bytes read from the client and not yet used.
    buf: BytesMut,
    /// The next write, to the client or to a node.
    out: Vec<u8>,
    /// A node's answer as it goes to the client (the request stays in `out` for a retry).
    answer: Vec<u8>,
    /// `proxy.idle_timeout`: the longest a body may stall on its way in or on the node's
    /// side.
    idle: Duration,
    /// `server.send_timeout`: the longest a write to the client may wait for it to read.
    send: Duration,
    /// A response framed by the end of the connection was cut ([`Outcome::Cut`]).
    cut: bool,
    /// An answer (a redirect, the router's error, or a node's that came before the
    /// request's end) left part of the request's body unread: the close lingers
    /// ([`linger`]).
    linger: bool,
}

/// How long, and how many bytes, a close [`linger`]s over a body left unread.
pub(crate) const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// After an error answer that left the request's body unread (a `413` for an upload too
/// large, a `401`, `404` or `503` before it was read) and the write side's shutdown: reads
/// and drops what the client still sends, until it closes, for at most [`LINGER`] and
/// [`LINGER_BYTES`]. Linux answers a socket closed with unread bytes, and every segment
/// after, with a reset: a client still sending its body then got `ECONNRESET` on its next
/// write and, as many do, reported that instead of reading the answer already sent.
/// nginx's lingering close, for the same reason.
pub(crate) async fn linger(io: &mut BoxIo) {
    let deadline = Instant::now() + LINGER;
    let mut scratch = vec![0u8; 16 * 1024];
    let mut left = LINGER_BYTES;
    while left > 0 {
        match tokio::time::timeout_at(deadline, io.read(&mut scratch)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

impl Client<'_> {
    /// Answers one request; false when the connection cannot carry another.
    async fn request<S: PinStore>(
        &mut self,
        app: &App<S>,
        info: &ConnInfo,
        mut req: RequestHead,
        close: bool,
    ) -> bool {
        if req.lookup {
            // A node's client certificate (the mTLS listener) authorizes lookups where user
            // JWTs are on: the handler finds it where hyper's requests carry it. Only then,
            // so that no other lookup pays for the copy.
            if info.client_cert.is_some() {
                req.parts.extensions.insert(info.clone());
            }
            return self.lookup(app, &req, close).await;
        }
        let parts = &req.parts;
        let admitted = front_door::admit(app, parts, Some(info), Some(req.body)).await;
        let a = match admitted {
            Ok(a) => a,
            Err(e) => return self.answer_error(app, &req, e, req.body, close).await,
        };
        if a.mode == FrontDoorMode::Redirect {
            return match front_door::redirect(app, parts, &a) {
                Ok(r) => {
                    let keep = self.skip_body(req.body);
                    self.out.clear();
                    let head_only = parts.method == Method::HEAD;
                    head::write_buffered(&mut self.out, r, head_only, close || !keep).await;
                    self.flush().await && keep
                }
                Err(e) => self.answer_error(app, &req, e, req.body, close).await,
            };
        }
        match self.forward(app, info, &req, &a, close).await {
            Ok(keep) => keep,
            Err((e, consumed)) => {
                // A body that went to the node is gone from the buffer already.
                let unread = if consumed { 0 } else { req.body };
                self.answer_error(app, &req, e, unread, close || !consumed)
                    .await
            }
        }
    }

    /// Answers a placement lookup with the API's own handler.
    async fn lookup<S: PinStore>(&mut self, app: &App<S>, req: &RequestHead, close: bool) -> bool {
        let parts = &req.parts;
        let answer = match routes::route(parts.uri.path()) {
            Route::Placement(room) => api::placement(app, parts, room).await,
            _ => Err(ApiError::NotFound("no such endpoint".into())),
        };
        let resp = answer.unwrap_or_else(|e| super::error_response(app, parts.uri.path(), e));
        self.out.clear();
        head::write_buffered(&mut self.out, resp, false, close).await;
        self.flush().await
    }

    /// Drops a request body the answer does not need, if it is all here already; false if
    /// it is not (the connection then closes after the answer, lingering over the rest).
    fn skip_body(&mut self, body: u64) -> bool {
        if body <= self.buf.len() as u64 {
            self.buf.advance(body as usize);
            true
        } else {
            self.linger = true;
            false
        }
    }

    /// Writes `e` as the answer, dropping the `unread` bytes of the request's body still in
    /// the buffer; false if the connection cannot carry another request.
    async fn answer_error<S: PinStore>(
        &mut self,
        app: &App<S>,
        req: &RequestHead,
        e: ApiError,
        unread: u64,
        close: bool,
    ) -> bool {
        let skipped = self.skip_body(unread);
        let keep = !close && skipped;
        let resp = super::error_response(app, req.parts.uri.path(), e);
        self.out.clear();
        let head_only = req.parts.method == Method::HEAD;
        head::write_buffered(&mut self.out, resp, head_only, !keep).await;
        self.flush().await && keep
    }

    /// Writes `out` to the client within the send timeout.
    async fn flush(&mut self) -> bool {
        within(self.send, write_out(&mut self.io, &self.out))
            .await
            .is_ok()
    }

    /// Forwards the request to its node and relays the answer. `Ok(keep)`: the node's answer
    /// went out (whole, or the connection is cut); `Err((e, consumed))`: answer `e` instead,
    /// `consumed` telling whether the request body was read off the connection.
    async fn forward<S: PinStore>(
        &mut self,
        app: &App<S>,
        info: &ConnInfo,
        req: &RequestHead,
        a: &Admission,
        close: bool,
    ) -> Result<bool, (ApiError, bool)> {
        let p = &app.proxy;
        let cfg = p.cfg();
        let node = &a.node;
        if req.body > cfg.max_request_body_bytes {
            let limit = cfg.max_request_body_bytes;
            return Err((ApiError::PayloadTooLarge(limit as usize), false));
        }
        let upstream = node.info.upstream.as_str();
        let Some((host, base)) = proxy::upstream_parts(upstream) else {
            return Err((proxy::bad_upstream(node), false));
        };
        self.out.clear();
        head::write_upstream_request(
            &mut self.out,
            &req.parts,
            &Forwarded {
                host,
                base,
                peer_ip: info.peer_ip.as_bytes(),
                tls: info.tls,
                node: node.id.as_str(),
                ticket: &a.ticket,
                target: a.target.as_deref(),
                drop_authorization: a.drop_authorization,
                referer: a.referer.as_deref(),
            },
        );
        // The body bytes already here go out with the head, in the same write.
        let here = req.body.min(self.buf.len() as u64) as usize;
        self.out.extend_from_slice(&self.buf[..here]);
        self.buf.advance(here);
        let mut rest = req.body - here as u64;
        let bodiless = req.body == 0;
        let method = &req.parts.method;

        // Nothing of the body left to stream: the whole request is in `out`.
        let whole = rest == 0;
        // The node took the whole request (else its connection is not reused).
        let mut sent_whole = true;
        let max = app.cfg.server.max_header_bytes.max(64 * 1024);
        let since = std::time::Instant::now();
        // As `Proxy::forward`: a failure does not mark a node that reported since.
        let heard = node.live.last_word();
        let mut conn = p
            .conns
            .get(info.event_loop, upstream)
            .await
            .map_err(|e| (connect_failed(app, a, e), rest == 0))?;
        let head = loop {
            let sent = self.send(&mut conn, &mut rest, method, max).await;
            let got = match sent {
                Ok(()) => {
                    let mut client = ClientHead {
                        out: &mut self.answer,
                        node: node.id.as_str(),
                        close,
                    };
                    let head = read_head(&mut conn, method, max, &mut client);
                    tokio::time::timeout(cfg.response_timeout, head).await
                }
                Err(Side::Client) => return Err((client_gone(), false)),
                Err(Side::ClientStalled) => return Err((ApiError::RequestTimeout, false)),
                // The node may have answered early (refusing the body) and stopped reading:
                // its answer, if there is one, is the one to relay.
                Err(side @ (Side::Node(_) | Side::Answered)) => {
                    let e = match side {
                        Side::Node(e) => e,
                        _ => io::Error::other("the node answered before the request's end"),
                    };
                    sent_whole = false;
                    let mut client = ClientHead {
                        out: &mut self.answer,
                        node: node.id.as_str(),
                        close: true,
                    };
                    let head = read_head(&mut conn, method, max, &mut client);
                    match tokio::time::timeout(cfg.response_timeout, head).await {
                        Ok(Ok(h)) => Ok(Ok(h)),
                        _ => Ok(Err(HeadError::Io(e))),
                    }
                }
            };
            match got {
                Ok(Ok(h)) => break h,
                // A pooled connection the node had closed, found out before it answered
                // anything: the whole request is still in `out`, send it on a new one, once,
                // if the node cannot have acted on it (the write failed) or acting twice is
                // harmless (an idempotent method, RFC 9110 section 9.2.2).
                Ok(Err(HeadError::Closed | HeadError::Io(_)))
                    if conn.reused() && whole && (!sent_whole || method.is_idempotent()) =>
                {
                    sent_whole = true;
                    conn = p
                        .conns
                        .connect(info.event_loop, upstream)
                        .await
                        .map_err(|e| (connect_failed(app, a, e), true))?;
                }
                // With no body of the client's in play, a connection the node closed or
                // reset before answering, or an answer it got wrong, is the node's failure.
                Ok(Err(e)) if bodiless => {
                    return Err((p.failed(node, heard, &e.to_string()), true))
                }
                Ok(Err(e)) => {
                    tracing::debug!(node = %node.id, error = %e, "upstream exchange failed");
                    let consumed = rest == 0;
                    return Err((
                        ApiError::UpstreamUnavailable(format!(
                            "the exchange with node {} failed",
                            node.id
                        )),
                        consumed,
                    ));
                }
                Err(_) if bodiless => {
                    return Err((p.failed(node, heard, "no response in time"), true))
                }
                Err(_) => {
                    return Err((
                        ApiError::UpstreamUnavailable(format!(
                            "node {} did not answer in time",
                            node.id
                        )),
                        rest == 0,
                    ))
                }
            }
        };
        p.succeeded(node, since);
        // A body the node did not take in full is still on the client connection (and the
        // answer's head says so: it was read with `close` set); the client may still be
        // sending it, so the close lingers.
        let close = head.client_close;
        self.linger |= rest > 0;
        conn.buf.advance(head.len);
        let ended = self.relay(&mut conn, &head).await;
        match ended {
            Ok(()) => {
                if sent_whole && !head.close && conn.buf.is_empty() {
                    p.conns.put(conn);
                }
                Ok(!close)
            }
            Err(Relay::BeforeHead(e)) => {
                // Nothing reached the client yet: it gets a 502 rather than a cut. If the
                // node answered before it had the whole body, the rest is still on the
                // client connection, which must then close: read on, it would be taken for
                // the next request.
                tracing::debug!(node = %node.id, error = %e, "malformed response body");
                Err((
                    ApiError::UpstreamUnavailable(format!(
                        "node {} sent a malformed response",
                        node.id
                    )),
                    rest == 0 && !close,
                ))
            }
            Err(Relay::Cut(e)) => {
                tracing::debug!(node = %node.id, error = %e, "response relay cut");
                self.cut = head.framing == Framing::UntilClose;
                Ok(false)
            }
        }
    }

    /// Writes `out` (head and the body bytes that came with it) to the node, then the rest of
    /// the request body as it arrives from the client.
    ///
    /// While a body is streamed the node is listened to as well: one that answers before the
    /// body's end (a `413`, a `401`) and stops reading would otherwise hold its answer back
    /// until the upload finished or `proxy.idle_timeout` cut it. Its answer stops the upload
    /// ([`Side::Answered`]); interim (1xx) heads are passed over, as [`read_head`] does.
    async fn send(
        &mut self,
        conn: &mut Conn,
        rest: &mut u64,
        method: &Method,
        max: usize,
    ) -> Result<(), Side> {
        if *rest == 0 {
            // The whole request is in `out`: nothing to stream, nothing to listen for.
            within(self.idle, conn.io.write_all(&self.out))
                .await
                .map_err(Side::Node)?;
            return within(self.idle, conn.io.flush()).await.map_err(Side::Node);
        }
        let listen = Listen { method, max };
        within(self.idle, write_listening(conn, &self.out, &listen))
            .await
            .map_err(Side::Node)??;
        while *rest > 0 {
            if self.buf.is_empty() {
                self.buf.reserve(16 * 1024);
                let (client, buf) = (&mut self.io, &mut self.buf);
                let read = std::future::poll_fn(|cx| {
                    if let Poll::Ready(side) = listen.poll(conn, cx) {
                        return Poll::Ready(Err(side));
                    }
                    let mut read = std::pin::pin!(client.read_buf(buf));
                    read.as_mut().poll(cx).map(Ok)
                });
                match within(self.idle, async { Ok(read.await) }).await {
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        return Err(Side::ClientStalled)
                    }
                    Err(_) => return Err(Side::Client),
                    Ok(Err(side)) => return Err(side),
                    Ok(Ok(Ok(0)) | Ok(Err(_))) => return Err(Side::Client),
                    Ok(Ok(Ok(_))) => {}
                }
            }
            let n = (*rest).min(self.buf.len() as u64) as usize;
            within(self.idle, write_listening(conn, &self.buf[..n], &listen))
                .await
                .map_err(Side::Node)??;
            self.buf.advance(n);
            *rest -= n as u64;
        }
        // All of the request must reach the node before its answer is awaited.
        within(self.idle, conn.io.flush()).await.map_err(Side::Node)
    }

    /// Relays the response body after `answer` (the head): what came with the head goes in
    /// the same write, the rest as it arrives, up to where the framing says it ends.
    async fn relay(&mut self, conn: &mut Conn, head: &ResponseHead) -> Result<(), Relay> {
        let mut left = match head.framing {
            Framing::Empty => {
                return Ok(within(self.send, write_out(&mut self.io, &self.answer)).await?);
            }
            Framing::Length(n) => Left::Length(n),
            Framing::Chunked => Left::Chunked(ChunkedEnd::new()),
            Framing::UntilClose => Left::UntilClose,
        };
        let (n, mut done) = left.take(&conn.buf).map_err(Relay::BeforeHead)?;
        self.answer.extend_from_slice(&conn.buf[..n]);
        conn.buf.advance(n);
        within(self.send, write_out(&mut self.io, &self.answer)).await?;
        while !done {
            conn.buf.reserve(16 * 1024);
            let read = within(self.idle, conn.io.read_buf(&mut conn.buf)).await?;
            if read == 0 {
                return match left {
                    Left::UntilClose => Ok(()),
                    _ => Err(Relay::Cut(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "node closed mid-body",
                    ))),
                };
            }
            let (n, d) = left.take(&conn.buf)?;
            // Flushed before the node is awaited again: over TLS the last bytes may sit in
            // rustls's buffer, and the node may say nothing more for a while (a long poll).
            within(self.send, write_out(&mut self.io, &conn.buf[..n])).await?;
            conn.buf.advance(n);
            done = d;
        }
        Ok(())
    }
}

/// How relaying a response failed.
enum Relay {
    /// The body's first bytes were malformed: nothing was written to the client yet.
    BeforeHead(io::Error),
    /// Later: the client has part of the answer, and can only be cut off.
    Cut(io::Error),
}

impl From<io::Error> for Relay {
    fn from(e: io::Error) -> Self {
        Relay::Cut(e)
    }
}

/// Which side of an exchange failed.
enum Side {
    /// The client closed, or its connection failed, before the body's end.
    Client,
    /// The client sent nothing of the body for `proxy.idle_timeout`.
    ClientStalled,
    Node(io::Error),
    /// The node sent a final response head (in `conn.buf`) before the body's end.
    Answered,
}

/// What [`Session::send`] listens for from the node while a body is streamed.
struct Listen<'a> {
    method: &'a Method,
    max: usize,
}

impl Listen<'_> {
    /// Takes in what the node has sent (without waiting): `Ready` once it holds a final
    /// response head (or bytes that are none: [`read_head`] says so), closed the connection
    /// or failed; 1xx heads are dropped as they come.
    fn poll(&self, conn: &mut Conn, cx: &mut Context<'_>) -> Poll<Side> {
        loop {
            if !conn.buf.is_empty() {
                let mut head = Vec::new();
                let mut client = ClientHead {
                    out: &mut head,
                    node: "",
                    close: true,
                };
                match head::parse_response(&conn.buf, self.method, self.max, &mut client) {
                    Ok(Some(h)) if (100..200).contains(&h.status) => {
                        conn.buf.advance(h.len);
                        continue;
                    }
                    Ok(Some(_)) | Err(_) => return Poll::Ready(Side::Answered),
                    Ok(None) => {}
                }
            }
            let mut bytes = [0u8; 4096];
            let mut read = ReadBuf::new(&mut bytes);
            match Pin::new(&mut conn.io).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    return Poll::Ready(Side::Node(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the node closed before the request's end",
                    )))
                }
                Poll::Ready(Ok(())) => conn.buf.extend_from_slice(read.filled()),
                Poll::Ready(Err(e)) => return Poll::Ready(Side::Node(e)),
            }
        }
    }
}

/// Writes all of `bytes` to the node unless it answers first (`Ok(Err(Side::Answered))`,
/// or the side that failed); the `io::Error` is the write's own.
async fn write_listening(
    conn: &mut Conn,
    bytes: &[u8],
    listen: &Listen<'_>,
) -> io::Result<Result<(), Side>> {
    let mut written = 0;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(side) = listen.poll(conn, cx) {
            return Poll::Ready(Ok(Err(side)));
        }
        while written < bytes.len() {
            match Pin::new(&mut conn.io).poll_write(cx, &bytes[written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(Ok(())))
    })
    .await
}

/// What is left of a response body.
enum Left {
    Length(u64),
    Chunked(ChunkedEnd),
    UntilClose,
}

impl Left {
    /// How much of `buf` belongs to the body, and whether the body ends there.
    fn take(&mut self, buf: &[u8]) -> io::Result<(usize, bool)> {
        match self {
            Left::Length(n) => {
                let take = (*n).min(buf.len() as u64);
                *n -= take;
                Ok((take as usize, *n == 0))
            }
            Left::Chunked(c) => match c.feed(buf) {
                Ok(Some(n)) => Ok((n, true)),
                Ok(None) => Ok((buf.len(), false)),
                Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            },
            Left::UntilClose => Ok((buf.len(), false)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum HeadError {
    #[error("the node closed the connection before answering")]
    Closed,
    #[error("{0}")]
    Io(io::Error),
    #[error("{0}")]
    Bad(BadResponse),
}

/// Reads the node's response head into `conn.buf`, skipping interim (1xx) responses, and
/// writes the client's copy of the final one to `client.out`.
async fn read_head(
    conn: &mut Conn,
    method: &Method,
    max: usize,
    client: &mut ClientHead<'_>,
) -> Result<ResponseHead, HeadError> {
    client.out.clear();
    loop {
        match head::parse_response(&conn.buf, method, max, client) {
            Ok(Some(h)) if (100..200).contains(&h.status) => {
                conn.buf.advance(h.len);
                continue;
            }
            Ok(Some(h)) => return Ok(h),
            Ok(None) => {}
            Err(e) => return Err(HeadError::Bad(e)),
        }
        conn.buf.reserve(8 * 1024);
        let was_empty = conn.buf.is_empty();
        match conn.io.read_buf(&mut conn.buf).await {
            Ok(0) if was_empty => return Err(HeadError::Closed),
            Ok(0) => {
                return Err(HeadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "node closed mid-head",
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
}

fn connect_failed<S: PinStore>(app: &App<S>, a: &Admission, e: LaneError) -> ApiError {
    let why = match e {
        LaneError::Connect(e) => e,
        LaneError::Local(e) => return app.proxy.short(&a.node, &e),
        LaneError::Exchange(e) => e.to_string(),
    };
    app.proxy.failed(&a.node, a.node.live.last_word(), &why)
}

fn client_gone() -> ApiError {
    ApiError::InvalidRequest("the request body stopped short".into())
}

/// Runs an I/O future for at most `d`. Most reads and writes are ready at their first poll;
/// only one that is not starts a timer (reading the clock and registering a timer entry
/// cost more than a write to a socket with room).
async fn within<T>(d: Duration, f: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    let mut f = std::pin::pin!(f);
    if let Poll::Ready(r) = std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await {
        return r;
    }
    match tokio::time::timeout(d, f).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "idle for too long")),
    }
}

/// Writes all of `bytes` and flushes them: over TLS, `write_all` may leave the last bytes
/// in rustls's buffer (it accepts them before the socket does) until something flushes, and
/// a peer waiting for them would wait until a timeout. Over plain TCP the flush costs one
/// poll and no system call.
async fn write_out<W: AsyncWrite + Unpin + ?Sized>(io: &mut W, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// A connection handed to hyper: the bytes the fast path read first, then the stream.
pub struct Rewind {
    prefix: Bytes,
    inner: BoxIo,
}

impl Rewind {
    pub fn new(inner: BoxIo, prefix: Bytes) -> Rewind {
        Rewind { prefix, inner }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_handed_over_connection_reads_its_prefix_first() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut r = Rewind::new(Box::new(a), Bytes::from_static(b"GET / HTTP/1.1\r\n"));
        b.write_all(b"Host: x\r\n\r\n").await.unwrap();
        drop(b);
        let mut all = String::new();
        r.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn within_bounds_what_is_pending_and_passes_what_is_ready() {
        let t0 = Instant::now();
        let stuck = within(
            Duration::from_secs(3),
            std::future::pending::<io::Result<()>>(),
        );
        assert_eq!(stuck.await.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(Instant::now() - t0, Duration::from_secs(3));
        // Ready at once, or after a while within the bound: the value comes through.
        assert_eq!(
            within(Duration::from_secs(3), async { Ok(7) })
                .await
                .unwrap(),
            7
        );
        let later = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok(8)
        };
        assert_eq!(within(Duration::from_secs(3), later).await.unwrap(), 8);
    }

    #[test]
    fn a_body_ends_where_its_framing_says() {
        let mut l = Left::Length(5);
        assert_eq!(l.take(b"abc").unwrap(), (3, false));
        assert_eq!(l.take(b"defgh").unwrap(), (2, true));
        let mut l = Left::Chunked(ChunkedEnd::new());
        assert_eq!(l.take(b"1\r\na\r\n").unwrap(), (6, false));
        assert_eq!(l.take(b"0\r\n\r\nHTTP").unwrap(), (5, true));
        assert!(Left::Chunked(ChunkedEnd::new()).take(b"z").is_err());
        assert_eq!(Left::UntilClose.take(b"abc").unwrap(), (3, false));
    }
}
