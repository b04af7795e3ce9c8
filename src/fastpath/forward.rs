//! One plain request on the fast path: route, policy, token, upstream head, body both
//! ways, access log. Whatever the fast path does not serve is handed back as
//! [`Outcome::Delegate`] before any byte went upstream or to the client, and pingora
//! serves that request (and the rest of the connection) exactly as without the fast path.
//!
//! Where it deliberately differs from pingora 0.9.1 (`v1/server.rs`, `proxy_h1.rs`):
//! - HTTP/1.0 clients. Same as pingora: the status line says HTTP/1.1 (RFC 9110 §2.5),
//!   keep-alive only when the request asks for it (`respect_keepalive`), a
//!   Content-Length body as is. Differs: pingora turns a body without a length (chunked or
//!   close-delimited upstream) into chunked framing and sends 1xx answers, both of which
//!   an HTTP/1.0 client cannot take (RFC 9112 §7.1 "MUST NOT send … Transfer-Encoding
//!   unless the request indicates HTTP/1.1", RFC 9110 §15.2 "MUST NOT send a 1xx … to an
//!   HTTP/1.0 client"). Here such a body goes out as data only, close-delimited, and the
//!   connection closes after it; 1xx answers are not sent to it.
//! - 1xx answers (not 101) are forwarded as they come to HTTP/1.1 clients, as pingora
//!   does; they are not judged as a verdict on the token (pingora's
//!   `upstream_response_filter` also runs on them and counts a `100` as the token being
//!   accepted). After a 1xx, a failure closes the connection without a 502, as pingora's
//!   `fail_to_proxy` does once a header was written.
//! - Client write timeout: pingora sets none on the downstream session (a client that
//!   stops reading holds the connection until the kernel gives up). tollgate has no
//!   upstream write timeout setting either; each write to the client (one read's worth,
//!   at most 64 KiB) must finish within `proxy.upstream_read_timeout`, the bound on a
//!   silent upstream, else the exchange ends with `WriteTimedout` in the access log.
//! - Upstream answer heads are parsed strictly (no obs-fold, no space before the colon,
//!   a Transfer-Encoding whose last coding is `chunked`, once): pingora's response parser
//!   allows the first two and reads other codings close-delimited; here those get a 502
//!   `InvalidHTTPHeader`. Codings before `chunked` (`gzip, chunked`) are forwarded with
//!   their field, as pingora does; an HTTP/1.0 client cannot take them and gets a 502.
//! - The answer's fields keep the upstream's order and `Date` and `Connection` come last;
//!   pingora groups repeated names at their first place (its `HeaderMap`) and keeps
//!   `Date`/`Connection` where they were. Equal in meaning (RFC 9110 §5.3).
//! - Trailer fields of a chunked answer are forwarded (RFC 9110 §6.5); pingora drops them.
//! - An HTTP/1.0 upstream answer gets tollgate's own version in the status line,
//!   HTTP/1.1 (RFC 9110 §2.5); pingora copies the upstream's.
//! - A body whose framing is already bad in the bytes that came with the head (a bad
//!   first chunk) gets a 502 here, since nothing was sent yet; pingora writes the head
//!   first and then closes. Once anything was written, both just close; the access log
//!   names the failure as pingora does (`InvalidChunk`, `ConnectionClosed`,
//!   `ReadTimedout`, `WriteTimedout`, …).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::GetSocketDigest;
use pingora::protocols::Stream;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::deadline::{timeout_if_pending, LazyDeadline};
use super::framing::{Chunked, Feed};
use super::parse::Head;
use super::{date, upstream, FastPathApp};
use crate::config::RouteSpec;
use crate::metrics;
use crate::proxy::router::{self, RouteEntry};
use crate::proxy::{self as tproxy, resolve};
use crate::token::ActiveToken;

pub enum Outcome {
    /// Answered (at this instant); the client connection may carry another request.
    KeepAlive(Instant),
    /// Answered (or broken); close the client connection.
    Close,
    /// Nothing was sent anywhere: pingora takes this request and the connection.
    Delegate(&'static str),
}

/// pingora's retry buffer (`v1/common.rs`): bodies up to this size can be replayed.
const RETRY_BUFFER: usize = 64 * 1024;
/// Largest upstream response head read (pingora's `MAX_HEADER_SIZE`).
const MAX_RESPONSE_HEAD: usize = 1_048_575;
/// Most fields in an upstream response head (pingora's `MAX_HEADERS`).
const MAX_RESPONSE_FIELDS: usize = 256;
/// Wait for the next bytes of a client request body (pingora's default read timeout).
const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Fields of the client's request never forwarded: pingora's hop-by-hop list
/// (`proxy_common::strip_standard_hop_by_hop_headers`; the others there delegate) and
/// tollgate's probe marker.
const DROPPED: [&[u8]; 5] =
    [b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"x-tollgate-probe"];

/// `timer`: the connection's timer for upstream waits (see [`super::deadline`]).
pub async fn serve(
    app: &FastPathApp,
    conn: &mut L4Stream,
    buf: &mut Vec<u8>,
    head: &Head,
    down: bool,
    timer: &mut LazyDeadline,
) -> Outcome {
    let active = app.gateway.active();
    let settings = &active.settings.proxy;
    let client = conn.get_socket_digest().and_then(|d| d.peer_addr().cloned());
    if !router::client_allowed(&settings.allow_from, client.as_ref()) {
        return Outcome::Delegate("allow_from");
    }
    let Ok(path) = std::str::from_utf8(head.path(buf)) else { return Outcome::Delegate("target_chars") };
    let Some(route) = active.router.route(Some(head.host(buf)), path).cloned() else {
        return Outcome::Delegate("no_route");
    };
    let spec = &route.spec;
    let Some(cell) = route.cell.clone() else { return Outcome::Delegate("no_provider") };
    let header_name = spec.header_name.as_str().as_bytes();
    let client_sent = head.fields.iter().any(|(n, _)| buf[n.clone()].eq_ignore_ascii_case(header_name));
    let credential = tproxy::client_credential(spec, client_sent);
    let (token_wait, access_log, read_timeout) =
        (settings.token_wait, settings.access_log, settings.upstream_read_timeout);
    let limits =
        upstream::limits(settings.upstream_idle_timeout, settings.upstream_keepalive_pool_size, settings.threads);
    drop(active);

    let _inflight = app.gateway.enter();
    let started = Instant::now();
    let mut x = Exchange { route: &route, head, started, access_log, write_timeout: read_timeout, informational: None };
    // Policy `keep` with a client credential: it goes upstream as sent, no token is
    // looked at, and the answer says nothing about one (as on pingora's path).
    let token = match credential {
        tproxy::ClientCredential::Refuse(body) => {
            let written = write_json(conn, 400, &body, None, x.write_timeout).await;
            x.finish(buf, 400, None, written.err(), Instant::now());
            fast("client_credentials");
            return Outcome::Close;
        }
        tproxy::ClientCredential::Keep => None,
        tproxy::ClientCredential::Inject => match cell.obtain(token_wait).await {
            // `obtain` hands out only a token usable now (both clocks checked).
            Ok(t) => Some(t),
            Err(why) => {
                metrics::get().token_unavailable_total.with_label_values(&[cell.name()]).inc();
                let (body, retry) = tproxy::token_unavailable(cell.name(), &why, token_wait);
                let written = write_json(conn, 503, &body, Some(retry), x.write_timeout).await;
                x.finish(buf, 503, None, written.err(), Instant::now());
                fast("token_unavailable");
                return Outcome::Close;
            }
        },
    };

    let mut attempt = resolve::Attempt::default();
    let Some(ip) = route.upstream.pick(&mut attempt) else { return Outcome::Delegate("no_address") };
    let addr = SocketAddr::new(ip, spec.upstream.port);
    let pool_key = upstream::key(&route, addr);
    let body_len = head.content_length.unwrap_or(0);
    // A body within pingora's retry buffer is read whole first, so the request can be
    // replayed after a token rejection; a larger one is streamed and never replayed.
    if body_len <= RETRY_BUFFER as u64 && ((buf.len() - head.len) as u64) < body_len {
        let want = head.len + body_len as usize;
        if read_at_least(conn, buf, want).await.is_err() {
            return Outcome::Close;
        }
    }
    // Checked above; read again because `buf` may have grown since.
    let path = std::str::from_utf8(head.path(buf)).unwrap_or_default();
    let in_buf = (buf.len() - head.len).min(usize::try_from(body_len).unwrap_or(usize::MAX));
    let streamed = body_len > in_buf as u64;
    // A pooled connection the upstream closed meanwhile fails at the first write or read;
    // the request is then sent once more on a new connection, if it is replayable.
    let replayable = !streamed && head.idempotent(buf);
    let mut token = token;
    let mut auth_retried = false;
    // RFC 9110 §15.2: no 1xx to an HTTP/1.0 client (pingora sends them; see the module doc).
    let forward_1xx = head.minor == 1;

    let (mut up, resp, rbuf) = 'auth: loop {
        let up_head = upstream_head(spec, &route, token.as_deref(), head, buf);
        let mut whole_request = up_head;
        whole_request.extend_from_slice(&buf[head.len..head.len + in_buf]);
        // A fresh reading: the token wait, the body or a replay may have taken a while.
        let mut pooled = upstream::checkout(&pool_key, std::time::Instant::now());
        let (up, resp, rbuf) = loop {
            let reused = pooled.is_some();
            let mut up = match pooled.take() {
                Some(s) => s,
                // Nothing sent yet on the first attempt: pingora may take it from here.
                None if !auth_retried => match upstream::connect(&app.connector, &route, addr).await {
                    Ok(s) => s,
                    Err(_) => return Outcome::Delegate("connect_failed"),
                },
                None => match upstream::connect(&app.connector, &route, addr).await {
                    Ok(s) => s,
                    Err(e) => return x.bad_gateway(conn, buf, e.kind).await,
                },
            };
            if write_all_flush(&mut up, &whole_request).await.is_err() {
                if reused {
                    continue;
                }
                return x.bad_gateway(conn, buf, "WriteError").await;
            }
            if streamed && stream_request_body(conn, &mut up, body_len - in_buf as u64).await.is_err() {
                // The client's body did not arrive whole: nothing sensible can be answered.
                return Outcome::Close;
            }
            match read_response_head(&mut up, conn, forward_1xx, read_timeout, timer, &mut x).await {
                Ok((resp, rbuf)) => break (up, resp, rbuf),
                Err(RespError::Closed) if reused && replayable && x.informational.is_none() => continue,
                Err(RespError::Client(e)) => {
                    x.finish(buf, x.informational.unwrap_or(502), token.as_deref(), Some(e), Instant::now());
                    return Outcome::Close;
                }
                Err(e) => return x.bad_gateway(conn, buf, e.as_str()).await,
            }
        };
        let Some(current) = token.clone() else { break 'auth (up, resp, rbuf) };
        // What the upstream said about the token, decided as on pingora's path.
        let answer = tproxy::Answer {
            status: resp.status,
            dpop_nonce: resp.header(&rbuf, Known::DpopNonce).and_then(|v| std::str::from_utf8(v).ok()),
            challenges: resp.all(&rbuf, Known::WwwAuthenticate).collect(),
        };
        let sent = tproxy::Sent {
            path,
            is_probe: is_probe(head, buf),
            idempotent: head.idempotent(buf),
            buffered: !streamed,
            body_done: true,
            auth_retried,
            body_judged_later: tproxy::graphql_inspected(spec, resp.status, resp.header(&rbuf, Known::ContentType)),
        };
        let probe = |p: &str| tproxy::send_probe(&app.gateway, host_value(head, buf), p);
        match tproxy::judge_answer(&route, &cell, &current, &answer, &sent, token_wait, probe).await {
            tproxy::Verdict::Pass => break 'auth (up, resp, rbuf),
            tproxy::Verdict::ReplaySameToken => {}
            tproxy::Verdict::ReplayWith(fresh) => token = Some(fresh),
        }
        // The rejected answer is dropped with its connection; the request goes again.
        auth_retried = true;
    };
    let status = resp.status;
    // The answer's Date, and the end of the exchange when its body came with its head.
    let answered = Instant::now();

    let is_head = head.is_head(buf);
    let no_body = is_head || status == 204 || status == 304;
    // Codings other than chunked (`gzip, chunked`) are end-to-end data for the client:
    // the value is forwarded as is, the framing is still the final `chunked`.
    let mut codings: Option<&[u8]> = None;
    let framing = if no_body {
        Framing::None
    } else if let Some(te) = resp.header(&rbuf, Known::TransferEncoding) {
        let last_chunked =
            te.rsplit(|&b| b == b',').next().is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        let chunked_once =
            te.split(|&b| b == b',').filter(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked")).count() == 1;
        if !last_chunked || !chunked_once || resp.count(Known::TransferEncoding) != 1 {
            return x.bad_gateway(conn, buf, "InvalidHTTPHeader").await;
        }
        if !te.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            if head.minor == 0 {
                // An HTTP/1.0 client cannot be told about a transfer coding at all.
                return x.bad_gateway(conn, buf, "InvalidHTTPHeader").await;
            }
            codings = Some(te.trim_ascii());
        }
        Framing::Chunked
    } else {
        match resp.content_length(&rbuf) {
            Ok(Some(n)) => Framing::Length(n),
            Ok(None) => Framing::Close,
            Err(()) => return x.bad_gateway(conn, buf, "InvalidHTTPHeader").await,
        }
    };
    // An HTTP/1.0 client cannot read chunked framing (RFC 9112 §7.1, pingora sends it
    // anyway): a body without a length goes to it close-delimited, data only.
    let dechunk = head.minor == 0 && matches!(framing, Framing::Chunked | Framing::Close);
    let keep_client = !head.close && !down && !dechunk;
    let upstream_keeps = resp.minor == 1
        && framing != Framing::Close
        && !resp
            .all(&rbuf, Known::Connection)
            .any(|v| v.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close")));

    // The answer's head, as pingora writes it: upstream fields, then Date and Connection.
    let mut out = Vec::with_capacity(resp.len + 64);
    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse read exactly three digits.
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
    out.push(b' ');
    out.extend_from_slice(&rbuf[resp.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    for f in &resp.fields {
        let dropped = match f.known {
            // Replaced below, as pingora does.
            Known::Connection | Known::Date => true,
            // Re-framed below; but a HEAD answer's Transfer-Encoding says how a GET would
            // be framed: kept, as pingora does.
            Known::TransferEncoding => !is_head,
            // Transfer-Encoding overrides a length (RFC 9112 §6.3); pingora drops the length too.
            Known::ContentLength => framing == Framing::Chunked,
            _ => false,
        };
        if !dropped {
            push_field(&mut out, &rbuf[f.name.clone()], &rbuf[f.value.clone()]);
        }
    }
    if matches!(framing, Framing::Chunked | Framing::Close) && !dechunk {
        push_field(&mut out, b"Transfer-Encoding", codings.unwrap_or(b"chunked"));
    }
    push_date(&mut out, answered);
    push_field(&mut out, b"Connection", if keep_client { b"keep-alive" } else { b"close" });
    out.extend_from_slice(b"\r\n");

    // A GraphQL 200 is judged on its whole body (up to the inspection limit) once relayed.
    let inspect = token.is_some() && tproxy::graphql_inspected(spec, status, resp.header(&rbuf, Known::ContentType));
    let mut relay = Relay {
        conn,
        up: &mut up,
        read_timeout,
        timer,
        write_timeout: x.write_timeout,
        graphql: inspect.then(Vec::new),
        sent: false,
        waited: false,
    };
    let complete = relay.body(&rbuf[resp.len..], framing, dechunk, out).await;
    let graphql = relay.graphql.take();
    let ended = if relay.waited { Instant::now() } else { answered };
    if let (Err(e), false) = (complete, relay.sent) {
        // Bad framing seen in the bytes that came with the head: nothing went out yet.
        return x.bad_gateway(conn, buf, e).await;
    }
    if complete == Ok(true) && upstream_keeps {
        upstream::checkin(pool_key, up, limits, ended.into_std());
    }
    if let (Ok(_), Some(body), Some(t)) = (&complete, graphql, &token) {
        let probe = |p: &str| tproxy::send_probe(&app.gateway, host_value(head, buf), p);
        tproxy::judge_graphql_body(&route, &cell, t, &body, path, is_probe(head, buf), probe);
    }
    x.finish(buf, status, token.as_deref(), complete.err(), ended);
    buf.drain(..head.len + in_buf);
    fast("served");
    if complete.is_ok() && keep_client {
        Outcome::KeepAlive(ended)
    } else {
        Outcome::Close
    }
}

fn fast(reason: &'static str) {
    if reason == "served" {
        // Every relayed answer: the pre-resolved counter, no label lookup.
        metrics::fastpath_served().inc();
    } else {
        metrics::get().fastpath_total.with_label_values(&["fast", reason]).inc();
    }
}

fn is_probe(head: &Head, buf: &[u8]) -> bool {
    head.fields.iter().any(|(n, _)| buf[n.clone()].eq_ignore_ascii_case(tproxy::PROBE_HEADER.as_bytes()))
}

/// The client's Host, which the session probe repeats (as on pingora's path).
fn host_value(head: &Head, buf: &[u8]) -> Option<http::HeaderValue> {
    http::HeaderValue::from_bytes(head.host(buf)).ok()
}

/// One request's facts for the answers tollgate writes itself and the access log.
struct Exchange<'a> {
    route: &'a Arc<RouteEntry>,
    head: &'a Head,
    started: Instant,
    access_log: bool,
    /// Bound on each write to the client (see the module doc of [`super`]).
    write_timeout: Duration,
    /// The last 1xx answer forwarded to the client, if any.
    informational: Option<u16>,
}

impl Exchange<'_> {
    /// A 502 when the upstream failed before any byte reached the client; the connection
    /// then closes, as pingora's `fail_to_proxy` does. After a 1xx, like pingora, nothing
    /// more is written: the connection just closes.
    async fn bad_gateway(&self, conn: &mut L4Stream, buf: &[u8], what: &'static str) -> Outcome {
        let status = match self.informational {
            Some(s) => s,
            None => {
                let body = json!({"error": "bad_gateway", "route": self.route.spec.name, "message": what});
                let _ = write_json(conn, 502, &body, None, self.write_timeout).await;
                502
            }
        };
        self.finish(buf, status, None, Some(what), Instant::now());
        fast("bad_gateway");
        Outcome::Close
    }

    /// Metrics and the access log line, as `TollgateProxy::logging` writes them (`error`:
    /// the name pingora's error type would have for the same failure; `ended`: when the
    /// exchange ended).
    fn finish(
        &self,
        buf: &[u8],
        status: u16,
        token: Option<&ActiveToken>,
        error: Option<&'static str>,
        ended: Instant,
    ) {
        let (route, head) = (self.route, self.head);
        let elapsed = ended.saturating_duration_since(self.started);
        route.metrics.count(status);
        route.metrics.duration.observe(elapsed.as_secs_f64());
        if self.access_log {
            let line = json!({
                "ts": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                "route": route.spec.name,
                "provider": route.spec.provider.as_deref(),
                "method": String::from_utf8_lossy(head.method(buf)),
                // The query string is left out: clients put keys and personal data there.
                "path": String::from_utf8_lossy(head.path(buf)),
                "status": status,
                "duration_ms": (elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
                "token_generation": token.map(|t| t.generation),
                "error": error,
            });
            println!("{line}");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    Close,
}

/// The request head sent upstream: the client's fields in order minus hop-by-hop ones
/// and the ones tollgate sets, then Host, `set_headers`, the token and its companions.
/// Without a token (policy `keep` with the client's own credential) the client's field
/// named `header_name` goes as sent and nothing is added for a token.
fn upstream_head(
    spec: &RouteSpec,
    route: &RouteEntry,
    token: Option<&ActiveToken>,
    head: &Head,
    buf: &[u8],
) -> Vec<u8> {
    let target = head.target(buf);
    let rewritten = rewritten_target(spec, target);
    let target = rewritten.as_deref().unwrap_or(target);
    let mut out = Vec::with_capacity(head.len + 1024);
    out.extend_from_slice(head.method(buf));
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let replaced = |name: &[u8]| {
        DROPPED.iter().any(|d| name.eq_ignore_ascii_case(d))
            || (!spec.preserve_host && name.eq_ignore_ascii_case(b"host"))
            || spec.set_headers.iter().any(|(k, _)| name.eq_ignore_ascii_case(k.as_str().as_bytes()))
            || token.is_some_and(|token| {
                name.eq_ignore_ascii_case(spec.header_name.as_str().as_bytes())
                    || token.upstream_headers.iter().any(|(k, _)| name.eq_ignore_ascii_case(k.as_str().as_bytes()))
                    || (token.dpop.is_some() && name.eq_ignore_ascii_case(tproxy::DPOP.as_bytes()))
            })
    };
    let authority: &[u8] = if spec.preserve_host { head.host(buf) } else { spec.upstream.authority.as_bytes() };
    for (i, (n, v)) in head.fields.iter().enumerate() {
        let name = &buf[n.clone()];
        if i == head.host && !spec.preserve_host {
            // The upstream's Host where the client's was, as pingora writes it.
            push_field(&mut out, b"Host", authority);
        } else if !replaced(name) {
            push_field(&mut out, name, &buf[v.clone()]);
        }
    }
    for (k, v) in &spec.set_headers {
        push_field(&mut out, k.as_str().as_bytes(), v.as_bytes());
    }
    let Some(token) = token else {
        out.extend_from_slice(b"\r\n");
        return out;
    };
    push_field(&mut out, spec.header_name.as_str().as_bytes(), token.header.as_bytes());
    for (k, v) in &token.upstream_headers {
        push_field(&mut out, k.as_str().as_bytes(), v.as_bytes());
    }
    if let Some(d) = &token.dpop {
        let path = target.split(|&b| b == b'?').next().unwrap_or(target);
        let method = String::from_utf8_lossy(head.method(buf));
        let proof = tproxy::dpop_proof_for(&method, authority, &String::from_utf8_lossy(path), route, d);
        push_field(&mut out, tproxy::DPOP.as_bytes(), proof.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The target after prefix stripping and the upstream's base path (`None`: unchanged);
/// same rule as `proxy::rewrite_path`.
fn rewritten_target(spec: &RouteSpec, target: &[u8]) -> Option<Vec<u8>> {
    if !spec.strip_prefix && spec.upstream.base_path.is_empty() {
        return None;
    }
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], Some(&target[i + 1..])),
        None => (target, None),
    };
    let rest = if spec.strip_prefix {
        path.strip_prefix(spec.path_prefix.trim_end_matches('/').as_bytes()).unwrap_or(path)
    } else {
        path
    };
    let mut new = Vec::with_capacity(spec.upstream.base_path.len() + target.len() + 1);
    new.extend_from_slice(spec.upstream.base_path.as_bytes());
    if !rest.starts_with(b"/") {
        new.push(b'/');
    }
    new.extend_from_slice(rest);
    if let Some(q) = query {
        new.push(b'?');
        new.extend_from_slice(q);
    }
    Some(new)
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

async fn write_all_flush<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Read from the client until `buf` holds `want` bytes.
async fn read_at_least(conn: &mut L4Stream, buf: &mut Vec<u8>, want: usize) -> std::io::Result<()> {
    buf.reserve(want.saturating_sub(buf.len()));
    while buf.len() < want {
        let n = tokio::time::timeout(CLIENT_BODY_TIMEOUT, conn.read_buf(buf))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// Copy `left` more body bytes from the client to the upstream.
async fn stream_request_body(conn: &mut L4Stream, up: &mut Stream, mut left: u64) -> std::io::Result<()> {
    let mut chunk = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = tokio::time::timeout(CLIENT_BODY_TIMEOUT, conn.read(&mut chunk[..want]))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        up.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    up.flush().await
}

enum RespError {
    /// Closed before the head was whole: retryable on a reused connection.
    Closed,
    Timeout,
    Invalid,
    Io,
    /// Forwarding a 1xx to the client failed (pingora's error name).
    Client(&'static str),
}

impl RespError {
    fn as_str(&self) -> &'static str {
        match self {
            RespError::Closed => "ConnectionClosed",
            RespError::Timeout => "ReadTimedout",
            RespError::Invalid => "InvalidHTTPHeader",
            RespError::Io => "ReadError",
            RespError::Client(e) => e,
        }
    }
}

/// An upstream response head, as ranges into the buffer it was read into.
struct RespHead {
    status: u16,
    minor: u8,
    reason: std::ops::Range<usize>,
    fields: Vec<RespField>,
    len: usize,
}

/// One field of an upstream answer, its name classified once when parsed: the answer is
/// looked at for several names, and one comparison per field beats one scan per name.
struct RespField {
    name: std::ops::Range<usize>,
    value: std::ops::Range<usize>,
    known: Known,
}

/// The answer fields the fast path acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Connection,
    ContentLength,
    ContentType,
    Date,
    DpopNonce,
    TransferEncoding,
    WwwAuthenticate,
    Other,
}

impl Known {
    fn of(name: &[u8]) -> Known {
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        match name.len() {
            4 if is(b"date") => Known::Date,
            10 if is(b"connection") => Known::Connection,
            10 if is(b"dpop-nonce") => Known::DpopNonce,
            12 if is(b"content-type") => Known::ContentType,
            14 if is(b"content-length") => Known::ContentLength,
            16 if is(b"www-authenticate") => Known::WwwAuthenticate,
            17 if is(b"transfer-encoding") => Known::TransferEncoding,
            _ => Known::Other,
        }
    }
}

impl RespHead {
    fn all<'b>(&'b self, buf: &'b [u8], known: Known) -> impl Iterator<Item = &'b [u8]> + 'b {
        self.fields.iter().filter(move |f| f.known == known).map(move |f| &buf[f.value.clone()])
    }
    fn header<'b>(&'b self, buf: &'b [u8], known: Known) -> Option<&'b [u8]> {
        self.all(buf, known).next()
    }
    fn count(&self, known: Known) -> usize {
        self.fields.iter().filter(|f| f.known == known).count()
    }
    /// One all-digit value (repeats allowed when equal, as pingora does); `Err` otherwise.
    fn content_length(&self, buf: &[u8]) -> Result<Option<u64>, ()> {
        let mut found: Option<u64> = None;
        for v in self.all(buf, Known::ContentLength) {
            let v = v.trim_ascii();
            if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            let n = v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if found.is_some_and(|f| f != n) {
                return Err(());
            }
            found = Some(n);
        }
        Ok(found)
    }
}

/// Read the upstream's final answer head. 1xx interim answers (never 101: tollgate sends
/// no Upgrade) go to the client as they come when `forward_1xx`, as pingora forwards them
/// (its `ignore_info_resp` is off): status line and fields as the upstream sent them,
/// flushed at once. Limits are pingora's (`v1/common.rs`): at most [`MAX_RESPONSE_FIELDS`]
/// fields, [`MAX_RESPONSE_HEAD`] bytes; beyond them, or unparsable, the answer is a 502.
async fn read_response_head(
    up: &mut Stream,
    conn: &mut L4Stream,
    forward_1xx: bool,
    timeout: Duration,
    timer: &mut LazyDeadline,
    x: &mut Exchange<'_>,
) -> Result<(RespHead, Vec<u8>), RespError> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        if !buf.is_empty() {
            match parse_response_head(&buf, forward_1xx) {
                RespParse::Final(head) => return Ok((head, buf)),
                RespParse::Interim { status, len, forward } => {
                    if let Some(out) = forward {
                        write_client(conn, &out, x.write_timeout).await.map_err(RespError::Client)?;
                        x.informational = Some(status);
                    }
                    buf.drain(..len);
                    continue;
                }
                RespParse::Partial if buf.len() <= MAX_RESPONSE_HEAD => {}
                RespParse::Partial | RespParse::Invalid => return Err(RespError::Invalid),
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        match read_within(up.read_buf(&mut buf), timer, timeout).await {
            Ok(Ok(0)) if buf.is_empty() => return Err(RespError::Closed),
            // Part of a head, then the close: pingora too treats it as a close (`ReusedOnly`).
            Ok(Ok(0)) => return Err(RespError::Closed),
            Ok(Ok(_)) => {}
            Ok(Err(_)) if buf.is_empty() => return Err(RespError::Closed),
            Ok(Err(_)) => return Err(RespError::Io),
            Err(()) => return Err(RespError::Timeout),
        }
    }
}

/// What the bytes read so far of an upstream answer say.
enum RespParse {
    Final(RespHead),
    /// A 1xx answer of `len` bytes; `forward`: its bytes for the client, when wanted.
    Interim {
        status: u16,
        len: usize,
        forward: Option<Vec<u8>>,
    },
    Partial,
    Invalid,
}

/// Parse an upstream answer head. Synchronous, so that httparse's field array (uninit:
/// nothing is written to its 256 slots before they are parsed) lives on the stack for the
/// parse only, never in the connection's future.
fn parse_response_head(buf: &[u8], forward_1xx: bool) -> RespParse {
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_FIELDS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return RespParse::Partial,
        Err(_) => return RespParse::Invalid,
    };
    let (Some(status), Some(minor)) = (resp.code, resp.version) else { return RespParse::Invalid };
    if (100..200).contains(&status) {
        if status == 101 {
            return RespParse::Invalid;
        }
        let forward = forward_1xx.then(|| {
            let mut out = Vec::with_capacity(len);
            out.extend_from_slice(format!("HTTP/1.1 {status} ").as_bytes());
            out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
            out.extend_from_slice(b"\r\n");
            for h in resp.headers.iter() {
                push_field(&mut out, h.name.as_bytes(), h.value);
            }
            out.extend_from_slice(b"\r\n");
            out
        });
        return RespParse::Interim { status, len, forward };
    }
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let reason = resp.reason.map(|r| span(r.as_bytes())).unwrap_or(0..0);
    let fields = resp
        .headers
        .iter()
        .map(|h| RespField { name: span(h.name.as_bytes()), value: span(h.value), known: Known::of(h.name.as_bytes()) })
        .collect();
    RespParse::Final(RespHead { status, minor, reason, fields, len })
}

/// The body of one answer on its way to the client.
struct Relay<'a> {
    conn: &'a mut L4Stream,
    up: &'a mut Stream,
    read_timeout: Duration,
    /// The connection's timer for upstream waits.
    timer: &'a mut LazyDeadline,
    write_timeout: Duration,
    /// The body's data (without chunk framing) while it is inspected for GraphQL
    /// `UNAUTHENTICATED`; dropped past the inspection limit, as on pingora's path.
    graphql: Option<Vec<u8>>,
    /// Something was written to the client.
    sent: bool,
    /// A read or a write had to wait: the exchange's end must be read from the clock.
    waited: bool,
}

impl Relay<'_> {
    /// Send `head` and the body to the client as it arrives, without holding more than
    /// one read of it. `dechunk`: the client gets the data only, close-delimited (an
    /// HTTP/1.0 client and a body without a length). `Ok(true)`: the upstream's body
    /// ended exactly where its framing said (its connection may be reused). `Err`:
    /// pingora's name for what failed.
    async fn body(
        &mut self,
        first: &[u8],
        framing: Framing,
        dechunk: bool,
        mut head: Vec<u8>,
    ) -> Result<bool, &'static str> {
        let mut chunk = vec![0u8; 0];
        let mut pending: &[u8] = first;
        match framing {
            Framing::None => {
                self.send(&head).await?;
                Ok(pending.is_empty())
            }
            Framing::Length(total) => {
                let mut left = total;
                let take = pending.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                head.extend_from_slice(&pending[..take]);
                self.inspect(&pending[..take]);
                let extra = pending.len() > take;
                left -= take as u64;
                self.send(&head).await?;
                while left > 0 {
                    if chunk.is_empty() {
                        chunk = vec![0u8; 64 * 1024];
                    }
                    let want = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = self.read_up(&mut chunk[..want]).await?;
                    if n == 0 {
                        return Err("ConnectionClosed");
                    }
                    self.inspect(&chunk[..n]);
                    self.send(&chunk[..n]).await?;
                    left -= n as u64;
                }
                Ok(!extra)
            }
            Framing::Chunked => {
                let mut parser = Chunked::default();
                let mut data = Vec::new();
                loop {
                    let want_data = dechunk || self.graphql.is_some();
                    data.clear();
                    let fed = parser.feed_into(pending, want_data.then_some(&mut data));
                    self.inspect(&data);
                    let (end, done) = match fed {
                        Feed::Invalid => return Err("InvalidChunk"),
                        Feed::Done(n) => (n, true),
                        Feed::More => (pending.len(), false),
                    };
                    head.extend_from_slice(if dechunk { &data } else { &pending[..end] });
                    self.send(&head).await?;
                    head.clear();
                    if done {
                        return Ok(end == pending.len());
                    }
                    if chunk.is_empty() {
                        chunk = vec![0u8; 64 * 1024];
                    }
                    let n = self.read_up(&mut chunk).await?;
                    if n == 0 {
                        return Err("ConnectionClosed");
                    }
                    pending = &chunk[..n];
                }
            }
            Framing::Close => loop {
                self.inspect(pending);
                if dechunk {
                    head.extend_from_slice(pending);
                } else if !pending.is_empty() {
                    head.extend_from_slice(format!("{:x}\r\n", pending.len()).as_bytes());
                    head.extend_from_slice(pending);
                    head.extend_from_slice(b"\r\n");
                }
                self.send(&head).await?;
                head.clear();
                if chunk.is_empty() {
                    chunk = vec![0u8; 64 * 1024];
                }
                let n = self.read_up(&mut chunk).await?;
                if n == 0 {
                    if !dechunk {
                        self.send(b"0\r\n\r\n").await?;
                    }
                    return Ok(false);
                }
                pending = &chunk[..n];
            },
        }
    }

    /// Write to the client; from the first call on, a failure can no longer be a 502.
    async fn send(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        self.sent = true;
        match write_client(self.conn, bytes, self.write_timeout).await {
            Ok(waited) => {
                self.waited |= waited;
                Ok(())
            }
            // A failed write may have waited up to the timeout.
            Err(e) => {
                self.waited = true;
                Err(e)
            }
        }
    }

    fn inspect(&mut self, data: &[u8]) {
        if let Some(g) = &mut self.graphql {
            if g.len() + data.len() > tproxy::GRAPHQL_INSPECT_LIMIT {
                self.graphql = None;
            } else {
                g.extend_from_slice(data);
            }
        }
    }

    async fn read_up(&mut self, into: &mut [u8]) -> Result<usize, &'static str> {
        self.waited = true;
        match read_within(self.up.read(into), self.timer, self.read_timeout).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(_)) => Err("ReadError"),
            Err(()) => Err("ReadTimedout"),
        }
    }
}

/// One read from the upstream that must bring something within `timeout` (pingora's
/// per-read timeout), on the connection's lazily moved timer; `Err(())`: timed out.
/// The deadline is only computed (and the clock read) when the read has to wait.
async fn read_within(
    read: impl Future<Output = std::io::Result<usize>>,
    timer: &mut LazyDeadline,
    timeout: Duration,
) -> Result<std::io::Result<usize>, ()> {
    let mut read = std::pin::pin!(read);
    let mut deadline = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = read.as_mut().poll(cx) {
            return Poll::Ready(Ok(r));
        }
        let deadline = *deadline.get_or_insert_with(|| after(timeout));
        timer.poll_until(cx, deadline).map(|()| Err(()))
    })
    .await
}

/// The instant `timeout` from now; a timeout too large for the clock means no deadline
/// in practice (as `tokio::time::timeout` treats it), not a panic.
fn after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// Write and flush to the client within `timeout` (pingora's error names on failure);
/// `Ok(true)`: the write had to wait.
async fn write_client(conn: &mut L4Stream, bytes: &[u8], timeout: Duration) -> Result<bool, &'static str> {
    match timeout_if_pending(timeout, write_all_flush(conn, bytes)).await {
        Ok((Ok(()), waited)) => Ok(waited),
        Ok((Err(_), _)) => Err("WriteError"),
        Err(_) => Err("WriteTimedout"),
    }
}

/// tollgate's own JSON answer, as `proxy::respond::json` writes it through pingora.
async fn write_json(
    conn: &mut L4Stream,
    status: u16,
    body: &serde_json::Value,
    retry_after: Option<u64>,
    timeout: Duration,
) -> Result<(), &'static str> {
    let body = body.to_string();
    let reason = http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
    push_field(&mut out, b"Content-Type", b"application/json");
    push_field(&mut out, b"Content-Length", body.len().to_string().as_bytes());
    push_field(&mut out, b"Cache-Control", b"no-store");
    if let Some(secs) = retry_after {
        push_field(&mut out, b"Retry-After", secs.max(1).to_string().as_bytes());
    }
    push_date(&mut out, Instant::now());
    push_field(&mut out, b"Connection", b"close");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    write_client(conn, &out, timeout).await.map(|_| ())
}

fn push_date(out: &mut Vec<u8>, now: Instant) {
    out.extend_from_slice(b"Date: ");
    date::push(out, now);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_too_large_for_the_clock_is_a_far_deadline_not_a_panic() {
        assert!(after(Duration::MAX) > Instant::now() + Duration::from_secs(50 * 365 * 86_400));
        let soon = after(Duration::from_secs(2));
        assert!(soon > Instant::now() && soon <= Instant::now() + Duration::from_secs(2));
    }
}
