//! Hint bookkeeping for hinted handoff (Dynamo §4.6).
//!
//! When a key's replica is down, the coordinator writes to a fallback node
//! instead, with a *hint* naming the intended owner. The fallback keeps hinted
//! data apart from its own (it does not own the key, so it must not serve or
//! repair it as its own) and hands it to the owner once the owner is back.
//!
//! A [`HintBook`] is that bookkeeping, over any ordered key-value
//! [`HintBackend`] (a RocksDB column family on a node, a `BTreeMap` in tests):
//!
//! - one entry per (owner, key): a second hint for the same key merges into
//!   the first with the version-vector merge, so a hint never holds less than
//!   any write it was given;
//! - a hint is removed only by [`remove_delivered`](HintBook::remove_delivered),
//!   and only if it still equals what was delivered, so a write merged in
//!   while the delivery was in flight is delivered next time, not lost;
//! - at most `max_per_target` hints per owner: past that a new hint is refused
//!   (the coordinator then tries the next fallback);
//! - a coordinator standing in for a key's owners (it replicates none of
//!   the key and can reach none of them) mints on its hint for the first
//!   owner ([`HintStore::mint`]), under an actor recorded in the hint's
//!   record. Merges keep the actor; it goes whenever the record goes
//!   (delivered, dropped, moved to another owner) or is replaced (past the
//!   window, corrupt), so every dot of a recorded actor is in the hint's
//!   clock, and the next mint never repeats one;
//! - a hint whose newest write is older than the hint window (`ttl_ms`) is
//!   dropped and counted; anti-entropy repairs what it would have, except a
//!   stand-in's write, which only hints hold (it waits that long after it
//!   was acknowledged). A hint handed on already past the window is
//!   dropped, never merged into a live one, where it would live on at the
//!   younger age. The
//!   sweep that drops them reads only the owners that may hold one: the
//!   book keeps, per owner, a time no hint of its is older than, so an
//!   owner whose hints are all within the window costs the sweep nothing.
//!
//! Time comes from a [`WallClock`] passed in, so tests move it by hand.
//!
//! Invariants: `pending(owner)` equals the number of entries stored for
//! that owner (counted at [`open`](HintBook::open), kept by every change);
//! no stored hint of an owner's is older than the owner's `oldest_ms` (set
//! at open, lowered by every store, raised only by a sweep pass over all of
//! the owner's hints that no other pass overlapped).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use metrics::{counter, gauge};
use ringkv_core::dvv::Clock;
use ringkv_core::hash::stable_hash64;
use ringkv_core::wire::{clock_over_limit, decode_clock, encode_clock};
use ringkv_core::NodeId;

/// Milliseconds since the Unix epoch, from whatever clock the caller trusts.
/// Hints outlive restarts, so this must be wall time, not a monotonic clock.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The default hint window: 3 hours.
pub const DEFAULT_HINT_TTL_S: u64 = 3 * 60 * 60;
/// The default cap on hints held for one owner.
pub const DEFAULT_MAX_HINTS_PER_TARGET: u64 = 1_000_000;
/// The default cap on the bytes of all hints a node holds, in MiB: a
/// count cap alone lets hints of large values fill the disk.
pub const DEFAULT_MAX_HINT_MB: u64 = 4096;

const LOCK_STRIPES: usize = 256;

/// Why a hint operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HintError {
    #[error("hint storage failed: {reason}")]
    Backend { reason: String },
    #[error("stored hint is corrupt: {reason}")]
    Corrupt { reason: String },
    #[error("already holding {limit} hints for {owner}, the per-target limit")]
    TargetFull { owner: NodeId, limit: u64 },
    #[error("holding {held_bytes} bytes of hints; {more_bytes} more would pass this node's limit of {limit_bytes} (--max-hint-mb)")]
    BytesFull {
        held_bytes: u64,
        more_bytes: u64,
        limit_bytes: u64,
    },
    #[error("this node does not store hints (--no-hints)")]
    Disabled,
    #[error("the hint for this key would exceed the per-key limits: {reason}")]
    TooLarge { reason: String },
}

/// The values one hint scan reads at most (past the entry that reaches it,
/// the page ends): bounds the memory of a delivery batch and of counting
/// hints at startup.
pub const HINT_SCAN_MAX_BYTES: usize = 8 * 1024 * 1024;

/// Ordered storage for hint entries: byte keys, byte values. Like the
/// coordinator's `Store`: a write is in the write-ahead log when the call
/// returns, and made durable before the hint is acknowledged.
pub trait HintBackend: Send + Sync + 'static {
    fn get(&self, id: &[u8]) -> Result<Option<Vec<u8>>, HintError>;
    fn put(&self, id: &[u8], value: &[u8]) -> Result<(), HintError>;
    fn delete(&self, id: &[u8]) -> Result<(), HintError>;
    /// Up to `limit` entries whose id starts with `prefix` and sorts after
    /// `after` (from the start of the prefix when `None`), in id order,
    /// ending early with the entry that brings their values to `max_bytes`
    /// or more (a hint's clock may be up to 64 MiB: a count alone would not
    /// bound memory).
    #[allow(clippy::type_complexity)]
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, HintError>;
    /// Runs `wait`, which may block for long: taking a hint's lock while
    /// another request holds it through a stalled write (like the
    /// coordinator's `Store::wait`).
    fn wait(&self, wait: &mut dyn FnMut()) {
        wait()
    }
    /// Makes every write so far as durable as a replica's answer waits for
    /// (a node without `--sync` buffers its write-ahead log and flushes it
    /// for many writes at once). Hints read for delivery go out only after
    /// this: a stand-in's mint may still be in the buffer, and a dot that
    /// reached an owner and then vanished in a crash would be minted again
    /// for another value, which the owner would drop as known.
    fn make_durable(&self) -> Result<(), HintError> {
        Ok(())
    }
}

impl<B: HintBackend> HintBackend for Arc<B> {
    fn get(&self, id: &[u8]) -> Result<Option<Vec<u8>>, HintError> {
        (**self).get(id)
    }
    fn put(&self, id: &[u8], value: &[u8]) -> Result<(), HintError> {
        (**self).put(id, value)
    }
    fn delete(&self, id: &[u8]) -> Result<(), HintError> {
        (**self).delete(id)
    }
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, HintError> {
        (**self).scan(prefix, after, limit, max_bytes)
    }
    fn wait(&self, wait: &mut dyn FnMut()) {
        (**self).wait(wait)
    }
    fn make_durable(&self) -> Result<(), HintError> {
        (**self).make_durable()
    }
}

/// What a node's replica side needs of hints: hold one, read one.
pub trait HintStore: Send + Sync {
    fn store(&self, owner: &NodeId, key: &[u8], clock: &Clock) -> Result<(), HintError>;
    fn read(&self, owner: &NodeId, key: &[u8]) -> Result<Option<Clock>, HintError>;
    /// A stand-in coordinator's write on the hint it holds for `owner`
    /// (`ReplicaService::update_for`), under the entry's lock: `mint` gets
    /// the clock held (empty if none, or if the one held is past the
    /// window) and the actor recorded beside it by an earlier mint, and
    /// returns the new clock with the actor to record, or `None` to write
    /// nothing. The actor is kept as long as the entry (merges keep it) and
    /// removed with it; an entry replaced rather than merged into (past the
    /// window, corrupt) loses it.
    fn mint(
        &self,
        owner: &NodeId,
        key: &[u8],
        mint: &mut dyn FnMut(Clock, Option<NodeId>) -> Option<(Clock, NodeId)>,
    ) -> Result<(), HintError>;
}

/// One hinted write.
#[derive(Debug, Clone, PartialEq)]
pub struct Hint {
    pub key: Vec<u8>,
    pub clock: Clock,
    /// When the newest write in `clock` was hinted (ms since the epoch).
    pub stored_at_ms: u64,
}

/// Limits of a [`HintBook`].
#[derive(Debug, Clone)]
pub struct HintConfig {
    pub ttl_ms: u64,
    pub max_per_target: u64,
    /// The stored bytes of all hints together, at most.
    pub max_bytes: u64,
}

impl Default for HintConfig {
    fn default() -> Self {
        HintConfig {
            ttl_ms: DEFAULT_HINT_TTL_S * 1000,
            max_per_target: DEFAULT_MAX_HINTS_PER_TARGET,
            max_bytes: DEFAULT_MAX_HINT_MB * 1024 * 1024,
        }
    }
}

/// The hints a node holds for others. See the module docs.
pub struct HintBook<B> {
    backend: B,
    config: HintConfig,
    now_ms: WallClock,
    locks: Box<[Mutex<()>]>,
    owners: Mutex<HashMap<NodeId, OwnerHints>>,
    /// Sweep passes begun, over all owners.
    passes_begun: AtomicU64,
    /// Set when a store was refused for want of room: the worker then
    /// sweeps before its next scheduled sweep.
    refused_for_room: AtomicBool,
    /// The stored bytes of every entry (ids and values). Invariant, as for
    /// the counts: it changes with each put and delete, under the entry's
    /// lock, by the difference in the entry's size.
    bytes: Mutex<u64>,
}

/// What the book keeps in memory of one owner's hints.
#[derive(Debug, Clone, Copy)]
struct OwnerHints {
    /// Entries stored for the owner.
    count: u64,
    /// No hint of the owner's was stored at (ms since the epoch) before
    /// this: a lower bound, so while it is within the window, so is every
    /// hint, and the sweep need not read them.
    oldest_ms: u64,
    /// The oldest time stored since the latest pass began (`u64::MAX`:
    /// none), which that pass's scan may have missed.
    stored_since_ms: u64,
    /// The latest pass begun over the owner (0: none since the entry was
    /// made): a pass's finding stands only if no other began after it
    /// (that one reset `stored_since_ms`). Numbered across the book, so a
    /// pass that outlived the owner's entry cannot pass for one over the
    /// entry made after it.
    latest_pass: u64,
}

impl OwnerHints {
    fn new() -> Self {
        OwnerHints {
            count: 0,
            oldest_ms: u64::MAX,
            stored_since_ms: u64::MAX,
            latest_pass: 0,
        }
    }

    fn stored_at(&mut self, at_ms: u64) {
        self.oldest_ms = self.oldest_ms.min(at_ms);
        self.stored_since_ms = self.stored_since_ms.min(at_ms);
    }
}

/// One sweep pass over an owner's hints, page by page (see
/// [`HintBook::begin_expiry`]).
#[derive(Debug)]
pub struct ExpiryPass {
    owner: NodeId,
    /// Which pass this is (`OwnerHints::latest_pass`).
    token: u64,
    after: Option<Vec<u8>>,
    /// The oldest time among the hints read and kept so far.
    kept_oldest_ms: u64,
    /// Hints dropped so far.
    pub dropped: u64,
    /// Hints read so far.
    pub read: u64,
}

/// An entry's id: the owner's length and name, then the key, so one owner's
/// hints are one contiguous range.
fn entry_id(owner: &NodeId, key: &[u8]) -> Vec<u8> {
    let mut id = owner_prefix(owner);
    id.extend_from_slice(key);
    id
}

fn owner_prefix(owner: &NodeId) -> Vec<u8> {
    let name = owner.as_str().as_bytes();
    let mut prefix = Vec::with_capacity(1 + name.len());
    // Node ids are validated to far fewer than 256 bytes.
    prefix.push(name.len() as u8);
    prefix.extend_from_slice(name);
    prefix
}

fn split_id(id: &[u8]) -> Result<(NodeId, &[u8]), HintError> {
    let corrupt = |reason: &str| HintError::Corrupt {
        reason: reason.to_string(),
    };
    let (&len, rest) = id.split_first().ok_or_else(|| corrupt("empty hint id"))?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err(corrupt("hint id shorter than its owner name"));
    }
    let name = std::str::from_utf8(&rest[..len]).map_err(|_| corrupt("owner is not UTF-8"))?;
    let owner = NodeId::new(name).map_err(|e| corrupt(&e.message))?;
    Ok((owner, &rest[len..]))
}

/// What an entry counts against the byte cap: its id and value.
fn entry_bytes(id: &[u8], value: &[u8]) -> u64 {
    (id.len() + value.len()) as u64
}

/// A hint as stored: its clock, when its newest write was hinted, and the
/// actor a stand-in coordinator mints its dots under ([`HintStore::mint`]).
#[derive(Debug, Clone, PartialEq)]
struct Held {
    clock: Clock,
    stored_at_ms: u64,
    actor: Option<NodeId>,
}

/// Set in a record's time when an actor follows it. Times are ms since
/// the Unix epoch, far below 2^63, so records written before actors were
/// recorded never have it.
const ACTOR_FLAG: u64 = 1 << 63;

/// A record is the time (8 bytes, little-endian), then, if the time has
/// [`ACTOR_FLAG`], the actor's length (1 byte) and name, then the clock.
fn encode_hint(held: &Held) -> Vec<u8> {
    let clock = encode_clock(&held.clock);
    let actor = held
        .actor
        .as_ref()
        .map_or(&[][..], |a| a.as_str().as_bytes());
    let mut value = Vec::with_capacity(9 + actor.len() + clock.len());
    match &held.actor {
        None => value.extend_from_slice(&held.stored_at_ms.to_le_bytes()),
        Some(_) => {
            value.extend_from_slice(&(held.stored_at_ms | ACTOR_FLAG).to_le_bytes());
            // Node ids are validated to far fewer than 256 bytes.
            value.push(actor.len() as u8);
            value.extend_from_slice(actor);
        }
    }
    value.extend_from_slice(&clock);
    value
}

fn decode_hint(value: &[u8]) -> Result<Held, HintError> {
    let corrupt = |reason: String| HintError::Corrupt { reason };
    if value.len() < 8 {
        return Err(corrupt(format!("hint record of {} bytes", value.len())));
    }
    let (at, mut rest) = value.split_at(8);
    let at = u64::from_le_bytes(at.try_into().expect("8 bytes"));
    let actor = if at & ACTOR_FLAG == 0 {
        None
    } else {
        let (&len, after) = rest
            .split_first()
            .ok_or_else(|| corrupt("hint record ends before its actor".into()))?;
        if after.len() < usize::from(len) {
            return Err(corrupt("hint record shorter than its actor".into()));
        }
        let (name, after) = after.split_at(usize::from(len));
        rest = after;
        let name = std::str::from_utf8(name)
            .map_err(|_| corrupt("the hint's actor is not UTF-8".into()))?;
        Some(NodeId::new(name).map_err(|e| corrupt(format!("the hint's actor: {}", e.message)))?)
    };
    let clock = decode_clock(rest).map_err(|e| corrupt(e.to_string()))?;
    Ok(Held {
        clock,
        stored_at_ms: at & !ACTOR_FLAG,
        actor,
    })
}

impl<B: HintBackend> HintBook<B> {
    /// Opens the book over `backend`, counting the hints already there.
    pub fn open(backend: B, config: HintConfig, now_ms: WallClock) -> Result<Self, HintError> {
        let mut owners: HashMap<NodeId, OwnerHints> = HashMap::new();
        let mut bytes = 0u64;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = backend.scan(&[], after.as_deref(), 1024, HINT_SCAN_MAX_BYTES)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (id, value) in &page {
                match split_id(id) {
                    Ok((owner, _)) => {
                        let hints = owners.entry(owner).or_insert_with(OwnerHints::new);
                        hints.count += 1;
                        // A record that does not decode counts as past any
                        // window, so that the first sweep reads and drops it.
                        hints.stored_at(decode_hint(value).map_or(0, |held| held.stored_at_ms));
                        bytes += entry_bytes(id, value);
                    }
                    // One entry whose id cannot be read must not stop the
                    // node: nothing could deliver it anyway (anti-entropy
                    // repairs what it held).
                    Err(e) => {
                        tracing::warn!(error = %e, "dropping a hint whose id is corrupt");
                        backend.delete(id)?;
                        counter!("ringkv_hints_dropped_total", "target" => "unknown", "reason" => "corrupt")
                            .increment(1);
                    }
                }
            }
        }
        for (owner, hints) in &owners {
            gauge!("ringkv_hints_pending", "target" => owner.to_string()).set(hints.count as f64);
        }
        gauge!("ringkv_hints_bytes").set(bytes as f64);
        Ok(HintBook {
            backend,
            config,
            now_ms,
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            owners: Mutex::new(owners),
            passes_begun: AtomicU64::new(0),
            refused_for_room: AtomicBool::new(false),
            bytes: Mutex::new(bytes),
        })
    }

    /// The stored bytes of all hints.
    pub fn bytes(&self) -> u64 {
        *self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `more` bytes (or gives back `-more`) against the cap: the
    /// check and the change are one step, so concurrent stores cannot
    /// overshoot it. Giving back always succeeds.
    fn charge_bytes(&self, more: i64) -> Result<(), HintError> {
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let after = bytes.saturating_add_signed(more);
        if more > 0 && after > self.config.max_bytes {
            return Err(HintError::BytesFull {
                held_bytes: *bytes,
                more_bytes: more as u64,
                limit_bytes: self.config.max_bytes,
            });
        }
        *bytes = after;
        gauge!("ringkv_hints_bytes").set(after as f64);
        Ok(())
    }

    /// Changes the byte count by `delta` without the cap: for what was
    /// deleted, and to undo a charge whose write failed (which, for an
    /// entry that shrank, adds bytes back, and must not be refused).
    fn adjust_bytes(&self, delta: i64) {
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        *bytes = bytes.saturating_add_signed(delta);
        gauge!("ringkv_hints_bytes").set(*bytes as f64);
    }

    pub fn config(&self) -> &HintConfig {
        &self.config
    }

    pub fn now_ms(&self) -> u64 {
        (self.now_ms)()
    }

    fn lock(&self, id: &[u8]) -> std::sync::MutexGuard<'_, ()> {
        let stripe = &self.locks[(stable_hash64(id) % LOCK_STRIPES as u64) as usize];
        // Its holder may be waiting out a write stall (see `HintBackend::wait`).
        ringkv_core::long_wait::lock(stripe, &|wait| self.backend.wait(wait))
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, OwnerHints>> {
        self.owners.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn adjust(&self, owner: &NodeId, delta: i64) {
        let mut owners = self.owners();
        let hints = owners.entry(owner.clone()).or_insert_with(OwnerHints::new);
        hints.count = hints.count.saturating_add_signed(delta);
        gauge!("ringkv_hints_pending", "target" => owner.to_string()).set(hints.count as f64);
        if hints.count == 0 {
            owners.remove(owner);
        }
    }

    /// Notes that a hint of `owner`'s was stored as written at `at_ms`.
    /// Called under the entry's lock, after the write: a pass that began
    /// before it hears of it here, one that begins after it reads it.
    fn note_stored(&self, owner: &NodeId, at_ms: u64) {
        if let Some(hints) = self.owners().get_mut(owner) {
            hints.stored_at(at_ms);
        }
    }

    /// Counts one more hint for `owner` if that stays within the cap; the
    /// check and the increment are one step, so concurrent stores of
    /// different keys cannot overshoot it.
    fn reserve(&self, owner: &NodeId) -> bool {
        let mut owners = self.owners();
        let hints = owners.entry(owner.clone()).or_insert_with(OwnerHints::new);
        if hints.count >= self.config.max_per_target {
            if hints.count == 0 {
                owners.remove(owner);
            }
            return false;
        }
        hints.count += 1;
        gauge!("ringkv_hints_pending", "target" => owner.to_string()).set(hints.count as f64);
        true
    }

    /// Hints held for `owner`.
    pub fn pending(&self, owner: &NodeId) -> u64 {
        self.owners().get(owner).map_or(0, |hints| hints.count)
    }

    /// Hints held for anyone.
    pub fn pending_total(&self) -> u64 {
        self.owners().values().map(|hints| hints.count).sum()
    }

    /// The owners this node holds hints for.
    pub fn targets(&self) -> Vec<NodeId> {
        let mut targets: Vec<NodeId> = self.owners().keys().cloned().collect();
        targets.sort();
        targets
    }

    /// The owners that may hold a hint past the window now, in order: the
    /// only ones a sweep needs to read.
    pub fn owners_to_sweep(&self) -> Vec<NodeId> {
        let now = self.now_ms();
        let mut due: Vec<NodeId> = self
            .owners()
            .iter()
            .filter(|(_, hints)| self.is_past_window(hints.oldest_ms, now))
            .map(|(owner, _)| owner.clone())
            .collect();
        due.sort();
        due
    }

    /// The time no hint of `owner`'s is older than, if it has hints.
    pub fn oldest_bound_ms(&self, owner: &NodeId) -> Option<u64> {
        self.owners().get(owner).map(|hints| hints.oldest_ms)
    }

    /// Whether a store was refused for want of room since the last
    /// [`begin_sweep`](Self::begin_sweep): hints past the window may hold
    /// that room.
    pub fn refused_for_room(&self) -> bool {
        self.refused_for_room.load(AtomicOrdering::Relaxed)
    }

    /// Notes that a sweep starts, which answers the refusals before it;
    /// then use [`owners_to_sweep`](Self::owners_to_sweep).
    pub fn begin_sweep(&self) {
        self.refused_for_room.store(false, AtomicOrdering::Relaxed);
    }

    /// Makes every hint written so far durable (see
    /// [`HintBackend::make_durable`]): before hints read go out.
    pub fn make_durable(&self) -> Result<(), HintError> {
        self.backend.make_durable()
    }

    /// Up to `limit` of `owner`'s hints whose key sorts after `after`, and
    /// fewer once they hold [`HINT_SCAN_MAX_BYTES`]. Empty only when the
    /// owner has no hints after `after`: callers take an empty batch as
    /// the end of the owner's hints, so a page of nothing but corrupt
    /// records (dropped here) is read past, not returned.
    pub fn batch(
        &self,
        owner: &NodeId,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Hint>, HintError> {
        let prefix = owner_prefix(owner);
        let mut after = after.map(|key| entry_id(owner, key));
        loop {
            let page = self
                .backend
                .scan(&prefix, after.as_deref(), limit, HINT_SCAN_MAX_BYTES)?;
            let last = page.last().map(|(id, _)| id.clone());
            let hints = self.decode_page(owner, &prefix, page)?;
            // Each round starts past the last, so this ends.
            match last {
                Some(last) if hints.is_empty() => after = Some(last),
                _ => return Ok(hints),
            }
        }
    }

    /// The hints of one scanned page of `owner`'s records, dropping those
    /// that do not decode.
    fn decode_page(
        &self,
        owner: &NodeId,
        prefix: &[u8],
        page: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Vec<Hint>, HintError> {
        let mut hints = Vec::new();
        for (id, value) in page {
            match decode_hint(&value) {
                Ok(held) => hints.push(Hint {
                    key: id[prefix.len()..].to_vec(),
                    clock: held.clock,
                    stored_at_ms: held.stored_at_ms,
                }),
                // One bad record must not block the owner's other hints:
                // drop it (anti-entropy repairs what it held) and go on.
                Err(e) => {
                    tracing::warn!(%owner, error = %e, "dropping a corrupt hint");
                    // Only if it is still corrupt: a valid hint may have
                    // replaced it since the scan.
                    self.drop_counted(owner, &id[prefix.len()..], "corrupt", |held| {
                        held.is_none()
                    })?;
                }
            }
        }
        Ok(hints)
    }

    /// Whether `hint` is past the hint window at `now_ms`.
    pub fn is_expired(&self, hint: &Hint, now_ms: u64) -> bool {
        self.is_past_window(hint.stored_at_ms, now_ms)
    }

    fn is_past_window(&self, stored_at_ms: u64, now_ms: u64) -> bool {
        now_ms.saturating_sub(stored_at_ms) > self.config.ttl_ms
    }

    /// Removes `owner`'s hint for `key` if it still holds exactly
    /// `delivered` (the owner has acknowledged that clock durably). Returns
    /// whether it was removed; `false` means a newer write arrived meanwhile
    /// and the hint stays for the next delivery.
    pub fn remove_delivered(
        &self,
        owner: &NodeId,
        key: &[u8],
        delivered: &Clock,
    ) -> Result<bool, HintError> {
        let removed = self.remove_if(owner, key, |held| {
            held.is_some_and(|(clock, _)| clock == delivered)
        })?;
        if removed {
            counter!("ringkv_hints_delivered_total", "target" => owner.to_string()).increment(1);
        }
        Ok(removed)
    }

    /// Drops `owner`'s hint for `key` if it is past the hint window now.
    pub fn drop_if_expired(&self, owner: &NodeId, key: &[u8]) -> Result<bool, HintError> {
        let now = self.now_ms();
        let ttl = self.config.ttl_ms;
        self.drop_counted(owner, key, "expired", |held| {
            held.is_some_and(|(_, at)| now.saturating_sub(at) > ttl)
        })
    }

    /// Removes the hint if `condition` holds for what is stored now: the
    /// clock and its time, or `None` for a record that does not decode.
    fn remove_if(
        &self,
        owner: &NodeId,
        key: &[u8],
        condition: impl FnOnce(Option<(&Clock, u64)>) -> bool,
    ) -> Result<bool, HintError> {
        let id = entry_id(owner, key);
        let _guard = self.lock(&id);
        let Some(value) = self.backend.get(&id)? else {
            return Ok(false);
        };
        let remove = match decode_hint(&value) {
            Ok(held) => condition(Some((&held.clock, held.stored_at_ms))),
            Err(_) => condition(None),
        };
        if !remove {
            return Ok(false);
        }
        self.backend.delete(&id)?;
        self.adjust(owner, -1);
        self.adjust_bytes(-(entry_bytes(&id, &value) as i64));
        Ok(true)
    }

    /// Removes a hint if `condition` holds, counting it as dropped for `reason`.
    fn drop_counted(
        &self,
        owner: &NodeId,
        key: &[u8],
        reason: &'static str,
        condition: impl FnOnce(Option<(&Clock, u64)>) -> bool,
    ) -> Result<bool, HintError> {
        let dropped = self.remove_if(owner, key, condition)?;
        if dropped {
            counter!("ringkv_hints_dropped_total", "target" => owner.to_string(), "reason" => reason)
                .increment(1);
        }
        Ok(dropped)
    }

    /// Starts a sweep pass over `owner`'s hints: [`expire_page`](Self::expire_page)
    /// until it returns `false`. A pass left unfinished changes nothing
    /// but the hints it dropped.
    pub fn begin_expiry(&self, owner: &NodeId) -> ExpiryPass {
        let mut owners = self.owners();
        let token = self.passes_begun.fetch_add(1, AtomicOrdering::Relaxed) + 1;
        if let Some(hints) = owners.get_mut(owner) {
            hints.latest_pass = token;
            hints.stored_since_ms = u64::MAX;
        }
        ExpiryPass {
            owner: owner.clone(),
            token,
            after: None,
            kept_oldest_ms: u64::MAX,
            dropped: 0,
            read: 0,
        }
    }

    /// Drops the hints past the window among the next `limit` of the
    /// pass's owner's. Returns whether more remain. At the end of the
    /// owner's hints it sets the owner's `oldest_ms` to the oldest hint it
    /// kept or that was stored since it began, unless another pass began
    /// since (which reset what this one needed).
    pub fn expire_page(&self, pass: &mut ExpiryPass, limit: usize) -> Result<bool, HintError> {
        let now = self.now_ms();
        let page = self.batch(&pass.owner, pass.after.as_deref(), limit)?;
        pass.read += page.len() as u64;
        counter!("ringkv_hint_sweep_read_total").increment(page.len() as u64);
        for hint in &page {
            // A hint the drop passes over was renewed or removed since the
            // page was read, or the wall clock stepped back: counted as kept
            // all the same, so that the bound stays below it.
            if self.is_expired(hint, now) && self.drop_if_expired(&pass.owner, &hint.key)? {
                pass.dropped += 1;
            } else {
                pass.kept_oldest_ms = pass.kept_oldest_ms.min(hint.stored_at_ms);
            }
        }
        if let Some(last) = page.last() {
            pass.after = Some(last.key.clone());
            return Ok(true);
        }
        if let Some(hints) = self.owners().get_mut(&pass.owner) {
            if hints.latest_pass == pass.token {
                hints.oldest_ms = pass.kept_oldest_ms.min(hints.stored_since_ms);
            }
        }
        Ok(false)
    }

    /// Drops every hint past the window, reading only the owners that may
    /// hold one. Returns how many were dropped. (The handoff worker does
    /// the same page by page, so that it can stop in between.)
    pub fn expire_all(&self) -> Result<u64, HintError> {
        let mut dropped = 0;
        self.begin_sweep();
        for owner in self.owners_to_sweep() {
            let mut pass = self.begin_expiry(&owner);
            while self.expire_page(&mut pass, 1024)? {}
            dropped += pass.dropped;
        }
        Ok(dropped)
    }
}

impl<B: HintBackend> HintStore for HintBook<B> {
    /// Holds `clock` for `owner`, merged into any hint already held for the key.
    fn store(&self, owner: &NodeId, key: &[u8], clock: &Clock) -> Result<(), HintError> {
        self.store_aged(owner, key, clock, self.now_ms())
    }

    /// A hint past the window reads as none, swept or not: it may hold a
    /// value whose tombstone has since been collected, which a read
    /// answered from it would bring back.
    fn read(&self, owner: &NodeId, key: &[u8]) -> Result<Option<Clock>, HintError> {
        match self.backend.get(&entry_id(owner, key))? {
            Some(value) => {
                let held = decode_hint(&value)?;
                Ok((!self.is_past_window(held.stored_at_ms, self.now_ms())).then_some(held.clock))
            }
            None => Ok(None),
        }
    }

    fn mint(
        &self,
        owner: &NodeId,
        key: &[u8],
        mint: &mut dyn FnMut(Clock, Option<NodeId>) -> Option<(Clock, NodeId)>,
    ) -> Result<(), HintError> {
        self.write_entry(owner, key, |existing, now_ms| {
            // A wall clock stepped back must not make the hint look older
            // than a write it already holds.
            let (clock, actor, held_at_ms) = match existing {
                Some(held) => (held.clock, held.actor, held.stored_at_ms),
                None => (Clock::default(), None, 0),
            };
            let (clock, actor) = mint(clock, actor)?;
            Some(Held {
                clock,
                stored_at_ms: now_ms.max(held_at_ms),
                actor: Some(actor),
            })
        })
    }
}

impl<B: HintBackend> HintBook<B> {
    /// Stores a hint for `owner` as [`HintStore::store`] does, but as
    /// written at `written_at_ms` rather than now: a hint moved from one
    /// owner to another keeps its age, which bounds how long a tombstone
    /// must outlive it. Merged into a held hint, the newer time wins. A held
    /// hint past the window is replaced, not merged into, and a `clock`
    /// past it is dropped: their values may have outlived their
    /// tombstones, and merged they would live on at a younger age.
    pub fn store_aged(
        &self,
        owner: &NodeId,
        key: &[u8],
        clock: &Clock,
        written_at_ms: u64,
    ) -> Result<(), HintError> {
        self.write_entry(owner, key, |existing, now_ms| match existing {
            _ if self.is_past_window(written_at_ms, now_ms) => {
                // A hint handed on with its first age (`HintBook::store_aged`)
                // that expired on the way: it would never be delivered, only
                // take room until a sweep. Dropped as expiry drops it.
                counter!("ringkv_hints_dropped_total", "target" => owner.to_string(), "reason" => "expired")
                    .increment(1);
                None
            }
            Some(mut held) => {
                let before = held.clock.clone();
                held.clock.sync(clock);
                if held.clock == before {
                    // Nothing new, so the hint's age stays that of its newest write.
                    return None;
                }
                held.stored_at_ms = written_at_ms.max(held.stored_at_ms);
                Some(held)
            }
            None => Some(Held {
                clock: clock.clone(),
                stored_at_ms: written_at_ms,
                actor: None,
            }),
        })
    }

    /// Replaces the entry for (`owner`, `key`) with what `change` makes of
    /// the one held (`None`: none, or one past the window or corrupt, which
    /// is replaced rather than merged into) and the time now (read under
    /// the entry's lock), keeping the counts, the bytes and the owner's
    /// oldest time. `change` returning `None` writes nothing.
    fn write_entry(
        &self,
        owner: &NodeId,
        key: &[u8],
        change: impl FnOnce(Option<Held>, u64) -> Option<Held>,
    ) -> Result<(), HintError> {
        let id = entry_id(owner, key);
        let _guard = self.lock(&id);
        let mut replaces_corrupt = false;
        let held = self.backend.get(&id)?;
        let held_bytes = held.as_ref().map_or(0, |value| entry_bytes(&id, value));
        let (existing, is_new) = match held {
            Some(value) => match decode_hint(&value) {
                Ok(held) => (Some(held), false),
                // Replaced, not merged into: until the sweep reached it, a
                // corrupt record would refuse every new hint for its key.
                // It was counted when stored, so the count stays.
                Err(e) => {
                    tracing::warn!(%owner, error = %e, "replacing a corrupt hint");
                    replaces_corrupt = true;
                    (None, false)
                }
            },
            None => (None, true),
        };
        let now_ms = self.now_ms();
        // Counted once it is replaced: a store that fails leaves it for the
        // sweep, which counts it then. Replaced, not merged into: merging
        // would give its old values a new age, and they may have outlived
        // their tombstones.
        let mut replaces_expired = false;
        let existing = existing.filter(|held| {
            replaces_expired = self.is_past_window(held.stored_at_ms, now_ms);
            !replaces_expired
        });
        let Some(new) = change(existing, now_ms) else {
            return Ok(());
        };
        // The owner would refuse a clock past the per-key limits; better
        // to refuse it now than to hold a hint that can never be delivered.
        if clock_over_limit(&new.clock).is_some() {
            return Err(HintError::TooLarge {
                reason: format!(
                    "{} actors, about {} bytes",
                    new.clock.entry_count(),
                    new.clock.approx_size()
                ),
            });
        }
        let value = encode_hint(&new);
        let more = entry_bytes(&id, &value) as i64 - held_bytes as i64;
        if let Err(e) = self.charge_bytes(more) {
            counter!("ringkv_hints_dropped_total", "target" => owner.to_string(), "reason" => "full")
                .increment(1);
            self.refused_for_room.store(true, AtomicOrdering::Relaxed);
            return Err(e);
        }
        if is_new && !self.reserve(owner) {
            self.adjust_bytes(-more);
            self.refused_for_room.store(true, AtomicOrdering::Relaxed);
            counter!("ringkv_hints_dropped_total", "target" => owner.to_string(), "reason" => "full")
                .increment(1);
            return Err(HintError::TargetFull {
                owner: owner.clone(),
                limit: self.config.max_per_target,
            });
        }
        if let Err(e) = self.backend.put(&id, &value) {
            if is_new {
                self.adjust(owner, -1);
            }
            self.adjust_bytes(-more);
            return Err(e);
        }
        self.note_stored(owner, new.stored_at_ms);
        if replaces_expired {
            counter!("ringkv_hints_dropped_total", "target" => owner.to_string(), "reason" => "expired")
                .increment(1);
        }
        if replaces_corrupt {
            // Counted only once it is gone: otherwise the sweep drops and
            // counts it.
            counter!("ringkv_hints_dropped_total", "target" => owner.to_string(), "reason" => "corrupt")
                .increment(1);
        }
        counter!("ringkv_hints_stored_total", "target" => owner.to_string()).increment(1);
        Ok(())
    }
}

/// A [`HintBackend`] in memory, for tests and the simulator.
#[derive(Default)]
pub struct MemHintBackend {
    map: Mutex<std::collections::BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl HintBackend for MemHintBackend {
    fn get(&self, id: &[u8]) -> Result<Option<Vec<u8>>, HintError> {
        Ok(self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned())
    }
    fn put(&self, id: &[u8], value: &[u8]) -> Result<(), HintError> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_vec(), value.to_vec());
        Ok(())
    }
    fn delete(&self, id: &[u8]) -> Result<(), HintError> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, HintError> {
        use std::ops::Bound;
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let start = match after {
            Some(a) => Bound::Excluded(a.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        let mut bytes = 0;
        Ok(map
            .range((start, Bound::Unbounded))
            .take_while(|(id, _)| id.starts_with(prefix))
            .take(limit)
            .take_while(|(_, v)| {
                let more = bytes < max_bytes;
                bytes += v.len();
                more
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests;
