//! The HTTP surface: one listener serving users (front door), nodes (heartbeats), admins
//! (node and room management) and operations (health, readiness, metrics, dashboard).
//!
//! Layers, outermost first: `server` accepts connections and enforces limits and timeouts;
//! `routes` maps (method, path) to a handler; handlers in `api`, `front_door` and `ops`
//! parse, authenticate, call the [`Router`] and render. Handlers never
//! decide placement; `error` renders every failure the same way.

pub mod api;
pub mod error;
pub mod front_door;
pub mod h1;
pub mod idle;
pub mod loops;
pub mod ops;
pub mod proxy;
pub mod resolve;
pub mod routes;
pub mod server;
pub mod sniff;
pub mod tls;
pub mod upstream;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;

use crate::auth::{TicketIssuer, Tokens, UserVerifier};
use crate::config::{Config, UserAuth};
use crate::router::Router;
use crate::store::PinStore;
pub use error::ApiError;
use routes::{RoomPattern, Route};

/// Errors a response body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body: boxed so buffered answers and (later) streamed proxy bodies mix.
pub type Body = BoxBody<Bytes, BoxError>;

/// A buffered body.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Everything a handler needs, built once at start.
pub struct App<S> {
    pub router: Router<S>,
    pub cfg: Arc<Config>,
    pub tokens: Tokens,
    pub tickets: TicketIssuer,
    pub patterns: Vec<RoomPattern>,
    /// User JWT verification; `Some` exactly when `auth.users = "jwt"`.
    pub users: Option<Result<UserVerifier, String>>,
    /// The pooled upstream client and passive health for proxy mode.
    pub proxy: proxy::Proxy,
    /// When (router clock, ms) a heartbeat's invalid rooms were last logged as a warning:
    /// at most one a minute (`api::heartbeat`).
    pub refused_rooms_warned_at: AtomicU64,
}

impl<S: PinStore> App<S> {
    pub fn new(cfg: Config, router: Router<S>) -> App<S> {
        let patterns = cfg
            .front_door
            .routes
            .iter()
            .filter_map(|p| RoomPattern::parse(p).ok())
            .collect();
        // Config::validate has loaded these keys already; a failure here (a file changed since)
        // fails closed: users get 401, upstream TLS trusts nothing.
        let users =
            (cfg.auth.users == UserAuth::Jwt).then(|| UserVerifier::from_config(&cfg.auth.jwt));
        if let Some(Err(e)) = &users {
            tracing::error!(error = %e, "auth.jwt key unusable; every user token is refused");
        }
        let counts = router.metrics.proxy.clone();
        let loops = cfg.server.event_loops();
        let proxy = proxy::Proxy::new(&cfg.proxy, loops, counts.clone()).unwrap_or_else(|e| {
            tracing::error!(error = %e, "proxy.ca_file unusable; https upstreams will fail");
            proxy::Proxy::new(
                &crate::config::ProxyConfig {
                    ca_file: None,
                    ..cfg.proxy.clone()
                },
                loops,
                counts,
            )
            .expect("a proxy without a CA file always builds")
        });
        App {
            users,
            proxy,
            refused_rooms_warned_at: AtomicU64::new(0),
            tokens: Tokens::from_config(&cfg.auth),
            tickets: TicketIssuer::new(&cfg.tickets.secret, cfg.tickets.ttl)
                .with_leeway(cfg.tickets.leeway),
            patterns,
            router,
            cfg: Arc::new(cfg),
        }
    }

    pub fn retry_after(&self) -> Duration {
        self.cfg.placement.retry_after
    }
}

/// Reads a request body, refusing more than `limit` bytes or taking longer than `timeout`.
pub async fn read_body(
    body: Incoming,
    headers: &HeaderMap,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(ApiError::PayloadTooLarge(limit));
        }
    }
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Err(_) => Err(ApiError::RequestTimeout),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::PayloadTooLarge(limit))
        }
        Ok(Err(e)) => Err(ApiError::InvalidRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// Parses a JSON body into `T`, with a clear error.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))
}

/// The entry point for every request.
pub async fn handle<S: PinStore>(
    app: Arc<App<S>>,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let route = routes::route(parts.uri.path());
    let result = match check_host(&parts) {
        Ok(()) => dispatch(&app, &route, &parts, body, peer).await,
        Err(e) => Err(e),
    };
    result.unwrap_or_else(|e| error_response(&app, parts.uri.path(), e))
}

/// RFC 9112 section 3.2: an HTTP/1.1 request carries exactly one `Host`, and no HTTP/1.x
/// request carries two; either way its value is a host and optional port. Anything else is
/// a 400, as the RFC requires of a server, before any handler sees the request (a proxy
/// or cache in front could read a different host than the router did). HTTP/2 names its
/// authority in `:authority` and is left to hyper.
fn check_host(parts: &http::request::Parts) -> Result<(), ApiError> {
    if parts.version > http::Version::HTTP_11 {
        return Ok(());
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if parts.version == http::Version::HTTP_11 => Err(ApiError::InvalidRequest(
            "an HTTP/1.1 request needs a Host header".into(),
        )),
        (Some(_), Some(_)) => Err(ApiError::InvalidRequest(
            "a request carries one Host header, not several".into(),
        )),
        (Some(h), None) if !valid_host(h.as_bytes()) => Err(ApiError::InvalidRequest(
            "the Host header is not a host and optional port".into(),
        )),
        _ => Ok(()),
    }
}

/// Whether `v` is a `Host` value: `uri-host [ ":" port ]` (RFC 9110 section 7.2; RFC 3986
/// section 3.2.2 for the host), or empty (RFC 9112 section 3.2: a target whose authority is
/// empty). No user info, path, spaces or controls. Checked byte by byte, with no copy: the
/// fast path asks it of every request.
pub(crate) fn valid_host(v: &[u8]) -> bool {
    let (host, port) = match v.first() {
        // An IP literal: `[` hex digits, `:`, `.`, a zone (`%25eth0`) or IPvFuture `]`.
        Some(b'[') => match v.iter().position(|&b| b == b']') {
            Some(end) => {
                let inside = &v[1..end];
                let ok = !inside.is_empty()
                    && inside
                        .iter()
                        .all(|&b| b.is_ascii_alphanumeric() || b":.%-_~".contains(&b));
                if !ok {
                    return false;
                }
                (&v[..0], &v[end + 1..])
            }
            None => return false,
        },
        _ => match v.iter().position(|&b| b == b':') {
            Some(colon) => (&v[..colon], &v[colon..]),
            None => (v, &v[..0]),
        },
    };
    let reg_name = host
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b));
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    reg_name && port_ok
}

/// The answer for a failed request, counted and logged the same way whichever server
/// (hyper's or the fast path) carried it.
pub fn error_response<S: PinStore>(app: &App<S>, path: &str, e: ApiError) -> Response<Body> {
    app.router.metrics.error(e.code());
    if e.status().is_server_error() {
        tracing::warn!(path, code = e.code(), "{}", e.message());
    } else {
        tracing::debug!(path, code = e.code(), "{}", e.message());
    }
    e.into_response()
}

async fn dispatch<S: PinStore>(
    app: &App<S>,
    route: &Route<'_>,
    parts: &http::request::Parts,
    body: Incoming,
    peer: std::net::SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let m = &parts.method;
    let get = m == Method::GET || m == Method::HEAD;
    match (route, m) {
        (Route::Healthz, _) if get => Ok(ops::healthz()),
        (Route::Readyz, _) if get => ops::readyz(app),
        (Route::Metrics, _) if get => Ok(ops::metrics(app).await),
        (Route::Dashboard, _) if get => ops::dashboard(app, parts).await,
        (Route::Login, &Method::POST) => api::login(app, parts, body).await,
        (Route::Placement(room), &Method::GET) => api::placement(app, parts, room).await,
        (Route::PlacementExplain(room), _) if get => api::explain(app, parts, room).await,
        (Route::PlacementBatch, &Method::POST) => api::placement_batch(app, parts, body).await,
        (Route::Heartbeat(id), &Method::POST) => api::heartbeat(app, parts, body, id).await,
        (Route::Nodes, _) if get => api::list_nodes(app, parts),
        (Route::Node(id), _) if get => api::get_node(app, parts, id),
        (Route::Node(id), &Method::PUT) => api::put_node(app, parts, body, id).await,
        (Route::Node(id), &Method::DELETE) => api::delete_node(app, parts, id),
        (Route::NodeAction(id, action), &Method::POST) => api::node_action(app, parts, id, action),
        (Route::Rooms, _) if get => api::list_rooms(app, parts).await,
        (Route::Room(room), _) if get => api::get_room(app, parts, room).await,
        (Route::Room(room), &Method::DELETE) => api::delete_room(app, parts, room).await,
        (Route::UnknownApi, _) => Err(ApiError::NotFound(format!(
            "no such endpoint: {}",
            parts.uri.path()
        ))),
        (Route::FrontDoor, _) => front_door::handle(app, parts, body, peer).await,
        (r, _) => Err(ApiError::MethodNotAllowed(r.allowed())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(version: http::Version, hosts: &[&str]) -> http::request::Parts {
        let mut b = Request::builder().uri("/rooms/a").version(version);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_host_is_a_host_and_an_optional_port() {
        for ok in [
            "",
            "router.example",
            "router.example:8443",
            "10.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "[fe80::1%25eth0]:80",
            "xn--bcher-kva.example",
            "host:",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok:?} is a host");
        }
        for bad in [
            "user@router.example",
            "router.example/path",
            "router example",
            "router.example:80:80",
            "router.example:http",
            "router.example:123456",
            "[::1",
            "[]",
            "[::1]x",
            "a\tb",
            "a?b",
            "a#b",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?} is not a host");
        }
    }

    #[test]
    fn http_1_1_needs_exactly_one_valid_host_and_http_1_0_at_most_one() {
        use http::Version;
        assert!(check_host(&parts(Version::HTTP_11, &["r.example"])).is_ok());
        assert!(check_host(&parts(Version::HTTP_11, &[])).is_err());
        assert!(check_host(&parts(Version::HTTP_11, &["a", "b"])).is_err());
        assert!(check_host(&parts(Version::HTTP_11, &["a", "a"])).is_err());
        assert!(check_host(&parts(Version::HTTP_11, &["u@a"])).is_err());
        assert!(check_host(&parts(Version::HTTP_10, &[])).is_ok());
        assert!(check_host(&parts(Version::HTTP_10, &["a", "b"])).is_err());
        // HTTP/2 names its authority in `:authority`.
        assert!(check_host(&parts(Version::HTTP_2, &[])).is_ok());
    }
}
