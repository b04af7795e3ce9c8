//! `/admin/providers`: what each provider is doing, without ever showing a token or a
//! secret, and a way to force a refresh.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error;
use crate::gateway::{Gateway, ProviderHandle};

fn ts(t: Option<SystemTime>) -> Value {
    match t {
        Some(t) => json!(humantime::format_rfc3339_seconds(t).to_string()),
        None => Value::Null,
    }
}

pub(crate) fn describe(h: &ProviderHandle) -> Value {
    let st = h.cell.status();
    let token = h.cell.latest().map(|t| {
        json!({
            "generation": t.generation,
            "usable": t.usable_at(std::time::Instant::now()),
            "issued_at": ts(Some(t.issued_at)),
            "expires_at": ts(t.expires_at),
            "expires_in_s": t.expires_at.map(|e| e.duration_since(SystemTime::now()).map(|d| d.as_secs()).unwrap_or(0)),
            "scope": t.scope,
            "extras": t.extras,
        })
    });
    json!({
        "name": h.spec.name,
        "kind": h.spec.source.kind(),
        "state": h.cell.state().as_str(),
        "token": token,
        "last_success": ts(st.last_success),
        "last_attempt": ts(st.last_attempt),
        "last_error": st.last_error.map(|c| json!({
            "class": c.as_str(),
            "detail": st.last_error_detail,
            "at": ts(st.last_error_at),
        })),
        "consecutive_failures": st.consecutive_failures,
        "next_attempt": ts(st.next_attempt),
    })
}

pub(super) async fn list(State(gw): State<Arc<Gateway>>) -> Json<Value> {
    let active = gw.snapshot();
    Json(json!({"providers": active.providers.values().map(|h| describe(h)).collect::<Vec<_>>()}))
}

pub(super) async fn one(State(gw): State<Arc<Gateway>>, Path(name): Path<String>) -> Response {
    match gw.snapshot().providers.get(&name) {
        Some(h) => Json(describe(h)).into_response(),
        None => unknown(&name),
    }
}

/// Force a refresh and wait (up to 15 s) for its outcome, so that a script can tell
/// whether it worked.
pub(super) async fn refresh(State(gw): State<Arc<Gateway>>, Path(name): Path<String>) -> Response {
    let active = gw.snapshot();
    let Some(h) = active.providers.get(&name) else {
        return unknown(&name);
    };
    let mut rx = h.cell.subscribe();
    let before = rx.borrow_and_update().seq;
    h.cell.force_refresh();
    let waited = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if rx.changed().await.is_err() {
                return None;
            }
            let a = *rx.borrow_and_update();
            if a.seq > before {
                return Some(a);
            }
        }
    })
    .await;
    match waited {
        Ok(Some(a)) if a.failed.is_none() => (StatusCode::OK, Json(describe(h))).into_response(),
        Ok(Some(_)) => (StatusCode::BAD_GATEWAY, Json(describe(h))).into_response(),
        _ => (StatusCode::ACCEPTED, Json(describe(h))).into_response(),
    }
}

fn unknown(name: &str) -> Response {
    error(StatusCode::NOT_FOUND, "unknown_provider", &format!("no provider named `{name}`"))
}
