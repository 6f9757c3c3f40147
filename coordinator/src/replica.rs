//! The replica side of a request: apply a write or merge a clock into the
//! local store, one key at a time.
//!
//! This is where a node's stored versions change, and the only place. Every
//! change is a read-modify-write of the key's [`Clock`] under a per-key lock
//! (striped, so memory stays bounded), which is why concurrent writes of one
//! key through one node never lose a sibling: the second writer reads what the
//! first wrote.

use std::sync::{Arc, Mutex};

use ringkv_core::dvv::{Clock, Payload, VersionVector, COUNTER_MAX};
use ringkv_core::hash::stable_hash64;
use ringkv_core::wire::{clock_over_limit, ClockOverLimit, READ_BATCH_REPLY_BYTES};
use ringkv_core::wire::{ErrorKind, ReplicaRequest, Response, HANDOFF_MISPLACED, MERGE_REFUSED};
use ringkv_core::NodeId;
use ringkv_repair::anti_entropy::LeafSource;
use ringkv_repair::hints::{HintError, HintStore};
use ringkv_repair::merkle::leaf_of;
use ringkv_repair::trees::{version_digest, ChangeGuard, ChangeObserver};

/// The refusal of a hint handed to `me` for `key` when `ring`, this node's
/// own, does not place the key on it, or when it has no ring yet (see
/// [`ReplicaRequest::Handoff`]).
pub fn handoff_refusal(
    ring: Option<&ringkv_ring::Ring>,
    me: &NodeId,
    key: &[u8],
) -> Option<Response> {
    if ring.is_some_and(|ring| ring.is_replica(key, me)) {
        return None;
    }
    metrics::counter!("ringkv_handoffs_refused_total").increment(1);
    Some(Response::error(
        ErrorKind::NotServing,
        format!(
            "{HANDOFF_MISPLACED}: {me} (the sender's ring is older or newer); \
             the hint stays with the sender until their rings agree"
        ),
    ))
}

/// Number of lock stripes. More stripes, less false sharing between keys;
/// each is one word of memory.
const LOCK_STRIPES: usize = 1024;

/// The default limit on siblings per key.
pub const DEFAULT_MAX_SIBLINGS: usize = 100;

/// Durable storage of clocks by key. A `put` is in the write-ahead log when
/// it returns; an implementation may buffer the log, and then the caller
/// makes it durable before acknowledging (the node's `Storage::commit`).
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Clock>, StoreError>;
    /// Stores `clock` for `key`. `previous` is what the store held for the
    /// key until now (read under the key's lock), so an implementation can
    /// skip index upkeep that the change does not need. It must be exact:
    /// the node's key index is written only when `previous` is `None`.
    fn put(&self, key: &[u8], previous: Option<&Clock>, clock: &Clock) -> Result<(), StoreError>;
    /// Like `put`, and records `actor` as the actor this replica mints the
    /// key's dots under from now on (a new one; see [`ReplicaService`]).
    /// `put` leaves the recorded actor as it is.
    fn put_with_actor(
        &self,
        key: &[u8],
        previous: Option<&Clock>,
        clock: &Clock,
        actor: &NodeId,
    ) -> Result<(), StoreError>;
    /// The actor recorded for `key` by the last `put_with_actor` since the
    /// key was last removed, if any. (After a crash without `--sync` it may
    /// be stale; the caller trusts only the current epoch's actors.)
    fn key_actor(&self, key: &[u8]) -> Result<Option<NodeId>, StoreError>;
    /// Removes the key and its recorded actor (a collected tombstone, a
    /// stray copy), durably like `put`.
    fn delete(&self, key: &[u8]) -> Result<(), StoreError>;
    /// Sets aside the stored version of `key`, which `get` found corrupt:
    /// its bytes go where no read finds them (kept for an operator to look
    /// at) and the key is removed with its recorded actor, durably like
    /// `put`. Returns the digest of the bytes set aside (see
    /// [`ChangeObserver::set_aside`]), or `None` if nothing was stored.
    fn quarantine(&self, key: &[u8]) -> Result<Option<u64>, StoreError>;
    /// Runs `wait`, which may block for long: taking a key's lock while
    /// another request holds it through a stalled write. A store whose
    /// calls run on an async runtime's workers hands the worker's other
    /// tasks to another thread meanwhile (the node's `Storage`).
    fn wait(&self, wait: &mut dyn FnMut()) {
        wait()
    }
}

impl<S: Store> Store for std::sync::Arc<S> {
    fn get(&self, key: &[u8]) -> Result<Option<Clock>, StoreError> {
        (**self).get(key)
    }
    fn put(&self, key: &[u8], previous: Option<&Clock>, clock: &Clock) -> Result<(), StoreError> {
        (**self).put(key, previous, clock)
    }
    fn put_with_actor(
        &self,
        key: &[u8],
        previous: Option<&Clock>,
        clock: &Clock,
        actor: &NodeId,
    ) -> Result<(), StoreError> {
        (**self).put_with_actor(key, previous, clock, actor)
    }
    fn key_actor(&self, key: &[u8]) -> Result<Option<NodeId>, StoreError> {
        (**self).key_actor(key)
    }
    fn delete(&self, key: &[u8]) -> Result<(), StoreError> {
        (**self).delete(key)
    }
    fn quarantine(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        (**self).quarantine(key)
    }
    fn wait(&self, wait: &mut dyn FnMut()) {
        (**self).wait(wait)
    }
}

/// A storage failure, as a store reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("storage failed: {reason}")]
    Io { reason: String },
    #[error("stored version of a key is corrupt: {reason}")]
    Corrupt { reason: String },
}

/// Why a replica refused or failed an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Hint(#[from] HintError),
    #[error(
        "key already has {siblings} concurrent values (the limit is {limit}); \
         read it and write with the returned --context to resolve them"
    )]
    TooManySiblings { siblings: usize, limit: usize },
    #[error(
        "the context claims {claimed} writes by {actor}, which has made only {made} to this key; \
         it was not issued for this key's current history"
    )]
    ImpossibleContext {
        actor: NodeId,
        claimed: u64,
        made: u64,
    },
    #[error(
        "the key's versions would take about {bytes} bytes, over the {limit}-byte limit; \
         read it and write with the returned --context to resolve its siblings"
    )]
    TooLarge { bytes: usize, limit: usize },
    #[error("the key's history would name {actors} actors, over the limit of {limit}")]
    TooManyActors { actors: usize, limit: usize },
}

/// Whether `actor` is one of `epoch_actor`'s per-key actors.
fn is_key_actor_of(actor: &NodeId, epoch_actor: &NodeId) -> bool {
    actor
        .as_str()
        .strip_prefix(epoch_actor.as_str())
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(is_key_actor_suffix)
}

/// A per-key actor's suffix, `.` and eight hex digits, in bytes.
const KEY_ACTOR_SUFFIX_BYTES: usize = 9;

/// A per-key actor's suffix: eight lowercase hex digits.
fn is_key_actor_suffix(suffix: &str) -> bool {
    suffix.len() == 8
        && suffix
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A new per-key actor of `epoch_actor`'s epoch, one `clock` does not name,
/// from the suffixes `suffix` draws.
fn new_key_actor(clock: &Clock, epoch_actor: &NodeId, mut suffix: u32) -> NodeId {
    loop {
        let id = NodeId::new(format!("{epoch_actor}.{suffix:08x}"))
            .expect("ReplicaService::new checked the room for the suffix");
        if clock.counter(&id) == 0 {
            return id;
        }
        suffix = suffix.wrapping_add(1);
    }
}

/// Where per-key actor suffixes come from (see [`ReplicaService`]).
pub type KeyActorSource = Arc<dyn Fn() -> u32 + Send + Sync>;

/// Applies replica operations to a [`Store`].
///
/// **Actors.** A mint adds the dot after the highest its actor has in the
/// key's clock, so a dot stays unique only while this replica stores every
/// dot it minted under that actor for the key. A replica that forgot some
/// (removed its copy: a collected tombstone, a stray copy) and minted under
/// the same actor again would repeat one, and the replicas that know the
/// old dot would take the new write for it and drop it. A copy that comes
/// back (anti-entropy, a late hint) may lack the newest of them.
///
/// So each key gets its own actor, `epoch_actor.k` for a random `k`, the
/// first time this replica mints for it, recorded beside the key
/// ([`Store::put_with_actor`]) and removed with it. Later mints continue the
/// recorded actor if it is of the current epoch; with none recorded (a new
/// key, or one whose copy was removed since) the mint takes a new one. A
/// recorded actor of the current epoch has every one of its dots in the
/// stored clock, since the record and the copy are only ever removed
/// together and merges only add; a crash that may have lost the newest of
/// them (a WAL tail) begins a new epoch, whose actors no older record
/// names. (Riak's per-key epochs solve the same problem.) Suffixes are
/// random: two re-creations of one key in one epoch draw the same suffix
/// with probability 2^-32, which we accept as we accept random epochs.
pub struct ReplicaService<S> {
    /// The epoch's actor (see [`NodeId::actor`]); keys get actors of their
    /// own that extend it (see the type's docs).
    actor: NodeId,
    store: S,
    locks: Box<[Mutex<()>]>,
    max_siblings: usize,
    /// Where hinted writes for other nodes go; `None` refuses them (`--no-hints`).
    hints: Option<Arc<dyn HintStore>>,
    /// Told of every stored change, under the key's lock (the anti-entropy trees).
    observer: Option<Arc<dyn ChangeObserver>>,
    /// Draws the suffix of a new per-key actor: random, so that a restart in
    /// the same epoch cannot give a key one an earlier run gave it.
    key_actors: KeyActorSource,
    /// How many more corrupt versions this run may set aside (see
    /// [`Self::current`]).
    set_aside_left: std::sync::atomic::AtomicUsize,
}

/// How many corrupt stored versions one run of a replica sets aside before
/// it refuses them instead. A few are a disk's or a bug's damage, each
/// healed from the other replicas; a flood is more likely a release that
/// cannot read what an earlier one wrote, where every replica would set
/// aside its copy of the same keys and they would read as absent
/// everywhere. Past the budget they fail loudly, as before, for an
/// operator to look at; a restart starts a new budget.
pub const SET_ASIDE_MAX_PER_RUN: usize = 1_000;

impl<S: Store> ReplicaService<S> {
    /// `id` is the epoch's actor; its per-key actors add 9 bytes to it, so
    /// it must be at most `NODE_ID_MAX_BYTES - 9` long (a node name of at
    /// most `NODE_NAME_MAX_BYTES` with its epoch is).
    pub fn new(id: NodeId, store: S, max_siblings: usize) -> Self {
        assert!(
            id.as_str().len() + KEY_ACTOR_SUFFIX_BYTES <= ringkv_core::node_id::NODE_ID_MAX_BYTES,
            "actor id {id} leaves no room for a per-key suffix"
        );
        ReplicaService {
            actor: id,
            store,
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            max_siblings,
            hints: None,
            observer: None,
            key_actors: Arc::new(rand::random::<u32>),
            set_aside_left: SET_ASIDE_MAX_PER_RUN.into(),
        }
    }

    /// Sets aside at most `budget` corrupt versions in this run instead of
    /// [`SET_ASIDE_MAX_PER_RUN`] (for tests).
    pub fn with_set_aside_budget(self, budget: usize) -> Self {
        self.set_aside_left
            .store(budget, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Draws per-key actor suffixes from `source` instead of at random: for
    /// the simulator, whose runs must replay exactly.
    pub fn with_key_actors(mut self, source: KeyActorSource) -> Self {
        self.key_actors = source;
        self
    }

    /// Tells `observer` of every change to a stored key, with the old and
    /// new versions, in the order the changes are stored.
    pub fn with_observer(mut self, observer: Arc<dyn ChangeObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Accepts hinted writes for other nodes into `hints`.
    pub fn with_hints(mut self, hints: Arc<dyn HintStore>) -> Self {
        self.hints = Some(hints);
        self
    }

    /// The actor of this replica's epoch (see [`NodeId::actor`]); its
    /// per-key actors extend it (see the type's docs).
    pub fn id(&self) -> &NodeId {
        &self.actor
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// The coordinator's write: supersede what `context` covers and add
    /// `payload` under a new dot of this node. Returns the new clock.
    pub fn update(
        &self,
        key: &[u8],
        context: &VersionVector,
        payload: Payload,
    ) -> Result<Clock, ReplicaError> {
        self.update_with(key, payload, |_| context.clone())
    }

    /// A write that supersedes every version this replica holds for `key`
    /// (its whole version vector is the context), read under the key lock so
    /// that no concurrent write slips between the read and the write.
    pub fn overwrite(&self, key: &[u8], payload: Payload) -> Result<Clock, ReplicaError> {
        self.update_with(key, payload, Clock::context)
    }

    fn update_with(
        &self,
        key: &[u8],
        payload: Payload,
        context_of: impl FnOnce(&Clock) -> VersionVector,
    ) -> Result<Clock, ReplicaError> {
        let _guard = self.lock(key);
        let current = self.current(key)?;
        // The store (its tombstone index) and the observer need the old
        // version once the new one exists.
        let old = current.clone();
        let clock = current.unwrap_or_default();
        // A recorded actor of this epoch is always in the clock it was
        // recorded with (merges only add), so a clock naming none has no
        // such record: no need to look.
        let names_one = clock
            .context()
            .iter()
            .any(|(node, _)| is_key_actor_of(node, &self.actor));
        let recorded = if names_one {
            self.store.key_actor(key)?
        } else {
            None
        };
        let (clock, actor, is_new) = self.mint(clock, recorded, payload, context_of)?;
        let _change = self.begin_change();
        if is_new {
            self.store
                .put_with_actor(key, old.as_ref(), &clock, &actor)?;
        } else {
            self.store.put(key, old.as_ref(), &clock)?;
        }
        if let Some(observer) = &self.observer {
            observer.changed(key, old.as_ref(), Some(&clock));
        }
        Ok(clock)
    }

    /// A coordinator's write as the owners' stand-in, when it replicates
    /// none of the key and none of its replicas can be reached (Dynamo's
    /// sloppy quorum takes the write on the first healthy nodes): minted
    /// on the hint this node holds for `owner`, and handed over with it.
    ///
    /// The mint continues an actor recorded beside the hint (see
    /// [`HintStore::mint`]) or takes a new one, as a replica does beside
    /// its copy (see the type's docs): the actor's dots all stay in the
    /// hint as long as the record does, since the two are only removed
    /// together, and a delivered hint leaves the next one a new actor. An
    /// actor per write would add an actor to the key for good at every
    /// write taken this way. The checks are a replica's, on what the hint
    /// holds, and an overwrite supersedes only that: the owners' values it
    /// has not seen come back beside it, as siblings.
    pub fn update_for(
        &self,
        owner: &NodeId,
        key: &[u8],
        context: &VersionVector,
        payload: Payload,
        overwrite: bool,
    ) -> Result<Clock, ReplicaError> {
        let Some(hints) = &self.hints else {
            return Err(HintError::Disabled.into());
        };
        let mut payload = Some(payload);
        let mut outcome = None;
        hints.mint(owner, key, &mut |held, recorded| {
            let context_of = |clock: &Clock| {
                if overwrite {
                    clock.context()
                } else {
                    context.clone()
                }
            };
            let payload = payload.take().expect("a hint's mint runs once");
            match self.mint(held, recorded, payload, context_of) {
                Ok((clock, actor, _)) => {
                    outcome = Some(Ok(clock.clone()));
                    Some((clock, actor))
                }
                Err(e) => {
                    outcome = Some(Err(e));
                    None
                }
            }
        })?;
        outcome.unwrap_or_else(|| {
            Err(StoreError::Io {
                reason: "the hint store wrote nothing and said nothing".into(),
            }
            .into())
        })
    }

    /// Adds `payload` to `clock` under a new dot, superseding what
    /// `context_of(clock)` covers: the mint of [`Self::update_with`] and
    /// [`Self::update_for`]. The dot continues `recorded` (the actor
    /// recorded beside the clock) if it is one of this epoch's and not
    /// saturated, or is the first of a new actor. Returns the new clock,
    /// the actor, and whether it is new (to be recorded).
    fn mint(
        &self,
        mut clock: Clock,
        recorded: Option<NodeId>,
        payload: Payload,
        context_of: impl FnOnce(&Clock) -> VersionVector,
    ) -> Result<(Clock, NodeId, bool), ReplicaError> {
        let recorded = recorded.filter(|actor| is_key_actor_of(actor, &self.actor));
        let (actor, is_new) = match recorded {
            // A context may name this actor with any counter up to the
            // limit (a coordinator cannot check another node's actors, and
            // a merge brings it here): minting past it would store a clock
            // that every later read refuses as corrupt, so a saturated
            // actor is retired for a new one.
            Some(actor) if clock.counter(&actor) < COUNTER_MAX => (actor, false),
            _ => (
                new_key_actor(&clock, &self.actor, (self.key_actors)()),
                true,
            ),
        };
        let context = &context_of(&clock);
        // This node holds every dot it minted for the key under `actor`
        // (see the type's docs), so a context claiming more of them is not a
        // context of this key's history; obeying it would supersede our
        // future writes.
        let (claimed, made) = (context.get(&actor), clock.counter(&actor));
        if claimed > made {
            return Err(ReplicaError::ImpossibleContext {
                actor,
                claimed,
                made,
            });
        }
        let siblings = clock.sibling_count_after_update(context);
        if siblings > self.max_siblings {
            return Err(ReplicaError::TooManySiblings {
                siblings: siblings - 1,
                limit: self.max_siblings,
            });
        }
        clock.update(context, payload, &actor);
        check_limits(&clock)?;
        Ok((clock, actor, is_new))
    }

    /// Merges a clock from another replica. Returns whether anything changed.
    ///
    /// A merge past the per-key limits is refused and stores nothing: two
    /// replicas may each hold siblings under the limit that together exceed
    /// it, and a stored clock past it could never be read back (reads refuse
    /// it as corrupt), so the key would be lost on this replica for good.
    /// Refused, the replicas keep their own versions until a client write
    /// with a read's context supersedes the siblings.
    pub fn sync(&self, key: &[u8], incoming: &Clock) -> Result<bool, ReplicaError> {
        let _guard = self.lock(key);
        let current = self.current(key)?;
        let mut merged = current.clone().unwrap_or_default();
        merged.sync(incoming);
        // An empty clock merged into nothing is still nothing: stored, it
        // would read as a key held with no version, and never be collected.
        if current.as_ref() == Some(&merged) || (current.is_none() && merged == Clock::default()) {
            return Ok(false);
        }
        check_limits(&merged)?;
        let _change = self.begin_change();
        self.store.put(key, current.as_ref(), &merged)?;
        if let Some(observer) = &self.observer {
            observer.changed(key, current.as_ref(), Some(&merged));
        }
        Ok(true)
    }

    /// Removes `key` if it still holds exactly `expected`: a tombstone that
    /// every replica was seen to hold (`ringkv_repair::tombstones`), or a
    /// stray copy that a current replica covers (`ringkv_repair::cleanup`).
    /// Returns whether it was removed: a write since the check keeps it.
    pub fn remove_if_unchanged(&self, key: &[u8], expected: &Clock) -> Result<bool, ReplicaError> {
        let _lock = self.lock(key);
        let current = self.current(key)?;
        if current.as_ref() != Some(expected) {
            return Ok(false);
        }
        let _change = self.begin_change();
        self.store.delete(key)?;
        if let Some(observer) = &self.observer {
            observer.changed(key, current.as_ref(), None);
        }
        Ok(true)
    }

    /// What this replica holds for `key`. A corrupt stored version is set
    /// aside and reads as nothing (see [`Self::current`]).
    pub fn read(&self, key: &[u8]) -> Result<Option<Clock>, ReplicaError> {
        match self.store.get(key) {
            Err(StoreError::Corrupt { .. }) => {
                let _guard = self.lock(key);
                self.current(key)
            }
            other => Ok(other?),
        }
    }

    /// What the store holds for `key`, read under the key's lock. A stored
    /// version that does not decode is set aside ([`Store::quarantine`])
    /// and the key reads as absent, as on a replica that never had it.
    ///
    /// Refusing it instead (as reads did) blocked the key on this replica
    /// for good: every write, merge and repair of it failed, round after
    /// round, and no command could clear it. Set aside, it heals the way a
    /// missed write does: read repair, anti-entropy and hints bring the
    /// other replicas' versions back, and a write coordinated here succeeds.
    /// (Riak treats an object it cannot decode as not found, for the same
    /// reason.) It is safe for dots: the recorded actor goes with the key,
    /// so the next write here mints under a new one and cannot repeat a
    /// dot the lost version held. What only the lost version held is lost
    /// on this replica either way; its bytes stay for an operator.
    fn current(&self, key: &[u8]) -> Result<Option<Clock>, ReplicaError> {
        let reason = match self.store.get(key) {
            Err(StoreError::Corrupt { reason }) => reason,
            other => return Ok(other?),
        };
        let spent = self
            .set_aside_left
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |left| left.checked_sub(1),
            )
            .is_err();
        if spent {
            metrics::counter!("ringkv_corrupt_versions_refused_total").increment(1);
            return Err(StoreError::Corrupt {
                reason: format!(
                    "{reason} (not set aside: this run has set aside as many as it may, \
                     more than damage explains; check the release and the disk)"
                ),
            }
            .into());
        }
        let _change = self.begin_change();
        let digest = self.store.quarantine(key)?;
        if let (Some(observer), Some(digest)) = (&self.observer, digest) {
            observer.set_aside(key, digest);
        }
        metrics::counter!("ringkv_corrupt_versions_set_aside_total").increment(1);
        tracing::error!(
            key = %String::from_utf8_lossy(key),
            %reason,
            "set aside a stored version that does not decode; the key's other replicas will restore it"
        );
        Ok(None)
    }

    /// A fallback's read for `owner`: the hint it holds for the owner, and
    /// nothing else. A copy of the key in its own store is a stray left
    /// from an older ring (a fallback does not replicate the key), which
    /// may have outlived the key's tombstone on the replicas; handed on,
    /// read repair would bring a deleted value back. A node that holds no
    /// hints (`--no-hints`) refuses, as it refuses to take one: its "nothing"
    /// would count toward R for an owner it can never stand in for.
    pub fn read_for(&self, key: &[u8], owner: &NodeId) -> Result<Option<Clock>, ReplicaError> {
        match &self.hints {
            Some(hints) => Ok(hints.read(owner, key)?),
            None => Err(HintError::Disabled.into()),
        }
    }

    /// Holds a write for `owner`, which is down (sloppy quorum).
    pub fn hint(&self, owner: &NodeId, key: &[u8], clock: &Clock) -> Result<(), ReplicaError> {
        match &self.hints {
            Some(hints) => Ok(hints.store(owner, key, clock)?),
            None => Err(HintError::Disabled.into()),
        }
    }

    /// Serves one replica request.
    pub fn handle(&self, request: ReplicaRequest) -> Response {
        let result = match request {
            ReplicaRequest::Update {
                key,
                context,
                payload,
                overwrite,
                hint_for: Some(owner),
            } => match self.update_for(&owner, &key, &context, payload, overwrite) {
                // A storage failure may have left the dot on disk (a
                // failed fsync, replayed at restart): not a refusal that
                // lets the forwarder stand in and mint the write again.
                Err(ReplicaError::Hint(HintError::Backend { reason })) => {
                    return Response::error(
                        ErrorKind::Internal,
                        format!("{}: hint storage failed: {reason}", self.id()),
                    )
                }
                other => other.map(Some),
            },
            ReplicaRequest::Update {
                key,
                context,
                payload,
                overwrite,
                hint_for: None,
            } => {
                if overwrite {
                    self.overwrite(&key, payload).map(Some)
                } else {
                    self.update(&key, &context, payload).map(Some)
                }
            }
            // Placement is the node's to check (`handoff_refusal`), before
            // the request gets here.
            ReplicaRequest::Sync { key, clock } | ReplicaRequest::Handoff { key, clock } => {
                self.sync(&key, &clock).map(|_| None)
            }
            ReplicaRequest::Read {
                key,
                hint_for: None,
            } => self.read(&key),
            ReplicaRequest::Read {
                key,
                hint_for: Some(owner),
            } => self.read_for(&key, &owner),
            ReplicaRequest::Hint { owner, key, clock } => {
                self.hint(&owner, &key, &clock).map(|()| None)
            }
            ReplicaRequest::ReadBatch { keys } => return self.read_batch(&keys),
            ReplicaRequest::SyncBatch { items } => {
                // A merge past the limits is refused for its key only: the
                // batch's other keys are merged all the same, and must not
                // wait for a client to resolve that one's siblings. But the
                // answer says so: a leave or a ring hand-over must not count
                // a key refused here as handed over (it may be a write only
                // the sender holds), and anti-entropy then tries the keys
                // one at a time, skipping only the refused.
                let mut refused: Vec<(&[u8], ReplicaError)> = Vec::new();
                let merged = items.iter().try_for_each(|i| match self.sync(&i.key, &i.clock) {
                    Err(
                        e @ (ReplicaError::TooLarge { .. }
                        | ReplicaError::TooManyActors { .. }
                        | ReplicaError::TooManySiblings { .. }),
                    ) => {
                        metrics::counter!("ringkv_merges_refused_total").increment(1);
                        tracing::warn!(key = %String::from_utf8_lossy(&i.key), error = %e, "merge refused");
                        refused.push((&i.key, e));
                        Ok(())
                    }
                    other => other.map(|_| ()),
                });
                match (merged, refused.first()) {
                    (Err(e), _) => Err(e),
                    (Ok(()), None) => Ok(None),
                    (Ok(()), Some((key, e))) => {
                        return Response::error(
                            ErrorKind::InvalidRequest,
                            format!(
                                "{}: {MERGE_REFUSED} {} of the batch's {} keys (the others are merged), first key {:?}: {e}",
                                self.id(),
                                refused.len(),
                                items.len(),
                                String::from_utf8_lossy(key)
                            ),
                        )
                    }
                }
            }
            ReplicaRequest::TreeHashes { .. } | ReplicaRequest::LeafItems { .. } => {
                return Response::error(
                    ErrorKind::Unavailable,
                    format!("{} does not take part in anti-entropy", self.id()),
                )
            }
        };
        match result {
            Ok(clock) => Response::Clock(clock),
            Err(e @ ReplicaError::Store(_)) => {
                Response::error(ErrorKind::Internal, format!("{}: {e}", self.id()))
            }
            // The coordinator may ask another fallback.
            Err(e @ ReplicaError::Hint(_)) => {
                Response::error(ErrorKind::Unavailable, format!("{}: {e}", self.id()))
            }
            Err(e) => Response::error(ErrorKind::InvalidRequest, e.to_string()),
        }
    }

    /// The clocks of `keys` in order, stopping once the answer passes
    /// [`READ_BATCH_REPLY_BYTES`] (the asker asks again for the rest).
    fn read_batch(&self, keys: &[Vec<u8>]) -> Response {
        let mut clocks = Vec::with_capacity(keys.len());
        let mut bytes = 0;
        for key in keys {
            match self.read(key) {
                Ok(clock) => {
                    let size = clock.as_ref().map_or(0, Clock::approx_size) + key.len();
                    // Stop before passing the cap; the first clock always
                    // goes (it fits a frame by the clock size limit).
                    if !clocks.is_empty() && bytes + size > READ_BATCH_REPLY_BYTES {
                        break;
                    }
                    bytes += size;
                    clocks.push(clock);
                }
                Err(e) => {
                    return Response::error(ErrorKind::Internal, format!("{}: {e}", self.id()))
                }
            }
        }
        Response::Clocks(clocks)
    }

    fn lock(&self, key: &[u8]) -> std::sync::MutexGuard<'_, ()> {
        let stripe = &self.locks[(stable_hash64(key) % LOCK_STRIPES as u64) as usize];
        // Its holder may be waiting out a write stall: a taken stripe is
        // waited for as the store says long waits go.
        ringkv_core::long_wait::lock(stripe, &|wait| self.store.wait(wait))
    }

    /// Tells the observer, if any, that a change is about to be stored
    /// (see `ChangeObserver::begin_change`); long waits go as the store says.
    fn begin_change(&self) -> Option<ChangeGuard<'_>> {
        let observer = self.observer.as_ref()?;
        Some(observer.begin_change(&|wait| self.store.wait(wait)))
    }
}

/// An in-memory [`Store`] for tests and the simulator.
#[derive(Default)]
pub struct MemStore {
    map: dashmap::DashMap<Vec<u8>, Clock>,
    actors: dashmap::DashMap<Vec<u8>, NodeId>,
    /// Keys whose reads fail, as a corrupt stored clock's would.
    unreadable: dashmap::DashSet<Vec<u8>>,
    /// Keys whose stored versions were set aside, in order.
    quarantined: Mutex<Vec<Vec<u8>>>,
    /// Keys whose writes fail, as on a failing disk.
    unwritable: dashmap::DashSet<Vec<u8>>,
}

impl Store for MemStore {
    fn get(&self, key: &[u8]) -> Result<Option<Clock>, StoreError> {
        if self.unreadable.contains(key) {
            return Err(StoreError::Corrupt {
                reason: "made unreadable by the test".into(),
            });
        }
        Ok(self.map.get(key).map(|c| c.clone()))
    }
    fn put(&self, key: &[u8], _previous: Option<&Clock>, clock: &Clock) -> Result<(), StoreError> {
        if self.unwritable.contains(key) {
            return Err(StoreError::Io {
                reason: "made unwritable by the test".into(),
            });
        }
        self.map.insert(key.to_vec(), clock.clone());
        Ok(())
    }
    fn put_with_actor(
        &self,
        key: &[u8],
        previous: Option<&Clock>,
        clock: &Clock,
        actor: &NodeId,
    ) -> Result<(), StoreError> {
        self.put(key, previous, clock)?;
        self.actors.insert(key.to_vec(), actor.clone());
        Ok(())
    }
    fn key_actor(&self, key: &[u8]) -> Result<Option<NodeId>, StoreError> {
        Ok(self.actors.get(key).map(|a| a.clone()))
    }
    fn delete(&self, key: &[u8]) -> Result<(), StoreError> {
        self.map.remove(key);
        self.actors.remove(key);
        Ok(())
    }
    fn quarantine(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        self.unreadable.remove(key);
        self.actors.remove(key);
        let set_aside = self
            .map
            .remove(key)
            .map(|(_, clock)| version_digest(&clock));
        self.quarantined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(key.to_vec());
        Ok(set_aside)
    }
}

impl MemStore {
    /// Every read of `key` fails as corrupt from now on, until its version
    /// is set aside (for tests of what one bad key does to the rest). The
    /// digest of the version set aside is that of what the key held.
    pub fn make_unreadable(&self, key: &[u8]) {
        self.unreadable.insert(key.to_vec());
    }

    /// Every write of `key` fails from now on (for tests of what one bad
    /// key does to the rest).
    pub fn make_unwritable(&self, key: &[u8]) {
        self.unwritable.insert(key.to_vec());
    }

    /// The keys whose stored versions were set aside, in order.
    pub fn quarantined(&self) -> Vec<Vec<u8>> {
        self.quarantined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every stored key and its clock (for tree rebuilds in tests).
    pub fn items(&self) -> Vec<(Vec<u8>, Clock)> {
        self.map
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }
}

/// Lists a leaf by scanning every key: fine for the simulator's few keys.
impl LeafSource for MemStore {
    fn leaf_items(
        &self,
        leaf: usize,
        leaf_bits: u32,
        wanted: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<(Vec<u8>, u64)>, String> {
        Ok(self
            .map
            .iter()
            .filter(|e| leaf_of(e.key(), leaf_bits) == leaf && wanted(e.key()))
            .map(|e| (e.key().clone(), version_digest(e.value())))
            .collect())
    }
}

/// What a stored clock may hold: reads refuse anything larger as corrupt.
fn check_limits(clock: &Clock) -> Result<(), ReplicaError> {
    match clock_over_limit(clock) {
        None => Ok(()),
        Some(ClockOverLimit::Actors { actors, limit }) => {
            Err(ReplicaError::TooManyActors { actors, limit })
        }
        Some(ClockOverLimit::Bytes { bytes, limit }) => {
            Err(ReplicaError::TooLarge { bytes, limit })
        }
        Some(ClockOverLimit::Siblings { siblings, limit }) => {
            Err(ReplicaError::TooManySiblings { siblings, limit })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_core::wire::CLOCK_MAX_BYTES;
    use ringkv_repair::hints::{HintBook, MemHintBackend};

    fn service(max_siblings: usize) -> ReplicaService<MemStore> {
        ReplicaService::new(NodeId::new("a").unwrap(), MemStore::default(), max_siblings)
    }

    /// A node without a hint store cannot stand in for an owner, for a
    /// read as for a write: it refuses both (and the coordinator asks the
    /// next fallback) rather than answer "nothing" toward R.
    #[test]
    fn a_node_without_hints_refuses_to_stand_in_for_a_read() {
        let s = service(10);
        let owner = NodeId::new("b").unwrap();
        for request in [
            ReplicaRequest::Read {
                key: b"k".to_vec(),
                hint_for: Some(owner.clone()),
            },
            ReplicaRequest::Hint {
                owner: owner.clone(),
                key: b"k".to_vec(),
                clock: Clock::new(),
            },
        ] {
            match s.handle(request) {
                Response::Error(e) => assert_eq!(e.kind, ErrorKind::Unavailable, "{}", e.message),
                other => panic!("a node without hints stood in: {other:?}"),
            }
        }
        let own = s.handle(ReplicaRequest::Read {
            key: b"k".to_vec(),
            hint_for: None,
        });
        assert!(matches!(own, Response::Clock(None)), "{own:?}");
    }

    #[test]
    fn blind_writes_past_the_sibling_limit_are_refused() {
        let s = service(2);
        let blind = VersionVector::new();
        s.update(b"k", &blind, Payload::Value(b"1".to_vec()))
            .unwrap();
        s.update(b"k", &blind, Payload::Value(b"2".to_vec()))
            .unwrap();
        let err = s
            .update(b"k", &blind, Payload::Value(b"3".to_vec()))
            .unwrap_err();
        assert_eq!(
            err,
            ReplicaError::TooManySiblings {
                siblings: 2,
                limit: 2
            }
        );
        assert_eq!(
            s.read(b"k").unwrap().unwrap().sibling_count(),
            2,
            "nothing written"
        );
        // A write with the full context resolves them.
        let ctx = s.read(b"k").unwrap().unwrap().context();
        let clock = s.update(b"k", &ctx, Payload::Value(b"4".to_vec())).unwrap();
        assert_eq!(clock.sibling_count(), 1);
    }

    #[test]
    fn concurrent_blind_writes_on_one_node_keep_every_sibling() {
        let s = Arc::new(service(10_000));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let v = format!("{t}-{i}").into_bytes();
                        s.update(b"k", &VersionVector::new(), Payload::Value(v))
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.read(b"k").unwrap().unwrap().sibling_count(), 400);
    }

    /// The key's actor here.
    fn key_actor(clock: &Clock) -> NodeId {
        let context = clock.context();
        let (actor, _) = context.iter().next().expect("one actor");
        actor.clone()
    }

    #[test]
    fn a_context_claiming_writes_this_actor_never_made_is_refused() {
        let s = service(10);
        let first = s
            .update(b"k", &VersionVector::new(), Payload::Value(b"v".to_vec()))
            .unwrap();
        let forged = VersionVector::from_pairs([(key_actor(&first), u64::MAX / 2)]);
        let err = s.update(b"k", &forged, Payload::Tombstone).unwrap_err();
        assert!(
            matches!(err, ReplicaError::ImpossibleContext { made: 1, .. }),
            "{err}"
        );
        assert_eq!(s.read(b"k").unwrap(), Some(first), "nothing written");
    }

    /// A context naming another replica's actor with a counter at the limit
    /// passes every check where it is written, and a merge carries it to
    /// that replica. Its next write must not mint past the limit.
    #[test]
    fn a_saturated_key_actor_is_retired_for_a_new_one() {
        let s = service(10);
        let first = s
            .update(b"k", &VersionVector::new(), Payload::Value(b"v".to_vec()))
            .unwrap();
        let actor = key_actor(&first);
        // What another coordinator stored for a put with such a context.
        let mut theirs = Clock::new();
        let forged = VersionVector::from_pairs([(actor.clone(), COUNTER_MAX)]);
        theirs.update(
            &forged,
            Payload::Value(b"w".to_vec()),
            &NodeId::new("b.1.7").unwrap(),
        );
        assert!(s.sync(b"k", &theirs).unwrap());
        let context = s.read(b"k").unwrap().unwrap().context();
        let next = s
            .update(b"k", &context, Payload::Value(b"x".to_vec()))
            .unwrap();
        next.validate().expect("a clock later reads accept");
        assert_eq!(
            next.counter(&actor),
            COUNTER_MAX,
            "the old actor minted no more"
        );
        let values: Vec<_> = next.values().collect();
        assert_eq!(values, [b"x".as_slice()]);
        assert_eq!(s.read(b"k").unwrap(), Some(next));
    }

    #[test]
    fn a_key_may_not_grow_past_the_size_limit() {
        let s = service(1000);
        let big = vec![0u8; 4 * 1024 * 1024];
        let mut result = Ok(Clock::new());
        for _ in 0..20 {
            result = s.update(b"k", &VersionVector::new(), Payload::Value(big.clone()));
            if result.is_err() {
                break;
            }
        }
        assert!(
            matches!(result, Err(ReplicaError::TooLarge { .. })),
            "{result:?}"
        );
        assert!(s.read(b"k").unwrap().unwrap().approx_size() <= CLOCK_MAX_BYTES);
    }

    /// Two replicas each under the size limit whose siblings together exceed
    /// it: the merge is refused, and both keys stay readable as they were.
    #[test]
    fn a_merge_past_the_size_limit_is_refused_and_stores_nothing() {
        let a = service(1000);
        let b = ReplicaService::new(NodeId::new("b").unwrap(), MemStore::default(), 1000);
        let big = Payload::Value(vec![0u8; 4 * 1024 * 1024]);
        for _ in 0..9 {
            a.update(b"k", &VersionVector::new(), big.clone()).unwrap();
            b.update(b"k", &VersionVector::new(), big.clone()).unwrap();
        }
        let (mine, theirs) = (
            a.read(b"k").unwrap().unwrap(),
            b.read(b"k").unwrap().unwrap(),
        );
        let mut merged = mine.clone();
        merged.sync(&theirs);
        assert!(
            merged.approx_size() > CLOCK_MAX_BYTES,
            "the test needs an oversized merge"
        );

        let err = a.sync(b"k", &theirs).unwrap_err();
        assert!(matches!(err, ReplicaError::TooLarge { .. }), "{err}");
        assert_eq!(a.read(b"k").unwrap(), Some(mine.clone()), "nothing stored");
        // In an anti-entropy batch the refused key holds up no other.
        let other = {
            let mut c = Clock::new();
            c.update(
                &VersionVector::new(),
                Payload::Value(b"j".to_vec()),
                &NodeId::new("b").unwrap(),
            );
            c
        };
        let batch = ReplicaRequest::SyncBatch {
            items: vec![
                ringkv_core::wire::KeyClock {
                    key: b"k".to_vec(),
                    clock: theirs.clone(),
                },
                ringkv_core::wire::KeyClock {
                    key: b"j".to_vec(),
                    clock: other.clone(),
                },
            ],
        };
        // But the answer names it: a leave must not count it handed over.
        match a.handle(batch) {
            Response::Error(e) => {
                assert!(e.is_merge_refusal(), "{e:?}");
                assert!(
                    e.message
                        .contains("refused to merge 1 of the batch's 2 keys")
                        && e.message.contains("\"k\""),
                    "{}",
                    e.message
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(a.read(b"j").unwrap(), Some(other));
        assert_eq!(a.read(b"k").unwrap(), Some(mine), "still nothing stored");
        // A merge within the limit still goes through.
        let small = ReplicaService::new(NodeId::new("c").unwrap(), MemStore::default(), 1000);
        small
            .update(b"k", &VersionVector::new(), Payload::Value(b"v".to_vec()))
            .unwrap();
        assert!(a.sync(b"k", &small.read(b"k").unwrap().unwrap()).unwrap());
    }

    /// One change as an observer is told it: key, old and new version.
    type Change = (Vec<u8>, Option<Clock>, Option<Clock>);

    /// Records what it is told.
    #[derive(Default)]
    struct Changes(Mutex<Vec<Change>>);

    impl ChangeObserver for Changes {
        fn changed(&self, key: &[u8], old: Option<&Clock>, new: Option<&Clock>) {
            self.0
                .lock()
                .unwrap()
                .push((key.to_vec(), old.cloned(), new.cloned()));
        }
    }

    #[test]
    fn the_observer_sees_every_stored_change_and_nothing_else() {
        let changes = Arc::new(Changes::default());
        let a = service(10).with_observer(changes.clone());
        let first = a
            .update(b"k", &VersionVector::new(), Payload::Value(b"1".to_vec()))
            .unwrap();
        let second = a
            .update(b"k", &first.context(), Payload::Value(b"2".to_vec()))
            .unwrap();
        assert!(!a.sync(b"k", &first).unwrap(), "already known: no change");
        let _ = a.update(
            b"k",
            &VersionVector::from_pairs([(key_actor(&first), 99)]),
            Payload::Tombstone,
        );
        let deleted = a
            .update(b"k", &second.context(), Payload::Tombstone)
            .unwrap();
        assert!(
            !a.remove_if_unchanged(b"k", &second).unwrap(),
            "not the current version: kept"
        );
        assert!(a.remove_if_unchanged(b"k", &deleted).unwrap());
        assert_eq!(a.read(b"k").unwrap(), None);
        let seen = changes.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                (b"k".to_vec(), None, Some(first.clone())),
                (b"k".to_vec(), Some(first), Some(second.clone())),
                (b"k".to_vec(), Some(second), Some(deleted.clone())),
                (b"k".to_vec(), Some(deleted), None),
            ],
            "refused writes and no-op merges are not changes"
        );
    }

    #[test]
    fn sync_reports_whether_it_changed_anything() {
        let a = service(10);
        let clock = a
            .update(b"k", &VersionVector::new(), Payload::Value(b"v".to_vec()))
            .unwrap();
        let b = ReplicaService::new(NodeId::new("b").unwrap(), MemStore::default(), 10);
        assert!(b.sync(b"k", &clock).unwrap());
        assert!(!b.sync(b"k", &clock).unwrap());
        // An empty clock for a key not held stores nothing.
        assert!(!b.sync(b"absent", &Clock::default()).unwrap());
        assert_eq!(b.read(b"absent").unwrap(), None);
    }

    /// A replica that removed its copy (a collected tombstone, a stray
    /// copy) and writes the key again mints under a new per-key actor, so
    /// a replica that knows its old dots keeps the new write.
    #[test]
    fn a_write_after_the_copy_was_removed_mints_a_new_dot() {
        let blind = VersionVector::new();
        let a = service(10);
        let first = a
            .update(b"k", &blind, Payload::Value(b"old".to_vec()))
            .unwrap();
        let b = ReplicaService::new(NodeId::new("b").unwrap(), MemStore::default(), 10);
        b.sync(b"k", &first).unwrap();
        assert!(a.remove_if_unchanged(b"k", &first).unwrap());
        let again = a
            .update(b"k", &blind, Payload::Value(b"new".to_vec()))
            .unwrap();
        assert!(b.sync(b"k", &again).unwrap(), "b took the new write");
        let held = b.read(b"k").unwrap().unwrap();
        let values: Vec<&[u8]> = held.values().collect();
        // A blind write beside the value b held: both, as siblings.
        assert_eq!(values.len(), 2, "{held:?}");
        assert!(values.contains(&&b"new"[..]) && values.contains(&&b"old"[..]));
    }

    /// A stored version that does not decode is set aside by whatever
    /// meets it first, and the key reads as absent. The next write mints
    /// under a new per-key actor, even once the old actor's dots are back
    /// (read repair): the lost version may have held newer dots of it that
    /// other replicas know, and repeating one would make them drop the new
    /// write. A merge into it stores what comes in, and
    /// a tombstone collection checked against the lost version removes
    /// nothing.
    #[test]
    fn a_corrupt_version_is_set_aside_and_the_next_write_gets_a_new_actor() {
        let blind = VersionVector::new();
        let a = service(10);
        let first = a
            .update(b"k", &blind, Payload::Value(b"old".to_vec()))
            .unwrap();
        a.store().make_unreadable(b"k");
        assert!(!a.remove_if_unchanged(b"k", &first).unwrap());
        assert_eq!(a.store().quarantined(), [b"k".to_vec()]);
        assert_eq!(a.read(b"k").unwrap(), None, "reads as absent");
        // The old actor's dots come back (read repair, say), but not its
        // record: the next write must not continue it.
        assert!(a.sync(b"k", &first).unwrap());
        let again = a
            .update(b"k", &blind, Payload::Value(b"new".to_vec()))
            .unwrap();
        let new_actor = again
            .context()
            .iter()
            .map(|(actor, _)| actor.clone())
            .find(|actor| *actor != key_actor(&first))
            .expect("a new actor");
        assert_eq!(again.counter(&key_actor(&first)), 1, "not continued");
        assert_eq!(again.counter(&new_actor), 1);

        // Met by a merge (read repair, anti-entropy, a hint) or a read.
        a.store().make_unreadable(b"k");
        assert!(a.sync(b"k", &first).unwrap());
        assert_eq!(a.read(b"k").unwrap(), Some(first.clone()));
        a.store().make_unreadable(b"k");
        assert_eq!(a.read(b"k").unwrap(), None);
        assert_eq!(a.store().quarantined().len(), 3);
    }

    /// Past its budget a run refuses corrupt versions as before, rather
    /// than set aside what may be every replica's copy of many keys (a
    /// release that cannot read an earlier one's data).
    #[test]
    fn corrupt_versions_past_the_budget_are_refused() {
        let a = service(10).with_set_aside_budget(1);
        let blind = VersionVector::new();
        for key in [b"k1", b"k2"] {
            a.update(key, &blind, Payload::Value(b"v".to_vec()))
                .unwrap();
            a.store().make_unreadable(key);
        }
        assert_eq!(a.read(b"k1").unwrap(), None);
        let refused = a.read(b"k2").unwrap_err().to_string();
        assert!(refused.contains("not set aside"), "{refused}");
        assert!(a
            .update(b"k2", &blind, Payload::Value(b"w".to_vec()))
            .is_err());
        assert_eq!(a.store().quarantined(), [b"k1".to_vec()]);
    }

    /// A removed copy that comes back without its latest dot (from a
    /// replica that missed it) records no actor: the next mint takes a new
    /// one instead of repeating that dot.
    #[test]
    fn a_copy_that_comes_back_short_gets_a_new_actor() {
        let blind = VersionVector::new();
        let a = service(10);
        let v1 = a
            .update(b"k", &blind, Payload::Value(b"v1".to_vec()))
            .unwrap();
        let v2 = a
            .update(b"k", &v1.context(), Payload::Value(b"v2".to_vec()))
            .unwrap();
        assert_eq!(
            v2.entry_count(),
            1,
            "one actor per key while the copy stays"
        );
        // c has v2; a's copy goes and comes back as v1.
        let c = ReplicaService::new(NodeId::new("c").unwrap(), MemStore::default(), 10);
        c.sync(b"k", &v2).unwrap();
        assert!(a.remove_if_unchanged(b"k", &v2).unwrap());
        a.sync(b"k", &v1).unwrap();
        let v3 = a
            .update(b"k", &blind, Payload::Value(b"v3".to_vec()))
            .unwrap();
        assert_eq!(v3.entry_count(), 2, "{v3:?}");
        assert!(c.sync(b"k", &v3).unwrap(), "c dropped v3");
        let held = c.read(b"k").unwrap().unwrap();
        let mut values: Vec<&[u8]> = held.values().collect();
        values.sort();
        assert_eq!(values, [&b"v2"[..], &b"v3"[..]]);
    }

    /// A service of epoch actor `epoch` holding hints in `book`.
    fn standing_in(
        epoch: &str,
        book: &Arc<HintBook<MemHintBackend>>,
        max_siblings: usize,
    ) -> ReplicaService<MemStore> {
        ReplicaService::new(
            NodeId::new(epoch).unwrap(),
            MemStore::default(),
            max_siblings,
        )
        .with_hints(book.clone())
    }

    fn hint_book() -> Arc<HintBook<MemHintBackend>> {
        Arc::new(
            HintBook::open(
                MemHintBackend::default(),
                Default::default(),
                Arc::new(|| 1_000_000),
            )
            .unwrap(),
        )
    }

    /// A stand-in's mint builds on its hint for the owner, never on its own
    /// copy, continues the hint's actor within the epoch, and draws a new
    /// one in a new epoch (a crash may have lost the newest of its dots).
    #[test]
    fn a_stand_ins_write_goes_on_the_hint_under_the_hints_actor() {
        let (book, owner) = (hint_book(), NodeId::new("o").unwrap());
        let s = standing_in("a.0001", &book, 10);
        let value = |v: &str| Payload::Value(v.as_bytes().to_vec());
        s.update(b"k", &VersionVector::new(), value("own")).unwrap();
        let first = s
            .update_for(&owner, b"k", &VersionVector::new(), value("v1"), false)
            .unwrap();
        let actor = key_actor(&first);
        assert!(is_key_actor_of(&actor, &NodeId::new("a.0001").unwrap()));
        let second = s
            .update_for(&owner, b"k", &first.context(), value("v2"), false)
            .unwrap();
        assert_eq!(second.counter(&actor), 2, "the same actor, continued");
        assert_eq!(second.values().collect::<Vec<_>>(), [b"v2".as_slice()]);
        assert_eq!(book.read(&owner, b"k").unwrap(), Some(second.clone()));
        let own: Vec<Vec<u8>> = s
            .read(b"k")
            .unwrap()
            .unwrap()
            .values()
            .map(<[u8]>::to_vec)
            .collect();
        assert_eq!(own, [b"own".to_vec()], "its own copy is untouched");

        let after_crash = standing_in("a.0002", &book, 10);
        let third = after_crash
            .update_for(&owner, b"k", &second.context(), value("v3"), false)
            .unwrap();
        assert_eq!(
            third.counter(&actor),
            2,
            "the old epoch's actor minted no more"
        );
        assert_eq!(third.entry_count(), 2, "{third:?}");
    }

    /// Hints whose storage fails.
    struct BrokenHints;

    impl HintStore for BrokenHints {
        fn store(&self, _: &NodeId, _: &[u8], _: &Clock) -> Result<(), HintError> {
            Err(HintError::Backend {
                reason: "disk gone".into(),
            })
        }
        fn read(&self, _: &NodeId, _: &[u8]) -> Result<Option<Clock>, HintError> {
            Ok(None)
        }
        fn mint(
            &self,
            _: &NodeId,
            _: &[u8],
            _: &mut dyn FnMut(Clock, Option<NodeId>) -> Option<(Clock, NodeId)>,
        ) -> Result<(), HintError> {
            Err(HintError::Backend {
                reason: "disk gone".into(),
            })
        }
    }

    /// A stand-in's mint that failed in storage may have left its dot on
    /// disk, so it is an internal error, never the refusal that would let
    /// the forwarder mint the write again; a hint that failed the same way
    /// leaves the coordinator free to ask another fallback.
    #[test]
    fn a_stand_ins_storage_failure_is_no_refusal() {
        let s = service(10).with_hints(Arc::new(BrokenHints));
        let owner = NodeId::new("o").unwrap();
        let mint = s.handle(ReplicaRequest::Update {
            key: b"k".to_vec(),
            context: VersionVector::new(),
            payload: Payload::Value(b"v".to_vec()),
            overwrite: false,
            hint_for: Some(owner.clone()),
        });
        assert!(
            matches!(&mint, Response::Error(e) if e.kind == ErrorKind::Internal),
            "{mint:?}"
        );
        let hint = s.handle(ReplicaRequest::Hint {
            owner,
            key: b"k".to_vec(),
            clock: Clock::new(),
        });
        assert!(
            matches!(&hint, Response::Error(e) if e.kind == ErrorKind::Unavailable),
            "{hint:?}"
        );
    }

    /// The replica's checks apply to what the hint holds: a context naming
    /// more of the hint's actor's writes than it made, the sibling limit;
    /// and a node without hints stands in for no one.
    #[test]
    fn a_stand_ins_write_is_checked_against_its_hint() {
        let (book, owner) = (hint_book(), NodeId::new("o").unwrap());
        let s = standing_in("a.0001", &book, 2);
        let value = |v: &str| Payload::Value(v.as_bytes().to_vec());
        let first = s
            .update_for(&owner, b"k", &VersionVector::new(), value("v1"), false)
            .unwrap();
        let forged = VersionVector::from_pairs([(key_actor(&first), 5)]);
        let err = s
            .update_for(&owner, b"k", &forged, value("v2"), false)
            .unwrap_err();
        assert!(
            matches!(err, ReplicaError::ImpossibleContext { made: 1, .. }),
            "{err}"
        );
        s.update_for(&owner, b"k", &VersionVector::new(), value("v2"), false)
            .unwrap();
        let err = s
            .update_for(&owner, b"k", &VersionVector::new(), value("v3"), false)
            .unwrap_err();
        assert!(
            matches!(err, ReplicaError::TooManySiblings { limit: 2, .. }),
            "{err}"
        );
        // An overwrite supersedes both: all the hint holds.
        let over = s
            .update_for(&owner, b"k", &VersionVector::new(), value("v4"), true)
            .unwrap();
        assert_eq!(over.values().collect::<Vec<_>>(), [b"v4".as_slice()]);
        assert_eq!(book.read(&owner, b"k").unwrap(), Some(over));

        let err = service(10)
            .update_for(&owner, b"k", &VersionVector::new(), value("v"), false)
            .unwrap_err();
        assert_eq!(err, ReplicaError::Hint(HintError::Disabled));
    }

    #[test]
    fn only_the_epochs_own_per_key_actors_are_continued() {
        let n = |s: &str| NodeId::new(s).unwrap();
        let a = n("a.0000abcd");
        assert!(is_key_actor_of(&n("a.0000abcd.12345678"), &a));
        assert!(
            !is_key_actor_of(&n("a.0000abcd"), &a),
            "the epoch actor itself"
        );
        assert!(
            !is_key_actor_of(&n("a.0000abce.12345678"), &a),
            "another epoch"
        );
        assert!(!is_key_actor_of(&n("a.0000abcd.1234567"), &a), "7 digits");
        assert!(!is_key_actor_of(&n("a.0000abcd.1234567g"), &a));
        assert!(!is_key_actor_of(&n("a.0000abcd.12345678.9"), &a));
    }
}
