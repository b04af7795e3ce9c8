//! The demo's two loopback doubles, as small as a first look needs: seed 002's JSON
//! `/oauth/v2/token` endpoint (client_credentials only) issuing tokens with a lifetime,
//! and an echo upstream that accepts only tokens the endpoint issued and that are still
//! current, so the demo shows tollgate renewing tokens before they expire. The doubles
//! with failure modes live in the dev-only `tollgate-testkit` crate, not here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// Where the token endpoint is mounted (seed 002's path).
pub const TOKEN_PATH: &str = "/oauth/v2/token";

/// Issued tokens and when each stops being current, shared by both doubles.
struct Issued {
    client_id: String,
    client_secret: String,
    lifetime: Duration,
    counter: AtomicU64,
    tokens: Mutex<HashMap<String, Instant>>,
}

impl Issued {
    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running doubles' URLs. Their tasks live on the runtime that started them.
pub struct Doubles {
    pub token_url: String,
    pub upstream_url: String,
}

/// Start both doubles on ephemeral loopback ports, on the current runtime.
pub async fn start(client_id: &str, client_secret: &str, lifetime: Duration) -> std::io::Result<Doubles> {
    let issued = Arc::new(Issued {
        client_id: client_id.into(),
        client_secret: client_secret.into(),
        lifetime,
        counter: AtomicU64::new(0),
        tokens: Mutex::new(HashMap::new()),
    });
    let idp = serve(Router::new().route(TOKEN_PATH, post(token)).with_state(Arc::clone(&issued))).await?;
    let upstream = serve(Router::new().fallback(echo).with_state(issued)).await?;
    Ok(Doubles { token_url: format!("http://{idp}{TOKEN_PATH}"), upstream_url: format!("http://{upstream}") })
}

async fn serve(app: Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

fn error(status: StatusCode, code: &str) -> Response {
    (status, Json(json!({"error": code}))).into_response()
}

/// `POST /oauth/v2/token` with a JSON body: grant_type, client_id, client_secret.
async fn token(State(s): State<Arc<Issued>>, req: Request) -> Response {
    let json_body = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if !json_body {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request");
    }
    let Ok(body) = axum::body::to_bytes(req.into_body(), 64 * 1024).await else {
        return error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let field = |k: &str| v.get(k).and_then(Value::as_str);
    if field("grant_type") != Some("client_credentials") {
        return error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    if field("client_id") != Some(s.client_id.as_str()) || field("client_secret") != Some(s.client_secret.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let n = s.counter.fetch_add(1, Ordering::SeqCst) + 1;
    let access = format!("demo-{n}-{:016x}", fastrand::u64(..));
    let now = Instant::now();
    let mut tokens = s.tokens();
    tokens.retain(|_, until| *until > now);
    tokens.insert(access.clone(), now + s.lifetime);
    drop(tokens);
    Json(json!({"access_token": access, "token_type": "bearer", "expires_in": s.lifetime.as_secs()})).into_response()
}

/// Echo the request as JSON when it carries a current token; 401 otherwise.
async fn echo(State(s): State<Arc<Issued>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bearer =
        parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let current = bearer.is_some_and(|t| s.tokens().get(t).is_some_and(|until| Instant::now() < *until));
    if !current {
        let mut r = error(StatusCode::UNAUTHORIZED, "invalid_token");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer error=\"invalid_token\""));
        return r;
    }
    let body_bytes = axum::body::to_bytes(body, 64 * 1024 * 1024).await.map(|b| b.len()).unwrap_or(0);
    let headers: serde_json::Map<String, Value> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), json!(String::from_utf8_lossy(v.as_bytes()))))
        .collect();
    Json(json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body_bytes,
    }))
    .into_response()
}
