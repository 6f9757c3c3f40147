//! Handing over the ranges a ring change took away (Dynamo §4.2: "when a
//! node is added ..., nodes that no longer need some of their keys transfer
//! them to the new node").
//!
//! A node that joins takes one replica slot of each key in the ranges it
//! takes over; the member that held that slot keeps its copy (a stray copy,
//! see `ringkv cleanup`). Anti-entropy fills the new node from the key's
//! other replicas, which is enough while one change comes at a time. But
//! several joins close together (scaling three nodes out to six) can take
//! every slot of a key: its new replicas then all lack it, anti-entropy
//! compares only replicas with each other, and the old copies, no longer
//! any replica's, would never be read again: a read would find nothing.
//!
//! So a member whose ring changes hands over what it gave up. For each key
//! it replicated under the ring before the change and does not under the
//! new one, it sends its version to the key's new replicas (those that were
//! not replicas before), one `SyncBatch` per replica per page of keys,
//! merged there and durable before they answer, as a leave does
//! (`server/leave.rs`). Tombstones go too: a stale copy elsewhere must not
//! outlive its delete.
//!
//! - **Which keys.** Only those the node replicated under a ring it had
//!   before the change: those copies were a replica's, up to date as far as
//!   the node knows. A copy it already held as a stray (from an older ring)
//!   may be a value deleted since, whose tombstone the replicas collected:
//!   handing that on would bring it back, so it stays (cleanup keeps it).
//! - **Changes during a pass.** The pass is owed for every ring since the
//!   last one it completed under: a key goes if the node replicated it under
//!   any of those rings and does not under the newest. Another change during
//!   a pass that places keys otherwise runs it again under the newest ring
//!   (not one that only records a member's restart or new address).
//! - **Until when.** A version handed over later than the tombstone grace
//!   after the change could meet a replica that collected the delete of it
//!   meanwhile, and bring it back. So a pass owed since longer than half the
//!   grace stops (at its next page; logged and counted); what it did not
//!   send stays as stray copies. A change is dated from when the node was
//!   last known current ([`Currency`]: its last membership exchange that
//!   answered, once it had taken in what that brought), less a margin for
//!   how fast membership spreads: seconds before it learns of it while it
//!   is in touch with some member. A node cut off from every member (a
//!   partition), or down, dates what it learns on its return from when it
//!   was cut off; past half the grace it hands none of that over, and
//!   says so: it is then a node down past the grace (README). Not caught:
//!   a group of members cut off (or down) together, each in touch with
//!   the others once back, and none with a member that kept up: each then
//!   takes the others' answers as current. A grace under a few minutes
//!   (tests) leaves a pass little time: the margin is a quarter of it.
//! - **Failures.** A replica that does not take its batch does not stop the
//!   others', and is sent no more in that pass (one that is down would cost
//!   every later batch a timeout). The pass goes to the end, and is run
//!   again after a back-off (merges are idempotent) until one goes through.
//! - **Pace.** Keys go at the anti-entropy pace (`--repair-keys-per-s`),
//!   a few batches in flight.
//! - **Restarts.** What is owed, the newest ring taken in, and when the
//!   node was last current are kept in the data dir (`handover_store`): a
//!   node restarted during a pass resumes it, and one that was down while
//!   the ring changed owes the change once it is back. No pass runs before
//!   the loop has taken in a ring installed in this run.
//! - **Not covered.** A node removed from the ring hands over nothing here:
//!   its leave does that, for the keys it replicates. A leave is refused
//!   while a pass is owed, since the keys of that pass are no longer ones
//!   it replicates, and would be left behind.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ringkv_core::wire::KeyClock;
use ringkv_core::NodeId;
use ringkv_ring::Ring;
use tokio::sync::watch;
use tokio::time::Instant;

use super::recent_rings::RecentRings;
use super::{handover_store, NodeInner};
use crate::storage::{millis, unix_ms};

/// Batches (one per replica per page of keys) sent and not yet answered.
const BATCHES_IN_FLIGHT: usize = 8;
/// The pause before a batch's second try (twice that before its third).
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// The wait before a pass that failed runs again, doubling up to the max.
const RETRY_INITIAL: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Rings kept while a pass is owed: more changes than this before one pass
/// completes keep the first ones and the newest (a key given up under a
/// ring dropped here may be missed; anti-entropy still compares it with
/// its other old replicas, if any).
pub(super) const OWED_RINGS_MAX: usize = 8;

/// What a pass owes: the rings this node had since the last pass that
/// completed, and since when (wall clock, as the tombstone grace is).
///
/// Invariant: `rings` is not empty, and holds at most [`OWED_RINGS_MAX`].
#[derive(Debug)]
pub(super) struct Owed {
    rings: Vec<Arc<Ring>>,
    since_unix_ms: u64,
}

impl Owed {
    /// The ring a change from `old` to `new` owes a pass for: `old`, if `me`
    /// was a member of it (a node that just joined gave up nothing). Equal
    /// rings (an address changed) owe nothing, and neither does a change
    /// that only takes members away (a leave, a removal): a key's replicas
    /// are the first N distinct nodes of its walk, and without some nodes a
    /// node that stays comes as early in it or earlier, so it gives up
    /// nothing. (Owing a pass there would scan the whole store to send
    /// nothing, and hold up this node's own leave meanwhile.)
    pub(super) fn owed_by_change(
        old: Option<&Arc<Ring>>,
        new: Option<&Arc<Ring>>,
        me: &NodeId,
    ) -> Option<Arc<Ring>> {
        let (old, new) = (old?, new?);
        let only_taken_away = new.replicas() == old.replicas()
            && new.members().iter().all(|m| old.members().contains(m));
        (old.fingerprint() != new.fingerprint() && old.has_node(me) && !only_taken_away)
            .then(|| old.clone())
    }

    /// Adds `ring` to what `owed` owes, owed since the earlier of
    /// `since_unix_ms` and what it was owed since, keeping the first rings
    /// and the newest within [`OWED_RINGS_MAX`].
    pub(super) fn add(owed: &mut Option<Owed>, ring: Arc<Ring>, since_unix_ms: u64) {
        let owed = owed.get_or_insert_with(|| Owed {
            rings: Vec::new(),
            since_unix_ms,
        });
        owed.since_unix_ms = owed.since_unix_ms.min(since_unix_ms);
        if owed.rings.len() >= OWED_RINGS_MAX {
            owed.rings.remove(OWED_RINGS_MAX / 2);
        }
        owed.rings.push(ring);
    }

    /// What a pass kept in the data dir owes: `None` if no ring.
    pub(super) fn from_rings(rings: Vec<Arc<Ring>>, since_unix_ms: u64) -> Option<Owed> {
        let mut owed = None;
        for ring in rings {
            Owed::add(&mut owed, ring, since_unix_ms);
        }
        owed
    }

    pub(super) fn rings(&self) -> &[Arc<Ring>] {
        &self.rings
    }

    pub(super) fn since_unix_ms(&self) -> u64 {
        self.since_unix_ms
    }

    /// Where `key` goes, given the node's newest ring: to its replicas under
    /// `latest` that were not replicas under every owed ring, if `me`
    /// replicated it under one of those and does not under `latest`;
    /// nowhere otherwise.
    pub(super) fn targets(&self, latest: &Ring, me: &NodeId, key: &[u8]) -> Vec<NodeId> {
        if latest.is_replica(key, me) || !self.rings.iter().any(|r| r.is_replica(key, me)) {
            return Vec::new();
        }
        latest
            .replicas_of(key)
            .into_iter()
            .filter(|n| !self.rings.iter().all(|r| r.is_replica(key, n)))
            .collect()
    }
}

/// How long before the node was last known current a change it then
/// learns of may have been made: a member answering an exchange may not
/// yet know of a change made a little earlier (membership spreads by an
/// exchange with a random member every 5 s). A quarter of the grace at
/// most, so a short grace still leaves a pass time.
const SPREAD_MARGIN: Duration = Duration::from_secs(600);
/// How often the loop looks at whether the node is current.
const CURRENCY_TICK: Duration = Duration::from_secs(1);

/// Since when (unix ms) a ring change the node learns of now may have
/// been made, given that it was last known current at `current_unix_ms`
/// (0: unknown, which makes any pass owed for the change out of time).
fn change_dated(current_unix_ms: u64, grace: Duration) -> u64 {
    current_unix_ms.saturating_sub(millis(SPREAD_MARGIN.min(grace / 4)))
}

/// How current the node's ring is: the last time it had taken in all that
/// a member it asked knew (an exchange that answered, see
/// `NodeInner::exchanged_unix_ms`), or, as the only member, now (a change
/// then comes through this node). A ring change learned later was made
/// after that, less [`SPREAD_MARGIN`]: a node cut off for hours, by a
/// partition or by being down, dates what it learns on its return from
/// when it was cut off, and a pass owed for it is out of time if that is
/// longer ago than half the grace.
///
/// Invariant: `current_unix_ms` only grows; past its start value (the
/// kept one, or a new node's start), only to a time at which the loop had
/// taken in the ring its cluster record then gave.
#[derive(Debug)]
pub(super) struct Currency {
    current_unix_ms: u64,
    /// What the data dir holds.
    saved_unix_ms: u64,
}

impl Currency {
    pub(super) fn restored(current_unix_ms: Option<u64>) -> Self {
        let current_unix_ms = current_unix_ms.unwrap_or(0);
        Currency {
            current_unix_ms,
            saved_unix_ms: current_unix_ms,
        }
    }

    /// Notes that the node had, at `at_unix_ms`, all a member knew, if the
    /// loop has taken in every ring installed since (`caught_up`).
    pub(super) fn observe(&mut self, at_unix_ms: u64, caught_up: bool) {
        if caught_up {
            self.current_unix_ms = self.current_unix_ms.max(at_unix_ms);
        }
    }

    /// The time to keep in the data dir, if it moved on by
    /// [`handover_store::SAVE_EVERY`] since it was last kept (or at all,
    /// with `always`).
    fn take_unsaved(&mut self, always: bool) -> Option<u64> {
        let due = self
            .saved_unix_ms
            .saturating_add(millis(handover_store::SAVE_EVERY));
        let moved = self.current_unix_ms > self.saved_unix_ms;
        (moved && (always || self.current_unix_ms >= due)).then(|| {
            self.saved_unix_ms = self.current_unix_ms;
            self.current_unix_ms
        })
    }
}

/// One look at how current the node is (see [`Currency`]), kept in the data
/// dir now and then. `took_in` says whether the loop has taken in a ring
/// in this run, `seen` is the newest one it has, `seen_kept` whether the
/// data dir holds it: a time current is kept only with the ring it is
/// current with, or a restart would date the change to the newer ring
/// from it.
fn track_currency(
    inner: &NodeInner,
    currency: &mut Currency,
    rings: &watch::Receiver<Option<Arc<Ring>>>,
    seen: Option<&Arc<Ring>>,
    (took_in, seen_kept): (bool, bool),
) {
    let alone = seen.is_some_and(|ring| ring.len() == 1 && ring.has_node(&inner.id));
    // Read before asking whether a ring came since: an exchange notes its
    // time after installing what it brought.
    let at = if alone {
        unix_ms()
    } else {
        inner
            .exchanged_unix_ms
            .load(std::sync::atomic::Ordering::Acquire)
    };
    // The record, too, must place keys as `seen` does: an exchange that
    // found nothing new may have found a change another task merged and
    // has yet to install.
    let caught_up = took_in
        && !rings.has_changed().unwrap_or(true)
        && seen.is_some_and(|seen| places_alike(inner, seen));
    currency.observe(at, caught_up);
    if seen_kept {
        if let Some(current) = currency.take_unsaved(false) {
            handover_store::save_current(&inner.storage, current);
        }
    }
}

/// Whether the node's cluster record places keys as `ring` does: the same
/// members, virtual node counts and N.
fn places_alike(inner: &NodeInner, ring: &Ring) -> bool {
    inner.membership.record().is_some_and(|record| {
        record.replicas == ring.replicas()
            && record.members.len() == ring.members().len()
            && record
                .members
                .values()
                .zip(ring.members())
                .all(|(m, (id, vnodes))| m.id == *id && m.vnodes == *vnodes)
    })
}

/// Why a pass ended early.
#[derive(Debug)]
enum PassEnd {
    /// A replica did not take a batch (the pass went on to the end).
    Failed(String),
    /// Half the grace passed since the change.
    OutOfTime,
}

/// Runs the passes ring changes owe (see the module docs), until shutdown.
/// `remembered` is the ring of the cluster record the node started with.
pub(super) async fn ring_handover_loop(
    inner: Arc<NodeInner>,
    remembered: Option<Arc<Ring>>,
    keys_per_s: u32,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let restored = {
        let storage = inner.storage.clone();
        // Rings take a while to build from a large record.
        match tokio::task::spawn_blocking(move || handover_store::restore(&storage)).await {
            Ok(restored) => restored,
            Err(e) => {
                tracing::error!(error = %e, "reading the ring hand-over's record failed");
                handover_store::Restored::default()
            }
        }
    };
    let recent = {
        let storage = inner.storage.clone();
        tokio::task::spawn_blocking(move || RecentRings::restore(&storage, grace))
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "reading the rings replaced lately failed");
                RecentRings::deferring_all(grace, unix_ms())
            })
    };
    *inner.recent_rings() = Some(recent);
    // A new node (no ring kept) missed nothing: the first ring it takes in
    // holds every change before it.
    let new_node = restored.seen.is_none() && remembered.is_none();
    let mut currency = Currency::restored(match new_node {
        true => Some(unix_ms()),
        false => restored.current_unix_ms,
    });
    if new_node {
        // Kept at the first look, not a minute on.
        currency.saved_unix_ms = 0;
    }
    let mut seen = restored.seen.or_else(|| remembered.clone());
    let mut owed = restored.owed;
    // The record kept last names the ring the last run took in; the
    // cluster record may name a newer one (stored before a crash kept the
    // hand-over's record): a change too.
    if let Some(remembered) = &remembered {
        note_ring(&inner, seen.as_ref(), remembered);
        note_change(
            &inner,
            &mut owed,
            seen.as_ref(),
            remembered,
            change_dated(currency.current_unix_ms, grace),
        );
        seen = Some(remembered.clone());
    }
    if let Some(seen) = &seen {
        note_ring(&inner, None, seen);
    }
    set_owed(&inner, owed.is_some());
    let mut rings = inner.ring_tx.subscribe();
    // A ring installed before the loop first ran is taken in like a change.
    let mut arrived = rings.borrow_and_update().clone();
    // No pass runs before the loop has taken in a ring this run: the one
    // the data dir names may be long out of date.
    let mut took_in = false;
    // Whether the data dir holds `seen` (a failed write is tried again at
    // the next ring or pass end).
    let mut seen_kept = true;
    // When a failed pass runs again; `None`: as soon as one is owed.
    let mut retry_at: Option<Instant> = None;
    let mut backoff = RETRY_INITIAL;
    let mut tick = tokio::time::interval(CURRENCY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'run: loop {
        if let Some(new) = arrived.take() {
            let since = change_dated(currency.current_unix_ms, grace);
            note_ring(&inner, seen.as_ref(), &new);
            note_change(&inner, &mut owed, seen.as_ref(), &new, since);
            seen = Some(new);
            took_in = true;
            seen_kept = handover_store::save(&inner.storage, seen.as_ref(), owed.as_ref());
            // At once, not at the next tick: the only member is current
            // from now, before a join can come through it.
            track_currency(
                &inner,
                &mut currency,
                &rings,
                seen.as_ref(),
                (took_in, seen_kept),
            );
        }
        let due = async {
            match (&owed, retry_at, took_in) {
                (None, _, _) | (_, _, false) => std::future::pending().await,
                (Some(_), Some(at), true) => tokio::time::sleep_until(at).await,
                (Some(_), None, true) => {}
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            changed = rings.changed() => {
                if changed.is_err() {
                    break;
                }
                arrived = rings.borrow_and_update().clone();
                continue;
            }
            _ = tick.tick() => {
                track_currency(&inner, &mut currency, &rings, seen.as_ref(), (took_in, seen_kept));
                continue;
            }
            _ = due => {}
        }
        let (Some(pass), Some(latest)) = (&owed, seen.clone()) else {
            // No ring (never the case once one was owed): nothing to do.
            owed = None;
            set_owed(&inner, false);
            continue;
        };
        let deadline_unix_ms = pass.since_unix_ms.saturating_add(millis(grace / 2));
        // Removed (or leaving and now removed): a leave hands over.
        let outcome = if !latest.has_node(&inner.id) {
            Ok(0)
        } else {
            let pass = hand_over(&inner, pass, &latest, keys_per_s, deadline_unix_ms);
            tokio::pin!(pass);
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => break 'run,
                    outcome = &mut pass => break outcome,
                    // Still tracked during a pass, which may take hours: a
                    // change learned meanwhile is dated from just before it.
                    _ = tick.tick() => {
                        track_currency(&inner, &mut currency, &rings, seen.as_ref(), (took_in, seen_kept));
                    }
                }
            }
        };
        let done = match outcome {
            Ok(keys) => {
                metrics::counter!("ringkv_ring_handover_passes_total", "outcome" => "done")
                    .increment(1);
                if keys > 0 {
                    tracing::info!(
                        keys,
                        "handed over the keys a ring change took from this node"
                    );
                }
                // A change during the pass: again, under the newest ring.
                !places_otherwise(&latest, &rings)
            }
            Err(PassEnd::OutOfTime) if pass.since_unix_ms == 0 => {
                metrics::counter!("ringkv_ring_handover_passes_total", "outcome" => "abandoned")
                    .increment(1);
                tracing::error!(
                    "not handing over the keys a ring change took from this node: the change may have been made while it was down, and when it was last current is unknown (a data dir from an older release, or a damaged record), so a version handed over could bring back a collected delete; the keys stay as stray copies (`ringkv cleanup` keeps them)"
                );
                true
            }
            Err(PassEnd::OutOfTime) => {
                metrics::counter!("ringkv_ring_handover_passes_total", "outcome" => "abandoned")
                    .increment(1);
                tracing::error!(
                    owed_s = unix_ms().saturating_sub(pass.since_unix_ms) / 1000,
                    "gave up handing over the keys a ring change took from this node: half the tombstone grace has passed since the change may have been made (a change learned after this node was down, or cut off from every member, is dated from then), so a version handed over now could bring back a collected delete; the keys it did not send stay as stray copies (`ringkv cleanup` keeps them)"
                );
                true
            }
            Err(PassEnd::Failed(reason)) => {
                metrics::counter!("ringkv_ring_handover_passes_total", "outcome" => "failed")
                    .increment(1);
                tracing::warn!(%reason, retry_s = backoff.as_secs(), "handing over the keys a ring change took from this node failed; trying again");
                retry_at = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(RETRY_MAX);
                false
            }
        };
        if done {
            owed = None;
            retry_at = None;
            backoff = RETRY_INITIAL;
            set_owed(&inner, false);
            seen_kept = handover_store::save(&inner.storage, seen.as_ref(), None);
        }
    }
    if seen_kept {
        if let Some(current) = currency.take_unsaved(true) {
            handover_store::save_current(&inner.storage, current);
        }
    }
}

/// Whether the newest ring installed places keys otherwise than `latest`,
/// the ring a pass just sent under (and so the pass must run again). Most
/// installs change nothing placement depends on: a member's restart (its
/// incarnation) or new address. A pass that took hours must not run again
/// for those: it would resend every key, and keep the node from leaving.
fn places_otherwise(latest: &Ring, rings: &watch::Receiver<Option<Arc<Ring>>>) -> bool {
    if !rings.has_changed().unwrap_or(false) {
        return false;
    }
    rings.borrow().as_ref().is_some_and(|newest| {
        newest.replicas() != latest.replicas() || newest.members() != latest.members()
    })
}

/// Says whether a pass is owed: to the metrics, and to a leave, which
/// refuses while one is (it hands over only what it replicates now).
fn set_owed(inner: &NodeInner, owed: bool) {
    inner
        .handover_owed
        .store(owed, std::sync::atomic::Ordering::SeqCst);
    metrics::gauge!("ringkv_ring_handover_owed").set(if owed { 1.0 } else { 0.0 });
}

/// Notes for tombstone collection that `new` is the node's ring from now,
/// in place of `old` (see `recent_rings`), and keeps the list if that
/// changed it (written after the lock is let go: collection checks take it).
fn note_ring(inner: &NodeInner, old: Option<&Arc<Ring>>, new: &Arc<Ring>) {
    let kept = {
        let mut recent = inner.recent_rings();
        recent.as_mut().and_then(|recent| {
            recent
                .note_ring(old, new, unix_ms())
                .then(|| recent.record())
        })
    };
    if let Some(kept) = kept {
        kept.save(&inner.storage);
    }
}

/// Takes in a change of the node's ring from `old` to `new`, made at the
/// earliest at `since_unix_ms` (see [`Currency`]).
fn note_change(
    inner: &NodeInner,
    owed: &mut Option<Owed>,
    old: Option<&Arc<Ring>>,
    new: &Arc<Ring>,
    since_unix_ms: u64,
) {
    if let Some(ring) = Owed::owed_by_change(old, Some(new), &inner.id) {
        Owed::add(owed, ring, since_unix_ms);
        set_owed(inner, true);
    }
}

/// One pass: every stored key `owed` says goes somewhere, to its targets.
/// Returns the keys sent, or the first failure once the pass has gone to
/// the end (a replica that failed does not hold up the others).
async fn hand_over(
    inner: &NodeInner,
    owed: &Owed,
    latest: &Ring,
    keys_per_s: u32,
    deadline_unix_ms: u64,
) -> Result<u64, PassEnd> {
    let (mut keys, mut failure) = (0u64, None);
    // Replicas that failed a batch get no more in this pass: one that is
    // down would otherwise cost every later batch a timeout. The pass
    // then fails, and runs again after a back-off.
    let mut failed: HashSet<NodeId> = HashSet::new();
    let mut pages = inner.stored_pages();
    let mut sends = tokio::task::JoinSet::new();
    let started = Instant::now();
    while let Some(page) = pages.next().await {
        // Checked before every page, not only before a pass: a pass begun
        // just in time may take hours at the pace.
        if unix_ms() > deadline_unix_ms {
            return Err(PassEnd::OutOfTime);
        }
        let mut batches: BTreeMap<NodeId, Vec<KeyClock>> = BTreeMap::new();
        for (key, clock) in page {
            let targets = owed.targets(latest, &inner.id, &key);
            if targets.is_empty() {
                continue;
            }
            keys += 1;
            for target in targets {
                batches.entry(target).or_default().push(KeyClock {
                    key: key.clone(),
                    clock: clock.clone(),
                });
            }
        }
        for (target, items) in batches {
            if failed.contains(&target) {
                continue;
            }
            let count = items.len() as u64;
            let transport = inner.transport.clone();
            // As a leave sends its batches: tried three times, within a
            // timeout that grows with their bytes.
            sends.spawn(async move {
                let sent =
                    super::leave::send_batch(&*transport, target.clone(), items, RETRY_PAUSE)
                        .await
                        .map(|refused| (count, refused))
                        .map_err(|failure| failure.reason);
                (target, sent)
            });
        }
        while sends.len() > BATCHES_IN_FLIGHT {
            let sent = sends.join_next().await.expect("the set is not empty");
            note_sent(sent, &mut failure, &mut failed);
        }
        // The pace: `keys` keys take no less than keys / keys_per_s.
        let budget = Duration::from_secs_f64(keys as f64 / f64::from(keys_per_s.max(1)));
        tokio::time::sleep_until(started + budget).await;
    }
    while let Some(sent) = sends.join_next().await {
        note_sent(sent, &mut failure, &mut failed);
    }
    pages
        .finish()
        .await
        .map_err(|reason| PassEnd::Failed(format!("reading this node's store: {reason}")))?;
    failure.map_or(Ok(keys), |reason| Err(PassEnd::Failed(reason)))
}

/// A batch's outcome: the keys it carried and what the replica refused of
/// them (see [`super::leave::send_batch`]), or why it failed.
type BatchSent = Result<(u64, Option<String>), String>;

/// Counts a batch that went through; keeps the first failure, and which
/// replicas failed. A batch the replica took but for keys whose merge it
/// refused for the per-key limits went through: the replica gets the
/// pass's other batches, and the pass does not fail for those keys, which
/// no retry would change. They stay here as stray copies (`ringkv cleanup`
/// keeps them, no replica covering them) and are logged, to be resolved by
/// a write with a read's context.
fn note_sent(
    sent: Result<(NodeId, BatchSent), tokio::task::JoinError>,
    failure: &mut Option<String>,
    failed: &mut HashSet<NodeId>,
) {
    match sent {
        Ok((target, Ok((keys, refused)))) => {
            metrics::counter!("ringkv_ring_handover_keys_total").increment(keys);
            if let Some(refusal) = refused {
                metrics::counter!("ringkv_ring_handover_merges_refused_total").increment(1);
                tracing::error!(replica = %target, %refusal, "a replica refused keys a ring change took from this node, their merge being over the per-key limits; they stay here, where reads do not look, until a write with a read's context resolves their siblings");
            }
        }
        Ok((target, Err(reason))) => {
            failure.get_or_insert(format!("{target}: {reason}"));
            failed.insert(target);
        }
        Err(e) => {
            failure.get_or_insert(format!("a hand-over task failed: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0_UNIX_MS: u64 = 1_800_000_000_000;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn ring(ids: &[&str]) -> Arc<Ring> {
        Arc::new(Ring::new(ids.iter().map(|s| (id(s), 64)), 3).unwrap())
    }

    /// The loop's bookkeeping of a change from `old` to `new` at `now`.
    fn note(
        owed: &mut Option<Owed>,
        old: Option<&Arc<Ring>>,
        new: Option<&Arc<Ring>>,
        me: &NodeId,
        now: u64,
    ) {
        if let Some(ring) = Owed::owed_by_change(old, new, me) {
            Owed::add(owed, ring, now);
        }
    }

    fn keys() -> impl Iterator<Item = Vec<u8>> {
        (0..2000).map(|i| format!("k{i}").into_bytes())
    }

    /// A batch whose merge a replica refused for some keys went through:
    /// the pass does not fail, and the replica gets its later batches; a
    /// batch that failed fails the pass and the replica's later batches.
    #[test]
    fn a_refused_merge_neither_fails_the_pass_nor_its_replica() {
        let (mut failure, mut failed) = (None, HashSet::new());
        let refused = Some("refused to merge 1 of the batch's 3 keys".to_string());
        note_sent(Ok((id("b"), Ok((3, refused)))), &mut failure, &mut failed);
        assert_eq!((failure.as_deref(), failed.len()), (None, 0));
        note_sent(
            Ok((id("c"), Err("down".to_string()))),
            &mut failure,
            &mut failed,
        );
        assert_eq!(failure.as_deref(), Some("c: down"));
        assert!(failed.contains(&id("c")));
    }

    /// A pass runs again only for a ring installed meanwhile that places
    /// keys otherwise, not for every install (a member's restart).
    #[test]
    fn a_pass_runs_again_only_if_placement_changed_meanwhile() {
        let latest = ring(&["a", "b", "c", "x"]);
        let (tx, mut rings) = watch::channel(Some(latest.clone()));
        rings.borrow_and_update();
        assert!(!places_otherwise(&latest, &rings), "no install");
        tx.send_replace(Some(ring(&["a", "b", "c", "x"])));
        assert!(
            !places_otherwise(&latest, &rings),
            "a new ring placing keys alike"
        );
        tx.send_replace(Some(ring(&["a", "b", "c", "x", "y"])));
        assert!(places_otherwise(&latest, &rings), "a member joined");
        tx.send_replace(Some(Arc::new(
            Ring::new(["a", "b", "c", "x"].map(|n| (id(n), 64)), 2).unwrap(),
        )));
        assert!(places_otherwise(&latest, &rings), "N changed");
    }

    /// A key goes from a node that gave up its slot, to the replicas that
    /// took one; a key the node still replicates, or never did, goes
    /// nowhere; a node that just joined owes nothing.
    #[test]
    fn a_key_goes_to_the_replicas_that_took_the_slots_given_up() {
        let (before, after) = (ring(&["a", "b", "c"]), ring(&["a", "b", "c", "x"]));
        let now = T0_UNIX_MS;
        let mut owed = None;
        note(&mut owed, Some(&before), Some(&after), &id("x"), now);
        assert!(owed.is_none(), "the joiner gave up nothing");
        note(&mut owed, Some(&before), Some(&before), &id("a"), now);
        assert!(owed.is_none(), "the same ring");
        note(&mut owed, Some(&after), Some(&before), &id("a"), now);
        assert!(owed.is_none(), "x removed: a gave up nothing");
        let reweighted = Arc::new(
            Ring::new(
                [("a", 64), ("b", 64), ("c", 128)].map(|(n, v)| (id(n), v)),
                3,
            )
            .unwrap(),
        );
        let mut by_weight = None;
        note(
            &mut by_weight,
            Some(&before),
            Some(&reweighted),
            &id("a"),
            now,
        );
        assert!(by_weight.is_some(), "c's weight changed: not a removal");
        note(&mut owed, Some(&before), Some(&after), &id("a"), now);
        let owed = owed.expect("a gave up ranges to x");
        let mut moved = 0;
        for key in keys() {
            let targets = owed.targets(&after, &id("a"), &key);
            if after.is_replica(&key, &id("a")) {
                assert!(targets.is_empty());
            } else {
                // Every key is on a under three members and N=3.
                assert_eq!(targets, [id("x")], "{key:?}");
                moved += 1;
            }
        }
        assert!(moved > 0);
    }

    /// What makes a removal owe nothing: a node that stays replicates every
    /// key it did, whichever members go.
    #[test]
    fn a_node_that_stays_keeps_its_keys_when_members_go() {
        let before = ring(&["a", "b", "c", "d", "e", "f"]);
        for gone in [&["b"][..], &["c", "e"], &["a", "d", "f"]] {
            let kept: Vec<&str> = ["a", "b", "c", "d", "e", "f"]
                .into_iter()
                .filter(|n| !gone.contains(n))
                .collect();
            let after = ring(&kept);
            for key in keys() {
                for replica in before.replicas_of(&key) {
                    if after.has_node(&replica) {
                        assert!(after.is_replica(&key, &replica), "{replica} lost {key:?}");
                    }
                }
            }
        }
    }

    /// Three joins before a pass completes: a key whose every slot went to
    /// a new node goes to all three, from each old replica.
    #[test]
    fn several_changes_owe_the_keys_given_up_under_any_of_them() {
        let rings = [
            ring(&["a", "b", "c"]),
            ring(&["a", "b", "c", "x"]),
            ring(&["a", "b", "c", "x", "y"]),
            ring(&["a", "b", "c", "x", "y", "z"]),
        ];
        let now = T0_UNIX_MS;
        let mut owed = None;
        for pair in rings.windows(2) {
            note(&mut owed, Some(&pair[0]), Some(&pair[1]), &id("a"), now);
        }
        let owed = owed.unwrap();
        let latest = &rings[3];
        let all_new = keys()
            .find(|k| {
                let replicas = latest.replicas_of(k);
                ["x", "y", "z"].iter().all(|n| replicas.contains(&id(n)))
            })
            .expect("some key went wholly to the new nodes");
        let mut targets = owed.targets(latest, &id("a"), &all_new);
        targets.sort();
        assert_eq!(targets, [id("x"), id("y"), id("z")]);
    }

    /// A key the node held without replicating it under any owed ring (a
    /// stray from an older ring, maybe a value deleted since) goes nowhere.
    #[test]
    fn a_copy_held_as_a_stray_is_not_handed_over() {
        let before = ring(&["a", "b", "c", "d", "e"]);
        let after = ring(&["a", "b", "c", "d", "e", "x"]);
        let mut owed = None;
        note(&mut owed, Some(&before), Some(&after), &id("a"), T0_UNIX_MS);
        let owed = owed.unwrap();
        let stray = keys()
            .find(|k| !before.is_replica(k, &id("a")) && !after.is_replica(k, &id("a")))
            .expect("a key a never replicated");
        assert!(owed.targets(&after, &id("a"), &stray).is_empty());
        let given_up = keys()
            .find(|k| before.is_replica(k, &id("a")) && !after.is_replica(k, &id("a")))
            .expect("a key x took from a");
        assert_eq!(owed.targets(&after, &id("a"), &given_up), [id("x")]);
    }

    /// A change is dated from when the node was last known current, less
    /// the spread margin (a quarter of a short grace at most); unknown
    /// dates it at 0, which no pass is in time for.
    #[test]
    fn a_change_is_dated_from_when_the_node_was_last_current() {
        let day = Duration::from_secs(86_400);
        assert_eq!(change_dated(T0_UNIX_MS, day), T0_UNIX_MS - 600_000);
        assert_eq!(
            change_dated(T0_UNIX_MS, Duration::from_secs(60)),
            T0_UNIX_MS - 15_000
        );
        assert_eq!(change_dated(0, day), 0);
    }

    /// The node is current as of an exchange only once the loop has taken
    /// in what it installed; the time only grows, and is kept in the data
    /// dir once it has moved on by a minute (or at shutdown).
    #[test]
    fn the_node_is_current_only_once_caught_up() {
        let mut currency = Currency::restored(Some(T0_UNIX_MS));
        currency.observe(T0_UNIX_MS + 5_000, false);
        assert_eq!(currency.current_unix_ms, T0_UNIX_MS, "a ring not taken in");
        currency.observe(T0_UNIX_MS + 5_000, true);
        assert_eq!(currency.current_unix_ms, T0_UNIX_MS + 5_000);
        currency.observe(T0_UNIX_MS + 1_000, true);
        assert_eq!(currency.current_unix_ms, T0_UNIX_MS + 5_000, "never back");
        assert_eq!(currency.take_unsaved(false), None, "moved on by 5 s only");
        currency.observe(T0_UNIX_MS + 61_000, true);
        assert_eq!(currency.take_unsaved(false), Some(T0_UNIX_MS + 61_000));
        assert_eq!(currency.take_unsaved(true), None, "already kept");
        currency.observe(T0_UNIX_MS + 62_000, true);
        assert_eq!(currency.take_unsaved(true), Some(T0_UNIX_MS + 62_000));
        let mut unknown = Currency::restored(None);
        assert_eq!(unknown.current_unix_ms, 0);
        assert_eq!(unknown.take_unsaved(true), None);
    }

    /// More changes than kept still keep the first ring (whose copies are
    /// the ones the node surely replicated) and the newest.
    #[test]
    fn the_rings_owed_are_bounded() {
        let now = T0_UNIX_MS;
        let mut owed = None;
        let mut names = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let first = ring(&["a", "b", "c"]);
        let mut old = first.clone();
        for i in 0..20 {
            names.push(format!("n{i}"));
            let new = Arc::new(Ring::new(names.iter().map(|s| (id(s), 64)), 3).unwrap());
            note(&mut owed, Some(&old), Some(&new), &id("a"), now);
            old = new;
        }
        let owed = owed.unwrap();
        assert_eq!(owed.rings.len(), OWED_RINGS_MAX);
        assert_eq!(owed.rings[0].fingerprint(), first.fingerprint());
        assert_eq!(owed.since_unix_ms, now);
    }

    /// A pass is owed since its earliest change: one dated from when the
    /// node went down, taken in after a live one, brings the deadline
    /// forward; a later one does not move it back.
    #[test]
    fn a_pass_is_owed_since_its_earliest_change() {
        let mut owed = None;
        let rings = [
            ring(&["a", "b", "c"]),
            ring(&["a", "b", "c", "x"]),
            ring(&["a", "b", "c", "x", "y"]),
        ];
        Owed::add(&mut owed, rings[0].clone(), T0_UNIX_MS);
        Owed::add(&mut owed, rings[1].clone(), T0_UNIX_MS - 5_000);
        Owed::add(&mut owed, rings[2].clone(), T0_UNIX_MS + 5_000);
        let owed = owed.unwrap();
        assert_eq!(owed.since_unix_ms(), T0_UNIX_MS - 5_000);
        assert_eq!(owed.rings().len(), 3);
        let again = Owed::from_rings(owed.rings().to_vec(), owed.since_unix_ms()).unwrap();
        assert_eq!(again.rings().len(), 3);
        assert!(Owed::from_rings(Vec::new(), T0_UNIX_MS).is_none());
    }
}
