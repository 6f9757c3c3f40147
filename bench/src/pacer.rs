//! The open loop's arrival schedule: requests come due at a fixed total
//! rate whatever the store does, and the clients take them as they come.
//!
//! A request's latency counts from when it was due, not from when a client
//! got to send it, so a stall shows in every request queued behind it
//! (Tene's coordinated omission). That makes the precision of "when it was
//! due" part of every figure: tokio's timer fires on whole milliseconds, so
//! sleeping a client until its due time charged each request up to 1 ms of
//! timer lateness. The pacer is one plain thread instead, sleeping with the
//! OS's high-resolution timer (tens of microseconds late on a VM, at most
//! [`PACER_MIN_SLEEP`] more at high rates) and handing each due time to
//! whichever client is free. When every client is
//! busy, due requests wait in the queue and that wait is in their latency.
//!
//! Invariants: due times are `start + i / rate` for i = 0, 1, 2, … (no drift
//! from rounding the interval), all before `deadline`, in order, each
//! handed out no earlier than it is due and exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Mutex};

/// The pacer's shortest sleep. At high rates it wakes once per this and
/// hands out every request that came due meanwhile, rather than once per
/// request: thousands of wake-ups a second cost CPU that the store under
/// test shares on a small machine. A request is handed out at most this
/// much (plus the OS's wake-up delay) after it was due, and that lateness
/// is in its latency.
pub const PACER_MIN_SLEEP: Duration = Duration::from_micros(250);

/// Due requests waiting for a free client, at most. Past this the clients
/// are hopelessly behind (the latencies already say so), and an absurd
/// `--rate` must not fill memory with due times.
const PACER_QUEUE_MAX: usize = 65_536;

/// When the `i`th request is due, after the start: i / rate, computed
/// afresh for each i so that rounding never accumulates.
pub fn due_after(i: u64, rate_per_s: u64) -> Duration {
    let nanos = u128::from(i) * 1_000_000_000 / u128::from(rate_per_s.max(1));
    Duration::from_nanos(nanos as u64)
}

/// How many requests come due within `duration` at `rate_per_s`: every i
/// whose `due_after` is before the end.
pub fn due_count(rate_per_s: u64, duration: Duration) -> u64 {
    // i * 1e9 / rate < duration_ns  <=>  i < ceil(duration_ns * rate / 1e9)
    let rate = u128::from(rate_per_s.max(1));
    (duration.as_nanos() * rate).div_ceil(1_000_000_000) as u64
}

/// Hands out due times; cloned into every client.
#[derive(Clone)]
pub struct Pacer {
    due: Arc<Mutex<mpsc::Receiver<Instant>>>,
}

impl Pacer {
    /// Starts the schedule: `rate_per_s` requests a second from `start`
    /// until `deadline`. The thread ends once it has handed the last due
    /// time to the queue, or as soon as every `Pacer` clone is dropped
    /// (while it waits for room in a full queue, too).
    pub fn start(rate_per_s: u64, start: Instant, deadline: Instant) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(PACER_QUEUE_MAX);
        std::thread::Builder::new()
            .name("ringkv-pacer".into())
            .spawn(move || {
                for i in 0u64.. {
                    let due = start + due_after(i, rate_per_s);
                    if due >= deadline {
                        break;
                    }
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep((due - now).max(PACER_MIN_SLEEP));
                    }
                    // Blocks while the queue is full; the due times it
                    // then sends are still the schedule's, so the wait is
                    // charged to those requests all the same.
                    if tx.blocking_send(due).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            due: Arc::new(Mutex::new(rx)),
        })
    }

    /// The next due time, once it is due; `None` when the schedule is over.
    pub async fn next(&self) -> Option<Instant> {
        self.due.lock().await.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 200 requests a second for 100 ms: 20 due times, 5 ms apart, none
    /// handed out early, then the end.
    #[tokio::test]
    async fn hands_out_each_due_time_once_in_order_and_not_early() {
        let start = Instant::now() + Duration::from_millis(20);
        let pacer = Pacer::start(200, start, start + Duration::from_millis(100)).unwrap();
        let mut got = Vec::new();
        while let Some(due) = pacer.next().await {
            assert!(Instant::now() >= due, "handed out before it was due");
            got.push(due);
        }
        assert_eq!(got.len(), 20);
        for (i, due) in got.iter().enumerate() {
            assert_eq!(*due, start + Duration::from_millis(5 * i as u64));
        }
    }

    /// Clients far behind a high rate: the queue fills, the pacer waits,
    /// and every due time still comes out once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_delays_due_times_but_loses_none() {
        let start = Instant::now();
        let pacer = Pacer::start(1_000_000, start, start + Duration::from_millis(100)).unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut count = 0u64;
        let mut last = None;
        while let Some(due) = pacer.next().await {
            assert!(last.is_none_or(|l| l < due), "out of order");
            last = Some(due);
            count += 1;
        }
        // 100,000 came due before the first was taken: more than the queue
        // holds, so the pacer waited for room at least once.
        assert_eq!(count, 100_000);
        const { assert!(100_000 > PACER_QUEUE_MAX) };
    }

    /// The count of due requests matches the schedule: every i with
    /// i / rate before the end.
    #[test]
    fn due_count_counts_the_schedule() {
        assert_eq!(due_count(100, Duration::from_secs(2)), 200);
        // 0, 1/3 and 2/3 of a second.
        assert_eq!(due_count(3, Duration::from_secs(1)), 3);
        // 0 ms to 1000 ms inclusive are before 1000.5 ms.
        assert_eq!(due_count(1000, Duration::from_micros(1_000_500)), 1001);
        assert_eq!(due_count(200, Duration::from_millis(100)), 20);
    }

    /// Clients share one schedule: each due time goes to one of them.
    #[tokio::test]
    async fn clients_share_the_schedule() {
        let start = Instant::now();
        let pacer = Pacer::start(1000, start, start + Duration::from_millis(50)).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let pacer = pacer.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                while let Some(due) = pacer.next().await {
                    mine.push(due);
                }
                mine
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        // 50 due times in all, and no two alike: none went to two clients.
        assert_eq!(all.len(), 50);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 50);
    }
}
