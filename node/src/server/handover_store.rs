//! The ring hand-over's state in the data dir (see `ring_handover`): the
//! newest ring it took in, the pass it owes, and when the node was last
//! known current (`ring_handover::Currency`).
//!
//! With these, a node restarted in the middle of a pass resumes it, and
//! one that was down while the ring changed owes the change once it is
//! back, dated from when it was last known current (the change was made
//! after that, give or take how fast membership spreads).
//!
//! The record is written, with an fsync, whenever the loop takes in a ring
//! and whenever a pass completes or is given up; the time current, when
//! it has moved on by [`SAVE_EVERY`] (a new node's at its first look) and
//! at shutdown, and only while the record holds the ring it goes with.

use std::sync::Arc;
use std::time::Duration;

use ringkv_core::handover_record::{
    decode_handover_record, encode_handover_record, HandoverRecord, RingLayout, RingSlot,
};
use ringkv_ring::{Ring, RingError};

use super::ring_handover::{Owed, OWED_RINGS_MAX};
use crate::storage::{unix_ms, Storage};

/// Where the record is kept, in `meta`. A change to `HandoverRecord` (or
/// what it holds) must change the key, as for the cluster record.
const META_HANDOVER: &str = "ring_handover_v1";
/// When the node was last known current: unix ms, little-endian.
const META_CURRENT: &str = "ring_current_unix_ms";
/// How far the time current moves on before it is written again: after a
/// crash, a change made while the node was down is dated up to this much
/// too early, which only brings its pass's deadline forward.
pub(super) const SAVE_EVERY: Duration = Duration::from_secs(60);

/// What a start finds in the data dir.
#[derive(Debug, Default)]
pub(super) struct Restored {
    /// The newest ring the last run took in (`None` in a data dir from
    /// before this record).
    pub seen: Option<Arc<Ring>>,
    /// The pass the last run owed and did not complete.
    pub owed: Option<Owed>,
    /// When the node was last known current, if it was ever noted.
    pub current_unix_ms: Option<u64>,
}

/// Reads what the last run kept. A record that cannot be read (a damaged
/// data dir) is logged and left aside: the node then owes only what a
/// later change takes from it, as a run before this record did.
pub(super) fn restore(storage: &Storage) -> Restored {
    let current_unix_ms = match storage.meta_get(META_CURRENT) {
        Ok(Some(bytes)) => match <[u8; 8]>::try_from(bytes.as_slice()) {
            // A clock that was ahead then must not date changes later.
            Ok(le) => Some(u64::from_le_bytes(le).min(unix_ms())),
            Err(_) => {
                tracing::error!(
                    len = bytes.len(),
                    "when this node was last current, kept in its data dir, is not 8 bytes; taken as unknown"
                );
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::error!(error = %e, "could not read when this node was last current; taken as unknown");
            None
        }
    };
    // Only when this node was last current: no ring, nothing owed.
    let nothing_kept = || Restored {
        current_unix_ms,
        ..Restored::default()
    };
    let unread = |reason: String| {
        tracing::error!(
            %reason,
            "could not read the ring hand-over's record from the data dir; a pass the last run owed, or a ring change made while this node was down, may not be handed over (anti-entropy and `ringkv repair` still fill keys that kept a replica)"
        );
        nothing_kept()
    };
    let bytes = match storage.meta_get(META_HANDOVER) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return nothing_kept(),
        Err(e) => return unread(e.to_string()),
    };
    let record = match decode_handover_record(&bytes) {
        Ok(record) => record,
        Err(e) => return unread(e.to_string()),
    };
    // No more rings are built than a node keeps: the first ones and the
    // newest, as `Owed::add` keeps them.
    let mut layouts = record.owed;
    if layouts.len() > OWED_RINGS_MAX {
        layouts.drain(OWED_RINGS_MAX / 2..layouts.len() - OWED_RINGS_MAX / 2);
    }
    let owed: Result<Vec<Arc<Ring>>, RingError> =
        layouts.iter().map(|l| ring_of(l).map(Arc::new)).collect();
    let (seen, owed) = match (record.seen.as_ref().map(ring_of).transpose(), owed) {
        (Ok(seen), Ok(owed)) => (seen.map(Arc::new), owed),
        (Err(e), _) | (_, Err(e)) => return unread(e.to_string()),
    };
    Restored {
        seen,
        owed: Owed::from_rings(owed, record.owed_since_unix_ms.min(unix_ms())),
        current_unix_ms,
    }
}

/// Keeps `seen` and `owed` for the next start; says whether it could. A
/// failure is logged: the pass goes on in memory.
pub(super) fn save(storage: &Storage, seen: Option<&Arc<Ring>>, owed: Option<&Owed>) -> bool {
    let record = HandoverRecord {
        seen: seen.map(|r| layout_of(r)),
        owed: owed.map_or_else(Vec::new, |o| {
            o.rings().iter().map(|r| layout_of(r)).collect()
        }),
        owed_since_unix_ms: owed.map_or(0, Owed::since_unix_ms),
    };
    match storage.meta_put(META_HANDOVER, &encode_handover_record(&record)) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "could not keep the ring hand-over's state in the data dir; a restart would forget the pass owed");
            false
        }
    }
}

/// Keeps when the node was last known current.
pub(super) fn save_current(storage: &Storage, current_unix_ms: u64) {
    if let Err(e) = storage.meta_put(META_CURRENT, &current_unix_ms.to_le_bytes()) {
        tracing::warn!(error = %e, "could not keep in the data dir when this node was last current");
    }
}

pub(super) fn layout_of(ring: &Ring) -> RingLayout {
    RingLayout {
        replicas: u32::try_from(ring.replicas()).expect("N is at most REPLICAS_MAX"),
        members: ring
            .members()
            .iter()
            .map(|(id, vnodes)| RingSlot {
                id: id.clone(),
                vnodes: *vnodes,
            })
            .collect(),
    }
}

pub(super) fn ring_of(layout: &RingLayout) -> Result<Ring, RingError> {
    Ring::new(
        layout.members.iter().map(|s| (s.id.clone(), s.vnodes)),
        layout.replicas as usize,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_core::NodeId;

    fn ring(ids: &[&str]) -> Arc<Ring> {
        Arc::new(Ring::new(ids.iter().map(|s| (NodeId::new(*s).unwrap(), 16)), 3).unwrap())
    }

    fn storage(dir: &std::path::Path) -> Storage {
        Storage::open(dir, false).unwrap()
    }

    // In the past: times kept from the future read as now.
    const T0_UNIX_MS: u64 = 1_700_000_000_000;

    /// What a run keeps, the next reads back: the ring it last took in,
    /// the pass it owed, since when, and when it was last current.
    #[test]
    fn a_restart_reads_back_what_the_last_run_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (before, after) = (ring(&["a", "b", "c"]), ring(&["a", "b", "c", "x"]));
        {
            let s = storage(dir.path());
            let restored = restore(&s);
            assert!(restored.seen.is_none() && restored.owed.is_none());
            assert!(restored.current_unix_ms.is_none());
            let mut owed = None;
            Owed::add(&mut owed, before.clone(), T0_UNIX_MS);
            save(&s, Some(&after), owed.as_ref());
            save_current(&s, T0_UNIX_MS + 60_000);
        }
        let s = storage(dir.path());
        let restored = restore(&s);
        assert_eq!(restored.seen.as_deref(), Some(&*after));
        let owed = restored.owed.expect("the pass owed");
        assert_eq!(owed.rings().len(), 1);
        assert_eq!(*owed.rings()[0], *before);
        assert_eq!(owed.since_unix_ms(), T0_UNIX_MS);
        assert_eq!(restored.current_unix_ms, Some(T0_UNIX_MS + 60_000));
        // A pass completed: nothing owed any more.
        save(&s, Some(&after), None);
        assert!(restore(&s).owed.is_none());
    }

    /// Times kept by a clock that was ahead read as now at the latest.
    #[test]
    fn times_from_the_future_read_as_now() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        let mut owed = None;
        Owed::add(&mut owed, ring(&["a", "b", "c"]), u64::MAX - 1);
        save(&s, Some(&ring(&["a", "b"])), owed.as_ref());
        save_current(&s, u64::MAX - 1);
        let restored = restore(&s);
        let now = unix_ms();
        assert!(restored.current_unix_ms.unwrap() <= now);
        assert!(restored.owed.unwrap().since_unix_ms() <= now);
    }

    /// A record owing more rings than a node keeps builds only the first
    /// ones and the newest.
    #[test]
    fn a_record_owing_too_many_rings_keeps_the_first_and_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        let mut names = vec!["a".to_string(), "b".to_string()];
        let mut rings = Vec::new();
        for i in 0..20 {
            names.push(format!("n{i}"));
            let ids: Vec<&str> = names.iter().map(String::as_str).collect();
            rings.push(ring(&ids));
        }
        let record = HandoverRecord {
            seen: Some(layout_of(rings.last().unwrap())),
            owed: rings.iter().map(|r| layout_of(r)).collect(),
            owed_since_unix_ms: T0_UNIX_MS,
        };
        s.meta_put(META_HANDOVER, &encode_handover_record(&record))
            .unwrap();
        let owed = restore(&s).owed.unwrap();
        assert_eq!(owed.rings().len(), OWED_RINGS_MAX);
        assert_eq!(*owed.rings()[0], *rings[0]);
        assert_eq!(*owed.rings()[OWED_RINGS_MAX - 1], *rings[19]);
    }

    /// A damaged record is left aside.
    #[test]
    fn a_damaged_record_is_left_aside() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        s.meta_put(META_HANDOVER, b"damaged").unwrap();
        s.meta_put(META_CURRENT, b"short").unwrap();
        let restored = restore(&s);
        assert!(restored.seen.is_none() && restored.owed.is_none());
        assert!(restored.current_unix_ms.is_none());
    }
}
