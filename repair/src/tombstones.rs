//! Tombstone collection: when a deleted key's tombstone may be dropped
//! without the deleted value coming back.
//!
//! A delete stores a tombstone, which handoff, read repair and anti-entropy
//! spread like any write: a replica that missed the delete still holds the
//! old value, and only the tombstone's clock (which dominates it) can
//! supersede it. Dropping the tombstone too early would let that old value
//! flow back ("resurrection"). So a tombstone is collected only when
//!
//! 1. it is older than a grace period (`--tombstone-grace-s`), which must
//!    exceed the hint window so that no hint still carries an older value,
//!    and
//! 2. every other replica in the key's preference list answers, and holds
//!    exactly this tombstone or nothing at all (it collected it already, or
//!    never had the key; anti-entropy never copies a bare tombstone to a
//!    replica without the key).
//!
//! Any replica that cannot be asked, or holds anything else, keeps the
//! tombstone for a later pass. The node removes it under the key's lock and
//! only if it is still the version that was checked.
//!
//! Collecting a tombstone forgets the dots in its clock, this node's own
//! among them. A later write to the key coordinated here therefore mints
//! under a new per-key actor (see `ReplicaService`), so it cannot repeat a
//! dot that a replica still holding the tombstone knows.

use std::time::Duration;

use ringkv_core::dvv::Clock;
use ringkv_core::wire::{ReplicaRequest, Request, Response};
use ringkv_core::{NodeId, Transport};
use ringkv_ring::Ring;

use crate::anti_entropy::is_deleted;

/// The default grace period, in seconds: one day.
pub const DEFAULT_TOMBSTONE_GRACE_S: u64 = 24 * 60 * 60;

/// Whether a tombstone `ours` may go, given what every other replica holds.
pub fn may_collect(ours: &Clock, others: &[Option<Clock>]) -> bool {
    is_deleted(ours)
        && others
            .iter()
            .all(|theirs| theirs.as_ref().is_none_or(|t| t == ours))
}

/// What the other replicas say of a tombstone ([`confirm_collectable`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// Every other replica holds it or nothing: it may go.
    Collectable,
    /// It stays: ours is no tombstone, or a replica holds something else.
    Kept,
    /// A replica could not be asked (no answer in time, an error): it stays
    /// until a later pass can ask.
    Unconfirmed { replica: NodeId, reason: String },
}

impl Confirmation {
    pub fn is_collectable(&self) -> bool {
        *self == Confirmation::Collectable
    }
}

/// Asks every other replica of `key` on `ring` what it holds, and decides
/// with [`may_collect`], one answer at a time: the first that says no ends
/// it, and no answer is held past its verdict (a key written again since
/// may hold a large value). Any failure to ask means no, and says which
/// replica failed.
pub async fn confirm_collectable<T: Transport>(
    transport: &T,
    ring: &Ring,
    me: &NodeId,
    key: &[u8],
    ours: &Clock,
    timeout: Duration,
) -> Confirmation {
    if !is_deleted(ours) {
        return Confirmation::Kept;
    }
    for replica in ring.replicas_of(key) {
        if replica == *me {
            continue;
        }
        let request = Request::Replica(ReplicaRequest::Read {
            key: key.to_vec(),
            hint_for: None,
        });
        let reason = match tokio::time::timeout(timeout, transport.call(&replica, request)).await {
            Ok(Ok(Response::Clock(theirs))) => {
                if !may_collect(ours, &[theirs]) {
                    return Confirmation::Kept;
                }
                continue;
            }
            Ok(Ok(Response::Error(e))) => e.message,
            Ok(Ok(other)) => format!("unexpected answer {other:?}"),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", timeout.as_millis()),
        };
        return Confirmation::Unconfirmed { replica, reason };
    }
    Confirmation::Collectable
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{n, write};
    use ringkv_core::dvv::Payload;

    fn deleted(of: &Clock) -> Clock {
        let mut c = of.clone();
        c.update(&of.context(), Payload::Tombstone, &n("n1"));
        c
    }

    #[test]
    fn a_tombstone_goes_only_when_every_other_replica_holds_it_or_nothing() {
        let live = write("n1", "v");
        let tomb = deleted(&live);
        assert!(may_collect(&tomb, &[Some(tomb.clone()), None]));
        assert!(may_collect(&tomb, &[]), "N=1");
        assert!(
            !may_collect(&tomb, &[Some(tomb.clone()), Some(live.clone())]),
            "a replica still holds the old value"
        );
        let mut newer = tomb.clone();
        newer.update(&tomb.context(), Payload::Value(b"again".to_vec()), &n("n2"));
        assert!(!may_collect(&tomb, &[Some(newer)]), "written again since");
        assert!(!may_collect(&live, &[None, None]), "not a tombstone");
    }
}
