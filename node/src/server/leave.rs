//! Leaving the cluster gracefully (`ringkv leave`): Cassandra's
//! decommission, Riak's `cluster leave`.
//!
//! `ringkv remove` is for a machine that is gone: its keys survive only on
//! their other replicas, and a write that it alone acknowledged (W=1) is
//! lost with it. A node that is still up can do better, because it holds
//! those keys. Asked to leave, it
//!
//! 1. refuses if the cluster would keep fewer than N members, or if it
//!    holds hints for members that are down (they would be lost with it);
//! 2. hands every key it stores (tombstones too) to the key's replicas
//!    under the ring without it: one `SyncBatch` per replica per page of
//!    keys, merged there and durable before they answer. Any failure stops
//!    the leave with the node still a member and nothing removed;
//! 3. asks another member to remove it (`Request::Remove`, which that member
//!    passes on to every other one), stores the new record and stops serving:
//!    from then on no coordinator sends it writes;
//! 4. hands over its keys once more, for the writes that arrived during the
//!    first pass. A replica that misses this second pass is named in the
//!    answer; anti-entropy copies those keys from the key's other replicas.
//!
//! The node keeps running, refusing every request but status, until its
//! operator stops it (like a decommissioned Cassandra node); started again,
//! it refuses, as a removed node does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ringkv_core::wire::{
    ErrorKind, KeyClock, LeaveReply, PeerFailure, RemoveReply, ReplicaRequest, Request, Response,
    READ_BATCH_REPLY_BYTES, REPAIR_BATCH_MAX,
};
use ringkv_core::{NodeId, Transport};
use ringkv_ring::Ring;

use super::NodeInner;
use crate::error::NodeError;

/// How long one batch of keys may take to reach a replica.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the member asked may take to remove this node and tell the
/// others (it tells them all at once, each within a second).
const REMOVAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Keys handed over in one pass.
struct HandedOver {
    keys: u64,
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
        let hints = self.hints.pending_total();
        if hints > 0 {
            return refuse(format!(
                "{} holds {hints} hints for members that are down, which would be lost with it; \
                 leave once they are delivered (`ringkv status` shows them), or remove those members first",
                self.id
            ));
        }
        let mut after = record.clone();
        after.members.remove(&self.id);
        let ring = match after.ring() {
            Ok(ring) => ring,
            Err(e) => return Response::error(ErrorKind::Internal, e.to_string()),
        };

        let first = match self.hand_over(&ring, true).await {
            Ok(done) => done,
            Err(failure) => {
                return Response::error(
                    ErrorKind::Unavailable,
                    format!(
                        "could not hand keys to {}: {}; {} is still a member and nothing was removed: bring {} up (or remove it) and leave again",
                        failure.peer, failure.reason, self.id, failure.peer
                    ),
                )
            }
        };
        let removal = match self.ask_removal(&after).await {
            Ok(removal) => removal,
            Err(reasons) => {
                return Response::error(
                    ErrorKind::Unavailable,
                    format!(
                        "every key was handed over, but no member could remove {} ({}); it is still a member: leave again, or `ringkv remove {}` on another member",
                        self.id,
                        reasons.join("; "),
                        self.id
                    ),
                )
            }
        };
        match self.membership.adopt(removal.record.clone()) {
            Err(NodeError::Removed { .. }) => {}
            other => tracing::warn!(
                result = ?other,
                "the removal's record did not name this node as removed"
            ),
        }
        self.stop_serving();
        tracing::warn!(node = %self.id, keys = first.keys, "left the cluster; stop this process");

        // The node's stop signal is set now (it stopped serving), so this
        // pass cannot watch it; a shutdown ends it anyway, by closing the
        // transport under it.
        let late_failures = match self.hand_over(&ring, false).await {
            Ok(_) => Vec::new(),
            Err(failure) => vec![failure],
        };
        Response::Left(LeaveReply {
            record: removal.record,
            keys: first.keys,
            not_told: removal.not_told,
            late_failures,
        })
    }

    /// Sends every stored key to its replicas under `ring`, a page at a
    /// time; stops at the first replica that does not take a batch, and, if
    /// `watch_shutdown`, when the node shuts down.
    async fn hand_over(
        &self,
        ring: &Ring,
        watch_shutdown: bool,
    ) -> Result<HandedOver, PeerFailure> {
        let mut after: Option<Vec<u8>> = None;
        let mut keys = 0u64;
        loop {
            if watch_shutdown && *self.shutdown.borrow() {
                return Err(PeerFailure {
                    peer: self.id.clone(),
                    reason: "this node is shutting down".into(),
                });
            }
            let storage = self.storage.clone();
            let from = after.clone();
            let page = tokio::task::spawn_blocking(move || {
                storage.data_page(from.as_deref(), REPAIR_BATCH_MAX, READ_BATCH_REPLY_BYTES)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|page| page.map_err(|e| e.to_string()))
            .map_err(|reason| PeerFailure {
                peer: self.id.clone(),
                reason: format!("reading its own store: {reason}"),
            })?;
            let Some((last, _)) = page.last() else {
                return Ok(HandedOver { keys });
            };
            after = Some(last.clone());
            let page_keys = page.len() as u64;
            keys += page_keys;
            let mut batches: BTreeMap<NodeId, Vec<KeyClock>> = BTreeMap::new();
            for (key, clock) in page {
                for replica in ring.preference_list(&key).replicas {
                    batches.entry(replica).or_default().push(KeyClock {
                        key: key.clone(),
                        clock: clock.clone(),
                    });
                }
            }
            let mut sends = tokio::task::JoinSet::new();
            for (replica, items) in batches {
                let transport = self.transport.clone();
                sends.spawn(async move {
                    let request = Request::Replica(ReplicaRequest::SyncBatch { items });
                    let answer =
                        tokio::time::timeout(HAND_OVER_TIMEOUT, transport.call(&replica, request))
                            .await;
                    let reason = match answer {
                        Ok(Ok(Response::Clock(None))) => return Ok(()),
                        Ok(Ok(Response::Error(e))) => e.message,
                        Ok(Ok(other)) => format!("unexpected answer {other:?}"),
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("no answer within {} s", HAND_OVER_TIMEOUT.as_secs()),
                    };
                    Err(PeerFailure {
                        peer: replica,
                        reason,
                    })
                });
            }
            while let Some(sent) = sends.join_next().await {
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(failure)) => return Err(failure),
                    Err(e) => {
                        return Err(PeerFailure {
                            peer: self.id.clone(),
                            reason: format!("a hand-over task failed: {e}"),
                        })
                    }
                }
            }
            metrics::counter!("ringkv_leave_keys_handed_over_total").increment(page_keys);
        }
    }

    /// Asks the members of `after` (the cluster without this node), one at
    /// a time, to remove this node and tell the others.
    async fn ask_removal(
        &self,
        after: &crate::membership::ClusterRecord,
    ) -> Result<RemoveReply, Vec<String>> {
        let request = Request::Remove {
            node: self.id.clone(),
            tell_others: true,
        };
        let mut reasons = Vec::new();
        for member in after.members.values() {
            let Ok(addr) = member.addr.parse() else {
                continue;
            };
            let answer =
                tokio::time::timeout(REMOVAL_TIMEOUT, self.transport.call_addr(addr, &request))
                    .await;
            let reason = match answer {
                Ok(Ok(Response::Removed(reply))) => return Ok(reply),
                Ok(Ok(Response::Error(e))) => e.message,
                Ok(Ok(other)) => format!("unexpected answer {other:?}"),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {} s", REMOVAL_TIMEOUT.as_secs()),
            };
            reasons.push(format!("{}: {reason}", member.id));
        }
        Err(reasons)
    }
}
