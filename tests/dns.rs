//! Upstream DNS that follows the upstream (issue 11, item 2): host names are re-resolved
//! in the background with their TTL, every address is used with failover on connect
//! errors, the last good answer is kept while DNS fails, and no reload fails because of
//! DNS.
//!
//! tollgate is pointed at a DNS double on 127.0.0.1 through `TOLLGATE_DNS_SERVERS` (it
//! replaces the name servers of /etc/resolv.conf). The double answers A queries for the
//! names the test sets (TTL 1 s), NODATA for AAAA, NXDOMAIN for other names, and can be
//! made to stop answering. The upstream doubles listen on other 127.0.0.x addresses
//! (all loopback) on one shared port, answer with their own name, and close every
//! connection after one answer, so that no pooled connection hides an address change.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::{rdata::A, rdata::AAAA, RData, Record, RecordType};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A DNS server double on 127.0.0.1 (UDP).
#[derive(Clone)]
struct Dns {
    addr: SocketAddr,
    names: Arc<Mutex<HashMap<String, Vec<IpAddr>>>>,
    /// Drop every query unanswered (a resolver that is down).
    down: Arc<AtomicBool>,
    queries: Arc<AtomicUsize>,
}

impl Dns {
    async fn start() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind DNS double");
        let dns = Dns {
            addr: sock.local_addr().expect("DNS double address"),
            names: Arc::default(),
            down: Arc::default(),
            queries: Arc::default(),
        };
        let d = dns.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                d.queries.fetch_add(1, Ordering::SeqCst);
                if d.down.load(Ordering::SeqCst) {
                    continue;
                }
                if let Some(answer) = d.answer(&buf[..n]) {
                    let _ = sock.send_to(&answer, from).await;
                }
            }
        });
        dns
    }

    fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        self.set_any(name, &ips.iter().map(|ip| IpAddr::V4(*ip)).collect::<Vec<_>>());
    }

    fn set_any(&self, name: &str, ips: &[IpAddr]) {
        lock(&self.names).insert(name.to_string(), ips.to_vec());
    }

    fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let q = Message::from_vec(query).ok()?;
        let question = q.queries().first()?.clone();
        let name = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let mut m = Message::new();
        m.set_id(q.id())
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(q.recursion_desired())
            .set_recursion_available(true)
            .set_authoritative(true)
            .add_query(question.clone());
        match lock(&self.names).get(&name) {
            None => {
                m.set_response_code(ResponseCode::NXDomain);
            }
            Some(ips) => {
                m.set_response_code(ResponseCode::NoError);
                for ip in ips {
                    let rdata = match (ip, question.query_type()) {
                        (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                        _ => continue,
                    };
                    m.add_answer(Record::from_rdata(question.name().clone(), 1, rdata));
                }
            }
        }
        m.to_vec().ok()
    }

    fn env(&self) -> (&'static str, String) {
        ("TOLLGATE_DNS_SERVERS", self.addr.to_string())
    }
}

/// An upstream double on `ip:port`: answers every request 200 with `name`, then closes.
struct Origin {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    served: Arc<AtomicUsize>,
    /// The request heads it received.
    heads: Arc<Mutex<Vec<String>>>,
}

impl Origin {
    async fn start(addr: SocketAddr, name: &'static str) -> Self {
        Self::on(TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}")), name)
    }

    fn on(listener: TcpListener, name: &'static str) -> Self {
        let addr = listener.local_addr().expect("origin address");
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let served = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (s2, h2) = (Arc::clone(&served), Arc::clone(&heads));
        tokio::spawn(async move {
            loop {
                let (mut c, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                    _ = &mut stopped => return, // the listener is dropped: connections are refused
                };
                let (s, h) = (Arc::clone(&s2), Arc::clone(&h2));
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 * 1024 {
                        match tokio::time::timeout_at(deadline, c.read(&mut chunk)).await {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    lock(&h).push(String::from_utf8_lossy(&buf).into_owned());
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                        name.len()
                    );
                    if c.write_all(resp.as_bytes()).await.is_ok() {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = c.shutdown().await;
                });
            }
        });
        Origin { addr, stop, served, heads }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    fn heads(&self) -> Vec<String> {
        lock(&self.heads).clone()
    }
}

/// Two loopback addresses, `127.0.0.a` and `127.0.0.b`, with one port free on both.
async fn two_addresses(a: u8, b: u8) -> (SocketAddr, SocketAddr) {
    for _ in 0..20 {
        let probe = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, a], 0))).expect("bind probe");
        let port = probe.local_addr().expect("probe address").port();
        drop(probe);
        let (x, y) = (SocketAddr::from(([127, 0, 0, a], port)), SocketAddr::from(([127, 0, 0, b], port)));
        if std::net::TcpListener::bind(y).is_ok() && std::net::TcpListener::bind(x).is_ok() {
            return (x, y);
        }
    }
    panic!("no port free on both 127.0.0.{a} and 127.0.0.{b}");
}

fn config(routes: &str) -> String {
    format!(
        "[proxy]\nlisten = \"{{PROXY}}\"\nupstream_dns_refresh_min = \"1s\"\nupstream_dns_refresh_max = \"1s\"\nupstream_connect_timeout = \"1s\"\n[admin]\nlisten = \"{{ADMIN}}\"\n{routes}"
    )
}

fn route(name: &str, prefix: &str, upstream: &str, extra: &str) -> String {
    format!("\n[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{upstream}\"\n{extra}\n")
}

/// `n` requests in a row; (status, body) of each.
async fn send(tg: &Tollgate, path: &str, n: usize) -> Vec<(u16, String)> {
    let c = client();
    let mut out = Vec::new();
    for _ in 0..n {
        match c.get(tg.url(path)).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                out.push((status, r.text().await.unwrap_or_default()));
            }
            Err(e) => out.push((0, e.to_string())),
        }
    }
    out
}

/// The host's address moves from 127.0.0.2 to 127.0.0.3 and the old address stops
/// answering: after one re-resolution interval (the 1 s TTL), no request fails.
#[tokio::test]
async fn an_upstream_whose_address_changes_is_followed() {
    let dns = Dns::start().await;
    let (old_addr, new_addr) = two_addresses(2, 3).await;
    let old = Origin::start(old_addr, "old").await;
    dns.set("api.tollgate.test", &[Ipv4Addr::new(127, 0, 0, 2)]);
    let upstream = format!("http://api.tollgate.test:{}", old_addr.port());
    let (k, v) = dns.env();
    let tg = Tollgate::start_with_env(&config(&route("api", "/", &upstream, "")), &[(k, &v)]);
    tg.wait_healthy().await;

    let before = send(&tg, "/a", 5).await;
    assert!(before.iter().all(|(s, b)| *s == 200 && b == "old"), "{before:?}\nlogs:\n{}", tg.logs());

    // The move: the name now points elsewhere and the old address refuses connections.
    let new = Origin::start(new_addr, "new").await;
    dns.set("api.tollgate.test", &[Ipv4Addr::new(127, 0, 0, 3)]);
    let _ = old.stop.send(());
    let moved = Instant::now();
    // One re-resolution interval (TTL 1 s, floor and ceiling 1 s), plus slack for the
    // resolver's round trip.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let after = send(&tg, "/b", 40).await;
    let failed: Vec<_> = after.iter().filter(|(s, b)| *s != 200 || b != "new").collect();
    assert!(failed.is_empty(), "{} of 40 failed after the move: {failed:?}\nlogs:\n{}", failed.len(), tg.logs());
    assert_eq!(new.served(), 40);
    assert!(moved.elapsed() < Duration::from_secs(30));
    assert!(tg.logs().contains("upstream host resolved to new addresses"), "logs:\n{}", tg.logs());
}

/// A name with two addresses, one of which refuses connections: every request succeeds
/// (connect errors fail over to the other address), whatever the order of the answer.
#[tokio::test]
async fn every_address_is_used_and_a_refused_connection_fails_over() {
    let dns = Dns::start().await;
    let (dead_addr, live_addr) = two_addresses(4, 5).await;
    let live = Origin::start(live_addr, "live").await;
    dns.set("multi.tollgate.test", &[Ipv4Addr::new(127, 0, 0, 4), Ipv4Addr::new(127, 0, 0, 5)]);
    let upstream = format!("http://multi.tollgate.test:{}", dead_addr.port());
    let (k, v) = dns.env();
    let tg = Tollgate::start_with_env(&config(&route("api", "/", &upstream, "")), &[(k, &v)]);
    tg.wait_healthy().await;

    let got = send(&tg, "/x", 20).await;
    let failed: Vec<_> = got.iter().filter(|(s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "{failed:?}\nlogs:\n{}", tg.logs());
    assert_eq!(live.served(), 20);
}

/// A name with an IPv4 address that refuses and an IPv6 one that answers (both
/// loopback): every request succeeds over IPv6. Skipped where the host has no `::1`.
#[tokio::test]
async fn ipv6_addresses_are_used_too() {
    let Ok(listener) = TcpListener::bind("[::1]:0").await else {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    };
    let dns = Dns::start().await;
    let v6 = Origin::on(listener, "v6");
    let port = v6.addr.port();
    dns.set_any("dual.tollgate.test", &[IpAddr::from([127, 0, 0, 10]), IpAddr::from(std::net::Ipv6Addr::LOCALHOST)]);
    let (k, v) = dns.env();
    let tg = Tollgate::start_with_env(
        &config(&route("api", "/", &format!("http://dual.tollgate.test:{port}"), "")),
        &[(k, &v)],
    );
    tg.wait_healthy().await;
    let got = send(&tg, "/x", 10).await;
    let failed: Vec<_> = got.iter().filter(|(s, b)| *s != 200 || b != "v6").collect();
    assert!(failed.is_empty(), "{failed:?}\nlogs:\n{}", tg.logs());
    assert_eq!(v6.served(), 10);
}

/// DNS stops answering, then the config is reloaded: the reload applies (a changed header
/// reaches the upstream through the last good answer), and a route to a name that has
/// not resolved yet answers 502 JSON until DNS is back, then works, with no restart.
#[tokio::test]
async fn a_reload_while_dns_is_down_still_applies() {
    let dns = Dns::start().await;
    let (a_addr, b_addr) = two_addresses(6, 7).await;
    let a = Origin::start(a_addr, "a").await;
    let b = Origin::start(b_addr, "b").await;
    dns.set("a.tollgate.test", &[Ipv4Addr::new(127, 0, 0, 6)]);
    let port = a_addr.port();
    let cfg =
        config(&route("a", "/a", &format!("http://a.tollgate.test:{port}"), "set_headers = { \"X-Gen\" = \"1\" }"));
    let (k, v) = dns.env();
    let tg = Tollgate::start_with_env(&cfg, &[(k, &v)]);
    tg.wait_healthy().await;
    assert!(send(&tg, "/a/1", 1).await.iter().all(|(s, _)| *s == 200), "logs:\n{}", tg.logs());

    dns.down.store(true, Ordering::SeqCst);
    let queries = dns.queries.load(Ordering::SeqCst);
    // Let the background resolution run into the outage at least once.
    let deadline = Instant::now() + Duration::from_secs(10);
    while dns.queries.load(Ordering::SeqCst) == queries && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let next = tg.config_text().replace("\"X-Gen\" = \"1\"", "\"X-Gen\" = \"2\"")
        + &route("b", "/b", &format!("http://b.tollgate.test:{port}"), "");
    tg.write_config(&next);
    let m = tg.sighup_reload().await;
    assert!(metric_value(&m, "tollgate_config_reload_total{outcome=\"rejected\"}") == 0.0, "logs:\n{}", tg.logs());
    // (The file watcher may reload too: at least one success, no rejection.)
    assert!(metric_value(&m, "tollgate_config_reload_total{outcome=\"success\"}") >= 1.0, "{m}");

    let got = send(&tg, "/a/2", 5).await;
    assert!(got.iter().all(|(s, body)| *s == 200 && body == "a"), "{got:?}\nlogs:\n{}", tg.logs());
    let heads = a.heads();
    assert!(heads.last().is_some_and(|h| h.to_ascii_lowercase().contains("x-gen: 2")), "{heads:?}");

    let r = client().get(tg.url("/b/1")).send().await.expect("request");
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.expect("JSON body");
    assert_eq!(body["error"], "bad_gateway", "{body}");
    assert_eq!(b.served(), 0);

    // DNS is back: the new route works within a few re-resolution intervals.
    dns.set("b.tollgate.test", &[Ipv4Addr::new(127, 0, 0, 7)]);
    dns.down.store(false, Ordering::SeqCst);
    // (A lookup already waiting on the dead server times out first: up to ~10 s.)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = send(&tg, "/b/2", 1).await;
        if got[0].0 == 200 {
            assert_eq!(got[0].1, "b");
            break;
        }
        assert!(Instant::now() < deadline, "the new route never resolved: {got:?}\nlogs:\n{}", tg.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A host that does not resolve at start does not stop tollgate: its route answers 502
/// JSON, other routes serve.
#[tokio::test]
async fn a_host_that_does_not_resolve_at_start_does_not_stop_tollgate() {
    let dns = Dns::start().await;
    let (a_addr, _) = two_addresses(8, 9).await;
    let a = Origin::start(a_addr, "a").await;
    let routes = route("a", "/a", &format!("http://127.0.0.8:{}", a_addr.port()), "")
        + &route("gone", "/gone", "http://gone.tollgate.test:9", "");
    let (k, v) = dns.env();
    let tg = Tollgate::start_with_env(&config(&routes), &[(k, &v)]);
    tg.wait_healthy().await;
    let r = client().get(tg.url("/gone/x")).send().await.expect("request");
    assert_eq!(r.status(), 502, "logs:\n{}", tg.logs());
    let got = send(&tg, "/a/x", 3).await;
    assert!(got.iter().all(|(s, _)| *s == 200), "{got:?}");
    assert_eq!(a.served(), 3);
}
