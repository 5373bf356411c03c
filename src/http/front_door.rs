//! The front door: a user's request for a room is answered with a `307` to the room's node,
//! carrying a signed ticket (redirect mode). The room is taken from the first configured path
//! pattern that matches, else from the configured query parameter, else from the configured
//! header; all three go through the same `RoomKey` decoding.

use http::request::Parts;
use http::{header, HeaderValue, Method, Response, StatusCode};

use super::api::{query, room_from_url, set_node_header, HintArgs};
use super::{full, ApiError, App, Body};
use crate::room::RoomKey;
use crate::router::Intent;
use crate::store::PinStore;

/// Finds the room a front-door request names. `Ok(None)`: it names none.
pub fn room_of<S: PinStore>(app: &App<S>, parts: &Parts) -> Result<Option<RoomKey>, ApiError> {
    let path = parts.uri.path();
    for p in &app.patterns {
        if let Some(raw) = p.matches(path) {
            return room_from_url(app, raw).map(Some);
        }
    }
    let fd = &app.cfg.front_door;
    if !fd.room_query_param.is_empty() {
        if let Some((_, v)) = query(parts)
            .into_iter()
            .find(|(k, _)| k == fd.room_query_param.as_str())
        {
            return RoomKey::parse(&v, app.router.normalization())
                .map(Some)
                .map_err(|e| ApiError::InvalidRoom(e.to_string()));
        }
    }
    if !fd.room_header.is_empty() {
        if let Some(v) = parts.headers.get(fd.room_header.as_str()) {
            let v = v
                .to_str()
                .map_err(|_| ApiError::InvalidRoom("room header is not visible ASCII".into()))?;
            return room_from_url(app, v).map(Some);
        }
    }
    Ok(None)
}

/// Handles a front-door request.
pub async fn handle<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    _peer: std::net::SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let Some(room) = room_of(app, parts)? else {
        return Err(ApiError::NotFound(format!(
            "no room in request for {}",
            parts.uri.path()
        )));
    };
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return Err(ApiError::MethodNotAllowed("GET, HEAD"));
    }
    let q = query(parts);
    let hints = HintArgs::from_query(&q)?;
    let p = app
        .router
        .place(&room, &hints.hints(), hints.size, Intent::Join)
        .await
        .map_err(|e| ApiError::from_join(e, app.retry_after()))?;
    let ticket = app.tickets.issue(
        room.as_str(),
        p.node.id.as_str(),
        "anonymous",
        app.router.now() / 1000,
    );
    let location = redirect_location(
        &p.node.info.url,
        parts,
        &app.cfg.tickets.query_param,
        &ticket,
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
    set_node_header(&mut r, p.node.id.as_str());
    Ok(r)
}

/// The node URL + the request's path and query (minus any ticket the client sent) + ticket.
pub fn redirect_location(base: &str, parts: &Parts, ticket_param: &str, ticket: &str) -> String {
    let mut loc = String::with_capacity(base.len() + parts.uri.path().len() + ticket.len() + 64);
    loc.push_str(base);
    loc.push_str(parts.uri.path());
    loc.push('?');
    if let Some(q) = parts.uri.query() {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let key = pair.split('=').next().unwrap_or("");
            if key != ticket_param {
                loc.push_str(pair);
                loc.push('&');
            }
        }
    }
    loc.push_str(ticket_param);
    loc.push('=');
    loc.push_str(ticket);
    loc
}
