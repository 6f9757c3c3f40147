//! The messages nodes and clients exchange, and their validated encoding.
//!
//! Every message is an rkyv archive. Bytes from the network are checked with
//! bytecheck before they are read (a malformed or hostile frame becomes an
//! error, never a panic or an out-of-bounds read), then deserialised and
//! checked once more for what the type system cannot say: key length, node
//! id syntax, clock invariants. Protocol versioning is the QUIC ALPN string
//! ([`ALPN`]); a change to these types that is not backwards compatible must
//! change it.

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::consistency::Consistency;
use crate::dvv::{Clock, Payload, VersionVector};
use crate::error::InvalidInput;
use crate::node_id::NodeId;

/// The application protocol negotiated on every QUIC connection.
pub const ALPN: &[u8] = b"ringkv/17";
/// The longest key accepted, in bytes.
pub const KEY_MAX_BYTES: usize = 1024;
/// The largest a key's stored versions may grow (all siblings together);
/// writes that would exceed it are refused.
pub const CLOCK_MAX_BYTES: usize = 64 * 1024 * 1024;
/// The most replicas per key (N) a cluster may have. Far above any real
/// deployment's; it bounds every request's fan-out, and a record from a peer
/// or the disk that claims more is refused rather than obeyed.
pub const REPLICAS_MAX: u32 = 64;
/// The most virtual nodes one member may have. Building a ring costs time
/// quadratic in its total virtual nodes (the ring inserts into a sorted
/// list), so one `Join` claiming millions would hang every node that
/// installs it, and again at each restart.
pub const VNODES_MAX: u32 = 1024;
/// The most virtual nodes a cluster's members may have together: a ring of
/// 65,536 takes about half a second to build, at every membership change
/// and every start, and twice as many four times that. A join past it is
/// refused (records already past it, from older versions, still load).
pub const RING_VNODES_MAX: u64 = 65_536;
/// The most virtual nodes any cluster record may hold: `RING_VNODES_MAX`
/// with room for 16 joins of the largest members accepted at once by
/// different seeds (each seed checks only what it knows), whose announces
/// every member then takes. A record past it (a faulty or hostile peer)
/// is refused alike by every node, before any ring is built from it.
pub const RING_VNODES_HARD_MAX: u64 = RING_VNODES_MAX + 16 * VNODES_MAX as u64;
/// The most removed ids a cluster record may hold. Every removal
/// (`ringkv remove`, a leave) adds one for good, so that the id cannot
/// come back; a cluster would have to replace a node every hour for seven
/// years to reach it. A removal past it is refused, and so is a record
/// that holds more (a faulty or hostile peer), before it costs memory.
pub const REMOVED_IDS_MAX: usize = 65_536;
/// How a clock breaks the per-key limits, which no replica may store past:
/// reads would refuse such a clock as corrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClockOverLimit {
    /// It names more than [`CLOCK_ENTRIES_MAX`](crate::dvv::CLOCK_ENTRIES_MAX) actors.
    #[error("{actors} actors, over the limit of {limit}")]
    Actors { actors: usize, limit: usize },
    /// It takes more than [`CLOCK_MAX_BYTES`].
    #[error("{bytes} bytes, over the limit of {limit}")]
    Bytes { bytes: usize, limit: usize },
    /// It holds more than [`CLOCK_PAYLOADS_MAX`](crate::dvv::CLOCK_PAYLOADS_MAX)
    /// siblings, which no request could carry to another node.
    #[error("{siblings} siblings, over the limit of {limit}")]
    Siblings { siblings: usize, limit: usize },
}

/// Whether `clock` may be stored: `None`, or the limit it breaks.
pub fn clock_over_limit(clock: &Clock) -> Option<ClockOverLimit> {
    let (actors, bytes) = (clock.entry_count(), clock.approx_size());
    if actors > crate::dvv::CLOCK_ENTRIES_MAX {
        Some(ClockOverLimit::Actors {
            actors,
            limit: crate::dvv::CLOCK_ENTRIES_MAX,
        })
    } else if bytes > CLOCK_MAX_BYTES {
        Some(ClockOverLimit::Bytes {
            bytes,
            limit: CLOCK_MAX_BYTES,
        })
    } else if clock.sibling_count() > crate::dvv::CLOCK_PAYLOADS_MAX {
        Some(ClockOverLimit::Siblings {
            siblings: clock.sibling_count(),
            limit: crate::dvv::CLOCK_PAYLOADS_MAX,
        })
    } else {
        None
    }
}

/// The largest value any node accepts: a key's versions must fit in
/// [`CLOCK_MAX_BYTES`] with their bookkeeping (dots, the version vector),
/// so a value of exactly that size could never be stored.
pub const VALUE_MAX_BYTES: usize = CLOCK_MAX_BYTES - 64 * 1024;
/// Words every refusal of an answer too large for one frame contains
/// (an `Unavailable` error), so a peer can tell it from other refusals and
/// ask for less.
pub const OVER_FRAME_LIMIT: &str = "frame limit";
/// Words that begin every refusal of a request whose bytes its receiver
/// could not decode, or that came cut short (an `InvalidRequest`). The
/// request may be sound and the receiver unable to read it (another
/// version), or the stream broken, so unlike other refusals (a request that
/// decodes but breaks a limit says "invalid request") it is no reason to
/// drop what was sent.
pub const MALFORMED_REQUEST: &str = "malformed request";
/// The largest frame read off a stream: a whole clock plus room for the
/// envelope. Bounds memory per request.
pub const FRAME_MAX_BYTES: usize = CLOCK_MAX_BYTES + 1024 * 1024;

/// A request to a node, from a client or a peer.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Request {
    /// Write (or, with a tombstone, delete) a key; coordinated by a replica.
    Put(PutRequest),
    Get(GetRequest),
    /// The cluster's members as this node sees them.
    Status,
    /// A node asks to be added to the cluster.
    Join(JoinRequest),
    /// Replica-level operations sent by a coordinator. The protocol crates
    /// address replicas this way (in-process, and over the simulated
    /// network); between nodes they travel as [`Request::ReplicaFrom`], and
    /// a node refuses a bare `Replica` from the network.
    Replica(ReplicaRequest),
    /// A replica request from another node, naming it. A member refuses
    /// every one from a node it knows was removed
    /// ([`ErrorKind::SenderRemoved`]): a node removed while cut off (as an
    /// operator does with a node gone past the tombstone grace) has not
    /// heard of it, keeps running, and may hold copies older than
    /// tombstones collected since; its anti-entropy, hints and read
    /// repairs would bring those deleted values back once it can reach
    /// the members again.
    ReplicaFrom {
        from: NodeId,
        /// Set on the last hand-over of a `ringkv leave`, which comes
        /// after the members removed the sender (so that no write reaches
        /// it after that pass), and is taken. Not on the leave's first
        /// pass: a node removed unawares and then asked to leave would push
        /// its stale copies with it.
        leave_last_pass: bool,
        request: ReplicaRequest,
    },
    Ping,
    /// This node's own counters (hints held, ...), for `status`.
    Stats,
    /// Run one anti-entropy round against every peer now (`ringkv repair`).
    Repair,
    /// Take a member out of the cluster for good (`ringkv remove`). The
    /// answer is [`Response::Removed`]. With `tell_others`
    /// (a client's request) the node passes it on to every other member.
    Remove {
        node: NodeId,
        tell_others: bool,
    },
    /// Who answers at this address: a node asks before it sends a member
    /// anything over a new connection, so that another node at that
    /// member's address (one started afresh that formed a cluster of its
    /// own, or a new node given a member's address) is not taken for it.
    /// The answer is [`Response::Identity`].
    Identify,
    /// Leave the cluster gracefully (`ringkv leave`), sent to the node that
    /// leaves: it hands its keys to their replicas under the ring without
    /// it, then has a member remove it. The answer is [`Response::Left`].
    Leave,
    /// Remove the stray copies this node stores of keys it no longer
    /// replicates (`ringkv cleanup`), sent to that node. The answer is
    /// [`Response::Cleaned`].
    Cleanup,
}

/// Anti-entropy asks a peer for at most this many tree hashes at once.
pub const TREE_HASHES_MAX: usize = 4096;
/// ... and for the keys of at most this many leaves at once.
pub const LEAVES_PER_REQUEST_MAX: usize = 256;
/// Keys in one `ReadBatch` or `SyncBatch` at most.
pub const REPAIR_BATCH_MAX: usize = 256;
/// A `ReadBatch` answer stops adding clocks past this many bytes; the asker
/// asks again for the rest.
pub const READ_BATCH_REPLY_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PutRequest {
    pub key: Vec<u8>,
    pub payload: Payload,
    /// The context token of the read this write follows; `None` for a blind write.
    pub context: Option<String>,
    /// Supersede every version the coordinating replica holds, as if the
    /// client had read them all (last writer wins at that replica). Versions
    /// only other replicas hold still survive as siblings. Excludes `context`.
    pub overwrite: bool,
    pub w: Consistency,
    /// Count only the preference list's own nodes toward W (Riak's PW):
    /// no fallback stands in for a node that is down.
    pub strict: bool,
    pub timeout_ms: u32,
    /// Set by a node that forwarded the request to a replica, so that a
    /// disagreement about placement cannot forward it in circles.
    pub forwarded: bool,
    /// Set by a forwarding node: the wall-clock time (Unix ms, its own
    /// clock) by which this node must begin the write for its answer to
    /// reach the forwarder in time; later, the forwarder may hand the write
    /// to the next replica. A node that would mint the write later refuses
    /// it instead (allowing the two clocks some disagreement): a forward
    /// delayed in the network past a later delete would otherwise mint the
    /// deleted value again.
    pub not_after_unix_ms: Option<u64>,
}

/// The deadline a request gets when the client does not choose one.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u32 = 2000;
/// What a client waits past a key request's deadline before it gives up on
/// the answer ([`Request::answer_limit`]).
pub const ANSWER_SLACK_MS: u64 = 1000;

impl PutRequest {
    /// A client's write with the default deadline (a delete when `payload`
    /// is a tombstone).
    pub fn new(
        key: impl Into<Vec<u8>>,
        payload: Payload,
        w: Consistency,
        context: Option<String>,
    ) -> Self {
        PutRequest {
            key: key.into(),
            payload,
            context,
            overwrite: false,
            w,
            strict: false,
            timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            forwarded: false,
            not_after_unix_ms: None,
        }
    }
}

impl GetRequest {
    /// A client's quorum read with the default deadline.
    pub fn new(key: impl Into<Vec<u8>>, r: Consistency) -> Self {
        GetRequest {
            key: key.into(),
            r,
            strict: false,
            local: false,
            direct: false,
            wait_repair: false,
            timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            forwarded: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct GetRequest {
    pub key: Vec<u8>,
    pub r: Consistency,
    /// Count only the preference list's own nodes toward R (Riak's PR).
    pub strict: bool,
    /// Read only the contacted node's own store, without a quorum.
    pub local: bool,
    /// One leg of a client-driven read (Dynamo §6.4): the client coordinates
    /// the read itself, asking R of the key's replicas at once, and this
    /// node answers with its own copy, as `local` does, but only if it is
    /// one of the key's replicas under its ring; otherwise it refuses with
    /// `NotServing` (and a client then asks a coordinator instead). `r` and
    /// `strict` are the client's to apply. The answer's receipt names this
    /// node as its coordinator, so that a client can tell which replica
    /// answered.
    pub direct: bool,
    /// Answer only after stale replicas this read found have been repaired
    /// (read repair normally runs after the answer).
    pub wait_repair: bool,
    pub timeout_ms: u32,
    pub forwarded: bool,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JoinRequest {
    pub member: Member,
    /// The N the joiner was started with; `None` adopts the cluster's.
    pub replicas: Option<u32>,
    /// The cluster the joiner already belongs to, if it has been in one.
    pub cluster_id: Option<u64>,
}

/// One node as the membership list records it.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Member {
    pub id: NodeId,
    /// `HOST:PORT` where the node listens.
    pub addr: String,
    pub vnodes: u32,
    /// The node's (possibly emulated) region, if it was given one.
    pub region: Option<String>,
    /// How many times the node has started (its own count, kept in its data
    /// dir). Lists merge entry by entry, and a higher incarnation wins: a
    /// list from a member that missed a restart at a new address cannot
    /// put the old address back.
    pub incarnation: u64,
}

/// A member as cluster records stored it before incarnations (the
/// `cluster_record_v2` and `_v3` layouts); it reads as incarnation 0.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MemberV3 {
    pub id: NodeId,
    pub addr: String,
    pub vnodes: u32,
    pub region: Option<String>,
}

impl From<MemberV3> for Member {
    fn from(old: MemberV3) -> Member {
        Member {
            id: old.id,
            addr: old.addr,
            vnodes: old.vnodes,
            region: old.region,
            incarnation: 0,
        }
    }
}

/// What a coordinator asks of each replica.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ReplicaRequest {
    /// Sent by a coordinator to itself: apply the client's write and mint a
    /// new dot. Replies with the resulting clock, which is then replicated.
    Update {
        key: Vec<u8>,
        context: VersionVector,
        payload: Payload,
        /// Use the local clock's whole version vector as the context.
        overwrite: bool,
        /// The coordinator replicates none of the key and stands in for
        /// this owner, believing all of the key's replicas down: the write
        /// is minted on the hint it holds for the owner, not on its own copy.
        hint_for: Option<NodeId>,
    },
    /// Merge this clock into the local one. Replies with `Clock(None)`.
    Sync { key: Vec<u8>, clock: Clock },
    /// Hinted handoff: merge this clock, which the sender held as a hint,
    /// if this node replicates `key` under its own ring; otherwise refuse
    /// with `NotServing`. A ring newer than the sender's may have moved the
    /// key away (a join the sender has not heard of), and a copy merged
    /// here then would be a stray that no read, anti-entropy or finished
    /// ring hand-over looks at: refused, the sender keeps the hint until
    /// its own ring moves the key too, and hands it to the key's replicas.
    /// Replies with `Clock(None)`.
    Handoff { key: Vec<u8>, clock: Clock },
    /// Replies with the local clock of the key, if any. With `hint_for`, the
    /// node is a fallback standing in for that owner, and the answer is the
    /// hint it holds for the owner, never its own copy.
    Read {
        key: Vec<u8>,
        hint_for: Option<NodeId>,
    },
    /// Sloppy quorum: hold this clock durably for `owner`, which is down,
    /// and hand it over when the owner is back. Replies with `Clock(None)`.
    Hint {
        owner: NodeId,
        key: Vec<u8>,
        clock: Clock,
    },
    /// Anti-entropy descent: the hashes of nodes `indexes` at `level` of the
    /// Merkle tree this node keeps for `peer` (the keys both hold). Replies
    /// with `Hashes`, one per index.
    TreeHashes {
        peer: NodeId,
        leaf_bits: u32,
        /// The asker's ring (`Ring::fingerprint`): trees split by another
        /// ring would not compare.
        ring: u64,
        level: u32,
        indexes: Vec<u32>,
    },
    /// Anti-entropy listing: every key this node holds with `peer` in these
    /// leaves, with the digest of its stored version. Replies with `Items`.
    LeafItems {
        peer: NodeId,
        leaf_bits: u32,
        /// As for `TreeHashes`.
        ring: u64,
        leaves: Vec<u32>,
    },
    /// The local clocks of several keys, in order (anti-entropy). Replies
    /// with `Clocks`, which may stop short of the last keys (see
    /// [`READ_BATCH_REPLY_BYTES`]).
    ReadBatch { keys: Vec<Vec<u8>> },
    /// Merge each clock into the local one (anti-entropy, leave, ring
    /// hand-over). Replies with `Clock(None)` once all are durable; with
    /// an error naming the first refused key if a merge was refused for
    /// the per-key limits (the other keys are merged all the same).
    SyncBatch { items: Vec<KeyClock> },
}

/// A key and a clock for it.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct KeyClock {
    pub key: Vec<u8>,
    pub clock: Clock,
}

/// A key and the digest of the version a replica stores for it.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct KeyDigest {
    pub key: Vec<u8>,
    pub digest: u64,
}

/// A node's answer.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Response {
    Put(PutReply),
    Get(GetReply),
    Status(StatusReply),
    Joined(JoinReply),
    Clock(Option<Clock>),
    Pong,
    Stats(NodeStats),
    Hashes(Vec<u64>),
    Clocks(Vec<Option<Clock>>),
    Items(Vec<KeyDigest>),
    Repair(RepairReport),
    /// The answer to [`Request::Leave`].
    Left(LeaveReply),
    /// The answer to [`Request::Remove`].
    Removed(RemoveReply),
    /// The answer to [`Request::Cleanup`].
    Cleaned(CleanupReport),
    Error(ErrorReply),
    /// The answer to [`Request::Identify`].
    Identity(Identity),
}

/// Who a node is: its id, and its cluster's id once it is in one.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Identity {
    pub node: NodeId,
    pub cluster_id: Option<u64>,
}

impl Identity {
    /// Why a node answering as `self` is not the member `expected` of
    /// cluster `cluster_id`, if it is not. A node in no cluster yet may be
    /// the member still joining.
    pub fn mismatch(&self, expected: &NodeId, cluster_id: Option<u64>) -> Option<String> {
        let other_cluster = matches!((self.cluster_id, cluster_id), (Some(a), Some(b)) if a != b);
        if self.node == *expected && !other_cluster {
            // Checked on every call to a member: nothing is formatted here.
            return None;
        }
        let theirs = match self.cluster_id {
            Some(id) => format!("of cluster {id:016x}"),
            None => "in no cluster yet".to_string(),
        };
        let ours = cluster_id.map_or(String::new(), |id| format!(" of cluster {id:016x}"));
        Some(format!(
            "the node there is {} {theirs}, not {expected}{ours}",
            self.node
        ))
    }
}

/// What `ringkv remove` did.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RemoveReply {
    /// The cluster record afterwards.
    pub record: JoinReply,
    /// Members the node asked could not tell, and why; they learn at their
    /// next membership exchange. Empty for a removal passed on by a member.
    pub not_told: Vec<PeerFailure>,
}

/// What `ringkv leave` did.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct LeaveReply {
    /// The cluster record afterwards, without the node that left.
    pub record: JoinReply,
    /// Keys the node held and handed over.
    pub keys: u64,
    /// Members the removal could not be passed to (see [`RemoveReply`]).
    pub not_told: Vec<PeerFailure>,
    /// Members that missed the second hand-over, of writes that came in
    /// during the first; anti-entropy copies those keys from the other
    /// replicas.
    pub late_failures: Vec<PeerFailure>,
}

/// What `ringkv cleanup` did on one node.
#[derive(Debug, Clone, PartialEq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct CleanupReport {
    /// Keys the node stores (tombstones included), all of which it read.
    pub keys_scanned: u64,
    /// Of those, keys it does not replicate under its current ring: copies
    /// left from an older ring (before a member joined, say).
    pub stray_keys: u64,
    /// Stray copies removed: a current replica holds that version or a
    /// newer one.
    pub removed: u64,
    /// Stray copies kept: mostly those no current replica that answered
    /// holds. Such a copy is either a write that only this node has, or a
    /// value deleted since whose tombstone the replicas have collected; the
    /// node cannot tell which, so it neither removes nor hands it on. Also
    /// counted: copies written, or whose ring changed, while they were
    /// checked (a later cleanup looks at them again).
    pub kept: u64,
    pub duration_ms: u64,
    /// Replicas that could not be asked, and why; only their keys that
    /// another replica holds were removed.
    pub failures: Vec<PeerFailure>,
}

/// A node's own counters.
#[derive(Debug, Clone, PartialEq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NodeStats {
    /// Hints this node holds for other nodes.
    pub hints_pending: u64,
    /// When this node last completed an anti-entropy round (ms since the
    /// Unix epoch); `None` if it has not since it started.
    pub last_exchange_unix_ms: Option<u64>,
    /// Keys anti-entropy has repaired since the node started.
    pub keys_repaired: u64,
    /// Keys a leave (`ringkv leave`) has sent to their new replicas so far,
    /// over all its passes; 0 on a node not asked to leave since it started.
    pub leave_keys_sent: u64,
    /// Whether a `ringkv leave` of this node is under way and the node is
    /// not yet removed. A member asked to leave checks that no other is (one
    /// at a time).
    pub leaving: bool,
    /// Whether this node knows it was removed from the cluster (`ringkv
    /// remove`, or its own leave): it then refuses everything but status.
    pub removed: bool,
    /// Keys the running (or last) `ringkv cleanup` of this node has read so
    /// far; 0 if none ran since it started.
    pub cleanup_keys_scanned: u64,
    /// Whether a `ringkv cleanup` of this node is under way (false once it
    /// knows it was removed, like `leaving`). A member asked
    /// to leave refuses while another cleans up, and the other way round.
    pub cleaning: bool,
}

/// What one anti-entropy round did (`ringkv repair`).
#[derive(Debug, Clone, PartialEq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RepairReport {
    /// Peers the round tried to compare with.
    pub peers: u32,
    /// Of those, the peers whose exchange went to the end (some keys
    /// skipped or not: those are named in `failures` too).
    pub peers_finished: u32,
    /// Keys covered by this node's trees for the peers compared (the keys
    /// it shares with each, summed over the peers).
    pub keys_compared: u64,
    /// Keys whose versions differed and were merged on one side or both.
    pub keys_repaired: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
    /// Peers the round could not finish with, and why.
    pub failures: Vec<PeerFailure>,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PeerFailure {
    pub peer: NodeId,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PutReply {
    /// Covers exactly what this write superseded plus the write itself when
    /// the write left a single value; when concurrent values remain, it is
    /// the context the client sent (read to see and resolve them).
    pub context: String,
    /// How many concurrent values the key has after this write.
    pub siblings: u32,
    pub receipt: Receipt,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct GetReply {
    /// Live values; tombstones are not values. Empty: the key is not found.
    pub values: Vec<Vec<u8>>,
    pub context: String,
    pub receipt: Receipt,
}

/// Which replicas a request reached and how each fared: the quorum receipt.
#[derive(Debug, Clone, PartialEq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Receipt {
    pub coordinator: Option<NodeId>,
    pub replicas: Vec<ReplicaOutcome>,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ReplicaOutcome {
    pub node: NodeId,
    pub outcome: Outcome,
    pub latency_us: u64,
    /// Why it failed, for `error` outcomes.
    pub detail: Option<String>,
    /// Set when this node was a fallback standing in for that owner.
    pub hint_for: Option<NodeId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Outcome {
    Ok,
    Error,
    Timeout,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
        }
    }
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct StatusReply {
    pub node: NodeId,
    pub replicas: u32,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub addr: String,
    pub up: bool,
    pub region: Option<String>,
    /// Its virtual nodes on the ring: with the members' ids and N, what a
    /// client needs to place keys as the nodes do (client-driven reads).
    pub vnodes: u32,
    /// Hints the node holds for others; `None` when it could not be asked.
    pub hints_pending: Option<u64>,
    /// When the node last finished an anti-entropy round (ms since the Unix
    /// epoch); `None` if it has not, or could not be asked.
    pub last_exchange_unix_ms: Option<u64>,
    /// Keys its anti-entropy rounds repaired since it started.
    pub keys_repaired: Option<u64>,
    /// Whether it is leaving (`ringkv leave` under way, not yet removed);
    /// `None` if it could not be asked.
    pub leaving: Option<bool>,
    /// Whether a `ringkv cleanup` of it is under way (a leave is refused
    /// meanwhile); `None` if it could not be asked.
    pub cleaning: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JoinReply {
    pub cluster_id: u64,
    pub replicas: u32,
    pub members: Vec<Member>,
    /// Ids taken out of the cluster for good: never members again.
    pub removed: Vec<NodeId>,
}

/// The cluster record as ringkv stored it before removal existed (data
/// dirs written by it keep it under `cluster_record_v2`).
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JoinReplyV2 {
    pub cluster_id: u64,
    pub replicas: u32,
    pub members: Vec<MemberV3>,
}

/// The cluster record as ringkv stored it before incarnations (under
/// `cluster_record_v3`).
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JoinReplyV3 {
    pub cluster_id: u64,
    pub replicas: u32,
    pub members: Vec<MemberV3>,
    pub removed: Vec<NodeId>,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
    /// For quorum failures: who answered and who did not.
    pub receipt: Option<Receipt>,
}

/// What a `SyncBatch` answer says when the replica refused to merge some of
/// its keys for the per-key limits, having merged the others (see
/// [`ErrorReply::is_merge_refusal`]).
pub const MERGE_REFUSED: &str = "refused to merge";

/// What a `Handoff` answer (`NotServing`) starts with when the owner's ring
/// does not place the key on it: the owner serves, and only this hint waits
/// until the two rings agree.
pub const HANDOFF_MISPLACED: &str = "not a replica of this key under this node's ring";

impl ErrorReply {
    /// Whether this is a `SyncBatch`'s answer that the replica merged every
    /// key but those it names, which it refused for the per-key limits: a
    /// refusal of those keys only, which trying again does not change.
    /// (Told apart by its message, a marker this release sets: the error
    /// kinds are fixed by the protocol.)
    pub fn is_merge_refusal(&self) -> bool {
        self.kind == ErrorKind::InvalidRequest && self.message.contains(MERGE_REFUSED)
    }
}

/// What kind of failure an [`ErrorReply`] is, so callers can react (and the
/// CLI can choose its exit status) without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ErrorKind {
    /// The request itself is wrong; retrying will not help.
    InvalidRequest,
    /// Fewer replicas than required answered in time.
    QuorumNotReached,
    /// The node cannot serve the request now (e.g. no replica reachable).
    /// Part of it may have run: a write may be stored somewhere.
    Unavailable,
    /// A join that would break the cluster (id taken, N differs).
    Refused,
    Internal,
    /// The node serves no requests at all now: it is shutting down, was
    /// removed, or has not joined a cluster yet. Nothing of the request ran,
    /// so a client may send it to another node as it is.
    NotServing,
    /// The node had no memory to spare for the request (its request-memory
    /// budget, or its connection's share, was in use): nothing of it ran,
    /// so a client may retry after a pause or send it to another node.
    Overloaded,
    /// The receiving member knows the sender as removed from the cluster
    /// and refuses its replica requests ([`Request::ReplicaFrom`]). Nothing
    /// of the request ran. The sender should ask a member for the cluster's
    /// record: it will learn it was removed, and stop.
    SenderRemoved,
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response::Error(ErrorReply {
            kind,
            message: message.into(),
            receipt: None,
        })
    }
}

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes is larger than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {reason}")]
    Malformed { reason: String },
    #[error("invalid message: {0}")]
    Invalid(#[from] InvalidInput),
}

/// Encodes a request for the wire.
pub fn encode_request(request: &Request) -> AlignedVec {
    rkyv::to_bytes::<rancor::Error>(request).expect("serialising to memory cannot fail")
}

/// Encodes a response for the wire.
pub fn encode_response(response: &Response) -> AlignedVec {
    rkyv::to_bytes::<rancor::Error>(response).expect("serialising to memory cannot fail")
}

/// Checks and decodes a request frame. The counts of its lists are
/// checked before it is decoded (see [`ArchivedRequest::check_counts`]).
pub fn decode_request(bytes: &[u8]) -> Result<Request, DecodeError> {
    let request: Request = decode_checked(bytes, ArchivedRequest::check_counts)?;
    request.validate()?;
    Ok(request)
}

impl ArchivedRequest {
    /// Checks the lengths of a request's lists against their limits on the
    /// archived bytes, before decoding: decoding allocates for every item,
    /// so a frame of millions of tiny keys or siblings would take several
    /// times its size in memory (which the request memory budget, charged
    /// by frame bytes, does not see) only to be refused by
    /// [`Request::validate`].
    pub fn check_counts(&self) -> Result<(), InvalidInput> {
        use ArchivedReplicaRequest as R;
        let (ArchivedRequest::Replica(replica)
        | ArchivedRequest::ReplicaFrom {
            request: replica, ..
        }) = self
        else {
            return Ok(());
        };
        match replica {
            R::Update { context, .. } => context.check_counts(),
            R::Sync { clock, .. } | R::Handoff { clock, .. } | R::Hint { clock, .. } => {
                clock.check_counts()
            }
            R::ReadBatch { keys } => check_batch(keys.len()),
            R::SyncBatch { items } => {
                check_batch(items.len())?;
                items.iter().try_for_each(|item| item.clock.check_counts())
            }
            R::TreeHashes { indexes, .. } => {
                check_count(indexes.len(), TREE_HASHES_MAX, "asks for", "tree hashes")
            }
            R::LeafItems { leaves, .. } => {
                check_count(leaves.len(), LEAVES_PER_REQUEST_MAX, "asks for", "leaves")
            }
            R::Read { .. } => Ok(()),
        }
    }
}

impl ArchivedResponse {
    /// Checks the lengths of an answer's lists on the archived bytes, as
    /// [`ArchivedRequest::check_counts`] does for requests: no answer a node
    /// sends is longer than the request it answers allows (a `Clocks` has
    /// one entry per key asked, a `Hashes` one per index), nor than what a
    /// node stores (a key's siblings, a cluster's members).
    ///
    /// `Items` (a leaf's keys) has no count to check: a leaf holds as many
    /// keys as hash there. Each takes at least 17 archived bytes, so the
    /// frame limit bounds it.
    pub fn check_counts(&self) -> Result<(), InvalidInput> {
        const MEMBERS_MAX: usize = RING_VNODES_MAX as usize;
        match self {
            ArchivedResponse::Clock(rkyv::option::ArchivedOption::Some(clock)) => {
                clock.check_counts()
            }
            ArchivedResponse::Clocks(clocks) => {
                check_count(clocks.len(), REPAIR_BATCH_MAX, "answers with", "clocks")?;
                clocks.iter().flatten().try_for_each(|c| c.check_counts())
            }
            ArchivedResponse::Hashes(hashes) => {
                check_count(hashes.len(), TREE_HASHES_MAX, "answers with", "tree hashes")
            }
            // A read merges the clocks of up to N replicas, each within
            // the sibling limit.
            ArchivedResponse::Get(reply) => check_count(
                reply.values.len(),
                crate::dvv::CLOCK_PAYLOADS_MAX * REPLICAS_MAX as usize,
                "answers with",
                "values",
            ),
            // Every member has at least one virtual node.
            ArchivedResponse::Joined(record)
            | ArchivedResponse::Removed(ArchivedRemoveReply { record, .. })
            | ArchivedResponse::Left(ArchivedLeaveReply { record, .. }) => {
                check_count(record.members.len(), MEMBERS_MAX, "answers with", "members")?;
                check_count(
                    record.removed.len(),
                    REMOVED_IDS_MAX,
                    "answers with",
                    "removed ids",
                )
            }
            ArchivedResponse::Status(status) => {
                check_count(status.nodes.len(), MEMBERS_MAX, "answers with", "members")
            }
            _ => Ok(()),
        }
    }
}

/// An error if a message `verb` ("asks for", "answers with") more than
/// `max` of `what`.
fn check_count(len: usize, max: usize, verb: &str, what: &str) -> Result<(), InvalidInput> {
    if len > max {
        return Err(InvalidInput::new(format!(
            "{verb} {len} {what}; the limit is {max}"
        )));
    }
    Ok(())
}

/// Checks and decodes a response frame. The counts of its lists are
/// checked before it is decoded (see [`ArchivedResponse::check_counts`]).
pub fn decode_response(bytes: &[u8]) -> Result<Response, DecodeError> {
    let response: Response = decode_checked(bytes, ArchivedResponse::check_counts)?;
    response.validate()?;
    Ok(response)
}

pub(crate) fn decode<T>(bytes: &[u8]) -> Result<T, DecodeError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    decode_checked(bytes, |_| Ok(()))
}

/// Checks `bytes` as an archive of `T`, then `check` on the archive, and
/// only then decodes it.
fn decode_checked<T>(
    bytes: &[u8],
    check: impl FnOnce(&T::Archived) -> Result<(), InvalidInput>,
) -> Result<T, DecodeError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    if bytes.len() > FRAME_MAX_BYTES {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: FRAME_MAX_BYTES,
        });
    }
    // rkyv reads archives in place and needs them aligned; a frame read off a
    // stream into a plain Vec may not be.
    let aligned;
    let bytes = if (bytes.as_ptr() as usize).is_multiple_of(16) {
        bytes
    } else {
        let mut copy = AlignedVec::<16>::with_capacity(bytes.len());
        copy.extend_from_slice(bytes);
        aligned = copy;
        &aligned[..]
    };
    let malformed = |e: rancor::Error| DecodeError::Malformed {
        reason: e.to_string(),
    };
    let archived = rkyv::access::<T::Archived, rancor::Error>(bytes).map_err(malformed)?;
    check(archived)?;
    rkyv::deserialize::<T, rancor::Error>(archived).map_err(malformed)
}

/// Encodes a clock for storage (the same rkyv format as on the wire).
pub fn encode_clock(clock: &Clock) -> AlignedVec {
    rkyv::to_bytes::<rancor::Error>(clock).expect("serialising to memory cannot fail")
}

/// Encodes a node's record of its cluster for its data dir. The format is
/// `JoinReply`'s archive: a change to `JoinReply` or `Member` must change
/// the key the record is stored under (see `node::membership`).
pub fn encode_cluster_record(record: &JoinReply) -> AlignedVec {
    rkyv::to_bytes::<rancor::Error>(record).expect("serialising to memory cannot fail")
}

/// Checks and decodes a stored cluster record.
pub fn decode_cluster_record(bytes: &[u8]) -> Result<JoinReply, DecodeError> {
    let record: JoinReply = decode(bytes)?;
    validate_record(&record, "cluster record")?;
    Ok(record)
}

/// Checks and decodes a cluster record stored by a ringkv without removal
/// ([`JoinReplyV2`]), as today's record: nobody removed.
pub fn decode_cluster_record_v2(bytes: &[u8]) -> Result<JoinReply, DecodeError> {
    let old: JoinReplyV2 = decode(bytes)?;
    let record = JoinReply {
        cluster_id: old.cluster_id,
        replicas: old.replicas,
        members: old.members.into_iter().map(Member::from).collect(),
        removed: Vec::new(),
    };
    validate_record(&record, "cluster record")?;
    Ok(record)
}

/// Checks and decodes a cluster record stored by a ringkv without
/// incarnations ([`JoinReplyV3`]), as today's record: every member at
/// incarnation 0.
pub fn decode_cluster_record_v3(bytes: &[u8]) -> Result<JoinReply, DecodeError> {
    let old: JoinReplyV3 = decode(bytes)?;
    let record = JoinReply {
        cluster_id: old.cluster_id,
        replicas: old.replicas,
        members: old.members.into_iter().map(Member::from).collect(),
        removed: old.removed,
    };
    validate_record(&record, "cluster record")?;
    Ok(record)
}

/// N in range, every member valid and listed once, every removed id valid
/// and no longer a member, and no more of them than [`REMOVED_IDS_MAX`].
fn validate_record(record: &JoinReply, what: &str) -> Result<(), InvalidInput> {
    validate_replicas(record.replicas, what)?;
    record.members.iter().try_for_each(validate_member)?;
    let mut members = std::collections::HashSet::with_capacity(record.members.len());
    if let Some(twice) = record.members.iter().find(|m| !members.insert(&m.id)) {
        return Err(InvalidInput::new(format!(
            "{what} lists member {} twice",
            twice.id
        )));
    }
    let vnodes: u64 = record.members.iter().map(|m| u64::from(m.vnodes)).sum();
    if vnodes > RING_VNODES_HARD_MAX {
        return Err(InvalidInput::new(format!(
            "{what} has {vnodes} virtual nodes, more than any cluster may ({RING_VNODES_HARD_MAX})"
        )));
    }
    if record.removed.len() > REMOVED_IDS_MAX {
        return Err(InvalidInput::new(format!(
            "{what} lists {} removed ids; the limit is {REMOVED_IDS_MAX}",
            record.removed.len()
        )));
    }
    for id in &record.removed {
        validate_node_id(id)?;
        if members.contains(id) {
            return Err(InvalidInput::new(format!(
                "{what} lists {id} both as a member and as removed"
            )));
        }
    }
    Ok(())
}

/// Checks and decodes a stored clock.
pub fn decode_clock(bytes: &[u8]) -> Result<Clock, DecodeError> {
    let clock: Clock = decode(bytes)?;
    validate_clock(&clock)?;
    Ok(clock)
}

/// Validates a key's length.
pub fn validate_key(key: &[u8]) -> Result<(), InvalidInput> {
    if key.is_empty() {
        return Err(InvalidInput::new("key is empty"));
    }
    if key.len() > KEY_MAX_BYTES {
        return Err(InvalidInput::new(format!(
            "key is {} bytes long; the limit is {KEY_MAX_BYTES} bytes",
            key.len()
        )));
    }
    Ok(())
}

pub(crate) fn validate_node_id(id: &NodeId) -> Result<(), InvalidInput> {
    NodeId::new(id.as_str()).map(|_| ())
}

impl Request {
    /// How long a client waits for the answer to a key request: the node
    /// answers by the request's deadline, and a second more covers the way
    /// back (a node that froze, a dead connection). `None` for the others,
    /// which take as long as their work (a leave, a repair).
    pub fn answer_limit(&self) -> Option<std::time::Duration> {
        let timeout_ms = match self {
            Request::Get(g) => g.timeout_ms,
            Request::Put(p) => p.timeout_ms,
            _ => return None,
        };
        Some(std::time::Duration::from_millis(
            u64::from(timeout_ms) + ANSWER_SLACK_MS,
        ))
    }

    /// Checks what bytecheck cannot: lengths, syntax, clock invariants.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        match self {
            Request::Put(p) => validate_key(&p.key),
            Request::Get(g) => {
                validate_key(&g.key)?;
                if g.direct && (g.local || g.forwarded || g.wait_repair) {
                    // A leg answers with one replica's copy, as it is:
                    // there is no quorum to forward or repair after.
                    return Err(InvalidInput::new(
                        "a direct read takes no `local`, `forwarded` or `wait_repair`",
                    ));
                }
                Ok(())
            }
            Request::Status
            | Request::Ping
            | Request::Identify
            | Request::Stats
            | Request::Repair
            | Request::Leave
            | Request::Cleanup => Ok(()),
            Request::Remove { node, .. } => validate_node_id(node),
            Request::Join(j) => {
                if let Some(replicas) = j.replicas {
                    validate_replicas(replicas, "join request")?;
                }
                validate_member(&j.member)
            }
            Request::Replica(replica) => replica.validate(),
            Request::ReplicaFrom { from, request, .. } => {
                validate_node_id(from)?;
                request.validate()
            }
        }
    }

    /// `request` as node `from` sends it to another node
    /// ([`Request::ReplicaFrom`]), outside a leave's last pass.
    pub fn replica_from(from: NodeId, request: ReplicaRequest) -> Request {
        Request::ReplicaFrom {
            from,
            leave_last_pass: false,
            request,
        }
    }
}

impl ReplicaRequest {
    /// Checks what bytecheck cannot: lengths, syntax, clock invariants.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        match self {
            ReplicaRequest::Update {
                key,
                context,
                hint_for,
                ..
            } => {
                validate_key(key)?;
                hint_for.as_ref().map_or(Ok(()), validate_node_id)?;
                context.validate()
            }
            ReplicaRequest::Sync { key, clock } | ReplicaRequest::Handoff { key, clock } => {
                validate_key(key)?;
                validate_clock(clock)
            }
            ReplicaRequest::Read { key, hint_for } => {
                validate_key(key)?;
                hint_for.as_ref().map_or(Ok(()), validate_node_id)
            }
            ReplicaRequest::Hint { owner, key, clock } => {
                validate_node_id(owner)?;
                validate_key(key)?;
                validate_clock(clock)
            }
            ReplicaRequest::TreeHashes { peer, indexes, .. } => {
                validate_node_id(peer)?;
                check_count(indexes.len(), TREE_HASHES_MAX, "asks for", "tree hashes")
            }
            ReplicaRequest::ReadBatch { keys } => {
                check_batch(keys.len())?;
                keys.iter().try_for_each(|k| validate_key(k))
            }
            ReplicaRequest::SyncBatch { items } => {
                check_batch(items.len())?;
                items.iter().try_for_each(|i| {
                    validate_key(&i.key)?;
                    validate_clock(&i.clock)
                })
            }
            ReplicaRequest::LeafItems { peer, leaves, .. } => {
                validate_node_id(peer)?;
                check_count(leaves.len(), LEAVES_PER_REQUEST_MAX, "asks for", "leaves")?;
                // Each leaf once, in order: a repeated one would only
                // repeat its items in an answer built in memory.
                if leaves.windows(2).any(|pair| pair[0] >= pair[1]) {
                    return Err(InvalidInput::new(
                        "asks for leaves out of order or more than once",
                    ));
                }
                Ok(())
            }
        }
    }
}

impl Response {
    /// Checks what bytecheck cannot on a peer's answer.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        match self {
            Response::Clock(Some(clock)) => validate_clock(clock),
            Response::Items(items) => items.iter().try_for_each(|i| validate_key(&i.key)),
            Response::Clocks(clocks) => clocks.iter().flatten().try_for_each(validate_clock),
            Response::Joined(j) => validate_record(j, "join reply"),
            Response::Removed(r) => {
                validate_record(&r.record, "remove reply")?;
                r.not_told
                    .iter()
                    .try_for_each(|f| validate_node_id(&f.peer))
            }
            Response::Left(r) => {
                validate_record(&r.record, "leave reply")?;
                r.not_told
                    .iter()
                    .chain(&r.late_failures)
                    .try_for_each(|f| validate_node_id(&f.peer))
            }
            Response::Cleaned(r) => r
                .failures
                .iter()
                .try_for_each(|f| validate_node_id(&f.peer)),
            Response::Identity(i) => validate_node_id(&i.node),
            _ => Ok(()),
        }
    }
}

fn check_batch(len: usize) -> Result<(), InvalidInput> {
    if len > REPAIR_BATCH_MAX {
        return Err(InvalidInput::new(format!(
            "batch of {len} keys; the limit is {REPAIR_BATCH_MAX}"
        )));
    }
    Ok(())
}

fn validate_clock(clock: &Clock) -> Result<(), InvalidInput> {
    clock.validate()
}

/// Checks a region name: 1-64 characters of letters, digits, '-', '_' or '.'.
pub fn validate_region(region: &str) -> Result<(), InvalidInput> {
    // Not echoed whole: a peer's megabytes would come back, escaped larger.
    if region.len() > 64 {
        return Err(InvalidInput::new(format!(
            "region is {} bytes long; a region is 1-64 characters of letters, digits, '-', '_' or '.'",
            region.len()
        )));
    }
    let valid = !region.is_empty()
        && region.len() <= 64
        && region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if valid {
        Ok(())
    } else {
        Err(InvalidInput::new(format!(
            "region {region:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"
        )))
    }
}

pub(crate) fn validate_replicas(replicas: u32, what: &str) -> Result<(), InvalidInput> {
    if replicas == 0 || replicas > REPLICAS_MAX {
        return Err(InvalidInput::new(format!(
            "{what} has replicas = {replicas}; 1 to {REPLICAS_MAX} are allowed"
        )));
    }
    Ok(())
}

/// The longest member address shown in an error: a longer one cannot be
/// an IP:PORT, and is not echoed back.
const ADDR_SHOWN_MAX: usize = 128;

fn validate_member(m: &Member) -> Result<(), InvalidInput> {
    validate_node_id(&m.id)?;
    if let Some(region) = &m.region {
        validate_region(region)?;
    }
    if m.vnodes == 0 || m.vnodes > VNODES_MAX {
        return Err(InvalidInput::new(format!(
            "member {} has {} vnodes; 1 to {VNODES_MAX} are allowed",
            m.id, m.vnodes
        )));
    }
    // The longest IP:PORT is 47 characters ([IPv6%scope]:port aside).
    if m.addr.len() > ADDR_SHOWN_MAX {
        return Err(InvalidInput::new(format!(
            "member {} has an address of {} bytes, not IP:PORT",
            m.id,
            m.addr.len()
        )));
    }
    let addr = m.addr.parse::<std::net::SocketAddr>().map_err(|_| {
        InvalidInput::new(format!(
            "member {} has address {:?}, not IP:PORT",
            m.id, m.addr
        ))
    })?;
    // A node records the address it bound, so these come only from a bad
    // peer or file; every call to such a member would go nowhere.
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(InvalidInput::new(format!(
            "member {} has address {addr}, which no peer can reach (an unspecified IP or port 0)",
            m.id
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put() -> Request {
        Request::Put(PutRequest {
            key: b"k".to_vec(),
            payload: Payload::Value(b"v".to_vec()),
            context: None,
            overwrite: false,
            w: Consistency::Quorum,
            strict: false,
            timeout_ms: 2000,
            forwarded: true,
            not_after_unix_ms: Some(1_800_000_000_000),
        })
    }

    #[test]
    fn round_trips() {
        let bytes = encode_request(&put());
        assert_eq!(decode_request(&bytes).unwrap(), put());
    }

    #[test]
    fn misaligned_frames_decode() {
        let bytes = encode_request(&put());
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(decode_request(&shifted[1..]).unwrap(), put());
    }

    #[test]
    fn truncated_and_garbage_frames_are_errors() {
        let bytes = encode_request(&put());
        for cut in 0..bytes.len() {
            assert!(decode_request(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_request(&[0xff; 64]).is_err());
    }

    #[test]
    fn semantic_checks_run_after_bytecheck() {
        let mut p = put();
        if let Request::Put(p) = &mut p {
            p.key.clear();
        }
        let err = decode_request(&encode_request(&p)).unwrap_err();
        assert!(err.to_string().contains("key is empty"), "{err}");
    }

    #[test]
    fn a_direct_read_with_a_quorum_flag_is_refused() {
        let get = |local, forwarded, wait_repair| {
            Request::Get(GetRequest {
                direct: true,
                local,
                forwarded,
                wait_repair,
                ..GetRequest::new("k", Consistency::Quorum)
            })
        };
        assert!(decode_request(&encode_request(&get(false, false, false))).is_ok());
        for flags in [
            (true, false, false),
            (false, true, false),
            (false, false, true),
        ] {
            let err = decode_request(&encode_request(&get(flags.0, flags.1, flags.2))).unwrap_err();
            assert!(
                err.to_string().contains("a direct read takes no"),
                "{flags:?}: {err}"
            );
        }
    }

    /// A replica request that names its sender is checked as the bare one
    /// is, lists counted on the archive before decoding, and its sender's
    /// id too.
    #[test]
    fn a_named_replica_request_is_checked_like_a_bare_one() {
        let n1 = NodeId::new("n1").unwrap();
        let read = |key: &[u8]| ReplicaRequest::Read {
            key: key.to_vec(),
            hint_for: None,
        };
        let named = Request::replica_from(n1.clone(), read(b"k"));
        assert_eq!(decode_request(&encode_request(&named)).unwrap(), named);
        let err = decode_request(&encode_request(&Request::replica_from(
            n1.clone(),
            read(b""),
        )))
        .unwrap_err();
        assert!(err.to_string().contains("key is empty"), "{err}");
        let batch = Request::replica_from(
            n1,
            ReplicaRequest::ReadBatch {
                keys: vec![b"k".to_vec(); REPAIR_BATCH_MAX + 1],
            },
        );
        let bytes = encode_request(&batch);
        let archived = rkyv::access::<ArchivedRequest, rancor::Error>(&bytes).unwrap();
        assert!(archived.check_counts().is_err(), "counted on the archive");
        // An id that is no node id (made past `NodeId::new`'s check).
        let mut bad = encode_request(&Request::replica_from(
            NodeId::new("n1").unwrap(),
            read(b"k"),
        ));
        let at = bad.windows(2).position(|w| w == b"n1").unwrap();
        bad[at] = b' ';
        let err = decode_request(&bad).unwrap_err();
        assert!(err.to_string().contains("node id"), "{err}");
    }

    /// Lists longer than their limits are refused from the archived bytes,
    /// before decoding allocates for each item; leaves must come in order.
    #[test]
    fn long_lists_are_refused_before_decoding() {
        let refused = |request: Request, expected: &str| {
            let err = decode_request(&encode_request(&request)).unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        };
        let node = NodeId::new("n1.00000001").unwrap();
        // The check on the archive itself, apart from decoding.
        let batch = Request::Replica(ReplicaRequest::ReadBatch {
            keys: vec![b"k".to_vec(); REPAIR_BATCH_MAX + 1],
        });
        let bytes = encode_request(&batch);
        let archived = rkyv::access::<ArchivedRequest, rancor::Error>(&bytes).unwrap();
        let err = archived.check_counts().unwrap_err();
        assert!(err.to_string().contains("batch of 257 keys"), "{err}");
        refused(batch, "batch of 257 keys; the limit is 256");
        // Validation after decoding does not count siblings: only the
        // check on the archive does.
        let clock = Clock::of_tombstones(&node, crate::dvv::CLOCK_PAYLOADS_MAX + 1);
        assert!(clock.validate().is_ok());
        refused(
            Request::Replica(ReplicaRequest::Sync {
                key: b"k".to_vec(),
                clock: clock.clone(),
            }),
            "clock holds 65537 siblings; the limit is 65536",
        );
        refused(
            Request::Replica(ReplicaRequest::SyncBatch {
                items: vec![KeyClock {
                    key: b"k".to_vec(),
                    clock,
                }],
            }),
            "clock holds 65537 siblings",
        );
        // No replica stores a clock that no request could carry.
        assert!(matches!(
            clock_over_limit(&Clock::of_tombstones(
                &node,
                crate::dvv::CLOCK_PAYLOADS_MAX + 1
            )),
            Some(ClockOverLimit::Siblings {
                siblings: 65537,
                limit: 65536
            })
        ));
        let ok = Clock::of_tombstones(&node, crate::dvv::CLOCK_PAYLOADS_MAX);
        assert_eq!(clock_over_limit(&ok), None);
        let sync = Request::Replica(ReplicaRequest::Sync {
            key: b"k".to_vec(),
            clock: ok,
        });
        assert_eq!(decode_request(&encode_request(&sync)).unwrap(), sync);
        let leaves = |leaves: Vec<u32>| {
            Request::Replica(ReplicaRequest::LeafItems {
                peer: NodeId::new("n2").unwrap(),
                leaf_bits: 8,
                ring: 1,
                leaves,
            })
        };
        refused(leaves(vec![3, 3]), "out of order or more than once");
        refused(leaves(vec![4, 3]), "out of order or more than once");
        refused(
            leaves((0..LEAVES_PER_REQUEST_MAX as u32 + 1).collect()),
            "asks for 257 leaves",
        );
        let fine = leaves(vec![1, 3, 200]);
        assert_eq!(decode_request(&encode_request(&fine)).unwrap(), fine);
    }

    /// A peer's answers are held to the same counts as requests, on the
    /// archive, before decoding: no answer is longer than what it answers.
    #[test]
    fn long_answers_are_refused_before_decoding() {
        let refused = |response: Response, expected: &str| {
            let bytes = encode_response(&response);
            let archived = rkyv::access::<ArchivedResponse, rancor::Error>(&bytes).unwrap();
            let err = archived.check_counts().unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
            let err = decode_response(&bytes).unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        };
        let accepted = |response: Response| {
            assert_eq!(
                decode_response(&encode_response(&response)).unwrap(),
                response
            );
        };
        let node = NodeId::new("n1.00000001").unwrap();
        refused(
            Response::Clocks(vec![None; REPAIR_BATCH_MAX + 1]),
            "answers with 257 clocks; the limit is 256",
        );
        accepted(Response::Clocks(vec![None; REPAIR_BATCH_MAX]));
        let many = Clock::of_tombstones(&node, crate::dvv::CLOCK_PAYLOADS_MAX + 1);
        refused(Response::Clocks(vec![Some(many.clone())]), "65537 siblings");
        refused(Response::Clock(Some(many)), "65537 siblings");
        refused(
            Response::Hashes(vec![0; TREE_HASHES_MAX + 1]),
            "answers with 4097 tree hashes",
        );
        accepted(Response::Hashes(vec![0; TREE_HASHES_MAX]));
        let get = |values: usize| {
            Response::Get(GetReply {
                values: vec![Vec::new(); values],
                context: String::new(),
                receipt: Receipt::default(),
            })
        };
        let values_max = crate::dvv::CLOCK_PAYLOADS_MAX * REPLICAS_MAX as usize;
        refused(
            get(values_max + 1),
            &format!("answers with {} values", values_max + 1),
        );
        accepted(get(2));
        let status = |nodes: usize| {
            Response::Status(StatusReply {
                node: node.clone(),
                replicas: 3,
                nodes: vec![
                    NodeStatus {
                        id: node.clone(),
                        addr: "127.0.0.1:7000".into(),
                        up: true,
                        region: None,
                        vnodes: 64,
                        hints_pending: None,
                        last_exchange_unix_ms: None,
                        keys_repaired: None,
                        leaving: None,
                        cleaning: None,
                    };
                    nodes
                ],
            })
        };
        refused(
            status(RING_VNODES_MAX as usize + 1),
            "answers with 65537 members",
        );
        accepted(status(3));
    }

    /// A peer's (or the disk's) claims about the cluster's shape are
    /// bounded before anything builds a ring from them.
    #[test]
    fn membership_beyond_the_limits_is_refused() {
        let member = |vnodes| Member {
            id: NodeId::new("n1").unwrap(),
            addr: "127.0.0.1:7000".into(),
            vnodes,
            region: None,
            incarnation: 1,
        };
        let join = |vnodes, replicas| {
            Request::Join(JoinRequest {
                member: member(vnodes),
                replicas,
                cluster_id: None,
            })
        };
        assert!(join(VNODES_MAX, Some(REPLICAS_MAX)).validate().is_ok());
        let too_many = join(VNODES_MAX + 1, None).validate().unwrap_err();
        assert!(too_many.to_string().contains("1025 vnodes"), "{too_many}");
        assert!(join(0, None).validate().is_err());
        let n = join(64, Some(REPLICAS_MAX + 1)).validate().unwrap_err();
        assert!(n.to_string().contains("replicas = 65"), "{n}");
        assert!(join(64, Some(0)).validate().is_err());
        for addr in ["0.0.0.0:7000", "[::]:7000", "127.0.0.1:0", "n1:7000"] {
            let join = Request::Join(JoinRequest {
                member: Member {
                    addr: addr.into(),
                    ..member(64)
                },
                replicas: None,
                cluster_id: None,
            });
            let refused = join.validate().unwrap_err().to_string();
            assert!(refused.contains(addr), "{addr}: {refused}");
        }
        // A peer's long strings are measured, not echoed back (escaped,
        // a megabyte of control bytes would come back five times larger).
        let junk = "\u{1}".repeat(1 << 20);
        for (addr, region) in [(junk.clone(), None), ("127.0.0.1:7000".into(), Some(junk))] {
            let join = Request::Join(JoinRequest {
                member: Member {
                    addr,
                    region,
                    ..member(64)
                },
                replicas: None,
                cluster_id: None,
            });
            let refused = join.validate().unwrap_err().to_string();
            assert!(
                refused.len() < 200,
                "{} bytes: {}",
                refused.len(),
                &refused[..200]
            );
            assert!(refused.contains("1048576 bytes"), "{refused}");
        }

        let record = |replicas, vnodes| JoinReply {
            cluster_id: 7,
            replicas,
            members: vec![member(vnodes)],
            removed: vec![NodeId::new("gone").unwrap()],
        };
        assert_eq!(
            decode_cluster_record(&encode_cluster_record(&record(3, 64))).unwrap(),
            record(3, 64)
        );
        // Past the hard limit of virtual nodes in all.
        let mut crowded = record(3, VNODES_MAX);
        crowded.members = (0..=RING_VNODES_HARD_MAX / u64::from(VNODES_MAX))
            .map(|i| Member {
                id: NodeId::new(format!("n{i}")).unwrap(),
                ..member(VNODES_MAX)
            })
            .collect();
        let refused = Response::Joined(crowded.clone()).validate().unwrap_err();
        assert!(refused.to_string().contains("virtual nodes"), "{refused}");
        crowded.members.pop();
        assert!(Response::Joined(crowded).validate().is_ok());
        let mut both = record(3, 64);
        both.removed.push(both.members[0].id.clone());
        let mut twice = record(3, 64);
        twice.members.push(twice.members[0].clone());
        let refused = Response::Joined(twice.clone()).validate().unwrap_err();
        assert!(refused.to_string().contains("twice"), "{refused}");
        // Past the limit of removed ids; refused on the archived bytes too.
        let mut many_removed = record(3, 64);
        many_removed.removed = (0..=REMOVED_IDS_MAX)
            .map(|i| NodeId::new(format!("r{i}")).unwrap())
            .collect();
        let refused = Response::Joined(many_removed.clone())
            .validate()
            .unwrap_err();
        assert!(refused.to_string().contains("removed ids"), "{refused}");
        let bytes = encode_response(&Response::Joined(many_removed.clone()));
        let archived = rkyv::access::<ArchivedResponse, rancor::Error>(&bytes).unwrap();
        let refused = archived.check_counts().unwrap_err();
        assert!(refused.to_string().contains("removed ids"), "{refused}");
        many_removed.removed.pop();
        assert!(Response::Joined(many_removed).validate().is_ok());
        for bad in [
            twice,
            record(0, 64),
            record(u32::MAX, 64),
            record(3, u32::MAX),
            both,
        ] {
            assert!(decode_cluster_record(&encode_cluster_record(&bad)).is_err());
            assert!(Response::Joined(bad).validate().is_err());
        }
    }

    fn old_member() -> MemberV3 {
        MemberV3 {
            id: NodeId::new("n1").unwrap(),
            addr: "127.0.0.1:7000".into(),
            vnodes: 64,
            region: Some("eu-west".into()),
        }
    }

    /// A record stored before removal existed reads as one with nobody removed.
    #[test]
    fn a_cluster_record_from_before_removal_still_reads() {
        let old = JoinReplyV2 {
            cluster_id: 7,
            replicas: 3,
            members: vec![old_member()],
        };
        let bytes = rkyv::to_bytes::<rancor::Error>(&old).unwrap();
        let record = decode_cluster_record_v2(&bytes).unwrap();
        assert_eq!((record.cluster_id, record.replicas), (7, 3));
        assert_eq!(record.members, [Member::from(old_member())]);
        assert!(record.removed.is_empty());
    }

    /// A record stored before incarnations reads with every member at 0.
    #[test]
    fn a_cluster_record_from_before_incarnations_still_reads() {
        let old = JoinReplyV3 {
            cluster_id: 7,
            replicas: 3,
            members: vec![old_member()],
            removed: vec![NodeId::new("gone").unwrap()],
        };
        let bytes = rkyv::to_bytes::<rancor::Error>(&old).unwrap();
        let record = decode_cluster_record_v3(&bytes).unwrap();
        assert_eq!(record.members[0].incarnation, 0);
        assert_eq!(record.members[0].region.as_deref(), Some("eu-west"));
        assert_eq!(record.removed, old.removed);
        // Today's layout is another: the old bytes do not pass for it.
        assert!(decode_cluster_record(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
        }

        #[test]
        fn flipped_bytes_never_panic(flip in 0usize..4096, with in any::<u8>()) {
            let mut bytes = encode_request(&put()).to_vec();
            let i = flip % bytes.len();
            bytes[i] ^= with;
            let _ = decode_request(&bytes);
        }
    }
}
