//! Idle upstream connections, per worker thread (pingora's runtime does not steal work,
//! so a connection task stays on its thread): no lock, no watcher task per release.
//!
//! PROTOTYPE: plain TCP only (keyed by address); an idle connection past
//! `upstream_idle_timeout` is dropped lazily when met at checkout (no eviction timer yet).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use pingora::protocols::Stream;
use tokio::io::AsyncReadExt;

thread_local! {
    static POOL: RefCell<HashMap<SocketAddr, Vec<(Stream, Instant)>>> = RefCell::new(HashMap::new());
}

/// The most recently returned live connection to `addr`. A connection the upstream has
/// closed, or that has bytes waiting (it cannot be in a clean state), is dropped; the test
/// is pingora's own: a read that would not block means it is unusable.
pub fn checkout(addr: SocketAddr, idle_timeout: Duration) -> Option<Stream> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let idle = p.get_mut(&addr)?;
        while let Some((mut s, since)) = idle.pop() {
            if since.elapsed() >= idle_timeout {
                continue;
            }
            let mut probe = [0u8; 1];
            let pending = tokio::task::unconstrained(s.read(&mut probe)).now_or_never().is_none();
            if pending {
                return Some(s);
            }
        }
        None
    })
}

/// Keep `s` (after a complete exchange that both sides left open) for reuse, up to `cap`
/// idle connections per address on this thread.
pub fn checkin(addr: SocketAddr, s: Stream, cap: usize) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let idle = p.entry(addr).or_default();
        if idle.len() < cap {
            idle.push((s, Instant::now()));
        }
    });
}
