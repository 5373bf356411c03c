//! Operations endpoints: liveness, readiness, Prometheus metrics and the admin dashboard.

use http::request::Parts;
use http::{header, HeaderValue, Response, StatusCode};

use super::api::require_admin;
use super::{full, json, ApiError, App, Body};
use crate::store::PinStore;

pub fn healthz() -> Response<Body> {
    json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

pub fn readyz<S: PinStore>(app: &App<S>) -> Result<Response<Body>, ApiError> {
    match app.router.readiness() {
        Ok(()) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "status": "ready" }),
        )),
        // An answer, not a failed request: probes ask every few seconds through an outage,
        // and counted and logged as errors they would drown the refusals users met.
        Err(reasons) => Ok(ApiError::NotReady(reasons).into_response()),
    }
}

pub async fn metrics<S: PinStore>(app: &App<S>) -> Response<Body> {
    let mut r = Response::new(full(app.router.render_metrics().await));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `GET /dashboard` (admin; Bearer, or Basic with the token as password so a browser can log in).
pub async fn dashboard<S: PinStore>(
    app: &App<S>,
    parts: &Parts,
) -> Result<Response<Body>, ApiError> {
    if let Err(e) = require_admin(app, parts) {
        // Through `error_response`, as every other error: logged and counted by code.
        let mut r = super::error_response(app, parts.uri.path(), e);
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"roomrouter\""),
        );
        return Ok(r);
    }
    let nodes = app.router.nodes();
    let pins = app.router.store().count().await.unwrap_or(0);
    let ready = match app.router.readiness() {
        Ok(()) => "ready".to_string(),
        Err(r) => format!("NOT READY: {}", r.join("; ")),
    };
    let mut rows = String::new();
    for n in &nodes {
        rows.push_str(&format!(
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.1}</td><td>{:.0}%</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            if n.healthy { "ok" } else { "bad" },
            esc(n.id.as_str()),
            esc(&n.info.url),
            n.state.as_str(),
            if n.healthy { "healthy" } else { "unhealthy" },
            n.info.capacity,
            n.load,
            n.utilization * 100.0,
            n.pending,
            if n.reserved_by_others > 0.0 {
                format!("{:.1} + {:.1} by other routers", n.reserved, n.reserved_by_others)
            } else {
                format!("{:.1}", n.reserved)
            },
            n.rooms,
            esc(n.info.region.as_deref().unwrap_or("")),
            n.last_heartbeat_ms_ago.map(|ms| format!("{:.1} s ago", ms as f64 / 1000.0)).unwrap_or_else(|| "never".into()),
        ));
    }
    let html = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>roomrouter</title><style>
body{{font-family:system-ui,sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}} tr.bad{{color:#a00}}
</style></head><body><h1>roomrouter</h1>
<p>{} &middot; {} nodes &middot; {} rooms pinned &middot; rule <code>{}</code></p>
<table><tr><th>node</th><th>url</th><th>state</th><th>health</th><th>capacity</th><th>load</th><th>&ucirc;</th><th>pending</th><th>reserved</th><th>rooms</th><th>region</th><th>last heartbeat</th></tr>
{}</table></body></html>"#,
        esc(&ready),
        nodes.len(),
        pins,
        app.cfg.placement.rule.name(),
        rows
    );
    let mut r = Response::new(full(html));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}
