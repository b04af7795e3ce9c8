//! When to refresh and how long to back off, as pure functions of durations and a random
//! number, so the schedule is unit-tested without clocks (as linkerd2-proxy's identity
//! client does with `refresh_in`).

use std::time::Duration;

/// How long to wait before refreshing a token that lives `lifetime` in total and has
/// `remaining` left.
///
/// The token is refreshed once `remaining` drops to the larger of 20 % of its lifetime
/// and `refresh_before`, but never later than half-way (so a short-lived token with a
/// long `refresh_before` is not refreshed in a tight loop). `jitter` in `[0, 1)` moves
/// the moment earlier by up to 10 % of the lifetime, so a fleet of replicas that started
/// together does not refresh in lockstep.
pub fn refresh_in(lifetime: Duration, remaining: Duration, refresh_before: Duration, jitter: f64) -> Duration {
    let lifetime_s = lifetime.as_secs_f64();
    let threshold = (lifetime_s * 0.2).max(refresh_before.as_secs_f64()).min(lifetime_s * 0.5);
    let spread = lifetime_s * 0.1 * jitter.clamp(0.0, 1.0);
    let wait = remaining.as_secs_f64() - threshold - spread;
    if wait <= 0.0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(wait)
    }
}

/// Exponential backoff with jitter after `failures` consecutive failures (1 = first).
///
/// The ceiling doubles from `min` up to `max`; the wait is drawn uniformly between `min`
/// and that ceiling ("full jitter" above a floor), so an outage does not turn every
/// replica into a synchronised retry storm and the IdP is never hit faster than `min`.
pub fn backoff(failures: u32, min: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let ceiling = min.saturating_mul(1u32 << exp).min(max).max(min);
    let span = ceiling.saturating_sub(min).as_secs_f64() * jitter.clamp(0.0, 1.0);
    min + Duration::from_secs_f64(span)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn refreshes_at_80_percent_by_default() {
        // 3600 s token, refresh_before 60 s: 20 % (720 s) wins.
        assert_eq!(refresh_in(S(3600), S(3600), S(60), 0.0), S(2880));
    }

    #[test]
    fn refresh_before_wins_when_larger() {
        // 1800 s token (Thrill-ID), refresh_before 600 s > 360 s.
        assert_eq!(refresh_in(S(1800), S(1800), S(600), 0.0), S(1200));
    }

    #[test]
    fn short_tokens_refresh_half_way_not_immediately() {
        // 3 s token with the default 60 s refresh_before: clamp to half the lifetime.
        assert_eq!(refresh_in(S(3), S(3), S(60), 0.0), Duration::from_millis(1500));
    }

    #[test]
    fn jitter_moves_earlier_by_at_most_ten_percent() {
        let no = refresh_in(S(1000), S(1000), S(0), 0.0);
        let full = refresh_in(S(1000), S(1000), S(0), 0.999_999);
        assert!(full < no && no - full <= S(100));
    }

    #[test]
    fn overdue_token_refreshes_now() {
        assert_eq!(refresh_in(S(3600), S(10), S(60), 0.5), Duration::ZERO);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let min = Duration::from_millis(500);
        let max = S(60);
        assert_eq!(backoff(1, min, max, 0.0), min);
        assert_eq!(backoff(1, min, max, 1.0), min);
        assert_eq!(backoff(3, min, max, 1.0), S(2));
        assert_eq!(backoff(40, min, max, 1.0), max);
        assert!(backoff(40, min, max, 0.0) >= min);
    }
}
