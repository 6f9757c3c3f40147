//! The rings this node replaced lately, so that tombstone collection does
//! not remove a delete that a ring hand-over could still undo.
//!
//! A member that replicated a key under the ring before a change hands its
//! copy to the key's new replicas (`ring_handover`, Dynamo §4.2) for up to
//! half the tombstone grace after the change. If that member missed the
//! delete (it was down, and anti-entropy had not reached the key yet), its
//! copy is the deleted value. Collection asks only the key's replicas under
//! the current ring, which no longer include that member: a tombstone
//! already past its grace at the change would be collected at once, the
//! value would then arrive at a new replica with nothing there to cover
//! it, and anti-entropy would spread it back to every replica.
//!
//! So a node keeps each ring it replaced, with when (its own wall clock),
//! for half the grace plus a margin (clock differences, how fast
//! membership spreads), and collection leaves a tombstone in place while
//! any of those rings placed its key on a node the current ring does not:
//! until then the tombstone is there to cover whatever is handed over.
//! A hand-over dates a change no later than this node learned of it, and
//! stops half the grace after that date, so the window covers it.
//!
//! The list is kept in the data dir: a restart inside the window must not
//! forget it. A list that cannot be read, or rings let go before their
//! window ended (more changes than [`RECENT_RINGS_MAX`] in one window),
//! defer every collection until the window would have ended.

use std::sync::Arc;
use std::time::Duration;

use ringkv_core::handover_record::{
    decode_recent_rings, encode_recent_rings, RecentRingsRecord, ReplacedRing,
};
use ringkv_ring::Ring;

use super::handover_store::{layout_of, ring_of};
use crate::storage::{millis, unix_ms, Storage};

/// Where the list is kept, in `meta`. A change to `RecentRingsRecord` must
/// change the key.
const META_RECENT_RINGS: &str = "recent_rings_v1";
/// The most rings kept at once: more changes within one window let the
/// oldest go, and defer all collection until its window ends.
pub(super) const RECENT_RINGS_MAX: usize = 16;
/// Added to half the grace: how far the nodes' clocks, and their learning
/// of a change, may differ. A quarter of the grace at most, as the
/// hand-over's own margin, so a short grace (tests) keeps a short window.
const WINDOW_MARGIN: Duration = Duration::from_secs(600);

/// The rings replaced within the window, and until when nothing is
/// collected. See the module docs.
///
/// Invariant: every ring kept was replaced less than `window_ms` before the
/// last call that pruned; `rings.len() <= RECENT_RINGS_MAX`.
#[derive(Debug)]
pub(crate) struct RecentRings {
    window_ms: u64,
    rings: Vec<(Arc<Ring>, u64)>,
    defer_all_until_unix_ms: u64,
}

impl RecentRings {
    /// An empty list for a tombstone grace of `grace`.
    pub(super) fn new(grace: Duration) -> Self {
        RecentRings {
            window_ms: millis(grace / 2 + WINDOW_MARGIN.min(grace / 4)),
            rings: Vec::new(),
            defer_all_until_unix_ms: 0,
        }
    }

    /// A list that defers every collection for a whole window from
    /// `now_unix_ms`: what a start that cannot tell what it replaced gets.
    pub(super) fn deferring_all(grace: Duration, now_unix_ms: u64) -> Self {
        let mut recent = RecentRings::new(grace);
        recent.defer_all_until(now_unix_ms.saturating_add(recent.window_ms));
        recent
    }

    /// Notes that `old` stopped being this node's ring at `at_unix_ms`.
    pub(super) fn note_replaced(&mut self, old: Arc<Ring>, at_unix_ms: u64) {
        self.prune(at_unix_ms);
        self.rings.push((old, at_unix_ms));
        while self.rings.len() > RECENT_RINGS_MAX {
            let (_, at) = self.rings.remove(0);
            self.defer_all_until(at.saturating_add(self.window_ms));
        }
    }

    /// Whether, at `now_unix_ms`, a tombstone of `key` must stay: every
    /// collection is deferred, or a ring replaced within the window placed
    /// `key` on a node that `current` does not.
    pub(crate) fn moved_lately(&self, key: &[u8], current: &Ring, now_unix_ms: u64) -> bool {
        if now_unix_ms < self.defer_all_until_unix_ms {
            return true;
        }
        let mut replicas_now = None;
        self.rings
            .iter()
            .filter(|(_, at)| now_unix_ms < at.saturating_add(self.window_ms))
            .any(|(old, _)| {
                let now = replicas_now.get_or_insert_with(|| current.replicas_of(key));
                old.replicas_of(key).iter().any(|r| !now.contains(r))
            })
    }

    fn prune(&mut self, now_unix_ms: u64) {
        let window_ms = self.window_ms;
        self.rings
            .retain(|(_, at)| now_unix_ms < at.saturating_add(window_ms));
    }

    fn defer_all_until(&mut self, until_unix_ms: u64) {
        self.defer_all_until_unix_ms = self.defer_all_until_unix_ms.max(until_unix_ms);
    }

    /// Reads the list the last run kept. One that cannot be read defers
    /// every collection for a whole window from now.
    pub(super) fn restore(storage: &Storage, grace: Duration) -> Self {
        let mut recent = RecentRings::new(grace);
        let now = unix_ms();
        let record = match storage.meta_get(META_RECENT_RINGS) {
            Ok(None) => return recent,
            Ok(Some(bytes)) => decode_recent_rings(&bytes).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let record = record.and_then(|record| {
            let rings: Result<Vec<(Arc<Ring>, u64)>, String> = record
                .rings
                .iter()
                .map(|r| {
                    let ring = ring_of(&r.layout).map_err(|e| e.to_string())?;
                    // A clock that was ahead then must not stretch the window.
                    Ok((Arc::new(ring), r.replaced_at_unix_ms.min(now)))
                })
                .collect();
            Ok((rings?, record.defer_all_until_unix_ms))
        });
        match record {
            Ok((rings, defer_all_until)) => {
                recent.rings = rings;
                recent.defer_all_until(defer_all_until.min(now.saturating_add(recent.window_ms)));
                recent.prune(now);
                recent.rings.truncate(RECENT_RINGS_MAX);
            }
            Err(reason) => {
                tracing::error!(
                    %reason,
                    "could not read the rings this node replaced lately from its data dir; no tombstone is collected for half the grace"
                );
                recent = RecentRings::deferring_all(grace, now);
            }
        }
        recent
    }

    /// Keeps the list for the next start; a failure is logged (the list
    /// goes on in memory, and a restart would forget it).
    pub(super) fn save(&self, storage: &Storage) {
        let record = RecentRingsRecord {
            rings: self
                .rings
                .iter()
                .map(|(ring, at)| ReplacedRing {
                    layout: layout_of(ring),
                    replaced_at_unix_ms: *at,
                })
                .collect(),
            defer_all_until_unix_ms: self.defer_all_until_unix_ms,
        };
        if let Err(e) = storage.meta_put(META_RECENT_RINGS, &encode_recent_rings(&record)) {
            tracing::error!(error = %e, "could not keep the rings this node replaced lately in its data dir; a restart would let tombstone collection forget them");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_core::NodeId;

    fn ring(ids: &[&str]) -> Arc<Ring> {
        Arc::new(Ring::new(ids.iter().map(|s| (NodeId::new(*s).unwrap(), 16)), 3).unwrap())
    }

    const GRACE: Duration = Duration::from_secs(86_400);
    const T0_UNIX_MS: u64 = 1_700_000_000_000;
    const WINDOW_MS: u64 = (43_200 + 600) * 1000;

    /// A key that `before` placed on `gone`, and `after` does not.
    fn moved_key(before: &Ring, after: &Ring) -> Vec<u8> {
        (0..10_000)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| before.replicas_of(k) != after.replicas_of(k))
            .expect("a join moves some keys")
    }

    fn kept_key(before: &Ring, after: &Ring) -> Vec<u8> {
        (0..10_000)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| before.replicas_of(k) == after.replicas_of(k))
            .expect("a join leaves some keys")
    }

    /// A key a ring replaced within the window placed elsewhere keeps its
    /// tombstone until the window ends; a key the change did not move, and
    /// any key after the window, may go.
    #[test]
    fn only_keys_a_recent_change_moved_are_held_and_only_for_the_window() {
        let (before, after) = (
            ring(&["a", "b", "c", "d"]),
            ring(&["a", "b", "c", "d", "e"]),
        );
        let (moved, kept) = (moved_key(&before, &after), kept_key(&before, &after));
        let mut recent = RecentRings::new(GRACE);
        assert!(!recent.moved_lately(&moved, &after, T0_UNIX_MS));
        recent.note_replaced(before, T0_UNIX_MS);
        assert!(recent.moved_lately(&moved, &after, T0_UNIX_MS));
        assert!(recent.moved_lately(&moved, &after, T0_UNIX_MS + WINDOW_MS - 1));
        assert!(!recent.moved_lately(&moved, &after, T0_UNIX_MS + WINDOW_MS));
        assert!(!recent.moved_lately(&kept, &after, T0_UNIX_MS));
    }

    /// More changes in one window than are kept: the oldest goes, and with
    /// it every collection until its window would have ended.
    #[test]
    fn rings_let_go_early_defer_every_collection_until_their_window_ends() {
        let (before, after) = (
            ring(&["a", "b", "c", "d"]),
            ring(&["a", "b", "c", "d", "e"]),
        );
        let kept = kept_key(&before, &after);
        let mut recent = RecentRings::new(GRACE);
        for i in 0..=RECENT_RINGS_MAX as u64 {
            recent.note_replaced(before.clone(), T0_UNIX_MS + i);
        }
        assert_eq!(recent.rings.len(), RECENT_RINGS_MAX);
        assert!(recent.moved_lately(&kept, &after, T0_UNIX_MS + WINDOW_MS - 1));
        assert!(!recent.moved_lately(&kept, &after, T0_UNIX_MS + WINDOW_MS + 1));
    }

    /// A restart inside the window reads the list back; one whose record
    /// is damaged defers every collection for a window from its start.
    #[test]
    fn a_restart_keeps_the_window_and_a_damaged_list_defers_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (before, after) = (
            ring(&["a", "b", "c", "d"]),
            ring(&["a", "b", "c", "d", "e"]),
        );
        let (moved, kept) = (moved_key(&before, &after), kept_key(&before, &after));
        let now = unix_ms();
        {
            let storage = Storage::open(dir.path(), false).unwrap();
            let mut recent = RecentRings::restore(&storage, GRACE);
            assert!(!recent.moved_lately(&kept, &after, now));
            recent.note_replaced(before, now);
            recent.save(&storage);
        }
        let storage = Storage::open(dir.path(), false).unwrap();
        let recent = RecentRings::restore(&storage, GRACE);
        assert!(recent.moved_lately(&moved, &after, now + 1));
        assert!(!recent.moved_lately(&kept, &after, now + 1));

        storage.meta_put(META_RECENT_RINGS, b"damaged").unwrap();
        let recent = RecentRings::restore(&storage, GRACE);
        assert!(recent.moved_lately(&kept, &after, unix_ms()));
        assert!(!recent.moved_lately(&kept, &after, unix_ms() + WINDOW_MS + 1_000));
    }
}
