//! Timeouts without a timer operation per request.
//!
//! `tokio::time::timeout` reads the clock when it is made and, when the wrapped read
//! waits, inserts a timer into the runtime's wheel and takes it out again: two clock
//! reads and two wheel operations for every keep-alive wait and every upstream answer,
//! a few per cent of the fast path's CPU per request (perf, issue 13's benchmark).
//! nginx keeps one timer per connection and moves it lazily; so does this:
//!
//! - [`LazyDeadline`]: one timer per connection and purpose, registered once. A wait
//!   names its own deadline; the timer is only re-armed when it fires before that
//!   deadline (the deadline moved on since it was set), so in the steady state a timer
//!   fires at most once per timeout period, not per request.
//! - [`timeout_if_pending`]: a write that completes at once (nearly every answer) never
//!   reads the clock or makes a timer; only one that has to wait gets `tokio::time::timeout`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A connection's timer for one kind of wait (the next request head, the upstream's
/// answer). Made on first use.
#[derive(Default)]
pub struct LazyDeadline {
    sleep: Option<Pin<Box<Sleep>>>,
}

impl LazyDeadline {
    /// Ready once `deadline` has passed. The timer stays registered afterwards and
    /// between waits; a wait with a later deadline re-arms it only when it fires.
    pub fn poll_until(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // An earlier deadline than the timer holds (a reload shortened the timeout):
        // the timer must move back, once.
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if sleep.deadline() >= deadline {
                return Poll::Ready(());
            }
            // Fired for an older, earlier deadline: wait on for this one.
            sleep.as_mut().reset(deadline);
        }
    }
}

/// `fut`, bounded by `timeout` only if it does not complete on its first poll; the
/// `bool` says whether it had to wait.
pub async fn timeout_if_pending<F: Future>(
    timeout: Duration,
    fut: F,
) -> Result<(F::Output, bool), tokio::time::error::Elapsed> {
    let mut fut = std::pin::pin!(fut);
    let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(out) => Ok((out, false)),
        Poll::Pending => tokio::time::timeout(timeout, fut).await.map(|out| (out, true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_own_deadline_whatever_the_timer_held_before() {
        let mut d = LazyDeadline::default();
        let start = Instant::now();
        poll_fn(|cx| d.poll_until(cx, start + Duration::from_secs(5))).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // A later deadline: the fired timer is re-armed, the wait is not cut short.
        let second = Instant::now() + Duration::from_secs(60);
        poll_fn(|cx| d.poll_until(cx, second)).await;
        assert_eq!(Instant::now(), second);
        // An earlier deadline than the one the timer holds now: it moves back.
        let mut d = LazyDeadline::default();
        let now = Instant::now();
        let _ = poll_fn(|cx| Poll::Ready(d.poll_until(cx, now + Duration::from_secs(60)))).await;
        poll_fn(|cx| d.poll_until(cx, now + Duration::from_secs(2))).await;
        assert_eq!(now.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_left_behind_by_the_previous_wait_does_not_end_the_next_one_early() {
        let mut d = LazyDeadline::default();
        let t0 = Instant::now();
        // First wait ends early (its future completes), timer left at t0 + 10 s.
        let pending = poll_fn(|cx| Poll::Ready(d.poll_until(cx, t0 + Duration::from_secs(10)))).await;
        assert!(pending.is_pending());
        tokio::time::advance(Duration::from_secs(9)).await;
        // Next wait: 10 s from now. The old timer fires at t0 + 10 s and must not end it.
        let deadline = Instant::now() + Duration::from_secs(10);
        poll_fn(|cx| d.poll_until(cx, deadline)).await;
        assert_eq!(Instant::now(), deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_pending_future_is_bounded() {
        assert_eq!(timeout_if_pending(Duration::from_secs(1), async { 7 }).await.ok(), Some((7, false)));
        let never = std::future::pending::<()>();
        let start = Instant::now();
        assert!(timeout_if_pending(Duration::from_secs(3), never).await.is_err());
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }
}
