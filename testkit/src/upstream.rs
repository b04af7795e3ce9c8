//! An upstream API double: records every request it receives (what the tests assert
//! on), answers with a JSON echo, and — when given the token endpoint's ledger — accepts
//! only current tokens, answering 401 otherwise as a real API would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::Ledger;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the token was accepted (always true without a ledger).
    pub accepted: bool,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn bearer(&self) -> Option<&str> {
        self.header("authorization").and_then(|v| v.strip_prefix("Bearer "))
    }
}

struct Inner {
    ledger: Option<Ledger>,
    seen: Mutex<Vec<Seen>>,
    /// Answer this many next requests with 401 regardless of the token.
    force_401: AtomicU32,
    /// Headers every request must carry (e.g. Etna's app key), else 401.
    required: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
}

impl Upstream {
    /// Start on an ephemeral loopback port. With a ledger, only its current tokens pass.
    pub async fn start(ledger: Option<Ledger>) -> std::io::Result<Self> {
        Self::start_requiring(ledger, Vec::new()).await
    }

    /// Like [`Upstream::start`], also requiring these headers on every request.
    pub async fn start_requiring(ledger: Option<Ledger>, required: Vec<(String, String)>) -> std::io::Result<Self> {
        let (listener, addr) = crate::bind_loopback().await?;
        let inner = Arc::new(Inner { ledger, seen: Mutex::new(Vec::new()), force_401: AtomicU32::new(0), required });
        let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&inner));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Upstream { inner, addr })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.inner.seen).clone()
    }

    pub fn count(&self) -> usize {
        lock(&self.inner.seen).len()
    }

    /// Reject the next `n` requests with 401.
    pub fn reject_next(&self, n: u32) {
        self.inner.force_401.store(n, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn handle(State(s): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 64 * 1024 * 1024).await.unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let bearer = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let forced = s.force_401.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    let missing =
        s.required.iter().any(|(k, v)| parts.headers.get(k.as_str()).and_then(|h| h.to_str().ok()) != Some(v.as_str()));
    let verdict = match (&s.ledger, &bearer) {
        _ if forced => Err("rejected by test"),
        _ if missing => Err("missing a required header"),
        (None, _) => Ok(()),
        (Some(_), None) => Err("missing bearer token"),
        (Some(l), Some(t)) => l.check(t),
    };
    let path = parts.uri.path().to_string();
    lock(&s.seen).push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        query: parts.uri.query().map(str::to_string),
        headers: headers.clone(),
        body: body.to_vec(),
        accepted: verdict.is_ok(),
    });
    if let Err(why) = verdict {
        let mut r = (StatusCode::UNAUTHORIZED, Json(json!({"error": "invalid_token", "message": why}))).into_response();
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer error=\"invalid_token\""));
        return r;
    }
    if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse::<u16>().ok()) {
        // Whatever status a test asks for, once the token was accepted.
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, Json(json!({"status": code, "path": path}))).into_response();
    }
    if path.starts_with("/graphql-unauthenticated") {
        // What a GraphQL server answers to an unauthenticated query: 200 with an error.
        return Json(
            json!({"data": null, "errors": [{"message": "not signed in", "extensions": {"code": "UNAUTHENTICATED"}}]}),
        )
        .into_response();
    }
    if let Some(n) = path.strip_prefix("/stream/").and_then(|n| n.parse::<usize>().ok()) {
        // A slow chunked response, to show the proxy streams rather than buffers.
        let stream = futures::stream::unfold(0usize, move |i| async move {
            if i >= n {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            Some((Ok::<_, std::io::Error>(Bytes::from(format!("chunk {i}\n"))), i + 1))
        });
        return (StatusCode::OK, Body::from_stream(stream)).into_response();
    }
    let echo_headers: serde_json::Map<String, serde_json::Value> =
        headers.into_iter().map(|(k, v)| (k, json!(v))).collect();
    Json(json!({
        "method": parts.method.as_str(),
        "path": path,
        "query": parts.uri.query(),
        "headers": echo_headers,
        "body_bytes": body.len(),
    }))
    .into_response()
}

/// How a [`RawUpstream`] treats its connections: faults a well-behaved HTTP server
/// library cannot be made to show.
#[derive(Debug, Clone, Copy)]
pub enum RawBehaviour {
    /// Answer every request `200` and keep the connection open, announcing no idle
    /// timeout; but a request that arrives on a connection idle for longer than this is
    /// met with a reset, unanswered. That is what a load balancer or NAT that silently
    /// dropped an idle connection does: nothing is sent while idle, so the client's pool
    /// still holds the connection when the next request goes out on it.
    ForgetIdleAfter(Duration),
    /// Answer with a header promising 100 bytes, send 10 of them, then close.
    CloseMidResponse,
}

/// One request as a [`RawUpstream`] read it (whether or not it was answered).
#[derive(Debug, Clone)]
pub struct RawSeen {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
}

/// A minimal HTTP/1.1 upstream on a raw socket (Content-Length bodies only), for
/// connection-level faults.
#[derive(Clone)]
pub struct RawUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<RawSeen>>>,
    resets: Arc<AtomicU32>,
    connections: Arc<AtomicU32>,
}

/// Bound on the request header the raw double reads, and on each connection's requests.
const RAW_MAX_HEADER: usize = 64 * 1024;
const RAW_MAX_REQUESTS_PER_CONN: usize = 10_000;

impl RawUpstream {
    pub async fn start(behaviour: RawBehaviour) -> std::io::Result<Self> {
        let (listener, addr) = crate::bind_loopback().await?;
        let up = RawUpstream { addr, seen: Arc::default(), resets: Arc::default(), connections: Arc::default() };
        let shared = up.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(shared.clone().serve(stream, behaviour));
            }
        });
        Ok(up)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request read, in order (a forgotten connection's request is not read).
    pub fn seen(&self) -> Vec<RawSeen> {
        lock(&self.seen).clone()
    }

    /// How many connections were accepted.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::SeqCst)
    }

    /// How many requests arrived on a forgotten connection and were met with a reset.
    pub fn resets(&self) -> u32 {
        self.resets.load(Ordering::SeqCst)
    }

    async fn serve(self, mut stream: tokio::net::TcpStream, behaviour: RawBehaviour) {
        use tokio::io::AsyncWriteExt;
        let mut buf = Vec::new();
        let mut last_answer: Option<tokio::time::Instant> = None;
        for _ in 0..RAW_MAX_REQUESTS_PER_CONN {
            if buf.is_empty() {
                // Wait for the next request's first byte; a closed connection is no request.
                let mut probe = [0u8; 1];
                match stream.peek(&mut probe).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
            if let (RawBehaviour::ForgetIdleAfter(after), Some(at)) = (behaviour, last_answer) {
                if at.elapsed() > after {
                    // Forgotten: reset on the first byte of the next request.
                    self.resets.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.set_zero_linger();
                    return;
                }
            }
            let Some(req) = read_request(&mut stream, &mut buf).await else { return };
            lock(&self.seen).push(req);
            match behaviour {
                RawBehaviour::ForgetIdleAfter(_) => {
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    last_answer = Some(tokio::time::Instant::now());
                }
                RawBehaviour::CloseMidResponse => {
                    let answer =
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n0123456789";
                    let _ = stream.write_all(answer).await;
                    let _ = stream.flush().await;
                    return;
                }
            }
        }
    }
}

/// Read one request (header and Content-Length body) from `stream`, keeping whatever
/// follows it in `buf`. `None` on EOF, an error or a malformed request.
async fn read_request(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<RawSeen> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > RAW_MAX_HEADER {
            return None;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let (method, target) = (request_line.next()?.to_string(), request_line.next()?.to_string());
    let length: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < header_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[header_end..header_end + length].to_vec();
    buf.drain(..header_end + length);
    Some(RawSeen { method, target, body })
}
