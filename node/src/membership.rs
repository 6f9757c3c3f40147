//! Who is in the cluster, remembered across restarts.
//!
//! A new node joins by sending
//! [`Request::Join`](ringkv_core::wire::Request::Join) to a seed; the seed
//! checks that the node's id is not taken by another address and that it
//! agrees on N, adds it, and answers with the whole member list and the cluster id. The
//! new node then announces itself to every member it learned of, so all of
//! them add it (a seed serialises joins, so of two nodes joining at once the
//! second learns of the first and announces to it). Every node stores the
//! cluster record (id, N, members) in its `meta` column family, so a restart,
//! even of every node at once, needs no seeds: the node announces itself to
//! the members it remembers.
//!
//! Every 5 s each node also announces itself to one random live member and
//! merges that member's list into its own (see `server::exchange_membership`),
//! so a member that was unreachable while another node joined still learns of
//! it.
//!
//! **Removal** (`ringkv remove`, Riak's force-remove, Cassandra's
//! `removenode`): any member takes a node out of its list and tells the
//! others. The record keeps the removed ids for good, a grow-only set beside
//! the member list, so the exchange merges two records by union and a
//! member list from before the removal cannot bring the node back. A
//! removed node that is still running learns of it from its next exchange
//! and stops; started again it refuses to run. Its key ranges pass to the
//! next nodes on the ring, which anti-entropy then fills from the other
//! replicas.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use ringkv_core::wire::{
    decode_cluster_record, decode_cluster_record_v2, decode_cluster_record_v3,
    encode_cluster_record, ErrorKind, JoinReply, JoinRequest, Member, Response, REMOVED_IDS_MAX,
    RING_VNODES_HARD_MAX, RING_VNODES_MAX,
};
use ringkv_core::NodeId;
use ringkv_ring::Ring;

use crate::error::NodeError;
use crate::storage::Storage;

const META_NODE_ID: &str = "node_id";
/// Where the cluster record lives. Bump the version with any change to
/// `JoinReply` or `Member`: an archive of another layout cannot be read.
const META_CLUSTER: &str = "cluster_record_v4";
/// Where ringkv versions before incarnations kept it (`JoinReplyV3`); read
/// once and rewritten under [`META_CLUSTER`].
const META_CLUSTER_V3: &str = "cluster_record_v3";
/// Where ringkv versions before removal kept it (`JoinReplyV2`); read once
/// and rewritten under [`META_CLUSTER`].
const META_CLUSTER_V2: &str = "cluster_record_v2";
/// Where ringkv versions before 0.1's regions kept it (as a `Response`).
const META_CLUSTER_V1: &str = "cluster";

/// The cluster as this node knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterRecord {
    pub cluster_id: u64,
    pub replicas: usize,
    pub members: BTreeMap<NodeId, Member>,
    /// Ids removed for good; none of them is in `members`.
    pub removed: BTreeSet<NodeId>,
}

impl ClusterRecord {
    pub fn ring(&self) -> Result<Ring, NodeError> {
        Ring::new(
            self.members.values().map(|m| (m.id.clone(), m.vnodes)),
            self.replicas,
        )
        .map_err(|e| NodeError::Config {
            reason: e.to_string(),
        })
    }

    pub(crate) fn reply(&self) -> JoinReply {
        JoinReply {
            cluster_id: self.cluster_id,
            replicas: self.replicas as u32,
            members: self.members.values().cloned().collect(),
            removed: self.removed.iter().cloned().collect(),
        }
    }

    /// Adds what `reply` knows: its removals, and its members that are not
    /// removed, an entry replacing ours only if it [supersedes](supersedes)
    /// it (a later incarnation: a member's entry changes only when it
    /// restarts, so a list from one that missed the restart cannot bring
    /// the old address back). The result is the same whatever order
    /// records meet in.
    ///
    /// Refused whole (`self` unchanged; the error says why) if the union
    /// would pass `RING_VNODES_HARD_MAX` or `REMOVED_IDS_MAX`: each record
    /// is checked on arrival, but two within it can still add up past them.
    fn absorb(&mut self, reply: JoinReply, me: &NodeId) -> Result<(), String> {
        let mut merged = self.clone();
        merged.absorb_unchecked(reply, me);
        let past = if merged.vnodes() > RING_VNODES_HARD_MAX {
            format!(
                "the member list answered would give the cluster {} virtual nodes, more than {RING_VNODES_HARD_MAX}",
                merged.vnodes()
            )
        } else if merged.removed.len() > REMOVED_IDS_MAX {
            format!(
                "the member list answered would give the cluster {} removed ids, more than {REMOVED_IDS_MAX}",
                merged.removed.len()
            )
        } else {
            *self = merged;
            return Ok(());
        };
        tracing::warn!("refused a peer's member list: {past}");
        Err(past)
    }

    /// The cluster's virtual nodes.
    fn vnodes(&self) -> u64 {
        self.members.values().map(|m| u64::from(m.vnodes)).sum()
    }

    fn absorb_unchecked(&mut self, reply: JoinReply, me: &NodeId) {
        self.removed.extend(reply.removed);
        for m in reply.members {
            // Our own entry is authoritative about ourselves.
            if m.id == *me {
                continue;
            }
            if self
                .members
                .get(&m.id)
                .is_none_or(|ours| supersedes(&m, ours))
            {
                self.members.insert(m.id.clone(), m);
            }
        }
        let removed = &self.removed;
        self.members.retain(|id, _| !removed.contains(id));
    }
}

/// Membership state, shared by the server and the transport.
pub struct Membership {
    /// This node's entry as it started (`me()` gives it with the current
    /// incarnation).
    me: Member,
    /// This node's incarnation: the start's, raised past any a member still
    /// holds for an earlier life of this id (a data dir started afresh).
    incarnation: AtomicU64,
    /// See [`Membership::previous_addr`].
    previous_addr: Option<String>,
    storage: Arc<Storage>,
    /// `None` until this node has formed or joined a cluster. Replaced
    /// only once the new record is stored (see [`RecordChange`]).
    record: RwLock<Option<ClusterRecord>>,
    /// Held by the one change of `record` under way.
    changes: Mutex<()>,
}

/// A change of the record in progress: it holds `Membership::changes`, so
/// changes run one at a time, and works on a copy of the record, which it
/// puts in place when dropped (if it was borrowed mutably). A change
/// stores the new record (two fsyncs) before it writes the copy, as before;
/// what differs is that the readers of the record (every request's
/// address lookup, on the async workers) wait only for the swap, not for
/// the fsyncs.
struct RecordChange<'a> {
    _one_at_a_time: MutexGuard<'a, ()>,
    published: &'a RwLock<Option<ClusterRecord>>,
    record: Option<ClusterRecord>,
    touched: bool,
}

impl Deref for RecordChange<'_> {
    type Target = Option<ClusterRecord>;

    fn deref(&self) -> &Self::Target {
        &self.record
    }
}

impl DerefMut for RecordChange<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.touched = true;
        &mut self.record
    }
}

impl Drop for RecordChange<'_> {
    fn drop(&mut self) {
        if self.touched {
            *self.published.write().unwrap_or_else(|p| p.into_inner()) = self.record.take();
        }
    }
}

impl Membership {
    /// Loads what `storage` remembers and checks it against this start's
    /// flags: the data dir of a cluster member must belong to this node id,
    /// and an explicit `--replicas` must match the cluster's N.
    ///
    /// The id is bound to the data dir with the first cluster record (see
    /// [`persist`](Self::persist)), not before: a start that never joined
    /// stored no data, so it must not keep the next start, perhaps with the
    /// other `--id` a seed asked for, from using the dir.
    pub fn load(
        storage: Arc<Storage>,
        me: Member,
        replicas_flag: Option<usize>,
    ) -> Result<Self, NodeError> {
        let stored = match storage.meta_get(META_CLUSTER)? {
            Some(bytes) => Some(decode_cluster_record(&bytes)),
            None => match storage.meta_get(META_CLUSTER_V3)? {
                Some(bytes) => Some(decode_cluster_record_v3(&bytes)),
                None => storage
                    .meta_get(META_CLUSTER_V2)?
                    .map(|bytes| decode_cluster_record_v2(&bytes)),
            },
        };
        let mut record = match stored {
            None if storage.meta_get(META_CLUSTER_V1)?.is_some() => {
                return Err(NodeError::Storage {
                    path: storage.path().to_path_buf(),
                    reason: "this data dir was written by an older ringkv whose cluster record this version cannot read; start the node on a new --data-dir and let anti-entropy refill it".into(),
                })
            }
            None => None,
            Some(decoded) => match decoded {
                Ok(reply) => Some(record_from(reply)),
                Err(e) => {
                    return Err(NodeError::Storage {
                        path: storage.path().to_path_buf(),
                        reason: format!("the stored cluster record is corrupt or past this version's limits: {e}"),
                    })
                }
            },
        };
        if let (Some(stored), Some(_)) = (storage.meta_get(META_NODE_ID)?, &record) {
            let stored = String::from_utf8_lossy(&stored).into_owned();
            if stored != me.id.as_str() {
                return Err(NodeError::IdMismatch {
                    path: storage.path().to_path_buf(),
                    stored,
                    given: me.id.to_string(),
                });
            }
        }
        if record.as_ref().is_some_and(|r| r.removed.contains(&me.id)) {
            return Err(NodeError::Removed {
                id: me.id.to_string(),
            });
        }
        if let (Some(r), Some(given)) = (&record, replicas_flag) {
            if r.replicas != given {
                return Err(NodeError::ReplicasMismatch {
                    cluster: r.replicas,
                    given,
                });
            }
        }
        // A restart may come with a new address (e.g. port 0 in tests).
        let previous_addr = record
            .as_ref()
            .and_then(|r| r.members.get(&me.id))
            .map(|m| m.addr.clone())
            .filter(|addr| *addr != me.addr);
        if let Some(r) = &mut record {
            // Or more --vnodes, which its peers would refuse past the limit.
            if let Some(total) = vnodes_past_limit(r, &me, RING_VNODES_MAX) {
                return Err(NodeError::Config {
                    reason: vnodes_refusal(&me, total, RING_VNODES_MAX),
                });
            }
            r.members.insert(me.id.clone(), me.clone());
        }
        let membership = Membership {
            incarnation: AtomicU64::new(me.incarnation),
            previous_addr,
            me,
            storage,
            record: RwLock::new(record),
            changes: Mutex::new(()),
        };
        // A new address is stored only once the start has checked that no
        // other process answers at the old one (`confirm_address`): stored
        // now, a refused twin's next start would find no old address to ask.
        if let (Some(r), None) = (membership.record(), &membership.previous_addr) {
            membership.persist(&r)?;
        }
        Ok(membership)
    }

    /// Stores this node's entry at its new address (see
    /// [`Membership::previous_addr`]), once the start has found that no
    /// other process answers as this node at the old one.
    pub fn confirm_address(&self) -> Result<(), NodeError> {
        let _one_at_a_time = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        match self.record() {
            Some(r) => self.persist(&r),
            None => Ok(()),
        }
    }

    /// The address the stored record gave this node before this start, if
    /// it was another than this run's.
    pub fn previous_addr(&self) -> Option<&str> {
        self.previous_addr.as_deref()
    }

    /// This node's entry as it announces it.
    pub fn me(&self) -> Member {
        Member {
            incarnation: self.incarnation.load(Ordering::SeqCst),
            ..self.me.clone()
        }
    }

    /// The cluster record, once this node is in a cluster.
    pub fn record(&self) -> Option<ClusterRecord> {
        self.record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The cluster's id, once this node is in one.
    pub fn cluster_id(&self) -> Option<u64> {
        self.record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|record| record.cluster_id)
    }

    /// Whether `id` has been removed from the cluster, as this node knows it.
    pub fn is_removed(&self, id: &NodeId) -> bool {
        self.record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|r| r.removed.contains(id))
    }

    /// Forms a new one-node cluster.
    pub fn form(&self, cluster_id: u64, replicas: usize) -> Result<(), NodeError> {
        let record = ClusterRecord {
            cluster_id,
            replicas,
            members: BTreeMap::from([(self.me.id.clone(), self.me())]),
            removed: BTreeSet::new(),
        };
        let mut change = self.change();
        self.persist(&record)?;
        *change = Some(record);
        Ok(())
    }

    /// Begins a change of the record (see [`RecordChange`]).
    fn change(&self) -> RecordChange<'_> {
        // The holder may be persisting through a write stall (`meta_put`
        // waits it out off its worker): wait the same way.
        let one_at_a_time = ringkv_core::long_wait::lock(&self.changes, &|wait| {
            crate::storage::off_the_worker(wait)
        });
        RecordChange {
            _one_at_a_time: one_at_a_time,
            published: &self.record,
            record: self.record(),
            touched: false,
        }
    }

    /// Adopts what a seed (or an announced-to member) answered. Returns
    /// whether the member list changed, or [`NodeError::Removed`] if the
    /// answer says this node was removed; the record then keeps that, so
    /// that the next start refuses at once.
    pub fn adopt(&self, reply: JoinReply) -> Result<bool, NodeError> {
        let mut guard = self.change();
        let mut record = match guard.clone() {
            Some(mine) if mine.cluster_id != reply.cluster_id => {
                return Err(NodeError::JoinRefused {
                    reason: format!(
                        "the seed belongs to cluster {:016x}, but this node's data dir belongs to cluster {:016x}",
                        reply.cluster_id, mine.cluster_id
                    ),
                })
            }
            Some(mine) => mine,
            None => ClusterRecord {
                cluster_id: reply.cluster_id,
                replicas: reply.replicas as usize,
                members: BTreeMap::new(),
                removed: BTreeSet::new(),
            },
        };
        if reply.removed.contains(&self.me.id) {
            let removed = NodeError::Removed {
                id: self.me.id.to_string(),
            };
            if guard.is_some() {
                // The removal holds even if the rest of the list is refused.
                if record.absorb(reply.clone(), &self.me.id).is_err() {
                    // Not past the limit, or the next start would refuse
                    // the record as corrupt rather than as a removal.
                    if record.removed.len() < REMOVED_IDS_MAX {
                        record.removed.insert(self.me.id.clone());
                    }
                    record.members.remove(&self.me.id);
                }
                // Stop all the same: the next start learns it again.
                if let Err(e) = self.persist(&record) {
                    tracing::warn!(error = %e, "could not store this node's removal");
                }
                *guard = Some(record);
            }
            return Err(removed);
        }
        // A member still holding an entry for an earlier life of this id
        // (its data dir started afresh) would ignore this one's entries
        // until its incarnation passed that one's: pass it now.
        if let Some(old) = reply.members.iter().find(|m| m.id == self.me.id) {
            let mine = self.me();
            let passed = old.incarnation > mine.incarnation
                || (old.incarnation == mine.incarnation && *old != mine);
            if passed {
                let raised = old.incarnation.saturating_add(1);
                self.storage.raise_incarnation(raised)?;
                let was = self.incarnation.swap(raised, Ordering::SeqCst);
                // Once is the rule (a member that missed a restart can make
                // it twice). Again and again, another process runs under
                // this id (a copied data dir?), and the two keep passing each
                // other: say so, as the cluster's entry for it flips.
                if was != self.me.incarnation {
                    tracing::warn!(id = %self.me.id, incarnation = raised, "raised this node's incarnation again: if this repeats, another node runs under this node's id");
                }
            }
        }
        let before = record.clone();
        if let Err(reason) = record.absorb(reply, &self.me.id) {
            return Err(NodeError::JoinRefused { reason });
        }
        if record.removed.contains(&self.me.id) {
            // An earlier answer said so; this one has not heard yet. Putting
            // this node back among the members would store a record that
            // names it both ways, which the next start refuses as corrupt.
            return Err(NodeError::Removed {
                id: self.me.id.to_string(),
            });
        }
        record.members.insert(self.me.id.clone(), self.me());
        let changed = before != record;
        if changed {
            self.persist(&record)?;
            *guard = Some(record);
        }
        Ok(changed)
    }

    /// Serves another node's join or announcement. Returns the answer and
    /// whether the member list changed.
    pub fn handle_join(&self, join: JoinRequest) -> (Response, bool) {
        let mut guard = self.change();
        let Some(record) = guard.as_mut() else {
            return (
                Response::error(
                    ErrorKind::NotServing,
                    format!("{} is not in a cluster yet", self.me.id),
                ),
                false,
            );
        };
        if let Some(cluster_id) = join.cluster_id {
            if cluster_id != record.cluster_id {
                return (
                    Response::error(
                        ErrorKind::Refused,
                        format!(
                            "{} belongs to another cluster ({:016x}) than {} ({:016x})",
                            join.member.id, cluster_id, self.me.id, record.cluster_id
                        ),
                    ),
                    false,
                );
            }
        }
        if let Some(replicas) = join.replicas {
            if replicas as usize != record.replicas {
                return (
                    Response::error(
                        ErrorKind::Refused,
                        format!(
                            "the cluster replicates every key {} times, but {} was started with --replicas {replicas}",
                            record.replicas, join.member.id
                        ),
                    ),
                    false,
                );
            }
        }
        if join.member.id == self.me.id {
            // Only a second process under this id would announce it; taking
            // its entry would put another address in for this node.
            return (
                Response::error(
                    ErrorKind::Refused,
                    format!(
                        "node id {} is this node's own; give the new node another --id",
                        join.member.id
                    ),
                ),
                false,
            );
        }
        if record.removed.contains(&join.member.id) {
            // Not an error: the answer lists it as removed, which is how a
            // removed node still running learns that it must stop.
            return (Response::Joined(record.reply()), false);
        }

        if let Some(existing) = record.members.get(&join.member.id) {
            if existing.addr != join.member.addr && join.cluster_id.is_none() {
                return (
                    Response::error(
                        ErrorKind::Refused,
                        format!(
                            "node id {} is already a member at {}; give the new node another --id",
                            join.member.id, existing.addr
                        ),
                    ),
                    false,
                );
            }
        }
        if join.cluster_id.is_none() {
            // A new node at a member's address would answer for it (its
            // pings, its replica writes): the member must be removed first.
            if let Some(holder) = record
                .members
                .values()
                .find(|m| m.addr == join.member.addr && m.id != join.member.id)
            {
                return (
                    Response::error(
                        ErrorKind::Refused,
                        format!(
                            "{} is member {}'s address; start {} there again, or take it out first (ringkv remove {}), or give the new node another --listen address",
                            holder.addr, holder.id, holder.id, holder.id
                        ),
                    ),
                    false,
                );
            }
        }
        // An announce that arrives after a newer one from the same node (a
        // restart) is stale; the answer still tells the announcer the list.
        let changed = record
            .members
            .get(&join.member.id)
            .is_none_or(|existing| supersedes(&join.member, existing));
        // The limit stops new nodes. A member's announce always gets in
        // (under the hard limit every record is checked against): two
        // seeds may each have let in a new node the other did not count,
        // and refusing their announces would leave members with different
        // rings until the exchange brought both in anyway.
        let limit = if join.cluster_id.is_none() {
            RING_VNODES_MAX
        } else {
            RING_VNODES_HARD_MAX
        };
        if let Some(total) = changed
            .then(|| vnodes_past_limit(record, &join.member, limit))
            .flatten()
        {
            return (
                Response::error(
                    ErrorKind::Refused,
                    vnodes_refusal(&join.member, total, limit),
                ),
                false,
            );
        }
        if changed {
            let mut next = record.clone();
            next.members.insert(join.member.id.clone(), join.member);
            if let Err(e) = self.persist(&next) {
                return (Response::error(ErrorKind::Internal, e.to_string()), false);
            }
            *record = next;
        }
        let reply = Response::Joined(record.reply());
        (reply, changed)
    }

    /// Takes `id` out of the cluster for good. Returns the member list
    /// afterwards and whether it changed (removing a removed node again
    /// changes nothing), or why the removal was refused: `id` is not a
    /// member, is this node (another member must do it, so that a node
    /// never acts on its own removal), or, with `enforce_n`, would leave
    /// fewer members than N. A removal passed on by another member skips
    /// that last check: it was made there, and the exchange would bring it
    /// here anyway. For the same reason it is recorded even if `id` is not a
    /// member here yet (it joined through that member): otherwise the
    /// removed node, still running, could announce itself here and be
    /// taken in until the exchange brought the removal.
    pub fn remove(
        &self,
        id: &NodeId,
        enforce_n: bool,
    ) -> Result<(JoinReply, bool), (ErrorKind, String)> {
        let mut guard = self.change();
        let Some(record) = guard.as_mut() else {
            return Err((
                ErrorKind::NotServing,
                format!("{} is not in a cluster yet", self.me.id),
            ));
        };
        if record.removed.contains(id) {
            return Ok((record.reply(), false));
        }
        if !record.members.contains_key(id) && enforce_n {
            let members: Vec<&str> = record.members.keys().map(NodeId::as_str).collect();
            return Err((
                ErrorKind::InvalidRequest,
                format!(
                    "{id} is not a member; the members are {}",
                    members.join(", ")
                ),
            ));
        }
        if *id == self.me.id {
            return Err((
                ErrorKind::Refused,
                format!("{id} cannot remove itself; ask another member"),
            ));
        }
        if enforce_n && record.members.len() - 1 < record.replicas {
            return Err((
                ErrorKind::Refused,
                format!(
                    "the cluster replicates every key {} times and has {} members; removing {id} would leave too few (add its replacement first, then remove it)",
                    record.replicas,
                    record.members.len()
                ),
            ));
        }
        if record.removed.len() >= REMOVED_IDS_MAX {
            // Every node would refuse the record that held one more.
            return Err((
                ErrorKind::Refused,
                format!(
                    "this cluster has removed {} ids, the most a cluster may; {id} stays a member",
                    record.removed.len()
                ),
            ));
        }
        let mut next = record.clone();
        next.members.remove(id);
        next.removed.insert(id.clone());
        if let Err(e) = self.persist(&next) {
            return Err((ErrorKind::Internal, e.to_string()));
        }
        *record = next;
        Ok((record.reply(), true))
    }

    /// The region `id` was started with, if any.
    pub fn region_of(&self, id: &NodeId) -> Option<String> {
        let guard = self.record.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref()?.members.get(id)?.region.clone()
    }

    /// The region of the member serving at `addr`, if one does and has a
    /// region.
    pub fn region_at(&self, addr: SocketAddr) -> Option<String> {
        let guard = self.record.read().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()?
            .members
            .values()
            .find(|m| m.addr.parse::<SocketAddr>().is_ok_and(|a| a == addr))?
            .region
            .clone()
    }

    /// Whether a member serves at an address with IP `ip`.
    pub fn has_member_at_ip(&self, ip: std::net::IpAddr) -> bool {
        let guard = self.record.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().is_some_and(|record| {
            record
                .members
                .values()
                .any(|m| m.addr.parse::<SocketAddr>().is_ok_and(|a| a.ip() == ip))
        })
    }

    /// The address of member `id`.
    pub fn addr_of(&self, id: &NodeId) -> Option<SocketAddr> {
        self.route_to(id).map(|(addr, _)| addr)
    }

    /// The address of member `id` and the cluster's id: what every call to
    /// a member needs, read under one lock.
    pub fn route_to(&self, id: &NodeId) -> Option<(SocketAddr, u64)> {
        let guard = self.record.read().unwrap_or_else(|p| p.into_inner());
        let record = guard.as_ref()?;
        let addr = record.members.get(id)?.addr.parse().ok()?;
        Some((addr, record.cluster_id))
    }

    /// A join request describing this node.
    pub fn join_request(&self, replicas_flag: Option<usize>) -> JoinRequest {
        let record = self.record();
        JoinRequest {
            member: self.me(),
            replicas: record
                .as_ref()
                .map(|r| r.replicas as u32)
                .or(replicas_flag.map(|r| r as u32)),
            cluster_id: record.map(|r| r.cluster_id),
        }
    }

    /// Stores the record, and this node's id first: a record on disk always
    /// names whose data dir it is.
    fn persist(&self, record: &ClusterRecord) -> Result<(), NodeError> {
        self.storage
            .meta_put(META_NODE_ID, self.me.id.as_str().as_bytes())?;
        self.storage
            .meta_put(META_CLUSTER, &encode_cluster_record(&record.reply()))
    }
}

/// The cluster's virtual nodes with `member` in `record` (in place of its
/// entry there, if any), if that passes `limit` and is more than now: a
/// member may always come back as it was.
fn vnodes_past_limit(record: &ClusterRecord, member: &Member, limit: u64) -> Option<u64> {
    let now = record.vnodes();
    let held = record
        .members
        .get(&member.id)
        .map_or(0, |m| u64::from(m.vnodes));
    let after = now - held + u64::from(member.vnodes);
    (after > limit && after > now).then_some(after)
}

/// Why `member` cannot join with its virtual nodes, the cluster then
/// having `total`, past `limit`.
fn vnodes_refusal(member: &Member, total: u64, limit: u64) -> String {
    format!(
        "with {} the cluster would have {total} virtual nodes, above the limit of {limit} \
         (a ring that large takes seconds to build, at every change); start it with fewer --vnodes",
        member.id
    )
}

/// Whether entry `new` replaces `held` for the same node: a later
/// incarnation does; at the same one (only a data dir started afresh gives
/// two entries one, until the node raises its count) the greater content
/// wins, so that every member picks the same whatever order they meet in.
fn supersedes(new: &Member, held: &Member) -> bool {
    // Borrowed: compared on every gossip merge, and a &str or Option<&str>
    // orders as its owned form does.
    fn content(m: &Member) -> (&str, u32, Option<&str>) {
        (&m.addr, m.vnodes, m.region.as_deref())
    }
    new.incarnation > held.incarnation
        || (new.incarnation == held.incarnation && content(new) > content(held))
}

fn record_from(reply: JoinReply) -> ClusterRecord {
    ClusterRecord {
        cluster_id: reply.cluster_id,
        replicas: reply.replicas as usize,
        members: reply
            .members
            .into_iter()
            .map(|m| (m.id.clone(), m))
            .collect(),
        removed: reply.removed.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(region: Option<&str>) -> Member {
        Member {
            id: NodeId::new("n1").unwrap(),
            addr: "127.0.0.1:7000".into(),
            vnodes: 8,
            region: region.map(String::from),
            incarnation: 1,
        }
    }

    #[test]
    fn the_cluster_record_survives_a_restart_with_regions() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
            let m = Membership::load(storage, me(Some("eu-west")), Some(3)).unwrap();
            m.form(77, 3).unwrap();
        }
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        let m = Membership::load(storage, me(Some("eu-west")), None).unwrap();
        let record = m.record().unwrap();
        assert_eq!((record.cluster_id, record.replicas), (77, 3));
        assert_eq!(
            record.members[&NodeId::new("n1").unwrap()]
                .region
                .as_deref(),
            Some("eu-west")
        );
        // Calls by address find the region of the member serving there.
        assert_eq!(
            m.region_at("127.0.0.1:7000".parse().unwrap()).as_deref(),
            Some("eu-west")
        );
        assert_eq!(m.region_at("127.0.0.1:7001".parse().unwrap()), None);
    }

    /// A start that never got into a cluster does not claim the data dir;
    /// one that did, does.
    #[test]
    fn the_data_dir_is_bound_to_an_id_by_its_first_cluster_record() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        let named = |id: &str| Member {
            id: NodeId::new(id).unwrap(),
            ..me(None)
        };
        // n1's start failed to join: nothing formed, nothing persisted.
        drop(Membership::load(storage.clone(), named("n1"), None).unwrap());
        // So the dir may be used as n2, which forms a cluster...
        let m = Membership::load(storage.clone(), named("n2"), None).unwrap();
        m.form(5, 3).unwrap();
        drop(m);
        // ...after which it is n2's.
        let err = Membership::load(storage.clone(), named("n1"), None)
            .err()
            .expect("refused");
        assert!(matches!(err, NodeError::IdMismatch { .. }), "{err}");
        assert!(Membership::load(storage, named("n2"), None).is_ok());
    }

    fn member(id: &str, port: u16) -> Member {
        Member {
            id: NodeId::new(id).unwrap(),
            addr: format!("127.0.0.1:{port}"),
            vnodes: 8,
            region: None,
            incarnation: 1,
        }
    }

    fn ids(reply: &JoinReply) -> Vec<String> {
        reply.members.iter().map(|m| m.id.to_string()).collect()
    }

    /// `me` in a cluster of n1..=n`count` (N=2), each in its own data dir.
    fn cluster_of(count: u16, me: &str) -> (Membership, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        let port = me[1..].parse::<u16>().unwrap();
        let m = Membership::load(storage, member(me, port), None).unwrap();
        m.adopt(JoinReply {
            cluster_id: 9,
            replicas: 2,
            members: (1..=count).map(|i| member(&format!("n{i}"), i)).collect(),
            removed: vec![],
        })
        .unwrap();
        (m, dir)
    }

    /// A change under way (storing the record: two fsyncs) does not hold
    /// up address lookups, which every request makes; the change is seen
    /// once it is over, not before.
    #[test]
    fn lookups_do_not_wait_for_a_change_under_way() {
        let (m, _dir) = cluster_of(3, "n1");
        let m = Arc::new(m);
        let n3 = NodeId::new("n3").unwrap();
        let mut change = m.change();
        change.as_mut().unwrap().members.remove(&n3);
        let (tx, rx) = std::sync::mpsc::channel();
        let lookup = {
            let (m, n3) = (m.clone(), n3.clone());
            std::thread::spawn(move || tx.send(m.addr_of(&n3)).unwrap())
        };
        let seen = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the lookup did not wait for the change");
        assert!(seen.is_some(), "the change is not seen before it is over");
        lookup.join().unwrap();
        drop(change);
        assert_eq!(m.addr_of(&n3), None, "and is once it is");
    }

    /// A new node cannot join at a member's address (it would answer for
    /// that member); the member itself, started afresh there, can.
    #[test]
    fn a_new_node_cannot_join_at_a_members_address() {
        let (m, _dir) = cluster_of(3, "n1");
        let join = |id: &str, port: u16| {
            m.handle_join(JoinRequest {
                member: member(id, port),
                replicas: None,
                cluster_id: None,
            })
        };
        let (answer, changed) = join("n4", 2);
        let Response::Error(e) = answer else {
            panic!("refused: {answer:?}")
        };
        assert!(!changed);
        assert!(
            e.message.contains("127.0.0.1:2 is member n2's address")
                && e.message.contains("ringkv remove n2"),
            "{}",
            e.message
        );
        assert!(matches!(join("n2", 2).0, Response::Joined(_)));
        assert!(join("n4", 4).1, "another address");
    }

    /// Joins stop where the cluster's virtual nodes would pass
    /// `RING_VNODES_MAX`; a member announcing itself again always gets in.
    #[test]
    fn joins_stop_at_the_rings_virtual_node_limit() {
        use ringkv_core::wire::VNODES_MAX;
        let (m, _dir) = cluster_of(3, "n1");
        let join = |id: &str, port: u16, vnodes: u32| {
            m.handle_join(JoinRequest {
                member: Member {
                    vnodes,
                    ..member(id, port)
                },
                replicas: None,
                cluster_id: None,
            })
        };
        // 3 × 8 and 63 × 1,024 make 64,536: 1,000 short of the limit.
        for i in 0..63u16 {
            let (answer, changed) = join(&format!("big{i}"), 1000 + i, VNODES_MAX);
            assert!(changed, "{answer:?}");
        }
        let (answer, changed) = join("one-too-many", 2000, 1001);
        let Response::Error(e) = answer else {
            panic!("refused: {answer:?}")
        };
        assert!(!changed);
        assert!(
            e.message
                .contains("65537 virtual nodes, above the limit of 65536"),
            "{}",
            e.message
        );
        assert!(join("just-fits", 2001, 1000).1, "exactly at the limit");
        // At the limit, a member's own announce (a restart) still counts,
        // and so does a stale one, and one with more virtual nodes: another
        // seed may have let it in, and refusing it here would leave the
        // members with different rings. Only the hard limit stops those.
        let (answer, _) = join("big0", 1000, VNODES_MAX);
        assert!(matches!(answer, Response::Joined(_)), "{answer:?}");
        let announced = |id: &str, port: u16, vnodes: u32, incarnation: u64| {
            m.handle_join(JoinRequest {
                member: Member {
                    vnodes,
                    incarnation,
                    ..member(id, port)
                },
                replicas: None,
                cluster_id: Some(9),
            })
        };
        let (answer, changed) = announced("n2", 2, 9, 2);
        assert!(
            changed && matches!(answer, Response::Joined(_)),
            "{answer:?}"
        );
        // 16 members that joined elsewhere fill the room above the limit
        // (one virtual node short of it), and the next is refused.
        for i in 0..16u16 {
            let vnodes = if i == 0 { VNODES_MAX - 2 } else { VNODES_MAX };
            let (answer, changed) = announced(&format!("elsewhere{i}"), 3000 + i, vnodes, 1);
            assert!(changed, "{i}: {answer:?}");
        }
        let Response::Error(e) = announced("one-more", 4000, 2, 1).0 else {
            panic!("refused past the hard limit")
        };
        assert!(
            e.message
                .contains(&format!("above the limit of {RING_VNODES_HARD_MAX}")),
            "{}",
            e.message
        );
    }

    /// A peer's list that would take the cluster past the hard limit
    /// together with ours is refused whole: each list alone passed its
    /// checks, and no node builds a ring from the union.
    #[test]
    fn a_union_past_the_hard_limit_is_refused_whole() {
        use ringkv_core::wire::VNODES_MAX;
        let (m, _dir) = cluster_of(2, "n1");
        let many = |prefix: &str, count: u16, port: u16| JoinReply {
            cluster_id: 9,
            replicas: 2,
            members: (0..count)
                .map(|i| Member {
                    vnodes: VNODES_MAX,
                    ..member(&format!("{prefix}{i}"), port + i)
                })
                .collect(),
            removed: vec![],
        };
        assert!(m.adopt(many("a", 60, 1000)).unwrap());
        let before = m.record().unwrap();
        let err = m.adopt(many("b", 30, 2000)).unwrap_err();
        assert!(err.to_string().contains("virtual nodes"), "{err}");
        assert_eq!(m.record().unwrap(), before, "nothing of it taken");
    }

    /// Likewise for removed ids: two lists within the limit each whose
    /// union passes it are refused whole, and a removal that would pass it
    /// is refused with the member kept.
    #[test]
    fn removed_ids_past_the_limit_are_refused() {
        let (m, _dir) = cluster_of(3, "n1");
        let removed = |prefix: &str, count: usize| JoinReply {
            cluster_id: 9,
            replicas: 2,
            members: vec![],
            removed: (0..count)
                .map(|i| NodeId::new(format!("{prefix}{i}")).unwrap())
                .collect(),
        };
        assert!(m.adopt(removed("a", REMOVED_IDS_MAX - 1)).unwrap());
        let before = m.record().unwrap();
        let err = m.adopt(removed("b", 2)).unwrap_err();
        assert!(err.to_string().contains("removed ids"), "{err}");
        assert_eq!(m.record().unwrap(), before, "nothing of it taken");
        // One more removal fills the set; the next is refused.
        assert!(m.adopt(removed("b", 1)).unwrap());
        let n2 = NodeId::new("n2").unwrap();
        let (kind, message) = m.remove(&n2, false).expect_err("the set is full");
        assert_eq!(kind, ErrorKind::Refused);
        assert!(message.contains("n2 stays a member"), "{message}");
        assert!(m.record().unwrap().members.contains_key(&n2));
    }

    /// A member restarted with more virtual nodes than the cluster has
    /// room for refuses to start, rather than put them in its own record.
    #[test]
    fn a_restart_past_the_virtual_node_limit_is_refused() {
        let (m, dir) = cluster_of(2, "n1");
        let big: Vec<Member> = (0..63u16)
            .map(|i| Member {
                vnodes: ringkv_core::wire::VNODES_MAX,
                ..member(&format!("big{i}"), 100 + i)
            })
            .collect();
        for b in &big {
            assert!(
                m.handle_join(JoinRequest {
                    member: b.clone(),
                    replicas: None,
                    cluster_id: None,
                })
                .1
            );
        }
        drop(m);
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        // 2 × 8 and 63 × 1,024 make 64,528: n1 at 1,024 would pass 65,536.
        let more = Member {
            vnodes: ringkv_core::wire::VNODES_MAX,
            ..member("n1", 1)
        };
        let err = Membership::load(storage.clone(), more, None)
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains("above the limit of 65536"),
            "{err}"
        );
        assert!(Membership::load(storage, member("n1", 1), None).is_ok());
    }

    #[test]
    fn a_removed_node_leaves_the_list_and_a_stale_list_cannot_bring_it_back() {
        let (m, _dir) = cluster_of(3, "n1");
        let n3 = NodeId::new("n3").unwrap();
        let (reply, changed) = m.remove(&n3, true).unwrap();
        assert!(changed);
        assert_eq!(ids(&reply), ["n1", "n2"]);
        assert_eq!(reply.removed, std::slice::from_ref(&n3));
        // Again: nothing changes, and it is not an error.
        assert!(!m.remove(&n3, true).unwrap().1);
        // A member that has not heard of it yet still lists n3; adopting
        // its list keeps n3 out.
        let stale = JoinReply {
            cluster_id: 9,
            replicas: 2,
            members: (1..=3).map(|i| member(&format!("n{i}"), i)).collect(),
            removed: vec![],
        };
        assert!(!m.adopt(stale).unwrap());
        assert_eq!(ids(&m.record().unwrap().reply()), ["n1", "n2"]);
        // n3 announcing itself is not added back; the answer tells it.
        let (answer, changed) = m.handle_join(JoinRequest {
            member: member("n3", 3),
            replicas: Some(2),
            cluster_id: Some(9),
        });
        assert!(!changed);
        let Response::Joined(told) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(told.removed, [n3]);
    }

    /// n2 restarts at a new address while n3 is cut off. n3's list, with
    /// n2's old address, must not replace what n1 learned from n2 itself;
    /// and n3 learns the new address from n1's list.
    #[test]
    fn a_list_that_missed_a_restart_cannot_bring_an_old_address_back() {
        let (n1, _d1) = cluster_of(3, "n1");
        let (n3, _d3) = cluster_of(3, "n3");
        let moved = Member {
            addr: "127.0.0.1:9002".into(),
            incarnation: 2,
            ..member("n2", 2)
        };
        let (_, changed) = n1.handle_join(JoinRequest {
            member: moved.clone(),
            replicas: Some(2),
            cluster_id: Some(9),
        });
        assert!(changed);
        let n2_at = |m: &Membership| m.record().unwrap().members[&moved.id].addr.clone();
        assert!(
            !n1.adopt(n3.record().unwrap().reply()).unwrap(),
            "nothing new"
        );
        assert_eq!(n2_at(&n1), "127.0.0.1:9002");
        assert!(n3.adopt(n1.record().unwrap().reply()).unwrap());
        assert_eq!(n2_at(&n3), "127.0.0.1:9002");
        // A late announce from before the restart changes nothing either.
        let (_, changed) = n1.handle_join(JoinRequest {
            member: member("n2", 2),
            replicas: Some(2),
            cluster_id: Some(9),
        });
        assert!(!changed);
        assert_eq!(n2_at(&n1), "127.0.0.1:9002");
    }

    /// n2's data dir started afresh: its incarnation counts from 1 again,
    /// while the others hold 5 from its earlier life. Its first answer
    /// raises it past that, so its later entries (a new address, say)
    /// are taken, and the next start continues above.
    #[test]
    fn a_node_started_afresh_takes_up_its_count_above_its_earlier_life() {
        let (n1, _d1) = cluster_of(3, "n1");
        let earlier = Member {
            incarnation: 5,
            ..member("n2", 2)
        };
        n1.handle_join(JoinRequest {
            member: earlier,
            replicas: Some(2),
            cluster_id: Some(9),
        });
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        let n2 = Membership::load(storage.clone(), member("n2", 2), None).unwrap();
        n2.adopt(n1.record().unwrap().reply()).unwrap();
        assert_eq!(n2.me().incarnation, 6);
        let (_, changed) = n1.handle_join(n2.join_request(None));
        assert!(changed, "its entry is newer than the one held");
        assert_eq!(n1.record().unwrap().members[&n2.me().id].incarnation, 6);
        // Held at its own count, it stays there.
        n2.adopt(n1.record().unwrap().reply()).unwrap();
        assert_eq!(n2.me().incarnation, 6);
        // A member that knew yet another earlier life of n2 at 6 (another
        // address) passes it again: same count, other content.
        let mut missed = n1.record().unwrap().reply();
        for m in missed.members.iter_mut().filter(|m| m.id == n2.me().id) {
            m.addr = "127.0.0.1:9999".into();
        }
        n2.adopt(missed).unwrap();
        assert_eq!(n2.me().incarnation, 7);
        // And a node takes no announce of its own id.
        let (answer, changed) = n2.handle_join(JoinRequest {
            member: Member {
                incarnation: 10,
                ..member("n2", 9)
            },
            replicas: Some(2),
            cluster_id: Some(9),
        });
        assert!(!changed);
        assert!(matches!(answer, Response::Error(e) if e.message.contains("own")));
        assert_eq!(storage.next_incarnation().unwrap(), 8);
    }

    #[test]
    fn a_member_learns_of_a_removal_from_another_members_list() {
        let (m, _dir) = cluster_of(3, "n2");
        let (other, _dir1) = cluster_of(3, "n1");
        let (told, _) = other.remove(&NodeId::new("n3").unwrap(), true).unwrap();
        assert!(m.adopt(told).unwrap(), "the removal is a change");
        let record = m.record().unwrap();
        assert_eq!(ids(&record.reply()), ["n1", "n2"]);
        assert!(record.removed.contains(&NodeId::new("n3").unwrap()));
    }

    #[test]
    fn a_removed_node_learns_it_and_refuses_to_start_again() {
        let (n3, dir) = cluster_of(3, "n3");
        let (other, _dir1) = cluster_of(3, "n1");
        let (told, _) = other.remove(&NodeId::new("n3").unwrap(), true).unwrap();
        let err = n3.adopt(told.clone()).unwrap_err();
        assert!(matches!(err, NodeError::Removed { .. }), "{err}");
        // It keeps the news, so that the next start refuses at once.
        assert!(n3
            .record()
            .unwrap()
            .removed
            .contains(&NodeId::new("n3").unwrap()));
        // An answer from a member that has not heard of the removal yet
        // (announces go out to all at once) does not put n3 back.
        let (stale, _dir2) = cluster_of(3, "n2");
        let stale = stale.record().unwrap().reply();
        let err = n3.adopt(stale).unwrap_err();
        assert!(matches!(err, NodeError::Removed { .. }), "{err}");
        let record = n3.record().unwrap();
        assert!(!record.members.contains_key(&NodeId::new("n3").unwrap()));
        drop(n3);
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        let err = Membership::load(storage, member("n3", 3), None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("was removed"), "{err}");
        assert!(err.to_string().contains("new --id"), "{err}");
    }

    #[test]
    fn removal_is_refused_for_strangers_for_oneself_and_below_n() {
        let (m, _dir) = cluster_of(3, "n1");
        let (kind, message) = m.remove(&NodeId::new("n9").unwrap(), true).unwrap_err();
        assert_eq!(kind, ErrorKind::InvalidRequest);
        assert!(
            message.contains("n9 is not a member; the members are n1, n2, n3"),
            "{message}"
        );
        let (kind, message) = m.remove(&NodeId::new("n1").unwrap(), true).unwrap_err();
        assert_eq!(kind, ErrorKind::Refused);
        assert!(message.contains("ask another member"), "{message}");
        m.remove(&NodeId::new("n3").unwrap(), true).unwrap();
        // Two members left and N=2: removing another would leave one.
        let (kind, message) = m.remove(&NodeId::new("n2").unwrap(), true).unwrap_err();
        assert_eq!(kind, ErrorKind::Refused);
        assert!(message.contains("too few"), "{message}");
        // Passed on by the member that made it, it is taken as made: two
        // removals made at once on different members both stand.
        let (reply, changed) = m.remove(&NodeId::new("n2").unwrap(), false).unwrap();
        assert!(changed);
        assert_eq!(ids(&reply), ["n1"]);
        // So is one of a node this member has not heard of yet: it is
        // recorded, and that node cannot join here afterwards.
        let stranger = NodeId::new("n9").unwrap();
        let (_, changed) = m.remove(&stranger, false).unwrap();
        assert!(changed);
        assert!(m.is_removed(&stranger));
    }

    /// A data dir written before incarnations keeps its cluster (members at
    /// incarnation 0, this node at its own), rewritten in the new format.
    #[test]
    fn a_record_from_before_incarnations_is_read_and_rewritten() {
        use ringkv_core::wire::{JoinReplyV3, MemberV3};
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        let old = |id: &str, port: u16| MemberV3 {
            id: NodeId::new(id).unwrap(),
            addr: format!("127.0.0.1:{port}"),
            vnodes: 8,
            region: None,
        };
        let record = JoinReplyV3 {
            cluster_id: 9,
            replicas: 2,
            members: vec![old("n1", 1), old("n2", 2)],
            removed: vec![NodeId::new("n3").unwrap()],
        };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&record).unwrap();
        storage.meta_put(META_CLUSTER_V3, &bytes).unwrap();
        storage.meta_put(META_NODE_ID, b"n1").unwrap();
        let m = Membership::load(storage.clone(), member("n1", 1), None).unwrap();
        let record = m.record().unwrap();
        assert_eq!(record.members[&NodeId::new("n2").unwrap()].incarnation, 0);
        assert_eq!(record.members[&NodeId::new("n1").unwrap()].incarnation, 1);
        assert!(record.removed.contains(&NodeId::new("n3").unwrap()));
        assert!(storage.meta_get(META_CLUSTER).unwrap().is_some());
    }

    /// A data dir written before removal existed keeps its cluster, and is
    /// rewritten in the new format. The bytes are what fd13b04 (the last
    /// version without removal) stored for n1 and n2 (eu-west), N=3.
    #[test]
    fn a_record_from_before_removal_is_read_and_rewritten() {
        const V2_RECORD_HEX: &str = "3132372e302e302e313a373030303132372e302e302e313a320000006e31ffffffffffff8e000000dcffffff080000000000000000000000000000006e32ffffffffffff8b000000caffffff080000000100000065752d77657374ff00000000040000000000000003000000b0ffffff0200000000000000";
        let bytes: Vec<u8> = (0..V2_RECORD_HEX.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&V2_RECORD_HEX[i..i + 2], 16).unwrap())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        storage.meta_put(META_CLUSTER_V2, &bytes).unwrap();
        storage.meta_put(META_NODE_ID, b"n1").unwrap();
        let m = Membership::load(storage.clone(), me(None), None).unwrap();
        let record = m.record().unwrap();
        assert_eq!((record.cluster_id, record.replicas), (4, 3));
        assert_eq!(ids(&record.reply()), ["n1", "n2"]);
        let n2 = &record.members[&NodeId::new("n2").unwrap()];
        assert_eq!(
            (n2.addr.as_str(), n2.region.as_deref()),
            ("127.0.0.1:2", Some("eu-west"))
        );
        assert!(record.removed.is_empty());
        assert!(storage.meta_get(META_CLUSTER).unwrap().is_some());
    }

    #[test]
    fn a_record_in_the_old_format_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        storage.meta_put(META_CLUSTER_V1, b"old bytes").unwrap();
        let err = Membership::load(storage.clone(), me(None), None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("older ringkv"), "{err}");
        storage.meta_put(META_CLUSTER, b"garbage").unwrap();
        let err = Membership::load(storage, me(None), None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
