//! Message heads on the fast path: a client's request head parsed (httparse) and checked
//! against what the fast path carries, the head forwarded to the node, the node's response
//! head parsed and rewritten for the client, and buffered answers (redirects, errors)
//! written out.
//!
//! What the fast path does not carry is [`Parse::Other`]: the connection then goes to hyper
//! with every byte still unread, so hyper's rules (400s, 431s, chunked request bodies,
//! `Expect`, upgrades, HTTP/1.0, HTTP/2) apply unchanged.

use std::ops::Range;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;

use crate::http::routes::{self, Route};
use crate::http::Body;

/// Most header fields in a request or response head the fast path parses.
pub const MAX_HEADERS: usize = 100;

/// What a client's buffered bytes hold.
pub enum Parse {
    /// Not a whole head yet.
    Partial,
    /// A head the fast path carries, `len` bytes long.
    Head(Plan),
    /// Anything else: hyper's.
    Other,
}

/// Where the parts of a request head lie in the client's buffer, and what the head says
/// about framing.
pub struct Plan {
    pub len: usize,
    /// A placement lookup (`GET /v1/placement/{room}`) rather than a front-door request.
    lookup: bool,
    method: Range<usize>,
    target: Range<usize>,
    headers: Vec<(Range<usize>, Range<usize>)>,
    /// Request body length (`Content-Length`; 0 without one).
    pub body: u64,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// A request the fast path is carrying.
pub struct RequestHead {
    pub parts: Parts,
    /// A placement lookup (`GET /v1/placement/{room}`, no body).
    pub lookup: bool,
    pub body: u64,
    pub close: bool,
}

/// Parses the request head at the start of `buf` and decides whether the fast path carries
/// it: HTTP/1.1, a front-door path (or a bodiless placement lookup), a body framed by at
/// most one `Content-Length` (no `Transfer-Encoding`), no `Expect`, no upgrade.
pub fn parse_request(buf: &[u8]) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Other,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parse::Other;
    };
    if method == "CONNECT" {
        return Parse::Other;
    }
    // A fragment is never part of a request target, but httparse takes `#`: hyper's URI
    // parse drops it, so such a request is hyper's, routed as hyper routes it (the fast
    // path would route `/metrics#` as a front-door path).
    if path.contains('#') {
        return Parse::Other;
    }
    // The path the routes see: origin form as it is; absolute form (`http://host/p`) through
    // a URI parse (rare: proxies send it, browsers do not).
    let route_path: std::borrow::Cow<'_, str> = if path.starts_with('/') {
        path.split_once('?').map_or(path, |(p, _)| p).into()
    } else {
        match Uri::try_from(path) {
            Ok(u) if u.scheme().is_some() => u.path().to_owned().into(),
            _ => return Parse::Other,
        }
    };
    let lookup = match routes::route(&route_path) {
        Route::FrontDoor => false,
        Route::Placement(_) if method == "GET" => true,
        _ => return Parse::Other,
    };
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    let mut body = None;
    let mut close = false;
    let mut hosts = 0u32;
    let mut plan_headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Parse::Other;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            match (body, parse_length(h.value)) {
                (None, Some(n)) => body = Some(n),
                _ => return Parse::Other,
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            // RFC 9112 section 3.2: one valid `Host`, or hyper's path answers the 400.
            hosts += 1;
            if hosts > 1 || !crate::http::valid_host(h.value) {
                return Parse::Other;
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in tokens(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    return Parse::Other;
                }
            }
        }
        plan_headers.push((at(name), at(h.value)));
    }
    if hosts == 0 || lookup && body.is_some_and(|n| n > 0) {
        return Parse::Other;
    }
    Parse::Head(Plan {
        len,
        lookup,
        method: at(method.as_bytes()),
        target: at(path.as_bytes()),
        headers: plan_headers,
        body: body.unwrap_or(0),
        close,
    })
}

impl Plan {
    /// Builds the request's parts from `head` (the `len` bytes the plan was made from),
    /// sharing its bytes. `None` if a part does not make a valid `http` value.
    pub fn build(self, head: &Bytes) -> Option<RequestHead> {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = Method::from_bytes(&head[self.method]).ok()?;
        parts.uri = Uri::from_maybe_shared(head.slice(self.target)).ok()?;
        parts.version = Version::HTTP_11;
        let mut map = HeaderMap::with_capacity(self.headers.len());
        for (name, value) in self.headers {
            let name = HeaderName::from_bytes(&head[name]).ok()?;
            let value = HeaderValue::from_maybe_shared(head.slice(value)).ok()?;
            map.append(name, value);
        }
        parts.headers = map;
        Some(RequestHead {
            parts,
            lookup: self.lookup,
            body: self.body,
            close: self.close,
        })
    }
}

fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A node's `Content-Length` value: one length, or the same length repeated as a list
/// (`5, 5`), which RFC 9110 (8.6) lets a recipient read as that one length and hyper's
/// client takes; refused on the fast path, the node's answer would be a 502 on this path
/// alone, and a failure counted against the node. Differing values are refused.
pub(crate) fn parse_length_list(v: &[u8]) -> Option<u64> {
    let mut n = None;
    for t in tokens(v) {
        let l = parse_length(t)?;
        if n.is_some_and(|n| n != l) {
            return None;
        }
        n = Some(l);
    }
    n
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',').map(|t| t.trim_ascii())
}

/// Hop-by-hop header names (RFC 9110 sections 7.6.1 and 11.7, and legacy ones), never forwarded
/// by either proxy path. (`Trailer` is not one: it announces trailer fields, which are
/// relayed, RFC 9110 section 6.6.2.)
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The names [`is_hop_by_hop`] knows, lowercase.
const HOP: [&[u8]; 8] = [
    b"connection",
    b"te",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authorization",
    b"proxy-authenticate",
    b"keep-alive",
    b"proxy-connection",
];

/// Whether `name` reads as `lower` (a lowercase name) with `_` taken for `-` and case aside.
fn dashed_eq(name: &[u8], lower: &[u8]) -> bool {
    let dash = |b: &u8| match b {
        b'_' => b'-',
        b => b.to_ascii_lowercase(),
    };
    lower.len() == name.len() && lower.iter().copied().eq(name.iter().map(dash))
}

/// Whether `name` spells with `_` for `-` a header that frames a message or belongs to one
/// hop (`Transfer_Encoding`, `Content_Length`, `Keep_Alive`). Neither proxy path reads it
/// as one, so it would reach the node; a node stack that maps `_` to `-` (CGI-style
/// variables) could then frame the body otherwise than the router did, and read what
/// follows as a request the router never admitted (request smuggling). Both proxy paths
/// drop it, as nginx drops every header with `_` by default.
pub(crate) fn underscored_framing(name: &[u8]) -> bool {
    name.contains(&b'_')
        && (dashed_eq(name, b"content-length") || HOP.iter().any(|h| dashed_eq(name, h)))
}

/// Whether `name` is listed by any of the `Connection` values (so hop-by-hop for this
/// message).
fn listed<'a>(connection: impl IntoIterator<Item = &'a [u8]>, name: &[u8]) -> bool {
    connection
        .into_iter()
        .flat_map(tokens)
        .any(|t| t.eq_ignore_ascii_case(name))
}

/// Request headers the proxy sets itself, or that claim what only it can tell the node
/// (the client's address, scheme, host, port and path prefix: `Forwarded`, `X-Real-IP`,
/// and the other names frameworks read them from: Rack takes `X-Forwarded-Ssl: on` and
/// `X-Forwarded-Scheme` for the scheme, Spring and Rack build URLs from
/// `X-Forwarded-Port` and `X-Forwarded-Prefix`); a client's own are dropped
/// (`X-Forwarded-For` is extended instead).
const SET_BY_PROXY: [&str; 15] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
    "x-room-node",
    "x-room-ticket",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "x-forwarded-protocol",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-url-scheme",
    "front-end-https",
];

/// Whether a client's request header `name` claims one the proxy sets ([`SET_BY_PROXY`]),
/// `_` read as `-` and case aside: node stacks that map headers to CGI-style variables
/// (`HTTP_X_ROOM_TICKET`; Rack before CVE-2024-45614) read `X_Room_Ticket` as
/// `X-Room-Ticket`, and may take the client's, sent first, over the router's own. Both
/// proxy paths drop them.
pub(crate) fn set_by_proxy(name: &[u8]) -> bool {
    SET_BY_PROXY.iter().any(|s| dashed_eq(name, s.as_bytes()))
}

/// What the node is told about the request besides its own headers.
pub struct Forwarded<'a> {
    /// The node's `Host` (its upstream authority).
    pub host: &'a str,
    /// The node's base path (no trailing `/`), put before the request's path.
    pub base: &'a str,
    /// The client's address as `X-Forwarded-For` has it.
    pub peer_ip: &'a [u8],
    pub tls: bool,
    pub node: &'a str,
    pub ticket: &'a str,
    /// The origin-form target to send instead of the request's own (the user's login token
    /// taken out of its query), if any.
    pub target: Option<&'a str>,
    /// Leave out the `Authorization` header (it carried the user's login token).
    pub drop_authorization: bool,
    /// The `Referer` to send instead of the client's (empty: none), which carried the
    /// user's login token.
    pub referer: Option<&'a str>,
}

/// The target of a request to `uri` in origin form (RFC 9112 section 3.2.1): its path and
/// query, with the path `/` where an absolute-form target had none (`http://host?room=a`,
/// whose path and query read `?room=a`: sent so, the node would get an invalid request
/// line).
pub(crate) fn origin_form(uri: &Uri) -> std::borrow::Cow<'_, str> {
    match uri.path_and_query().map(|p| p.as_str()) {
        Some(pq) if pq.starts_with('?') => format!("/{pq}").into(),
        Some(pq) => pq.into(),
        None => "/".into(),
    }
}

/// Writes the head of `parts` as it goes to the node: origin-form target under the node's
/// base path, the node's `Host`, end-to-end headers only, and the proxy's own headers.
pub fn write_upstream_request(out: &mut Vec<u8>, parts: &Parts, f: &Forwarded<'_>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(f.base.as_bytes());
    match f.target {
        Some(t) => out.extend_from_slice(t.as_bytes()),
        None => out.extend_from_slice(origin_form(&parts.uri).as_bytes()),
    }
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(f.host.as_bytes());
    out.extend_from_slice(b"\r\n");
    let h = &parts.headers;
    let connection = h.get_all(header::CONNECTION);
    let has_connection = connection.iter().next().is_some();
    let mut xff_prev: Vec<&[u8]> = Vec::new();
    for (name, value) in h {
        let n = name.as_str();
        // `Content-Length` frames the body the fast path sends after this head: it goes to
        // the node even if `Connection` lists it, or the node would read the body as the
        // next request (one the router never admitted: request smuggling).
        if name == header::HOST
            || f.drop_authorization && name == header::AUTHORIZATION
            || f.referer.is_some() && name == header::REFERER
            || is_hop_by_hop(n.as_bytes())
            || underscored_framing(n.as_bytes())
            || has_connection
                && name != header::CONTENT_LENGTH
                && listed(connection.iter().map(|v| v.as_bytes()), n.as_bytes())
        {
            continue;
        }
        // The length goes as the number the body was framed by (`0005` would reach the
        // node as written, for its parser to read otherwise).
        if name == header::CONTENT_LENGTH {
            if let Some(len) = parse_length(value.as_bytes()) {
                header_line(
                    out,
                    b"content-length",
                    itoa::Buffer::new().format(len).as_bytes(),
                );
                continue;
            }
        }
        if set_by_proxy(n.as_bytes()) {
            // Only the name itself extends the chain: `X_Forwarded_For` is dropped.
            if n == "x-forwarded-for" && !value.as_bytes().trim_ascii().is_empty() {
                xff_prev.push(value.as_bytes().trim_ascii());
            }
            continue;
        }
        header_line(out, n.as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    for prev in xff_prev {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(f.peer_ip);
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(if f.tls { b"https" } else { b"http" });
    out.extend_from_slice(b"\r\n");
    let host = h
        .get(header::HOST)
        .map(|v| v.as_bytes())
        .or_else(|| parts.uri.authority().map(|a| a.as_str().as_bytes()));
    if let Some(host) = host {
        header_line(out, b"x-forwarded-host", host);
    }
    if let Some(referer) = f.referer.filter(|r| !r.is_empty()) {
        header_line(out, b"referer", referer.as_bytes());
    }
    header_line(out, b"x-room-node", f.node.as_bytes());
    header_line(out, b"x-room-ticket", f.ticket.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a response's body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (a response to HEAD, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the node closes the connection.
    UntilClose,
}

/// A node's response head, parsed.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    /// Bytes of the head in the connection's buffer.
    pub len: usize,
    pub framing: Framing,
    /// The node will close the connection after this response.
    pub close: bool,
    /// The client connection ends after this response (the client asked, or the body runs
    /// until the node closes).
    pub client_close: bool,
}

/// Why a node's response head is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    #[error("the response head is malformed")]
    Malformed,
    #[error("the response head is too large")]
    TooLarge,
    #[error("the response has an invalid Content-Length")]
    Length,
    #[error("a 101 answer to a request that asked for no upgrade")]
    UnaskedUpgrade,
}

/// Where the client's copy of a final response head goes, and what it says.
pub struct ClientHead<'a> {
    pub out: &'a mut Vec<u8>,
    pub node: &'a str,
    /// The client connection ends after this response whatever the node says.
    pub close: bool,
}

/// Parses a node's response head at the start of `buf`. `Ok(None)`: not a whole head yet.
/// A final (not 1xx) head is also written, as the client gets it, to `client.out`: the same
/// parse serves both.
pub fn parse_response(
    buf: &[u8],
    request: &Method,
    max: usize,
    client: &mut ClientHead<'_>,
) -> Result<Option<ResponseHead>, BadResponse> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max => return Err(BadResponse::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(BadResponse::TooLarge),
        Err(_) => return Err(BadResponse::Malformed),
    };
    // httparse takes any three digits; a status below 100 is none (hyper's client refuses
    // it too, and the hyper path answers 502).
    let status = resp
        .code
        .filter(|c| *c >= 100)
        .ok_or(BadResponse::Malformed)?;
    if status == 101 {
        return Err(BadResponse::UnaskedUpgrade);
    }
    let mut close = resp.version != Some(1);
    let mut length: Option<u64> = None;
    let mut bad_length = false;
    let mut chunked = None;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            match parse_length_list(h.value) {
                Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                _ => bad_length = true,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only the last coding decides: chunked last means chunked framing. The lines
            // make one list (RFC 9110, 5.3), so an empty line changes nothing.
            if let Some(last) = tokens(h.value).filter(|t| !t.is_empty()).last() {
                chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
        } else if name.eq_ignore_ascii_case(b"connection")
            && tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"close"))
        {
            close = true;
        }
    }
    // `Transfer-Encoding` overrides `Content-Length` (RFC 9112 6.3), as in hyper's client:
    // with it, the length is neither read nor relayed, so an unusable one is no error. The
    // message is still one RFC 9112 calls an error: the connection that carried it is not
    // used again (what else the node got wrong may be left on it), as HAProxy does.
    let both = chunked.is_some() && (length.is_some() || bad_length);
    if chunked.is_some() {
        length = None;
    } else if bad_length {
        return Err(BadResponse::Length);
    }
    let interim = (100..200).contains(&status);
    let framing = if *request == Method::HEAD || interim || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    if framing == Framing::UntilClose || both {
        close = true;
    }
    // A 204 that announces a body anyway (RFC 9110 forbids it) may still send it, late:
    // left on a pooled connection, those bytes would be read as the next answer's head.
    if status == 204 && (length.is_some_and(|n| n > 0) || chunked.is_some()) {
        close = true;
    }
    let head = ResponseHead {
        status,
        len,
        framing,
        close,
        client_close: client.close || framing == Framing::UntilClose,
    };
    if !interim {
        write_client_response(client.out, &resp, &head, length, client.node);
    }
    Ok(Some(head))
}

/// Writes one `transfer-encoding` line with every non-empty coding of `headers`'
/// `Transfer-Encoding` lines, in order; none when there is none.
fn write_codings(out: &mut Vec<u8>, headers: &[httparse::Header<'_>]) {
    let codings = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|h| tokens(h.value))
        .filter(|t| !t.is_empty());
    let mut first = true;
    for coding in codings {
        out.extend_from_slice(if first {
            b"transfer-encoding: ".as_slice()
        } else {
            b", ".as_slice()
        });
        out.extend_from_slice(coding);
        first = false;
    }
    if !first {
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes the client's copy of the node's response head: hop-by-hop headers dropped, the
/// body's framing restated (`length`, the node's `Content-Length` as one value), `Date`
/// added where the node sent none (RFC 9110 6.6.1 asks it of a proxy, and hyper's path
/// adds it), `X-Room-Node` set, `Connection: close` when the client connection ends after
/// it.
fn write_client_response(
    out: &mut Vec<u8>,
    resp: &httparse::Response<'_, '_>,
    parsed: &ResponseHead,
    length: Option<u64>,
    node: &str,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    let status = StatusCode::from_u16(parsed.status).ok();
    match &status {
        Some(s) => out.extend_from_slice(s.as_str().as_bytes()),
        None => out.extend_from_slice(b"500"),
    }
    out.push(b' ');
    let reason = resp.reason.unwrap_or("");
    if reason.is_empty() {
        let canonical = status.and_then(|s| s.canonical_reason()).unwrap_or("");
        out.extend_from_slice(canonical.as_bytes());
    } else {
        out.extend_from_slice(reason.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let connection = || {
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .map(|h| h.value)
    };
    let has_connection = connection().next().is_some();
    // A length stays only where it frames the body (or, for HEAD, 304, describes one); a
    // 204 (or 1xx) has none to describe and must not carry one (RFC 9110 8.6), which hyper
    // also drops: a client that took it would read the next response as this one's body.
    let no_content = parsed.status == 204 || (100..200).contains(&parsed.status);
    let keep_length = match parsed.framing {
        Framing::Length(_) => true,
        Framing::Empty => !no_content,
        _ => false,
    };
    // The relay passes the body's bytes on as they came, so the codings the node applied
    // to them (`gzip, chunked`, or `gzip` until close) go with them: dropped as hop-by-hop,
    // they would leave the client gzip bytes to take for plain content.
    let keep_codings = matches!(parsed.framing, Framing::Chunked | Framing::UntilClose);
    let mut codings_sent = false;
    let mut length_sent = false;
    let mut dated = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        // The codings go as one line listing them all, the empty ones left out, where the
        // node's first line was: the framing read here takes every line as one list (RFC
        // 9110 5.3), and a client that reads only the last (hyper's reads `chunked` then an
        // empty line as no coding) would frame the body otherwise.
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if keep_codings && !codings_sent {
                write_codings(out, resp.headers);
                codings_sent = true;
            }
            continue;
        }
        // A length that frames the body stays even if `Connection` lists it: the relay
        // sends that many bytes, and the client must know where they end. It goes once,
        // as one value, where the node's first was (`5, 5` or two lines: one `5`).
        if name.eq_ignore_ascii_case(b"content-length") {
            if let Some(n) = length.filter(|_| keep_length && !length_sent) {
                header_line(out, name, itoa::Buffer::new().format(n).as_bytes());
                length_sent = true;
            }
            continue;
        }
        if is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"x-room-node")
            || (has_connection && listed(connection(), name))
        {
            continue;
        }
        dated |= name.eq_ignore_ascii_case(b"date");
        header_line(out, name, h.value);
    }
    if parsed.framing == Framing::Chunked && !codings_sent {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    header_line(out, b"x-room-node", node.as_bytes());
    if parsed.client_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a buffered response (a redirect or an error): its head with `Content-Length` and
/// `Date`, and its body unless the request was `HEAD`.
pub async fn write_buffered(out: &mut Vec<u8>, resp: Response<Body>, head_only: bool, close: bool) {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH && name != header::CONNECTION {
            header_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(&body);
    }
}

/// Appends the current `Date` value (IMF-fixdate), formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(raw: &str) -> Option<Plan> {
        match parse_request(raw.as_bytes()) {
            Parse::Head(p) => Some(p),
            _ => None,
        }
    }

    fn head(raw: &str) -> RequestHead {
        let p = plan(raw).expect("the fast path carries it");
        let len = p.len;
        p.build(&Bytes::copy_from_slice(&raw.as_bytes()[..len]))
            .expect("builds")
    }

    #[test]
    fn a_plain_front_door_request_is_carried_with_its_parts() {
        let h = head("POST /rooms/a?x=1 HTTP/1.1\r\nHost: r.example\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello");
        assert_eq!(h.parts.method, Method::POST);
        assert_eq!(h.parts.uri, "/rooms/a?x=1");
        assert_eq!(h.body, 5);
        assert!(!h.close && !h.lookup);
        assert!(head("GET /v1/placement/a?create=false HTTP/1.1\r\nHost: x\r\n\r\n").lookup);
        let xa: Vec<_> = h.parts.headers.get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
    }

    #[test]
    fn what_the_fast_path_does_not_carry_goes_to_hyper() {
        for raw in [
            "POST /v1/placement HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            "GET /v1/placement/a/explain HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /v1/placement/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /rooms/a HTTP/1.0\r\nHost: x\r\n\r\n",
            "POST /rooms/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /rooms/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST /rooms/a HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n",
            "POST /rooms/a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET /rooms/a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /rooms/a HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "CONNECT r.example:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /rooms/a HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n",
            // RFC 9112 section 3.2: hyper's path answers these with a 400.
            "GET /rooms/a HTTP/1.1\r\n\r\n",
            "GET /rooms/a HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n",
            "GET /rooms/a HTTP/1.1\r\nHost: u@x\r\n\r\n",
            "GET /v1/placement/a HTTP/1.1\r\nHost: x/y\r\n\r\n",
        ] {
            assert!(
                matches!(parse_request(raw.as_bytes()), Parse::Other),
                "{raw:?}"
            );
        }
        assert!(matches!(
            parse_request(b"GET /rooms/a HTTP/1.1\r\nHost: x\r\n"),
            Parse::Partial
        ));
    }

    #[test]
    fn connection_close_is_noticed() {
        assert!(
            head("GET /rooms/a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\n").close
        );
    }

    #[test]
    fn the_node_gets_end_to_end_headers_and_the_proxys_own() {
        let h = head(concat!(
            "GET /rooms/a?x=1 HTTP/1.1\r\nHost: r.example\r\nConnection: keep-alive, x-hop\r\n",
            "X-Hop: 1\r\nKeep-Alive: 5\r\nProxy-Authorization: b\r\nX-Forwarded-For: 10.1.1.1\r\n",
            "X-Room-Ticket: forged\r\nX-Room-Node: forged\r\nX-Forwarded-Proto: gopher\r\n",
            // The same names as CGI-style stacks read them (`_` as `-`).
            "X_Room_Ticket: forged\r\nX_Forwarded_For: 10.6.6.6\r\nx_real_ip: 10.6.6.6\r\n",
            "Accept: a\r\nAccept: b\r\n\r\n"
        ));
        let mut out = Vec::new();
        write_upstream_request(
            &mut out,
            &h.parts,
            &Forwarded {
                host: "10.0.0.5:8080",
                base: "/media",
                peer_ip: b"127.0.0.1",
                tls: true,
                node: "n1",
                ticket: "t.k.n",
                target: None,
                drop_authorization: false,
                referer: None,
            },
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            concat!(
                "GET /media/rooms/a?x=1 HTTP/1.1\r\nhost: 10.0.0.5:8080\r\n",
                "accept: a\r\naccept: b\r\n",
                "x-forwarded-for: 10.1.1.1, 127.0.0.1\r\nx-forwarded-proto: https\r\n",
                "x-forwarded-host: r.example\r\nx-room-node: n1\r\nx-room-ticket: t.k.n\r\n\r\n"
            )
        );
        // The result is a request head a parser takes.
        let mut hs = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut hs);
        assert!(req.parse(text.as_bytes()).unwrap().is_complete());
    }

    fn response(raw: &str, method: Method) -> Result<Option<ResponseHead>, BadResponse> {
        let mut out = Vec::new();
        let mut client = ClientHead {
            out: &mut out,
            node: "n1",
            close: false,
        };
        parse_response(raw.as_bytes(), &method, 64 * 1024, &mut client)
    }

    #[test]
    fn a_responses_framing_follows_rfc_9112() {
        let f = |raw: &str, m: Method| response(raw, m).unwrap().unwrap();
        let r = f(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
            Method::GET,
        );
        assert_eq!((r.framing, r.close, r.len), (Framing::Length(3), false, 38));
        let r = f(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
            Method::GET,
        );
        assert_eq!(r.framing, Framing::Chunked);
        // Transfer-Encoding lines make one list: an empty one after `chunked` is no coding,
        // and a coding on a later line is the last one.
        let r = f(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\nContent-Length: 3\r\n\r\n",
            Method::GET,
        );
        assert_eq!(r.framing, Framing::Chunked);
        let r = f(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::GET,
        );
        assert_eq!(r.framing, Framing::Chunked);
        let r = f(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            Method::GET,
        );
        assert_eq!((r.framing, r.close), (Framing::UntilClose, true));
        let r = f("HTTP/1.1 200 OK\r\n\r\n", Method::GET);
        assert_eq!((r.framing, r.close), (Framing::UntilClose, true));
        // One length repeated, as a list or on lines of its own, is that length (RFC 9110
        // 8.6; hyper's client takes it too).
        for lengths in ["5, 5", "5,5", "5\r\nContent-Length: 5, 5"] {
            let r = f(
                &format!("HTTP/1.1 200 OK\r\nContent-Length: {lengths}\r\n\r\n"),
                Method::GET,
            );
            assert_eq!(
                (r.framing, r.close),
                (Framing::Length(5), false),
                "{lengths}"
            );
        }
        // Transfer-Encoding overrides Content-Length, whatever the length says.
        let r = f(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: x, 7\r\n\r\n",
            Method::GET,
        );
        assert_eq!(r.framing, Framing::Chunked);
        let r = f(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\nTransfer-Encoding: gzip\r\n\r\n",
            Method::GET,
        );
        assert_eq!((r.framing, r.close), (Framing::UntilClose, true));
        let r = f("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Method::HEAD);
        assert_eq!(r.framing, Framing::Empty);
        for status in [204, 304, 103] {
            let r = f(&format!("HTTP/1.1 {status} X\r\n\r\n"), Method::GET);
            assert_eq!(r.framing, Framing::Empty, "{status}");
        }
        let r = f("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", Method::GET);
        assert!(r.close);
        let r = f(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            Method::GET,
        );
        assert!(r.close);
    }

    #[test]
    fn unusable_response_heads_are_refused() {
        let e = |raw: &str| response(raw, Method::GET).unwrap_err();
        assert_eq!(
            e("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
            BadResponse::Length
        );
        assert_eq!(
            e("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            BadResponse::Length
        );
        for lengths in ["1, 2", "1\r\nContent-Length: 1, 2", "1,", ", 1", "1, +1"] {
            assert_eq!(
                e(&format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {lengths}\r\n\r\n"
                )),
                BadResponse::Length,
                "{lengths}"
            );
        }
        assert_eq!(
            e("HTTP/1.1 101 Switching\r\n\r\n"),
            BadResponse::UnaskedUpgrade
        );
        assert_eq!(e("SSH-2.0-OpenSSH\r\n\r\n"), BadResponse::Malformed);
        assert_eq!(
            e("HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\n"),
            BadResponse::Malformed
        );
        let big = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(70_000));
        assert_eq!(e(&big), BadResponse::TooLarge);
        assert!(response("HTTP/1.1 200 OK\r\n", Method::GET)
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_client_gets_the_nodes_head_without_hop_by_hop_headers() {
        let raw = concat!(
            "HTTP/1.1 200 Fine\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 9\r\nX-Room-Node: forged\r\n",
            "Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\n\r\n"
        );
        let mut out = Vec::new();
        let mut client = ClientHead {
            out: &mut out,
            node: "n1",
            close: true,
        };
        let parsed = parse_response(raw.as_bytes(), &Method::GET, 64 * 1024, &mut client);
        assert!(parsed.unwrap().unwrap().client_close);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            concat!(
                // The node's codings go with the bytes they apply to, restated on one line.
                "HTTP/1.1 200 Fine\r\ntransfer-encoding: chunked\r\nSet-Cookie: a=1\r\n",
                "Set-Cookie: b=2\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\n",
                "x-room-node: n1\r\nconnection: close\r\n\r\n"
            )
        );
    }

    /// The client's head as the fast path writes it for the node's `raw`.
    fn relayed(raw: &str) -> String {
        let mut out = Vec::new();
        let mut client = ClientHead {
            out: &mut out,
            node: "n1",
            close: false,
        };
        parse_response(raw.as_bytes(), &Method::GET, 64 * 1024, &mut client)
            .unwrap()
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_nodes_codings_reach_the_client_as_one_line_without_empty_ones() {
        let text = relayed(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\nDate: d\r\n\r\n",
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\nX-A: 1\r\nDate: d\r\nx-room-node: n1\r\n\r\n"
        );
        let text = relayed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\nDate: d\r\n\r\n");
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nDate: d\r\nx-room-node: n1\r\n\r\n"
        );
    }

    #[test]
    fn a_response_with_a_length_and_codings_ends_its_node_connection() {
        for raw in [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let r = response(raw, Method::GET).unwrap().unwrap();
            assert_eq!((r.framing, r.close), (Framing::Chunked, true), "{raw:?}");
            // The client connection goes on: the body reaches it chunked, framed as read.
            assert!(!r.client_close, "{raw:?}");
        }
        let r = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::GET,
        );
        assert!(!r.unwrap().unwrap().close);
    }

    #[test]
    fn a_length_repeated_by_the_node_reaches_the_client_once() {
        let text = relayed(
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nX-A: 1\r\nContent-Length: 5\r\nDate: d\r\n\r\n",
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nDate: d\r\nx-room-node: n1\r\n\r\n"
        );
    }

    #[test]
    fn a_relayed_response_without_a_date_gets_one() {
        let text = relayed("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let date = text
            .lines()
            .find_map(|l| l.strip_prefix("date: "))
            .unwrap_or_else(|| panic!("no date: {text}"));
        assert!(httpdate::parse_http_date(date).is_ok(), "{text}");
        // A node's own is kept, and not doubled.
        let text = relayed("HTTP/1.1 200 OK\r\nDATE: d\r\nContent-Length: 0\r\n\r\n");
        let dates = text.to_ascii_lowercase().matches("\r\ndate: ").count();
        assert_eq!(dates, 1, "{text}");
        assert!(text.contains("\r\nDATE: d\r\n"), "{text}");
    }

    proptest::proptest! {
        /// Whatever a client or a node sends, parsing answers (never panics), and a head the
        /// fast path takes builds or is handed over.
        #[test]
        fn arbitrary_heads_never_panic(
            line in "(GET|POST|PUT|HEAD|PRI|CONNECT) (/rooms/[a-z%0-9]{0,8}|/v1/placement/[a-z]{0,4}|\\*|http://x/r) HTTP/1\\.[01]",
            headers in proptest::collection::vec("[A-Za-z-]{1,12}: [ -~]{0,20}", 0..8),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let mut raw = line.into_bytes();
            for h in &headers {
                raw.extend_from_slice(b"\r\n");
                raw.extend_from_slice(h.as_bytes());
            }
            raw.extend_from_slice(b"\r\n\r\n");
            raw.extend_from_slice(&tail);
            if let Parse::Head(p) = parse_request(&raw) {
                let len = p.len;
                proptest::prop_assert!(len <= raw.len());
                let _ = p.build(&Bytes::copy_from_slice(&raw[..len]));
            }
            let mut out = Vec::new();
            let mut client = ClientHead { out: &mut out, node: "n1", close: false };
            let _ = parse_response(&raw, &Method::GET, 64 * 1024, &mut client);
            let _ = parse_response(&tail, &Method::GET, 64 * 1024, &mut client);
        }
    }

    proptest::proptest! {
        /// What the fast path sends a node is a valid request in origin form under the
        /// node's base path, with the client's body length, whatever form the client's
        /// target took (this session's fuzzing found `http://host?room=a` sent upstream as
        /// `GET ?room=a`).
        #[test]
        fn the_request_sent_upstream_is_valid_origin_form(
            method in "(GET|POST|PUT|DELETE)",
            target in "(/rooms/[a-z0-9]{1,6}|/rooms/[a-z0-9]{1,6}\\?x=[a-z0-9]{0,4}|http://[a-z]{1,5}(:[0-9]{2,4})?(/rooms/[a-z]{1,4})?\\?room=[a-z]{1,4}|http://[a-z]{1,5}/rooms/[a-z]{1,4})",
            headers in proptest::collection::vec("X-[A-Za-z]{1,8}: [ -~]{0,12}", 0..6),
            body in proptest::option::of(0u64..100),
            base in "(|/media|/a/b)",
        ) {
            let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: router.test\r\nX-Room: r\r\n");
            for h in &headers {
                raw.push_str(h);
                raw.push_str("\r\n");
            }
            if let Some(n) = body {
                raw.push_str(&format!("Content-Length: {n}\r\n"));
            }
            raw.push_str("\r\n");
            let Parse::Head(plan) = parse_request(raw.as_bytes()) else {
                return Ok(());
            };
            let len = plan.len;
            let Some(head) = plan.build(&Bytes::copy_from_slice(&raw.as_bytes()[..len])) else {
                return Ok(());
            };
            let mut out = Vec::new();
            let f = Forwarded {
                host: "10.0.0.5:8080",
                base: &base,
                peer_ip: b"127.0.0.1",
                tls: false,
                node: "n1",
                ticket: "t.t.t",
                target: None,
                drop_authorization: false,
                referer: None,
            };
            write_upstream_request(&mut out, &head.parts, &f);
            let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut up = httparse::Request::new(&mut hs);
            let done = up.parse(&out);
            proptest::prop_assert!(
                matches!(done, Ok(httparse::Status::Complete(n)) if n == out.len()),
                "{}", String::from_utf8_lossy(&out)
            );
            let sent = up.path.unwrap_or_default();
            proptest::prop_assert!(
                sent.starts_with(&format!("{base}/")),
                "{target} went up as {sent}"
            );
            let length = up
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<u64>().ok());
            proptest::prop_assert_eq!(length, body);
        }
    }

    #[tokio::test]
    async fn a_buffered_answer_carries_its_length_and_a_date() {
        let mut r = Response::new(crate::http::full("{}"));
        *r.status_mut() = StatusCode::NOT_FOUND;
        let mut out = Vec::new();
        write_buffered(&mut out, r, false, true).await;
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("content-length: 2\r\n"), "{text}");
        assert!(text.contains("\r\ndate: "), "{text}");
        assert!(text.ends_with("connection: close\r\n\r\n{}"), "{text}");
    }
}
