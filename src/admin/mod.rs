//! The admin listener: health, readiness, metrics and provider status/control. It runs on
//! the control runtime, apart from the proxy's threads, so a slow scrape never competes
//! with proxied requests.

mod providers;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::config::ReadyRequires;
use crate::gateway::Gateway;
use crate::metrics;
use crate::token::ProviderState;

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/admin/proxy", get(proxy_status))
        .route("/admin/providers", get(providers::list))
        .route("/admin/providers/{name}", get(providers::one))
        .route("/admin/providers/{name}/refresh", post(providers::refresh))
        .route("/admin/providers/{name}/login", post(providers::login_start))
        .route("/admin/providers/{name}/login/code", post(providers::login_code))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(gateway.clone(), require_token))
        .with_state(gateway)
}

/// Serve on an already-bound listener until the process exits.
pub async fn serve(listener: std::net::TcpListener, gateway: Arc<Gateway>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    axum::serve(listener, router(gateway)).await
}

/// When `admin.token` is set, every path but the probes needs `Authorization: Bearer …`,
/// compared in constant time.
async fn require_token(State(gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/healthz" || path == "/readyz" {
        return next.run(req).await;
    }
    let active = gw.active();
    if let Some(expected) = &active.settings.admin.token {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            // The scheme name is case-insensitive (RFC 9110 section 11.1).
            .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
            .map(|v| &v[7..])
            .unwrap_or(b"");
        let ok: bool = presented.ct_eq(expected.expose().as_bytes()).into();
        if !ok {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this admin path needs `Authorization: Bearer <admin token>`",
            );
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    drop(active);
    next.run(req).await
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when every provider holds a usable token, so that an app started behind
/// tollgate never sees a 503 for lack of one. With `ready_requires = "startup"` (the
/// default) that is required once: afterwards an IdP outage or an awaited login does not
/// take every replica out of the Service at once (the routes needing no token keep
/// working, and the ones needing it answer 503 JSON with `Retry-After`).
async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let active = gw.active();
    let mut all_valid = true;
    let mut states = serde_json::Map::new();
    for (name, h) in &active.providers {
        let state = h.cell.state();
        all_valid &= matches!(state, ProviderState::Valid | ProviderState::Degraded);
        states.insert(name.clone(), json!(state.as_str()));
    }
    let ready = match active.settings.admin.ready_requires {
        ReadyRequires::Always => all_valid,
        ReadyRequires::Startup => gw.latch_ready(all_valid),
    };
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(json!({"ready": ready, "all_providers_valid": all_valid, "providers": states}))).into_response()
}

async fn metrics_text(State(gw): State<Arc<Gateway>>) -> Response {
    let m = metrics::get();
    // Validity changes with time alone (a token expires while the IdP is down), so it is
    // computed at scrape time rather than only when the refresher acts.
    for (name, h) in &gw.active().providers {
        m.token_valid.with_label_values(&[name]).set(h.cell.usable().is_some() as i64);
        m.provider_awaiting_code.with_label_values(&[name]).set(h.cell.status().awaiting_code as i64);
    }
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], m.encode()).into_response()
}

/// The proxy's running switches and which path has been serving: an operator turning
/// `proxy.fast_path` on or off (by a reload) sees here that it took effect, and why
/// connections still went to pingora.
async fn proxy_status(State(gw): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    use prometheus::core::Collector;
    let active = gw.active();
    let p = &active.settings.proxy;
    let mut served = 0u64;
    let mut handed = serde_json::Map::new();
    for family in metrics::get().fastpath_total.collect() {
        for m in family.get_metric() {
            let label = |name: &str| m.get_label().iter().find(|l| l.name() == name).map(|l| l.value().to_string());
            let count = m.get_counter().get_value() as u64;
            match (label("path").as_deref(), label("reason")) {
                (Some("fast"), _) => served += count,
                (Some("pingora"), Some(reason)) => {
                    handed.insert(reason, json!(count));
                }
                _ => {}
            }
        }
    }
    Json(json!({
        "listen": p.listen.to_string(),
        "threads": p.threads,
        "fast_path": p.fast_path,
        "fast_path_requests": served,
        "handed_to_pingora": handed,
    }))
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such admin path")
}

pub(crate) fn error(code: StatusCode, error: &str, message: &str) -> Response {
    (code, Json(json!({"error": error, "message": message}))).into_response()
}
