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
//!   grace is given up (logged and counted); what it did not send stays as
//!   stray copies.
//! - **Failures.** A replica that does not take its batch does not stop the
//!   others'. The pass goes to the end, and is run again after a back-off
//!   (merges are idempotent) until one goes through.
//! - **Pace.** Keys go at the anti-entropy pace (`--repair-keys-per-s`),
//!   a few batches in flight.
//! - **Not covered.** What is owed lives in memory: a node restarted during a
//!   pass does not resume it (anti-entropy and `ringkv repair` still fill
//!   the keys that kept one old replica). A node removed from the ring hands
//!   over nothing here: its leave does that.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ringkv_core::wire::{KeyClock, ReplicaRequest, Request, Response};
use ringkv_core::{NodeId, Transport};
use ringkv_ring::Ring;
use tokio::sync::watch;
use tokio::time::Instant;

use super::NodeInner;

/// Batches (one per replica per page of keys) sent and not yet answered.
const BATCHES_IN_FLIGHT: usize = 8;
/// How long a batch of small keys may take to reach its replica; a larger
/// one gets its bytes at the handoff's slowest expected link more.
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// Notes that the ring went from `old` to `new` at `now`, owing a pass
    /// if `me` was a member of `old` (a node that just joined gave up
    /// nothing). Equal rings (an address changed) owe nothing.
    pub(super) fn note(
        owed: &mut Option<Owed>,
        old: Option<&Arc<Ring>>,
        new: Option<&Arc<Ring>>,
        me: &NodeId,
        now: Instant,
    ) {
        let (Some(old), Some(new)) = (old, new) else {
            return;
        };
        if old.fingerprint() == new.fingerprint() || !old.has_node(me) {
            return;
        }
        let owed = owed.get_or_insert_with(|| Owed {
            rings: Vec::new(),
            since: now,
        });
        if owed.rings.len() >= OWED_RINGS_MAX {
            owed.rings.remove(OWED_RINGS_MAX / 2);
        }
        owed.rings.push(old.clone());
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
                Owed::note(&mut owed, seen.as_ref(), new.as_ref(), &inner.id, Instant::now());
                seen = new;
                continue;
            }
            _ = due => {}
        }
        let (Some(pass), Some(latest)) = (&owed, seen.clone()) else {
            continue;
        };
        metrics::gauge!("ringkv_ring_handover_owed").set(1.0);
        // Removed (or leaving and now removed): a leave hands over.
        let done = if !latest.has_node(&inner.id) {
            true
        } else if pass.since.elapsed() > grace / 2 {
            metrics::counter!("ringkv_ring_handover_passes_total", "outcome" => "abandoned")
                .increment(1);
            tracing::error!(
                owed_s = pass.since.elapsed().as_secs(),
                "gave up handing over the keys a ring change took from this node: half the tombstone grace has passed, so a version handed over now could bring back a collected delete; the keys it did not send stay as stray copies (`ringkv cleanup` keeps them)"
            );
            true
        } else {
            let outcome = tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                outcome = hand_over(&inner, pass, &latest, keys_per_s) => outcome,
            };
            match outcome {
                Ok(keys) => {
                    metrics::counter!("ringkv_ring_handover_passes_total", "outcome" => "done")
                        .increment(1);
                    if keys > 0 {
                        tracing::info!(
                            keys,
                            "handed over the keys a ring change took from this node"
                        );
                    }
                    backoff = RETRY_INITIAL;
                    retry_at = None;
                    // A change during the pass: again, under the newest ring.
                    !rings.has_changed().unwrap_or(false)
                }
                Err(reason) => {
                    metrics::counter!("ringkv_ring_handover_passes_total", "outcome" => "failed")
                        .increment(1);
                    tracing::warn!(%reason, retry_s = backoff.as_secs(), "handing over the keys a ring change took from this node failed; trying again");
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                    false
                }
            }
        };
        if done {
            owed = None;
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
) -> Result<u64, String> {
    let (mut keys, mut failure) = (0u64, None);
    let mut pages = inner.stored_pages();
    let mut sends = tokio::task::JoinSet::new();
    let started = Instant::now();
    while let Some(page) = pages.next().await {
        let mut batches: BTreeMap<NodeId, (Vec<KeyClock>, usize)> = BTreeMap::new();
        for (key, clock) in page {
            let targets = owed.targets(latest, &inner.id, &key);
            if targets.is_empty() {
                continue;
            }
            keys += 1;
            for target in targets {
                let (items, bytes) = batches.entry(target).or_default();
                *bytes += key.len() + clock.approx_size();
                items.push(KeyClock {
                    key: key.clone(),
                    clock: clock.clone(),
                });
            }
        }
        for (target, (items, bytes)) in batches {
            let count = items.len() as u64;
            let transport = inner.transport.clone();
            let timeout = ringkv_repair::handoff::send_timeout_for(BATCH_TIMEOUT, bytes);
            sends.spawn(async move {
                let request = Request::Replica(ReplicaRequest::SyncBatch { items });
                let reason =
                    match tokio::time::timeout(timeout, transport.call(&target, request)).await {
                        Ok(Ok(Response::Clock(None))) => return Ok(count),
                        Ok(Ok(Response::Error(e))) => e.message,
                        Ok(Ok(other)) => format!("unexpected answer {other:?}"),
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("no answer within {} s", timeout.as_secs()),
                    };
                Err(format!("{target}: {reason}"))
            });
        }
        while sends.len() > BATCHES_IN_FLIGHT {
            let sent = sends.join_next().await.expect("the set is not empty");
            note_sent(sent, &mut failure);
        }
        // The pace: `keys` keys take no less than keys / keys_per_s.
        let budget = Duration::from_secs_f64(keys as f64 / f64::from(keys_per_s.max(1)));
        tokio::time::sleep_until(started + budget).await;
    }
    while let Some(sent) = sends.join_next().await {
        note_sent(sent, &mut failure);
    }
    pages
        .finish()
        .await
        .map_err(|reason| format!("reading this node's store: {reason}"))?;
    failure.map_or(Ok(keys), Err)
}

/// Counts a batch that went through; keeps the first failure.
fn note_sent(
    sent: Result<Result<u64, String>, tokio::task::JoinError>,
    failure: &mut Option<String>,
) {
    match sent {
        Ok(Ok(keys)) => metrics::counter!("ringkv_ring_handover_keys_total").increment(keys),
        Ok(Err(reason)) => {
            failure.get_or_insert(reason);
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
        Owed::note(&mut owed, Some(&before), Some(&after), &id("x"), now);
        assert!(owed.is_none(), "the joiner gave up nothing");
        Owed::note(&mut owed, Some(&before), Some(&before), &id("a"), now);
        assert!(owed.is_none(), "the same ring");
        Owed::note(&mut owed, Some(&before), Some(&after), &id("a"), now);
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
            Owed::note(&mut owed, Some(&pair[0]), Some(&pair[1]), &id("a"), now);
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
            Owed::note(&mut owed, Some(&old), Some(&new), &id("a"), now);
            old = new;
        }
        let owed = owed.unwrap();
        assert_eq!(owed.rings.len(), OWED_RINGS_MAX);
        assert_eq!(owed.rings[0].fingerprint(), first.fingerprint());
        assert_eq!(owed.since, now);
    }
}
