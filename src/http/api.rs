//! The `/v1` handlers. Thin: each parses and checks its input, authenticates, calls the
//! router once, and renders. A rejected request changes no state: everything is validated
//! before the router is called.

use std::borrow::Cow;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use super::{json, parse_json, read_body, ApiError, App, Body};
use crate::auth::users::{admits, UserVerifier};
use crate::auth::{Credential, UserClaims};
use crate::cluster::{check_url, NodeId, NodeInfo, MAX_TAGS};
use crate::placement::{AdminState, Hints};
use crate::room::RoomKey;
use crate::router::{Heartbeat, Intent, Placement};
use crate::store::{Pin, PinStore};

/// Most rooms in one batch lookup.
pub const MAX_BATCH: usize = 1000;
/// Most rooms in one heartbeat.
pub const MAX_REPORTED_ROOMS: usize = 100_000;
/// Largest heartbeat body accepted (or `server.max_body_bytes`, if larger): room for
/// [`MAX_REPORTED_ROOMS`] entries of a longest room id as UTF-8
/// (`{"room":"<256 bytes>","participants":4294967295},`, 295 bytes, with room to spare for
/// whitespace) plus the node's own fields. `server.max_body_bytes` (256 KiB by default) holds
/// some 4 000 UUID-named rooms: a busy node's heartbeat would be refused, and the node, heard
/// from no more, taken for dead.
pub const MAX_HEARTBEAT_BODY_BYTES: usize = MAX_REPORTED_ROOMS * 320 + 64 * 1024;
/// Most refused room entries a heartbeat's answer lists (the metric counts them all).
pub const MAX_REFUSED_LISTED: usize = 100;

/// The query string's pairs, decoded.
pub fn query(parts: &Parts) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    parts
        .uri
        .query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).collect())
        .unwrap_or_default()
}

fn check_label(key: &str, v: &str) -> Result<(), ApiError> {
    crate::cluster::check_label(key, v).map_err(ApiError::InvalidRequest)
}

/// Placement hints from a query string or a body.
#[derive(Debug, Default)]
pub struct HintArgs {
    pub region: Option<String>,
    pub tags: Vec<String>,
    pub size: Option<u32>,
}

impl HintArgs {
    pub fn from_query(q: &[(Cow<'_, str>, Cow<'_, str>)]) -> Result<HintArgs, ApiError> {
        let mut h = HintArgs::default();
        for (k, v) in q {
            match k.as_ref() {
                "region" => h.region = Some(v.to_string()),
                "tag" => h.tags.push(v.to_string()),
                "size" => h.size = Some(parse_size(v)?),
                _ => {}
            }
        }
        h.check()?;
        Ok(h)
    }

    /// The hints among `q` that are valid, the others left out: in proxy mode the query
    /// string belongs to the node's application, whose own `size`, `region` or `tag`
    /// (`?size=large` on an avatar) is not a bad request to the router.
    pub fn from_query_lenient(q: &[(Cow<'_, str>, Cow<'_, str>)]) -> HintArgs {
        let mut h = HintArgs::default();
        for (k, v) in q {
            match k.as_ref() {
                "region" if check_label("region", v).is_ok() => h.region = Some(v.to_string()),
                "tag" if h.tags.len() < MAX_TAGS && check_label("tag", v).is_ok() => {
                    h.tags.push(v.to_string())
                }
                "size" => {
                    if let Ok(size) = parse_size(v) {
                        h.size = Some(size);
                    }
                }
                _ => {}
            }
        }
        h
    }

    pub fn check(&self) -> Result<(), ApiError> {
        crate::cluster::check_region_and_tags(self.region.as_deref(), &self.tags)
            .map_err(ApiError::InvalidRequest)
    }

    pub fn hints(&self) -> Hints<'_> {
        Hints {
            region: self.region.as_deref(),
            tags: &self.tags,
            // The router adds the room's expected size when it places one.
            expected_load: 0.0,
        }
    }
}

fn parse_size(v: &str) -> Result<u32, ApiError> {
    v.parse::<u32>()
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| ApiError::InvalidRequest("size must be a positive integer".into()))
}

/// Decodes a room from a URL segment or query value.
pub fn room_from_url<S: PinStore>(app: &App<S>, raw: &str) -> Result<RoomKey, ApiError> {
    RoomKey::from_encoded(raw, app.router.normalization())
        .map_err(|e| ApiError::InvalidRoom(e.to_string()))
}

/// Parses a room given literally (JSON body).
pub fn room_literal<S: PinStore>(app: &App<S>, raw: &str) -> Result<RoomKey, ApiError> {
    RoomKey::parse(raw, app.router.normalization())
        .map_err(|e| ApiError::InvalidRoom(e.to_string()))
}

pub fn require_admin<S: PinStore>(app: &App<S>, parts: &Parts) -> Result<(), ApiError> {
    refuse_cross_site_basic(parts)?;
    match app.tokens.admin(&parts.headers) {
        Credential::Admin => Ok(()),
        Credential::None => Err(ApiError::Unauthorized(
            "admin token required (Authorization: Bearer ...)".into(),
        )),
        Credential::Elsewhere => Err(ApiError::Forbidden(
            "a node's token cannot act as an admin".into(),
        )),
        _ => Err(ApiError::Unauthorized("invalid admin token".into())),
    }
}

/// The user-token verifier, or a `401` when its key could not be loaded (a file changed
/// since the config was checked): the callers are told no more than that, the key file's
/// path and error are in the router's log ([`App::new`](super::App)).
fn checkable(v: &Result<UserVerifier, String>) -> Result<&UserVerifier, ApiError> {
    v.as_ref().map_err(|_| {
        ApiError::Unauthorized("user tokens cannot be checked: the router's key is unusable".into())
    })
}

/// A browser that logged in to `/dashboard` with Basic sends that login with every request
/// to the router, those another site's page makes included: a form there posting to
/// `/v1/nodes/{id}/disable` would act with the admin's rights (cross-site request forgery).
/// So a request that changes something (not `GET`, `HEAD` or `OPTIONS`) and carries Basic
/// credentials is refused (`403 forbidden`) when the browser says it comes from another
/// site: `Sec-Fetch-Site` other than `same-origin` or `none`, or, without it, an `Origin`
/// that is not this router's. Tools (curl, scripts) send neither, and Bearer tokens are
/// never sent by a browser on its own: both pass.
pub fn refuse_cross_site_basic(parts: &Parts) -> Result<(), ApiError> {
    use http::Method;
    if matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    refuse_cross_site_basic_whatever_the_method(parts)
}

/// [`refuse_cross_site_basic`] for a request that changes something whatever its method:
/// a placement lookup is a `GET` that places the room (and reserves its expected size), so
/// another site's `<img src=".../v1/placement/x?size=1000">`, sent with an admin's Basic
/// login, would fill nodes.
fn refuse_cross_site_basic_whatever_the_method(parts: &Parts) -> Result<(), ApiError> {
    if !crate::auth::tokens::is_basic(&parts.headers) {
        return Ok(());
    }
    let h = &parts.headers;
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let cross = match text("sec-fetch-site") {
        Some(site) => !["same-origin", "none"]
            .iter()
            .any(|s| site.eq_ignore_ascii_case(s)),
        None => text("origin").is_some_and(|origin| {
            let ours = text("host").or_else(|| parts.uri.authority().map(|a| a.as_str()));
            let theirs = origin.split_once("://").map(|(_, authority)| authority);
            !matches!((theirs, ours), (Some(t), Some(o)) if t.eq_ignore_ascii_case(o))
        }),
    };
    if cross {
        return Err(ApiError::Forbidden(
            "a cross-site request may not act with a browser's Basic login; send the token as \
             Authorization: Bearer"
                .into(),
        ));
    }
    Ok(())
}

// ---- user JWTs and node certificates (issue 3) ----

/// Who a front-door or login request is, as far as placement and the ticket care.
#[derive(Debug, Clone)]
pub struct User {
    pub sub: String,
    pub region: Option<String>,
    pub size: Option<u32>,
}

/// With `auth.users = "jwt"`, the user whose token admits them to `room` (401 without a
/// valid token, 403 for another room); otherwise the anonymous user.
pub fn authenticate_user<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    room: &RoomKey,
) -> Result<User, ApiError> {
    use crate::auth::UserAuthError;
    let Some(verifier) = &app.users else {
        return Ok(User {
            sub: "anonymous".into(),
            region: None,
            size: None,
        });
    };
    let verifier = checkable(verifier)?;
    let token = verifier.token_of(&parts.headers, parts.uri.query());
    match verifier.admit(token.as_deref(), room, app.router.normalization()) {
        Ok(c) => {
            check_label("sub", &c.sub).map_err(|_| {
                ApiError::Unauthorized("token sub must be 1-64 printable characters".into())
            })?;
            // The hints a token carries are its issuer's, not the user's to fix: one that is
            // no valid hint is left out (the join places as without it), not answered
            // `400 invalid_request` as if the user had sent it.
            let region = c.region.filter(|r| check_label("region", r).is_ok());
            Ok(User {
                sub: c.sub,
                region,
                size: c.size.filter(|s| *s > 0),
            })
        }
        Err(e @ UserAuthError::WrongRoom) => Err(ApiError::Forbidden(e.to_string())),
        Err(e) => Err(ApiError::Unauthorized(e.to_string())),
    }
}

/// What let a placement lookup in.
pub enum LookupAuth {
    /// `auth.users = "none"`: lookups are open, as the front door is.
    Open,
    /// An admin or node token, or a node's client certificate: any room.
    Operator,
    /// A user JWT: the rooms it admits to.
    User(UserClaims),
}

impl LookupAuth {
    /// `403 forbidden` unless this admits a lookup of `room`.
    pub fn check<S: PinStore>(&self, app: &App<S>, room: &RoomKey) -> Result<(), ApiError> {
        match self {
            LookupAuth::User(c) if !admits(c, room, app.router.normalization()) => Err(
                ApiError::Forbidden(format!("the user token is not valid for room {room}")),
            ),
            _ => Ok(()),
        }
    }

    /// The size hint a lookup places a new room with: a user token's `size` claim (signed)
    /// wins over the request's (`?size=`, which anyone can write).
    pub fn size(&self, asked: Option<u32>) -> Option<u32> {
        match self {
            LookupAuth::User(c) => c.size.filter(|s| *s > 0).or(asked),
            _ => asked,
        }
    }
}

/// Who may look placements up (`GET /v1/placement/{room}`, `POST /v1/placement`). A lookup
/// places a room and reserves its expected size, as a join does; with `auth.users = "jwt"`
/// the front door admits no one without a token, so neither do lookups: an admin or node
/// token (compared in constant time), a node's client certificate (the mTLS listener), or
/// a user JWT (`401 unauthorized` without one of them; a JWT is then checked against each
/// room, `403 forbidden` for another room's). Open with `auth.users = "none"`.
pub fn authorize_lookup<S: PinStore>(app: &App<S>, parts: &Parts) -> Result<LookupAuth, ApiError> {
    let Some(verifier) = &app.users else {
        return Ok(LookupAuth::Open);
    };
    let cert = parts
        .extensions
        .get::<super::server::ConnInfo>()
        .is_some_and(|i| i.client_cert.is_some());
    if cert {
        return Ok(LookupAuth::Operator);
    }
    if app.tokens.admin(&parts.headers) == Credential::Admin
        || app.tokens.any_node(&parts.headers) == Credential::Node
    {
        refuse_cross_site_basic_whatever_the_method(parts)?;
        return Ok(LookupAuth::Operator);
    }
    let verifier = checkable(verifier)?;
    let token = verifier
        .token_of(&parts.headers, parts.uri.query())
        .ok_or_else(|| {
            ApiError::Unauthorized(
                "placement lookups need a user, node or admin token (Authorization: Bearer ...)"
                    .into(),
            )
        })?;
    let claims = verifier
        .verify(&token)
        .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    Ok(LookupAuth::User(claims))
}

/// A connection with a verified client certificate (the mTLS listener) may act only as the
/// node its certificate names; others fall back to bearer tokens.
fn require_node_cert(parts: &Parts, id: &str) -> Option<Result<(), ApiError>> {
    let cert = parts
        .extensions
        .get::<super::server::ConnInfo>()?
        .client_cert
        .as_ref()?;
    Some(if super::tls::cert_names_node(cert, id) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "the client certificate does not name node {id}"
        )))
    })
}

// ---- end of issue 3 block ----

fn require_node<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    id: &str,
    admin_ok: bool,
) -> Result<(), ApiError> {
    // An operator's admin token works on every listener, the mTLS one included: what a node
    // certificate restricts is what a node may do, not what an admin may.
    if admin_ok && app.tokens.admin(&parts.headers) == Credential::Admin {
        return refuse_cross_site_basic(parts);
    }
    if let Some(r) = require_node_cert(parts, id) {
        return r;
    }
    match app.tokens.node(&parts.headers, id, admin_ok) {
        Credential::Node | Credential::Admin => refuse_cross_site_basic(parts),
        Credential::None => Err(ApiError::Unauthorized(
            "node token required (Authorization: Bearer ...)".into(),
        )),
        Credential::Elsewhere => Err(ApiError::Forbidden(format!(
            "this token cannot act as node {id} (another node's, or an admin's where only the node may act)"
        ))),
        _ => Err(ApiError::Unauthorized("invalid node token".into())),
    }
}

fn node_id(raw: &str) -> Result<NodeId, ApiError> {
    NodeId::parse(raw).map_err(|e| ApiError::InvalidRequest(e.to_string()))
}

#[derive(Serialize)]
struct PlacementView<'a> {
    room: &'a str,
    node: &'a str,
    url: &'a str,
    created: bool,
}

fn placement_view<'a>(room: &'a RoomKey, p: &'a Placement) -> PlacementView<'a> {
    PlacementView {
        room: room.as_str(),
        node: p.node.id.as_str(),
        url: &p.node.info.url,
        created: p.created,
    }
}

/// `GET /v1/placement/{room}`: the room's node, placing it unless `create=false`.
pub async fn placement<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    raw_room: &str,
) -> Result<Response<Body>, ApiError> {
    let auth = authorize_lookup(app, parts)?;
    let room = room_from_url(app, raw_room)?;
    auth.check(app, &room)?;
    let q = query(parts);
    let mut hints = HintArgs::from_query(&q)?;
    hints.size = auth.size(hints.size);
    let create = match q
        .iter()
        .find(|(k, _)| k == "create")
        .map(|(_, v)| v.as_ref())
    {
        None | Some("true") | Some("1") => true,
        Some("false") | Some("0") => false,
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "create must be true or false".into(),
            ))
        }
    };
    let p = app
        .router
        .place(&room, &hints.hints(), hints.size, Intent::Lookup { create })
        .await
        .map_err(|e| ApiError::from_join(e, app.retry_after()))?;
    let mut r = json(StatusCode::OK, &placement_view(&room, &p));
    set_node_header(&mut r, p.node.id.as_str());
    Ok(r)
}

pub fn set_node_header(r: &mut Response<Body>, node: &str) {
    if let Ok(v) = HeaderValue::from_str(node) {
        r.headers_mut().insert("x-room-node", v);
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    rooms: Vec<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    create: Option<bool>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum BatchItem<'a> {
    Ok(PlacementView<'a>),
    Err {
        room: String,
        error: &'static str,
        message: String,
    },
}

/// `POST /v1/placement`: up to 1000 rooms; answers a JSON array in request order.
pub async fn placement_batch<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let auth = authorize_lookup(app, parts)?;
    let bytes = read_body(
        body,
        &parts.headers,
        app.cfg.server.max_body_bytes,
        app.cfg.server.body_read_timeout,
    )
    .await?;
    let req: BatchRequest = parse_json(&bytes)?;
    if req.rooms.len() > MAX_BATCH {
        return Err(ApiError::InvalidRequest(format!(
            "at most {MAX_BATCH} rooms per batch"
        )));
    }
    let hints = HintArgs {
        region: req.region,
        tags: req.tags,
        // A batch has no size of its own; a user token's signed `size` still applies.
        size: auth.size(None),
    };
    hints.check()?;
    let create = req.create.unwrap_or(true);
    let rooms: Vec<Result<RoomKey, ApiError>> =
        req.rooms.iter().map(|raw| room_literal(app, raw)).collect();
    // Every room the token must admit, before any is placed: a refused batch changes nothing.
    for room in rooms.iter().flatten() {
        auth.check(app, room)?;
    }
    let mut results: Vec<Result<(RoomKey, Placement), (String, ApiError)>> =
        Vec::with_capacity(req.rooms.len());
    for (raw, room) in req.rooms.iter().zip(rooms) {
        let r = match room {
            Err(e) => Err((raw.clone(), e)),
            Ok(room) => app
                .router
                .place(&room, &hints.hints(), hints.size, Intent::Lookup { create })
                .await
                .map(|p| (room, p))
                .map_err(|e| (raw.clone(), ApiError::from_join(e, app.retry_after()))),
        };
        results.push(r);
    }
    let items: Vec<BatchItem<'_>> = results
        .iter()
        .map(|r| match r {
            Ok((room, p)) => BatchItem::Ok(placement_view(room, p)),
            Err((room, e)) => BatchItem::Err {
                room: room.clone(),
                error: e.code(),
                message: e.message(),
            },
        })
        .collect();
    Ok(json(StatusCode::OK, &items))
}

/// `GET /v1/placement/{room}/explain` (admin).
pub async fn explain<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    raw_room: &str,
) -> Result<Response<Body>, ApiError> {
    require_admin(app, parts)?;
    let room = room_from_url(app, raw_room)?;
    let hints = HintArgs::from_query(&query(parts))?;
    let e = app
        .router
        .explain(&room, &hints.hints(), hints.size)
        .await?;
    Ok(json(StatusCode::OK, &e))
}

#[derive(Deserialize)]
struct LoginRequest {
    room: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    size: Option<u32>,
}

/// A login posted by a browser form: every field a string, and a field left blank (`size=`,
/// `region=`: an HTML form sends its optional inputs whether or not they were filled in)
/// counts as absent, as a JSON body would leave it out.
#[derive(Deserialize)]
struct LoginForm {
    room: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    size: Option<String>,
}

impl LoginForm {
    fn into_request(self) -> Result<LoginRequest, ApiError> {
        let given = |v: Option<String>| v.filter(|v| !v.is_empty());
        Ok(LoginRequest {
            room: self.room,
            user: given(self.user),
            display_name: given(self.display_name),
            region: given(self.region),
            size: given(self.size).map(|s| parse_size(&s)).transpose()?,
        })
    }
}

#[derive(Serialize)]
struct LoginResponse<'a> {
    room: &'a str,
    node: &'a str,
    url: String,
    ticket: String,
    expires_in: u64,
}

/// The URL on the node where a room is joined.
pub fn node_room_url(base: &str, path_pattern: &str, room: &RoomKey) -> String {
    let enc =
        percent_encoding::utf8_percent_encode(room.as_str(), percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    format!("{}{}", base, path_pattern.replace("{room}", &enc))
}

/// `POST /v1/login`: JSON or a form; answers the node and a ticket, or 303 for browsers.
pub async fn login<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let bytes: Bytes = read_body(
        body,
        &parts.headers,
        app.cfg.server.max_body_bytes,
        app.cfg.server.body_read_timeout,
    )
    .await?;
    // A media type is case-insensitive (RFC 9110 §8.3.1), its parameters after a `;`.
    let form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            t.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    let req: LoginRequest = if form {
        serde_urlencoded::from_bytes::<LoginForm>(&bytes)
            .map_err(|e| ApiError::InvalidRequest(format!("invalid form: {e}")))?
            .into_request()?
    } else {
        parse_json(&bytes)?
    };
    if req.room.contains(char::REPLACEMENT_CHARACTER)
        && form
        && !super::front_door::param_is_utf8(&bytes, "room")
    {
        return Err(ApiError::InvalidRoom(
            crate::room::RoomError::NotUtf8.to_string(),
        ));
    }
    let room = room_literal(app, &req.room)?;
    let who = authenticate_user(app, parts, &room)?;
    // A verified token names the user; without user auth the body may.
    let user = match app.users {
        Some(_) => who.sub,
        None => req.user.unwrap_or_else(|| "anonymous".to_string()),
    };
    check_label("user", &user)
        .map_err(|_| ApiError::InvalidRequest("user must be 1-64 printable characters".into()))?;
    if let Some(d) = &req.display_name {
        if d.len() > 256 || d.chars().any(char::is_control) {
            return Err(ApiError::InvalidRequest(
                "display_name must be at most 256 printable bytes".into(),
            ));
        }
    }
    let hints = HintArgs {
        region: req.region.or(who.region),
        tags: vec![],
        // A token's size is signed; the body's is the client's to write.
        size: who.size.or(req.size),
    };
    hints.check()?;
    if req.size == Some(0) {
        return Err(ApiError::InvalidRequest(
            "size must be a positive integer".into(),
        ));
    }
    let p = app
        .router
        .place(&room, &hints.hints(), hints.size, Intent::Join)
        .await
        .map_err(|e| ApiError::from_join(e, app.retry_after()))?;
    let now_secs = app.router.now() / 1000;
    let ticket = app
        .tickets
        .issue(room.as_str(), p.node.id.as_str(), &user, now_secs);
    let url = node_room_url(&p.node.info.url, &app.cfg.tickets.node_path, &room);
    let wants_html = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    let mut r = if wants_html {
        let location = format!("{url}?{}={ticket}", app.cfg.tickets.query_param);
        let mut r = Response::new(super::full(Bytes::new()));
        *r.status_mut() = StatusCode::SEE_OTHER;
        r.headers_mut().insert(
            header::LOCATION,
            HeaderValue::from_str(&location)
                .map_err(|_| ApiError::InvalidRequest("unrepresentable location".into()))?,
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    } else {
        json(
            StatusCode::OK,
            &LoginResponse {
                room: room.as_str(),
                node: p.node.id.as_str(),
                url,
                ticket,
                expires_in: app.tickets.ttl_secs(),
            },
        )
    };
    set_node_header(&mut r, p.node.id.as_str());
    Ok(r)
}

/// One entry of a heartbeat's `rooms`, read leniently: an entry the router cannot use (a
/// room that is no string, a count that is negative, fractional, over `u32` or missing,
/// an entry that is no object) is kept as [`RoomReport::Unusable`], to be skipped and
/// named in `refused` rather than fail the whole heartbeat, as a room id that is not valid
/// is ([`Refused`]). Only the room and the count are kept, whatever else the entry holds.
enum RoomReport {
    Usable(String, u32),
    /// What to list in `refused` for the entry, and why.
    Unusable(String, &'static str),
}

impl<'de> Deserialize<'de> for RoomReport {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RoomReportVisitor)
    }
}

struct RoomReportVisitor;

impl RoomReportVisitor {
    fn not_an_object(shown: String) -> RoomReport {
        RoomReport::Unusable(shown, "a room entry must be an object")
    }
}

impl<'de> serde::de::Visitor<'de> for RoomReportVisitor {
    type Value = RoomReport;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a room entry")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RoomReport, A::Error> {
        use serde::de::IgnoredAny;
        let (mut room, mut count) = (None, None);
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match &*key {
                "room" => room = Some(map.next_value::<serde_json::Value>()?),
                "participants" => count = Some(map.next_value::<serde_json::Value>()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let count = count
            .as_ref()
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u32::try_from(n).ok());
        Ok(match (room, count) {
            (Some(serde_json::Value::String(room)), Some(n)) => RoomReport::Usable(room, n),
            (Some(serde_json::Value::String(room)), None) => RoomReport::Unusable(
                room,
                "participants must be a whole number from 0 to 4294967295",
            ),
            (Some(room), _) => RoomReport::Unusable(room.to_string(), "room must be a string"),
            (None, _) => RoomReport::Unusable(String::new(), "room is missing"),
        })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<RoomReport, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Self::not_an_object("[...]".into()))
    }

    fn visit_str<E>(self, v: &str) -> Result<RoomReport, E> {
        Ok(Self::not_an_object(serde_json::Value::from(v).to_string()))
    }

    fn visit_bool<E>(self, v: bool) -> Result<RoomReport, E> {
        Ok(Self::not_an_object(v.to_string()))
    }

    fn visit_i64<E>(self, v: i64) -> Result<RoomReport, E> {
        Ok(Self::not_an_object(v.to_string()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<RoomReport, E> {
        Ok(Self::not_an_object(v.to_string()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<RoomReport, E> {
        Ok(Self::not_an_object(v.to_string()))
    }

    fn visit_unit<E>(self) -> Result<RoomReport, E> {
        Ok(Self::not_an_object("null".into()))
    }
}

/// A heartbeat's `rooms`, refused as soon as it lists more than [`MAX_REPORTED_ROOMS`]:
/// the entries past the limit are never kept (a body of a million tiny entries, within
/// the byte limit, held a million entries before the count was checked).
fn bounded_rooms<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<RoomReport>>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Option<Vec<RoomReport>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of rooms")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut rooms = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
            while let Some(r) = seq.next_element::<RoomReport>()? {
                if rooms.len() == MAX_REPORTED_ROOMS {
                    return Err(serde::de::Error::custom(format!(
                        "at most {MAX_REPORTED_ROOMS} rooms per heartbeat"
                    )));
                }
                rooms.push(r);
            }
            Ok(Some(rooms))
        }
    }
    d.deserialize_any(Bounded)
}

#[derive(Deserialize)]
struct HeartbeatBody {
    url: String,
    #[serde(default)]
    upstream: Option<String>,
    capacity: f64,
    load: f64,
    #[serde(default)]
    cpu: Option<f64>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default, deserialize_with = "bounded_rooms")]
    rooms: Option<Vec<RoomReport>>,
}

impl HeartbeatBody {
    /// Fills in what the heartbeat leaves out (`upstream`, `region`, `tags`) from what the
    /// router knows of the node (`[[nodes]]`, a `PUT`, an earlier heartbeat): a node that
    /// reports only its url, capacity and load must not wipe the private upstream, region
    /// or tags an operator configured for it. An upstream that was only the node's old url
    /// (none given) follows the new url.
    fn keeping(mut self, known: Option<&NodeInfo>) -> HeartbeatBody {
        let Some(known) = known else {
            return self;
        };
        if self.upstream.is_none() && known.upstream != known.url {
            self.upstream = Some(known.upstream.clone());
        }
        if self.region.is_none() {
            self.region = known.region.clone();
        }
        if self.tags.is_none() {
            self.tags = Some(known.tags.clone());
        }
        self
    }
}

/// Validates a node description (heartbeat or admin PUT).
fn node_info(
    url: String,
    upstream: Option<String>,
    capacity: f64,
    region: Option<String>,
    mut tags: Vec<String>,
) -> Result<NodeInfo, ApiError> {
    check_url(&url).map_err(|m| ApiError::InvalidRequest(format!("url: {m}")))?;
    if let Some(u) = &upstream {
        check_url(u).map_err(|m| ApiError::InvalidRequest(format!("upstream: {m}")))?;
    }
    if !(capacity > 0.0 && capacity <= crate::cluster::MAX_UNITS) {
        return Err(ApiError::InvalidRequest(format!(
            "capacity must be a number > 0 and <= {:e}",
            crate::cluster::MAX_UNITS
        )));
    }
    crate::cluster::check_region_and_tags(region.as_deref(), &tags)
        .map_err(ApiError::InvalidRequest)?;
    tags.sort();
    tags.dedup();
    let url = url.trim_end_matches('/').to_string();
    Ok(NodeInfo {
        upstream: upstream
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| url.clone()),
        url,
        capacity,
        region,
        tags,
    })
}

/// `POST /v1/nodes/{id}/heartbeat` (node auth).
pub async fn heartbeat<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    body: Incoming,
    raw_id: &str,
) -> Result<Response<Body>, ApiError> {
    // Credentials first: a caller without them learns nothing, not even whether the id is valid.
    require_node(app, parts, raw_id, false)?;
    let id = node_id(raw_id)?;
    let bytes = read_body(
        body,
        &parts.headers,
        app.cfg.server.max_body_bytes.max(MAX_HEARTBEAT_BODY_BYTES),
        app.cfg.server.body_read_timeout,
    )
    .await?;
    let b: HeartbeatBody = parse_json(&bytes)?;
    drop(bytes);
    let b = b.keeping(app.router.cluster().snapshot().get(&id).map(|e| &e.info));
    let info = node_info(
        b.url,
        b.upstream,
        b.capacity,
        b.region,
        b.tags.unwrap_or_default(),
    )?;
    if !(b.load >= 0.0 && b.load <= crate::cluster::MAX_UNITS) {
        return Err(ApiError::InvalidRequest(format!(
            "load must be a number >= 0 and <= {:e}",
            crate::cluster::MAX_UNITS
        )));
    }
    if let Some(c) = b.cpu {
        if !(0.0..=1.0).contains(&c) {
            return Err(ApiError::InvalidRequest(
                "cpu must be between 0 and 1".into(),
            ));
        }
    }
    let state = match b.state.as_deref() {
        None | Some("active") => AdminState::Active,
        Some("draining") => AdminState::Draining,
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "state must be \"active\" or \"draining\"".into(),
            ))
        }
    };
    let mut refused = Refused::default();
    let rooms = match b.rooms {
        None => None,
        Some(v) => {
            let mut rooms = Vec::with_capacity(v.len());
            for r in v {
                let (room, participants) = match r {
                    RoomReport::Usable(room, n) => (room, n),
                    RoomReport::Unusable(shown, why) => {
                        refused.add(shown, "invalid_request", why.to_string());
                        continue;
                    }
                };
                match RoomKey::parse(&room, app.router.normalization()) {
                    Ok(k) => rooms.push((k, participants)),
                    Err(e) => refused.add(room, "invalid_room", e.to_string()),
                }
            }
            Some(rooms)
        }
    };
    let reply = app
        .router
        .heartbeat(
            &id,
            Heartbeat {
                info,
                load: b.load,
                cpu: b.cpu,
                state,
                rooms,
            },
        )
        .await?;
    if refused.count > 0 {
        refused.report(app, &id);
    }
    Ok(json(
        StatusCode::OK,
        &HeartbeatAnswer {
            reply: &reply,
            refused: refused.listed,
        },
    ))
}

/// A heartbeat's answer: the router's reply, and the room entries it could not take.
#[derive(Serialize)]
struct HeartbeatAnswer<'a> {
    #[serde(flatten)]
    reply: &'a crate::router::HeartbeatReply,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    refused: Vec<RefusedRoom>,
}

/// A room entry of a heartbeat the router could not take, as the answer lists it.
#[derive(Serialize)]
struct RefusedRoom {
    /// The entry's room (when it is no string, the room or the entry as JSON), cut to
    /// [`MAX_ROOM_BYTES`](crate::room::MAX_ROOM_BYTES) + 4 bytes.
    room: String,
    error: &'static str,
    message: String,
}

/// The room entries a heartbeat's node reported that the router cannot take: a room that
/// is not a valid room id (a `/`, a control character, over 256 bytes: `invalid_room`), or
/// an entry that is not `{"room": string, "participants": u32}` (`invalid_request`).
/// Skipped, so that one such entry does not have every heartbeat of its node refused. A
/// node heard from no more is taken for dead, its rooms re-placed on other nodes while it
/// still hosts them (split rooms), and it could not be told to evict anything.
#[derive(Default)]
struct Refused {
    count: u64,
    listed: Vec<RefusedRoom>,
}

impl Refused {
    fn add(&mut self, mut room: String, error: &'static str, message: String) {
        self.count += 1;
        if self.listed.len() < MAX_REFUSED_LISTED {
            let mut cut = room.len().min(crate::room::MAX_ROOM_BYTES + 4);
            while !room.is_char_boundary(cut) {
                cut -= 1;
            }
            room.truncate(cut);
            self.listed.push(RefusedRoom {
                room,
                error,
                message,
            });
        }
    }

    /// Counts them, and logs them: a warning at most once a minute per router (a node
    /// repeats its rooms every heartbeat), at debug level otherwise.
    fn report<S: PinStore>(&self, app: &App<S>, node: &NodeId) {
        app.router
            .metrics
            .heartbeat_rooms_refused
            .inc_by(self.count);
        let first = self.listed.first().map(|r| (&r.room, &r.message));
        let now = app.router.now();
        let last = app.refused_rooms_warned_at.load(Ordering::Relaxed);
        let warn = now >= last.saturating_add(60_000)
            && app
                .refused_rooms_warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if warn {
            tracing::warn!(
                node = %node, refused = self.count, example = ?first,
                "a heartbeat listed rooms that are not valid room ids; skipped them \
                 (roomrouter_heartbeat_rooms_refused_total counts them; more at debug level)"
            );
        } else {
            tracing::debug!(node = %node, refused = self.count, example = ?first,
                "a heartbeat listed rooms that are not valid room ids; skipped them");
        }
    }
}

/// `GET /v1/nodes` (admin).
pub fn list_nodes<S: PinStore>(app: &App<S>, parts: &Parts) -> Result<Response<Body>, ApiError> {
    require_admin(app, parts)?;
    #[derive(Serialize)]
    struct Nodes<T> {
        nodes: T,
    }
    Ok(json(
        StatusCode::OK,
        &Nodes {
            nodes: app.router.nodes(),
        },
    ))
}

fn unknown_node(id: &NodeId) -> ApiError {
    ApiError::NotFound(format!("no node {id}"))
}

/// `GET /v1/nodes/{id}` (admin).
pub fn get_node<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    raw_id: &str,
) -> Result<Response<Body>, ApiError> {
    require_admin(app, parts)?;
    let id = node_id(raw_id)?;
    let s = app.router.node(&id).ok_or_else(|| unknown_node(&id))?;
    Ok(json(StatusCode::OK, &s))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutNode {
    url: String,
    #[serde(default)]
    upstream: Option<String>,
    capacity: f64,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// `PUT /v1/nodes/{id}` (admin): register or update a node by hand.
pub async fn put_node<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    body: Incoming,
    raw_id: &str,
) -> Result<Response<Body>, ApiError> {
    require_admin(app, parts)?;
    let id = node_id(raw_id)?;
    let bytes = read_body(
        body,
        &parts.headers,
        app.cfg.server.max_body_bytes,
        app.cfg.server.body_read_timeout,
    )
    .await?;
    let b: PutNode = parse_json(&bytes)?;
    let info = node_info(b.url, b.upstream, b.capacity, b.region, b.tags)?;
    let outcome = app.router.put_node(&id, info);
    let status = if outcome == crate::cluster::Upsert::Added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let s = app.router.node(&id).ok_or_else(|| unknown_node(&id))?;
    Ok(json(status, &s))
}

/// `DELETE /v1/nodes/{id}` (node or admin).
pub fn delete_node<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    raw_id: &str,
) -> Result<Response<Body>, ApiError> {
    require_node(app, parts, raw_id, true)?;
    let id = node_id(raw_id)?;
    if !app.router.remove_node(&id) {
        return Err(unknown_node(&id));
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "removed": id.as_str() }),
    ))
}

/// `POST /v1/nodes/{id}/drain|disable|enable` (admin).
pub fn node_action<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    raw_id: &str,
    action: &str,
) -> Result<Response<Body>, ApiError> {
    require_admin(app, parts)?;
    let id = node_id(raw_id)?;
    let state = match action {
        "drain" => AdminState::Draining,
        "disable" => AdminState::Disabled,
        _ => AdminState::Active,
    };
    if !app.router.set_admin_state(&id, state) {
        return Err(unknown_node(&id));
    }
    match app.router.node(&id) {
        Some(s) => Ok(json(StatusCode::OK, &s)),
        // Left under a drain or disable: the state it comes back with.
        None => Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "id": id.as_str(),
                "listed": false,
                "admin_state": state.as_str(),
            }),
        )),
    }
}

#[derive(Serialize)]
struct RoomView<'a> {
    room: &'a str,
    node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    created_at_ms: u64,
    confirmed_at_ms: u64,
}

fn room_view<'a, S: PinStore>(app: &App<S>, room: &'a RoomKey, pin: &'a Pin) -> RoomView<'a> {
    RoomView {
        room: room.as_str(),
        node: pin.node.as_str(),
        url: app
            .router
            .cluster()
            .snapshot()
            .get(&pin.node)
            .map(|e| e.info.url.clone()),
        created_at_ms: pin.created_at,
        confirmed_at_ms: pin.confirmed_at,
    }
}

/// `GET /v1/rooms?cursor=&limit=` (admin).
pub async fn list_rooms<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
) -> Result<Response<Body>, ApiError> {
    require_admin(app, parts)?;
    let q = query(parts);
    let cursor = q
        .iter()
        .find(|(k, _)| k == "cursor")
        .map(|(_, v)| v.to_string());
    let limit = match q.iter().find(|(k, _)| k == "limit") {
        None => 100,
        Some((_, v)) => v
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| ApiError::InvalidRequest("limit must be 1-1000".into()))?,
    };
    let page = app.router.store().list(cursor.as_deref(), limit).await?;
    let rooms: Vec<RoomView<'_>> = page
        .rooms
        .iter()
        .map(|(k, p)| room_view(app, k, p))
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "rooms": rooms, "next_cursor": page.next_cursor }),
    ))
}

/// `GET /v1/rooms/{room}` (admin): no side effects.
pub async fn get_room<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    raw_room: &str,
) -> Result<Response<Body>, ApiError> {
    require_admin(app, parts)?;
    let room = room_from_url(app, raw_room)?;
    let pin = app
        .router
        .room(&room)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("room {room} has no placement")))?;
    Ok(json(StatusCode::OK, &room_view(app, &room, &pin)))
}

/// `DELETE /v1/rooms/{room}` (admin).
pub async fn delete_room<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
    raw_room: &str,
) -> Result<Response<Body>, ApiError> {
    require_admin(app, parts)?;
    let room = room_from_url(app, raw_room)?;
    let pin = app
        .router
        .delete_room(&room)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("room {room} has no placement")))?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "room": room.as_str(), "released_from": pin.node.as_str() }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::MAX_LABEL;

    /// The most a node may report, each room a longest id and a largest participant count,
    /// with the longest node fields, fits the heartbeat limit.
    #[test]
    fn the_heartbeat_limit_holds_the_most_rooms_a_heartbeat_may_list() {
        let room = "r".repeat(crate::room::MAX_ROOM_BYTES);
        let rooms: Vec<serde_json::Value> = (0..MAX_REPORTED_ROOMS)
            .map(|_| serde_json::json!({"room": room, "participants": u32::MAX}))
            .collect();
        let tags: Vec<String> = (0..MAX_TAGS).map(|i| format!("{i:064}")).collect();
        let url = format!("https://{}.example", "n".repeat(2000));
        let body = serde_json::json!({
            "url": url, "upstream": url, "capacity": f64::MAX, "load": f64::MAX, "cpu": 0.5,
            "region": "r".repeat(MAX_LABEL), "tags": tags, "state": "draining", "rooms": rooms,
        });
        let len = serde_json::to_vec(&body).unwrap().len();
        assert!(len <= MAX_HEARTBEAT_BODY_BYTES, "{len}");
        // ... with room to spare for a serializer's spaces and newlines.
        assert!(
            len + 2 * MAX_REPORTED_ROOMS <= MAX_HEARTBEAT_BODY_BYTES,
            "{len}"
        );
    }
}
