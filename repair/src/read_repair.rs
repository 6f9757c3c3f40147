//! Read repair: after a read, replicas that answered with an older version
//! (or nothing) are sent the merged version.
//!
//! Dynamo (§5) and Riak repair on the read path because reads already have
//! every replica's version in hand: the coordinator merges them, and any
//! replica whose clock does not already contain that merge is stale. Deciding
//! who is stale is [`stale_replicas`], a pure function. Sending the repairs is
//! the job of one worker per node fed by a [`ReadRepairQueue`] of fixed
//! capacity: when the queue is full a repair is dropped and counted (the next
//! read, or anti-entropy, will find the difference again), so a burst of
//! reads can never pile up unbounded background work.

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
/// Reads whose late answers may be awaited at once for repair; a read that
/// finds none free skips repair (and counts it).
const COLLECTING_MAX: usize = 1024;
/// How long one repair send may take before it counts as failed.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// The replicas among `replies` that lack part of `merged`: a replica that
/// answered with no clock, or with a clock that merging `merged` into would
/// change. Replicas that did not answer are not in `replies` and are not
/// judged.
pub fn stale_replicas(merged: &Clock, replies: &[(NodeId, Option<Clock>)]) -> Vec<NodeId> {
    if merged == &Clock::new() {
        return Vec::new();
    }
    replies
        .iter()
        .filter(|(_, clock)| match clock {
            None => true,
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
}

impl ReadRepairQueue {
    /// Starts the worker that sends queued repairs through `transport`. It
    /// stops when `shutdown` turns true (queued repairs are then dropped:
    /// anti-entropy covers them) or when every queue handle is gone.
    pub fn start<T: Transport>(
        transport: Arc<T>,
        capacity: usize,
        mut shutdown: watch::Receiver<bool>,
    ) -> (ReadRepairQueue, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<RepairJob>(capacity.max(1));
        let worker = tokio::spawn(async move {
            loop {
                // Shutdown first: once asked to stop, queued repairs are left
                // to the next read or to anti-entropy.
                tokio::select! {
                    biased;
                    // Only `true` is ever sent; a dropped sender also means stop.
                    _ = shutdown.changed() => break,
                    job = rx.recv() => {
                        let Some(job) = job else { break };
                        gauge!("ringkv_read_repair_queue_depth").set(rx.len() as f64);
                        tokio::select! {
                            biased;
                            _ = shutdown.changed() => break,
                            _ = repair_now(&transport, &job) => {}
                        }
                    }
                }
            }
        });
        let collecting = Arc::new(tokio::sync::Semaphore::new(COLLECTING_MAX));
        (ReadRepairQueue { tx, collecting }, worker)
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
        match self.tx.try_send(job) {
            Ok(()) => {
                counter!("ringkv_read_repairs_queued_total").increment(1);
                true
            }
            Err(_) => {
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

    #[test]
    fn nothing_to_repair_for_a_key_nobody_has() {
        assert!(stale_replicas(&Clock::new(), &[(n("a"), None), (n("b"), None)]).is_empty());
    }
}
