//! Waiting out an emulated link's delay to the microsecond, not the
//! millisecond.
//!
//! Region emulation (`ringkv_core::regions`) holds every message between
//! nodes in different emulated regions, and a client's messages to its
//! node in the embedded bench, for the link's one-way delay. tokio's timer
//! fires on whole milliseconds, so each leg ended 1–2 ms late, whether it
//! was a 0.25 ms leg inside a region or a 34 ms one between regions: the
//! recorded medians ran 4% over what the matrix predicts, and a setting
//! served within one region several times over.
//!
//! Here one thread per process keeps the pending wake-ups in a heap and
//! sleeps with the OS's high-resolution timer (a condition variable's
//! timed wait, about 0.1 ms late on this VM). A long delay first sleeps on
//! tokio's timer until [`COARSE_MARGIN`] before its end, so the thread only
//! ever holds the last stretch of each.
//!
//! The last stretch is real time even under tokio's paused test clock, so
//! code run on a paused clock must not come here (none does: the simulated
//! network has delays of its own).
//!
//! Invariant: [`sleep_until`] never returns before its deadline.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How far before the deadline a long delay hands over from tokio's timer
/// to the precise one: more than tokio's lateness (a tick, plus a busy
/// worker's delay in polling it).
pub const COARSE_MARGIN: Duration = Duration::from_millis(3);

/// Waits for `delay`, precisely (see the module docs).
pub async fn sleep(delay: Duration) {
    match Instant::now().checked_add(delay) {
        Some(deadline) => sleep_until(deadline).await,
        // Past what an `Instant` can hold: it never ends.
        None => std::future::pending().await,
    }
}

/// Waits until `deadline`, precisely (see the module docs).
pub async fn sleep_until(deadline: Instant) {
    if let Some(coarse) = deadline.checked_sub(COARSE_MARGIN) {
        if coarse > Instant::now() {
            tokio::time::sleep_until(coarse.into()).await;
        }
    }
    if Instant::now() >= deadline {
        return;
    }
    let (tx, rx) = oneshot::channel();
    match timer() {
        Some(timer) => {
            #[cfg(test)]
            tests::PRECISE_WAITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            timer.add(deadline, tx);
            // The sender is dropped only once the deadline passed.
            let _ = rx.await;
        }
        // No thread could be started: millisecond precision it is.
        None => tokio::time::sleep_until(deadline.into()).await,
    }
    debug_assert!(Instant::now() >= deadline);
}

/// A wake-up: when, a tie-breaker (senders do not order), and whom.
type WakeUp = (Reverse<Instant>, Reverse<u64>, Waiter);

/// The process's timer thread, started on first use; `None` if the OS
/// would not start it.
fn timer() -> Option<&'static Timer> {
    static TIMER: OnceLock<Option<&'static Timer>> = OnceLock::new();
    *TIMER.get_or_init(|| {
        let timer: &'static Timer = Box::leak(Box::new(Timer {
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                added: 0,
            }),
            changed: Condvar::new(),
        }));
        let started = std::thread::Builder::new()
            .name("ringkv-link-delay".into())
            .spawn(move || timer.run());
        match started {
            Ok(_) => Some(timer),
            Err(e) => {
                tracing::warn!(error = %e, "no link-delay thread: emulated delays run on tokio's millisecond timer");
                None
            }
        }
    })
}

struct Timer {
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    heap: BinaryHeap<WakeUp>,
    added: u64,
}

/// A waiting task's sender, ordered by nothing (the heap orders by the
/// deadline and the tie-breaker before it).
struct Waiter(oneshot::Sender<()>);

impl PartialEq for Waiter {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl Timer {
    fn add(&self, deadline: Instant, tx: oneshot::Sender<()>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.added += 1;
        let seq = state.added;
        let earliest = state.heap.peek().is_none_or(|(at, _, _)| deadline < at.0);
        state
            .heap
            .push((Reverse(deadline), Reverse(seq), Waiter(tx)));
        drop(state);
        // Only a new earliest deadline changes how long the thread sleeps.
        if earliest {
            self.changed.notify_one();
        }
    }

    /// Wakes each waiter once its deadline has passed, for ever. A waiter
    /// that gave up (its future was dropped) is simply not there to hear.
    fn run(&self) {
        // Every wait in the process would hang without this thread.
        let _abort = AbortIfUnwinding;
        let mut due = Vec::new();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            while state.heap.peek().is_some_and(|(at, _, _)| at.0 <= now) {
                due.extend(state.heap.pop().map(|(_, _, waiter)| waiter));
            }
            if !due.is_empty() {
                // Woken outside the lock: a wake-up may take a system call,
                // and the tasks adding wait-ups must not wait for it.
                drop(state);
                for Waiter(tx) in due.drain(..) {
                    let _ = tx.send(());
                }
                state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            state = match state.heap.peek().map(|(at, _, _)| at.0 - now) {
                Some(wait) => {
                    self.changed
                        .wait_timeout(state, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

/// Ends the process if the timer thread unwinds.
struct AbortIfUnwinding;

impl Drop for AbortIfUnwinding {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("ringkv: the link-delay thread panicked; every emulated delay would hang");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits that went to the timer thread.
    pub(super) static PRECISE_WAITS: std::sync::atomic::AtomicU64 =
        std::sync::atomic::AtomicU64::new(0);

    /// Delays short and long, many at once and out of order: each ends, and
    /// none before its deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wait_ends_before_its_deadline() {
        let delays_us = [250u64, 0, 4_000, 100, 1_000, 250, 7_500, 50, 2_900, 3_100];
        let mut tasks = tokio::task::JoinSet::new();
        for (i, us) in delays_us.iter().cycle().take(200).enumerate() {
            let delay = Duration::from_micros(*us + i as u64);
            tasks.spawn(async move {
                let deadline = Instant::now() + delay;
                sleep_until(deadline).await;
                Instant::now() >= deadline
            });
        }
        let all = tokio::time::timeout(Duration::from_secs(30), async {
            let mut ended = 0;
            while let Some(on_time) = tasks.join_next().await {
                assert!(on_time.expect("no panic"), "woke before its deadline");
                ended += 1;
            }
            ended
        })
        .await
        .expect("every wait ends");
        assert_eq!(all, 200);
        assert!(
            PRECISE_WAITS.load(std::sync::atomic::Ordering::Relaxed) >= 150,
            "the waits' last stretch went to the timer thread, not tokio's timer"
        );
    }

    /// A waiter that gave up before its deadline does not stop the thread
    /// from waking the ones after it.
    #[tokio::test]
    async fn a_dropped_wait_does_not_stall_the_others() {
        let deadline = Instant::now() + Duration::from_millis(2);
        let gave_up = tokio::time::timeout(Duration::from_micros(100), sleep_until(deadline));
        assert!(gave_up.await.is_err() || Instant::now() >= deadline);
        let later = deadline + Duration::from_millis(2);
        tokio::time::timeout(Duration::from_secs(30), sleep_until(later))
            .await
            .expect("the later wait ends");
        assert!(Instant::now() >= later);
    }
}
