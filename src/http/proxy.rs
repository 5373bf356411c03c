//! Proxy mode: forwards a front-door request to its room's node over a pooled upstream
//! connection (a lane, see `upstream`), streaming bodies both ways, and tunnels WebSocket
//! (any HTTP/1.1 `Upgrade`) sessions until either side closes. Sets `X-Forwarded-For/-Proto/-Host`, `X-Room-Node` and
//! `X-Room-Ticket`; drops hop-by-hop headers (RFC 9110 section 7.6.1).
//!
//! Upstream failures (refused, connect or response timeout; for a request without a body,
//! also a connection closed or reset before the answer, or an answer the node got wrong)
//! answer `502 upstream_unavailable`; `proxy.failures_to_unhealthy` consecutive failures mark the node
//! unhealthy until its next heartbeat (passive health), so the room's next join is re-placed
//! by the normal rules. Every body and tunnel is cut after `proxy.idle_timeout` without data.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::upgrade::OnUpgrade;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::h1::head::{origin_form, parse_length_list, set_by_proxy, underscored_framing};
use super::h1::pool::Conns;
use super::resolve::Resolver;
use super::server::ConnInfo;
use super::upstream::{Connector, Lane, LaneError, Lanes, Uploaded};
use super::{tls, ApiError, Body, BoxError};
use crate::cluster::{NodeEntry, NodeId};
use crate::config::ProxyConfig;
use crate::metrics::ProxyMetrics;

type UpstreamClient = Client<Connector, Body>;

/// The upstream client and the passive-health counters.
pub struct Proxy {
    /// Ordinary requests: lanes driven by the request's own task.
    lanes: Lanes,
    /// The fast path's raw upstream connections (`h1`).
    pub(crate) conns: Conns,
    /// `Upgrade` requests: hyper-util's client, whose connection tasks can hand the upgraded
    /// connection over to a tunnel.
    client: UpstreamClient,
    /// Node names to addresses, for all three and for the health probes.
    resolver: Resolver,
    cfg: ProxyConfig,
    /// Consecutive failures per node since its last success.
    failures: DashMap<NodeId, u32>,
    /// Entries in `failures` (at least): lets a success skip the map when nothing failed.
    failing: AtomicUsize,
    metrics: ProxyMetrics,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// What the front door hands the proxy besides the request.
pub struct Forward<'a> {
    pub node: &'a NodeEntry,
    /// The signed ticket (it becomes the `X-Room-Ticket` header without a copy).
    pub ticket: String,
    /// The target (origin form) to send instead of the request's own
    /// ([`Admission::target`](super::front_door::Admission)).
    pub target: Option<&'a str>,
    /// Leave out the `Authorization` header: it carried the user's login token
    /// ([`Admission::drop_authorization`](super::front_door::Admission)).
    pub drop_authorization: bool,
    /// The `Referer` to send instead of the client's (empty: none)
    /// ([`Admission::referer`](super::front_door::Admission)).
    pub referer: Option<&'a str>,
}

impl Proxy {
    /// The proxy of a router serving on `loops` event loops (`ServerConfig::event_loops`):
    /// its connection pools keep a shard per loop.
    pub fn new(cfg: &ProxyConfig, loops: usize, metrics: ProxyMetrics) -> Result<Proxy, String> {
        let roots = match &cfg.ca_file {
            Some(p) => tls::load_roots(p)?,
            None => RootCertStore::empty(),
        };
        let resolver = Resolver::system();
        let mut http = HttpConnector::new_with_resolver(resolver.clone());
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls::client_config(roots)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let conns = Conns::new(
            https.clone(),
            cfg.connect_timeout,
            loops,
            cfg.pool_max_idle_per_host,
            cfg.pool_idle_timeout,
        );
        let lanes = Lanes::new(
            https.clone(),
            cfg.connect_timeout,
            loops,
            cfg.pool_max_idle_per_host,
            cfg.pool_idle_timeout,
        );
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .build(https);
        Ok(Proxy {
            lanes,
            conns,
            client,
            resolver,
            cfg: cfg.clone(),
            failures: DashMap::new(),
            failing: AtomicUsize::new(0),
            metrics,
        })
    }

    /// How node names become addresses: shared with the health probes.
    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// The proxy's settings.
    pub(crate) fn cfg(&self) -> &ProxyConfig {
        &self.cfg
    }

    /// Forwards the request to `to.node`'s upstream and answers the node's response.
    pub async fn forward(
        &self,
        parts: &Parts,
        body: Incoming,
        to: Forward<'_>,
    ) -> Result<Response<Body>, ApiError> {
        let node = to.node;
        let limit = self.cfg.max_request_body_bytes;
        if content_length(&parts.headers).is_some_and(|l| l > limit) {
            return Err(ApiError::PayloadTooLarge(limit as usize));
        }
        // `front_door::admit` refused an upgrade with a body.
        let upgrade = upgrade_protocol(parts);
        // A slow request body can delay the answer; only bodiless requests' timeouts are the
        // node's fault.
        let bodiless = upgrade.is_some() || body.is_end_stream();
        let target = to.target;
        let mut headers = end_to_end(&parts.headers);
        if to.drop_authorization {
            headers.remove(header::AUTHORIZATION);
        }
        if let Some(referer) = to.referer {
            headers.remove(header::REFERER);
            match HeaderValue::from_str(referer) {
                Ok(v) if !referer.is_empty() => drop(headers.insert(header::REFERER, v)),
                _ => {}
            }
        }
        self.forwarded_headers(parts, &mut headers, to);
        // `response_timeout` is the node's time to answer once it has the request: for a
        // body, counted from its end (an upload may take longer; `idle_timeout` bounds its
        // stalls on either side), as on the fast path.
        let (body, upload): (Body, _) = if bodiless {
            (Empty::new().map_err(|never| match never {}).boxed(), None)
        } else {
            let body = IdleTimeout::new(Limited::new(body, limit as usize), self.cfg.idle_timeout);
            let (body, upload) = EndSignal::new(body, self.cfg.idle_timeout);
            (body.boxed(), Some(upload))
        };
        let uploaded = (upload.as_ref()).map(|u| u.progress.clone() as Arc<dyn Uploaded>);
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        if let Some(proto) = upgrade {
            let path = target.map_or_else(|| origin_form(&parts.uri), Cow::Borrowed);
            let uri: Uri = format!("{}{path}", node.info.upstream)
                .parse()
                .map_err(|_| bad_upstream(node))?;
            *req.uri_mut() = uri;
            let h = req.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, proto);
            return self.upgrade(parts, req, node).await;
        }
        // A lane speaks HTTP/1.1 to the node itself: origin-form target, Host set here.
        let (host, target) = lane_target(&node.info.upstream, &parts.uri, target)
            .ok_or_else(|| bad_upstream(node))?;
        *req.uri_mut() = target;
        req.headers_mut().insert(header::HOST, host);
        let since = Instant::now();
        // The node's last word when the exchange began: a failure found later (up to
        // `response_timeout`) does not mark a node that reported since (restarted).
        let heard = node.live.last_word();
        let exchange = within_after(
            upload,
            self.cfg.response_timeout,
            self.exchange(event_loop(parts), &node.info.upstream, req),
        );
        let (resp, lane) = match exchange.await {
            // hyper's client takes a 101 for an answer to any request; here nothing asked
            // for an upgrade, so the node's answer is wrong, as the fast path finds it
            // (`BadResponse::UnaskedUpgrade`). Passed on, it reached an HTTP/1.1 client as
            // a bare 101 and an HTTP/2 client as a protocol error.
            Ok(Ok((r, _))) if r.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let why = "a 101 answer to a request that asked for no upgrade";
                if bodiless {
                    self.failed(node, heard, why);
                }
                return Err(ApiError::UpstreamUnavailable(format!(
                    "node {} gave {why}",
                    node.id
                )));
            }
            Ok(Ok(r)) => {
                self.succeeded(node, since);
                r
            }
            // Only the node's own failures count toward passive health: a client that
            // aborts or oversends its body must not be able to mark a node unhealthy.
            Ok(Err(LaneError::Connect(e))) => return Err(self.failed(node, heard, &e)),
            Ok(Err(LaneError::Local(e))) => return Err(self.short(node, &e)),
            Ok(Err(LaneError::Exchange(e)))
                if caused_by::<http_body_util::LengthLimitError>(&e) =>
            {
                return Err(ApiError::PayloadTooLarge(limit as usize))
            }
            // The client's own upload stalled (the timer runs only while the node waits for
            // it): the request did not arrive, as on the fast path; the node is not at fault.
            Ok(Err(LaneError::Exchange(e))) if caused_by::<BodyIdle>(&e) => {
                return Err(ApiError::RequestTimeout)
            }
            // The client's own body was malformed (a bad chunk size): its request, not the
            // node, is at fault.
            Ok(Err(LaneError::Exchange(e))) if client_body_malformed(&e) => {
                return Err(ApiError::InvalidRequest(
                    "the request body is malformed (its chunked framing)".into(),
                ))
            }
            // With no body of the client's in play, a connection the node closed or reset
            // before answering, or an answer it got wrong, is the node's failure.
            Ok(Err(LaneError::Exchange(e))) if bodiless => {
                return Err(self.failed(node, heard, &e.to_string()))
            }
            Ok(Err(LaneError::Exchange(e))) => {
                tracing::debug!(node = %node.id, error = ?e, "upstream exchange failed");
                return Err(ApiError::UpstreamUnavailable(format!(
                    "the exchange with node {} failed",
                    node.id
                )));
            }
            Err(Late::Answer) if bodiless => {
                return Err(self.failed(node, heard, "no response in time"))
            }
            // As on the fast path, a node that stops taking an upload is not counted toward
            // passive health (it may be refusing the body), but the client is not kept waiting.
            Err(Late::Upload) => {
                return Err(ApiError::UpstreamUnavailable(format!(
                    "node {} stopped reading the request body",
                    node.id
                )))
            }
            Err(Late::Answer) => {
                return Err(ApiError::UpstreamUnavailable(format!(
                    "node {} did not answer in time",
                    node.id
                )))
            }
        };
        let (mut rp, body) = resp.into_parts();
        // A transfer coding besides chunked (`gzip`) cannot be said to an HTTP/2 or
        // HTTP/1.0 client: hyper's server drops the header, and the client would take the
        // coded bytes for the content. Refused (such answers are rare); the lane is dropped
        // with its unread body.
        if parts.version != Version::HTTP_11 {
            if let Some(codings) = codings_besides_chunked(&rp.headers) {
                return Err(ApiError::UpstreamUnavailable(format!(
                    "node {} answered in a transfer coding ({}) that this client's {:?} cannot carry",
                    node.id,
                    codings.to_str().unwrap_or("?"),
                    parts.version
                )));
            }
        }
        answer_head(&mut rp, node);
        let body = self.lanes.body(body, lane, uploaded);
        Ok(Response::from_parts(
            rp,
            IdleTimeout::new(body, self.cfg.idle_timeout).boxed(),
        ))
    }

    /// Sends `req` on a lane to `upstream` and waits for the response head. A pooled lane
    /// that turns out closed before it answered is replaced by a new one, once, if the node
    /// cannot have acted on the request (it was not written: hyper hands it back) or acting
    /// twice is harmless (a bodiless request of an idempotent method, RFC 9110 section
    /// 9.2.2, whose head is kept for the purpose), as on the fast path. A node that closes
    /// idle connections (a keep-alive timeout of a few seconds is common) otherwise cost a
    /// user a `502` whenever its close crossed a request on the wire.
    async fn exchange(
        &self,
        shard: usize,
        upstream: &str,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, Box<Lane>), LaneError> {
        let mut lane = self.lanes.get(shard, upstream).await?;
        let again = (lane.reused() && req.body().is_end_stream() && req.method().is_idempotent())
            .then(|| bodiless_copy(&req));
        let req = match (lane.exchange(req).await, again) {
            (Ok(resp), _) => return Ok((resp, lane)),
            (Err((_, Some(req))), _) if lane.reused() => req,
            (Err((e, None)), Some(again)) if closed_before_answer(&e) => {
                tracing::debug!(error = %e, "a pooled node connection closed under a request; sending it again");
                again
            }
            (Err((e, _)), _) => return Err(LaneError::Exchange(e)),
        };
        let mut lane = self.lanes.connect(shard, upstream).await?;
        match lane.exchange(req).await {
            Ok(resp) => Ok((resp, lane)),
            Err((e, _)) => Err(LaneError::Exchange(e)),
        }
    }

    /// Forwards an `Upgrade` request (WebSocket) over a connection of its own and, on `101`,
    /// tunnels both upgraded connections.
    async fn upgrade(
        &self,
        parts: &Parts,
        req: Request<Body>,
        node: &NodeEntry,
    ) -> Result<Response<Body>, ApiError> {
        let since = Instant::now();
        // The node's last word when the exchange began: a failure found later (up to
        // `response_timeout`) does not mark a node that reported since (restarted).
        let heard = node.live.last_word();
        let mut resp =
            match tokio::time::timeout(self.cfg.response_timeout, self.client.request(req)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) if e.is_connect() && super::upstream::is_local_shortage(&e) => {
                    return Err(self.short(node, &e.to_string()))
                }
                Ok(Err(e)) if e.is_connect() => {
                    return Err(self.failed(node, heard, &format!("{e:?}")))
                }
                // An upgrade carries no body of the client's: a connection the node closed
                // or reset before answering, or an answer it garbled, is the node's failure,
                // as for any bodiless request.
                Ok(Err(e)) => {
                    tracing::debug!(node = %node.id, error = ?e, "upstream upgrade failed");
                    return Err(self.failed(node, heard, &e.to_string()));
                }
                Err(_) => return Err(self.failed(node, heard, "no response in time")),
            };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The node declined the upgrade: its answer goes back as it is.
            self.succeeded(node, since);
            let (mut rp, body) = resp.into_parts();
            answer_head(&mut rp, node);
            return Ok(Response::from_parts(
                rp,
                IdleTimeout::new(body, self.cfg.idle_timeout).boxed(),
            ));
        }
        if !switches_to_asked(&parts.headers, resp.headers()) {
            // A browser refuses such a handshake, and the bytes after it would be read as
            // a protocol neither side agreed on: the node's answer is malformed.
            tracing::debug!(node = %node.id, "a 101 without the Upgrade the client asked for");
            let why = "switched protocols without naming the one asked for";
            self.failed(node, heard, why);
            return Err(ApiError::UpstreamUnavailable(format!(
                "node {} {why}",
                node.id
            )));
        }
        self.succeeded(node, since);
        let client_side = parts.extensions.get::<OnUpgrade>().cloned();
        let upstream_side = hyper::upgrade::on(&mut resp);
        let Some(client_side) = client_side else {
            return Err(ApiError::InvalidRequest(
                "this connection cannot be upgraded".into(),
            ));
        };
        let info = parts.extensions.get::<ConnInfo>();
        let slot = info.and_then(|i| i.slot.clone());
        let grace_over = info.map(|i| i.grace_over.clone());
        let idle = self.cfg.idle_timeout;
        let open = OpenTunnel::new(&self.metrics);
        tokio::spawn(async move {
            let tunnel = tunnel(client_side, upstream_side, idle);
            match grace_over {
                // A drained server holds no tunnel on past its grace.
                Some(over) => tokio::select! {
                    () = tunnel => {}
                    () = over.wait() => tracing::debug!("grace period over; tunnel closed"),
                },
                None => tunnel.await,
            }
            drop(open);
            drop(slot);
        });
        let (mut rp, _) = resp.into_parts();
        let keep = (
            rp.headers.get(header::UPGRADE).cloned(),
            rp.headers.get(header::CONNECTION).cloned(),
        );
        strip_hop_by_hop(&mut rp.headers);
        if let (Some(u), Some(c)) = keep {
            rp.headers.insert(header::UPGRADE, u);
            rp.headers.insert(header::CONNECTION, c);
        }
        set_node(&mut rp.headers, node);
        Ok(Response::from_parts(rp, super::full(Bytes::new())))
    }

    fn forwarded_headers(&self, parts: &Parts, h: &mut HeaderMap, to: Forward<'_>) {
        let info = parts.extensions.get::<ConnInfo>();
        if let Some(info) = info {
            // Every line the client (or a proxy before the router) sent, in order, as one
            // list: keeping only the first would drop the hops after a forged one.
            let prev = (h.get_all(&X_FORWARDED_FOR).iter())
                .filter_map(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .collect::<Vec<_>>()
                .join(", ");
            let xff = match prev.is_empty() {
                false => {
                    HeaderValue::try_from(format!("{prev}, {}", info.peer.ip().to_canonical())).ok()
                }
                true => Some(info.peer_ip.clone()),
            };
            if let Some(v) = xff {
                h.insert(X_FORWARDED_FOR, v);
            }
        }
        let proto = if info.is_some_and(|i| i.tls) {
            "https"
        } else {
            "http"
        };
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        // The client's own under the names set here are gone (`end_to_end`) but for
        // `X-Forwarded-For`, extended above.
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        if let Some(host) = host {
            h.insert(X_FORWARDED_HOST, host);
        }
        set_node(h, to.node);
        if let Ok(v) = HeaderValue::try_from(to.ticket) {
            h.insert(X_ROOM_TICKET, v);
        }
    }

    /// The node answered, `since` the exchange began (taking or opening a connection): the
    /// time is recorded, and its run of consecutive failures, if it had one, is over.
    pub(crate) fn succeeded(&self, node: &NodeEntry, since: Instant) {
        node.live.upstream_response.observe(since.elapsed());
        // Most requests find no failures at all; they skip the map (and its shard's write
        // lock, which every request to the node would otherwise take).
        // And while some other node has failures, a read (a shared lock on the map's shard)
        // tells this one has none, sparing every answer the shard's write lock.
        if self.failing.load(Ordering::Acquire) > 0
            && self.failures.contains_key(&node.id)
            && self.failures.remove(&node.id).is_some()
        {
            self.failing.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// A connection to `node` the router could not open for want of its own resources
    /// ([`LaneError::Local`]): the request fails, the node is not blamed.
    pub(crate) fn short(&self, node: &NodeEntry, why: &str) -> ApiError {
        tracing::warn!(node = %node.id, error = why, "no connection to the node: the router is short of sockets or memory (raise its open-files limit?)");
        ApiError::UpstreamUnavailable(format!(
            "the router could not open a connection to node {}",
            node.id
        ))
    }

    /// Counts a failure against the node; enough in a row mark it unhealthy, unless it
    /// reported after `heard` (its [`Live::last_word`](crate::cluster::Live::last_word) when
    /// the failed exchange began: a node that restarted and reported meanwhile is not the
    /// one that failed).
    pub(crate) fn failed(
        &self,
        node: &NodeEntry,
        heard: crate::placement::Millis,
        why: &str,
    ) -> ApiError {
        self.metrics.upstream_failures.inc();
        let limit = self.cfg.failures_to_unhealthy;
        let reached = {
            let mut n = match self.failures.entry(node.id.clone()) {
                dashmap::Entry::Occupied(e) => e.into_ref(),
                dashmap::Entry::Vacant(e) => {
                    // Counted before the entry exists, so a success racing with this failure
                    // looks in the map.
                    self.failing.fetch_add(1, Ordering::AcqRel);
                    e.insert(0)
                }
            };
            *n += 1;
            *n >= limit
        };
        // The run ends with the marking, and its entry with it: a node that died is not
        // asked again, and its entry would otherwise stay for good (its id may never come
        // back), every success looking in the map.
        if reached
            && self
                .failures
                .remove_if(&node.id, |_, n| *n >= limit)
                .is_some()
        {
            self.failing.fetch_sub(1, Ordering::AcqRel);
            if node.live.forget_heartbeat_if_not_after(heard) {
                self.metrics.nodes_marked_unhealthy.inc();
                tracing::warn!(node = %node.id, "upstream failing: marked unhealthy until its next heartbeat");
            } else {
                tracing::debug!(node = %node.id, "upstream failing, but it reported since: not marked");
            }
        }
        tracing::debug!(node = %node.id, error = why, "upstream request failed");
        ApiError::UpstreamUnavailable(format!("node {} did not answer", node.id))
    }
}

/// Counts a tunnel as open for as long as it lives (also if its task is cancelled).
struct OpenTunnel(ProxyMetrics);

impl OpenTunnel {
    fn new(m: &ProxyMetrics) -> OpenTunnel {
        m.tunnels.inc();
        m.tunnels_open.inc();
        OpenTunnel(m.clone())
    }
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.tunnels_open.dec();
    }
}

/// Whether an exchange failed because the client's body, streamed to the node, could not be
/// read: below the upstream connection's error for the body it was given, the client
/// connection's own, caused by a framing hyper's decoder refused (`InvalidInput` or
/// `InvalidData`: a bad chunk size line, say; a client gone mid-body is neither).
fn client_body_malformed(e: &hyper::Error) -> bool {
    if !e.is_user() {
        return false;
    }
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            );
        }
        cur = err.source();
    }
    false
}

fn caused_by<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<E>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The event loop the request's connection is served on (its pools' shard).
fn event_loop(parts: &Parts) -> usize {
    parts
        .extensions
        .get::<ConnInfo>()
        .map_or(0, |info| info.event_loop)
}

pub(crate) fn bad_upstream(node: &NodeEntry) -> ApiError {
    ApiError::UpstreamUnavailable(format!("bad upstream URL for {}", node.id))
}

/// The authority (the node's `Host`) and base path (no trailing `/`) of an upstream base URL
/// such as `http://10.0.0.5:8080` or `https://user@node.example/media/`.
pub(crate) fn upstream_parts(upstream: &str) -> Option<(&str, &str)> {
    let rest = upstream.split_once("://").map_or(upstream, |(_, r)| r);
    let (authority, base) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit('@').next().filter(|h| !h.is_empty())?;
    Some((host, base.trim_end_matches('/')))
}

/// The `Host` header and origin-form target for a request to `uri` forwarded to the node
/// whose base URL is `upstream` (`http://10.0.0.5:8080`, or with a path prefix such as
/// `https://node.example/media/`, which the target keeps). `instead`: the origin-form target
/// to send in place of the request's.
fn lane_target(upstream: &str, uri: &Uri, instead: Option<&str>) -> Option<(HeaderValue, Uri)> {
    let (host, base) = upstream_parts(upstream)?;
    let pq = uri.path_and_query();
    let target = match (instead, pq) {
        (Some(t), _) => format!("{base}{t}").parse().ok()?,
        // The common case copies nothing: the request's own path and query.
        (None, Some(pq)) if base.is_empty() && pq.as_str().starts_with('/') => {
            Uri::from(pq.clone())
        }
        _ => format!("{base}{}", origin_form(uri)).parse().ok()?,
    };
    Some((HeaderValue::from_str(host).ok()?, target))
}

/// A node's response head as the client gets it: hop-by-hop headers gone, the node named.
/// Transfer codings other than chunked stay: hyper took the chunks off, but what is left is
/// still coded (`gzip`), and hyper's server chunks it again after them. A `Content-Length`
/// beside a `Transfer-Encoding` goes (RFC 9112 §6.3: the coding frames the body, and a proxy
/// must remove the length): hyper's client leaves it, and hyper's server would frame the
/// body it relays by it. A length the node repeated (`5, 5`, which hyper's client takes)
/// goes to the client once, as the fast path sends it: not every client reads a list.
fn answer_head(rp: &mut http::response::Parts, node: &NodeEntry) {
    let codings = codings_besides_chunked(&rp.headers);
    if rp.headers.contains_key(header::TRANSFER_ENCODING) {
        rp.headers.remove(header::CONTENT_LENGTH);
    } else if let Some(n) = repeated_length(&rp.headers) {
        rp.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    strip_hop_by_hop(&mut rp.headers);
    if let Some(c) = codings {
        rp.headers.insert(header::TRANSFER_ENCODING, c);
    }
    set_node(&mut rp.headers, node);
    rp.version = Version::HTTP_11;
}

/// The `Transfer-Encoding` codings of a message other than `chunked`, in order, if any.
fn codings_besides_chunked(h: &HeaderMap) -> Option<HeaderValue> {
    let mut codings = Vec::new();
    for v in h.get_all(header::TRANSFER_ENCODING) {
        let v = v.to_str().ok()?;
        codings.extend(
            v.split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("chunked")),
        );
    }
    if codings.is_empty() {
        return None;
    }
    HeaderValue::from_str(&codings.join(", ")).ok()
}

fn set_node(h: &mut HeaderMap, node: &NodeEntry) {
    if let Ok(v) = HeaderValue::from_str(node.id.as_str()) {
        h.insert(X_ROOM_NODE, v);
    }
}

/// The one length of a `Content-Length` given more than once (a list, or several lines)
/// with the same value; `None` for a single plain value or none.
fn repeated_length(h: &HeaderMap) -> Option<u64> {
    let mut all = h.get_all(header::CONTENT_LENGTH).iter();
    let first = all.next()?;
    let n = parse_length_list(first.as_bytes())?;
    let mut repeated = first.as_bytes().contains(&b',');
    for v in all {
        if parse_length_list(v.as_bytes())? != n {
            return None;
        }
        repeated = true;
    }
    repeated.then_some(n)
}

pub(crate) fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A copy of bodiless `req`'s head, to send again.
fn bodiless_copy(req: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(Empty::new().map_err(|never| match never {}).boxed());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// Whether an exchange failed because the connection ended (closed or reset) before any
/// answer came, rather than on an answer the node got wrong.
fn closed_before_answer(e: &hyper::Error) -> bool {
    e.is_incomplete_message()
        || e.is_closed()
        || e.is_canceled()
        || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// A request whose body is in a transfer coding besides chunked (`gzip, chunked`), which
/// the proxy refuses: hyper's server takes the chunks off and leaves the rest coded.
pub fn coded_body(h: &HeaderMap) -> bool {
    h.contains_key(header::TRANSFER_ENCODING) && codings_besides_chunked(h).is_some()
}

/// An upgrade request that carries a body (a length over 0, or a transfer coding), which
/// the proxy refuses: it sends an upgrade bodiless.
pub fn upgrade_with_body(parts: &Parts) -> bool {
    upgrade_protocol(parts).is_some()
        && (content_length(&parts.headers).is_some_and(|l| l > 0)
            || parts.headers.contains_key(header::TRANSFER_ENCODING))
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` + `Upgrade`).
fn upgrade_protocol(parts: &Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let asks = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| parts.headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Header names the proxy sets, parsed once.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_ROOM_NODE: HeaderName = HeaderName::from_static("x-room-node");
const X_ROOM_TICKET: HeaderName = HeaderName::from_static("x-room-ticket");

/// Whether `n` is a hop-by-hop header (the one list, shared with the fast path): never
/// forwarded.
fn is_hop_by_hop(n: &HeaderName) -> bool {
    super::h1::head::is_hop_by_hop(n.as_str().as_bytes())
}

/// Whether a `101` answer is a switch to a protocol the request asked for (RFC 9110 section
/// 7.8): `Connection: upgrade` and an `Upgrade` whose protocols the request's `Upgrade` named.
fn switches_to_asked(request: &HeaderMap, answer: &HeaderMap) -> bool {
    let tokens = |h: &HeaderMap, name: header::HeaderName| -> Vec<String> {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    };
    let asked = tokens(request, header::UPGRADE);
    let named = tokens(answer, header::UPGRADE);
    tokens(answer, header::CONNECTION)
        .iter()
        .any(|t| t == "upgrade")
        && !named.is_empty()
        && named.iter().all(|p| asked.contains(p))
}

/// The header names a `Connection` header lists (they are hop-by-hop for this message).
fn connection_listed(h: &HeaderMap) -> Vec<HeaderName> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// A request's end-to-end headers, as they go to the node: all but the hop-by-hop ones,
/// those the `Connection` header lists, `Host` (the node's own is set by the lane), and the
/// client's own under the names the router sets, `_` read as `-` (`X_Room_Ticket`; see
/// [`set_by_proxy`](super::h1::head::set_by_proxy)): those never reach the node, even where
/// the router has nothing to put in their place (a request with no `Host`), nor do framing
/// and hop-by-hop names spelled so (`Transfer_Encoding`: see
/// [`underscored_framing`](super::h1::head::underscored_framing)), nor do its own
/// claims of its address, scheme and host under other names (`Forwarded`, `X-Real-IP`),
/// which a node behind a trusted proxy would believe. `X-Forwarded-For` itself stays, for
/// `forwarded_headers` to extend.
fn end_to_end(src: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(src);
    let mut h = HeaderMap::with_capacity(src.len() + 6);
    for (name, value) in src {
        let n = name.as_str().as_bytes();
        let claimed = name != X_FORWARDED_FOR && set_by_proxy(n) || underscored_framing(n);
        if name != header::HOST && !is_hop_by_hop(name) && !listed.contains(name) && !claimed {
            // The length goes as the number hyper framed the body by, once (`0005`, or
            // `5, 5`, would reach the node as written, for its parser to read otherwise).
            if name == header::CONTENT_LENGTH {
                if let Some(len) = parse_length_list(value.as_bytes()) {
                    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                    continue;
                }
            }
            h.append(name.clone(), value.clone());
        }
    }
    join_cookies(&mut h);
    h
}

/// An HTTP/2 client may send its cookies as several `cookie` fields (RFC 9113 section
/// 8.2.3); an HTTP/1.1 request must carry one `Cookie` line (RFC 6265 section 5.4), and a
/// node that reads only the first would lose the rest (the session among them). They are
/// joined with "; ", in order.
fn join_cookies(h: &mut HeaderMap) {
    let mut all = h.get_all(header::COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in h.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

/// Removes the hop-by-hop headers: those RFC 9110 names plus any the `Connection` header lists.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one look at each name and nothing else.
    let mut drop: Vec<HeaderName> = h.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    if drop.is_empty() {
        return;
    }
    drop.extend(connection_listed(h));
    for n in drop {
        h.remove(n);
    }
}

/// A body that fails when no frame arrives for `idle`.
/// What [`IdleTimeout`] fails a body with.
#[derive(Debug, thiserror::Error)]
#[error("body idle for too long")]
struct BodyIdle;

struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    /// Armed the first time the body has to wait: a body that is ready whenever it is
    /// polled (most small requests and responses) never touches the timer wheel.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was last set.
    progressed: bool,
}

impl<B> IdleTimeout<B> {
    fn new(inner: B, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            timer: None,
            progressed: false,
        }
    }
}

impl<B> HttpBody for IdleTimeout<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.progressed = true;
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = match &mut this.timer {
                    Some(t) => {
                        if this.progressed {
                            t.as_mut().reset(tokio::time::Instant::now() + idle);
                        }
                        t
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep(idle))),
                };
                this.progressed = false;
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyIdle.into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why an exchange ran out of time.
#[derive(Debug, PartialEq, Eq)]
enum Late {
    /// No response head within `response_timeout` of the request's end.
    Answer,
    /// The upload stalled on the node's side: for a whole idle period the node took no frame
    /// of the body while the client had one ready.
    Upload,
}

/// Runs `f`, failing if it takes longer than `limit` after the upload ends (at once without
/// one; its body dropped counts as ended), or if the upload stalls on the node's side before.
async fn within_after<F: Future>(
    upload: Option<Upload>,
    limit: Duration,
    f: F,
) -> Result<F::Output, Late> {
    let mut f = std::pin::pin!(f);
    if let Some(Upload {
        mut ended,
        progress,
        idle,
    }) = upload
    {
        let mut seen = progress.frames.load(Ordering::Acquire);
        loop {
            tokio::select! {
                r = &mut f => return Ok(r),
                _ = &mut ended => break,
                () = tokio::time::sleep(idle) => {
                    let now = progress.frames.load(Ordering::Acquire);
                    // A client that sends nothing is the body's own `IdleTimeout` to end.
                    if now == seen && !progress.awaiting_client.load(Ordering::Acquire) {
                        return Err(Late::Upload);
                    }
                    seen = now;
                }
            }
        }
    }
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| Late::Answer)
}

/// How far a request body has gone towards the node, for the exchange's watchdog: hyper stops
/// polling the body while the node does not read, and a timer inside the body never fires then.
#[derive(Default)]
struct BodyProgress {
    /// Frames handed to hyper so far.
    frames: AtomicU64,
    /// The last poll found nothing from the client yet: any stall now is the client's.
    awaiting_client: AtomicBool,
    /// Its end was read: the node connection carries nothing more of it.
    whole: AtomicBool,
}

impl Uploaded for BodyProgress {
    fn whole(&self) -> bool {
        self.whole.load(Ordering::Acquire)
    }
}

/// The exchange's side of an upload: when its body ended, and how it is going.
struct Upload {
    ended: tokio::sync::oneshot::Receiver<()>,
    progress: Arc<BodyProgress>,
    idle: Duration,
}

/// A body that says when it is over (its end was read, or it was dropped: the exchange gave
/// up on it) and how far it has got.
struct EndSignal<B> {
    inner: B,
    end: Option<tokio::sync::oneshot::Sender<()>>,
    progress: Arc<BodyProgress>,
}

impl<B> EndSignal<B> {
    fn new(inner: B, idle: Duration) -> (Self, Upload) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let progress = Arc::new(BodyProgress::default());
        (
            EndSignal {
                inner,
                end: Some(tx),
                progress: progress.clone(),
            },
            Upload {
                ended: rx,
                progress,
                idle,
            },
        )
    }
}

impl<B> HttpBody for EndSignal<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        let waiting = r.is_pending();
        this.progress
            .awaiting_client
            .store(waiting, Ordering::Release);
        if !waiting {
            this.progress.frames.fetch_add(1, Ordering::Release);
        }
        if matches!(r, Poll::Ready(None)) || this.inner.is_end_stream() {
            this.progress.whole.store(true, Ordering::Release);
            if let Some(tx) = this.end.take() {
                let _ = tx.send(());
            }
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

/// Copies bytes both ways between the upgraded client and upstream connections until both
/// directions end, either fails, or nothing moves for `idle`.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, idle: Duration) {
    let (c, u) = match tokio::try_join!(client, upstream) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let started = Instant::now();
    let last = AtomicU64::new(0);
    let (mut cr, mut cw) = tokio::io::split(TokioIo::new(c));
    let (mut ur, mut uw) = tokio::io::split(TokioIo::new(u));
    let pumps = async {
        tokio::try_join!(
            pump(&mut cr, &mut uw, &last, started),
            pump(&mut ur, &mut cw, &last, started)
        )
    };
    let watchdog = async {
        let step = (idle / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(step).await;
            let quiet = started.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
            if quiet >= idle.as_millis() as u64 {
                return;
            }
        }
    };
    tokio::select! {
        r = pumps => if let Err(e) = r { tracing::debug!(error = %e, "tunnel ended with an error") },
        _ = watchdog => tracing::debug!("tunnel idle; closed"),
    }
}

async fn pump<R, W>(r: &mut R, w: &mut W, last: &AtomicU64, started: Instant) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the other direction may still be talking.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::COOKIE, "a=b".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::COOKIE));
    }

    #[test]
    fn a_forwarded_request_keeps_its_end_to_end_headers_only() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "router.example".parse().unwrap());
        h.insert(header::CONNECTION, "x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::PROXY_AUTHORIZATION, "Basic eA==".parse().unwrap());
        h.append(header::ACCEPT, "text/html".parse().unwrap());
        h.append(header::ACCEPT, "application/json".parse().unwrap());
        h.insert("x-custom", "kept".parse().unwrap());
        // The client's own under the names the router sets, also spelled with `_` (which
        // CGI-style stacks read as `-`), go; `X-Forwarded-For` stays, to be extended.
        for name in [
            "x-room-ticket",
            "x_room_ticket",
            "X_Forwarded_For",
            "x_real_ip",
        ] {
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "forged".parse().unwrap(),
            );
        }
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        let out = end_to_end(&h);
        assert_eq!(out.len(), 4, "{out:?}");
        let accept: Vec<_> = out.get_all(header::ACCEPT).iter().collect();
        assert_eq!(accept, ["text/html", "application/json"]);
        assert_eq!(out["x-custom"], "kept");
        assert_eq!(out["x-forwarded-for"], "10.0.0.1");
    }

    /// A node `media-1` at an address nothing listens on.
    fn media_1() -> NodeEntry {
        let info = crate::cluster::NodeInfo {
            url: "http://127.0.0.1:9".into(),
            upstream: "http://127.0.0.1:9".into(),
            capacity: 100.0,
            region: None,
            tags: vec![],
        };
        NodeEntry::new(
            NodeId::parse("media-1").unwrap(),
            info,
            Default::default(),
            false,
        )
    }

    /// A proxy that marks a node after `n` failures in a row.
    fn failing_after(n: u32) -> Proxy {
        let cfg = ProxyConfig {
            failures_to_unhealthy: n,
            ..ProxyConfig::default()
        };
        Proxy::new(&cfg, 1, ProxyMetrics::default()).unwrap()
    }

    #[tokio::test]
    async fn a_success_ends_a_nodes_run_of_failures() {
        let p = failing_after(2);
        let node = media_1();
        p.failed(&node, node.live.last_word(), "refused");
        p.succeeded(&node, Instant::now());
        p.failed(&node, node.live.last_word(), "refused");
        assert_eq!(p.metrics.nodes_marked_unhealthy.get(), 0);
        p.failed(&node, node.live.last_word(), "refused");
        assert_eq!(p.metrics.nodes_marked_unhealthy.get(), 1);
        // Marking ends the run and its entry: a node that died and never comes back (its
        // id forgotten) leaves nothing for every later success to look up.
        assert_eq!(p.failing.load(Ordering::Relaxed), 0);
        assert!(p.failures.is_empty());
        p.failed(&node, node.live.last_word(), "refused");
        assert_eq!(p.metrics.nodes_marked_unhealthy.get(), 1, "a new run");
        // A success with nothing failing is a no-op.
        p.succeeded(&node, Instant::now());
        p.succeeded(&node, Instant::now());
        assert_eq!(p.failing.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn failures_of_exchanges_begun_before_a_nodes_latest_report_do_not_mark_it() {
        let p = failing_after(2);
        let node = media_1();
        let report = |at| {
            node.live
                .record_report(100.0, 0.0, None, crate::placement::AdminState::Active, at)
        };
        report(1_000);
        // Two exchanges begin; the node restarts and reports at 2 000; then both time out.
        let heard = node.live.last_word();
        report(2_000);
        p.failed(&node, heard, "no response in time");
        p.failed(&node, heard, "no response in time");
        assert_eq!(p.metrics.nodes_marked_unhealthy.get(), 0);
        assert_eq!(
            node.live.last_heartbeat(),
            Some(2_000),
            "the new report stands"
        );
        // Failures of exchanges begun after it do mark it, even if a store outage's hold
        // moved its heartbeat time meanwhile: a hold is no word from the node.
        let heard = node.live.last_word();
        node.live.hold_heartbeat(2_250);
        p.failed(&node, heard, "refused");
        p.failed(&node, heard, "refused");
        assert_eq!(p.metrics.nodes_marked_unhealthy.get(), 1);
        assert_eq!(node.live.last_heartbeat(), None);
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_left_as_it_is() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        h.append("x-a", "1".parse().unwrap());
        h.append("x-a", "2".parse().unwrap());
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn a_lane_request_names_the_nodes_host_and_keeps_its_base_path() {
        let target = |up: &str, uri: &str| {
            lane_target(up, &uri.parse().unwrap(), None)
                .map(|(h, t)| (h.to_str().unwrap().to_string(), t.to_string()))
        };
        let pair = |h: &str, t: &str| Some((h.to_string(), t.to_string()));
        assert_eq!(
            target("http://10.0.0.5:8080", "/rooms/a?x=1"),
            pair("10.0.0.5:8080", "/rooms/a?x=1")
        );
        // HTTP/2 clients send absolute URIs: only the path and query go upstream.
        assert_eq!(
            target("http://[::1]:9000/", "http://router.example/rooms/a"),
            pair("[::1]:9000", "/rooms/a")
        );
        assert_eq!(
            target("https://user:pw@node.example/media/", "/rooms/a"),
            pair("node.example", "/media/rooms/a")
        );
        assert_eq!(target("http://", "/rooms/a"), None);
        // An absolute URI with a query and no path: the path `/`, or the node gets `?room=a`.
        assert_eq!(
            target("http://10.0.0.5:8080", "http://router.example?room=a"),
            pair("10.0.0.5:8080", "/?room=a")
        );
        assert_eq!(
            target("http://10.0.0.5:8080/media", "http://router.example?room=a"),
            pair("10.0.0.5:8080", "/media/?room=a")
        );
    }

    #[test]
    fn only_http11_requests_with_connection_upgrade_upgrade() {
        let req = |v: Version, conn: &str| {
            let (p, _) = Request::builder()
                .version(v)
                .header(header::CONNECTION, conn)
                .header(header::UPGRADE, "websocket")
                .body(())
                .unwrap()
                .into_parts();
            p
        };
        assert!(upgrade_protocol(&req(Version::HTTP_11, "keep-alive, Upgrade")).is_some());
        assert!(upgrade_protocol(&req(Version::HTTP_11, "keep-alive")).is_none());
        assert!(upgrade_protocol(&req(Version::HTTP_2, "upgrade")).is_none());
    }
}

#[cfg(test)]
mod idle_tests {
    use super::*;

    /// A body that yields one frame when polled the first `frames` times (each time after
    /// `gap`), then waits forever.
    struct Trickle {
        frames: usize,
        gap: Duration,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl HttpBody for Trickle {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.frames == 0 {
                return Poll::Pending;
            }
            let gap = self.gap;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
            match sleep.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => {
                    self.sleep = None;
                    self.frames -= 1;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
                }
            }
        }
    }

    #[tokio::test]
    async fn a_body_that_keeps_flowing_is_never_cut_and_a_stalled_one_is() {
        let idle = Duration::from_millis(150);
        // Ten frames 60 ms apart: 600 ms in all, four times the idle timeout, never idle.
        let mut body = IdleTimeout::new(
            Trickle {
                frames: 10,
                gap: Duration::from_millis(60),
                sleep: None,
            },
            idle,
        );
        for _ in 0..10 {
            let f = body.frame().await.expect("a frame").expect("not cut");
            assert_eq!(f.into_data().unwrap(), "x");
        }
        // Then it stalls: cut after the idle timeout, not before and not never.
        let t = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the idle timeout fires");
        assert!(matches!(r, Some(Err(_))), "a stalled body ends in an error");
        assert!(t.elapsed() >= idle, "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn a_ready_body_never_arms_the_timer() {
        let mut body = IdleTimeout::new(
            http_body_util::Full::new(Bytes::from_static(b"hello")),
            SECOND,
        );
        assert!(body.frame().await.unwrap().is_ok());
        assert!(body.timer.is_none());
    }

    const SECOND: Duration = Duration::from_secs(1);
}
