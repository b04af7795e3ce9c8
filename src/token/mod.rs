//! Tokens once obtained: the cell the request path reads, the state machine that
//! decides a provider's life and the driver that carries out its decisions, and the pure
//! schedule and expiry rules they follow.

pub mod cell;
mod coordinate;
pub mod driver;
pub mod expiry;
pub mod machine;
pub mod schedule;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;

pub use cell::{Attempt, ProviderState, Suspicion, TokenCell, Unavailable};
pub use expiry::Lifetime;

/// A token ready for injection. Built once per token by the refresher, so the request
/// path only clones a pre-built, sensitive-marked `HeaderValue` (a reference-count bump).
#[derive(Debug)]
pub struct ActiveToken {
    pub header: HeaderValue,
    pub generation: u64,
    pub issued_at: SystemTime,
    pub lifetime: Lifetime,
    /// Wall-clock expiry, for metrics and the admin API.
    pub expires_at: Option<SystemTime>,
    /// Monotonic instant after which the token is no longer injected: expiry minus the
    /// expiry margin, so that a token cannot expire while a request is in flight.
    pub usable_until: Option<Instant>,
    /// The same moment on the wall clock. The monotonic clock stops while the host
    /// sleeps (a laptop, a Docker Desktop VM, a paused container); the wall clock does
    /// not, so after a wake-up this is what says the token is spent.
    pub usable_until_wall: Option<SystemTime>,
    pub scope: Option<String>,
    pub extras: BTreeMap<String, String>,
    /// Extra headers for the upstream (provider `upstream_headers`), pre-rendered.
    pub upstream_headers: Vec<(http::HeaderName, HeaderValue)>,
    /// Set for a DPoP-bound token: every request then carries a fresh proof.
    pub dpop: Option<DpopBinding>,
}

/// What a DPoP proof for a request needs of its token (RFC 9449 section 7), prepared
/// once per token so that the request path only signs.
pub struct DpopBinding {
    /// The key the token is bound to (its thumbprint is the token's `cnf.jkt`).
    pub key: std::sync::Arc<crate::jose::dpop::DpopKey>,
    /// base64url(SHA-256(access token)): the proof's `ath`.
    pub ath: String,
}

impl std::fmt::Debug for DpopBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopBinding").field("jkt", &self.key.thumbprint()).finish_non_exhaustive()
    }
}

impl ActiveToken {
    /// Build from a raw token. `None` when the token cannot form a header value (control
    /// characters), which the refresher counts as a malformed response.
    /// `elapsed` is how long ago the token was issued (non-zero for a restored token).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        token: &str,
        prefix: &str,
        generation: u64,
        lifetime: Lifetime,
        elapsed: Duration,
        margin: Duration,
        scope: Option<String>,
        extras: BTreeMap<String, String>,
        upstream_headers: Vec<(http::HeaderName, HeaderValue)>,
    ) -> Option<Self> {
        let mut value = zeroize::Zeroizing::new(String::with_capacity(prefix.len() + token.len()));
        value.push_str(prefix);
        value.push_str(token);
        let mut header = HeaderValue::from_bytes(value.as_bytes()).ok()?;
        header.set_sensitive(true);
        // Promote the header's storage to shared once here, so that clones on the request
        // path are reference-count bumps and never allocate.
        drop(header.clone());
        let issued_at = SystemTime::now() - elapsed;
        let now = Instant::now();
        let (expires_at, usable_until, usable_until_wall) = match lifetime {
            Lifetime::Never => (None, None, None),
            Lifetime::Finite(l) => {
                // Never let the margin eat more than a quarter of a short token's life.
                let margin = margin.min(l / 4);
                let left = l.saturating_sub(elapsed).saturating_sub(margin);
                (Some(issued_at + l), Some(now + left), Some(SystemTime::now() + left))
            }
        };
        Some(ActiveToken {
            header,
            generation,
            issued_at,
            lifetime,
            expires_at,
            usable_until,
            usable_until_wall,
            scope,
            extras,
            upstream_headers,
            dpop: None,
        })
    }

    /// Whether the token may be injected now.
    #[inline]
    pub fn usable(&self) -> bool {
        self.usable_until.is_none() || self.usable_at(Instant::now(), SystemTime::now())
    }

    /// Whether the token may be injected at these clock readings: both the monotonic and
    /// the wall clock must agree that it is still good.
    #[inline]
    pub fn usable_at(&self, mono: Instant, wall: SystemTime) -> bool {
        self.usable_until.is_none_or(|t| mono < t) && self.usable_until_wall.is_none_or(|t| wall < t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(life: u64) -> ActiveToken {
        let life = Lifetime::Finite(Duration::from_secs(life));
        ActiveToken::new(
            "t",
            "Bearer ",
            1,
            life,
            Duration::ZERO,
            Duration::from_secs(5),
            None,
            Default::default(),
            vec![],
        )
        .expect("valid header")
    }

    #[test]
    fn a_suspend_longer_than_the_token_life_is_seen_through_the_wall_clock() {
        let t = token(60);
        let (mono, wall) = (Instant::now(), SystemTime::now());
        assert!(t.usable_at(mono, wall));
        // The host slept two minutes: the monotonic clock stood still, the wall clock moved.
        assert!(!t.usable_at(mono, wall + Duration::from_secs(120)), "an expired token would be injected");
        // And the usual case: both moved past the usable time.
        assert!(!t.usable_at(mono + Duration::from_secs(56), wall + Duration::from_secs(56)));
        assert!(t.usable_at(mono + Duration::from_secs(50), wall + Duration::from_secs(50)));
    }

    #[test]
    fn a_token_that_never_expires_ignores_both_clocks() {
        let t = ActiveToken::new(
            "t",
            "Bearer ",
            1,
            Lifetime::Never,
            Duration::ZERO,
            Duration::ZERO,
            None,
            Default::default(),
            vec![],
        )
        .expect("valid header");
        assert!(t.usable_at(Instant::now(), SystemTime::now() + Duration::from_secs(10_000_000)));
        assert!(t.usable());
    }
}
