//! Read repair: after a read, replicas that answered with an older version
//! (or nothing, unless the merge is a bare tombstone) are sent the merged
//! version.
//!
//! Dynamo (§5) and Riak repair on the read path because reads already have
//! every replica's version in hand: the coordinator merges them, and any
//! replica whose clock does not already contain that merge is stale. Deciding
//! who is stale is [`stale_replicas`], a pure function. Sending the repairs is
//! the job of one worker per node (several sends at once) fed by a
//! [`ReadRepairQueue`] of fixed capacity: when the queue is full a repair is dropped and counted (the next
//! read, or anti-entropy, will find the difference again), so a burst of
//! reads can never pile up unbounded background work.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};
use ringkv_core::dvv::Clock;
use ringkv_core::wire::{ReplicaRequest, Request, Response};
use ringkv_core::{NodeId, Transport};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Repairs waiting to be sent, at most.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;
/// The bytes of keys and clocks that queued repairs may hold at once: each
/// job carries a whole merged clock, values included (up to 64 MiB), so a
/// count alone would not bound memory. Past it, offers are dropped and
/// counted like a full queue's.
pub const DEFAULT_QUEUE_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Reads whose late answers may be awaited at once for repair; a read that
/// finds none free skips repair (and counts it).
const COLLECTING_MAX: usize = 1024;
/// How long one repair send may take before it counts as failed.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Repairs sent at once: one at a time, a replica slow to answer (up to
/// [`SEND_TIMEOUT`] a job) would hold up every other replica's repairs, and
/// even healthy ones would go at one round trip each.
const REPAIRS_IN_FLIGHT: usize = 16;

/// The replicas among `replies` that lack part of `merged`: a replica that
/// answered with no clock, or with a clock that merging `merged` into would
/// change. Replicas that did not answer are not in `replies` and are not
/// judged.
///
/// A replica with nothing is not sent a bare tombstone (`merged` holding
/// no live value), as anti-entropy sends none
/// ([`crate::anti_entropy::merge_for_repair`]): it has most likely
/// collected that tombstone, and a copy would start its grace period
/// again, so a deleted key read often would keep its tombstone for ever.
pub fn stale_replicas(merged: &Clock, replies: &[(NodeId, Option<Clock>)]) -> Vec<NodeId> {
    if merged == &Clock::new() {
        return Vec::new();
    }
    let deleted = crate::anti_entropy::is_deleted(merged);
    replies
        .iter()
        .filter(|(_, clock)| match clock {
            None => !deleted,
            Some(clock) => !clock.descends(merged),
        })
        .map(|(node, _)| node.clone())
        .collect()
}

/// Sends `job`'s clock to all its targets at once, each send bounded by a
/// timeout. Returns how many failed.
pub async fn repair_now<T: Transport>(transport: &Arc<T>, job: &RepairJob) -> usize {
    let mut sends = tokio::task::JoinSet::new();
    for target in &job.targets {
        let transport = transport.clone();
        let target = target.clone();
        let request = Request::Replica(ReplicaRequest::Sync {
            key: job.key.clone(),
            clock: job.clock.clone(),
        });
        sends.spawn(async move {
            let ok = matches!(
                tokio::time::timeout(SEND_TIMEOUT, transport.call(&target, request)).await,
                Ok(Ok(Response::Clock(_)))
            );
            (target, ok)
        });
    }
    let mut failed = 0;
    while let Some(Ok((target, ok))) = sends.join_next().await {
        if ok {
            counter!("ringkv_read_repairs_sent_total").increment(1);
        } else {
            failed += 1;
            counter!("ringkv_read_repairs_failed_total").increment(1);
            tracing::debug!(replica = %target, "read repair failed");
        }
    }
    failed
}

/// One key's repair: the merged clock, and the replicas that need it.
#[derive(Debug, Clone, PartialEq)]
pub struct RepairJob {
    pub key: Vec<u8>,
    pub clock: Clock,
    pub targets: Vec<NodeId>,
}

/// The sending side of a node's read-repair worker. Cheap to clone.
#[derive(Clone)]
pub struct ReadRepairQueue {
    tx: mpsc::Sender<RepairJob>,
    collecting: Arc<tokio::sync::Semaphore>,
    /// Bytes held by queued jobs and the one being sent (see [`job_bytes`]).
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// What a job holds in memory, for the byte budget.
fn job_bytes(job: &RepairJob) -> usize {
    job.key.len() + job.clock.approx_size()
}

impl ReadRepairQueue {
    /// Starts the worker that sends queued repairs through `transport`. It
    /// stops when `shutdown` turns true (queued repairs are then dropped:
    /// anti-entropy covers them) or when every queue handle is gone.
    pub fn start<T: Transport>(
        transport: Arc<T>,
        capacity: usize,
        shutdown: watch::Receiver<bool>,
    ) -> (ReadRepairQueue, JoinHandle<()>) {
        Self::start_with_max_bytes(transport, capacity, DEFAULT_QUEUE_MAX_BYTES, shutdown)
    }

    /// [`start`](Self::start) with a byte budget other than
    /// [`DEFAULT_QUEUE_MAX_BYTES`].
    pub fn start_with_max_bytes<T: Transport>(
        transport: Arc<T>,
        capacity: usize,
        max_bytes: usize,
        mut shutdown: watch::Receiver<bool>,
    ) -> (ReadRepairQueue, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<RepairJob>(capacity.max(1));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let held = queued_bytes.clone();
        let worker = tokio::spawn(async move {
            let mut running = tokio::task::JoinSet::new();
            loop {
                // Shutdown first: once asked to stop, queued repairs are left
                // to the next read or to anti-entropy, and those under way
                // are stopped.
                tokio::select! {
                    biased;
                    // Only `true` is ever sent; a dropped sender also means stop.
                    _ = shutdown.changed() => break,
                    Some(_) = running.join_next(), if !running.is_empty() => {}
                    job = rx.recv(), if running.len() < REPAIRS_IN_FLIGHT => {
                        let Some(job) = job else {
                            // Every queue handle is gone: finish what runs.
                            while running.join_next().await.is_some() {}
                            break;
                        };
                        gauge!("ringkv_read_repair_queue_depth").set(rx.len() as f64);
                        let (transport, held) = (transport.clone(), held.clone());
                        running.spawn(async move {
                            repair_now(&transport, &job).await;
                            held.fetch_sub(job_bytes(&job), Ordering::Relaxed);
                        });
                    }
                }
            }
            running.shutdown().await;
        });
        let collecting = Arc::new(tokio::sync::Semaphore::new(COLLECTING_MAX));
        let queue = ReadRepairQueue {
            tx,
            collecting,
            queued_bytes,
            max_bytes,
        };
        (queue, worker)
    }

    /// A permit to wait for a read's late answers, if fewer than
    /// `COLLECTING_MAX` reads are already waiting; `None` means skip repair.
    pub fn begin_collecting(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let permit = self.collecting.clone().try_acquire_owned().ok();
        if permit.is_none() {
            counter!("ringkv_read_repairs_dropped_total").increment(1);
        }
        permit
    }

    /// Queues a repair; returns false (and counts it) if the queue is full.
    pub fn offer(&self, job: RepairJob) -> bool {
        if job.targets.is_empty() {
            return true;
        }
        let bytes = job_bytes(&job);
        let reserved = self
            .queued_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(bytes)
                    .filter(|&total| total <= self.max_bytes)
            })
            .is_ok();
        if !reserved {
            counter!("ringkv_read_repairs_dropped_total").increment(1);
            return false;
        }
        match self.tx.try_send(job) {
            Ok(()) => {
                counter!("ringkv_read_repairs_queued_total").increment(1);
                true
            }
            Err(_) => {
                self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                counter!("ringkv_read_repairs_dropped_total").increment(1);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_core::dvv::{Payload, VersionVector};

    fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn written(value: &str, by: &str) -> Clock {
        let mut c = Clock::new();
        c.update(&VersionVector::new(), Payload::Value(value.into()), &n(by));
        c
    }

    #[test]
    fn missing_and_older_replicas_are_stale_current_ones_are_not() {
        let old = written("v1", "a");
        let mut new = old.clone();
        new.update(&old.context(), Payload::Value(b"v2".to_vec()), &n("a"));
        let replies = vec![
            (n("a"), Some(new.clone())),
            (n("b"), Some(old.clone())),
            (n("c"), None),
        ];
        assert_eq!(stale_replicas(&new, &replies), vec![n("b"), n("c")]);
    }

    #[test]
    fn a_replica_missing_one_sibling_is_stale() {
        let mut both = written("x", "a");
        both.sync(&written("y", "b"));
        let replies = vec![
            (n("a"), Some(written("x", "a"))),
            (n("b"), Some(both.clone())),
        ];
        assert_eq!(stale_replicas(&both, &replies), vec![n("a")]);
    }

    /// Answers every call once `open` lets it through.
    struct GatedTransport {
        open: tokio::sync::Semaphore,
    }

    impl Transport for GatedTransport {
        async fn call(
            &self,
            _to: &NodeId,
            _request: Request,
        ) -> Result<Response, ringkv_core::TransportError> {
            self.open.acquire().await.unwrap().forget();
            Ok(Response::Clock(None))
        }
    }

    /// Calls to node "slow" never end; the others are answered, and counted.
    #[derive(Default)]
    struct OneSlowReplica {
        answered: AtomicUsize,
    }

    impl Transport for OneSlowReplica {
        async fn call(
            &self,
            to: &NodeId,
            _request: Request,
        ) -> Result<Response, ringkv_core::TransportError> {
            if to.as_str() == "slow" {
                std::future::pending::<()>().await;
            }
            self.answered.fetch_add(1, Ordering::SeqCst);
            Ok(Response::Clock(None))
        }
    }

    /// Repairs go out several at once: those of a replica slow to answer
    /// hold up no other replica's.
    #[tokio::test(start_paused = true)]
    async fn a_slow_replica_holds_up_no_other_replicas_repairs() {
        let transport = Arc::new(OneSlowReplica::default());
        let (_stop, shutdown) = watch::channel(false);
        let (queue, _worker) = ReadRepairQueue::start(transport.clone(), 100, shutdown);
        let job = |target: &str| RepairJob {
            key: b"k".to_vec(),
            clock: written("v", "a"),
            targets: vec![n(target)],
        };
        for _ in 0..3 {
            assert!(queue.offer(job("slow")));
        }
        for _ in 0..10 {
            assert!(queue.offer(job("b")));
        }
        // Well inside one send's timeout.
        tokio::time::sleep(SEND_TIMEOUT / 4).await;
        assert_eq!(transport.answered.load(Ordering::SeqCst), 10);
    }

    /// Jobs past the byte budget are refused even when the queue has room,
    /// and the budget frees up as jobs are sent.
    #[tokio::test]
    async fn the_queue_refuses_jobs_past_its_byte_budget() {
        let transport = Arc::new(GatedTransport {
            open: tokio::sync::Semaphore::new(0),
        });
        let job = |value: &str| RepairJob {
            key: b"k".to_vec(),
            clock: written(value, "a"),
            targets: vec![n("b")],
        };
        let one = job_bytes(&job(&"x".repeat(1000)));
        let (_stop, shutdown) = watch::channel(false);
        let (queue, _worker) =
            ReadRepairQueue::start_with_max_bytes(transport.clone(), 100, 2 * one, shutdown);
        assert!(queue.offer(job(&"x".repeat(1000))));
        assert!(queue.offer(job(&"y".repeat(1000))));
        // Room for 98 more jobs, but not for their bytes.
        assert!(!queue.offer(job(&"z".repeat(1000))));
        // Nor a small one: the budget is spent.
        assert!(!queue.offer(job("s")));
        transport.open.add_permits(2);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while queue.queued_bytes.load(Ordering::Relaxed) > 0 {
            assert!(tokio::time::Instant::now() < deadline, "jobs never sent");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(queue.offer(job(&"z".repeat(1000))));
    }

    #[test]
    fn a_bare_tombstone_goes_to_older_copies_not_to_replicas_with_nothing() {
        let old = written("v1", "a");
        let mut deleted = old.clone();
        deleted.update(&old.context(), Payload::Tombstone, &n("a"));
        let replies = vec![
            (n("a"), Some(deleted.clone())),
            (n("b"), Some(old)),
            (n("c"), None),
        ];
        assert_eq!(stale_replicas(&deleted, &replies), vec![n("b")]);
    }

    #[test]
    fn nothing_to_repair_for_a_key_nobody_has() {
        assert!(stale_replicas(&Clock::new(), &[(n("a"), None), (n("b"), None)]).is_empty());
    }
}
