//! One table from (method, path) to handler, and the configurable front-door patterns.
//!
//! Paths are matched on their raw (still percent-encoded) segments; a room segment is decoded
//! by `RoomKey::from_encoded`, the one function every path uses.

/// A byte a URL path may carry as it is (RFC 3986: unreserved, sub-delims, ':', '@', '/',
/// and the '%' of a percent-encoding): what a request's path arrives made of.
pub fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b)
}

/// A front-door path pattern such as `/rooms/{room}`: literal segments and exactly one
/// `{room}` segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPattern {
    segments: Vec<Seg>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Room,
}

impl RoomPattern {
    pub fn parse(p: &str) -> Result<RoomPattern, String> {
        let rest = p.strip_prefix('/').ok_or("must start with '/'")?;
        let mut segments = Vec::new();
        for s in rest.split('/') {
            if s == "{room}" {
                segments.push(Seg::Room);
            } else if s.contains('{') || s.contains('}') {
                return Err(format!(
                    "unknown placeholder in segment {s:?}; only {{room}} is allowed"
                ));
            } else if s.is_empty() {
                return Err("empty path segment".into());
            } else if !s.bytes().all(is_path_byte) {
                // Matched against the raw path, where such a byte never arrives as it is.
                return Err(format!(
                    "segment {s:?} would never match: write it as it arrives in a request \
                     (percent-encode non-ASCII, spaces and the like)"
                ));
            } else {
                segments.push(Seg::Lit(s.to_string()));
            }
        }
        match segments.iter().filter(|s| **s == Seg::Room).count() {
            1 => {}
            _ => return Err("must contain exactly one {room} segment".into()),
        }
        if segments.first() == Some(&Seg::Lit("v1".into())) {
            return Err("must not start with /v1 (reserved for the API)".into());
        }
        Ok(RoomPattern { segments })
    }

    /// The raw room segment if `path` matches. Extra trailing segments are allowed so that a
    /// meeting client's sub-resources (`/rooms/x/ws`) follow the room.
    pub fn matches<'a>(&self, path: &'a str) -> Option<&'a str> {
        let mut parts = path.strip_prefix('/')?.split('/');
        let mut room = None;
        for seg in &self.segments {
            let part = parts.next()?;
            match seg {
                Seg::Lit(l) if l == part => {}
                Seg::Lit(_) => return None,
                Seg::Room => room = Some(part),
            }
        }
        room
    }
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    Healthz,
    Readyz,
    Metrics,
    Dashboard,
    Login,
    Placement(&'a str),
    PlacementExplain(&'a str),
    PlacementBatch,
    Nodes,
    Node(&'a str),
    Heartbeat(&'a str),
    NodeAction(&'a str, &'a str),
    Rooms,
    Room(&'a str),
    /// A path under /v1 that names nothing.
    UnknownApi,
    /// Anything else: the front door decides.
    FrontDoor,
}

impl Route<'_> {
    /// Methods the route accepts, for 405 answers.
    pub fn allowed(&self) -> &'static str {
        match self {
            Route::Healthz
            | Route::Readyz
            | Route::Metrics
            | Route::Dashboard
            | Route::PlacementExplain(_)
            | Route::Nodes
            | Route::Rooms => "GET, HEAD",
            // A lookup places a room that has no node yet: no HEAD, which must change nothing.
            Route::Placement(_) => "GET",
            Route::Login | Route::PlacementBatch | Route::Heartbeat(_) | Route::NodeAction(..) => {
                "POST"
            }
            Route::Node(_) => "GET, HEAD, PUT, DELETE",
            Route::Room(_) => "GET, HEAD, DELETE",
            Route::UnknownApi | Route::FrontDoor => "GET",
        }
    }
}

/// Classifies a raw path.
pub fn route(path: &str) -> Route<'_> {
    match path {
        "/healthz" => return Route::Healthz,
        "/readyz" => return Route::Readyz,
        "/metrics" => return Route::Metrics,
        "/dashboard" | "/dashboard/" => return Route::Dashboard,
        "/v1/login" => return Route::Login,
        "/v1/placement" => return Route::PlacementBatch,
        "/v1/nodes" => return Route::Nodes,
        "/v1/rooms" => return Route::Rooms,
        // The API's own root, never a front-door path (`/v1?room=x` is no join).
        "/v1" => return Route::UnknownApi,
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v1/") else {
        return Route::FrontDoor;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    // An empty room (`/v1/placement/`, `/v1/rooms/`) reaches its handler, which answers
    // `400 invalid_room` as for any room id it cannot take, not `404`: the endpoint exists,
    // the caller's room variable was empty.
    match parts.as_slice() {
        ["placement", room] => Route::Placement(room),
        ["placement", room, "explain"] => Route::PlacementExplain(room),
        ["nodes", id] if !id.is_empty() => Route::Node(id),
        ["nodes", id, "heartbeat"] => Route::Heartbeat(id),
        ["nodes", id, action @ ("drain" | "disable" | "enable")] => Route::NodeAction(id, action),
        ["rooms", room] => Route::Room(room),
        _ => Route::UnknownApi,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_need_one_room_segment() {
        assert!(RoomPattern::parse("/rooms/{room}").is_ok());
        assert!(RoomPattern::parse("/b/{room}/join").is_ok());
        assert!(RoomPattern::parse("rooms/{room}").is_err());
        assert!(RoomPattern::parse("/rooms").is_err());
        assert!(RoomPattern::parse("/{room}/{room}").is_err());
        assert!(RoomPattern::parse("/{user}/{room}").is_err());
        assert!(RoomPattern::parse("/v1/{room}").is_err());
    }

    #[test]
    fn patterns_match_raw_segments() {
        let p = RoomPattern::parse("/rooms/{room}").unwrap();
        assert_eq!(p.matches("/rooms/abc"), Some("abc"));
        assert_eq!(p.matches("/rooms/a%20b/ws"), Some("a%20b"));
        assert_eq!(p.matches("/join/abc"), None);
        assert_eq!(p.matches("/rooms"), None);
    }

    #[test]
    fn a_literal_segment_no_request_path_can_carry_is_refused() {
        // A request's path arrives percent-encoded: "/räume/x" as "/r%C3%A4ume/x".
        let e = RoomPattern::parse("/räume/{room}").unwrap_err();
        assert!(e.contains("would never match"), "{e}");
        assert!(RoomPattern::parse("/my rooms/{room}").is_err());
        let p = RoomPattern::parse("/r%C3%A4ume/{room}").unwrap();
        assert_eq!(p.matches("/r%C3%A4ume/x"), Some("x"));
    }

    #[test]
    fn the_route_table() {
        assert_eq!(route("/v1/placement/x"), Route::Placement("x"));
        assert_eq!(
            route("/v1/placement/x/explain"),
            Route::PlacementExplain("x")
        );
        assert_eq!(route("/v1/nodes/n1/heartbeat"), Route::Heartbeat("n1"));
        assert_eq!(
            route("/v1/nodes/n1/drain"),
            Route::NodeAction("n1", "drain")
        );
        assert_eq!(route("/v1/nodes/n1/reboot"), Route::UnknownApi);
        assert_eq!(route("/v1/rooms/r"), Route::Room("r"));
        assert_eq!(route("/v1/rooms/"), Route::Room(""));
        assert_eq!(route("/v1/placement/"), Route::Placement(""));
        assert_eq!(route("/rooms/r"), Route::FrontDoor);
        assert_eq!(route("/v1/whatever"), Route::UnknownApi);
        assert_eq!(route("/v1"), Route::UnknownApi);
        assert_eq!(route("/v1/"), Route::UnknownApi);
    }
}
