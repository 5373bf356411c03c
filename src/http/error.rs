//! One error type for every HTTP answer that is not a success: a stable `error` code, the
//! matching status, and a human message, rendered as `{"error": ..., "message": ...}`.

use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use super::{full, Body};
use crate::router::JoinError;

/// An API error. The code strings are part of the contract: keep them stable.
#[derive(Debug, Clone)]
pub enum ApiError {
    InvalidRoom(String),
    InvalidRequest(String),
    Unauthorized(String),
    Forbidden(String),
    NotFound(String),
    MethodNotAllowed(&'static str),
    RequestTimeout,
    PayloadTooLarge(usize),
    NodeFull {
        node: String,
        retry_after: Duration,
    },
    NoCapacity {
        retry_after: Duration,
    },
    StoreUnavailable(String),
    UpstreamUnavailable(String),
    NotReady(Vec<String>),
    /// A new room while the router's startup hold lasts: `not_ready`, with `Retry-After`.
    Starting {
        message: String,
        retry_after: Duration,
    },
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasons: Option<&'a [String]>,
}

impl ApiError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRoom(_) => "invalid_room",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::NodeFull { .. } => "node_full",
            ApiError::NoCapacity { .. } => "no_capacity",
            ApiError::StoreUnavailable(_) => "store_unavailable",
            ApiError::UpstreamUnavailable(_) => "upstream_unavailable",
            ApiError::NotReady(_) | ApiError::Starting { .. } => "not_ready",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRoom(_) | ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NodeFull { .. }
            | ApiError::NoCapacity { .. }
            | ApiError::StoreUnavailable(_)
            | ApiError::NotReady(_)
            | ApiError::Starting { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::InvalidRoom(m)
            | ApiError::InvalidRequest(m)
            | ApiError::Unauthorized(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::StoreUnavailable(m)
            | ApiError::UpstreamUnavailable(m)
            | ApiError::Starting { message: m, .. } => m.clone(),
            ApiError::MethodNotAllowed(allow) => {
                format!("method not allowed here; allowed: {allow}")
            }
            ApiError::RequestTimeout => "the request was not received in time".into(),
            ApiError::PayloadTooLarge(max) => format!("request body larger than {max} bytes"),
            ApiError::NodeFull { node, .. } => {
                format!("the room's node {node} is full; retry later")
            }
            ApiError::NoCapacity { .. } => {
                "no node has capacity for a new room; retry later".into()
            }
            ApiError::NotReady(r) => format!("not ready: {}", r.join("; ")),
        }
    }

    /// Renders the error response.
    pub fn into_response(self) -> Response<Body> {
        let message = self.message();
        let (node, reasons) = match &self {
            ApiError::NodeFull { node, .. } => (Some(node.as_str()), None),
            ApiError::NotReady(r) => (None, Some(r.as_slice())),
            _ => (None, None),
        };
        let body = serde_json::to_vec(&ErrorBody {
            error: self.code(),
            message: &message,
            node,
            reasons,
        })
        .unwrap_or_default();
        let mut resp = Response::new(full(body));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match &self {
            ApiError::NodeFull { retry_after, .. }
            | ApiError::NoCapacity { retry_after }
            | ApiError::Starting { retry_after, .. } => {
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from((retry_after.as_millis().div_ceil(1000) as u64).max(1)),
                );
            }
            // A store that cannot answer is an outage or a router catching up with
            // Redis: seconds, not minutes.
            ApiError::StoreUnavailable(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            ApiError::MethodNotAllowed(allow) => {
                h.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::Unauthorized(_) => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }

    /// Maps a router refusal.
    ///
    /// (A store failure alone converts through `From<StoreError>`.)
    pub fn from_join(e: JoinError, retry_after: Duration) -> ApiError {
        match e {
            JoinError::NodeFull { node } => ApiError::NodeFull {
                node: node.to_string(),
                retry_after,
            },
            JoinError::NoCapacity => ApiError::NoCapacity { retry_after },
            JoinError::NotFound => ApiError::NotFound("the room has no placement".into()),
            e @ JoinError::Starting { left_ms } => ApiError::Starting {
                message: e.to_string(),
                retry_after: Duration::from_millis(left_ms),
            },
            e @ JoinError::NodeSyncing { .. } => ApiError::Starting {
                message: e.to_string(),
                retry_after: Duration::from_secs(1),
            },
            JoinError::Store(e) => e.into(),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        ApiError::StoreUnavailable(e.to_string())
    }
}
