//! Cleanup: which stray copies a node may drop (`ringkv cleanup`,
//! Cassandra's `nodetool cleanup`).
//!
//! When a member joins, each range it takes over drops one of its former
//! replicas from the preference list (Dynamo §4.2: the new node takes keys
//! from its successors). ringkv does not move those keys off the former
//! replica: anti-entropy fills the new one from the key's other replicas.
//! So the former replica keeps a *stray copy*: disk it no longer needs, and
//! a hazard. Tombstone collection asks only the current replicas, so a
//! stray copy can outlive its key's tombstone; should the ring change back
//! (the new member leaves), the old value would come back as a live one.
//!
//! A stray copy may go once some current replica holds that version or a
//! newer one ([`Clock::descends`]): its data is then not lost, and
//! anti-entropy brings the key's other replicas up to that replica. A copy
//! that no replica covers is kept: it is either a write that only this node
//! received, which must not be lost, or a value deleted since whose
//! tombstone the replicas have collected, which must not come back. The
//! node cannot tell the two apart, so it neither drops the copy nor hands it
//! on, and reports it (see `CleanupReport::kept`).
//!
//! The node drops a copy under the key's lock, and only if it is still the
//! version that was checked: a write since keeps it. What else it must do
//! around that (no leave at the same time, the ring unchanged, a new actor
//! before it forgets its own dots) is in the node's `server/cleanup.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use ringkv_core::dvv::Clock;
use ringkv_core::wire::{PeerFailure, ReplicaRequest, Request, Response};
use ringkv_core::{NodeId, Transport};
use ringkv_ring::Ring;

use crate::anti_entropy::answer_kind;

/// Whether `ours` may be dropped, given what the key's current replicas
/// that answered hold: one of them has seen every version in it.
pub fn covered(ours: &Clock, theirs: &[Option<Clock>]) -> bool {
    theirs.iter().flatten().any(|t| t.descends(ours))
}

/// What the current replicas said of a page of stray copies.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Per copy, in order: whether a current replica covers it.
    pub covered: Vec<bool>,
    /// Replicas that could not be asked (or were skipped) and that a copy
    /// left uncovered needed, and why: to report.
    pub failures: Vec<PeerFailure>,
    /// Every replica asked on this page that failed, needed or not: not
    /// to ask again.
    pub unreachable: Vec<PeerFailure>,
}

/// Asks the current replicas (on `ring`) of each stray copy in `strays`
/// for their versions, one `ReadBatch` per replica, and decides with
/// [`covered`]. Replicas in `skip` (down, or failed earlier in the same
/// cleanup) are not asked. A replica that is skipped or fails is in the
/// verdict's failures only if a copy it could have covered is left
/// uncovered.
pub async fn check_page<T: Transport>(
    transport: &T,
    ring: &Ring,
    strays: &[(Vec<u8>, Clock)],
    skip: &BTreeMap<NodeId, String>,
    timeout: Duration,
) -> Verdict {
    let mut by_replica: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
    for (i, (key, _)) in strays.iter().enumerate() {
        for replica in ring.replicas_of(key) {
            by_replica.entry(replica).or_default().push(i);
        }
    }
    let mut covered_by_some = vec![false; strays.len()];
    let mut unanswered: Vec<(PeerFailure, Vec<usize>)> = Vec::new();
    let mut unreachable = Vec::new();
    for (replica, indices) in by_replica {
        // Copies another replica already covers need no second opinion.
        let indices: Vec<usize> = indices
            .into_iter()
            .filter(|&i| !covered_by_some[i])
            .collect();
        if indices.is_empty() {
            continue;
        }
        let reason = match skip.get(&replica) {
            Some(reason) => reason.clone(),
            None => {
                let keys: Vec<Vec<u8>> = indices.iter().map(|&i| strays[i].0.clone()).collect();
                let judge = |at: usize, theirs: Option<Clock>| {
                    let i = indices[at];
                    if covered(&strays[i].1, std::slice::from_ref(&theirs)) {
                        covered_by_some[i] = true;
                    }
                };
                match read_clocks(transport, &replica, &keys, timeout, judge).await {
                    Ok(()) => continue,
                    Err(reason) => {
                        unreachable.push(PeerFailure {
                            peer: replica.clone(),
                            reason: reason.clone(),
                        });
                        reason
                    }
                }
            }
        };
        let failure = PeerFailure {
            peer: replica,
            reason,
        };
        unanswered.push((failure, indices));
    }
    let failures = unanswered
        .into_iter()
        .filter(|(_, indices)| indices.iter().any(|&i| !covered_by_some[i]))
        .map(|(failure, _)| failure)
        .collect();
    Verdict {
        covered: covered_by_some,
        failures,
        unreachable,
    }
}

/// Reads `node`'s versions of `keys` and hands each to `judge` with its
/// index in `keys`, as its answer arrives, asking again for any the answer
/// left out for size. Each answer is dropped once judged: the replicas'
/// versions of a page have no size limit of their own (small stray
/// tombstones of keys written since with large values), and held for the
/// whole page they could take gigabytes.
async fn read_clocks<T: Transport>(
    transport: &T,
    node: &NodeId,
    keys: &[Vec<u8>],
    timeout: Duration,
    mut judge: impl FnMut(usize, Option<Clock>),
) -> Result<(), String> {
    let mut read = 0;
    while read < keys.len() {
        let request = Request::Replica(ReplicaRequest::ReadBatch {
            keys: keys[read..].to_vec(),
        });
        match tokio::time::timeout(timeout, transport.call(node, request)).await {
            Ok(Ok(Response::Clocks(got))) if !got.is_empty() && got.len() <= keys.len() - read => {
                for theirs in got {
                    judge(read, theirs);
                    read += 1;
                }
            }
            Ok(Ok(Response::Error(e))) => return Err(e.message),
            Ok(Ok(other)) => return Err(format!("unexpected answer {}", answer_kind(&other))),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no answer within {} s", timeout.as_secs())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
