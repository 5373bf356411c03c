//! The front door: a user's request for a room goes to the room's node, either as a `307`
//! to the node carrying a signed ticket (redirect mode) or forwarded to the node's upstream
//! (proxy mode, see `proxy`), per route or globally.
//!
//! [`locate`] is the one function that finds a request's room: from the sources in
//! `front_door.room_sources` order (path pattern, query parameter, header, cookie), first
//! match wins, every value decoded and normalized by `RoomKey`. With `auth.users = "jwt"` the
//! user's token must admit them to that room.

use std::borrow::Cow;

use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use hyper::body::Incoming;

use super::api::{authenticate_user, query, room_from_url, set_node_header, HintArgs};
use super::proxy::Forward;
use super::server::ConnInfo;
use super::{full, ApiError, App, Body};
use crate::auth::users::bearer_token;
use crate::cluster::NodeEntry;
use crate::config::{FrontDoorMode, RoomSource};
use crate::room::{RoomError, RoomKey};
use crate::router::Intent;
use crate::store::PinStore;

/// Finds the room a front-door request names and the mode its route uses. `Ok(None)`: it
/// names none. `q` is the request's query as [`query`] parses it (the caller reads its
/// hints from the same parse).
pub fn locate<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    q: &[(Cow<'_, str>, Cow<'_, str>)],
) -> Result<Option<(RoomKey, FrontDoorMode)>, ApiError> {
    let fd = &app.cfg.front_door;
    for source in &fd.room_sources {
        let found = match source {
            RoomSource::Path => {
                let path = parts.uri.path();
                match app
                    .patterns
                    .iter()
                    .zip(&fd.routes)
                    .find_map(|(p, raw)| p.matches(path).map(|room| (room, raw)))
                {
                    Some((room, route)) => {
                        let mode = fd.route_modes.get(route).copied().unwrap_or(fd.mode);
                        return room_from_url(app, room).map(|k| Some((k, mode)));
                    }
                    None => None,
                }
            }
            RoomSource::Query if !fd.room_query_param.is_empty() => q
                .iter()
                .find(|(k, _)| k == fd.room_query_param.as_str())
                .map(|(_, v)| {
                    let raw = parts.uri.query().unwrap_or("").as_bytes();
                    if v.contains(char::REPLACEMENT_CHARACTER)
                        && !param_is_utf8(raw, &fd.room_query_param)
                    {
                        return Err(ApiError::InvalidRoom(RoomError::NotUtf8.to_string()));
                    }
                    RoomKey::parse(v, app.router.normalization())
                        .map_err(|e| ApiError::InvalidRoom(e.to_string()))
                }),
            RoomSource::Header if !fd.room_header.is_empty() => {
                parts.headers.get(fd.room_header.as_str()).map(|v| {
                    let v = v.to_str().map_err(|_| {
                        ApiError::InvalidRoom("room header is not visible ASCII".into())
                    })?;
                    room_from_url(app, v)
                })
            }
            RoomSource::Cookie if !fd.room_cookie.is_empty() => {
                cookie(parts, &fd.room_cookie).map(|v| room_from_url(app, v))
            }
            _ => None,
        };
        if let Some(k) = found {
            return k.map(|k| Some((k, fd.mode)));
        }
    }
    Ok(None)
}

/// The value of cookie `name`, from any `Cookie` header.
fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// What the front door decided for a request: the room's node, the user's ticket for it,
/// and how the user gets there.
pub struct Admission {
    pub node: NodeEntry,
    pub ticket: String,
    pub mode: FrontDoorMode,
    /// Proxy mode: the target (origin form) the node gets when it is not the request's
    /// own, because the query carried the user's login token (`auth.jwt.query_param`),
    /// which is the router's credential and stays here, or a ticket of the client's
    /// (`tickets.query_param`), which the node would read instead of the router's
    /// `X-Room-Ticket`. `None`: the request's target.
    pub target: Option<String>,
    /// Proxy mode: the `Authorization` header carried the user's login token (`Bearer`,
    /// with `auth.users = "jwt"`), which stays with the router as the query's does, or
    /// one of the router's admin or node tokens (a dashboard login the browser repeats).
    pub drop_authorization: bool,
    /// Proxy mode: the `Referer` the node gets instead of the client's, which carried the
    /// user's login token in its query (a page opened with `?access_token=` names its full
    /// URL as the referrer of every same-origin request it makes): the same URL without it,
    /// or empty (the header left out) when the router cannot rewrite it. `None`: as it came.
    pub referer: Option<String>,
}

/// Finds the request's room, authenticates the user for it and places it: everything a
/// front-door request needs before it is redirected or forwarded, whichever HTTP/1 server
/// (hyper's or the fast path, see `h1`) carries it.
///
/// In proxy mode only the first request for a room on a client connection is a join
/// (counted toward the node's `pending` and the room's reservation, refused at
/// `join_limit`); the connection's later requests for it are that participant's session
/// ([`Intent::InSession`]). Every proxied request counted as a join would have a page's
/// assets and polls fill a node's `pending` within one heartbeat, and then refuse the
/// requests of meetings already under way.
///
/// `body` is the request body's declared length: in proxy mode one over
/// `proxy.max_request_body_bytes` is refused (`413`), and an upgrade with a body or a body
/// in a transfer coding besides chunked (`400`), before the room is placed or a join
/// counted.
pub async fn admit<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    conn: Option<&ConnInfo>,
    body: Option<u64>,
) -> Result<Admission, ApiError> {
    let q = query(parts);
    let Some((room, mode)) = locate(app, parts, &q)? else {
        return Err(ApiError::NotFound(format!(
            "no room in request for {}",
            parts.uri.path()
        )));
    };
    // After the room: a room id with an encoded `/` is an invalid room, said as such.
    if leaves_route(parts.uri.path()) {
        return Err(ApiError::InvalidRequest(
            "the path has a `.` or `..` segment, an encoded `/` or `\\`, or a `\\`".into(),
        ));
    }
    if mode == FrontDoorMode::Redirect
        && parts.method != Method::GET
        && parts.method != Method::HEAD
    {
        return Err(ApiError::MethodNotAllowed("GET, HEAD"));
    }
    let limit = app.proxy.cfg().max_request_body_bytes;
    if mode == FrontDoorMode::Proxy && body.is_some_and(|b| b > limit) {
        return Err(ApiError::PayloadTooLarge(limit as usize));
    }
    if mode == FrontDoorMode::Proxy && super::proxy::coded_body(&parts.headers) {
        // hyper took the chunks off, not the codings before them: forwarded chunked, the
        // node would read the coded bytes as the body itself.
        return Err(ApiError::InvalidRequest(
            "a request body in a transfer coding other than chunked is not supported".into(),
        ));
    }
    if mode == FrontDoorMode::Proxy && super::proxy::upgrade_with_body(parts) {
        // The upgrade is sent bodiless: passing on a length with no body would have the
        // node wait for bytes that never come, or read the next request's as them.
        return Err(ApiError::InvalidRequest(
            "an upgrade request cannot carry a body".into(),
        ));
    }
    let user = authenticate_user(app, parts, &room)?;
    let mut hints = match mode {
        FrontDoorMode::Redirect => HintArgs::from_query(&q)?,
        // The query is the node application's too: what is not a valid hint is its own.
        FrontDoorMode::Proxy => HintArgs::from_query_lenient(&q),
    };
    if hints.region.is_none() {
        hints.region = user.region;
    }
    // The token's size is signed; the query's is anyone's to write.
    hints.size = user.size.or(hints.size);
    hints.check()?;
    let session = match conn {
        Some(c) if mode == FrontDoorMode::Proxy && app.proxy.cfg().one_join_per_connection => {
            Some(c)
        }
        _ => None,
    };
    // A `HEAD` is safe (RFC 9110 9.2.1): a link checker's or a monitor's must not open a
    // meeting nor count as a join. It gets what a `GET` would for a room already placed,
    // and `404 not_found` for one that is not.
    let intent = match session {
        _ if parts.method == Method::HEAD => Intent::Lookup { create: false },
        Some(c) if c.joined(&room) => Intent::InSession,
        _ => Intent::Join,
    };
    let p = app
        .router
        .place(&room, &hints.hints(), hints.size, intent)
        .await
        .map_err(|e| ApiError::from_join(e, app.retry_after()))?;
    if let (Some(c), Intent::Join) = (session, intent) {
        c.set_joined(&room);
    }
    let ticket = app.tickets.issue(
        room.as_str(),
        p.node.id.as_str(),
        &user.sub,
        app.router.now() / 1000,
    );
    let (target, drop_authorization, referer) = match mode {
        FrontDoorMode::Proxy => (
            proxied_target(app, &parts.uri),
            app.users.is_some() && bearer_token(&parts.headers).is_some()
                || app.tokens.carries_any(&parts.headers),
            proxied_referer(app, &parts.headers),
        ),
        FrontDoorMode::Redirect => (None, false, None),
    };
    Ok(Admission {
        node: p.node,
        ticket,
        mode,
        target,
        drop_authorization,
        referer,
    })
}

/// Whether a node, or a proxy before it, could resolve `path` to one outside the route the
/// room was found by (and outside the node's upstream base path): the front door refuses
/// it. That is a `.` or `..` segment, plain or percent-encoded, also followed by `;`
/// parameters (Tomcat and Jetty drop them before they resolve: `..;/`); an encoded `/` or
/// `\` (some servers decode them first: `..%2f`), or a `/`, `\` or `.` encoded twice
/// (`%252f`, `%252e`: for one that decodes twice), also with the escape's own digits
/// encoded (`%25%32%65`, `%%32%65`: each decodes to `%2e` once); or a `\` (a separator to
/// others). No allocation for a path without a `%` that outlives one decoding: it runs on
/// every join.
fn leaves_route(path: &str) -> bool {
    if leaves_route_as_is(path) {
        return true;
    }
    // A node that decodes twice reads what one decoding leaves: when a `%` outlives it, that
    // is checked too (and what a third decoding would leave, for good measure).
    let mut once = Cow::Borrowed(path);
    for _ in 0..3 {
        if !percent_outlives_decoding(once.as_bytes()) {
            return false;
        }
        let next = percent_encoding::percent_decode(once.as_bytes())
            .decode_utf8_lossy()
            .into_owned();
        if next == once {
            return false;
        }
        if leaves_route_as_is(&next) {
            return true;
        }
        once = Cow::Owned(next);
    }
    false
}

/// Whether decoding `b` once leaves a `%`: it holds `%25`, or a `%` that starts no escape
/// (a decoder keeps it as it is).
fn percent_outlives_decoding(b: &[u8]) -> bool {
    let hex = |i: usize| b.get(i).is_some_and(u8::is_ascii_hexdigit);
    b.iter().enumerate().any(|(i, &c)| {
        c == b'%' && (!hex(i + 1) || !hex(i + 2) || (b[i + 1] == b'2' && b[i + 2] == b'5'))
    })
}

/// [`leaves_route`] of the path as it is, without decoding it.
fn leaves_route_as_is(path: &str) -> bool {
    let b = path.as_bytes();
    // Each case below needs a `%`, a `\` or a `.`; most paths have none, and one pass
    // over the bytes is all they cost (the splits below are a few hundred instructions).
    if !b.iter().any(|&c| matches!(c, b'%' | b'\\' | b'.')) {
        return false;
    }
    // `%2f` and `%5c`, also encoded twice (`%252f`, `%252e`), which a node that decodes
    // twice resolves as a separator or a dot.
    let sep = |hi: u8, lo: u8| hi == b'2' && lo | 0x20 == b'f' || hi == b'5' && lo | 0x20 == b'c';
    let encoded_separator = b.windows(3).any(|w| w[0] == b'%' && sep(w[1], w[2]))
        || b.windows(5)
            .any(|w| w[..3] == *b"%25" && (sep(w[3], w[4]) || w[3] == b'2' && w[4] | 0x20 == b'e'));
    encoded_separator
        || b.contains(&b'\\')
        || path
            .split('/')
            .any(|seg| is_dot_segment(seg.split(';').next().unwrap_or(seg)))
}

/// Whether a path segment is `.` or `..`, plain or percent-encoded (`%2e`).
fn is_dot_segment(seg: &str) -> bool {
    let b = seg.as_bytes();
    let (mut dots, mut i) = (0, 0);
    while i < b.len() {
        if b[i] == b'.' {
            i += 1;
        } else if b[i] == b'%'
            && b.get(i + 1) == Some(&b'2')
            && b.get(i + 2).map(|c| c | 0x20) == Some(b'e')
        {
            i += 3;
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// The query parameter a user's login token may come in, when the router reads one
/// (`auth.users = "jwt"`): never passed on to a node, which could replay it (a token for
/// room `"*"` admits to every room).
pub fn user_token_param<S: PinStore>(app: &App<S>) -> Option<&str> {
    let param = app.cfg.auth.jwt.query_param.as_str();
    (app.users.is_some() && !param.is_empty()).then_some(param)
}

/// The target a proxied request reaches its node with, when it is not the request's own:
/// without the user's login token (the router's credential) and without any ticket the
/// client put in the query. The router vouches for the user in `X-Room-Ticket`; a ticket in
/// the query is one the client brought (another user's, copied from a redirect URL within
/// its life), and a node that reads the query first would take the user for its subject.
fn proxied_target<S: PinStore>(app: &App<S>, uri: &Uri) -> Option<String> {
    let ticket = app.cfg.tickets.query_param.as_str();
    match user_token_param(app) {
        Some(user) => without_params(uri, &[ticket, user]),
        None => without_params(uri, &[ticket]),
    }
}

/// [`Admission::referer`]: the client's `Referer` without the user's login token, when
/// its query carries one. Only with `auth.users = "jwt"` and a token query parameter.
fn proxied_referer<S: PinStore>(app: &App<S>, headers: &HeaderMap) -> Option<String> {
    let user = user_token_param(app)?;
    let raw = headers.get(header::REFERER)?.as_bytes();
    // Most referrers have no query: one byte scan and nothing else.
    if !raw.contains(&b'?') {
        return None;
    }
    let Some(uri) = std::str::from_utf8(raw)
        .ok()
        .and_then(|r| r.parse::<Uri>().ok())
    else {
        // Not a URL the router can take apart: left out rather than passed on with what
        // it may hold.
        return Some(String::new());
    };
    let origin = without_params(&uri, &[user])?;
    Some(match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => format!("{scheme}://{authority}{origin}"),
        _ => origin,
    })
}

/// Whether the raw query pair `pair` (`k=v`, as sent) is parameter `name`. The key is
/// compared decoded, as the router reads parameters: `access%5Ftoken=` is `access_token`.
fn is_param(pair: &str, name: &str) -> bool {
    let key = pair.split_once('=').map_or(pair, |(k, _)| k);
    // Bytes, not a char pattern: every proxied request's query passes here.
    if key.bytes().any(|b| b == b'%' || b == b'+') {
        url::form_urlencoded::parse(key.as_bytes())
            .next()
            .is_some_and(|(k, _)| k == name)
    } else {
        key == name
    }
}

/// Whether the first parameter `name` of `raw` (a query or a form body, as sent) is UTF-8
/// once percent-decoded. The form decoders replace bytes that are not with U+FFFD, which
/// would make `room=%FF` and `room=%FE` one room; a room id must be UTF-8 (`/rooms/%FF` is
/// refused). Only asked when a decoded value holds a U+FFFD.
pub(super) fn param_is_utf8(raw: &[u8], name: &str) -> bool {
    let Ok(raw) = std::str::from_utf8(raw) else {
        return false;
    };
    raw.split('&').find(|p| is_param(p, name)).is_none_or(|p| {
        let v = p.split_once('=').map_or("", |(_, v)| v);
        percent_encoding::percent_decode_str(v)
            .decode_utf8()
            .is_ok()
    })
}

/// The request's query pairs, raw, minus those naming one of `drop`.
fn kept_pairs<'a>(uri: &'a Uri, drop: &'a [&str]) -> impl Iterator<Item = &'a str> + 'a {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(move |p| !p.is_empty() && !drop.iter().any(|d| is_param(p, d)))
}

/// `uri`'s target in origin form without the query parameters `drop` names, or `None`
/// when it has none of them (the target stays the request's own).
pub fn without_params(uri: &Uri, drop: &[&str]) -> Option<String> {
    let q = uri.query()?;
    // Every proxied request's query passes here, and almost none names a parameter to drop:
    // a byte loop over the keys, no string pattern machinery.
    let names = q.as_bytes().split(|&b| b == b'&').any(|pair| {
        let key = pair.split(|&b| b == b'=').next().unwrap_or(pair);
        drop.iter().any(|d| key == d.as_bytes()) || key.iter().any(|&b| b == b'%' || b == b'+')
    });
    if !names {
        return None;
    }
    // An encoded key (`tick%65t`) is decoded before it is compared; nothing to drop after all
    // leaves the target as it came.
    if !q.split('&').any(|p| drop.iter().any(|d| is_param(p, d))) {
        return None;
    }
    let path = uri.path();
    let mut t = String::with_capacity(path.len() + q.len() + 1);
    t.push_str(if path.is_empty() { "/" } else { path });
    let mut sep = '?';
    for pair in kept_pairs(uri, drop) {
        t.push(sep);
        t.push_str(pair);
        sep = '&';
    }
    Some(t)
}

/// Handles a front-door request.
pub async fn handle<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    body: Incoming,
    _peer: std::net::SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let declared = super::proxy::content_length(&parts.headers);
    let a = admit(app, parts, parts.extensions.get::<ConnInfo>(), declared).await?;
    if a.mode == FrontDoorMode::Proxy {
        let to = Forward {
            node: &a.node,
            ticket: a.ticket,
            target: a.target.as_deref(),
            drop_authorization: a.drop_authorization,
            referer: a.referer.as_deref(),
        };
        return app.proxy.forward(parts, body, to).await;
    }
    redirect(app, parts, &a)
}

/// The redirect-mode answer: `307` to the node with the ticket.
pub fn redirect<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    a: &Admission,
) -> Result<Response<Body>, ApiError> {
    let location = redirect_location(
        &a.node.info.url,
        parts,
        &app.cfg.tickets.query_param,
        user_token_param(app),
        &a.ticket,
    );
    let mut r = Response::new(full(bytes::Bytes::new()));
    *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    let h = r.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&location)
            .map_err(|_| ApiError::InvalidRequest("unrepresentable location".into()))?,
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    set_node_header(&mut r, a.node.id.as_str());
    Ok(r)
}

/// The node URL + the request's path and query (minus any ticket the client sent, and the
/// user's login token when it came in `user_param`) + ticket.
pub fn redirect_location(
    base: &str,
    parts: &Parts,
    ticket_param: &str,
    user_param: Option<&str>,
    ticket: &str,
) -> String {
    let mut loc = String::with_capacity(base.len() + parts.uri.path().len() + ticket.len() + 64);
    loc.push_str(base);
    loc.push_str(parts.uri.path());
    loc.push('?');
    let both = [ticket_param, user_param.unwrap_or(ticket_param)];
    for pair in kept_pairs(&parts.uri, &both) {
        loc.push_str(pair);
        loc.push('&');
    }
    loc.push_str(ticket_param);
    loc.push('=');
    loc.push_str(ticket);
    loc
}

#[cfg(test)]
mod tests {
    use super::{is_dot_segment, leaves_route, without_params};
    use hyper::Uri;

    fn strip(target: &str) -> Option<String> {
        without_params(&target.parse::<Uri>().unwrap(), &["ticket", "access_token"])
    }

    #[test]
    fn dot_segments_are_found_plain_or_encoded_and_nothing_else() {
        for seg in [".", "..", "%2e", "%2E%2e", ".%2e"] {
            assert!(is_dot_segment(seg), "{seg}");
        }
        for seg in ["", "...", "a.", ".a", "%2f", "%2", "%2e%2e%2e", "standup"] {
            assert!(!is_dot_segment(seg), "{seg}");
        }
    }

    #[test]
    fn a_path_that_a_node_could_resolve_out_of_its_route_is_found() {
        for path in [
            "/rooms/a/../admin",
            "/rooms/a/..;/..;/admin",
            "/rooms/a/%2e%2e;x=1/admin",
            "/rooms/a/..%2f..%2Fadmin",
            "/rooms/a/..%5c..%5Cadmin",
            "/rooms/a/..\\admin",
            "/rooms/a/%252e%252e%252fadmin",
            "/rooms/a/..%255cadmin",
            // The escape's digits encoded too: each decodes to `%2e` or `%2f` once.
            "/rooms/a/%25%32%65%25%32%65/admin",
            "/rooms/a/..%25%32%66admin",
            "/rooms/a/%%32%65%%32%65/admin",
            "/rooms/a/..%2%66admin",
        ] {
            assert!(leaves_route(path), "{path}");
        }
        for path in [
            "/rooms/a",
            "/rooms/a.b/..x/;x",
            "/rooms/a/x;v=1",
            "/rooms/%2",
            "/rooms/a%25f",
            "/rooms/a%2525",
            "/rooms/100%25",
            "/rooms/%",
            "/rooms/a%%20b",
            "/rooms/%CE%B1%CF%83",
        ] {
            assert!(!leaves_route(path), "{path}");
        }
    }

    #[test]
    fn a_target_without_the_named_parameters_is_left_alone() {
        assert_eq!(strip("/rooms/a"), None);
        assert_eq!(strip("/rooms/a?lang=en&x=1"), None);
        // Encoded keys are decoded before they are compared; these name something else.
        assert_eq!(strip("/rooms/a?l%61ng=en&a+b=1"), None);
        // A value that merely contains a name is not the parameter.
        assert_eq!(strip("/rooms/a?x=ticket&y=access_token"), None);
    }

    #[test]
    fn the_named_parameters_are_dropped_plain_or_encoded() {
        assert_eq!(strip("/rooms/a?ticket=t").as_deref(), Some("/rooms/a"));
        assert_eq!(
            strip("/rooms/a?lang=en&tick%65t=t&x=1").as_deref(),
            Some("/rooms/a?lang=en&x=1")
        );
        assert_eq!(
            strip("/rooms/a?access%5Ftoken=j&ticket&y=2").as_deref(),
            Some("/rooms/a?y=2")
        );
    }
}
