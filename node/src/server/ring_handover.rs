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
//!   a pass runs it again under the newest ring.
//! - **Until when.** A version handed over later than the tombstone grace
//!   after the change could meet a replica that collected the delete of it
//!   meanwhile, and bring it back. So a pass owed since longer than half the
//!   grace stops (at its next page; logged and counted); what it did not
//!   send stays as stray copies. The node dates a change by when it learns
//!   of it, which is seconds after it happened while the node is in touch
//!   with some member. One cut off from every member for longer than half
//!   the grace (a partition) may learn of a change long after it: it hands
//!   over nothing for changes learned then, or within 10 minutes after, and
//!   says so; it is then a node down past the grace (README). Not caught: a
//!   group of members cut off together, each in touch with the others.
//! - **Failures.** A replica that does not take its batch does not stop the
//!   others', and is sent no more in that pass (one that is down would cost
//!   every later batch a timeout). The pass goes to the end, and is run
//!   again after a back-off (merges are idempotent) until one goes through.
//! - **Pace.** Keys go at the anti-entropy pace (`--repair-keys-per-s`),
//!   a few batches in flight.
//! - **Not covered.** What is owed lives in memory: a node restarted during a
//!   pass does not resume it (anti-entropy and `ringkv repair` still fill
//!   the keys that kept one old replica). A node removed from the ring hands
//!   over nothing here: its leave does that.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ringkv_core::wire::KeyClock;
use ringkv_core::NodeId;
use ringkv_ring::Ring;
use tokio::sync::watch;
use tokio::time::Instant;

use super::NodeInner;

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
const OWED_RINGS_MAX: usize = 8;

/// What a pass owes: the rings this node had since the last pass that
/// completed, and since when.
#[derive(Debug)]
pub(super) struct Owed {
    rings: Vec<Arc<Ring>>,
    since: Instant,
}

impl Owed {
    /// The ring a change from `old` to `new` owes a pass for: `old`, if `me`
    /// was a member of it (a node that just joined gave up nothing). Equal
    /// rings (an address changed) owe nothing.
    pub(super) fn owed_by_change(
        old: Option<&Arc<Ring>>,
        new: Option<&Arc<Ring>>,
        me: &NodeId,
    ) -> Option<Arc<Ring>> {
        let (old, new) = (old?, new?);
        (old.fingerprint() != new.fingerprint() && old.has_node(me)).then(|| old.clone())
    }

    /// Adds `ring` to what `owed` owes, owed since `now` if nothing was,
    /// keeping the first rings and the newest within [`OWED_RINGS_MAX`].
    pub(super) fn add(owed: &mut Option<Owed>, ring: Arc<Ring>, now: Instant) {
        let owed = owed.get_or_insert_with(|| Owed {
            rings: Vec::new(),
            since: now,
        });
        if owed.rings.len() >= OWED_RINGS_MAX {
            owed.rings.remove(OWED_RINGS_MAX / 2);
        }
        owed.rings.push(ring);
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

/// Whether this node is in touch with its cluster: some other member is
/// believed up (or it is the only member). A node cut off from every
/// member cannot tell when a ring change it learns of later happened.
fn in_touch(inner: &NodeInner) -> bool {
    let Some(record) = inner.membership.record() else {
        return false;
    };
    let mut others = record
        .members
        .values()
        .filter(|m| m.id != inner.id)
        .peekable();
    others.peek().is_none() || others.any(|m| inner.detector.is_up(&m.id))
}

/// When this node was last cut off from every member for longer than half
/// the tombstone grace, as seen by [`ring_handover_loop`]'s ticks.
#[derive(Debug, Default)]
pub(super) struct Contact {
    /// Since when no member has been believed up, if none is now.
    cut_off_since: Option<Instant>,
    /// When the last long cut-off ended.
    long_cut_off_ended: Option<Instant>,
}

impl Contact {
    /// Notes whether the node is in touch at `now`.
    pub(super) fn observe(&mut self, in_touch: bool, now: Instant, grace: Duration) {
        match (in_touch, self.cut_off_since) {
            (false, None) => self.cut_off_since = Some(now),
            (true, Some(since)) => {
                if now - since > grace / 2 {
                    self.long_cut_off_ended = Some(now);
                }
                self.cut_off_since = None;
            }
            _ => {}
        }
    }

    /// Whether a ring change learned at `now` may be older than half the
    /// grace: the node is, or was until lately, cut off for that long.
    pub(super) fn change_may_be_old(&self, now: Instant, grace: Duration) -> bool {
        self.cut_off_since
            .is_some_and(|since| now - since > grace / 2)
            || self
                .long_cut_off_ended
                .is_some_and(|ended| now - ended < RECENT_CONTACT)
    }
}

/// How soon after a long cut-off ends a ring change counts as learned late:
/// membership spreads by an exchange every 5 s, so well within this.
const RECENT_CONTACT: Duration = Duration::from_secs(600);
/// How often the loop looks at whether the node is in touch.
const CONTACT_TICK: Duration = Duration::from_secs(1);

/// Why a pass ended early.
#[derive(Debug)]
enum PassEnd {
    /// A replica did not take a batch (the pass went on to the end).
    Failed(String),
    /// Half the grace passed since the change.
    OutOfTime,
}

/// Runs the passes ring changes owe (see the module docs), until shutdown.
pub(super) async fn ring_handover_loop(
    inner: Arc<NodeInner>,
    keys_per_s: u32,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut rings = inner.ring_tx.subscribe();
    let mut seen = rings.borrow_and_update().clone();
    let mut owed: Option<Owed> = None;
    // When a failed pass runs again; `None`: as soon as one is owed.
    let mut retry_at: Option<Instant> = None;
    let mut backoff = RETRY_INITIAL;
    let mut contact = Contact::default();
    let mut tick = tokio::time::interval(CONTACT_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let due = async {
            match (&owed, retry_at) {
                (None, _) => std::future::pending().await,
                (Some(_), Some(at)) => tokio::time::sleep_until(at).await,
                (Some(_), None) => {}
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            changed = rings.changed() => {
                if changed.is_err() {
                    break;
                }
                let new = rings.borrow_and_update().clone();
                let now = Instant::now();
                contact.observe(in_touch(&inner), now, grace);
                let given_up = Owed::owed_by_change(seen.as_ref(), new.as_ref(), &inner.id);
                if given_up.is_some() && contact.change_may_be_old(now, grace) {
                    metrics::counter!("ringkv_ring_handover_passes_total", "outcome" => "skipped")
                        .increment(1);
                    tracing::warn!(
                        "the ring changed while this node was cut off from every member for longer than half the tombstone grace: not handing over the keys it gave up, since a copy could bring back a delete collected meanwhile; treat this node as one down past the grace (see README)"
                    );
                } else if let Some(ring) = given_up {
                    Owed::add(&mut owed, ring, now);
                }
                seen = new;
                continue;
            }
            _ = tick.tick() => {
                contact.observe(in_touch(&inner), Instant::now(), grace);
                continue;
            }
            _ = due => {}
        }
        let (Some(pass), Some(latest)) = (&owed, seen.clone()) else {
            // No ring (never the case once one was owed): nothing to do.
            owed = None;
            continue;
        };
        metrics::gauge!("ringkv_ring_handover_owed").set(1.0);
        let deadline = pass.since + grace / 2;
        // Removed (or leaving and now removed): a leave hands over.
        let outcome = if !latest.has_node(&inner.id) {
            Ok(0)
        } else {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                outcome = hand_over(&inner, pass, &latest, keys_per_s, deadline) => outcome,
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
                !rings.has_changed().unwrap_or(false)
            }
            Err(PassEnd::OutOfTime) => {
                metrics::counter!("ringkv_ring_handover_passes_total", "outcome" => "abandoned")
                    .increment(1);
                tracing::error!(
                    owed_s = pass.since.elapsed().as_secs(),
                    "gave up handing over the keys a ring change took from this node: half the tombstone grace has passed, so a version handed over now could bring back a collected delete; the keys it did not send stay as stray copies (`ringkv cleanup` keeps them)"
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
            metrics::gauge!("ringkv_ring_handover_owed").set(0.0);
        }
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
    deadline: Instant,
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
        if Instant::now() > deadline {
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
                        .map(|()| count)
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

/// Counts a batch that went through; keeps the first failure, and which
/// replicas failed.
fn note_sent(
    sent: Result<(NodeId, Result<u64, String>), tokio::task::JoinError>,
    failure: &mut Option<String>,
    failed: &mut HashSet<NodeId>,
) {
    match sent {
        Ok((_, Ok(keys))) => metrics::counter!("ringkv_ring_handover_keys_total").increment(keys),
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
        now: Instant,
    ) {
        if let Some(ring) = Owed::owed_by_change(old, new, me) {
            Owed::add(owed, ring, now);
        }
    }

    fn keys() -> impl Iterator<Item = Vec<u8>> {
        (0..2000).map(|i| format!("k{i}").into_bytes())
    }

    /// A key goes from a node that gave up its slot, to the replicas that
    /// took one; a key the node still replicates, or never did, goes
    /// nowhere; a node that just joined owes nothing.
    #[test]
    fn a_key_goes_to_the_replicas_that_took_the_slots_given_up() {
        let (before, after) = (ring(&["a", "b", "c"]), ring(&["a", "b", "c", "x"]));
        let now = Instant::now();
        let mut owed = None;
        note(&mut owed, Some(&before), Some(&after), &id("x"), now);
        assert!(owed.is_none(), "the joiner gave up nothing");
        note(&mut owed, Some(&before), Some(&before), &id("a"), now);
        assert!(owed.is_none(), "the same ring");
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
        let now = Instant::now();
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
        note(
            &mut owed,
            Some(&before),
            Some(&after),
            &id("a"),
            Instant::now(),
        );
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

    /// A change learned during, or soon after, a cut-off from every member
    /// longer than half the grace may be old; short cut-offs do not count.
    #[test]
    fn a_change_learned_after_a_long_cut_off_may_be_old() {
        let grace = Duration::from_secs(3600);
        let t0 = Instant::now();
        let mut contact = Contact::default();
        contact.observe(true, t0, grace);
        assert!(!contact.change_may_be_old(t0, grace));
        // Cut off for 10 minutes: short.
        contact.observe(false, t0, grace);
        contact.observe(true, t0 + Duration::from_secs(600), grace);
        assert!(!contact.change_may_be_old(t0 + Duration::from_secs(601), grace));
        // Cut off for 40 minutes (more than half an hour).
        let cut = t0 + Duration::from_secs(1000);
        contact.observe(false, cut, grace);
        assert!(!contact.change_may_be_old(cut + Duration::from_secs(60), grace));
        assert!(contact.change_may_be_old(cut + Duration::from_secs(2400), grace));
        let back = cut + Duration::from_secs(2400);
        contact.observe(true, back, grace);
        assert!(contact.change_may_be_old(back + Duration::from_secs(5), grace));
        assert!(
            !contact.change_may_be_old(back + RECENT_CONTACT + Duration::from_secs(1), grace),
            "long since back in touch"
        );
    }

    /// More changes than kept still keep the first ring (whose copies are
    /// the ones the node surely replicated) and the newest.
    #[test]
    fn the_rings_owed_are_bounded() {
        let now = Instant::now();
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
        assert_eq!(owed.since, now);
    }
}
