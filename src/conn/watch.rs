//! What every phase of a connection waits for besides its sockets: a
//! deadline (the connect timeout, then the idle or half-close timeout) and
//! the drain deadline's token.
//!
//! One [`Watch`] lives as long as its connection, so a connection registers
//! one timer and one waiter on the token, once. A `select!` that built
//! `sleep_until(..)` and `token.cancelled()` afresh on every wake-up (each
//! phase's loop goes round once per read) registered and removed both every
//! time: a lock on the worker's timer wheel and two on the token, each way.
//!
//! Polling the token's waiter again costs two locks (the token's own, then
//! its waiter list's), and a connection's task polls its watch on every
//! wake-up. So the waiter is registered with a waker of the watch's own,
//! which notes that it was woken before it wakes the task: until then, a
//! poll with the same task's waker need not look at the token at all.
//!
//! A deadline that moves later (the idle deadline, with every byte) leaves
//! the timer where it is: when the timer fires before the deadline, it is
//! set again then. A short connection so only ever arms its connect
//! timeout, and a long one wakes once more, at the end of that timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Where an unarmed timer is due: later than any timeout (tokio's own
/// "far future" is 30 years, too).
const NEVER: std::time::Duration = std::time::Duration::from_secs(86400 * 365 * 30);

/// What a [`Watch`] saw first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alarm {
    /// The deadline passed.
    Deadline,
    /// The drain deadline passed: the connection is to close now.
    Drain,
}

pin_project! {
    /// A connection's deadline and drain token, awaited as one future that
    /// resolves with the first [`Alarm`]. Awaiting it again after the
    /// deadline was moved waits for the new one.
    pub struct Watch<'a> {
        // The connection's one timer: due at or before `deadline`, or
        // never armed yet (due in the far future).
        #[pin]
        timer: Sleep,
        // The connection's one waiter on the drain token.
        #[pin]
        drain: WaitForCancellationFuture<'a>,
        // The deadline (None: a timeout set to none).
        deadline: Option<Instant>,
        // The waker `drain` was last polled with (None: not yet polled).
        registered: Option<Arc<Flagged>>,
    }
}

/// A task's waker that notes it was woken: the token's waiter holds it, so
/// while it is not woken, the token was not cancelled.
struct Flagged {
    woken: AtomicBool,
    task: Waker,
}

impl Wake for Flagged {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Before the task's wake: the poll it leads to must see the flag.
        self.woken.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl<'a> Watch<'a> {
    /// A watch on `drain`, without a deadline yet.
    pub fn new(drain: &'a CancellationToken) -> Self {
        Watch {
            timer: tokio::time::sleep_until(Instant::now() + NEVER),
            drain: drain.cancelled(),
            deadline: None,
            registered: None,
        }
    }

    /// Sets the deadline (None: none). Only a deadline earlier than the
    /// timer's (or one after it fired) moves the timer.
    pub fn set(self: Pin<&mut Self>, deadline: Option<Instant>) {
        let this = self.project();
        *this.deadline = deadline;
        if let Some(deadline) = deadline {
            if deadline < this.timer.deadline() || this.timer.is_elapsed() {
                this.timer.reset(deadline);
            }
        }
    }
}

impl Future for Watch<'_> {
    type Output = Alarm;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Alarm> {
        let mut this = self.project();
        if let Some(deadline) = *this.deadline {
            while this.timer.as_mut().poll(cx).is_ready() {
                if Instant::now() >= deadline {
                    return Poll::Ready(Alarm::Deadline);
                }
                // It was moved later meanwhile.
                this.timer.as_mut().reset(deadline);
            }
        }
        if let Some(flagged) = this.registered.as_ref() {
            if !flagged.woken.load(Ordering::Acquire) && flagged.task.will_wake(cx.waker()) {
                // Registered for this task, and not woken since.
                return Poll::Pending;
            }
        }
        let flagged = Arc::new(Flagged { woken: AtomicBool::new(false), task: cx.waker().clone() });
        let waker = Waker::from(Arc::clone(&flagged));
        if this.drain.poll(&mut Context::from_waker(&waker)).is_ready() {
            return Poll::Ready(Alarm::Drain);
        }
        *this.registered = Some(flagged);
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Cancels `token` after `delay`, from another task.
    fn cancel_after(token: &CancellationToken, delay: Duration) {
        let cancel = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            cancel.cancel();
        });
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_fires_and_can_be_moved_either_way() {
        let token = CancellationToken::new();
        let mut watch = std::pin::pin!(Watch::new(&token));
        let start = Instant::now();
        watch.as_mut().set(Some(start + Duration::from_secs(5)));
        assert_eq!(watch.as_mut().await, Alarm::Deadline);
        assert_eq!(Instant::now(), start + Duration::from_secs(5));
        // Later, then earlier again.
        watch.as_mut().set(Some(start + Duration::from_secs(60)));
        watch.as_mut().set(Some(start + Duration::from_secs(10)));
        assert_eq!(watch.as_mut().await, Alarm::Deadline);
        assert_eq!(Instant::now(), start + Duration::from_secs(10));
        // Moved later while it waits.
        watch.as_mut().set(Some(start + Duration::from_secs(20)));
        let early = tokio::time::timeout(Duration::from_secs(5), watch.as_mut()).await;
        assert!(early.is_err(), "fired before its deadline");
        watch.as_mut().set(Some(start + Duration::from_secs(30)));
        assert_eq!(watch.as_mut().await, Alarm::Deadline);
        assert_eq!(Instant::now(), start + Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_deadline_only_the_drain_ends_it() {
        let token = CancellationToken::new();
        let mut watch = std::pin::pin!(Watch::new(&token));
        watch.as_mut().set(Some(Instant::now() + Duration::from_secs(1)));
        watch.as_mut().set(None);
        let waited = tokio::time::timeout(Duration::from_secs(3600), watch.as_mut()).await;
        assert!(waited.is_err(), "a watch without a deadline fired");
        cancel_after(&token, Duration::from_secs(7));
        let start = Instant::now();
        assert_eq!(watch.as_mut().await, Alarm::Drain);
        assert_eq!(Instant::now(), start + Duration::from_secs(7));
        // It stays drained.
        assert_eq!(watch.as_mut().await, Alarm::Drain);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_wakes_whichever_task_polled_last() {
        let token = CancellationToken::new();
        let mut watch = std::pin::pin!(Watch::new(&token));
        let start = Instant::now();
        watch.as_mut().set(Some(start + Duration::from_secs(10)));
        let mut noop = Context::from_waker(Waker::noop());
        assert!(watch.as_mut().poll(&mut noop).is_pending());
        let waited = tokio::time::timeout(Duration::from_secs(3), watch.as_mut()).await;
        assert!(waited.is_err(), "fired before its deadline");
        let fired = tokio::time::timeout(Duration::from_secs(60), watch.as_mut()).await;
        assert_eq!(fired, Ok(Alarm::Deadline));
        assert_eq!(Instant::now(), start + Duration::from_secs(10), "not woken by the timer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_set_after_the_first_wait_fires() {
        let token = CancellationToken::new();
        let mut watch = std::pin::pin!(Watch::new(&token));
        let waited = tokio::time::timeout(Duration::from_secs(3), watch.as_mut()).await;
        assert!(waited.is_err(), "fired without a deadline");
        let start = Instant::now();
        watch.as_mut().set(Some(start + Duration::from_secs(5)));
        let fired = tokio::time::timeout(Duration::from_secs(60), watch.as_mut()).await;
        assert_eq!(fired, Ok(Alarm::Deadline));
        assert_eq!(Instant::now(), start + Duration::from_secs(5));
        // Earlier than the timer, once it waits again.
        watch.as_mut().set(Some(start + Duration::from_secs(600)));
        let waited = tokio::time::timeout(Duration::from_secs(3), watch.as_mut()).await;
        assert!(waited.is_err(), "fired before its deadline");
        watch.as_mut().set(Some(start + Duration::from_secs(20)));
        let fired = tokio::time::timeout(Duration::from_secs(60), watch.as_mut()).await;
        assert_eq!(fired, Ok(Alarm::Deadline));
        assert_eq!(Instant::now(), start + Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_wakes_whichever_task_polled_last() {
        let token = CancellationToken::new();
        let mut watch = std::pin::pin!(Watch::new(&token));
        // Polled first with a waker that wakes nothing, then many times by
        // this task: the drain must wake this task.
        let mut noop = Context::from_waker(Waker::noop());
        assert!(watch.as_mut().poll(&mut noop).is_pending());
        let waited = tokio::time::timeout(Duration::from_secs(60), watch.as_mut()).await;
        assert!(waited.is_err(), "fired without a drain or a deadline");
        cancel_after(&token, Duration::from_secs(7));
        let start = Instant::now();
        let drained = tokio::time::timeout(Duration::from_secs(60), watch.as_mut()).await;
        assert_eq!(drained, Ok(Alarm::Drain));
        assert_eq!(Instant::now(), start + Duration::from_secs(7), "not woken by the drain");
        assert!(watch.as_mut().poll(&mut noop).is_ready(), "a drained watch stays drained");
    }
}
