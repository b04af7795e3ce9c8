//! Upstream addresses that follow DNS.
//!
//! An upstream named by host name is resolved in the background on the control runtime,
//! again whenever the answer's TTL runs out (clamped to `proxy.upstream_dns_refresh_min`
//! and `…_max`), so that an upstream behind a load balancer or CDN whose addresses rotate
//! keeps being reached. Every address of the answer (IPv4 and IPv6) is kept; a request
//! starts at the next one in turn and fails over to the others on a connect error, and an
//! address that refused a connection is skipped for [`DOWN_FOR`] while others remain.
//! When a resolution fails, the last good answer stays in use; a host that has never
//! resolved makes its route answer 502 until it does. DNS never fails a start or a reload.
//!
//! The request path reads the current answer through `ArcSwap`: it never waits for DNS
//! and takes no lock. The registry below is locked only while a configuration is built.
//!
//! Upstreams are shared by host and port across routes and across reloads: a reload
//! keeps the last good answer of every upstream it still uses (and asks for a fresh one
//! at once), so a DNS outage during a reload changes nothing for them.
//!
//! Name servers are those of `/etc/resolv.conf` (search domains, `ndots`, `timeout` and
//! `attempts` included) and `/etc/hosts` is honoured. The environment variable
//! [`DNS_SERVERS_ENV`] replaces the name servers (a comma-separated list of `ip` or
//! `ip:port`), read once at start: for a resolver on a non-standard port, and for the
//! tests' DNS double. Without a readable resolv.conf, the system's `getaddrinfo` is used,
//! re-resolving every `upstream_dns_refresh_max` (it reports no TTL).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::config::Settings;

/// Replaces the name servers of `/etc/resolv.conf`: `10.0.0.2,10.0.0.3:5353`.
pub const DNS_SERVERS_ENV: &str = "TOLLGATE_DNS_SERVERS";

/// How long an address that refused a connection is tried last.
pub const DOWN_FOR: Duration = Duration::from_secs(30);

/// How long building a configuration waits for the first answer of a host it has not
/// resolved before. After that the configuration applies anyway, and the route answers
/// 502 until the background resolution succeeds.
pub const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Bound on one resolution, whatever the resolver's own timeouts add up to.
const LOOKUP_BOUND: Duration = Duration::from_secs(15);

/// The addresses of one upstream host, current as of the latest good answer.
pub struct Upstream {
    host: String,
    current: ArcSwap<Snapshot>,
    /// Where the next request starts in the address list.
    turn: AtomicUsize,
    /// Wakes the background task: re-resolve now (a reload), or stop (drop).
    wake: Arc<Notify>,
    /// Whether the first resolution finished (well or not), for [`wait_first_answers`].
    first: Mutex<bool>,
    first_cv: Condvar,
}

struct Snapshot {
    addrs: Vec<Addr>,
}

struct Addr {
    ip: IpAddr,
    /// [`clock_ms`] until which this address is tried only when no other is left.
    down_until: AtomicU64,
}

/// What one request has tried so far (kept in the request's context).
#[derive(Debug, Default)]
pub struct Attempt {
    start: Option<usize>,
    tried: Vec<IpAddr>,
}

impl Upstream {
    fn new(host: &str, addrs: Vec<IpAddr>, resolved: bool) -> Self {
        Upstream {
            host: host.to_string(),
            current: ArcSwap::from_pointee(Snapshot::of(&addrs, None)),
            turn: AtomicUsize::new(0),
            wake: Arc::new(Notify::new()),
            first: Mutex::new(resolved),
            first_cv: Condvar::new(),
        }
    }

    /// An IP literal: nothing to resolve.
    pub fn fixed(ip: IpAddr) -> Arc<Self> {
        Arc::new(Self::new(&ip.to_string(), vec![ip], true))
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// The addresses in use now (empty: never resolved).
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.current.load().addrs.iter().map(|a| a.ip).collect()
    }

    /// The address for this request's next connection attempt: the next one in turn that
    /// this request has not tried, preferring addresses that have not refused a
    /// connection lately. `None`: no address (never resolved), or all of them tried.
    pub fn pick(&self, attempt: &mut Attempt) -> Option<IpAddr> {
        let snap = self.current.load();
        let n = snap.addrs.len();
        if n == 0 {
            return None;
        }
        let start = *attempt.start.get_or_insert_with(|| self.turn.fetch_add(1, Ordering::Relaxed));
        let now = clock_ms();
        let mut fallback = None;
        for k in 0..n {
            let a = &snap.addrs[(start + k) % n];
            if attempt.tried.contains(&a.ip) {
                continue;
            }
            if a.down_until.load(Ordering::Relaxed) <= now {
                return Some(a.ip);
            }
            fallback.get_or_insert(a.ip);
        }
        fallback
    }

    /// A connection to `ip` failed: mark it, and say whether another address is left to
    /// try for this request.
    pub fn connect_failed(&self, ip: IpAddr, attempt: &mut Attempt) -> bool {
        attempt.tried.push(ip);
        let snap = self.current.load();
        if let Some(a) = snap.addrs.iter().find(|a| a.ip == ip) {
            a.down_until.store(clock_ms() + DOWN_FOR.as_millis() as u64, Ordering::Relaxed);
        }
        let left = snap.addrs.iter().any(|a| !attempt.tried.contains(&a.ip));
        if left {
            debug!(host = %self.host, %ip, "connection to an upstream address failed; trying the next one");
        }
        left
    }

    /// A good answer: swap it in (keeping the marks of addresses that stay).
    fn apply(&self, ips: Vec<IpAddr>) {
        let old = self.current.load();
        if old.addrs.iter().map(|a| a.ip).eq(ips.iter().copied()) {
            return;
        }
        if old.addrs.is_empty() {
            info!(host = %self.host, addresses = ?ips, "upstream host resolved");
        } else {
            info!(host = %self.host, addresses = ?ips, previous = ?old.addrs.iter().map(|a| a.ip).collect::<Vec<_>>(), "upstream host resolved to new addresses");
        }
        self.current.store(Arc::new(Snapshot::of(&ips, Some(&old))));
    }

    fn first_done(&self) {
        let mut done = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if !*done {
            *done = true;
            self.first_cv.notify_all();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // The background task holds only a weak reference; wake it so that it ends now
        // rather than after its sleep.
        self.wake.notify_one();
    }
}

impl Snapshot {
    fn of(ips: &[IpAddr], previous: Option<&Snapshot>) -> Self {
        let mut addrs: Vec<Addr> = Vec::with_capacity(ips.len());
        for ip in ips {
            if addrs.iter().any(|a| a.ip == *ip) {
                continue;
            }
            let down = previous
                .and_then(|p| p.addrs.iter().find(|a| a.ip == *ip))
                .map(|a| a.down_until.load(Ordering::Relaxed))
                .unwrap_or(0);
            addrs.push(Addr { ip: *ip, down_until: AtomicU64::new(down) });
        }
        Snapshot { addrs }
    }
}

/// Milliseconds on the monotonic clock since the first call.
fn clock_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Live upstreams by host name (lower case) and port, and the refresh bounds of the current
/// configuration. Weak: an upstream no configuration uses any more is dropped, and its
/// task ends.
struct Registry {
    hosts: Mutex<HashMap<(String, u16), Weak<Upstream>>>,
    min_ms: AtomicU64,
    max_ms: AtomicU64,
}

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Registry {
        hosts: Mutex::new(HashMap::new()),
        min_ms: AtomicU64::new(5_000),
        max_ms: AtomicU64::new(300_000),
    })
}

/// The refresh bounds from the configuration being applied; they also apply to hosts
/// already followed, from their next resolution on.
pub fn set_refresh_bounds(min: Duration, max: Duration) {
    let r = registry();
    r.min_ms.store(min.as_millis().max(1) as u64, Ordering::Relaxed);
    r.max_ms.store(max.as_millis().max(1) as u64, Ordering::Relaxed);
}

fn refresh_bounds() -> (Duration, Duration) {
    let r = registry();
    let min = Duration::from_millis(r.min_ms.load(Ordering::Relaxed));
    let max = Duration::from_millis(r.max_ms.load(Ordering::Relaxed));
    (min, max.max(min))
}

/// The upstream for `host` (and `port`: an address that refused connections is marked
/// for that port only): an IP literal as it is; a name followed in the background on
/// `handle`. One already followed (by this configuration's other routes, or the one
/// being replaced) is shared, with its last good answer, and asked to re-resolve now.
/// Returns whether the upstream is new (not resolved yet).
pub fn follow(host: &str, port: u16, handle: &Handle) -> (Arc<Upstream>, bool) {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return (Upstream::fixed(ip), false);
    }
    let key = (host.to_ascii_lowercase(), port);
    let mut hosts = registry().hosts.lock().unwrap_or_else(|p| p.into_inner());
    hosts.retain(|_, w| w.strong_count() > 0);
    if let Some(up) = hosts.get(&key).and_then(Weak::upgrade) {
        up.wake.notify_one();
        return (up, false);
    }
    let up = Arc::new(Upstream::new(&key.0, Vec::new(), false));
    hosts.insert(key, Arc::downgrade(&up));
    handle.spawn(run(Arc::downgrade(&up), Arc::clone(&up.wake)));
    (up, true)
}

/// The upstream of each route of `settings`, in order: upstreams already followed keep
/// their last good answer; new ones get up to [`FIRST_ANSWER_WAIT`] for a first one.
/// Also applies the configuration's refresh bounds. Never fails: DNS is not a reason to
/// refuse a configuration.
pub fn upstreams_for(settings: &Settings, handle: &Handle) -> Vec<Arc<Upstream>> {
    set_refresh_bounds(settings.proxy.upstream_dns_refresh_min, settings.proxy.upstream_dns_refresh_max);
    let mut fresh = Vec::new();
    let all = settings
        .routes
        .iter()
        .map(|r| {
            let (up, new) = follow(&r.upstream.host, r.upstream.port, handle);
            if new {
                fresh.push(Arc::clone(&up));
            }
            up
        })
        .collect();
    wait_first_answers(&fresh, FIRST_ANSWER_WAIT);
    all
}

/// Wait, at most `bound` in all, until each of `upstreams` has had its first answer (or
/// failure). Called while a configuration is built, off the async runtime's workers.
pub fn wait_first_answers(upstreams: &[Arc<Upstream>], bound: Duration) {
    let deadline = Instant::now() + bound;
    for up in upstreams {
        let left = deadline.saturating_duration_since(Instant::now());
        let done = up.first.lock().unwrap_or_else(|p| p.into_inner());
        let (done, _) = up.first_cv.wait_timeout_while(done, left, |d| !*d).unwrap_or_else(|p| p.into_inner());
        if !*done {
            warn!(host = %up.host, "upstream host not resolved yet; its routes answer 502 until it is");
        }
    }
}

/// The background task of one host: resolve, sleep for the TTL (clamped), again; keep
/// the last good answer through failures. Ends when the upstream is dropped.
async fn run(weak: Weak<Upstream>, wake: Arc<Notify>) {
    let mut failing = false;
    loop {
        let Some(up) = weak.upgrade() else { return };
        let (min, max) = refresh_bounds();
        let outcome = match tokio::time::timeout(LOOKUP_BOUND, backend().lookup(&up.host)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} s", LOOKUP_BOUND.as_secs())),
        };
        let wait = match outcome {
            Ok((ips, ttl)) => {
                if failing {
                    info!(host = %up.host, "upstream host resolves again");
                    failing = false;
                }
                up.apply(ips);
                ttl.unwrap_or(max).clamp(min, max)
            }
            Err(error) => {
                let kept = up.current.load().addrs.len();
                if !failing {
                    if kept > 0 {
                        warn!(host = %up.host, %error, kept, "cannot resolve upstream host; keeping the last answer");
                    } else {
                        warn!(host = %up.host, %error, "cannot resolve upstream host; its routes answer 502 until it resolves");
                    }
                    failing = true;
                } else {
                    debug!(host = %up.host, %error, kept, "upstream host still does not resolve");
                }
                min
            }
        };
        up.first_done();
        drop(up);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wake.notified() => {}
        }
    }
}

/// What resolves names: hickory with the system's (or [`DNS_SERVERS_ENV`]'s) name
/// servers, or `getaddrinfo` when no resolver configuration can be read. One per
/// process, built once: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Hickory(TokioResolver),
    System,
}

fn backend() -> &'static Backend {
    static B: OnceLock<Backend> = OnceLock::new();
    B.get_or_init(|| {
        let (config, mut opts) = match std::env::var(DNS_SERVERS_ENV) {
            Ok(list) if !list.trim().is_empty() => match parse_servers(&list) {
                Ok(servers) => {
                    info!(servers = ?servers, "upstream DNS: name servers from {DNS_SERVERS_ENV}");
                    let mut group = NameServerConfigGroup::new();
                    for s in servers {
                        group.merge(NameServerConfigGroup::from_ips_clear(&[s.ip()], s.port(), true));
                    }
                    (ResolverConfig::from_parts(None, Vec::new(), group), Default::default())
                }
                Err(bad) => {
                    warn!(value = %bad, "{DNS_SERVERS_ENV} holds an entry that is not `ip` or `ip:port`; using the system resolver configuration");
                    match hickory_resolver::system_conf::read_system_conf() {
                        Ok(c) => c,
                        Err(e) => return system_fallback(&e.to_string()),
                    }
                }
            },
            _ => match hickory_resolver::system_conf::read_system_conf() {
                Ok(c) => c,
                Err(e) => return system_fallback(&e.to_string()),
            },
        };
        // Every address of both families: the request path fails over between them.
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let mut b = TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
        *b.options_mut() = opts;
        Backend::Hickory(b.build())
    })
}

fn system_fallback(why: &str) -> Backend {
    warn!(error = %why, "cannot read the resolver configuration; upstream host names are resolved with getaddrinfo, without TTLs");
    Backend::System
}

/// `ip` or `ip:port` (`[v6]:port`), comma-separated; port 53 by default.
fn parse_servers(list: &str) -> Result<Vec<SocketAddr>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<SocketAddr>()
                .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| s.to_string())
        })
        .collect()
}

impl Backend {
    /// Every address of `host`, in the resolver's order, and how long the answer is valid.
    async fn lookup(&self, host: &str) -> Result<(Vec<IpAddr>, Option<Duration>), String> {
        match self {
            Backend::Hickory(r) => {
                let l = r.lookup_ip(host).await.map_err(|e| e.to_string())?;
                let ips: Vec<IpAddr> = l.iter().collect();
                if ips.is_empty() {
                    return Err("the answer holds no address".into());
                }
                Ok((ips, Some(l.valid_until().saturating_duration_since(Instant::now()))))
            }
            Backend::System => {
                let ips: Vec<IpAddr> =
                    tokio::net::lookup_host((host, 0)).await.map_err(|e| e.to_string())?.map(|a| a.ip()).collect();
                if ips.is_empty() {
                    return Err("the answer holds no address".into());
                }
                Ok((ips, None))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn requests_take_turns_and_fail_over_to_every_address() {
        let up = Upstream::new("h", vec![ip("127.0.0.2"), ip("::1"), ip("127.0.0.3")], true);
        let firsts: Vec<IpAddr> = (0..3).map(|_| up.pick(&mut Attempt::default()).expect("an address")).collect();
        assert_eq!(firsts, vec![ip("127.0.0.2"), ip("::1"), ip("127.0.0.3")]);
        // One request: each address once, then none.
        let mut a = Attempt::default();
        let mut seen = Vec::new();
        while let Some(x) = up.pick(&mut a) {
            seen.push(x);
            if !up.connect_failed(x, &mut a) {
                break;
            }
            assert!(seen.len() <= 3, "bounded");
        }
        seen.sort();
        assert_eq!(seen, vec![ip("127.0.0.2"), ip("127.0.0.3"), ip("::1")]);
        assert_eq!(up.pick(&mut a), None);
    }

    #[test]
    fn an_address_that_refused_is_tried_last_and_the_mark_survives_a_new_answer() {
        let up = Upstream::new("h", vec![ip("127.0.0.2"), ip("127.0.0.3")], true);
        let mut a = Attempt::default();
        assert!(up.connect_failed(ip("127.0.0.2"), &mut a));
        for _ in 0..4 {
            assert_eq!(up.pick(&mut Attempt::default()), Some(ip("127.0.0.3")));
        }
        up.apply(vec![ip("127.0.0.3"), ip("127.0.0.2"), ip("127.0.0.4")]);
        for _ in 0..6 {
            assert_ne!(up.pick(&mut Attempt::default()), Some(ip("127.0.0.2")));
        }
        // When every address refused lately, they are still tried.
        let mut a = Attempt::default();
        up.connect_failed(ip("127.0.0.3"), &mut a);
        up.connect_failed(ip("127.0.0.4"), &mut Attempt::default());
        assert_eq!(up.pick(&mut a).map(|x| x == ip("127.0.0.3")), Some(false));
    }

    #[test]
    fn never_resolved_has_no_address_and_duplicates_are_dropped() {
        let up = Upstream::new("h", Vec::new(), false);
        assert_eq!(up.pick(&mut Attempt::default()), None);
        up.apply(vec![ip("127.0.0.2"), ip("127.0.0.2"), ip("::1")]);
        assert_eq!(up.addresses(), vec![ip("127.0.0.2"), ip("::1")]);
    }

    #[test]
    fn dns_servers_parse() {
        assert_eq!(
            parse_servers("127.0.0.1:5353, 10.0.0.2,[::1]:53").expect("valid"),
            vec![
                "127.0.0.1:5353".parse::<SocketAddr>().expect("addr"),
                "10.0.0.2:53".parse().expect("addr"),
                "[::1]:53".parse().expect("addr")
            ]
        );
        assert_eq!(parse_servers("dns.example").unwrap_err(), "dns.example");
    }
}
