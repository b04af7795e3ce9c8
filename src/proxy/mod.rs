//! The proxy: pingora's `ProxyHttp` filters, in request order.
//!
//! `request_filter` picks the route and makes sure a token is available (waiting on the
//! provider's single flight if needed); `upstream_request_filter`, which pingora runs on
//! every attempt, inserts the provider's *current* header, so a retry carries the newest
//! token. Before either, `hygiene::check` refuses requests whose framing a front proxy
//! could read differently (see that module for what pingora already refuses itself).

pub mod hygiene;
pub mod resolve;
pub mod respond;
pub mod router;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::header::{HOST, PROXY_AUTHORIZATION};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType};
use serde_json::json;
use tracing::warn;

use crate::config::AuthorizationPolicy;
use crate::gateway::{Gateway, InflightGuard};
use crate::metrics;
use crate::token::{ActiveToken, Suspicion, Unavailable};
use router::RouteEntry;

pub struct TollgateProxy {
    pub gateway: Arc<Gateway>,
}

/// Per-request state.
pub struct Ctx {
    route: Option<Arc<RouteEntry>>,
    /// The token injected on the latest attempt (its generation identifies it for a 401).
    token: Option<Arc<ActiveToken>>,
    /// The client's own credential is kept (policy `keep`).
    keep_client_auth: bool,
    started: Instant,
    token_wait: Duration,
    access_log: bool,
    /// This request was already replayed once after a token rejection.
    auth_retried: bool,
    /// The error being handed to `error_while_proxy` is our token-rejection replay.
    auth_retry_pending: bool,
    /// Body of a GraphQL response being inspected for `UNAUTHENTICATED`.
    graphql_body: Option<bytes::BytesMut>,
    /// The upstream addresses this request has tried (failover on connect errors).
    upstream_attempt: resolve::Attempt,
    _inflight: InflightGuard,
}

/// Limit on the GraphQL response body inspected for `UNAUTHENTICATED`.
pub(crate) const GRAPHQL_INSPECT_LIMIT: usize = 256 * 1024;

impl TollgateProxy {
    /// Ask the route's session probe, through this proxy (so it gets the same token,
    /// headers and upstream), in the background: if the probe is rejected too, that is
    /// a second path and ends the session; if it succeeds, the suspicion is cleared.
    fn probe(&self, session: &Session, path: &str) {
        self.probe_with_host(session.req_header().headers.get(HOST).cloned(), path);
    }

    fn probe_with_host(&self, host: Option<http::HeaderValue>, path: &str) {
        send_probe(&self.gateway, host, path);
    }
}

/// Ask the route's session probe at `path` through this proxy (see `TollgateProxy::probe`);
/// shared with the fast path, which serves such routes too.
pub(crate) fn send_probe(gateway: &Gateway, host: Option<http::HeaderValue>, path: &str) {
    let mut addr = gateway.active().settings.proxy.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() });
    }
    let url = format!("http://{addr}{path}");
    tokio::spawn(async move {
        static CLIENT: std::sync::LazyLock<Option<reqwest::Client>> = std::sync::LazyLock::new(|| {
            reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().ok()
        });
        let Some(client) = CLIENT.as_ref() else { return };
        let mut req = client.get(&url).header(PROBE_HEADER, "1");
        if let Some(h) = host {
            req = req.header(HOST, h);
        }
        match req.send().await {
            Ok(r) => tracing::info!(status = r.status().as_u16(), "session probe answered"),
            Err(e) => tracing::warn!(error = %e.without_url(), "session probe failed"),
        }
    });
}

#[async_trait]
impl ProxyHttp for TollgateProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        let active = self.gateway.active();
        Ctx {
            route: None,
            token: None,
            keep_client_auth: false,
            started: Instant::now(),
            token_wait: active.settings.proxy.token_wait,
            access_log: active.settings.proxy.access_log,
            auth_retried: false,
            auth_retry_pending: false,
            graphql_body: None,
            upstream_attempt: resolve::Attempt::default(),
            _inflight: self.gateway.enter(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // `proxy.allow_from`: strangers are refused before anything else is looked at.
        if !router::client_allowed(&self.gateway.active().settings.proxy.allow_from, session.client_addr()) {
            let body = json!({"error": "client_not_allowed", "message": "this client address may not use the proxy (`proxy.allow_from`)"});
            respond::json(session, 403, &body, None).await?;
            return Ok(true);
        }
        if let Err(r) = hygiene::check(session) {
            respond::json(session, r.status, &json!({"error": r.error, "message": r.message}), None).await?;
            return Ok(true);
        }
        let route = {
            let active = self.gateway.active();
            let req = session.req_header();
            let host = req.headers.get(HOST).map(|h| h.as_bytes()).or_else(|| req.uri.host().map(str::as_bytes));
            active.router.route(host, req.uri.path()).cloned()
        };
        let Some(route) = route else {
            respond::json(
                session,
                404,
                &json!({"error": "no_route", "message": "no route matches this host and path"}),
                None,
            )
            .await?;
            return Ok(true);
        };
        ctx.route = Some(Arc::clone(&route));
        let Some(cell) = &route.cell else {
            return Ok(false);
        };
        let client_sent = session.req_header().headers.contains_key(&route.spec.header_name);
        match client_credential(&route.spec, client_sent) {
            ClientCredential::Refuse(body) => {
                respond::json(session, 400, &body, None).await?;
                return Ok(true);
            }
            ClientCredential::Keep => {
                ctx.keep_client_auth = true;
                return Ok(false);
            }
            ClientCredential::Inject => {}
        }
        if !route.spec.retry_on_status.is_empty() {
            // Keep the body (up to pingora's 64 KiB retry buffer) so that a request whose
            // token the upstream rejects can be replayed with a new one.
            session.enable_retry_buffering();
        }
        match cell.obtain(ctx.token_wait).await {
            Ok(token) => {
                if token.dpop.is_some() {
                    // An upstream may answer the first proof with a nonce to use (RFC 9449
                    // section 9): keep the body so the request can be sent again with it.
                    session.enable_retry_buffering();
                }
                ctx.token = Some(token);
                Ok(false)
            }
            Err(why) => {
                metrics::get().token_unavailable_total.with_label_values(&[cell.name()]).inc();
                let (body, retry) = token_unavailable(cell.name(), &why, ctx.token_wait);
                respond::json(session, 503, &body, Some(retry)).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        match &ctx.route {
            Some(r) => Ok(Box::new(r.next_peer(&mut ctx.upstream_attempt)?)),
            None => Error::e_explain(ErrorType::InternalError, "no route selected"),
        }
    }

    /// A connect error is retried on the upstream's next address, if it has one this
    /// request has not tried (nothing was sent, so any request may be).
    fn fail_to_connect(&self, _session: &mut Session, peer: &HttpPeer, ctx: &mut Ctx, mut e: Box<Error>) -> Box<Error> {
        if let Some(r) = &ctx.route {
            if r.connect_failed(peer, &mut ctx.upstream_attempt) {
                e.set_retry(true);
            }
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(route) = &ctx.route else {
            return Error::e_explain(ErrorType::InternalError, "no route selected");
        };
        let spec = &route.spec;
        // Never forwarded: it is meant for tollgate (a forward proxy), not the upstream.
        req.remove_header(&PROXY_AUTHORIZATION);
        req.remove_header(PROBE_HEADER);
        if !spec.preserve_host {
            req.insert_header(HOST, spec.upstream.authority.clone())?;
        }
        if spec.strip_prefix || !spec.upstream.base_path.is_empty() {
            rewrite_path(req, spec)?;
        }
        for (k, v) in &spec.set_headers {
            req.insert_header(k.clone(), v.clone())?;
        }
        if let (Some(cell), false) = (&route.cell, ctx.keep_client_auth) {
            // Prefer the cell's current token: on a retry it is the renewed one.
            let token = match cell.usable() {
                Some(t) => t,
                None => match ctx.token.take().filter(|t| t.usable()) {
                    Some(t) => t,
                    None => {
                        return Error::e_explain(
                            ErrorType::HTTPStatus(503),
                            "token expired before the request could be sent",
                        );
                    }
                },
            };
            req.insert_header(spec.header_name.clone(), token.header.clone())?;
            for (k, v) in &token.upstream_headers {
                req.insert_header(k.clone(), v.clone())?;
            }
            if let Some(d) = &token.dpop {
                req.insert_header(DPOP, dpop_proof(req, route, d))?;
            }
            ctx.token = Some(token);
        }
        Ok(())
    }

    /// An upstream rejection of the injected token: invalidate that token (by generation,
    /// so concurrent rejections cause one refetch) and replay the request once with a
    /// new one when [`may_replay_after_rejection`] allows it. Otherwise, or when no new
    /// token comes in time, the upstream's answer passes through untouched. The decision
    /// is [`judge_answer`]'s, shared with the fast path.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(route) = ctx.route.clone() else { return Ok(()) };
        let (Some(cell), Some(token)) = (&route.cell, ctx.token.clone()) else { return Ok(()) };
        let status = resp.status.as_u16();
        if graphql_inspected(&route.spec, status, resp.headers.get(http::header::CONTENT_TYPE).map(|v| v.as_bytes())) {
            ctx.graphql_body = Some(bytes::BytesMut::new());
        }
        let body_done = session.is_body_done();
        let session: &Session = session;
        let path = session.req_header().uri.path();
        let answer = Answer {
            status,
            dpop_nonce: resp.headers.get("dpop-nonce").and_then(|v| v.to_str().ok()),
            challenges: resp.headers.get_all(http::header::WWW_AUTHENTICATE).iter().map(|v| v.as_bytes()).collect(),
        };
        let request = Sent {
            path,
            is_probe: session.req_header().headers.contains_key(PROBE_HEADER),
            idempotent: session.req_header().method.is_idempotent(),
            buffered: !session.retry_buffer_truncated(),
            body_done,
            auth_retried: ctx.auth_retried,
            body_judged_later: ctx.graphql_body.is_some(),
        };
        let verdict =
            judge_answer(&route, cell, &token, &answer, &request, ctx.token_wait, |p| self.probe(session, p)).await;
        let message = match verdict {
            Verdict::Pass => return Ok(()),
            Verdict::ReplaySameToken => "upstream asked for a DPoP nonce; replaying with it",
            Verdict::ReplayWith(fresh) => {
                // The replay must never fall back to the rejected token.
                ctx.token = Some(fresh);
                "upstream rejected the token; replaying with a new one"
            }
        };
        ctx.auth_retried = true;
        ctx.auth_retry_pending = true;
        let mut e = Error::explain(ErrorType::HTTPStatus(status), message);
        e.set_retry(true);
        Err(e)
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let (Some(buf), Some(chunk)) = (ctx.graphql_body.as_mut(), body.as_ref()) {
            if buf.len() + chunk.len() > GRAPHQL_INSPECT_LIMIT {
                ctx.graphql_body = None;
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        if end_of_stream {
            if let (Some(buf), Some(route), Some(token)) = (ctx.graphql_body.take(), &ctx.route, &ctx.token) {
                if let Some(cell) = &route.cell {
                    let req = _session.req_header();
                    let is_probe = req.headers.contains_key(PROBE_HEADER);
                    judge_graphql_body(route, cell, token, &buf, req.uri.path(), is_probe, |p| self.probe(_session, p));
                }
            }
        }
        Ok(None)
    }

    /// Whether a failed attempt is tried again (on another pooled or a new connection).
    /// Our token-rejection replay was decided in `upstream_response_filter`. Otherwise see
    /// [`retry_after_failure`]; `upstream_reused` says the attempt ran on a pooled
    /// connection.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        upstream_reused: bool,
    ) -> Box<Error> {
        let nothing_sent = upstream_reused && request_header_unsent(&e);
        let mut e = e.more_context(format!("Peer: {peer}"));
        if std::mem::take(&mut ctx.auth_retry_pending) {
            e.set_retry(!session.as_ref().retry_buffer_truncated());
            return e;
        }
        let idempotent = session.req_header().method.is_idempotent();
        let buffered = !session.as_ref().retry_buffer_truncated();
        // pingora marks "closed or reset before any response byte" as retryable on a
        // reused connection only (`ReusedOnly`); resolve that first.
        e.retry.decide_reuse(upstream_reused);
        let retry = retry_after_failure(e.retry(), nothing_sent, idempotent, buffered);
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code > 0 && session.response_written().is_none() {
            let route = ctx.route.as_ref().map(|r| r.spec.name.as_str()).unwrap_or("");
            let error = match code {
                502 => "bad_gateway",
                503 => "token_unavailable",
                504 => "gateway_timeout",
                400 => "bad_request",
                _ => "proxy_error",
            };
            let provider = ctx.route.as_ref().and_then(|r| r.spec.provider.as_deref());
            let body = match code {
                // The token expired between the checks of one request: same shape as the
                // other token 503s, so clients need one parser.
                503 => {
                    json!({"error": error, "route": route, "provider": provider, "reason": "expired", "message": "the token expired before the request could be sent"})
                }
                _ => json!({"error": error, "route": route, "message": e.etype().as_str()}),
            };
            if let Err(err) = respond::json(session, code, &body, (code == 503).then_some(1)).await {
                warn!(error = %err, "could not send error response");
            }
        }
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    /// What pingora prints about the request in its own log lines ("Fail to proxy: …").
    /// Its default is the request line's target, query string included, which may carry
    /// personal data or keys; like the access log, this gives the path alone.
    fn request_summary(&self, session: &Session, _ctx: &Ctx) -> String {
        let req = session.req_header();
        let host = req.headers.get(HOST).map(|h| String::from_utf8_lossy(h.as_bytes()));
        format!("{} {}, Host: {}", req.method.as_str(), req.uri.path(), host.as_deref().unwrap_or("-"))
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = match session.response_written() {
            Some(r) => r.status.as_u16(),
            None => match e.map(|e| e.etype()) {
                Some(ErrorType::HTTPStatus(c)) => *c,
                Some(_) => 502,
                None => 0,
            },
        };
        let route = ctx.route.as_ref().map(|r| r.spec.name.as_str()).unwrap_or("");
        let elapsed = ctx.started.elapsed();
        match &ctx.route {
            Some(r) => {
                r.metrics.count(status);
                r.metrics.duration.observe(elapsed.as_secs_f64());
            }
            None => metrics::get().requests_total.with_label_values(&["", &status.to_string()]).inc(),
        }
        if ctx.access_log {
            let req = session.req_header();
            let line = json!({
                "ts": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                "route": route,
                "provider": ctx.route.as_ref().and_then(|r| r.spec.provider.as_deref()),
                "method": req.method.as_str(),
                // The query string is left out: clients put keys and personal data there.
                "path": req.uri.path(),
                "status": status,
                "duration_ms": (elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
                "token_generation": ctx.token.as_ref().map(|t| t.generation),
                "error": e.map(|e| e.etype().as_str()),
            });
            println!("{line}");
        }
    }
}

/// The 503 JSON body and Retry-After seconds when `provider` has no token for a request
/// (shared by pingora's filters and the fast path, so clients need one parser).
pub(crate) fn token_unavailable(provider: &str, why: &Unavailable, token_wait: Duration) -> (serde_json::Value, u64) {
    match why {
        Unavailable::AwaitingCode => (
            json!({
                "error": "login_required",
                "provider": provider,
                "message": format!("provider `{provider}` needs a one-time code; run `tollgate login {provider}`"),
            }),
            30,
        ),
        Unavailable::Timeout => (
            json!({
                "error": "token_unavailable",
                "provider": provider,
                "reason": "timeout",
                "message": format!("no valid token for provider `{provider}` within {} ms", token_wait.as_millis()),
            }),
            1,
        ),
        Unavailable::Failed { class, retry_in } => (
            json!({
                "error": "token_unavailable",
                "provider": provider,
                "reason": class.as_str(),
                "message": format!("the identity provider for `{provider}` is failing ({class}); next attempt in {} ms", retry_in.as_millis()),
            }),
            retry_in.as_secs_f64().ceil() as u64,
        ),
    }
}

/// An upstream's answer head, as far as token handling reads it.
pub(crate) struct Answer<'a> {
    pub status: u16,
    pub dpop_nonce: Option<&'a str>,
    /// Every `WWW-Authenticate` value.
    pub challenges: Vec<&'a [u8]>,
}

/// The request that got the answer.
pub(crate) struct Sent<'a> {
    pub path: &'a str,
    pub is_probe: bool,
    pub idempotent: bool,
    /// Its whole body is held for a replay.
    pub buffered: bool,
    /// Its body was read to the end.
    pub body_done: bool,
    /// It is already a replay.
    pub auth_retried: bool,
    /// A GraphQL body is inspected before the token counts as accepted.
    pub body_judged_later: bool,
}

pub(crate) enum Verdict {
    /// The answer goes to the client.
    Pass,
    /// Send the request again with the same token (a fresh DPoP proof with the new nonce).
    ReplaySameToken,
    /// Send the request again with this newer token.
    ReplayWith(Arc<ActiveToken>),
}

/// What an upstream's answer says about the injected token (see
/// `upstream_response_filter`): metrics, nonce, invalidation, suspicion, and whether the
/// request is replayed. `probe` asks the route's session probe.
pub(crate) async fn judge_answer(
    route: &RouteEntry,
    cell: &crate::token::TokenCell,
    token: &ActiveToken,
    answer: &Answer<'_>,
    sent: &Sent<'_>,
    token_wait: Duration,
    probe: impl FnOnce(&str),
) -> Verdict {
    let status = answer.status;
    // Whether this answer carries a nonce: even one another request stored first is
    // newer than what this request's proof used.
    let nonce_given = token.dpop.is_some() && answer.dpop_nonce.is_some_and(|n| remember_dpop_nonce_value(n, route));
    let challenge =
        if matches!(status, 401 | 403) { answer.challenges.iter().find_map(|v| challenge_error(v)) } else { None };
    if matches!(status, 401 | 403) {
        metrics::get()
            .upstream_challenges_total
            .with_label_values(&[&route.spec.name, challenge_label(challenge.as_deref())])
            .inc();
    }
    if status == 401 && challenge.as_deref() == Some("use_dpop_nonce") && token.dpop.is_some() {
        // RFC 9449 section 9: not a rejection of the token; the proof lacked the
        // server's nonce, which came with this answer. One replay with it.
        let replay = nonce_given
            && !sent.auth_retried
            && may_replay_after_rejection(status, sent.idempotent, sent.buffered, sent.body_done);
        if replay {
            return Verdict::ReplaySameToken;
        }
        warn!(route = %route.spec.name, provider = %cell.name(), "upstream asked for a DPoP nonce again or without one; passing its answer through");
        return Verdict::Pass;
    }
    if !route.spec.retry_on_status.contains(&status) {
        // A GraphQL 200 may still say UNAUTHENTICATED: that is decided with its body.
        if status < 400 && !sent.body_judged_later {
            cell.accepted(token.generation);
        }
        return Verdict::Pass;
    }
    if challenge.as_deref() == Some("invalid_dpop_proof") && token.dpop.is_some() {
        // RFC 9449 section 7.1: the proof was refused, not the token (a clock apart,
        // an `htu` the upstream sees otherwise). A new token would be refused the
        // same way; the answer passes through and the token stays.
        warn!(route = %route.spec.name, provider = %cell.name(), status, "upstream refused the DPoP proof (invalid_dpop_proof); passing it through, the token stays");
        return Verdict::Pass;
    }
    if challenge.as_deref() == Some("insufficient_scope") {
        // RFC 6750: the token is fine, the request needs more than it grants. Renewing
        // it would change nothing; the answer passes through untouched.
        metrics::get().upstream_insufficient_scope_total.with_label_values(&[&route.spec.name]).inc();
        warn!(route = %route.spec.name, provider = %cell.name(), status, "upstream: insufficient_scope; passing it through, the token stays");
        return Verdict::Pass;
    }
    metrics::get().upstream_auth_rejected_total.with_label_values(&[&route.spec.name]).inc();
    if cell.human_only() && challenge.as_deref() != Some("invalid_token") {
        match cell.suspect(token.generation, sent.path) {
            Suspicion::Suspected => {
                warn!(route = %route.spec.name, provider = %cell.name(), status, path = %sent.path, "upstream rejected a token only a human can renew; one rejection is only a suspicion, the token stays");
                if let (Some(p), false) = (&route.spec.session_probe, sent.is_probe) {
                    if cell.probe_due() {
                        probe(p);
                    }
                }
                return Verdict::Pass;
            }
            Suspicion::Dead => {
                warn!(route = %route.spec.name, provider = %cell.name(), "a second path rejected the token with no success in between: the session is over");
            }
        }
    }
    let invalidated = cell.invalidate(token.generation, route.reauth_min_interval);
    warn!(route = %route.spec.name, provider = %cell.name(), status, generation = token.generation, invalidated, "upstream rejected the token");
    if sent.auth_retried || !may_replay_after_rejection(status, sent.idempotent, sent.buffered, sent.body_done) {
        return Verdict::Pass;
    }
    match cell.obtain(token_wait).await {
        Ok(fresh) if fresh.generation > token.generation => Verdict::ReplayWith(fresh),
        _ => Verdict::Pass,
    }
}

/// Whether a failed attempt is tried again. `pingora_says` is pingora's verdict for an
/// idempotent request (a reused connection that closed or reset before any byte of the
/// response, which is what an upstream or load balancer that dropped an idle connection
/// does). A request whose header could not even be written to a reused connection
/// (`nothing_sent`) reached nobody, so it is tried again whatever its method. A
/// non-idempotent request that was sent is not: the upstream may have acted on it (RFC
/// 9110 §9.2.2). Nothing is tried again once its body has outgrown the retry buffer.
fn retry_after_failure(pingora_says: bool, nothing_sent: bool, idempotent: bool, buffered: bool) -> bool {
    buffered && (nothing_sent || (idempotent && pingora_says))
}

/// Whether `e` is pingora's failure to write the request header to the upstream, so that
/// no byte of the request reached it (a header fits one write; a timed-out write may have
/// sent part of it and does not count).
fn request_header_unsent(e: &Error) -> bool {
    matches!(e.etype(), ErrorType::WriteError)
        && e.context.as_ref().is_some_and(|c| c.as_str().starts_with("while writing request headers"))
}

/// Whether a request the upstream answered with `status` (one of the route's
/// `retry_on_status`) may be replayed with a new token. An idempotent request may, after
/// any listed status, while its body is held whole in the retry buffer (`buffered`). A
/// non-idempotent one (POST, PATCH, …) only after a 401, which says the upstream refused
/// the credential before acting, and only when its body was read to the end into the
/// buffer (`body_done`): a 403 or 407 may come from a server that did part of the work,
/// and a body still arriving cannot be replayed whole.
fn may_replay_after_rejection(status: u16, idempotent: bool, buffered: bool, body_done: bool) -> bool {
    if idempotent {
        buffered
    } else {
        status == 401 && buffered && body_done
    }
}

/// Whether an answer's body is read (up to [`GRAPHQL_INSPECT_LIMIT`]) for a GraphQL
/// `UNAUTHENTICATED` before the token counts as accepted: a 200 JSON answer on a route
/// that asks for it.
pub(crate) fn graphql_inspected(spec: &crate::config::RouteSpec, status: u16, content_type: Option<&[u8]>) -> bool {
    spec.graphql_unauthenticated
        && status == 200
        && content_type.is_some_and(|v| v.windows(4).any(|w| w.eq_ignore_ascii_case(b"json")))
}

/// What a whole inspected GraphQL body (see [`graphql_inspected`]) says about the token:
/// accepted, or rejected (metrics, suspicion for a token only a human can renew, with
/// `probe` asked for the route's session probe, else invalidation). Shared by pingora's
/// body filter and the fast path.
pub(crate) fn judge_graphql_body(
    route: &RouteEntry,
    cell: &crate::token::TokenCell,
    token: &ActiveToken,
    body: &[u8],
    path: &str,
    is_probe: bool,
    probe: impl FnOnce(&str),
) {
    if !graphql_unauthenticated(body) {
        cell.accepted(token.generation);
        return;
    }
    metrics::get().upstream_auth_rejected_total.with_label_values(&[&route.spec.name]).inc();
    if cell.human_only() && cell.suspect(token.generation, path) == Suspicion::Suspected {
        warn!(route = %route.spec.name, provider = %cell.name(), "GraphQL UNAUTHENTICATED for a token only a human can renew: a suspicion, the token stays");
        if let (Some(p), false) = (&route.spec.session_probe, is_probe) {
            if cell.probe_due() {
                probe(p);
            }
        }
        return;
    }
    let invalidated = cell.invalidate(token.generation, route.reauth_min_interval);
    warn!(route = %route.spec.name, provider = %cell.name(), invalidated, "GraphQL UNAUTHENTICATED: token invalidated");
}

/// What a route does with the request's own credential (its `header_name` field).
pub(crate) enum ClientCredential {
    /// None was sent, or the policy is `overwrite`: the provider's token is injected.
    Inject,
    /// Policy `keep`: the client's credential goes upstream as sent; no token is added.
    Keep,
    /// Policy `reject`: a 400 with this JSON body.
    Refuse(serde_json::Value),
}

pub(crate) fn client_credential(spec: &crate::config::RouteSpec, client_sent: bool) -> ClientCredential {
    match (spec.authorization, client_sent) {
        (AuthorizationPolicy::Reject, true) => ClientCredential::Refuse(json!({
            "error": "client_credentials_not_allowed",
            "message": format!("this route adds its own `{}` header; do not send one", spec.header_name),
        })),
        (AuthorizationPolicy::Keep, true) => ClientCredential::Keep,
        _ => ClientCredential::Inject,
    }
}

/// RFC 9449's proof header.
pub(crate) const DPOP: &str = "dpop";

/// A DPoP proof for this request (RFC 9449 section 4.2): `htu` is the URI the upstream
/// sees (its scheme, the Host sent to it, the path after rewriting), without query and
/// fragment; the nonce is the upstream origin's latest.
fn dpop_proof(req: &RequestHeader, route: &RouteEntry, d: &crate::token::DpopBinding) -> http::HeaderValue {
    let authority = req.headers.get(HOST).unwrap_or(&route.spec.upstream.authority);
    dpop_proof_for(req.method.as_str(), authority.as_bytes(), req.uri.path(), route, d)
}

/// [`dpop_proof`] from the parts of the request the upstream sees (the fast path has no
/// `RequestHeader`).
pub(crate) fn dpop_proof_for(
    method: &str,
    authority: &[u8],
    path: &str,
    route: &RouteEntry,
    d: &crate::token::DpopBinding,
) -> http::HeaderValue {
    let authority = String::from_utf8_lossy(authority);
    let scheme = if route.spec.upstream.tls { "https://" } else { "http://" };
    let mut htu = String::with_capacity(scheme.len() + authority.len() + path.len());
    htu.push_str(scheme);
    htu.push_str(&authority);
    htu.push_str(path);
    let nonce = route.dpop_nonce.load();
    d.key.proof(method, &htu, Some(&d.ath), nonce.as_deref().map(String::as_str))
}

/// Keep the upstream's `DPoP-Nonce`, which it may send on any answer (RFC 9449 section
/// 9); later proofs to that origin carry it. True when the answer carried a usable nonce
/// (now the origin's current one): only then can a replay succeed.
pub(crate) fn remember_dpop_nonce_value(n: &str, route: &RouteEntry) -> bool {
    // RFC 9449 section 8.1: a nonce is printable ASCII without spaces or quotes.
    if n.is_empty() || n.len() > 512 || !n.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') {
        return false;
    }
    if route.dpop_nonce.load().as_deref().is_none_or(|cur| cur != n) {
        route.dpop_nonce.store(Some(Arc::new(n.to_string())));
    }
    true
}

/// The `error` label of `tollgate_upstream_challenges_total`: the codes tollgate acts on,
/// anything else as `other` (an upstream cannot create label values).
pub(crate) fn challenge_label(error: Option<&str>) -> &'static str {
    match error {
        None => "none",
        Some("invalid_token") => "invalid_token",
        Some("insufficient_scope") => "insufficient_scope",
        Some("use_dpop_nonce") => "use_dpop_nonce",
        Some("invalid_dpop_proof") => "invalid_dpop_proof",
        Some(_) => "other",
    }
}

/// Marks tollgate's own session probe (so a rejected probe does not probe again).
pub(crate) const PROBE_HEADER: &str = "x-tollgate-probe";

/// The `error` parameter of an RFC 6750 challenge (`WWW-Authenticate: Bearer
/// error="invalid_token"`, also under the `DPoP` scheme), lower-cased. Only parameters
/// outside quoted strings count: an `error_description="… error=x …"` says nothing.
pub(crate) fn challenge_error(raw: &[u8]) -> Option<String> {
    let lower = raw.to_ascii_lowercase();
    // The same bytes with quoted strings blanked out, so that offsets stay the same.
    let mut top = lower.clone();
    let (mut quoted, mut escaped) = (false, false);
    for b in top.iter_mut() {
        let c = *b;
        if quoted {
            *b = b' ';
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                quoted = false;
                *b = b'"';
            }
        } else if c == b'"' {
            quoted = true;
        }
    }
    let mut from = 0;
    while let Some(i) = top[from..].windows(5).position(|w| w == b"error").map(|i| i + from) {
        from = i + 5;
        if i > 0 && !matches!(top[i - 1], b' ' | b',' | b'\t') {
            continue;
        }
        let mut k = i + 5;
        while top.get(k).is_some_and(|b| *b == b' ' || *b == b'\t') {
            k += 1;
        }
        if top.get(k) != Some(&b'=') {
            continue;
        }
        k += 1;
        while top.get(k).is_some_and(|b| *b == b' ' || *b == b'\t') {
            k += 1;
        }
        let value: &[u8] = if top.get(k) == Some(&b'"') {
            let rest = &lower[k + 1..];
            &rest[..rest.iter().position(|b| *b == b'"').unwrap_or(rest.len())]
        } else {
            let rest = &lower[k..];
            &rest[..rest.iter().position(|b| matches!(b, b',' | b' ' | b'\t')).unwrap_or(rest.len())]
        };
        if !value.is_empty() {
            return std::str::from_utf8(value).ok().map(str::to_string);
        }
    }
    None
}

/// Whether a GraphQL response reports `errors[].extensions.code == "UNAUTHENTICATED"`.
fn graphql_unauthenticated(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
    v.get("errors").and_then(|e| e.as_array()).is_some_and(|errs| {
        errs.iter().any(|e| e.pointer("/extensions/code").and_then(|c| c.as_str()) == Some("UNAUTHENTICATED"))
    })
}

/// Remove the route prefix (if asked) and prepend the upstream's base path.
fn rewrite_path(req: &mut RequestHeader, spec: &crate::config::RouteSpec) -> Result<()> {
    let path = req.uri.path();
    let rest = if spec.strip_prefix {
        path.strip_prefix(spec.path_prefix.trim_end_matches('/')).unwrap_or(path)
    } else {
        path
    };
    let mut new = String::with_capacity(spec.upstream.base_path.len() + rest.len() + 1);
    new.push_str(&spec.upstream.base_path);
    if !rest.starts_with('/') {
        new.push('/');
    }
    new.push_str(rest);
    if let Some(q) = req.uri.query() {
        new.push('?');
        new.push_str(q);
    }
    let uri = new.parse::<http::Uri>().or_err(ErrorType::InternalError, "rewritten path is not a valid URI")?;
    req.set_uri(uri);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_errors_are_read_outside_quoted_strings_only() {
        let e = |s: &str| challenge_error(s.as_bytes());
        assert_eq!(e(r#"Bearer error="invalid_token""#).as_deref(), Some("invalid_token"));
        assert_eq!(
            e(r#"Bearer realm="api", error=insufficient_scope, scope="x""#).as_deref(),
            Some("insufficient_scope")
        );
        assert_eq!(e(r#"DPoP algs="ES256", error="use_dpop_nonce""#).as_deref(), Some("use_dpop_nonce"));
        assert_eq!(
            e(r#"Bearer error_description="an error=invalid_token \" error=x", error="insufficient_scope""#).as_deref(),
            Some("insufficient_scope")
        );
        assert_eq!(e(r#"Bearer realm="error=invalid_token""#), None);
        assert_eq!(e("Bearer"), None);
        assert_eq!(e(r#"Basic realm="x", Bearer error = "Invalid_Token""#).as_deref(), Some("invalid_token"));
    }

    #[test]
    fn only_a_401_replays_a_non_idempotent_request_and_only_with_its_whole_body() {
        // Idempotent: after any listed status, while the body is buffered.
        for status in [401, 403, 407] {
            assert!(may_replay_after_rejection(status, true, true, false));
            assert!(!may_replay_after_rejection(status, true, false, true));
        }
        assert!(may_replay_after_rejection(401, false, true, true));
        assert!(!may_replay_after_rejection(401, false, true, false), "body still arriving");
        assert!(!may_replay_after_rejection(401, false, false, true), "body outgrew the buffer");
        assert!(!may_replay_after_rejection(403, false, true, true));
        assert!(!may_replay_after_rejection(407, false, true, true));
    }

    #[test]
    fn a_request_that_reached_nobody_is_retried_whatever_its_method() {
        assert!(retry_after_failure(false, true, false, true), "POST whose header was never written");
        assert!(retry_after_failure(true, false, true, true), "GET on a reused connection that closed");
        assert!(!retry_after_failure(true, false, false, true), "a POST that was sent may have been applied");
        assert!(!retry_after_failure(false, false, true, true), "a fresh connection's failure is not retried");
        assert!(!retry_after_failure(true, true, true, false), "nothing once the body outgrew the buffer");
    }

    #[test]
    fn only_a_failed_header_write_counts_as_nothing_sent() {
        let io = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let header = Error::because(ErrorType::WriteError, "while writing request headers", io).into_up();
        assert!(request_header_unsent(&header));
        let body = Error::explain(ErrorType::WriteError, "while writing body").into_up();
        assert!(!request_header_unsent(&body));
        let timeout = Error::explain(ErrorType::WriteTimedout, "while writing request headers (timeout)");
        assert!(!request_header_unsent(&timeout));
        let read = Error::explain(ErrorType::ConnectionClosed, "while reading response headers");
        assert!(!request_header_unsent(&read));
    }
}
