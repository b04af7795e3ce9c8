//! The `Date` field of every answer, from a per-thread cache keyed by the monotonic
//! instant the request already read: the wall clock is read once per second, not per
//! answer (pingora's `get_cached_date` reads it every time, and clones a `HeaderValue`).

use std::cell::RefCell;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110 §5.6.7, IMF-fixdate): always 29 bytes.
const LEN: usize = 29;

struct Cached {
    /// The text is right until this instant (the next second of the wall clock).
    until: Option<Instant>,
    text: [u8; LEN],
}

thread_local! {
    static CACHED: RefCell<Cached> = const { RefCell::new(Cached { until: None, text: [b' '; LEN] }) };
}

/// Append the IMF-fixdate of the wall clock at `now` to `out`.
pub fn push(out: &mut Vec<u8>, now: Instant) {
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.until.is_none_or(|until| now >= until) {
            let wall = SystemTime::now();
            let text = httpdate::fmt_http_date(wall);
            if text.len() == LEN {
                c.text.copy_from_slice(text.as_bytes());
            }
            let into_second = wall.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
            c.until = Some(now + (Duration::from_secs(1) - Duration::from_nanos(u64::from(into_second))));
        }
        out.extend_from_slice(&c.text);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cached_date_is_the_wall_clocks_second() {
        let mut out = Vec::new();
        let before = httpdate::fmt_http_date(SystemTime::now());
        push(&mut out, Instant::now());
        let after = httpdate::fmt_http_date(SystemTime::now());
        let got = String::from_utf8(out).expect("ascii");
        assert!(got == before || got == after, "{got} is neither {before} nor {after}");
        assert!(httpdate::parse_http_date(&got).is_ok());
        // A second later (by the monotonic clock) the text is made again.
        let mut later = Vec::new();
        push(&mut later, Instant::now() + Duration::from_secs(2));
        assert_eq!(later.len(), LEN);
    }
}
