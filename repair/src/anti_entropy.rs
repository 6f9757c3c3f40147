//! Merkle-tree anti-entropy (Dynamo §4.7): two replicas find the keys they
//! disagree on by exchanging a few hashes, then merge just those keys.
//!
//! A round on node A visits every peer B on the ring, one at a time:
//!
//! 1. **Descent.** A asks B for the root of the tree B keeps for A
//!    ([`ReplicaRequest::TreeHashes`]) and compares it with its own tree
//!    for B (see [`crate::trees`]). Equal roots end the exchange: between
//!    identical replicas a round costs one small request per peer. Otherwise
//!    A asks for the children of every differing node, one level at a time,
//!    so the hashes sent follow the number of differences, not of keys.
//! 2. **Listing.** For the differing leaves, both sides list `(key, version
//!    digest)` of the keys they share ([`ReplicaRequest::LeafItems`]; A reads
//!    its own from a [`LeafSource`], the store listing a leaf's keys), and
//!    [`differing_keys`] names the keys to repair.
//! 3. **Repair.** In batches of 64 keys, A reads both sides' versions
//!    ([`ReplicaRequest::ReadBatch`]) and sends each side the merge of the
//!    two where it differs ([`ReplicaRequest::SyncBatch`], which merges
//!    dotted version vectors: concurrent siblings survive, nothing is
//!    overwritten). A side whose version already is the merge is not written.
//!
//! A tombstone is never copied to a replica that lacks the key: deleting
//! what is not there changes nothing, and it lets a collected tombstone stay
//! collected (see [`crate::tombstones`]).
//!
//! Bounds: one round at a time per node; tree hashes, leaves, reads and
//! merges are asked for in bounded chunks, one request at a time, and key
//! repairs are paced to [`AntiEntropyConfig::keys_per_s`] so that repair
//! never starves client requests: a key written (or failed) counts in
//! full, one read and found to need nothing at an eighth (a tombstone facing an absent key
//! stays a difference every round until it is collected). Every call has a timeout. Time for
//! "last round" comes from a [`WallClock`] passed in; durations from tokio's
//! clock, so tests can pause it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, histogram};
use ringkv_core::dvv::Clock;
use ringkv_core::wire::{
    clock_over_limit, encode_request, encode_response, ClockOverLimit, ErrorKind, KeyClock,
    KeyDigest, PeerFailure, RepairReport, ReplicaRequest, Request, Response,
    LEAVES_PER_REQUEST_MAX, READ_BATCH_REPLY_BYTES, TREE_HASHES_MAX,
};
use ringkv_core::{NodeId, Transport};
use tokio::time::Instant;

use crate::handoff::send_timeout_for;
use crate::hints::WallClock;
use crate::merkle::{differing_keys, MerkleTree, FANOUT_BITS};
use crate::trees::ReplicaTrees;

/// The default time between two rounds, in seconds (`--anti-entropy-interval-s`).
pub const DEFAULT_ANTI_ENTROPY_INTERVAL_S: u64 = 60;
/// The default pace of key repairs, per second. Measured on 2 cores
/// shared by three nodes and their clients (bench/RESULTS.md): 5,000/s
/// raised put p99 2.4x during a large repair, 1,000/s kept it within 2x.
pub const DEFAULT_REPAIR_KEYS_PER_S: u32 = 1_000;
/// Keys read and merged per request pair.
const REPAIR_BATCH: usize = 64;
/// How many keys read but found to need nothing cost as much of the repair
/// pace as one key written.
const EXAMINED_PER_REPAIR: usize = 8;

/// What a batch of `examined` keys, `repaired` of them written (or failed),
/// counts against [`AntiEntropyConfig::keys_per_s`]: a key written in
/// full, one only read and found to need nothing at [`EXAMINED_PER_REPAIR`]
/// to one. A difference repair never
/// writes (a tombstone on one side, nothing on the other: see the module
/// docs) stays listed until the tombstone is collected, a day by default,
/// and comes back every round: after a join, every key deleted in the last
/// day is one. Charged in full, such keys used the pace of real repairs
/// (at 100 deletes/s, hours per peer per round); not charged at all, their
/// reads would run unpaced.
fn pacing_charge(examined: usize, repaired: u64) -> f64 {
    let repaired = (repaired as usize).min(examined);
    repaired as f64 + (examined - repaired) as f64 / EXAMINED_PER_REPAIR as f64
}

/// The `(key, version digest)` pairs a replica stores, by Merkle leaf.
pub trait LeafSource: Send + Sync + 'static {
    /// Every stored key in `leaf` of a tree with `2^leaf_bits` leaves that
    /// is `wanted`, with the [`version_digest`](crate::trees::version_digest)
    /// of its clock. Keys not wanted are left out before their digest is
    /// found, which may mean reading the whole clock.
    fn leaf_items(
        &self,
        leaf: usize,
        leaf_bits: u32,
        wanted: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<(Vec<u8>, u64)>, String>;
}

/// Tuning of anti-entropy rounds.
#[derive(Debug, Clone)]
pub struct AntiEntropyConfig {
    /// Keys repaired per second at most.
    pub keys_per_s: u32,
    /// How long one call to a peer may take.
    pub call_timeout: Duration,
    /// How long a round waits for this node's trees to be ready.
    pub ready_timeout: Duration,
}

impl Default for AntiEntropyConfig {
    fn default() -> Self {
        AntiEntropyConfig {
            keys_per_s: DEFAULT_REPAIR_KEYS_PER_S,
            call_timeout: Duration::from_secs(5),
            ready_timeout: Duration::from_secs(60),
        }
    }
}

/// Why an exchange with one peer did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AntiEntropyError {
    #[error("{node}'s Merkle trees are still being built; retry shortly")]
    NotReady { node: NodeId },
    #[error("{peer} did not answer: {reason}")]
    Unreachable { peer: NodeId, reason: String },
    #[error("{peer} did not answer within {after_ms} ms")]
    TimedOut { peer: NodeId, after_ms: u64 },
    #[error("{peer} refused: {reason}")]
    Refused {
        peer: NodeId,
        /// The peer's error kind; `None` for an answer of the wrong kind.
        kind: Option<ErrorKind>,
        reason: String,
    },
    #[error("{peer} is believed down; skipped")]
    Down { peer: NodeId },
    #[error("reading this node's keys failed: {reason}")]
    Local { reason: String },
    #[error("{keys} differing keys, and the keys of {leaves} differing leaves the peer could not list, could not be repaired; the first failure: {first}")]
    Skipped {
        keys: u64,
        leaves: u64,
        first: String,
    },
    /// Both sides' versions merged would break the per-key limits, which
    /// every replica refuses to store: a client must resolve the key's
    /// siblings (a write with its context).
    #[error("the merge of both replicas' versions would hold {over}; resolve the key's siblings with a write that carries its context")]
    MergeOverLimit { over: ClockOverLimit },
}

/// A node's anti-entropy: answers peers' tree questions and runs rounds.
pub struct AntiEntropy<T> {
    trees: Arc<ReplicaTrees>,
    leaves: Arc<dyn LeafSource>,
    transport: Arc<T>,
    config: AntiEntropyConfig,
    now_ms: WallClock,
    round_lock: tokio::sync::Mutex<()>,
    /// Leaves per listing that a peer's answers were found to need, below
    /// the estimate (see `exchange`): kept across rounds, doubled back after
    /// each exchange that went through.
    listing_leaves: std::sync::Mutex<std::collections::HashMap<NodeId, usize>>,
    keys_repaired: AtomicU64,
    /// When the last round that exchanged with a peer (or had none to
    /// exchange with) finished, keys skipped or not; 0: none yet. A round
    /// whose every exchange failed leaves it, so `status` does not show a
    /// recent exchange while anti-entropy makes no progress.
    last_round_unix_ms: AtomicU64,
}

/// Byte and key counts of one exchange, shared by its concurrent repairs.
#[derive(Default)]
struct Tally {
    keys_compared: AtomicU64,
    keys_repaired: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl<T: Transport> AntiEntropy<T> {
    pub fn new(
        trees: Arc<ReplicaTrees>,
        leaves: Arc<dyn LeafSource>,
        transport: Arc<T>,
        config: AntiEntropyConfig,
        now_ms: WallClock,
    ) -> Self {
        AntiEntropy {
            trees,
            leaves,
            transport,
            config,
            now_ms,
            round_lock: tokio::sync::Mutex::new(()),
            listing_leaves: Default::default(),
            keys_repaired: AtomicU64::new(0),
            last_round_unix_ms: AtomicU64::new(0),
        }
    }

    pub fn trees(&self) -> &Arc<ReplicaTrees> {
        &self.trees
    }

    /// Keys repaired by this node's rounds since it started.
    pub fn keys_repaired(&self) -> u64 {
        self.keys_repaired.load(Ordering::Relaxed)
    }

    /// When this node's last round that exchanged with a peer finished, if
    /// one has (see `last_round_unix_ms`).
    pub fn last_round_unix_ms(&self) -> Option<u64> {
        Some(self.last_round_unix_ms.load(Ordering::Relaxed)).filter(|t| *t != 0)
    }

    /// Answers a peer's `TreeHashes` or `LeafItems`; `None` for any other
    /// request. Reads storage: call off the async workers.
    pub fn answer(&self, request: &ReplicaRequest) -> Option<Response> {
        let bits = self.trees.leaf_bits();
        // Both requests ask of trees of our shape, built, by our ring.
        let refused = |theirs: u32, ring: u64| {
            let me = self.trees.me();
            if theirs != bits {
                Some(Response::error(
                    ErrorKind::InvalidRequest,
                    format!(
                        "Merkle trees of 2^{theirs} leaves asked of a node that keeps 2^{bits}"
                    ),
                ))
            } else if !self.trees.is_ready() {
                Some(Response::error(
                    ErrorKind::Unavailable,
                    AntiEntropyError::NotReady { node: me.clone() }.to_string(),
                ))
            } else if ring != self.trees.ring().fingerprint() {
                // Trees split by another ring do not compare: a key one
                // side shares with the other may be in neither's tree, or
                // the repairs would copy keys to nodes that no longer
                // replicate them.
                Some(Response::error(
                    ErrorKind::Unavailable,
                    format!(
                        "{me} places keys by another ring than the asker (a membership change is still spreading); try again later"
                    ),
                ))
            } else {
                None
            }
        };
        Some(match request {
            ReplicaRequest::TreeHashes {
                peer,
                leaf_bits,
                ring,
                level,
                indexes,
            } => {
                if let Some(refusal) = refused(*leaf_bits, *ring) {
                    return Some(refusal);
                }
                let depth = bits / FANOUT_BITS;
                if *level > depth {
                    return Some(Response::error(
                        ErrorKind::InvalidRequest,
                        format!("tree level {level} asked of a tree {depth} levels deep"),
                    ));
                }
                let indexes: Vec<usize> = indexes.iter().map(|i| *i as usize).collect();
                Response::Hashes(self.trees.hashes(peer, *level as usize, &indexes))
            }
            ReplicaRequest::LeafItems {
                peer,
                leaf_bits,
                ring,
                leaves,
            } => {
                if let Some(refusal) = refused(*leaf_bits, *ring) {
                    return Some(refusal);
                }
                if let Some(bad) = leaves.iter().find(|l| (**l as u64) >> bits != 0) {
                    return Some(Response::error(
                        ErrorKind::InvalidRequest,
                        format!("leaf {bad} asked of a tree of 2^{bits} leaves"),
                    ));
                }
                match shared_items(&self.trees, &*self.leaves, peer, leaves) {
                    Ok(items) => Response::Items(items),
                    Err(reason) => Response::error(
                        ErrorKind::Internal,
                        AntiEntropyError::Local { reason }.to_string(),
                    ),
                }
            }
            _ => return None,
        })
    }

    /// One round against every other node on the ring (skipping those
    /// `is_up` says are down): the report `ringkv repair` prints. Waits for
    /// this node's trees to be ready first.
    pub async fn round(&self, is_up: &(dyn Fn(&NodeId) -> bool + Sync)) -> RepairReport {
        let _one_at_a_time = self.round_lock.lock().await;
        let started = Instant::now();
        let ready_by = started + self.config.ready_timeout;
        while !self.trees.is_ready() && Instant::now() < ready_by {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut report = RepairReport::default();
        if !self.trees.is_ready() {
            // Until the first rebuild the trees know no ring, hence no peers.
            counter!("ringkv_anti_entropy_exchange_failures_total").increment(1);
            report.failures.push(PeerFailure {
                peer: self.trees.me().clone(),
                reason: AntiEntropyError::NotReady {
                    node: self.trees.me().clone(),
                }
                .to_string(),
            });
            report.duration_ms = started.elapsed().as_millis() as u64;
            return report;
        }
        let peers = self.trees.peers();
        report.peers = peers.len() as u32;
        // Whether an exchange went to the end, some keys skipped or not.
        let mut finished = false;
        for peer in &peers {
            let tally = Tally::default();
            let outcome = if !self.trees.is_ready() {
                Err(AntiEntropyError::NotReady {
                    node: self.trees.me().clone(),
                })
            } else if !is_up(peer) {
                Err(AntiEntropyError::Down { peer: peer.clone() })
            } else {
                self.exchange(peer, &tally).await
            };
            if matches!(outcome, Ok(()) | Err(AntiEntropyError::Skipped { .. })) {
                finished = true;
                report.peers_finished += 1;
            }
            if let Err(e) = outcome {
                counter!("ringkv_anti_entropy_exchange_failures_total").increment(1);
                tracing::info!(%peer, error = %e, "anti-entropy exchange did not finish");
                report.failures.push(PeerFailure {
                    peer: peer.clone(),
                    reason: e.to_string(),
                });
            }
            report.keys_compared += tally.keys_compared.load(Ordering::Relaxed);
            report.keys_repaired += tally.keys_repaired.load(Ordering::Relaxed);
            report.bytes_sent += tally.bytes_sent.load(Ordering::Relaxed);
            report.bytes_received += tally.bytes_received.load(Ordering::Relaxed);
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        self.keys_repaired
            .fetch_add(report.keys_repaired, Ordering::Relaxed);
        // A key that cannot be written (a failing disk) is skipped in every
        // round until it is fixed; the rest of the exchange still happened.
        if finished || peers.is_empty() {
            self.last_round_unix_ms
                .store((self.now_ms)().max(1), Ordering::Relaxed);
        }
        counter!("ringkv_anti_entropy_rounds_total").increment(1);
        counter!("ringkv_anti_entropy_keys_repaired_total").increment(report.keys_repaired);
        counter!("ringkv_anti_entropy_bytes_total", "direction" => "sent")
            .increment(report.bytes_sent);
        counter!("ringkv_anti_entropy_bytes_total", "direction" => "received")
            .increment(report.bytes_received);
        histogram!("ringkv_anti_entropy_round_seconds").record(started.elapsed().as_secs_f64());
        report
    }

    /// Calls `peer`, counting the bytes both ways (calls to this node itself
    /// cross no network and are not counted).
    async fn call(
        &self,
        peer: &NodeId,
        request: Request,
        tally: &Tally,
    ) -> Result<Response, AntiEntropyError> {
        let counted = peer != self.trees.me();
        let mut limit = self.config.call_timeout;
        if counted {
            let sent = encode_request(&request).len();
            tally.bytes_sent.fetch_add(sent as u64, Ordering::Relaxed);
            limit = call_timeout_for(limit, &request, sent);
        }
        let answer = tokio::time::timeout(limit, self.transport.call(peer, request))
            .await
            .map_err(|_| AntiEntropyError::TimedOut {
                peer: peer.clone(),
                after_ms: limit.as_millis() as u64,
            })?
            .map_err(|e| AntiEntropyError::Unreachable {
                peer: peer.clone(),
                reason: e.to_string(),
            })?;
        if counted {
            tally
                .bytes_received
                .fetch_add(encode_response(&answer).len() as u64, Ordering::Relaxed);
        }
        match answer {
            Response::Error(e) => Err(AntiEntropyError::Refused {
                peer: peer.clone(),
                kind: Some(e.kind),
                reason: e.message,
            }),
            answer => Ok(answer),
        }
    }

    /// `node`'s clocks of the first of `keys`, in order: as many as one
    /// answer holds (at least one; the answer stops at
    /// `READ_BATCH_REPLY_BYTES`, or after one larger clock).
    async fn read_some(
        &self,
        node: &NodeId,
        keys: &[Vec<u8>],
        tally: &Tally,
    ) -> Result<Vec<Option<Clock>>, AntiEntropyError> {
        let request = Request::Replica(ReplicaRequest::ReadBatch {
            keys: keys.to_vec(),
        });
        match self.call(node, request, tally).await? {
            Response::Clocks(got) if !got.is_empty() && got.len() <= keys.len() => Ok(got),
            other => Err(unexpected(node, &other)),
        }
    }

    /// Merges `items` into `node`'s store, in requests of bounded size.
    async fn sync_batch(
        &self,
        node: &NodeId,
        items: Vec<KeyClock>,
        tally: &Tally,
    ) -> Result<(), AntiEntropyError> {
        let mut pending = Vec::new();
        let mut bytes = 0;
        let mut items = items.into_iter().peekable();
        while let Some(item) = items.next() {
            bytes += item.key.len() + item.clock.approx_size();
            pending.push(item);
            // Send before the next item would pass the cap (one big clock
            // still goes alone: it fits a frame by the clock size limit).
            let next_bytes = items.peek().map(|n| n.key.len() + n.clock.approx_size());
            if next_bytes.is_none_or(|n| bytes + n > READ_BATCH_REPLY_BYTES) {
                let request = Request::Replica(ReplicaRequest::SyncBatch {
                    items: std::mem::take(&mut pending),
                });
                match self.call(node, request, tally).await? {
                    Response::Clock(None) => {}
                    other => return Err(unexpected(node, &other)),
                }
                bytes = 0;
            }
        }
        Ok(())
    }

    /// Sends each side the merge of both versions of `keys`, where it
    /// differs: in steps of as many keys as one answer from each side
    /// holds, so that a step holds about two answers' worth of clocks
    /// (and their merges), however large the values of a batch's keys.
    /// Returns the keys whose merge neither side could store
    /// ([`AntiEntropyError::MergeOverLimit`]), which are not sent.
    async fn repair_batch(
        &self,
        peer: &NodeId,
        keys: &[Vec<u8>],
        tally: &Tally,
    ) -> Result<Vec<(Vec<u8>, AntiEntropyError)>, AntiEntropyError> {
        let me = self.trees.me();
        let (mut done, mut refused) = (0, Vec::new());
        // My clocks read but not yet used: those past the last step's.
        let mut mine_ahead = Vec::new();
        while done < keys.len() {
            let rest = &keys[done..];
            if mine_ahead.is_empty() {
                mine_ahead = self.read_some(me, rest, tally).await?;
            }
            let theirs = self
                .read_some(peer, &rest[..mine_ahead.len()], tally)
                .await?;
            let later = mine_ahead.split_off(theirs.len());
            let mine = std::mem::replace(&mut mine_ahead, later);
            let step = &rest[..theirs.len()];
            refused.extend(self.repair_step(peer, step, mine, theirs, tally).await?);
            done += step.len();
        }
        Ok(refused)
    }

    /// Sends each side the merge of `mine` and `theirs`, the two sides'
    /// clocks of `keys`, where it differs; returns the keys whose merge
    /// breaks the per-key limits, not sent (see [`Self::repair_batch`]).
    async fn repair_step(
        &self,
        peer: &NodeId,
        keys: &[Vec<u8>],
        mine: Vec<Option<Clock>>,
        theirs: Vec<Option<Clock>>,
        tally: &Tally,
    ) -> Result<Vec<(Vec<u8>, AntiEntropyError)>, AntiEntropyError> {
        let me = self.trees.me();
        let (mut to_me, mut to_peer, mut repaired) = (Vec::new(), Vec::new(), 0);
        let mut refused = Vec::new();
        for ((key, mine), theirs) in keys.iter().zip(mine).zip(theirs) {
            let Some(merged) = merge_for_repair(mine.as_ref(), theirs.as_ref()) else {
                continue;
            };
            // Either side would refuse it: sending it would only cost its
            // bytes, every round, and count a repair that did not happen.
            if let Some(over) = clock_over_limit(&merged) {
                refused.push((key.clone(), AntiEntropyError::MergeOverLimit { over }));
                continue;
            }
            let (me_stale, peer_stale) = (
                mine.as_ref() != Some(&merged),
                theirs.as_ref() != Some(&merged),
            );
            if me_stale || peer_stale {
                repaired += 1;
            }
            if me_stale && peer_stale {
                to_peer.push(KeyClock {
                    key: key.clone(),
                    clock: merged.clone(),
                });
            } else if peer_stale {
                to_peer.push(KeyClock {
                    key: key.clone(),
                    clock: merged,
                });
                continue;
            }
            if me_stale {
                to_me.push(KeyClock {
                    key: key.clone(),
                    clock: merged,
                });
            }
        }
        if !to_me.is_empty() {
            self.sync_batch(me, to_me, tally).await?;
        }
        if !to_peer.is_empty() {
            self.sync_batch(peer, to_peer, tally).await?;
        }
        tally.keys_repaired.fetch_add(repaired, Ordering::Relaxed);
        Ok(refused)
    }

    /// `peer`'s hashes of `indexes` at `level`, asked in bounded chunks.
    async fn their_hashes(
        &self,
        peer: &NodeId,
        level: usize,
        indexes: &[usize],
        tally: &Tally,
    ) -> Result<Vec<u64>, AntiEntropyError> {
        let mut out = Vec::with_capacity(indexes.len());
        for chunk in indexes.chunks(TREE_HASHES_MAX) {
            let request = Request::Replica(ReplicaRequest::TreeHashes {
                peer: self.trees.me().clone(),
                leaf_bits: self.trees.leaf_bits(),
                ring: self.trees.ring().fingerprint(),
                level: level as u32,
                indexes: chunk.iter().map(|i| *i as u32).collect(),
            });
            match self.call(peer, request, tally).await? {
                Response::Hashes(h) if h.len() == chunk.len() => out.extend(h),
                other => return Err(unexpected(peer, &other)),
            }
        }
        Ok(out)
    }

    /// The leaves where this node's tree for `peer` and `peer`'s for this node differ.
    async fn differing_leaves(
        &self,
        peer: &NodeId,
        tally: &Tally,
    ) -> Result<Vec<usize>, AntiEntropyError> {
        let depth = (self.trees.leaf_bits() / FANOUT_BITS) as usize;
        let mut frontier = vec![0usize];
        for level in 0..=depth {
            let nodes = if level == 0 {
                frontier.clone()
            } else {
                MerkleTree::children_of(&frontier)
            };
            let theirs = self.their_hashes(peer, level, &nodes, tally).await?;
            let mine = self.trees.hashes(peer, level, &nodes);
            frontier = nodes
                .into_iter()
                .zip(mine.into_iter().zip(theirs))
                .filter(|(_, (m, t))| m != t)
                .map(|(n, _)| n)
                .collect();
            if frontier.is_empty() {
                break;
            }
        }
        Ok(frontier)
    }

    /// One exchange with `peer`: descend, list, repair. See the module docs.
    ///
    /// A batch that fails for any reason but an unreachable peer (a failing
    /// disk, a merge the peer refuses) is counted and skipped, so one
    /// bad key cannot stop the keys after it from being repaired; the
    /// exchange then ends with an error naming how many keys were skipped.
    async fn exchange(&self, peer: &NodeId, tally: &Tally) -> Result<(), AntiEntropyError> {
        let (shared_keys, occupied_leaves) = self.trees.shared_keys_and_leaves(peer);
        tally.keys_compared.store(shared_keys, Ordering::Relaxed);
        let leaves = self.differing_leaves(peer, tally).await?;
        // Each batch is due its charge (see `pacing_charge`) / keys_per_s
        // after the previous one; time spent listing is not saved up as
        // credit for a burst.
        let mut next_batch_at = Instant::now();
        let (mut skipped, mut skipped_leaves, mut first_error) = (0u64, 0u64, None);
        let learned = self.learned_listing_leaves(peer);
        let mut per_request = leaves_per_request(shared_keys, occupied_leaves).min(learned);
        let (mut timeouts, mut halved) = (0, false);
        let mut rest = &leaves[..];
        while !rest.is_empty() {
            let (chunk, after) = rest.split_at(per_request.min(rest.len()));
            let chunk: Vec<u32> = chunk.iter().map(|l| *l as u32).collect();
            let request = Request::Replica(ReplicaRequest::LeafItems {
                peer: self.trees.me().clone(),
                leaf_bits: self.trees.leaf_bits(),
                ring: self.trees.ring().fingerprint(),
                leaves: chunk.clone(),
            });
            let theirs = match self.call(peer, request, tally).await {
                Ok(Response::Items(items)) => items,
                Ok(other) => return Err(unexpected(peer, &other)),
                // The peer holds more keys in these leaves than this side's
                // estimate (it has keys this side lacks): ask for fewer, and
                // remember it for the next rounds. A timeout may also be a
                // peer that hangs, so at most two are taken per exchange.
                Err(e)
                    if chunk.len() > 1 && answer_too_big(&e) && timeouts < LISTING_TIMEOUTS_MAX =>
                {
                    if matches!(e, AntiEntropyError::TimedOut { .. }) {
                        timeouts += 1;
                    }
                    halved = true;
                    per_request = chunk.len() / 2;
                    self.listing_leaves
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(peer.clone(), per_request);
                    tracing::info!(%peer, error = %e, leaves = per_request, "asking for fewer leaves at once");
                    continue;
                }
                // Any other failure of a peer that answers (a damaged index
                // in one leaf, say) would end the exchange at the same
                // chunk every round, and the leaves after it would never be
                // compared: halve down to the leaf that fails, and skip it.
                // A peer failing most of its leaves (its disk gone) ends
                // the exchange after a few, rather than cost a request and
                // a log line per differing leaf.
                Err(e) if !peer_unavailable(&e) && skipped_leaves < SKIPPED_LEAVES_MAX => {
                    if chunk.len() > 1 {
                        halved = true;
                        per_request = chunk.len() / 2;
                        continue;
                    }
                    if skipped_leaves == 0 {
                        tracing::warn!(%peer, leaf = chunk[0], error = %e, "anti-entropy leaf skipped");
                    }
                    skipped_leaves += 1;
                    first_error.get_or_insert(e);
                    rest = after;
                    continue;
                }
                Err(e) => return Err(e),
            };
            rest = after;
            let mine = self.list_shared(peer, chunk).await?;
            let pairs = |items: Vec<KeyDigest>| -> Vec<(Vec<u8>, u64)> {
                items.into_iter().map(|i| (i.key, i.digest)).collect()
            };
            let keys = differing_keys(&pairs(mine), &pairs(theirs));
            for batch in keys.chunks(REPAIR_BATCH) {
                tokio::time::sleep_until(next_batch_at).await;
                let started_at = next_batch_at.max(Instant::now());
                let repaired_before = tally.keys_repaired.load(Ordering::Relaxed);
                let mut one_at_a_time = false;
                let failed: Vec<(Vec<u8>, AntiEntropyError)> =
                    match self.repair_batch(peer, batch, tally).await {
                        Ok(refused) => refused,
                        Err(e) if peer_unavailable(&e) => return Err(e),
                        Err(e) if batch.len() == 1 => vec![(batch[0].clone(), e)],
                        // One key that cannot be read or written (a failing
                        // disk, say) fails its whole batch, every round:
                        // try its keys one at a time, so that only the bad
                        // keys wait for an operator. Corrupt keys
                        // can sit next to each other, so every key is tried:
                        // a peer failing as a whole costs two small requests
                        // per differing key, no more.
                        Err(_) => {
                            one_at_a_time = true;
                            let mut failed = Vec::new();
                            for key in batch {
                                let alone = std::slice::from_ref(key);
                                match self.repair_batch(peer, alone, tally).await {
                                    Ok(refused) => failed.extend(refused),
                                    Err(e) if peer_unavailable(&e) => return Err(e),
                                    Err(e) => failed.push((key.clone(), e)),
                                }
                            }
                            failed
                        }
                    };
                // Keys that failed, and every key of a batch tried one at a
                // time (two requests each), count in full: a failing peer
                // is not asked faster.
                let charge = if one_at_a_time {
                    batch.len() as f64
                } else {
                    let written = tally.keys_repaired.load(Ordering::Relaxed) - repaired_before;
                    pacing_charge(batch.len(), written + failed.len() as u64)
                };
                next_batch_at = started_at
                    + Duration::from_secs_f64(charge / self.config.keys_per_s.max(1) as f64);
                for (key, e) in failed {
                    tracing::warn!(%peer, key = %String::from_utf8_lossy(&key), error = %e, "anti-entropy key skipped");
                    skipped += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        if !halved {
            self.listing_went_through(peer);
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(AntiEntropyError::Skipped {
                keys: skipped,
                leaves: skipped_leaves,
                first: e.to_string(),
            }),
        }
    }

    /// Leaves per listing `peer`'s answers were found to need, if fewer
    /// than the most.
    fn learned_listing_leaves(&self, peer: &NodeId) -> usize {
        let learned = self
            .listing_leaves
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        learned.get(peer).copied().unwrap_or(LEAVES_PER_REQUEST_MAX)
    }

    /// An exchange with `peer` listed every differing leaf at its learned
    /// size, none too big: that size doubles back towards the estimate (the
    /// keys that made its answers large may have been repaired since).
    fn listing_went_through(&self, peer: &NodeId) {
        let mut learned = self
            .listing_leaves
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(leaves) = learned.get_mut(peer) {
            *leaves *= 2;
            if *leaves >= LEAVES_PER_REQUEST_MAX {
                learned.remove(peer);
            }
        }
    }

    /// This node's keys in `leaves` shared with `peer`, read on the
    /// blocking pool (on a node, a range read of an index and a read of
    /// each shared key's clock).
    async fn list_shared(
        &self,
        peer: &NodeId,
        leaves: Vec<u32>,
    ) -> Result<Vec<KeyDigest>, AntiEntropyError> {
        let (trees, source, peer) = (self.trees.clone(), self.leaves.clone(), peer.clone());
        tokio::task::spawn_blocking(move || shared_items(&trees, &*source, &peer, &leaves))
            .await
            .map_err(|e| AntiEntropyError::Local {
                reason: e.to_string(),
            })?
            .map_err(|reason| AntiEntropyError::Local { reason })
    }
}

/// Whether `e` says the peer as a whole cannot go on now: unreachable,
/// too slow, shutting down (`NotServing`), out of request memory
/// (`Overloaded`), or `Unavailable` (its ring differs, its trees are not
/// ready, or an answer would pass the frame limit). The exchange ends,
/// rather than try each key of a batch alone, which would fail too.
fn peer_unavailable(e: &AntiEntropyError) -> bool {
    match e {
        AntiEntropyError::Unreachable { .. } | AntiEntropyError::TimedOut { .. } => true,
        AntiEntropyError::Refused { kind, .. } => matches!(
            kind,
            Some(ErrorKind::NotServing | ErrorKind::Overloaded | ErrorKind::Unavailable)
        ),
        _ => false,
    }
}

/// Leaves whose listing the peer failed that one exchange skips before it
/// ends (see `exchange`).
const SKIPPED_LEAVES_MAX: u64 = 16;

/// Listing timeouts one exchange takes as "too big" before it gives up.
const LISTING_TIMEOUTS_MAX: u32 = 2;

/// Whether a leaf listing failed for its size: the peer took longer than
/// the timeout, or its answer would pass the frame limit (an `Unavailable`
/// that says so; the others, another ring or trees not ready, are not
/// about size).
fn answer_too_big(e: &AntiEntropyError) -> bool {
    match e {
        AntiEntropyError::TimedOut { .. } => true,
        AntiEntropyError::Refused {
            kind: Some(ErrorKind::Unavailable),
            reason,
            ..
        } => reason.contains(ringkv_core::wire::OVER_FRAME_LIMIT),
        _ => false,
    }
}

/// Keys one `LeafItems` answer should list, on average: at the 1 KiB key
/// limit that is 16 MiB, well within a frame, and the peer reads it well
/// within a call's timeout.
const LEAF_ITEMS_KEYS_TARGET: u64 = 16_384;

/// Leaves to ask for at once when `shared_keys` keys occupy
/// `occupied_leaves` leaves: as many as keep the answer near
/// [`LEAF_ITEMS_KEYS_TARGET`] keys, from 1 to [`LEAVES_PER_REQUEST_MAX`].
/// Keys shared with one peer sit only in the leaves of the ring arcs the two
/// share (the ring and the tree place keys by the same hash), so it is the
/// occupied leaves that count, not all of them: with 12 nodes and N=3,
/// about one leaf in twenty. A fixed count would fail on a large store:
/// the answer for the same chunk would pass the frame limit (or the
/// timeout) every round, and the leaves after it would never be repaired.
/// Where the peer holds more than this side (it lost keys), the exchange
/// halves the count on such a failure.
fn leaves_per_request(shared_keys: u64, occupied_leaves: u64) -> usize {
    let per_leaf = shared_keys.div_ceil(occupied_leaves.max(1)).max(1);
    (LEAF_ITEMS_KEYS_TARGET / per_leaf).clamp(1, LEAVES_PER_REQUEST_MAX as u64) as usize
}

/// The keys in `leaves` that `trees`' node shares with `peer`.
fn shared_items(
    trees: &ReplicaTrees,
    source: &dyn LeafSource,
    peer: &NodeId,
    leaves: &[u32],
) -> Result<Vec<KeyDigest>, String> {
    let shared = |key: &[u8]| trees.shares_with(key, peer);
    let mut out = Vec::new();
    for leaf in leaves {
        let items = source.leaf_items(*leaf as usize, trees.leaf_bits(), &shared)?;
        out.extend(
            items
                .into_iter()
                .map(|(key, digest)| KeyDigest { key, digest }),
        );
    }
    Ok(out)
}

/// The version both replicas should hold after a repair, or `None` when
/// nothing should be written: both absent, or one side holds only a
/// tombstone the other lacks (see the module docs).
pub fn merge_for_repair(mine: Option<&Clock>, theirs: Option<&Clock>) -> Option<Clock> {
    match (mine, theirs) {
        (None, None) => None,
        (Some(only), None) | (None, Some(only)) if is_deleted(only) => None,
        (Some(only), None) | (None, Some(only)) => Some(only.clone()),
        (Some(a), Some(b)) => {
            let mut merged = a.clone();
            merged.sync(b);
            Some(merged)
        }
    }
}

/// Whether a clock holds no live value: only tombstones (a deleted key).
pub fn is_deleted(clock: &Clock) -> bool {
    clock.values().next().is_none()
}

fn unexpected(peer: &NodeId, answer: &Response) -> AntiEntropyError {
    AntiEntropyError::Refused {
        peer: peer.clone(),
        kind: None,
        reason: format!("unexpected answer {}", answer_kind(answer)),
    }
}

/// The name of `answer`'s variant, for errors (the whole answer may be large).
pub(crate) fn answer_kind(answer: &Response) -> &'static str {
    match answer {
        Response::Put(_) => "Put",
        Response::Get(_) => "Get",
        Response::Status(_) => "Status",
        Response::Joined(_) => "Joined",
        Response::Clock(_) => "Clock",
        Response::Pong => "Pong",
        Response::Stats(_) => "Stats",
        Response::Hashes(_) => "Hashes",
        Response::Clocks(_) => "Clocks",
        Response::Items(_) => "Items",
        Response::Repair(_) => "Repair",
        Response::Removed(_) => "Removed",
        Response::Left(_) => "Left",
        Response::Cleaned(_) => "Cleaned",
        Response::Error(_) => "Error",
        Response::Identity(_) => "Identity",
    }
}

/// How long a call to a peer may take: `base`, plus the bytes it sends
/// (`sent`) and, for a `ReadBatch`, the most its answer can carry (one
/// answer's worth and one clock past it), at the slowest link expected
/// ([`send_timeout_for`]: 64 Mbit/s). With `base` alone, a clock that takes
/// longer to cross the link timed out every round, and since an exchange
/// that times out ends and the next starts at the same leaf, the keys after
/// it were never repaired by that pair.
fn call_timeout_for(base: Duration, request: &Request, sent: usize) -> Duration {
    let answer = match request {
        Request::Replica(ReplicaRequest::ReadBatch { .. }) => {
            READ_BATCH_REPLY_BYTES + ringkv_core::wire::CLOCK_MAX_BYTES
        }
        _ => 0,
    };
    send_timeout_for(base, sent + answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{n, write};
    use ringkv_core::dvv::Payload;

    #[test]
    fn a_key_read_for_nothing_costs_an_eighth_of_one_written() {
        assert_eq!(pacing_charge(64, 64), 64.0);
        assert_eq!(pacing_charge(64, 0), 8.0);
        assert_eq!(pacing_charge(64, 8), 8.0 + 56.0 / 8.0);
        // Never more than the keys examined.
        assert_eq!(pacing_charge(1, 2), 1.0);
    }

    /// A peer that cannot go on (unreachable, too slow, draining, out of
    /// memory) ends the exchange; a refusal of one batch (a failing disk,
    /// a merge past the limits) is tried key by key. A listing is asked in
    /// halves only when its answer was too big.
    #[test]
    fn failures_of_the_peer_end_the_exchange_and_big_answers_are_halved() {
        let peer = NodeId::new("p").unwrap();
        let refused = |kind| AntiEntropyError::Refused {
            peer: peer.clone(),
            kind,
            reason: "no".into(),
        };
        let timed_out = AntiEntropyError::TimedOut {
            peer: peer.clone(),
            after_ms: 5000,
        };
        let unreachable = AntiEntropyError::Unreachable {
            peer: peer.clone(),
            reason: "connection lost".into(),
        };
        for e in [
            &timed_out,
            &unreachable,
            &refused(Some(ErrorKind::NotServing)),
            &refused(Some(ErrorKind::Overloaded)),
            &refused(Some(ErrorKind::Unavailable)),
        ] {
            assert!(peer_unavailable(e), "{e}");
        }
        for e in [
            &refused(Some(ErrorKind::Internal)),
            &refused(Some(ErrorKind::InvalidRequest)),
            &refused(None),
        ] {
            assert!(!peer_unavailable(e), "{e}");
        }
        assert!(answer_too_big(&timed_out));
        let over_limit = AntiEntropyError::Refused {
            peer: peer.clone(),
            kind: Some(ErrorKind::Unavailable),
            reason: format!(
                "the answer would take 70000000 bytes, over the 67108864-byte {}",
                ringkv_core::wire::OVER_FRAME_LIMIT
            ),
        };
        assert!(answer_too_big(&over_limit));
        assert!(
            !answer_too_big(&refused(Some(ErrorKind::Unavailable))),
            "another ring, not ready"
        );
        assert!(!answer_too_big(&unreachable));
        assert!(!answer_too_big(&refused(Some(ErrorKind::NotServing))));
    }

    /// A leaf listing asks for as many leaves as keep its answer near the
    /// target: all 256 for a small store, fewer as the store grows, one
    /// leaf at the least.
    #[test]
    fn a_leaf_listing_asks_for_fewer_leaves_as_the_store_grows() {
        let all = 1u64 << 16;
        assert_eq!(leaves_per_request(0, 0), LEAVES_PER_REQUEST_MAX);
        assert_eq!(leaves_per_request(1_000_000, all), LEAVES_PER_REQUEST_MAX);
        // 100 M keys over every leaf: about 1,526 a leaf, so 10 leaves.
        assert_eq!(leaves_per_request(100_000_000, all), 10);
        // The same keys on a twentieth of the leaves (12 nodes, N=3): 20
        // times as many a leaf, so one leaf at a time.
        assert_eq!(leaves_per_request(100_000_000, all / 20), 1);
        for (keys, occupied) in [
            (10_000_000u64, all),
            (10_000_000, all / 20),
            (1_000_000_000, all),
        ] {
            let leaves = leaves_per_request(keys, occupied) as u64;
            let per_answer = leaves * keys.div_ceil(occupied);
            assert!(
                per_answer <= LEAF_ITEMS_KEYS_TARGET || leaves == 1,
                "{keys}: {per_answer}"
            );
        }
        assert_eq!(leaves_per_request(u64::MAX, all), 1);
        assert_eq!(leaves_per_request(u64::MAX, 0), 1);
    }

    #[test]
    fn a_repair_merges_siblings_and_never_spreads_a_bare_tombstone() {
        let (a, b) = (write("n1", "a"), write("n2", "b"));
        let merged = merge_for_repair(Some(&a), Some(&b)).unwrap();
        let mut values: Vec<&[u8]> = merged.values().collect();
        values.sort();
        assert_eq!(values, [b"a".as_slice(), b"b"], "both siblings kept");
        assert_eq!(merge_for_repair(Some(&a), None), Some(a.clone()));
        assert_eq!(merge_for_repair(None, None), None);
        let mut tomb = a.clone();
        tomb.update(&a.context(), Payload::Tombstone, &n("n1"));
        assert!(is_deleted(&tomb) && !is_deleted(&a));
        assert_eq!(merge_for_repair(Some(&tomb), None), None);
        assert_eq!(merge_for_repair(None, Some(&tomb)), None);
        assert_eq!(
            merge_for_repair(Some(&a), Some(&tomb)),
            Some(tomb.clone()),
            "the tombstone supersedes the value it deleted"
        );
    }
}
