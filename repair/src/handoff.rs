//! Hinted handoff delivery (Dynamo §4.6): hand hinted writes back to their
//! owners once they are reachable again.
//!
//! One worker per node walks the [`HintBook`]: for every owner the failure
//! detector believes up and whose back-off has passed, it sends that owner's
//! hints in batches (each hint a `Handoff` that the owner writes through its
//! WAL before answering, so an answer is a durable acknowledgement, and
//! refuses when its ring does not place the key on it) and
//! removes a hint only if it is unchanged since it was read. A batch the
//! owner answers none of ends its round and doubles its back-off
//! ([`DeliverySchedule`]); hints it answers but declines are passed over;
//! sends are paced to [`HandoffConfig::max_rate_per_s`] so a returning node
//! is not flooded while it also serves clients. Every so often the worker
//! also drops hints past the window, for owners that stay away.
//!
//! An owner removed from the cluster never comes back, yet its hints may hold
//! the only copy of a write beyond the replicas that took it: a sloppy
//! quorum counted the hint towards W. So a removed owner's hints are not
//! dropped but *rerouted*: each goes, as a `Handoff`, to every replica of its
//! key under the current ring ([`HintRouting`]). A replica that cannot take
//! it now, or that the failure detector believes down (it is not tried, so
//! a hung one cannot hold every batch for the send timeout), gets a hint of
//! its own instead, as old as this one (a member's hint waits for it like
//! any other), and only then is the removed owner's hint removed, so one
//! replica that is down cannot hold up the rest. The
//! ring without the owner gives the key new replicas, so this restores the
//! copies the write was acknowledged with. So goes a member's hint whose key
//! the ring has moved away from it (a node joined in its place): at once
//! while the owner is up, and while it is believed down in a pass over its
//! hints once per ring (begun at a sweep, at least [`RING_SETTLE`] after
//! the ring came, so that hints from coordinators still on the old ring are
//! in), as a node that a joiner replaces may never come back.
//!
//! The worker is bounded (one batch in flight), observable (the hint metrics
//! of [`HintBook`]) and stops at shutdown between two batches. Its storage
//! calls run on tokio's blocking pool. A hint the owner declines (a merge
//! that would pass a per-key limit until a client resolves the key's
//! siblings, a request it could not decode mid-upgrade, a failing disk) is
//! kept and tried again until its window ends: it may be the only copy of
//! its write (a stand-in's), and the hints declined do not hold back the
//! rest. A corrupt record is dropped and counted (see [`HintBook::batch`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ringkv_core::wire::{ErrorKind, ReplicaRequest, Request, Response};
use ringkv_core::{NodeId, Transport};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::hints::{HintBackend, HintBook, HintError};

/// Whether the failure detector believes a node is up.
pub type IsUp = Arc<dyn Fn(&NodeId) -> bool + Send + Sync>;

/// Whether a node has been removed from the cluster.
pub type IsRemoved = Arc<dyn Fn(&NodeId) -> bool + Send + Sync>;

/// The replicas of a key under the current ring (empty before there is one).
pub type ReplicasOf = Arc<dyn Fn(&[u8]) -> Vec<NodeId> + Send + Sync>;

/// Whether a node is on this node's current ring.
pub type IsMember = Arc<dyn Fn(&NodeId) -> bool + Send + Sync>;

/// The fingerprint of this node's current ring (0 before there is one).
pub type RingFingerprint = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Where the worker sends the hints it holds: to their owner while the
/// owner is a member and believed up; once the owner has been removed, to
/// the replicas of each hint's key under the current ring.
#[derive(Clone)]
pub struct HintRouting {
    is_up: IsUp,
    reroute: Option<Reroute>,
}

/// How a removed owner's hints are rerouted (see the module docs).
#[derive(Clone)]
struct Reroute {
    /// This node: a send to itself that fails is not turned into a hint.
    me: NodeId,
    is_removed: IsRemoved,
    replicas_of: ReplicasOf,
    /// Whether a node is on this node's ring; `None`: owners' hints are
    /// never rerouted for their keys having moved (see `with_ring_members`).
    on_ring: Option<IsMember>,
    /// The ring's fingerprint; `None`: the hints of an owner believed down
    /// wait for it, moved keys or not (see `with_ring_fingerprint`).
    fingerprint: Option<RingFingerprint>,
}

impl HintRouting {
    /// Hints go to their owners only (a fixed membership, as in the
    /// simulator).
    pub fn to_owners(is_up: IsUp) -> Self {
        HintRouting {
            is_up,
            reroute: None,
        }
    }

    /// Also reroute the hints of owners `is_removed` says are gone, to
    /// `replicas_of` their keys; `me` is this node.
    pub fn rerouting_removed(
        mut self,
        me: NodeId,
        is_removed: IsRemoved,
        replicas_of: ReplicasOf,
    ) -> Self {
        self.reroute = Some(Reroute {
            me,
            is_removed,
            replicas_of,
            on_ring: None,
            fingerprint: None,
        });
        self
    }

    /// Also hand on the hints of an owner believed down whose keys moved
    /// away, once per ring (`fingerprint` tells rings apart), since an owner
    /// that a joiner replaced may never come back for them. Needs
    /// [`Self::rerouting_removed`] first, and does nothing without
    /// [`Self::with_ring_members`].
    pub fn with_ring_fingerprint(mut self, fingerprint: RingFingerprint) -> Self {
        if let Some(reroute) = &mut self.reroute {
            reroute.fingerprint = Some(fingerprint);
        }
        self
    }

    /// Also reroute a member's hint whose key `replicas_of` no longer
    /// places on it (a node joined in its place), but only while `on_ring`
    /// says the owner is on this node's ring: an owner missing from it
    /// may have just joined, this node's ring being the older one, and its
    /// hint must wait for it. Needs [`Self::rerouting_removed`] first.
    pub fn with_ring_members(mut self, on_ring: IsMember) -> Self {
        if let Some(reroute) = &mut self.reroute {
            reroute.on_ring = Some(on_ring);
        }
        self
    }

    /// The ring's fingerprint, if the hints of an owner believed down
    /// whose keys moved away are handed on.
    fn moved_keys_ring(&self) -> Option<u64> {
        let reroute = self.reroute.as_ref().filter(|r| r.on_ring.is_some())?;
        reroute
            .fingerprint
            .as_ref()
            .map(|fingerprint| fingerprint())
    }

    /// Whether the node has no ring yet this run (its fingerprint is 0): it
    /// is still starting, and its member list may be older than the owners'
    /// (a joiner may have taken a key from an owner meanwhile, which would
    /// store the hint where nothing looks). Without a fingerprint (the
    /// simulator's fixed membership) there always is one.
    fn ring_missing(&self) -> bool {
        self.reroute
            .as_ref()
            .and_then(|reroute| reroute.fingerprint.as_ref())
            .is_some_and(|fingerprint| fingerprint() == 0)
    }

    /// How to reroute `owner`'s hints, if `owner` has been removed.
    fn rerouted(&self, owner: &NodeId) -> Option<&Reroute> {
        self.reroute
            .as_ref()
            .filter(|reroute| (reroute.is_removed)(owner))
    }
}

/// Tuning of the delivery worker.
#[derive(Debug, Clone)]
pub struct HandoffConfig {
    /// How often the worker looks for owners to deliver to.
    pub tick: Duration,
    /// Hints sent at once to one owner.
    pub batch_size: usize,
    /// Hints sent per second at most, over all owners.
    pub max_rate_per_s: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long one send may take before it counts as failed, for a batch
    /// of small hints; a larger batch gets its bytes at 64 Mbit/s more.
    pub send_timeout: Duration,
    /// How often hints past the window are swept out.
    pub sweep_interval: Duration,
    /// How soon after the last sweep a store refused for want of room
    /// since then brings the next one forward.
    pub sweep_when_full_interval: Duration,
}

impl HandoffConfig {
    /// The defaults for a hint window of `ttl`: sweeps eight times a
    /// window (so hints past it take up at most an eighth more room), at
    /// least once an hour and at most once a second, and four times as
    /// often while stores are refused for want of room. A sweep reads only
    /// the owners that may hold a hint past the window, but while an owner
    /// stays away longer than the window that is all of its hints every
    /// time: with 4 GiB held, a sweep a minute read 70 MB/s, a sweep every
    /// 22.5 minutes (the 3 h default window) reads 3 MB/s, and 12 MB/s
    /// while the cap is full.
    pub fn for_ttl(ttl: Duration) -> Self {
        let sweep_interval = (ttl / 8).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        HandoffConfig {
            tick: Duration::from_millis(250),
            batch_size: 64,
            max_rate_per_s: DEFAULT_MAX_RATE_PER_S,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            send_timeout: Duration::from_secs(2),
            sweep_interval,
            sweep_when_full_interval: (sweep_interval / 4).max(Duration::from_secs(1)),
        }
    }
}

/// The default pace of delivery, in hints per second.
pub const DEFAULT_MAX_RATE_PER_S: u32 = 5_000;

/// When each owner may next be tried: exponential back-off per owner after a
/// failed delivery, reset by a successful one. Time is passed in.
#[derive(Debug)]
pub struct DeliverySchedule {
    initial: Duration,
    max: Duration,
    waiting: HashMap<NodeId, (Instant, Duration)>,
}

impl DeliverySchedule {
    pub fn new(initial: Duration, max: Duration) -> Self {
        DeliverySchedule {
            initial,
            max,
            waiting: HashMap::new(),
        }
    }

    /// Whether `owner` may be tried at `now`.
    pub fn is_due(&self, owner: &NodeId, now: Instant) -> bool {
        self.waiting.get(owner).is_none_or(|(at, _)| *at <= now)
    }

    /// A delivery to `owner` failed at `now`: wait before the next, twice as
    /// long as last time (up to the maximum).
    pub fn failed(&mut self, owner: &NodeId, now: Instant) {
        let backoff = match self.waiting.get(owner) {
            Some((_, last)) => (*last * 2).min(self.max),
            None => self.initial,
        };
        self.waiting.insert(owner.clone(), (now + backoff, backoff));
    }

    /// A delivery to `owner` went through: no more waiting.
    pub fn succeeded(&mut self, owner: &NodeId) {
        self.waiting.remove(owner);
    }

    /// Forgets the owners not in `owners` (their hints are gone: swept,
    /// rerouted), so that the schedule holds only owners with hints.
    pub fn keep_only(&mut self, owners: &[NodeId]) {
        self.waiting.retain(|owner, _| owners.contains(owner));
    }
}

/// Runs a hint-book call on the blocking pool: each is a RocksDB read or
/// write, an fsync with `--sync`, which must not stall the async workers.
async fn blocking<B: HintBackend, R: Send + 'static>(
    book: &Arc<HintBook<B>>,
    f: impl FnOnce(&HintBook<B>) -> Result<R, HintError> + Send + 'static,
) -> Result<R, String> {
    let book = book.clone();
    match tokio::task::spawn_blocking(move || f(&book)).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(format!("hint storage task failed: {e}")),
    }
}

/// Starts the delivery worker. It runs until `shutdown` turns true, and
/// stops between two batches (or two sweep pages) when it does.
pub fn start<T: Transport, B: HintBackend>(
    book: Arc<HintBook<B>>,
    transport: Arc<T>,
    routing: HintRouting,
    config: HandoffConfig,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut schedule = DeliverySchedule::new(config.backoff_initial, config.backoff_max);
        // Where each owner's next round starts (after a round that stopped
        // early, either way); from the first hint if absent.
        let mut resume: HashMap<NodeId, Vec<u8>> = HashMap::new();
        // For owners believed down: the ring under which a pass over their
        // hints for moved keys last went all the way round, and where an
        // unfinished pass resumes.
        let mut moved_checked: HashMap<NodeId, u64> = HashMap::new();
        let mut moved_resume: HashMap<NodeId, Vec<u8>> = HashMap::new();
        // When the unfinished pass began, and the current ring and when it
        // was first seen: a pass counts for its ring only if it began
        // `RING_SETTLE` after.
        let mut moved_began: HashMap<NodeId, Instant> = HashMap::new();
        let mut ring_seen: Option<(u64, Instant)> = None;
        let mut tick = tokio::time::interval(config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // None until the first sweep, which runs at the first tick: hints
        // that passed the window while the node was down (a long outage)
        // would otherwise hold room for a whole sweep interval, refusing
        // new hints.
        let mut last_sweep: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            let due = last_sweep.is_none_or(|at| {
                let since = at.elapsed();
                since >= config.sweep_interval
                    || (book.refused_for_room() && since >= config.sweep_when_full_interval)
            });
            let mut swept = false;
            if due {
                let sweep = sweep(&book, config.batch_size);
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => return,
                    _ = sweep => {}
                }
                last_sweep = Some(Instant::now());
                swept = true;
            }
            // Nothing is delivered before the node has a ring: where a hint
            // goes depends on it (see `HintRouting::ring_missing`).
            if routing.ring_missing() {
                continue;
            }
            let targets = book.targets();
            resume.retain(|owner, _| targets.contains(owner));
            moved_checked.retain(|owner, _| targets.contains(owner));
            moved_resume.retain(|owner, _| targets.contains(owner));
            moved_began.retain(|owner, _| targets.contains(owner));
            let moved_ring = routing.moved_keys_ring();
            if let Some(ring) = moved_ring.filter(|ring| ring_seen.map(|(r, _)| r) != Some(*ring)) {
                ring_seen = Some((ring, Instant::now()));
            }
            schedule.keep_only(&targets);
            for owner in targets {
                let rerouted = routing.rerouted(&owner);
                // A removed owner's hints are rerouted whether it is up or
                // not: a replica that does not take one (or is believed
                // down) gets a hint of its own. An owner believed down keeps
                // its hints, except those whose key moved away (a node
                // joined in its place), which go to the key's replicas, in
                // one pass per ring (begun at a sweep, resumed at each tick
                // until done): the owner may never come back to take them.
                let kind = if rerouted.is_some() {
                    Round::Removed
                } else if (routing.is_up)(&owner) {
                    Round::Owner
                } else if moved_ring.is_some_and(|ring| moved_checked.get(&owner) != Some(&ring))
                    && (swept || moved_resume.contains_key(&owner))
                {
                    Round::MovedOnly
                } else {
                    continue;
                };
                // The owner is not asked in a MovedOnly pass: its back-off
                // does not apply. A pass cut short by the owner coming up
                // starts again from the first hint: it walks forward only.
                if kind != Round::MovedOnly {
                    moved_resume.remove(&owner);
                    moved_began.remove(&owner);
                    if !schedule.is_due(&owner, Instant::now()) {
                        continue;
                    }
                }
                let resumes = if kind == Round::MovedOnly {
                    &mut moved_resume
                } else {
                    &mut resume
                };
                let mut start = resumes.remove(&owner);
                if kind == Round::MovedOnly && start.is_none() {
                    moved_began.insert(owner.clone(), Instant::now());
                }
                let round = deliver_to(
                    &book, &transport, &owner, &routing, kind, &config, &mut start,
                );
                let outcome = tokio::select! {
                    biased;
                    _ = shutdown.changed() => return,
                    outcome = round => outcome,
                };
                let went_round = start.is_none();
                if let Some(after) = start {
                    resumes.insert(owner.clone(), after);
                }
                match outcome {
                    // The owner was not asked: its back-off stands.
                    Ok(delivered) if kind == Round::MovedOnly => {
                        // A pass that took several turns keeps the time it
                        // began until it has gone all the way.
                        let began = if went_round {
                            moved_began.remove(&owner)
                        } else {
                            None
                        };
                        if let (Some(began), Some((ring, seen))) = (began, ring_seen) {
                            if began >= seen + RING_SETTLE {
                                moved_checked.insert(owner.clone(), ring);
                            }
                        }
                        if delivered > 0 {
                            tracing::info!(%owner, delivered, "handed the hints of keys that moved away from a node believed down to their replicas");
                        }
                    }
                    Err(reason) if kind == Round::MovedOnly => {
                        tracing::debug!(%owner, %reason, "rerouting the hints of moved keys stopped");
                    }
                    Ok(delivered) => {
                        schedule.succeeded(&owner);
                        if delivered > 0 && rerouted.is_some() {
                            tracing::info!(%owner, delivered, "handed the hints of a removed node to its keys' replicas");
                        } else if delivered > 0 {
                            tracing::info!(%owner, delivered, "handed off hints");
                        }
                    }
                    Err(reason) => {
                        schedule.failed(&owner, Instant::now());
                        metrics::counter!("ringkv_hint_delivery_failures_total", "target" => owner.to_string())
                            .increment(1);
                        tracing::debug!(%owner, %reason, "hint delivery failed; backing off");
                    }
                }
            }
        }
    })
}

/// How long after a ring is first seen coordinators may still hint by the
/// ring before it (membership spreads by an exchange every 5 s): a pass for
/// moved keys begun sooner may miss their hints, and does not count.
pub const RING_SETTLE: Duration = Duration::from_secs(60);

/// The longest one owner's round runs before the worker turns to the other
/// owners and the sweep (50,000 hints at the default pace): a million hints
/// for one owner took 200 s, longer over a slow link, while hints for every
/// other owner, even one just back, waited.
const ROUND_TURN_MAX: Duration = Duration::from_secs(10);

/// The slowest link a hint's bytes are expected to cross, for its send
/// timeout: 64 Mbit/s.
const SEND_BYTES_PER_S_MIN: f64 = 8.0 * 1024.0 * 1024.0;

/// How long a send of a batch of `bytes` may take: `base` plus the bytes at
/// [`SEND_BYTES_PER_S_MIN`]. A fixed timeout failed a large hint (a clock
/// may be up to 64 MiB) or a batch of medium ones on every retry over a
/// slow link, shipping them each time, until they expired. A batch holds
/// 8 MiB and one larger hint at most, so this adds 9 s at most.
pub fn send_timeout_for(base: Duration, bytes: usize) -> Duration {
    base + Duration::from_secs_f64(bytes as f64 / SEND_BYTES_PER_S_MIN)
}

/// Drops hints past the window, page by page, from the owners that may
/// hold one (the others' hints are not read); a failure with one owner does
/// not stop the others.
async fn sweep<B: HintBackend>(book: &Arc<HintBook<B>>, page: usize) {
    let (mut dropped, mut read) = (0, 0);
    book.begin_sweep();
    for owner in book.owners_to_sweep() {
        let mut pass = book.begin_expiry(&owner);
        loop {
            let step = blocking(book, move |b| {
                let more = b.expire_page(&mut pass, page)?;
                Ok((pass, more))
            });
            match step.await {
                Ok((next, true)) => pass = next,
                Ok((done, false)) => {
                    (dropped, read) = (dropped + done.dropped, read + done.read);
                    break;
                }
                Err(e) => {
                    tracing::warn!(%owner, error = %e, "hint sweep failed");
                    break;
                }
            }
        }
    }
    metrics::counter!("ringkv_hint_sweeps_total").increment(1);
    if dropped > 0 {
        tracing::info!(dropped, read, "dropped hints past the hint window");
    }
}

/// Which of an owner's hints a round hands on, and to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// A member believed up: its hints go to it, but those whose key moved
    /// away go to the key's replicas.
    Owner,
    /// A removed owner: every hint goes to its key's replicas.
    Removed,
    /// A member believed down: only the hints whose key moved away are
    /// handed on (to the key's replicas); the others wait for it.
    MovedOnly,
}

/// Delivers the hints held for `owner` that `kind` hands on (all of them
/// but in a [`Round::MovedOnly`] pass), batch by batch: to `owner`, or, if
/// it was removed, to the replicas `routing` gives for each
/// key (a replica that cannot take it, or is believed down, gets a hint of its own). So goes a
/// hint whose key the ring no longer places on its owner (a node joined
/// and took the owner's place): the owner would store a copy that reads,
/// anti-entropy and tombstone collection never look at, while the write's
/// acknowledged copies would be one short where they are looked for. Returns how many
/// were delivered, or why the round stopped. A hint the owner (or one of the
/// replicas) refuses as invalid (it never will take it) is dropped and
/// counted, not retried; one it could not decode is kept.
///
/// A round starts after `resume` (where the last one stopped early, at a
/// failure or at the end of its turn, [`ROUND_TURN_MAX`]), goes to the last
/// hint and wraps round to the first, so that it visits every hint once (a
/// [`Round::MovedOnly`] pass does not wrap: each begins at the first hint);
/// it sets `resume` to where it stops early, and clears it when it went all
/// the way round. So no batch, whatever it holds, can keep the
/// hints after it (or before it) waiting for good.
async fn deliver_to<T: Transport, B: HintBackend>(
    book: &Arc<HintBook<B>>,
    transport: &Arc<T>,
    owner: &NodeId,
    routing: &HintRouting,
    kind: Round,
    config: &HandoffConfig,
    resume: &mut Option<Vec<u8>>,
) -> Result<u64, String> {
    let (is_up, reroute) = (&routing.is_up, routing.reroute.as_ref());
    let removed = kind == Round::Removed;
    let mut delivered = 0;
    let started_after = resume.clone();
    let mut after = started_after.clone();
    // After wrapping round: the hints up to where the round started.
    let mut second_leg = false;
    // A removed owner's round goes on past a hint it cannot hand on yet (it
    // never comes back, so nothing is gained by waiting). An owner's round
    // stops at a batch the owner answered none of, since it is likely down;
    // one it answered shows it up, and the round goes on past the hints it
    // declined, so that hints it keeps declining (a clock it cannot read,
    // say) cannot hold back the others. But not for ever: an owner that
    // declines everything (its disk failing) stops the round after
    // `DECLINED_BATCHES_MAX` batches in a row of which it took nothing, and
    // the next round resumes after them, so a long run of hints it declines
    // delays the rest by a few rounds, never for good.
    let mut round_failure = None;
    let mut batches_taking_nothing = 0;
    let round_started = Instant::now();
    loop {
        let (o, a, limit) = (owner.clone(), after.take(), config.batch_size);
        let mut batch = blocking(book, move |b| {
            let batch = b.batch(&o, a.as_deref(), limit)?;
            // Nothing leaves before it is durable (see `make_durable`).
            if !batch.is_empty() {
                b.make_durable()?;
            }
            Ok(batch)
        })
        .await?;
        if let (true, Some(end)) = (second_leg, &started_after) {
            batch.retain(|hint| hint.key <= *end);
        }
        let Some(last) = batch.last() else {
            // A MovedOnly pass walks forward only: each begins at the
            // first hint, and one that wrapped round would never end for
            // an owner whose hints (all kept) take more than a turn.
            if !second_leg && started_after.is_some() && kind != Round::MovedOnly {
                second_leg = true;
                continue;
            }
            *resume = None;
            return round_failure.map_or(Ok(delivered), Err);
        };
        after = Some(last.key.clone());
        let started = Instant::now();
        let now_ms = book.now_ms();
        // What each hint to send goes to: chosen first, so that the send
        // timeout counts the bytes of the hints sent only.
        let mut planned = Vec::new();
        for hint in batch {
            if book.is_expired(&hint, now_ms) {
                let (o, key) = (owner.clone(), hint.key);
                blocking(book, move |b| b.drop_if_expired(&o, &key)).await?;
                continue;
            }
            let replicas = reroute.map(|reroute| (reroute.replicas_of)(&hint.key));
            let owner_on_ring = reroute
                .and_then(|r| r.on_ring.as_ref())
                .is_some_and(|on_ring| on_ring(owner));
            let moved_away = !removed
                && owner_on_ring
                && replicas
                    .as_ref()
                    .is_some_and(|replicas| !replicas.is_empty() && !replicas.contains(owner));
            if kind == Round::MovedOnly && !moved_away {
                continue;
            }
            let rerouted = reroute.filter(|_| removed || moved_away);
            let targets = match (rerouted, replicas) {
                (Some(_), Some(replicas)) => replicas,
                _ => vec![owner.clone()],
            };
            if targets.is_empty() {
                return Err("no ring to reroute a removed node's hints by".to_string());
            }
            if rerouted.is_some() && targets.contains(owner) {
                // The removal is recorded but the ring without the owner is
                // not installed yet: a send to the owner would fail, and the
                // re-hint onto it would leave the replica replacing it
                // without a copy. Keep the hint for the next round.
                round_failure = Some(format!("the ring still places keys on {owner}"));
                continue;
            }
            let is_rerouted = rerouted.is_some();
            // A rerouted hint's replica believed down gets a hint of its own
            // without being tried: a hung one would hold the round (and the
            // other owners' rounds behind it) for the send timeout.
            let believed_down: Vec<NodeId> = match rerouted {
                Some(r) => targets
                    .iter()
                    .filter(|t| **t != r.me && !is_up(t))
                    .cloned()
                    .collect(),
                None => Vec::new(),
            };
            planned.push((hint, targets, believed_down, is_rerouted));
        }
        // The batch's sends run at once and share the link: each may take
        // as long as all their bytes need.
        let batch_bytes: usize = planned
            .iter()
            .map(|(hint, ..)| hint.clock.approx_size())
            .sum();
        let timeout = send_timeout_for(config.send_timeout, batch_bytes);
        let mut sends = tokio::task::JoinSet::new();
        for (hint, targets, believed_down, is_rerouted) in planned {
            let transport = transport.clone();
            sends.spawn(async move {
                let request = Request::Replica(ReplicaRequest::Handoff {
                    key: hint.key.clone(),
                    clock: hint.clock.clone(),
                });
                // At most N targets: one after the other is simple, and
                // the batch's hints still go in parallel.
                let mut outcomes = Vec::with_capacity(targets.len());
                for target in targets {
                    if believed_down.contains(&target) {
                        outcomes.push((target, Sent::Failed("believed down".to_string())));
                        continue;
                    }
                    let call = transport.call(&target, request.clone());
                    let sent = match tokio::time::timeout(timeout, call).await {
                        Ok(Ok(answer)) => Sent::from(answer),
                        Ok(Err(e)) => Sent::Failed(e.to_string()),
                        Err(_) => Sent::Failed("timed out".to_string()),
                    };
                    outcomes.push((target, sent));
                }
                (hint, outcomes, is_rerouted)
            });
        }
        let sent = sends.len();
        let mut failure = None;
        let (mut answered, mut taken) = (0, 0);
        while let Some(joined) = sends.join_next().await {
            let (hint, outcomes, is_rerouted) = match joined {
                Ok(done) => done,
                Err(e) => {
                    failure = Some(format!("send task failed: {e}"));
                    continue;
                }
            };
            if outcomes
                .iter()
                .any(|(_, sent)| !matches!(sent, Sent::Failed(_)))
            {
                answered += 1;
            }
            if outcomes.iter().any(|(_, sent)| *sent == Sent::Taken) {
                taken += 1;
            }
            let failed: Vec<(NodeId, String)> = outcomes
                .into_iter()
                .filter_map(|(target, sent)| match sent {
                    Sent::Failed(reason) | Sent::Declined(reason) => Some((target, reason)),
                    _ => None,
                })
                .collect();
            // A rerouted hint (its owner removed, or its key moved away): a
            // replica that did not take it gets a hint of its own, as old as
            // this one (its age bounds how long a tombstone must outlive it),
            // unless that replica is this node. An owner's hint that it did
            // not take is kept for next time.
            let rehint = match reroute.filter(|_| is_rerouted) {
                Some(reroute) if !failed.iter().any(|(t, _)| *t == reroute.me) => {
                    failed.iter().map(|(t, _)| t.clone()).collect()
                }
                _ if failed.is_empty() => Vec::new(),
                _ => {
                    let (target, reason) = &failed[0];
                    failure = Some(format!("{target}: {reason}"));
                    continue;
                }
            };
            let o = owner.clone();
            let handed = blocking(book, move |b| {
                for target in &rehint {
                    b.store_aged(target, &hint.key, &hint.clock, hint.stored_at_ms)?;
                }
                b.remove_delivered(&o, &hint.key, &hint.clock)
            })
            .await;
            match handed {
                Ok(true) => {
                    delivered += 1;
                    if is_rerouted {
                        metrics::counter!("ringkv_hints_rerouted_total").increment(1);
                    }
                }
                Ok(false) => {}
                // Say a replica's own hints are at their cap: keep this one,
                // and go on with the rest.
                Err(reason) => failure = Some(reason),
            }
        }
        // (A batch whose hints had all expired sent nothing, and says
        // nothing of the owner.)
        batches_taking_nothing = if sent == 0 {
            batches_taking_nothing
        } else if taken == 0 {
            batches_taking_nothing + 1
        } else {
            0
        };
        if let Some(reason) = failure {
            if kind == Round::Owner
                && (answered == 0 || batches_taking_nothing >= DECLINED_BATCHES_MAX)
            {
                resume.clone_from(&after);
                return Err(reason);
            }
            round_failure = Some(reason);
        }
        // Pace: `sent` hints may take no less than sent / rate seconds.
        let budget = Duration::from_secs_f64(sent as f64 / f64::from(config.max_rate_per_s.max(1)));
        tokio::time::sleep_until(started + budget).await;
        // Owners are served one at a time, and the sweep waits too: a turn
        // ends after `ROUND_TURN_MAX`, and the next resumes after it.
        if round_started.elapsed() >= ROUND_TURN_MAX {
            resume.clone_from(&after);
            return round_failure.map_or(Ok(delivered), Err);
        }
    }
}

/// Batches in a row of which an owner took nothing, though it answered,
/// after which its round stops (see `deliver_to`).
const DECLINED_BATCHES_MAX: usize = 4;

/// What became of one hint sent to one target.
#[derive(Debug, PartialEq)]
enum Sent {
    /// The target made it durable.
    Taken,
    /// The target answered, but did not take it this time.
    Declined(String),
    /// No answer: the target could not be reached, or took too long.
    Failed(String),
}

impl From<Response> for Sent {
    fn from(answer: Response) -> Sent {
        match answer {
            Response::Clock(_) => Sent::Taken,
            // The owner serves, but its ring does not place this key on it
            // (one of the two rings is newer): only this hint waits, and the
            // round goes on with the owner's others.
            Response::Error(e)
                if e.kind == ErrorKind::NotServing
                    && e.message.starts_with(ringkv_core::wire::HANDOFF_MISPLACED) =>
            {
                Sent::Declined(e.message)
            }
            // Serving nothing (draining, or removed), or shedding load: as
            // good as down for this round.
            Response::Error(e)
                if matches!(e.kind, ErrorKind::NotServing | ErrorKind::Overloaded) =>
            {
                Sent::Failed(e.message)
            }
            // Everything else is kept for a later try. A `Sync` is refused
            // as invalid only when the merge would pass a per-key limit (or
            // the owner could not decode it, mid-upgrade), which lasts
            // until a client write resolves the key's siblings, not for
            // good; and dropping the hint would lose a stand-in's write,
            // which no replica holds.
            Response::Error(e) => Sent::Declined(e.message),
            other => Sent::Declined(format!("unexpected answer {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hint refused as invalid is kept for later: its merge would pass a
    /// per-key limit until a client resolves the key's siblings, or the
    /// owner could not decode it (mid-upgrade).
    #[test]
    fn a_hint_refused_as_invalid_is_kept_for_later() {
        let answer =
            |message: String| Sent::from(Response::error(ErrorKind::InvalidRequest, message));
        for message in [
            "the key's versions would take about 70000 bytes, over the 65536-byte limit".into(),
            format!("{}: unknown variant", ringkv_core::wire::MALFORMED_REQUEST),
        ] {
            assert!(matches!(answer(message), Sent::Declined(_)));
        }
    }

    #[test]
    fn back_off_doubles_to_the_maximum_and_resets_on_success() {
        let t0 = Instant::now();
        let owner = NodeId::new("c").unwrap();
        let mut s = DeliverySchedule::new(Duration::from_secs(1), Duration::from_secs(3));
        assert!(s.is_due(&owner, t0));
        s.failed(&owner, t0);
        assert!(!s.is_due(&owner, t0 + Duration::from_millis(999)));
        assert!(s.is_due(&owner, t0 + Duration::from_secs(1)));
        s.failed(&owner, t0);
        assert!(!s.is_due(&owner, t0 + Duration::from_millis(1999)));
        s.failed(&owner, t0);
        s.failed(&owner, t0);
        assert!(
            s.is_due(&owner, t0 + Duration::from_secs(3)),
            "capped at the maximum"
        );
        s.succeeded(&owner);
        assert!(s.is_due(&owner, t0));
        // An owner whose hints are gone is forgotten with its back-off.
        let other = NodeId::new("d").unwrap();
        s.failed(&owner, t0);
        s.failed(&other, t0);
        s.keep_only(std::slice::from_ref(&other));
        assert_eq!(s.waiting.len(), 1);
        assert!(s.is_due(&owner, t0) && !s.is_due(&other, t0));
    }

    /// An owner that serves nothing or sheds load has not taken the hint
    /// and is not asked again this round (`Failed`); one that answers an
    /// error has not taken it this time (`Declined`).
    #[test]
    fn an_owner_that_ran_nothing_failed_this_round() {
        for kind in [ErrorKind::NotServing, ErrorKind::Overloaded] {
            let sent = Sent::from(Response::error(kind, "busy"));
            assert!(matches!(sent, Sent::Failed(_)), "{kind:?}: {sent:?}");
        }
        let declined = Sent::from(Response::error(ErrorKind::Internal, "disk"));
        assert!(matches!(declined, Sent::Declined(_)), "{declined:?}");
        // An owner whose ring does not place the key on it serves: only
        // that hint waits, the round goes on.
        let misplaced = misplaced_refusal();
        assert!(matches!(Sent::from(misplaced), Sent::Declined(_)));
    }

    /// The refusal an owner sends for a hint its ring does not place on it
    /// (`ringkv_coordinator::replica::handoff_refusal`, which this crate
    /// cannot call: it starts with the shared prefix).
    fn misplaced_refusal() -> Response {
        Response::error(
            ErrorKind::NotServing,
            format!(
                "{}: n3 (the sender's ring is older or newer)",
                ringkv_core::wire::HANDOFF_MISPLACED
            ),
        )
    }
}
