//! `/admin/providers`: what each provider is doing, without ever showing a token or a
//! secret, and a way to force a refresh.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use tokio::sync::oneshot;

use super::error;
use crate::gateway::{Gateway, ProviderHandle};
use crate::provider::FetchError;
use crate::secret::Secret;
use crate::token::driver::Command;

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
            "usable": t.usable(),
            "issued_at": ts(Some(t.issued_at)),
            "expires_at": ts(t.expires_at),
            "expires_in_s": t.expires_at.map(|e| e.duration_since(SystemTime::now()).map(|d| d.as_secs()).unwrap_or(0)),
            "scope": t.scope,
            "extras": t.extras,
        })
    });
    json!({
        "name": h.spec.name,
        "kind": h.spec.kind.as_str(),
        "state": h.cell.state().as_str(),
        "phase": st.phase.as_str(),
        "pending_login": st.pending_login,
        "token_source": st.origin.map(|o| o.as_str()),
        "store": {
            "errors": st.store_errors,
            "last_error": st.last_store_error,
        },
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
    let store = gw.store();
    Json(json!({
        "providers": active.providers.values().map(|h| describe(h)).collect::<Vec<_>>(),
        "store": {
            "kind": store.describe(),
            // A shared store: whether the last operation reached it (else replicas fetch alone).
            "shared_reachable": store.fleet().map(|f| f.healthy()),
        },
    }))
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

/// The code, as JSON `{"code": "…"}` or a plain-text body.
fn code_from(body: &[u8]) -> Option<Secret> {
    let text = std::str::from_utf8(body).ok()?.trim();
    let code = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => o.get("code").and_then(Value::as_str).map(str::to_string)?,
        _ => text.to_string(),
    };
    let code = code.trim().to_string();
    (!code.is_empty() && code.len() <= 256 && !code.chars().any(char::is_control)).then(|| Secret::new(code))
}

async fn send(
    h: &ProviderHandle,
    cmd: impl FnOnce(oneshot::Sender<Result<(), FetchError>>) -> Command,
) -> Result<(), Response> {
    let (tx, rx) = oneshot::channel();
    if h.commands.send(cmd(tx)).await.is_err() {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "provider_stopped",
            "the provider is being replaced; try again",
        ));
    }
    match tokio::time::timeout(Duration::from_secs(60), rx).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => {
            let code = if e.class.is_credential() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::BAD_GATEWAY };
            Err((code, Json(json!({"error": e.class.as_str(), "message": e.detail, "provider": h.spec.name})))
                .into_response())
        }
        _ => Err(error(StatusCode::GATEWAY_TIMEOUT, "timeout", "the identity provider did not answer in time")),
    }
}

/// Start a human login: run the steps before the code (e.g. have the IdP send an OTP).
pub(super) async fn login_start(State(gw): State<Arc<Gateway>>, Path(name): Path<String>) -> Response {
    let active = gw.snapshot();
    let Some(h) = active.providers.get(&name) else {
        return unknown(&name);
    };
    match send(h, Command::LoginStart).await {
        Ok(()) => Json(json!({
            "provider": name,
            "state": h.cell.state().as_str(),
            "message": format!("login started; deliver the code with `tollgate login {name} --code …` or POST /admin/providers/{name}/login/code"),
        }))
        .into_response(),
        Err(r) => r,
    }
}

/// Finish a human login with the code (JSON `{"code": "…"}` or the bare code).
pub(super) async fn login_code(
    State(gw): State<Arc<Gateway>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let active = gw.snapshot();
    let Some(h) = active.providers.get(&name) else {
        return unknown(&name);
    };
    let Some(code) = code_from(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_code",
            "send the code as {\"code\": \"…\"} or as a plain-text body",
        );
    };
    match send(h, move |tx| Command::LoginCode(code, tx)).await {
        Ok(()) => Json(describe(h)).into_response(),
        Err(r) => r,
    }
}
