//! Idle upstream connections, per worker thread. pingora's runtime does not steal work
//! (`work_stealing: false`), so a client connection's task, and every upstream
//! connection it checks out, stays on one thread: no lock, no `Arc<Mutex<_>>`, and no
//! watcher task per returned connection (pingora's pool spawns one per release, the
//! ~11k instructions issue 13 measured).
//!
//! Instead, liveness is tested when a connection is taken (pingora's own test: a read
//! that would not block means the far end closed it or sent something unasked), and one
//! lazily spawned timer per thread drops connections whose idle deadline passed, so the
//! far end sees them closed by us before its own idle timeout forgets them. The timer
//! stops when the thread's pool is empty and starts again with the next return.
//!
//! The borrow of the thread's pool is never held across an `.await`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use pingora::protocols::Stream;
use tokio::io::AsyncReadExt;

/// How often the per-thread timer looks for connections past their idle deadline: a
/// connection is closed at most this long after `upstream_idle_timeout` ran out.
const TICK: Duration = Duration::from_secs(1);

/// Which idle connections may carry a request: the same address, and the same
/// everything else that was fixed when the connection was made (scheme, SNI, client
/// certificate, verification, CA), summarised once per route entry in `peer`
/// ([`super::upstream::peer_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolKey {
    peer: u64,
    addr: SocketAddr,
    /// `peer` and `addr` mixed, the map's whole hash (see [`KeyHasher`]).
    mixed: u64,
}

impl PoolKey {
    pub fn new(peer: u64, addr: SocketAddr) -> Self {
        let ip = match addr.ip() {
            std::net::IpAddr::V4(v4) => u64::from(u32::from(v4)),
            std::net::IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                (bits as u64) ^ ((bits >> 64) as u64)
            }
        };
        let m = (ip << 16 | u64::from(addr.port())).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        PoolKey { peer, addr, mixed: peer ^ m.rotate_left(29) }
    }
}

impl Hash for PoolKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.mixed);
    }
}

/// The key is a hash already: the map uses it as is instead of SipHashing it again on
/// every request.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `PoolKey`; this keeps any other use correct.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// What the settings say about keeping connections, read by the caller per request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `proxy.upstream_idle_timeout`.
    pub idle_timeout: Duration,
    /// Idle connections kept on this thread, all keys together.
    pub cap: usize,
}

struct Idle {
    stream: Stream,
    /// Dropped at or after this instant.
    expires: Instant,
    /// When it was returned, to find the oldest when the thread's pool is full.
    since: Instant,
}

/// One thread's idle connections; the newest of each key is at the end (taken first:
/// it is the least likely to have been closed by the far end).
#[derive(Default)]
pub(super) struct Pool {
    idle: HashMap<PoolKey, Vec<Idle>, BuildHasherDefault<KeyHasher>>,
    count: usize,
    ticking: bool,
}

impl Pool {
    /// The newest live connection for `key`; dead and expired ones met on the way are
    /// dropped.
    pub(super) fn take(&mut self, key: &PoolKey, now: Instant) -> Option<Stream> {
        let idle = self.idle.get_mut(key)?;
        let mut found = None;
        while let Some(mut i) = idle.pop() {
            self.count -= 1;
            if i.expires > now && usable(&mut i.stream) {
                found = Some(i.stream);
                break;
            }
        }
        // An emptied list stays (the timer's sweep removes it): the connection usually
        // comes back at the end of this request, and its list's allocation with it.
        found
    }

    /// Keep `stream` for `key` until `now + idle_timeout`. When the thread holds `cap`
    /// connections already, the oldest one (of any key) makes room, as in pingora's LRU.
    pub(super) fn put(&mut self, key: PoolKey, stream: Stream, limits: Limits, now: Instant) {
        if limits.cap == 0 || limits.idle_timeout.is_zero() {
            return;
        }
        while self.count >= limits.cap && self.drop_oldest() {}
        let expires = now + limits.idle_timeout;
        self.idle.entry(key).or_default().push(Idle { stream, expires, since: now });
        self.count += 1;
    }

    /// Drop every connection whose deadline passed.
    pub(super) fn evict(&mut self, now: Instant) {
        let mut dropped = 0;
        self.idle.retain(|_, idle| {
            let before = idle.len();
            idle.retain(|i| i.expires > now);
            dropped += before - idle.len();
            !idle.is_empty()
        });
        self.count -= dropped;
    }

    pub(super) fn len(&self) -> usize {
        self.count
    }

    fn drop_oldest(&mut self) -> bool {
        let oldest = self
            .idle
            .iter()
            .filter_map(|(k, idle)| idle.first().map(|i| (i.since, *k)))
            .min_by_key(|(since, _)| *since)
            .map(|(_, k)| k);
        let Some(key) = oldest else { return false };
        if let Some(idle) = self.idle.get_mut(&key) {
            idle.remove(0);
            self.count -= 1;
            if idle.is_empty() {
                self.idle.remove(&key);
            }
        }
        true
    }
}

/// pingora's reuse test (`connectors::test_reusable_stream`): a read that completes at
/// once found either the end of the stream, an error, or bytes nobody asked for. A TLS
/// stream may consume a post-handshake message (a session ticket) here and still be
/// pending: that is a live connection.
fn usable(stream: &mut Stream) -> bool {
    let mut probe = [0u8; 1];
    tokio::task::unconstrained(stream.read(&mut probe)).now_or_never().is_none()
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// This thread's newest live idle connection for `key` (`now`: the request's start).
pub fn checkout(key: &PoolKey, now: Instant) -> Option<Stream> {
    POOL.with(|p| p.borrow_mut().take(key, now))
}

/// Keep `stream` (after an exchange that both sides left open and complete) for reuse on
/// this thread, and make sure this thread's eviction timer runs.
pub fn checkin(key: PoolKey, stream: Stream, limits: Limits, now: Instant) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.put(key, stream, limits, now);
        if p.len() > 0 && !p.ticking {
            p.ticking = start_ticker();
        }
    });
}

/// One task per thread, spawned on the current thread's runtime (pingora's runtimes are
/// one per thread), alive while this thread has idle connections.
fn start_ticker() -> bool {
    let Ok(handle) = tokio::runtime::Handle::try_current() else { return false };
    handle.spawn(async {
        loop {
            tokio::time::sleep(TICK).await;
            let left = POOL.with(|p| {
                let mut p = p.borrow_mut();
                p.evict(Instant::now());
                if p.len() == 0 {
                    p.ticking = false;
                }
                p.len()
            });
            if left == 0 {
                break;
            }
        }
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, DuplexStream};

    fn key(peer: u64, port: u16) -> PoolKey {
        PoolKey::new(peer, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// A pooled end and the far end, which the test keeps (dropping it closes the pair).
    fn pair() -> (Stream, DuplexStream) {
        let (a, b) = tokio::io::duplex(64);
        (Box::new(a), b)
    }

    const LIMITS: Limits = Limits { idle_timeout: Duration::from_secs(10), cap: 8 };

    #[tokio::test]
    async fn keys_differ_by_peer_and_by_address() {
        assert_eq!(key(1, 80), key(1, 80));
        assert_ne!(key(1, 80), key(2, 80));
        assert_ne!(key(1, 80), key(1, 81));
        let v6 = PoolKey::new(1, "[::1]:80".parse().unwrap());
        assert_ne!(v6, key(1, 80));
        let (mut p, now) = (Pool::default(), Instant::now());
        let (s, _far) = pair();
        p.put(key(1, 80), s, LIMITS, now);
        assert!(p.take(&key(2, 80), now).is_none(), "another peer's connection is never handed out");
        assert!(p.take(&key(1, 81), now).is_none());
        assert!(p.take(&key(1, 80), now).is_some());
        assert_eq!(p.len(), 0);
    }

    #[tokio::test]
    async fn the_newest_live_connection_is_taken_and_dead_ones_are_dropped() {
        let (mut p, now) = (Pool::default(), Instant::now());
        let (old, _old_far) = pair();
        let (closed, closed_far) = pair();
        let (chatty, mut chatty_far) = pair();
        p.put(key(1, 80), old, LIMITS, now);
        p.put(key(1, 80), closed, LIMITS, now);
        p.put(key(1, 80), chatty, LIMITS, now);
        drop(closed_far);
        chatty_far.write_all(b"x").await.unwrap();
        assert_eq!(p.len(), 3);
        // The newest two are unusable (bytes nobody asked for; closed): the oldest is left.
        let mut got = p.take(&key(1, 80), now).expect("the live one");
        assert_eq!(p.len(), 0);
        assert!(usable(&mut got));
        assert!(p.take(&key(1, 80), now).is_none());
    }

    #[tokio::test]
    async fn expired_connections_are_never_taken_and_are_evicted() {
        let (mut p, now) = (Pool::default(), Instant::now());
        let short = Limits { idle_timeout: Duration::from_millis(100), ..LIMITS };
        let (a, _fa) = pair();
        let (b, _fb) = pair();
        p.put(key(1, 80), a, short, now);
        p.put(key(2, 80), b, LIMITS, now);
        let later = now + Duration::from_millis(100);
        assert!(p.take(&key(1, 80), later).is_none(), "deadline reached");
        p.evict(later);
        assert_eq!(p.len(), 1);
        p.evict(now + Duration::from_secs(10));
        assert_eq!(p.len(), 0);
        assert!(p.idle.is_empty());
    }

    #[tokio::test]
    async fn a_full_pool_drops_its_oldest_connection() {
        let (mut p, now) = (Pool::default(), Instant::now());
        let two = Limits { cap: 2, ..LIMITS };
        let mut far = Vec::new();
        for (i, port) in [80u16, 81, 82].into_iter().enumerate() {
            let (s, f) = pair();
            far.push(f);
            p.put(key(1, port), s, two, now + Duration::from_millis(i as u64));
        }
        assert_eq!(p.len(), 2);
        assert!(p.take(&key(1, 80), now).is_none(), "the oldest made room");
        assert!(p.take(&key(1, 81), now).is_some());
        assert!(p.take(&key(1, 82), now).is_some());
        let (s, _f) = pair();
        p.put(key(1, 80), s, Limits { cap: 0, ..LIMITS }, now);
        assert_eq!(p.len(), 0, "a zero cap keeps nothing");
    }

    /// Real time (about 1.2 s): the pool's deadlines are `std` instants.
    #[tokio::test]
    async fn the_thread_timer_closes_idle_connections_and_stops_when_empty() {
        let (s, mut far) = pair();
        let limits = Limits { idle_timeout: Duration::from_millis(200), cap: 8 };
        checkin(key(9, 9), s, limits, Instant::now());
        assert!(POOL.with(|p| p.borrow().ticking));
        // The far end sees the close once the deadline passed and a tick came by.
        let mut buf = [0u8; 1];
        let started = Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(5), far.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0))), "{n:?}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200) && waited <= TICK + Duration::from_millis(500), "{waited:?}");
        // The tick that emptied the pool was the timer's last.
        assert!(POOL.with(|p| !p.borrow().ticking && p.borrow().len() == 0));
    }
}
