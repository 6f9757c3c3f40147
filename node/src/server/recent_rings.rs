//! The rings this node replaced lately, so that tombstone collection does
//! not remove a delete that a ring hand-over could still undo.
//!
//! A member that replicated a key under the ring before a change, and
//! stays a member, hands its copy to the key's new replicas
//! (`ring_handover`, Dynamo §4.2) for up to half the tombstone grace after
//! the change. If that member missed the delete (it was down, and
//! anti-entropy had not reached the key yet), its copy is the deleted
//! value. Collection asks only the key's replicas under the current ring,
//! which no longer include that member: a tombstone already past its grace
//! at the change would be collected at once, the value would then arrive
//! at a new replica with nothing there to cover it, and anti-entropy would
//! spread it back to every replica.
//!
//! So a node keeps each ring it replaced, with when (its own wall clock),
//! for half the grace plus a margin (clock differences, how fast
//! membership spreads), and collection leaves a tombstone in place while
//! any of those rings placed its key on a node that is still a member but
//! no longer a replica of it: until then the tombstone is there to cover
//! whatever that node hands over. (A member that left handed its keys over
//! before it went, and a removed one hands over nothing.) A hand-over
//! dates a change no later than this node learned of it, and stops half
//! the grace after that date, so the window covers it.
//!
//! The hand-over loop notes each change when it takes the new ring in,
//! which may be later than the ring's install (a pass under way finishes
//! first). Until then collection is deferred as a whole: the list also
//! keeps the fingerprint of the ring it knows as current, and a check
//! under any other ring waits.
//!
//! The list is kept in the data dir: a restart inside the window must not
//! forget it. A list that cannot be read, or rings let go before their
//! window ended (more changes than [`RECENT_RINGS_MAX`] in one window),
//! defer every collection until the window would have ended, and that is
//! kept too.

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

/// The rings replaced within the window, the ring known as current, and
/// until when nothing is collected. See the module docs.
///
/// Invariant: `rings.len() <= RECENT_RINGS_MAX`, oldest first.
#[derive(Debug)]
pub(crate) struct RecentRings {
    window_ms: u64,
    rings: Vec<(Arc<Ring>, u64)>,
    /// The fingerprint of the ring the hand-over loop took in last; `None`
    /// before it took one in (nothing is collected then).
    current: Option<u64>,
    defer_all_until_unix_ms: u64,
}

impl RecentRings {
    /// An empty list for a tombstone grace of `grace`.
    pub(super) fn new(grace: Duration) -> Self {
        RecentRings {
            window_ms: millis(grace / 2 + WINDOW_MARGIN.min(grace / 4)),
            rings: Vec::new(),
            current: None,
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

    /// Notes that `new` is this node's ring from `at_unix_ms`, in place of
    /// `old` (`None`: the first ring noted). Says whether the list changed
    /// (and should be kept).
    pub(super) fn note_ring(
        &mut self,
        old: Option<&Arc<Ring>>,
        new: &Ring,
        at_unix_ms: u64,
    ) -> bool {
        let fingerprint = new.fingerprint();
        let mut changed = self.current != Some(fingerprint);
        self.current = Some(fingerprint);
        let before = self.rings.len();
        self.prune(at_unix_ms);
        changed |= self.rings.len() != before;
        if let Some(old) = old.filter(|old| old.fingerprint() != fingerprint) {
            self.rings.push((old.clone(), at_unix_ms));
            changed = true;
        }
        self.let_go_past_max();
        changed
    }

    /// Lets the oldest rings go past [`RECENT_RINGS_MAX`], deferring all
    /// collection until their windows would have ended.
    fn let_go_past_max(&mut self) {
        while self.rings.len() > RECENT_RINGS_MAX {
            let (_, at) = self.rings.remove(0);
            self.defer_all_until(at.saturating_add(self.window_ms));
        }
    }

    /// Whether, at `now_unix_ms`, a tombstone of `key` checked under
    /// `current` must stay: every collection is deferred, `current` is not
    /// the ring noted as current, or a ring replaced within the window
    /// placed `key` on a member that `current` no longer places it on.
    pub(crate) fn moved_lately(&self, key: &[u8], current: &Ring, now_unix_ms: u64) -> bool {
        if now_unix_ms < self.defer_all_until_unix_ms || self.current != Some(current.fingerprint())
        {
            return true;
        }
        let mut replicas_now = None;
        self.rings
            .iter()
            .filter(|(_, at)| now_unix_ms < at.saturating_add(self.window_ms))
            .any(|(old, _)| {
                let now = replicas_now.get_or_insert_with(|| current.replicas_of(key));
                old.replicas_of(key)
                    .iter()
                    .any(|r| !now.contains(r) && current.has_node(r))
            })
    }

    /// Whether `ring` is the one noted as current: the hand-over loop has
    /// taken it in.
    pub(crate) fn notes_as_current(&self, ring: &Ring) -> bool {
        self.current == Some(ring.fingerprint())
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
    /// every collection for a whole window from now, and is replaced by a
    /// list that says so (or a node restarted within every window would
    /// never collect).
    pub(super) fn restore(storage: &Storage, grace: Duration) -> Self {
        let now = unix_ms();
        let record = match storage.meta_get(META_RECENT_RINGS) {
            Ok(None) => return RecentRings::new(grace),
            Ok(Some(bytes)) => decode_recent_rings(&bytes).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let restored = record.and_then(|record| {
            let mut recent = RecentRings::new(grace);
            for r in &record.rings {
                let ring = ring_of(&r.layout).map_err(|e| e.to_string())?;
                // A clock that was ahead then must not stretch the window.
                recent
                    .rings
                    .push((Arc::new(ring), r.replaced_at_unix_ms.min(now)));
            }
            recent.current =
                (record.current_fingerprint != 0).then_some(record.current_fingerprint);
            let until = record.defer_all_until_unix_ms;
            recent.defer_all_until(until.min(now.saturating_add(recent.window_ms)));
            recent.prune(now);
            recent.let_go_past_max();
            Ok(recent)
        });
        match restored {
            Ok(recent) => recent,
            Err(reason) => {
                tracing::error!(
                    %reason,
                    "could not read the rings this node replaced lately from its data dir; no tombstone is collected for half the grace"
                );
                let recent = RecentRings::deferring_all(grace, now);
                recent.record().save(storage);
                recent
            }
        }
    }

    /// What [`KeptRecentRings::save`] writes: taken under the lock, saved
    /// after it is let go.
    pub(super) fn record(&self) -> KeptRecentRings {
        KeptRecentRings(RecentRingsRecord {
            rings: self
                .rings
                .iter()
                .map(|(ring, at)| ReplacedRing {
                    layout: layout_of(ring),
                    replaced_at_unix_ms: *at,
                })
                .collect(),
            current_fingerprint: self.current.unwrap_or(0),
            defer_all_until_unix_ms: self.defer_all_until_unix_ms,
        })
    }
}

/// A copy of the list to keep in the data dir.
pub(super) struct KeptRecentRings(RecentRingsRecord);

impl KeptRecentRings {
    /// Keeps the list for the next start; a failure is logged (the list
    /// goes on in memory, and a restart would forget it).
    pub(super) fn save(&self, storage: &Storage) {
        if let Err(e) = storage.meta_put(META_RECENT_RINGS, &encode_recent_rings(&self.0)) {
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

    /// The rings before and after `e` joins `a`..`d`.
    fn e_joins() -> (Arc<Ring>, Arc<Ring>) {
        (
            ring(&["a", "b", "c", "d"]),
            ring(&["a", "b", "c", "d", "e"]),
        )
    }

    fn keys() -> impl Iterator<Item = Vec<u8>> {
        (0..10_000).map(|i| format!("k{i}").into_bytes())
    }

    /// A key whose replicas differ between the two rings, and one whose
    /// replicas do not.
    fn moved_and_kept(before: &Ring, after: &Ring) -> (Vec<u8>, Vec<u8>) {
        let moved = keys().find(|k| before.replicas_of(k) != after.replicas_of(k));
        let kept = keys().find(|k| before.replicas_of(k) == after.replicas_of(k));
        (
            moved.expect("a change moves some keys"),
            kept.expect("and leaves some"),
        )
    }

    /// A key a ring replaced within the window placed on a member that no
    /// longer replicates it keeps its tombstone until the window ends; a key
    /// the change did not move, and any key after the window, may go.
    #[test]
    fn only_keys_a_recent_change_moved_are_held_and_only_for_the_window() {
        let (before, after) = e_joins();
        let (moved, kept) = moved_and_kept(&before, &after);
        let mut recent = RecentRings::new(GRACE);
        assert!(recent.note_ring(None, &before, T0_UNIX_MS - 1));
        assert!(!recent.moved_lately(&moved, &before, T0_UNIX_MS));
        assert!(recent.note_ring(Some(&before), &after, T0_UNIX_MS));
        assert!(recent.moved_lately(&moved, &after, T0_UNIX_MS));
        assert!(recent.moved_lately(&moved, &after, T0_UNIX_MS + WINDOW_MS - 1));
        assert!(!recent.moved_lately(&moved, &after, T0_UNIX_MS + WINDOW_MS));
        assert!(!recent.moved_lately(&kept, &after, T0_UNIX_MS));
        assert!(
            !recent.note_ring(Some(&after), &after, T0_UNIX_MS),
            "no change"
        );
    }

    /// A ring installed that the list has not noted yet (the hand-over
    /// loop is busy with a pass) holds every tombstone until it is noted.
    #[test]
    fn a_ring_not_noted_yet_holds_every_tombstone() {
        let (before, after) = e_joins();
        let (_, kept) = moved_and_kept(&before, &after);
        let mut recent = RecentRings::new(GRACE);
        assert!(
            recent.moved_lately(&kept, &before, T0_UNIX_MS),
            "none noted"
        );
        recent.note_ring(None, &before, T0_UNIX_MS);
        assert!(!recent.moved_lately(&kept, &before, T0_UNIX_MS));
        assert!(
            recent.moved_lately(&kept, &after, T0_UNIX_MS),
            "after not noted"
        );
    }

    /// A member that left, or was removed, hands nothing over (its leave
    /// did): the keys it lost keep no tombstone back.
    #[test]
    fn keys_taken_only_from_departed_members_are_not_held() {
        let (before, after) = (
            ring(&["a", "b", "c", "d", "e"]),
            ring(&["a", "b", "c", "d"]),
        );
        let mut recent = RecentRings::new(GRACE);
        recent.note_ring(Some(&before), &after, T0_UNIX_MS);
        assert!(keys().all(|k| !recent.moved_lately(&k, &after, T0_UNIX_MS)));
    }

    /// More changes in one window than are kept: the oldest goes, and with
    /// it every collection until its window would have ended.
    #[test]
    fn rings_let_go_early_defer_every_collection_until_their_window_ends() {
        let (before, after) = e_joins();
        let (_, kept) = moved_and_kept(&before, &after);
        let mut recent = RecentRings::new(GRACE);
        for i in 0..=RECENT_RINGS_MAX as u64 {
            recent.note_ring(Some(&before), &after, T0_UNIX_MS + i);
        }
        assert_eq!(recent.rings.len(), RECENT_RINGS_MAX);
        assert!(recent.moved_lately(&kept, &after, T0_UNIX_MS + WINDOW_MS - 1));
        assert!(!recent.moved_lately(&kept, &after, T0_UNIX_MS + WINDOW_MS + 1));
    }

    /// A restart inside the window reads the list back; one whose record
    /// is damaged defers every collection for a window from its start, and
    /// keeps that, so a second restart does not start the window again.
    #[test]
    fn a_restart_keeps_the_window_and_a_damaged_list_defers_everything_once() {
        let dir = tempfile::tempdir().unwrap();
        let (before, after) = e_joins();
        let (moved, kept) = moved_and_kept(&before, &after);
        let now = unix_ms();
        {
            let storage = Storage::open(dir.path(), false).unwrap();
            let mut recent = RecentRings::restore(&storage, GRACE);
            recent.note_ring(None, &before, now);
            assert!(!recent.moved_lately(&kept, &before, now));
            recent.note_ring(Some(&before), &after, now);
            recent.record().save(&storage);
        }
        let storage = Storage::open(dir.path(), false).unwrap();
        let recent = RecentRings::restore(&storage, GRACE);
        assert!(recent.moved_lately(&moved, &after, now + 1));
        assert!(!recent.moved_lately(&kept, &after, now + 1));

        storage.meta_put(META_RECENT_RINGS, b"damaged").unwrap();
        let first = RecentRings::restore(&storage, GRACE);
        assert!(first.moved_lately(&kept, &after, unix_ms()));
        let again = RecentRings::restore(&storage, GRACE);
        assert_eq!(
            again.defer_all_until_unix_ms, first.defer_all_until_unix_ms,
            "the deferral was kept, not begun again"
        );
    }
}
