//! Leaving the cluster gracefully (`ringkv leave`): Cassandra's
//! decommission, Riak's `cluster leave`.
//!
//! `ringkv remove` is for a machine that is gone: its keys survive only on
//! their other replicas, and a write that it alone acknowledged (W=1) is
//! lost with it. A node that is still up can do better, because it holds
//! those keys. Asked to leave, it
//!
//! 1. refuses if the cluster would keep fewer than N members, if it is
//!    already leaving, if it holds hints for members that are down (they
//!    would be lost with it), or if another member is leaving, has left
//!    unknown to it, or cannot be asked; from then on it takes no new hints;
//! 2. hands every key it replicates (tombstones too) to the key's replicas
//!    under the ring without it: one `SyncBatch` per replica per page of
//!    keys, merged there and durable before they answer, each batch tried
//!    up to three times within a timeout that grows with its bytes. Keys
//!    it holds but does not replicate stay behind (see
//!    [`NodeInner::hand_over`]). A batch that still fails stops the leave
//!    with the node still a member and nothing removed;
//! 3. asks another member to remove it (`Request::Remove`, which that member
//!    passes on to every other one), stores the new record and stops
//!    serving: a coordinator that has learned of the removal sends it
//!    nothing, and one that has not yet is refused. If no member confirms
//!    in time and one may have removed it all the same (a request timed
//!    out, or a connection was lost under it), it looks for that removal
//!    for 10 s (30 s while a request is still unanswered): in the members'
//!    records and in late answers. Found, the leave goes on to the last
//!    pass; otherwise the node would stop at the next membership exchange
//!    with the writes of the first pass's time not handed over. Meanwhile
//!    it still serves, with the ring that holds it, and those writes are
//!    handed over too;
//! 4. waits for the requests already under way, then hands over once more
//!    (trying again for up to a minute), for the writes that arrived during
//!    the first pass. A replica that still misses it is named in the
//!    answer, and `ringkv leave` exits non-zero.
//!
//! **One leave at a time**, as Cassandra allows one range movement at a
//! time. Two concurrent leaves would each hand their keys to replicas under
//! a ring that still holds the other, so a key could end with fewer than N
//! copies until anti-entropy ran, and two removals asked of different
//! members could each pass the "at least N members" check. So the node
//! marks itself leaving first and only then asks every other member whether
//! it is leaving or already removed (`Stats`). Of two leaves started
//! together, at least one sees the other: each mark comes before its own
//! questions, and a mark is only cleared by a leave that stopped before the
//! removal, so the one whose question is answered last finds the other
//! leaving, or removed. Both may refuse; neither goes ahead unseen. A member
//! that cannot be asked refuses the leave too: it might be leaving, and the
//! hand-over would need it anyway.
//!
//! The argument needs each to know the other as a member: a node that
//! joined moments ago, and that a member has not learned of yet, is not
//! asked by it. Leave only once a new node shows in every member's
//! `ringkv status`. Cleanups (`server/cleanup.rs`) take part in the same
//! exclusion: a leave refuses while a member is cleaning up, and the
//! other way round.
//!
//! The guarantee ends at the removal: a member that has learned of it asks
//! the removed node nothing, while that node may still be looking for its
//! removal (up to 30 s, above) or in its last pass (a minute or more when
//! it fails, above; stopping the node ends it once the shutdown's drain,
//! `--drain-timeout-s`, has waited for it), which then cannot reach a replica that
//! has left meanwhile (named in its answer's `late_failures`). So the next
//! leave should wait until the previous `ringkv leave` has returned.
//!
//! The node keeps running, refusing every request but status, until its
//! operator stops it (like a decommissioned Cassandra node); started again,
//! it refuses, as a removed node does.
//!
//! Hints that other members hold for the leaving node go, once it is
//! removed, to their keys' replicas (`ringkv_repair::handoff`, as for
//! `ringkv remove`). Not covered: a key whose merge a replica refuses (past
//! the per-key limits) is skipped there.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringkv_core::wire::{
    ErrorKind, KeyClock, LeaveReply, NodeStats, PeerFailure, RemoveReply, ReplicaRequest, Request,
    Response, MERGE_REFUSED,
};
use ringkv_core::{NodeId, Transport};
use ringkv_ring::Ring;

use super::NodeInner;
use crate::error::NodeError;
use crate::quic::CallError;

/// How long one batch of small keys may take to reach a replica; a larger
/// batch gets its bytes at 64 Mbit/s more (`send_timeout_for`): with up to
/// 8 batches of 8 MiB sharing the link, a fixed 10 s failed every attempt
/// on a slow link, at the same key.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries of one batch before the pass fails, a second apart and then two:
/// a replica shedding load for a moment must not end a leave that then
/// starts again from its first key.
const BATCH_ATTEMPTS: u32 = 3;
/// How long the member asked may take to remove this node and tell the
/// others (it tells them all at once, each within a second), by default
/// (`NodeConfig::removal_timeout`).
pub(super) const DEFAULT_REMOVAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a leave whose removal no member confirmed looks for one that
/// happened all the same (its answer lost or late)...
const REMOVAL_LEARN_WAIT: Duration = Duration::from_secs(10);
/// ... and, while a removal request is still unanswered, at most.
const REMOVAL_PENDING_WAIT: Duration = Duration::from_secs(30);
/// The pause between two rounds of that search.
const REMOVAL_LEARN_PAUSE: Duration = Duration::from_millis(200);
/// Batches (one per replica per page of keys) sent and not yet answered,
/// at most: a few pages' worth, each at most `READ_BATCH_REPLY_BYTES`.
const BATCHES_IN_FLIGHT: usize = 8;
/// How long the last pass waits for requests already under way.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(10);
/// How long the last pass is tried again (1 s apart, doubling to 16 s):
/// the node no longer serves, so nothing is gained by giving up sooner on
/// a replica that is restarting, and writes only it holds are at stake.
const LATE_PASS_FOR: Duration = Duration::from_secs(60);
const LATE_PASS_PAUSE_MAX: Duration = Duration::from_secs(16);
/// How long a member may take to say whether it is leaving.
const LEAVING_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Keys handed over in one pass.
struct HandedOver {
    keys: u64,
}

/// Clears `NodeInner::leaving` when a leave ends without the node leaving.
/// If the node was removed meanwhile (`ringkv remove` from a member), it
/// tells `NodeHandle::removed` as a removal outside a leave does, since
/// `NodeInner::on_removed` left that to the leave. Both sides store their
/// flag before they read the other's (sequentially consistent), so at
/// least one of them sees both and tells.
struct LeavingGuard<'a> {
    leaving: &'a AtomicBool,
    is_removed: &'a AtomicBool,
    removed: &'a tokio::sync::watch::Sender<bool>,
    left: bool,
}

impl Drop for LeavingGuard<'_> {
    fn drop(&mut self) {
        if !self.left {
            self.leaving.store(false, Ordering::SeqCst);
            if self.is_removed.load(Ordering::SeqCst) {
                self.removed.send_replace(true);
            }
        }
    }
}

impl NodeInner {
    /// Serves `ringkv leave` (see the module docs).
    pub(super) async fn leave(self: &Arc<Self>) -> Response {
        let Some(record) = self.membership.record() else {
            return super::joining(&self.id);
        };
        let refuse = |message: String| Response::error(ErrorKind::Refused, message);
        if record.members.len() <= record.replicas {
            return refuse(format!(
                "{} cannot leave: the cluster would keep {} members, fewer than N={}; add a node first",
                self.id,
                record.members.len() - 1,
                record.replicas
            ));
        }
        if self
            .leaving
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return refuse(format!("{} is already leaving", self.id));
        }
        // From here on it takes no new hints (see `handle`).
        let mut guard = LeavingGuard {
            leaving: &self.leaving,
            is_removed: &self.is_removed,
            removed: &self.removed,
            left: false,
        };
        if let Some(refusal) = self.hints_held() {
            return refuse(refusal);
        }
        if let Some(refusal) = self.handover_owed() {
            return refuse(refusal);
        }
        if let Some(refusal) = self.ring_not_taken_in(&record) {
            return refuse(refusal);
        }
        if self.cleaning.load(Ordering::SeqCst) {
            return refuse(format!(
                "{} is running a cleanup; leave once it has returned",
                self.id
            ));
        }
        // Only after our own mark is set (see the module docs).
        if let Some(refusal) = self.another_leaving(&record).await {
            return refusal;
        }
        let mut after = record.clone();
        after.members.remove(&self.id);
        let (before, ring_after) = match (record.ring(), after.ring()) {
            (Ok(before), Ok(ring_after)) => (before, ring_after),
            (Err(e), _) | (_, Err(e)) => {
                return Response::error(ErrorKind::Internal, e.to_string())
            }
        };

        let first = match self.hand_over(&before, &ring_after, true).await {
            Ok(done) => done,
            Err(failure) if self.is_removed.load(Ordering::Relaxed) => {
                return Response::error(
                    ErrorKind::Unavailable,
                    format!(
                        "{} was removed from the cluster while it handed over its keys (by `ringkv remove`?); \
                         {} did not take them: keep its data dir, and run `ringkv repair` on the members",
                        self.id, failure.peer
                    ),
                )
            }
            Err(failure) => {
                let advice = match failure.reason.contains(MERGE_REFUSED) {
                    true => "resolve that key's siblings (read it, and write with the context the read gave) and leave again".to_string(),
                    false => format!("bring {} up (or remove it) and leave again", failure.peer),
                };
                return Response::error(
                    ErrorKind::Unavailable,
                    format!(
                        "could not hand keys to {}: {}; {} is still a member and nothing was removed: {advice}",
                        failure.peer, failure.reason, self.id
                    ),
                )
            }
        };
        metrics::counter!("ringkv_leave_keys_handed_over_total").increment(first.keys);
        // A hint stored by a request already under way when the leave began.
        if let Some(refusal) = self.hints_held() {
            return refuse(refusal);
        }
        if self.cleaning.load(Ordering::SeqCst) {
            return refuse(format!(
                "{} is running a cleanup; leave once it has returned",
                self.id
            ));
        }
        let removal = match self.ask_removal(&after).await {
            RemovalAsked::Confirmed(removal) => removal,
            RemovalAsked::Unconfirmed {
                reasons,
                pending,
                unknown,
            } => {
                let looked = tokio::time::Instant::now();
                let found = match unknown {
                    true => self.removal_learned(&after, pending).await,
                    false => None,
                };
                match found {
                    // Removed all the same: the writes that came in since
                    // the first pass still need the last one.
                    Some(record) => {
                        tracing::warn!(node = %self.id, reasons = ?reasons, "no member confirmed removing this node in time, but one removed it; handing over once more");
                        RemoveReply {
                            record,
                            not_told: Vec::new(),
                        }
                    }
                    None => {
                        let since = if unknown {
                            format!(
                                ", nor had one removed it {} s later",
                                looked.elapsed().as_secs()
                            )
                        } else {
                            String::new()
                        };
                        return Response::error(
                            ErrorKind::Unavailable,
                            format!(
                                "every key was handed over, but no member confirmed removing {} ({}){since}; check `ringkv status` on a member: leave again if it still lists {}",
                                self.id,
                                reasons.join("; "),
                                self.id
                            ),
                        );
                    }
                }
            }
        };
        guard.left = true;
        // The members removed this node: they take its replica requests
        // from now on only as this leave's last pass.
        self.transport.leave_last_pass.store(true, Ordering::SeqCst);
        match self.membership.adopt(removal.record.clone()) {
            Err(NodeError::Removed { .. }) => {}
            other => tracing::warn!(
                result = ?other,
                "the removal's record did not name this node as removed"
            ),
        }
        self.stop_serving();

        // Requests that passed the removal check before it was set may still
        // write; the last pass must come after them.
        let deadline = tokio::time::Instant::now() + IN_FLIGHT_WAIT;
        while self.in_flight.load(Ordering::SeqCst) > 1
            && tokio::time::Instant::now() < deadline
            && !self.drain_over.load(Ordering::SeqCst)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Said, not passed over: such a request (a write in a RocksDB
        // write stall, say) may store a key after the pass has read it.
        // Only if the wait ran out (a request that came in since the loop
        // looked is one the removal check refuses).
        let still_running = match tokio::time::Instant::now() >= deadline {
            true => self.in_flight.load(Ordering::SeqCst).saturating_sub(1),
            false => 0,
        };
        // The cluster as it is now (another change may have come meanwhile).
        let ring_now = self
            .membership
            .record()
            .and_then(|r| r.ring().ok())
            .unwrap_or(ring_after);
        let (mut late_failures, mut passed) = (Vec::new(), false);
        let (give_up_at, mut pause) = (
            tokio::time::Instant::now() + LATE_PASS_FOR,
            Duration::from_secs(1),
        );
        for attempt in 1.. {
            // The node's stop signal is set now (it stopped serving), so
            // this pass cannot watch it. It goes on while a shutdown's drain
            // waits for it, and stops when the drain is over: retrying a
            // failing replica, it held the node and its database open for a
            // minute after shutdown returned.
            let pass = tokio::select! {
                pass = self.hand_over(&before, &ring_now, false) => pass,
                () = self.drain_ended() => break,
            };
            match pass {
                Ok(_) => {
                    late_failures.clear();
                    passed = true;
                    break;
                }
                Err(failure) => {
                    tracing::warn!(peer = %failure.peer, reason = %failure.reason, attempt, "the last hand-over failed");
                    late_failures = vec![failure];
                    if tokio::time::Instant::now() + pause > give_up_at {
                        break;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = self.drain_ended() => break,
                    }
                    pause = (pause * 2).min(LATE_PASS_PAUSE_MAX);
                }
            }
        }
        // Ended by the shutdown, during a try or between two: said, whatever
        // the tries before it met.
        if !passed && self.drain_over.load(Ordering::SeqCst) {
            late_failures.push(PeerFailure {
                peer: self.id.clone(),
                reason: "this node was shut down before its last hand-over finished: a replica may miss writes it took during the leave; run `ringkv repair` on the members".into(),
            });
        }
        late_failures.extend(requests_outlasting_the_wait(&self.id, still_running));
        // What only this node may still hold, said rather than lost: a hint
        // whose store began before the leave was marked (with `--sync`, on
        // a busy blocking pool, it can land after the check above).
        let hints = self.hints.pending_total();
        if hints > 0 {
            late_failures.push(PeerFailure {
                peer: self.id.clone(),
                reason: format!(
                    "{hints} hints stored while it left were not handed on: a replica may miss their writes; run `ringkv repair` on the members"
                ),
            });
        }
        tracing::warn!(node = %self.id, keys = first.keys, "left the cluster; stop this process");
        Response::Left(LeaveReply {
            record: removal.record,
            keys: first.keys,
            not_told: removal.not_told,
            late_failures,
        })
    }

    /// Why the node cannot leave while it owes the hand-over of keys an
    /// earlier ring change (a join) took from it, if it does: the leave
    /// hands over only the keys it replicates now, and those would be left
    /// behind, perhaps as the only copies (several joins can take every
    /// replica slot of a key).
    fn handover_owed(&self) -> Option<String> {
        self.handover_owed.load(Ordering::SeqCst).then(|| {
            format!(
                "{} is still handing over the keys a ring change (a join) took from it, which a leave would leave behind; \
                 leave once that is done (its `ringkv_ring_handover_owed` metric is 0, and it logs \
                 \"handed over the keys a ring change took from this node\")",
                self.id
            )
        })
    }

    /// Why the node cannot leave yet, if its ring hand-over has not taken
    /// in the ring `record` gives (the node is starting, so the ring is not
    /// installed, or the loop is finishing a pass): a change since its last
    /// one that took keys from this node is then not owed yet, and the
    /// leave would hand over only the keys it replicates now, leaving those
    /// behind.
    fn ring_not_taken_in(&self, record: &crate::membership::ClusterRecord) -> Option<String> {
        let ring = record.ring().ok()?;
        let taken_in = self
            .recent_rings()
            .as_ref()
            .is_some_and(|recent| recent.notes_as_current(&ring));
        (!taken_in).then(|| {
            format!(
                "{} has not yet taken in the cluster's newest ring (it is starting, or finishing a hand-over); \
                 leave in a few seconds",
                self.id
            )
        })
    }

    /// Why the node cannot leave while it holds hints, if it does.
    fn hints_held(&self) -> Option<String> {
        let hints = self.hints.pending_total();
        (hints > 0).then(|| {
            format!(
                "{} holds {hints} hints for members that are down, which would be lost with it; \
                 leave once they are delivered (`ringkv status` shows them), or remove those members first",
                self.id
            )
        })
    }

    /// What every other member of `record` says of itself (`Stats`), asked
    /// at once, and the members that could not be asked, with why (sorted).
    /// A leave and a cleanup ask this after setting their own mark, so of
    /// two begun together at least one sees the other (see the module docs).
    pub(super) async fn members_stats(
        &self,
        record: &crate::membership::ClusterRecord,
    ) -> (Vec<(NodeId, NodeStats)>, Vec<String>) {
        let mut asks = tokio::task::JoinSet::new();
        for member in record.members.values().filter(|m| m.id != self.id) {
            let (id, transport) = (member.id.clone(), self.transport.clone());
            asks.spawn(async move {
                let answer =
                    answer_within(LEAVING_CHECK_TIMEOUT, transport.call(&id, Request::Stats)).await;
                let answer = match answer {
                    Ok(Response::Stats(stats)) => Ok(stats),
                    Ok(other) => Err(format!("unexpected answer {other:?}")),
                    Err(reason) => Err(reason),
                };
                (id, answer)
            });
        }
        let (mut answered, mut unasked) = (Vec::new(), Vec::new());
        while let Some(joined) = asks.join_next().await {
            match joined {
                Ok((id, Ok(stats))) => answered.push((id, stats)),
                Ok((id, Err(reason))) => unasked.push(format!("{id}: {reason}")),
                Err(e) => unasked.push(format!("a check failed: {e}")),
            }
        }
        answered.sort_by(|a, b| a.0.cmp(&b.0));
        unasked.sort();
        (answered, unasked)
    }

    /// The refusal of a leave while another member is leaving or cleaning
    /// up, has left without this node knowing yet, or cannot say which.
    async fn another_leaving(&self, record: &crate::membership::ClusterRecord) -> Option<Response> {
        let (answered, unasked) = self.members_stats(record).await;
        let (gone, leaving, cleaning) = (
            named(&answered, |s| s.removed),
            named(&answered, |s| s.leaving),
            named(&answered, |s| s.cleaning),
        );
        if !leaving.is_empty() {
            let names = leaving.join(", ");
            return Some(Response::error(
                ErrorKind::Refused,
                format!(
                    "{} cannot leave while {names} {} leaving too: members leave one at a time; \
                     leave again once `ringkv status` no longer shows {names} as leaving",
                    self.id,
                    if leaving.len() == 1 { "is" } else { "are" },
                ),
            ));
        }
        if !cleaning.is_empty() {
            let names = cleaning.join(", ");
            return Some(Response::error(
                ErrorKind::Refused,
                format!(
                    "{} cannot leave while {names} {} running a cleanup, which could drop copies \
                     the leave counts on; leave again once that `ringkv cleanup` has returned",
                    self.id,
                    if cleaning.len() == 1 { "is" } else { "are" },
                ),
            ));
        }
        if !gone.is_empty() {
            let names = gone.join(", ");
            return Some(Response::error(
                ErrorKind::Refused,
                format!(
                    "{} cannot leave yet: {names} left the cluster, and {} has not learned it yet; \
                     leave again in a few seconds (members exchange their lists every few seconds)",
                    self.id, self.id,
                ),
            ));
        }
        if !unasked.is_empty() {
            return Some(Response::error(
                ErrorKind::Unavailable,
                format!(
                    "{} cannot leave: it could not check that no other member is leaving ({}); \
                     nothing was handed over: bring those members up, or remove them (one removed \
                     already is dropped from this node's list within seconds), and leave again",
                    self.id,
                    unasked.join("; "),
                ),
            ));
        }
        None
    }

    /// Sends every stored key that this node replicates under `before` to
    /// its replicas under `after`, a page at a time, each as the node holds
    /// it when its page goes out (the scan's view may be a day old by
    /// then, older than a tombstone collected since). Keys it holds but does
    /// not replicate (left from an older ring) stay: their tombstones may
    /// have been collected on the replicas, and a stale copy would bring a
    /// deleted value back. Stops at the first replica that does not take a
    /// batch, and, if `watch_shutdown`, when the node shuts down.
    async fn hand_over(
        &self,
        before: &Ring,
        after: &Ring,
        watch_shutdown: bool,
    ) -> Result<HandedOver, PeerFailure> {
        let mut keys = 0u64;
        let mut pages = self.stored_pages();
        // Batches of several pages travel at once: one page at a time spent
        // most of its time waiting for the slowest replica's answer.
        let mut sends = tokio::task::JoinSet::new();
        loop {
            if watch_shutdown && *self.shutdown.borrow() {
                return Err(PeerFailure {
                    peer: self.id.clone(),
                    reason: "this node is shutting down".into(),
                });
            }
            let Some(page) = pages.next().await else {
                while let Some(sent) = sends.join_next().await {
                    self.check_sent(sent)?;
                }
                return pages
                    .finish()
                    .await
                    .map(|()| HandedOver { keys })
                    .map_err(|reason| PeerFailure {
                        peer: self.id.clone(),
                        reason: format!("reading its own store: {reason}"),
                    });
            };
            #[cfg(test)]
            if let Some(hook) = self.leave_page_read.lock().unwrap().as_mut() {
                hook(&page.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>());
            }
            // The versions held now, not the ones the scan saw: a first
            // pass over a large store can outlast the tombstone grace, and
            // a value deleted and collected since would come back through
            // the replicas that take over. Read off the async workers, as
            // the scan is. Gone since (a collected tombstone): nothing to
            // hand over.
            let mine: Vec<Vec<u8>> = page
                .into_iter()
                .map(|(key, _)| key)
                .filter(|key| before.is_replica(key, &self.id))
                .collect();
            let replica = self.local.replica.clone();
            let current = tokio::task::spawn_blocking(move || {
                mine.into_iter()
                    .map(|key| replica.read(&key).map(|clock| (key, clock)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await;
            let current = match current {
                Ok(Ok(current)) => current,
                Ok(Err(e)) => {
                    return Err(PeerFailure {
                        peer: self.id.clone(),
                        reason: format!("reading its own store: {e}"),
                    })
                }
                Err(e) => {
                    return Err(PeerFailure {
                        peer: self.id.clone(),
                        reason: format!("reading its own store failed: {e}"),
                    })
                }
            };
            let mut batches: BTreeMap<NodeId, Vec<KeyClock>> = BTreeMap::new();
            let keys_before = keys;
            for (key, clock) in current {
                let Some(clock) = clock else { continue };
                keys += 1;
                for replica in after.replicas_of(&key) {
                    batches.entry(replica).or_default().push(KeyClock {
                        key: key.clone(),
                        clock: clock.clone(),
                    });
                }
            }
            self.leave_keys_sent
                .fetch_add(keys - keys_before, Ordering::Relaxed);
            // What was read may include writes still buffered.
            if let Err(e) = self.storage.commit().await {
                return Err(PeerFailure {
                    peer: self.id.clone(),
                    reason: format!("flushing its own write-ahead log: {e}"),
                });
            }
            for (replica, items) in batches {
                let transport = self.transport.clone();
                sends.spawn(async move {
                    let peer = replica.clone();
                    match send_batch(&*transport, replica, items, Duration::from_secs(1)).await {
                        Ok(None) => Ok(()),
                        // A key only this node may hold would be left
                        // behind: the leave fails, and says which.
                        Ok(Some(refusal)) => Err(PeerFailure {
                            peer,
                            reason: refusal,
                        }),
                        Err(failure) => Err(failure),
                    }
                });
            }
            while sends.len() > BATCHES_IN_FLIGHT {
                let sent = sends.join_next().await.expect("the set is not empty");
                self.check_sent(sent)?;
            }
        }
    }

    /// The outcome of one batch sent by [`Self::hand_over`].
    fn check_sent(
        &self,
        sent: Result<Result<(), PeerFailure>, tokio::task::JoinError>,
    ) -> Result<(), PeerFailure> {
        match sent {
            Ok(result) => result,
            Err(e) => Err(PeerFailure {
                peer: self.id.clone(),
                reason: format!("a hand-over task failed: {e}"),
            }),
        }
    }

    /// Ends once a shutdown's drain is over (`drain_over`). Looked at
    /// every 50 ms: it is a flag, and the shutdown's next step waits
    /// seconds for what is still running to let go of the node.
    async fn drain_ended(&self) {
        while !self.drain_over.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks the members of `after` (the cluster without this node), one at
    /// a time, to remove this node and tell the others.
    async fn ask_removal(&self, after: &crate::membership::ClusterRecord) -> RemovalAsked {
        let request = Request::Remove {
            node: self.id.clone(),
            tell_others: true,
        };
        let (mut reasons, mut pending, mut unknown) =
            (Vec::new(), Vec::<RemovalCall>::new(), false);
        for member in after.members.values() {
            let Ok(addr) = member.addr.parse() else {
                continue;
            };
            // Its own task: a request that timed out here goes on, and its
            // late answer settles whether it removed the node (see
            // `removal_learned`); dropped halfway, it might or might not.
            let (transport, request) = (self.transport.clone(), request.clone());
            let id = member.id.clone();
            // Only to the member itself: a node of another cluster given its
            // address would remove its own namesake and "confirm" the leave.
            let mut call: RemovalCall =
                tokio::spawn(async move { transport.call_member_at(&id, addr, &request).await });
            let reason = match tokio::time::timeout(self.removal_timeout, &mut call).await {
                Ok(Ok(Ok(Response::Removed(reply)))) => {
                    // Those still unanswered need not go on (a removal is
                    // idempotent, so they would do no harm).
                    for call in pending {
                        call.abort();
                    }
                    return RemovalAsked::Confirmed(reply);
                }
                // Refused, or nothing of it ran: settled.
                Ok(Ok(Ok(Response::Error(e)))) => e.message,
                Ok(Ok(Ok(_))) => "an answer other than Removed".to_string(),
                Ok(Ok(Err(
                    e @ (CallError::Unread(_) | CallError::Connect(_) | CallError::Refused(_)),
                ))) => e.to_string(),
                // It may have run.
                Ok(Ok(Err(e))) => {
                    unknown = true;
                    e.to_string()
                }
                Ok(Err(e)) => {
                    unknown = true;
                    format!("the call's task failed: {e}")
                }
                Err(_) => {
                    unknown = true;
                    pending.push(call);
                    format!("no answer within {} ms", self.removal_timeout.as_millis())
                }
            };
            reasons.push(format!("{}: {reason}", member.id));
        }
        RemovalAsked::Unconfirmed {
            reasons,
            pending,
            unknown,
        }
    }

    /// The record that removed this node, if a member did although none
    /// confirmed it to [`ask_removal`](Self::ask_removal) in time (its
    /// answer lost or late). Announces this node to the members of `after`
    /// in turn, as the membership exchange does, until one's answer names
    /// it removed (which marks it removed, see `announce_to_addr`) or a
    /// late answer to one of the `pending` requests confirms it; for
    /// [`REMOVAL_LEARN_WAIT`], and while requests are pending for up to
    /// [`REMOVAL_PENDING_WAIT`]. Those still pending then are aborted. Not
    /// after the node begins to shut down.
    async fn removal_learned(
        self: &Arc<Self>,
        after: &crate::membership::ClusterRecord,
        mut pending: Vec<RemovalCall>,
    ) -> Option<ringkv_core::wire::JoinReply> {
        let began = tokio::time::Instant::now();
        let found = 'search: loop {
            for member in after.members.values() {
                if self.is_removed.load(Ordering::SeqCst) {
                    break 'search self.membership.record().map(|r| r.reply());
                }
                let mut i = 0;
                while i < pending.len() {
                    if !pending[i].is_finished() {
                        i += 1;
                        continue;
                    }
                    if let Ok(Ok(Response::Removed(reply))) = pending.swap_remove(i).await {
                        break 'search Some(reply.record);
                    }
                }
                let waited = began.elapsed();
                let over = waited >= REMOVAL_PENDING_WAIT
                    || (waited >= REMOVAL_LEARN_WAIT && pending.is_empty());
                if over || *self.shutdown.borrow() {
                    break 'search None;
                }
                let Some(record) = self.membership.record() else {
                    break 'search None;
                };
                super::announce_to(self, &record, member).await;
            }
            tokio::time::sleep(REMOVAL_LEARN_PAUSE).await;
        };
        for call in pending {
            call.abort();
        }
        found
    }
}

/// A removal request's call, in a task of its own.
type RemovalCall = tokio::task::JoinHandle<Result<Response, CallError>>;

/// What the members asked to remove this node said.
enum RemovalAsked {
    Confirmed(RemoveReply),
    /// None confirmed: why, member by member; the calls still unanswered
    /// when their wait ended; and whether any may have removed the node
    /// (those, or a connection lost under a request).
    Unconfirmed {
        reasons: Vec<String>,
        pending: Vec<RemovalCall>,
        unknown: bool,
    },
}

/// The members among `answered` whose `Stats` satisfy `pick`, by name.
pub(super) fn named(answered: &[(NodeId, NodeStats)], pick: fn(&NodeStats) -> bool) -> Vec<String> {
    answered
        .iter()
        .filter(|(_, stats)| pick(stats))
        .map(|(id, _)| id.to_string())
        .collect()
}

/// The late failure a leave reports when `still_running` requests (other
/// than the leave) outlasted [`IN_FLIGHT_WAIT`]: a write among them may
/// store a key after the last pass has read it.
fn requests_outlasting_the_wait(me: &NodeId, still_running: usize) -> Option<PeerFailure> {
    (still_running > 0).then(|| PeerFailure {
        peer: me.clone(),
        reason: format!(
            "{still_running} requests were still running {} s after the node stopped serving, when the last hand-over began: a write among them may have missed it; run `ringkv repair` on the members",
            IN_FLIGHT_WAIT.as_secs()
        ),
    })
}

/// Sends `items` to `replica` in one `SyncBatch`, within a timeout that
/// grows with their bytes, trying up to [`BATCH_ATTEMPTS`] times, `pause`
/// apart and then twice that. `Ok(Some(refusal))`: the replica took every
/// key but those the refusal names, whose merge would pass the per-key
/// limits (not tried again: that does not change until a client resolves
/// the key's siblings).
pub(super) async fn send_batch<T: Transport>(
    transport: &T,
    replica: NodeId,
    items: Vec<KeyClock>,
    pause: Duration,
) -> Result<Option<String>, PeerFailure> {
    let bytes = items
        .iter()
        .map(|i| i.key.len() + i.clock.approx_size())
        .sum();
    let timeout = ringkv_repair::handoff::send_timeout_for(HAND_OVER_TIMEOUT, bytes);
    let request = Request::Replica(ReplicaRequest::SyncBatch { items });
    let mut reason = String::new();
    for attempt in 1..=BATCH_ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(pause * (attempt - 1)).await;
        }
        let answer = tokio::time::timeout(timeout, transport.call(&replica, request.clone())).await;
        reason = match answer {
            Ok(Ok(Response::Clock(None))) => return Ok(None),
            Ok(Ok(Response::Error(e))) if e.is_merge_refusal() => return Ok(Some(e.message)),
            Ok(Ok(Response::Error(e))) => e.message,
            Ok(Ok(other)) => format!("unexpected answer {other:?}"),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} s", timeout.as_secs()),
        };
        tracing::debug!(%replica, %reason, attempt, "a hand-over batch failed");
    }
    Err(PeerFailure {
        peer: replica,
        reason,
    })
}

/// `call`'s answer if it comes within `timeout` and is not an error;
/// otherwise why not (the error answer, the transport's failure or the
/// timeout), as a reason to show the operator.
async fn answer_within<E: std::fmt::Display>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<Response, E>>,
) -> Result<Response, String> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(Response::Error(e))) => Err(e.message),
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_core::TransportError;
    use std::sync::atomic::AtomicU32;

    /// A replica that sheds load for its first `overloaded` batches.
    struct Shedding {
        overloaded: u32,
        calls: AtomicU32,
    }

    impl Transport for Shedding {
        async fn call(&self, _to: &NodeId, _request: Request) -> Result<Response, TransportError> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(if call < self.overloaded {
                Response::error(ErrorKind::Overloaded, "too many requests")
            } else {
                Response::Clock(None)
            })
        }
    }

    /// A batch a replica refuses for a moment goes through on a later try,
    /// rather than end the leave; one it keeps refusing fails after three.
    #[tokio::test(start_paused = true)]
    async fn a_hand_over_batch_is_tried_again_before_the_leave_fails() {
        let replica = NodeId::new("n2").unwrap();
        let items = || {
            vec![KeyClock {
                key: b"k".to_vec(),
                clock: ringkv_core::dvv::Clock::new(),
            }]
        };
        let pause = Duration::from_secs(1);
        let brief = Shedding {
            overloaded: 2,
            calls: AtomicU32::new(0),
        };
        let started = tokio::time::Instant::now();
        assert_eq!(
            send_batch(&brief, replica.clone(), items(), pause)
                .await
                .unwrap(),
            None
        );
        assert_eq!(brief.calls.load(Ordering::SeqCst), 3);
        assert_eq!(started.elapsed(), Duration::from_secs(3), "1 s, then 2 s");
        let lasting = Shedding {
            overloaded: u32::MAX,
            calls: AtomicU32::new(0),
        };
        let failure = send_batch(&lasting, replica, items(), pause)
            .await
            .unwrap_err();
        assert_eq!(lasting.calls.load(Ordering::SeqCst), BATCH_ATTEMPTS);
        assert!(failure.reason.contains("too many requests"), "{failure:?}");
    }

    /// A replica that refuses to merge a key of the batch (the per-key
    /// limits) took the others: that is said, not tried again, and not a
    /// failure of the replica.
    #[tokio::test]
    async fn a_batch_whose_merge_a_replica_refuses_is_not_tried_again() {
        struct Refusing(AtomicU32);
        impl Transport for Refusing {
            async fn call(&self, _: &NodeId, _: Request) -> Result<Response, TransportError> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Ok(Response::error(
                    ErrorKind::InvalidRequest,
                    format!(
                        "n2: {MERGE_REFUSED} 1 of the batch's 1 keys, first key \"k\": too large"
                    ),
                ))
            }
        }
        let refusing = Refusing(AtomicU32::new(0));
        let items = vec![KeyClock {
            key: b"k".to_vec(),
            clock: ringkv_core::dvv::Clock::new(),
        }];
        let refused = send_batch(&refusing, NodeId::new("n2").unwrap(), items, Duration::ZERO)
            .await
            .unwrap();
        assert!(refused.is_some_and(|r| r.contains("first key \"k\"")));
        assert_eq!(refusing.0.load(Ordering::SeqCst), 1);
    }

    /// Requests still running when the last pass begins are reported, not
    /// passed over.
    #[test]
    fn requests_outlasting_the_wait_are_reported() {
        let me = NodeId::new("n1").unwrap();
        assert!(requests_outlasting_the_wait(&me, 0).is_none());
        let failure = requests_outlasting_the_wait(&me, 2).unwrap();
        assert_eq!(failure.peer, me);
        assert!(
            failure
                .reason
                .starts_with("2 requests were still running 10 s"),
            "{}",
            failure.reason
        );
    }

    /// A leave that fails after a member removed the node tells
    /// `NodeHandle::removed` (the removal itself did not, the node being
    /// busy leaving); one that fails otherwise, or succeeds, does not.
    #[test]
    fn a_failed_leave_tells_of_a_removal_that_came_meanwhile() {
        for (removed_meanwhile, left, told) in [
            (true, false, true),
            (false, false, false),
            (true, true, false),
        ] {
            let (leaving, is_removed) = (AtomicBool::new(true), AtomicBool::new(removed_meanwhile));
            let removed = tokio::sync::watch::Sender::new(false);
            drop(LeavingGuard {
                leaving: &leaving,
                is_removed: &is_removed,
                removed: &removed,
                left,
            });
            assert_eq!(
                *removed.borrow(),
                told,
                "removed {removed_meanwhile}, left {left}"
            );
            assert_eq!(
                leaving.load(Ordering::SeqCst),
                left,
                "a leave that failed is over"
            );
        }
    }
}
