//! Dotted version vector sets: how ringkv tracks causality per key.
//!
//! Dynamo (§4.4) attaches a vector clock to every object so that replicas can
//! tell a newer version from a concurrent one, and keeps concurrent versions as
//! *siblings* for the client to reconcile. Plain vector clocks indexed by the
//! coordinating server either lose concurrent writes or grow siblings without
//! bound when two clients write through the same server. Dotted version
//! vectors (Preguiça, Baquero, Almeida et al., "Dotted Version Vectors:
//! Logical Clocks for Optimistic Replication", 2010; the compact *DVV set*
//! form Riak 2.0 adopted) fix both: each sibling is identified by a single
//! event, its [`Dot`], while the causal history shared by all siblings is a
//! version vector.
//!
//! ## Representation
//! A [`Clock`] holds, for every node that ever coordinated a write of the key,
//! an [`Entry`] `(node, counter, payloads)`: the node's events `1..=counter` are
//! all known, and the newest `payloads.len()` of them are still live siblings
//! (newest first). For example `{(a, 3, [v3]), (b, 2, [w2, w1])}` says: events
//! a1..a3 and b1..b2 are known; a1 and a2 were superseded; a3, b1 and b2 are
//! concurrent siblings.
//!
//! The live events of one node always form a suffix of its history: a write
//! with context `C` discards exactly the events `<= C[node]`, a prefix. This is
//! what lets one counter and a list stand for a set of dots.
//!
//! ## Operations
//! - [`Clock::update`] is the coordinator's write: it discards every sibling the
//!   client's [`VersionVector`] context covers and adds the new value under a
//!   fresh dot `(coordinator, counter + 1)`.
//! - [`Clock::sync`] merges two replicas' clocks. It is commutative,
//!   associative and idempotent (a join-semilattice, as in Dynamo's
//!   reconciliation), so replicas may exchange state in any order, any number
//!   of times, and converge. A sibling is dropped only when one side knows an
//!   event that causally supersedes it; concurrent siblings always survive.
//! - [`Clock::context`] is the version vector a reader gets back: writing with
//!   it supersedes every sibling that reader saw, leaving exactly one value.
//!
//! Deletes are writes of [`Payload::Tombstone`], so they order and merge like
//! any other write.

use crate::error::InvalidInput;
use crate::node_id::NodeId;

/// The most entries (actors) a clock or context may have. A node adds one
/// actor to a key per epoch, and one each time it writes the key again
/// after removing its copy (see `ReplicaService` in the coordinator; so a
/// key written before per-key actors gains one more from each node that
/// writes it after); a key whose history names more actors than this is
/// refused rather than allowed to grow every token and frame without
/// bound.
pub const CLOCK_ENTRIES_MAX: usize = 1024;
/// The most live siblings a clock may hold, all actors together: past it a
/// write or a merge is refused (`wire::clock_over_limit`), as past the
/// actor or byte limits, so no stored clock is one that no request could
/// carry. Requests are checked on their archived bytes, before decoding,
/// since a frame of tiny siblings would decode to several times its size
/// in memory. A replica's own writes stop far sooner (`--max-siblings`, at
/// most `SIBLINGS_CONFIG_MAX`), so only merges of many replicas' blind
/// writes could come near it.
pub const CLOCK_PAYLOADS_MAX: usize = 65_536;
/// The highest `--max-siblings`: N replicas' worth of it, merged, stays
/// under [`CLOCK_PAYLOADS_MAX`] for N up to 6.
pub const SIBLINGS_CONFIG_MAX: usize = 10_000;
/// An error if a `what` (clock, version vector) names more than
/// [`CLOCK_ENTRIES_MAX`] actors.
fn check_actors(actors: usize, what: &str) -> Result<(), InvalidInput> {
    if actors > CLOCK_ENTRIES_MAX {
        return Err(InvalidInput::new(format!(
            "{what} names {actors} actors; the limit is {CLOCK_ENTRIES_MAX}"
        )));
    }
    Ok(())
}

/// Counters above this are refused as implausible, so `counter + 1` can never
/// overflow whatever a peer or a token claims.
pub const COUNTER_MAX: u64 = u64::MAX / 2;

/// One write event: the `counter`-th write of a key coordinated by `node`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    pub node: NodeId,
    pub counter: u64,
}

/// A causal history summarised as, per node, the number of that node's events
/// seen. Invariant: entries sorted by node, unique, every counter > 0.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct VersionVector {
    entries: Vec<(NodeId, u64)>,
}

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a vector from `(node, counter)` pairs in any order, keeping the
    /// highest counter per node and leaving out zeros.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (NodeId, u64)>) -> Self {
        let mut vv = VersionVector::new();
        for (node, counter) in pairs {
            vv.raise(&node, counter);
        }
        vv
    }

    /// The number of `node`'s events this history includes.
    pub fn get(&self, node: &NodeId) -> u64 {
        match self.entries.binary_search_by(|(n, _)| n.cmp(node)) {
            Ok(i) => self.entries[i].1,
            Err(_) => 0,
        }
    }

    /// Whether the event `dot` is part of this history.
    pub fn covers(&self, dot: &Dot) -> bool {
        dot.counter <= self.get(&dot.node)
    }

    /// Raises `node`'s counter to at least `counter`.
    pub fn raise(&mut self, node: &NodeId, counter: u64) {
        if counter == 0 {
            return;
        }
        match self.entries.binary_search_by(|(n, _)| n.cmp(node)) {
            Ok(i) => self.entries[i].1 = self.entries[i].1.max(counter),
            Err(i) => self.entries.insert(i, (node.clone(), counter)),
        }
    }

    /// Pointwise maximum: the union of two histories.
    pub fn merge(&mut self, other: &VersionVector) {
        for (node, counter) in &other.entries {
            self.raise(node, *counter);
        }
    }

    /// Whether every event of `other` is in this history.
    pub fn descends(&self, other: &VersionVector) -> bool {
        other.entries.iter().all(|(n, c)| self.get(n) >= *c)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, u64)> {
        self.entries.iter().map(|(n, c)| (n, *c))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Checks the invariant on a vector that came from outside (a token, the
    /// network).
    pub fn validate(&self) -> Result<(), InvalidInput> {
        for pair in self.entries.windows(2) {
            if pair[0].0 >= pair[1].0 {
                return Err(InvalidInput::new(
                    "version vector entries are not sorted and unique",
                ));
            }
        }
        if self
            .entries
            .iter()
            .any(|(_, c)| *c == 0 || *c > COUNTER_MAX)
        {
            return Err(InvalidInput::new(
                "version vector has a zero or implausibly large counter",
            ));
        }
        check_actors(self.entries.len(), "version vector")?;
        for (node, _) in &self.entries {
            NodeId::new(node.as_str())?;
        }
        Ok(())
    }
}

/// What a write stored: a value, or the tombstone a delete leaves.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum Payload {
    Value(Vec<u8>),
    Tombstone,
}

impl Payload {
    pub fn value(&self) -> Option<&[u8]> {
        match self {
            Payload::Value(v) => Some(v),
            Payload::Tombstone => None,
        }
    }
}

/// One node's share of a [`Clock`]: events `1..=counter` are known and the
/// newest `payloads.len()` of them are live (newest first).
#[derive(Debug, Clone, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Entry {
    pub node: NodeId,
    pub counter: u64,
    pub payloads: Vec<Payload>,
}

/// A live sibling: a payload and the event that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sibling<'a> {
    pub dot: Dot,
    pub payload: &'a Payload,
}

/// The versioned state of one key on one replica (a DVV set).
///
/// Invariants: entries sorted by node and unique; `payloads.len() <= counter`.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Clock {
    entries: Vec<Entry>,
}

impl Clock {
    pub fn new() -> Self {
        Self::default()
    }

    /// The causal history of every version this clock has seen: what a reader
    /// gets back as its context.
    pub fn context(&self) -> VersionVector {
        VersionVector {
            entries: self
                .entries
                .iter()
                .filter(|e| e.counter > 0)
                .map(|e| (e.node.clone(), e.counter))
                .collect(),
        }
    }

    /// The live siblings, newest first within each node.
    pub fn siblings(&self) -> impl Iterator<Item = Sibling<'_>> {
        self.entries.iter().flat_map(|e| {
            e.payloads
                .iter()
                .enumerate()
                .map(move |(age, payload)| Sibling {
                    dot: Dot {
                        node: e.node.clone(),
                        counter: e.counter - age as u64,
                    },
                    payload,
                })
        })
    }

    pub fn sibling_count(&self) -> usize {
        self.entries.iter().map(|e| e.payloads.len()).sum()
    }

    /// How many of `node`'s events this clock knows.
    pub fn counter(&self, node: &NodeId) -> u64 {
        self.find(node)
            .map(|i| self.entries[i].counter)
            .unwrap_or(0)
    }

    /// The number of actors the clock names.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// An upper estimate of the encoded size in bytes, for size limits.
    pub fn approx_size(&self) -> usize {
        self.entries
            .iter()
            .map(|e| {
                96 + e.node.as_str().len()
                    + e.payloads
                        .iter()
                        .map(|p| 16 + p.value().map_or(0, <[u8]>::len))
                        .sum::<usize>()
            })
            .sum::<usize>()
            + 64
    }

    /// The live values, leaving out tombstones.
    pub fn values(&self) -> impl Iterator<Item = &[u8]> {
        self.entries
            .iter()
            .flat_map(|e| e.payloads.iter().filter_map(Payload::value))
    }

    /// How many siblings [`Clock::update`] with `context` would leave,
    /// counting the new one. Lets a replica refuse a write before doing it.
    pub fn sibling_count_after_update(&self, context: &VersionVector) -> usize {
        let surviving: usize = self
            .entries
            .iter()
            .map(|e| {
                let live = e.counter.saturating_sub(context.get(&e.node));
                // Clamped as `update` does (a 32-bit target).
                e.payloads.len().min(live.min(usize::MAX as u64) as usize)
            })
            .sum();
        surviving + 1
    }

    /// The coordinator's write: discards every sibling `context` covers and
    /// adds `payload` under a new dot of `coordinator`, which it returns.
    ///
    /// The new counter is above every event of `coordinator` this replica or
    /// the client has seen; since a coordinator always applies its own writes
    /// locally first, dots of one node are minted contiguously.
    ///
    /// The caller must not mint past [`COUNTER_MAX`] (a replica retires an
    /// actor that reaches it): the result would fail
    /// [`validate`](Self::validate).
    pub fn update(
        &mut self,
        context: &VersionVector,
        payload: Payload,
        coordinator: &NodeId,
    ) -> Dot {
        for entry in &mut self.entries {
            let seen = context.get(&entry.node);
            let live = entry.counter.saturating_sub(seen);
            entry
                .payloads
                .truncate(live.min(usize::MAX as u64) as usize);
            entry.counter = entry.counter.max(seen);
        }
        for (node, counter) in context.iter() {
            if let Err(i) = self.find(node) {
                self.entries.insert(
                    i,
                    Entry {
                        node: node.clone(),
                        counter,
                        payloads: Vec::new(),
                    },
                );
            }
        }
        let i = match self.find(coordinator) {
            Ok(i) => i,
            Err(i) => {
                self.entries.insert(
                    i,
                    Entry {
                        node: coordinator.clone(),
                        counter: 0,
                        payloads: Vec::new(),
                    },
                );
                i
            }
        };
        let entry = &mut self.entries[i];
        debug_assert!(entry.counter < COUNTER_MAX, "minted past COUNTER_MAX");
        entry.counter += 1;
        entry.payloads.insert(0, payload);
        Dot {
            node: coordinator.clone(),
            counter: entry.counter,
        }
    }

    /// Merges another replica's clock of the same key into this one.
    ///
    /// Laws (property-tested): `a.sync(b) == b.sync(a)`,
    /// `(a.sync(b)).sync(c) == a.sync(b.sync(c))`, `a.sync(a) == a`. A sibling
    /// survives unless the other side knows its event and no longer has it
    /// live, i.e. some write that side knows superseded it.
    pub fn sync(&mut self, other: &Clock) {
        let mut merged = Vec::with_capacity(self.entries.len().max(other.entries.len()));
        let mut mine = std::mem::take(&mut self.entries).into_iter().peekable();
        let mut theirs = other.entries.iter().peekable();
        loop {
            match (mine.peek(), theirs.peek()) {
                (None, None) => break,
                (Some(_), None) => merged.push(mine.next().expect("peeked")),
                (None, Some(_)) => merged.push(theirs.next().expect("peeked").clone()),
                (Some(a), Some(b)) => match a.node.cmp(&b.node) {
                    std::cmp::Ordering::Less => merged.push(mine.next().expect("peeked")),
                    std::cmp::Ordering::Greater => {
                        merged.push(theirs.next().expect("peeked").clone())
                    }
                    std::cmp::Ordering::Equal => {
                        let a = mine.next().expect("peeked");
                        let b = theirs.next().expect("peeked");
                        merged.push(merge_entry(a, b));
                    }
                },
            }
        }
        self.entries = merged;
    }

    /// Whether this clock has seen every event `other` has and keeps no
    /// sibling that `other` has superseded: syncing `other` in would change
    /// nothing. Read repair uses it to find stale replicas.
    pub fn descends(&self, other: &Clock) -> bool {
        let mut merged = self.clone();
        merged.sync(other);
        merged == *self
    }

    /// Checks the invariants on a clock that came from outside (disk, network).
    pub fn validate(&self) -> Result<(), InvalidInput> {
        for pair in self.entries.windows(2) {
            if pair[0].node >= pair[1].node {
                return Err(InvalidInput::new("clock entries are not sorted and unique"));
            }
        }
        check_actors(self.entries.len(), "clock")?;
        for e in &self.entries {
            NodeId::new(e.node.as_str())?;
            // `update` adds an entry only with the event it counts, and
            // contexts name no counter 0: such an entry came from outside.
            if e.counter == 0 {
                return Err(InvalidInput::new(format!(
                    "clock entry for {} has counter 0 (no events)",
                    e.node
                )));
            }
            if e.counter > COUNTER_MAX {
                return Err(InvalidInput::new(format!(
                    "clock entry for {} has an implausible counter {}",
                    e.node, e.counter
                )));
            }
            if e.payloads.len() as u64 > e.counter {
                return Err(InvalidInput::new(format!(
                    "clock entry for {} has {} siblings but only {} events",
                    e.node,
                    e.payloads.len(),
                    e.counter
                )));
            }
        }
        Ok(())
    }

    fn find(&self, node: &NodeId) -> Result<usize, usize> {
        self.entries.binary_search_by(|e| e.node.cmp(node))
    }
}

impl Clock {
    /// A clock of `siblings` concurrent tombstones of `node` (tests of the
    /// limits, which `update` would take quadratic time to reach).
    #[cfg(test)]
    pub(crate) fn of_tombstones(node: &NodeId, siblings: usize) -> Clock {
        Clock {
            entries: vec![Entry {
                node: node.clone(),
                counter: siblings as u64,
                payloads: vec![Payload::Tombstone; siblings],
            }],
        }
    }
}

impl ArchivedClock {
    /// Checks the counts a network clock may have ([`CLOCK_ENTRIES_MAX`]
    /// actors, [`CLOCK_PAYLOADS_MAX`] siblings) on its archived form,
    /// before decoding allocates for each.
    pub fn check_counts(&self) -> Result<(), InvalidInput> {
        check_actors(self.entries.len(), "clock")?;
        let payloads: usize = self.entries.iter().map(|e| e.payloads.len()).sum();
        if payloads > CLOCK_PAYLOADS_MAX {
            return Err(InvalidInput::new(format!(
                "clock holds {payloads} siblings; the limit is {CLOCK_PAYLOADS_MAX}"
            )));
        }
        Ok(())
    }
}

impl ArchivedVersionVector {
    /// Checks the number of actors ([`CLOCK_ENTRIES_MAX`]) on the archived
    /// form, before decoding allocates for each.
    pub fn check_counts(&self) -> Result<(), InvalidInput> {
        check_actors(self.entries.len(), "version vector")
    }
}

/// Merges two entries of the same node. Each side's live events form the
/// window `(counter - len, counter]`; an event both sides know stays live only
/// if it is live on both, an event only the newer side knows keeps its state.
fn merge_entry(a: Entry, b: &Entry) -> Entry {
    let a_floor = a.counter - a.payloads.len() as u64;
    let b_floor = b.counter - b.payloads.len() as u64;
    if a.counter == b.counter {
        // The same events, live where live on both. Each dot names one
        // write, so the payloads agree; should a dot ever carry two (a dot
        // minted twice), both sides keep the greater, so they still
        // converge and anti-entropy does not repair the key every round.
        let live = a.payloads.len().min(b.payloads.len());
        let mut a = a;
        a.payloads.truncate(live);
        if b.payloads[..live] > a.payloads[..] {
            a.payloads = b.payloads[..live].to_vec();
        }
        return a;
    }
    if a.counter > b.counter {
        if a_floor >= b_floor {
            a
        } else {
            let keep = (a.counter - b_floor) as usize;
            let mut a = a;
            a.payloads.truncate(keep);
            a
        }
    } else if b_floor >= a_floor {
        b.clone()
    } else {
        let keep = (b.counter - a_floor) as usize;
        Entry {
            node: b.node.clone(),
            counter: b.counter,
            payloads: b.payloads[..keep].to_vec(),
        }
    }
}

#[cfg(test)]
mod tests;
