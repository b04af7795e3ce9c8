//! One plain request on the fast path: route, policy, token, upstream head, body both
//! ways, access log. Whatever this prototype does not implement is handed back as
//! [`Outcome::Delegate`] before any byte went upstream or to the client, and pingora
//! serves that request (and the rest of the connection) exactly as without the fast path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::GetSocketDigest;
use pingora::protocols::Stream;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::framing::{Chunked, Feed};
use super::parse::Head;
use super::{upstream, FastPathApp};
use crate::config::{AuthorizationPolicy, RouteSpec};
use crate::metrics;
use crate::proxy::router::{self, RouteEntry};
use crate::proxy::{self as tproxy, resolve};
use crate::token::ActiveToken;

pub enum Outcome {
    /// Answered; the client connection may carry another request.
    KeepAlive,
    /// Answered (or broken); close the client connection.
    Close,
    /// Nothing was sent anywhere: pingora takes this request and the connection.
    Delegate(&'static str),
}

/// pingora's retry buffer (`v1/common.rs`): bodies up to this size can be replayed.
const RETRY_BUFFER: usize = 64 * 1024;
/// Largest upstream response head read.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Wait for the next bytes of a client request body (pingora's default read timeout).
const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Fields of the client's request never forwarded: pingora's hop-by-hop list
/// (`proxy_common::strip_standard_hop_by_hop_headers`; the others there delegate) and
/// tollgate's probe marker.
const DROPPED: [&[u8]; 5] =
    [b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"x-tollgate-probe"];
/// Fields of the upstream's answer pingora replaces (Date, Connection) or re-frames.
const DROPPED_RESPONSE: [&[u8]; 3] = [b"connection", b"date", b"transfer-encoding"];

pub async fn serve(app: &FastPathApp, conn: &mut L4Stream, buf: &mut Vec<u8>, head: &Head, down: bool) -> Outcome {
    let active = app.gateway.active();
    let settings = &active.settings.proxy;
    let client = conn.get_socket_digest().and_then(|d| d.peer_addr().cloned());
    if !router::client_allowed(&settings.allow_from, client.as_ref()) {
        return Outcome::Delegate("allow_from");
    }
    if head.minor == 0 {
        return Outcome::Delegate("http10");
    }
    let Ok(path) = std::str::from_utf8(head.path(buf)) else { return Outcome::Delegate("target_chars") };
    let Some(route) = active.router.route(Some(head.host(buf)), path).cloned() else {
        return Outcome::Delegate("no_route");
    };
    let spec = &route.spec;
    let Some(cell) = route.cell.clone() else { return Outcome::Delegate("no_provider") };
    if spec.graphql_unauthenticated || spec.session_probe.is_some() {
        return Outcome::Delegate("route_feature");
    }
    let header_name = spec.header_name.as_str().as_bytes();
    let client_sent = head.fields.iter().any(|(n, _)| buf[n.clone()].eq_ignore_ascii_case(header_name));
    if client_sent && spec.authorization != AuthorizationPolicy::Overwrite {
        return Outcome::Delegate("client_credentials");
    }
    let (token_wait, access_log, read_timeout) =
        (settings.token_wait, settings.access_log, settings.upstream_read_timeout);
    let limits =
        upstream::limits(settings.upstream_idle_timeout, settings.upstream_keepalive_pool_size, settings.threads);
    drop(active);

    let _inflight = app.gateway.enter();
    let started = Instant::now();
    let token = match cell.obtain(token_wait).await {
        Ok(t) => t,
        Err(why) => {
            metrics::get().token_unavailable_total.with_label_values(&[cell.name()]).inc();
            let (body, retry) = tproxy::token_unavailable(cell.name(), &why, token_wait);
            let _ = write_json(conn, 503, &body, Some(retry)).await;
            finish(&route, head, buf, 503, started, None, access_log);
            return Outcome::Close;
        }
    };
    if !token.usable() {
        return Outcome::Delegate("token_expired");
    }

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
    let in_buf = (buf.len() - head.len).min(usize::try_from(body_len).unwrap_or(usize::MAX));
    let streamed = body_len > in_buf as u64;
    // A pooled connection the upstream closed meanwhile fails at the first write or read;
    // the request is then sent once more on a new connection, if it is replayable.
    let replayable = !streamed && head.idempotent(buf);
    let mut token = token;
    let mut auth_retried = false;

    let (mut up, resp, rbuf) = 'auth: loop {
        let up_head = upstream_head(spec, &route, &token, head, buf);
        let whole_request = [&up_head[..], &buf[head.len..head.len + in_buf]].concat();
        let mut pooled = upstream::checkout(&pool_key);
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
                    Err(e) => return bad_gateway(conn, &route, head, buf, started, access_log, e.kind).await,
                },
            };
            if write_all_flush(&mut up, &whole_request).await.is_err() {
                if reused {
                    continue;
                }
                return bad_gateway(conn, &route, head, buf, started, access_log, "WriteError").await;
            }
            if streamed && stream_request_body(conn, &mut up, body_len - in_buf as u64).await.is_err() {
                // The client's body did not arrive whole: nothing sensible can be answered.
                return Outcome::Close;
            }
            match read_response_head(&mut up, read_timeout).await {
                Ok((resp, rbuf)) => break (up, resp, rbuf),
                Err(RespError::Closed) if reused && replayable => continue,
                Err(e) => return bad_gateway(conn, &route, head, buf, started, access_log, e.as_str()).await,
            }
        };
        // What the upstream said about the token, decided as on pingora's path.
        let answer = tproxy::Answer {
            status: resp.status,
            dpop_nonce: resp.header(&rbuf, b"dpop-nonce").and_then(|v| std::str::from_utf8(v).ok()),
            challenges: resp.all(&rbuf, b"www-authenticate").collect(),
        };
        let path = String::from_utf8_lossy(head.path(buf));
        let sent = tproxy::Sent {
            path: &path,
            is_probe: head
                .fields
                .iter()
                .any(|(n, _)| buf[n.clone()].eq_ignore_ascii_case(tproxy::PROBE_HEADER.as_bytes())),
            idempotent: head.idempotent(buf),
            buffered: !streamed,
            body_done: true,
            auth_retried,
            body_judged_later: false,
        };
        // Routes with a session probe are delegated, so `probe` is never asked for here.
        match tproxy::judge_answer(&route, &cell, &token, &answer, &sent, token_wait, |_| {}).await {
            tproxy::Verdict::Pass => break 'auth (up, resp, rbuf),
            tproxy::Verdict::ReplaySameToken => {}
            tproxy::Verdict::ReplayWith(fresh) => token = fresh,
        }
        // The rejected answer is dropped with its connection; the request goes again.
        auth_retried = true;
    };
    let status = resp.status;

    let keep_client = !head.close && !down;
    let no_body = head.is_head(buf) || status == 204 || status == 304;
    let framing = if no_body {
        Framing::None
    } else if let Some(te) = resp.header(&rbuf, b"transfer-encoding") {
        if !te.trim_ascii().eq_ignore_ascii_case(b"chunked") || resp.count(&rbuf, b"transfer-encoding") != 1 {
            return bad_gateway(conn, &route, head, buf, started, access_log, "InvalidHTTPHeader").await;
        }
        Framing::Chunked
    } else {
        match resp.content_length(&rbuf) {
            Ok(Some(n)) => Framing::Length(n),
            Ok(None) => Framing::Close,
            Err(()) => return bad_gateway(conn, &route, head, buf, started, access_log, "InvalidHTTPHeader").await,
        }
    };
    let upstream_keeps = resp.minor == 1
        && framing != Framing::Close
        && !resp
            .all(&rbuf, b"connection")
            .any(|v| v.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close")));

    // The answer's head, as pingora writes it: upstream fields, then Date and Connection.
    let mut out = Vec::with_capacity(resp.len + 64);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(&rbuf[resp.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    for (n, v) in &resp.fields {
        let name = &rbuf[n.clone()];
        if DROPPED_RESPONSE.iter().any(|d| name.eq_ignore_ascii_case(d)) {
            continue;
        }
        // Transfer-Encoding overrides a length (RFC 9112 §6.3); pingora drops the length too.
        if framing == Framing::Chunked && name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        push_field(&mut out, name, &rbuf[v.clone()]);
    }
    if matches!(framing, Framing::Chunked | Framing::Close) {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    push_field(&mut out, b"Date", pingora::protocols::http::date::get_cached_date().as_bytes());
    push_field(&mut out, b"Connection", if keep_client { b"keep-alive" } else { b"close" });
    out.extend_from_slice(b"\r\n");

    let body_start = resp.len;
    let complete = relay_body(conn, &mut up, &rbuf[body_start..], framing, out, read_timeout).await;
    let ok = complete.is_ok();
    if ok && upstream_keeps && complete == Ok(true) {
        upstream::checkin(pool_key, up, limits);
    }
    finish(&route, head, buf, status, started, Some(&token), access_log);
    buf.drain(..head.len + in_buf);
    metrics::get().fastpath_total.with_label_values(&["fast", "served"]).inc();
    if ok && keep_client {
        Outcome::KeepAlive
    } else {
        Outcome::Close
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
fn upstream_head(spec: &RouteSpec, route: &RouteEntry, token: &ActiveToken, head: &Head, buf: &[u8]) -> Vec<u8> {
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
            || name.eq_ignore_ascii_case(spec.header_name.as_str().as_bytes())
            || spec.set_headers.iter().any(|(k, _)| name.eq_ignore_ascii_case(k.as_str().as_bytes()))
            || token.upstream_headers.iter().any(|(k, _)| name.eq_ignore_ascii_case(k.as_str().as_bytes()))
            || (token.dpop.is_some() && name.eq_ignore_ascii_case(tproxy::DPOP.as_bytes()))
    };
    for (n, v) in &head.fields {
        let name = &buf[n.clone()];
        if !replaced(name) {
            push_field(&mut out, name, &buf[v.clone()]);
        }
    }
    let authority: &[u8] = if spec.preserve_host { head.host(buf) } else { spec.upstream.authority.as_bytes() };
    if !spec.preserve_host {
        push_field(&mut out, b"Host", authority);
    }
    for (k, v) in &spec.set_headers {
        push_field(&mut out, k.as_str().as_bytes(), v.as_bytes());
    }
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
    Closed,
    Timeout,
    Invalid,
    Io,
}

impl RespError {
    fn as_str(&self) -> &'static str {
        match self {
            RespError::Closed => "ConnectionClosed",
            RespError::Timeout => "ReadTimedout",
            RespError::Invalid => "InvalidHTTPHeader",
            RespError::Io => "ReadError",
        }
    }
}

/// An upstream response head, as ranges into the buffer it was read into.
struct RespHead {
    status: u16,
    minor: u8,
    reason: std::ops::Range<usize>,
    fields: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
    len: usize,
}

impl RespHead {
    fn all<'b>(&'b self, buf: &'b [u8], name: &'b [u8]) -> impl Iterator<Item = &'b [u8]> + 'b {
        self.fields
            .iter()
            .filter(move |(n, _)| buf[n.clone()].eq_ignore_ascii_case(name))
            .map(move |(_, v)| &buf[v.clone()])
    }
    fn header<'b>(&'b self, buf: &'b [u8], name: &'b [u8]) -> Option<&'b [u8]> {
        self.all(buf, name).next()
    }
    fn count(&self, buf: &[u8], name: &[u8]) -> usize {
        self.all(buf, name).count()
    }
    /// One all-digit value (repeats allowed when equal, as pingora does); `Err` otherwise.
    fn content_length(&self, buf: &[u8]) -> Result<Option<u64>, ()> {
        let mut found: Option<u64> = None;
        for v in self.all(buf, b"content-length") {
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

/// Read the upstream's answer head (1xx interim answers are dropped).
async fn read_response_head(up: &mut Stream, timeout: Duration) -> Result<(RespHead, Vec<u8>), RespError> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let (Some(status), Some(minor)) = (resp.code, resp.version) else { return Err(RespError::Invalid) };
                    if (100..200).contains(&status) {
                        if status == 101 {
                            return Err(RespError::Invalid);
                        }
                        buf.drain(..len);
                        continue;
                    }
                    let base = buf.as_ptr() as usize;
                    let span = |s: &[u8]| {
                        let start = s.as_ptr() as usize - base;
                        start..start + s.len()
                    };
                    let reason = resp.reason.map(|r| span(r.as_bytes())).unwrap_or(0..0);
                    let fields = resp.headers.iter().map(|h| (span(h.name.as_bytes()), span(h.value))).collect();
                    let head = RespHead { status, minor, reason, fields, len };
                    return Ok((head, buf));
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => {}
                _ => return Err(RespError::Invalid),
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        match tokio::time::timeout(timeout, up.read_buf(&mut buf)).await {
            Ok(Ok(0)) if buf.is_empty() => return Err(RespError::Closed),
            Ok(Ok(0)) => return Err(RespError::Invalid),
            Ok(Ok(_)) => {}
            Ok(Err(_)) if buf.is_empty() => return Err(RespError::Closed),
            Ok(Err(_)) => return Err(RespError::Io),
            Err(_) => return Err(RespError::Timeout),
        }
    }
}

/// Send `head` and the body to the client as it arrives. `Ok(true)`: the upstream's
/// body ended exactly where its framing said (its connection may be reused).
async fn relay_body(
    conn: &mut L4Stream,
    up: &mut Stream,
    first: &[u8],
    framing: Framing,
    mut head: Vec<u8>,
    timeout: Duration,
) -> Result<bool, ()> {
    let mut chunk = vec![0u8; 0];
    let mut pending: &[u8] = first;
    match framing {
        Framing::None => {
            write_all_flush(conn, &head).await.map_err(|_| ())?;
            Ok(pending.is_empty())
        }
        Framing::Length(total) => {
            let mut left = total;
            let take = pending.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            head.extend_from_slice(&pending[..take]);
            let extra = pending.len() > take;
            left -= take as u64;
            write_all_flush(conn, &head).await.map_err(|_| ())?;
            while left > 0 {
                if chunk.is_empty() {
                    chunk = vec![0u8; 64 * 1024];
                }
                let want = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = read_up(up, &mut chunk[..want], timeout).await?;
                if n == 0 {
                    return Err(());
                }
                write_all_flush(conn, &chunk[..n]).await.map_err(|_| ())?;
                left -= n as u64;
            }
            Ok(!extra)
        }
        Framing::Chunked => {
            let mut parser = Chunked::default();
            loop {
                match parser.feed(pending) {
                    Feed::Invalid => return Err(()),
                    Feed::Done(n) => {
                        head.extend_from_slice(&pending[..n]);
                        write_all_flush(conn, &head).await.map_err(|_| ())?;
                        return Ok(n == pending.len());
                    }
                    Feed::More => {
                        head.extend_from_slice(pending);
                        write_all_flush(conn, &head).await.map_err(|_| ())?;
                        head.clear();
                    }
                }
                if chunk.is_empty() {
                    chunk = vec![0u8; 64 * 1024];
                }
                let n = read_up(up, &mut chunk, timeout).await?;
                if n == 0 {
                    return Err(());
                }
                pending = &chunk[..n];
            }
        }
        Framing::Close => loop {
            if !pending.is_empty() {
                head.extend_from_slice(format!("{:x}\r\n", pending.len()).as_bytes());
                head.extend_from_slice(pending);
                head.extend_from_slice(b"\r\n");
            }
            write_all_flush(conn, &head).await.map_err(|_| ())?;
            head.clear();
            if chunk.is_empty() {
                chunk = vec![0u8; 64 * 1024];
            }
            let n = read_up(up, &mut chunk, timeout).await?;
            if n == 0 {
                write_all_flush(conn, b"0\r\n\r\n").await.map_err(|_| ())?;
                return Ok(false);
            }
            pending = &chunk[..n];
        },
    }
}

async fn read_up(up: &mut Stream, into: &mut [u8], timeout: Duration) -> Result<usize, ()> {
    match tokio::time::timeout(timeout, up.read(into)).await {
        Ok(Ok(n)) => Ok(n),
        _ => Err(()),
    }
}

/// tollgate's own JSON answer, as `proxy::respond::json` writes it through pingora.
async fn write_json(
    conn: &mut L4Stream,
    status: u16,
    body: &serde_json::Value,
    retry_after: Option<u64>,
) -> std::io::Result<()> {
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
    push_field(&mut out, b"Date", pingora::protocols::http::date::get_cached_date().as_bytes());
    push_field(&mut out, b"Connection", b"close");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    write_all_flush(conn, &out).await
}

/// A 502 when the upstream failed before any byte reached the client; the connection
/// then closes, as pingora's `fail_to_proxy` does.
async fn bad_gateway(
    conn: &mut L4Stream,
    route: &Arc<RouteEntry>,
    head: &Head,
    buf: &[u8],
    started: Instant,
    access_log: bool,
    what: &str,
) -> Outcome {
    let body = json!({"error": "bad_gateway", "route": route.spec.name, "message": what});
    let _ = write_json(conn, 502, &body, None).await;
    finish(route, head, buf, 502, started, None, access_log);
    Outcome::Close
}

/// Metrics and the access log line, as `TollgateProxy::logging` writes them.
fn finish(
    route: &RouteEntry,
    head: &Head,
    buf: &[u8],
    status: u16,
    started: Instant,
    token: Option<&ActiveToken>,
    access_log: bool,
) {
    let elapsed = started.elapsed();
    route.metrics.count(status);
    route.metrics.duration.observe(elapsed.as_secs_f64());
    if access_log {
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
            "error": serde_json::Value::Null,
        });
        println!("{line}");
    }
}
